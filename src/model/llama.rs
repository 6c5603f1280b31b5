//! The Llama family in burn — Llama, Qwen2 and Qwen3 — in one file, numerically matching
//! transformers' `LlamaForCausalLM`, `Qwen2ForCausalLM` and `Qwen3ForCausalLM`: pre-RMSNorm
//! blocks, rotary position embeddings, grouped-query attention, a SwiGLU MLP, and a tied or
//! untied LM head. The three differ only in settings: Qwen2 biases its query, key and value
//! projections; Qwen3 RMS-normalises each head's queries and keys.
//!
//! Field names follow transformers' module names, so a parameter's module path is its name in
//! a HF checkpoint: `model.layers.0.self_attn.q_proj.weight`. Linear weights are kept
//! `[in, out]` (the products' layout) and transposed to HF's `[out, in]` on disk.

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::fused::composite::rotate;
use super::fused::{causal_attention, linear, rms_norm, rotary_qkv, swiglu, FusedOps, KeySpans};
use super::gpt2::Precision;
use super::kv_cache::{KvCache, LayerCache};
use super::lora::{Adaptable, Adapters, Lora, Slot, Target};
use super::{nll_of_rows, Packing};

/// Which of the family's HF architectures a model is, kept so it is written back as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    Llama,
    Qwen2,
    Qwen3,
}

impl Variant {
    /// transformers' `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Variant::Llama => "llama",
            Variant::Qwen2 => "qwen2",
            Variant::Qwen3 => "qwen3",
        }
    }

    /// transformers' class for causal language modelling.
    pub fn architecture(self) -> &'static str {
        match self {
            Variant::Llama => "LlamaForCausalLM",
            Variant::Qwen2 => "Qwen2ForCausalLM",
            Variant::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// How the rotary frequencies are scaled for contexts beyond the trained one, as transformers'
/// `rope_scaling` (`rope_type`) computes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, those between blended.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
}

/// The architecture, with the meaning of the fields of HF's `LlamaConfig` (and Qwen2's and
/// Qwen3's, which add nothing it cannot say).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub variant: Variant,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Key/value heads; each serves `num_attention_heads / num_key_value_heads` query heads.
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// The LM head is the token embedding.
    pub tie_word_embeddings: bool,
    /// Biases on the query, key and value projections (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the attention's output projection (Llama's and Qwen3's `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// RMSNorm of each head's queries and keys before the rotation (Qwen3).
    pub qk_norm: bool,
    /// Dropout on the attention probabilities while training.
    pub attention_dropout: f64,
    pub initializer_range: f64,
    /// The tokenizer's ids the checkpoint names, written back with it.
    pub bos_token_id: Option<usize>,
    pub eos_token_ids: Vec<usize>,
}

impl LlamaConfig {
    /// A Llama of the given sizes with Llama's defaults: untied head, no biases, θ = 10,000.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vocab_size: usize,
        context: usize,
        hidden_size: usize,
        intermediate_size: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        Self {
            variant: Variant::Llama,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: hidden_size / heads.max(1),
            max_position_embeddings: context,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_scaling: None,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            attention_dropout: 0.0,
            initializer_range: 0.02,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
        }
    }

    /// Parameter count (a tied LM head counted once), or None when it does not fit a `usize`.
    pub fn checked_num_params(&self) -> Option<usize> {
        let (d, inner) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads.checked_mul(self.head_dim)?;
        let kv = self.num_key_value_heads.checked_mul(self.head_dim)?;
        let bias = |on: bool, n: usize| if on { n } else { 0 };
        let attention = d
            .checked_mul(q.checked_add(kv.checked_mul(2)?)?)?
            .checked_add(q.checked_mul(d)?)?
            .checked_add(bias(self.qkv_bias, q + 2 * kv) + bias(self.o_bias, d))?
            .checked_add(bias(self.qk_norm, 2 * self.head_dim))?;
        let mlp = d.checked_mul(inner)?.checked_mul(3)?.checked_add(bias(self.mlp_bias, 2 * inner + d))?;
        let block = attention.checked_add(mlp)?.checked_add(2 * d)?;
        let embedding = self.vocab_size.checked_mul(d)?;
        let head = if self.tie_word_embeddings { 0 } else { embedding };
        self.num_hidden_layers.checked_mul(block)?.checked_add(embedding)?.checked_add(head)?.checked_add(d)
    }

    pub fn num_params(&self) -> usize {
        self.checked_num_params().unwrap_or(usize::MAX)
    }

    /// `CausalLm::position_cost_in_keys`: a layer's multiply-adds a position (the query, key,
    /// value and output projections, then gate, up and down) over what each key it attends to
    /// costs (a score and a weighted value per query head dimension).
    pub fn position_cost_in_keys(&self) -> usize {
        let (d, q, kv) =
            (self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim);
        (d * (2 * q + 2 * kv) + 3 * d * self.intermediate_size) / q.max(1)
    }

    /// The rotary frequencies, one per pair of a head's dimensions, as transformers computes
    /// them (in f32), scaled by `rope_scaling`. → [head_dim / 2]
    pub fn inverse_frequencies(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        let base = self.rope_theta as f32;
        let plain = (0..half).map(|i| 1.0 / base.powf((2 * i) as f32 / self.head_dim as f32));
        match &self.rope_scaling {
            None => plain.collect(),
            Some(RopeScaling::Linear { factor }) => plain.map(|f| f / *factor as f32).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let (factor, low, high, old) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                    *original_max_position_embeddings as f32,
                );
                let (low_freq_wavelen, high_freq_wavelen) = (old / low, old / high);
                plain
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen > low_freq_wavelen {
                            f / factor
                        } else if wavelen < high_freq_wavelen {
                            f
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// A freshly initialised model, as transformers initialises one: N(0, initializer_range)
    /// weights and embeddings, zero biases, unit RMSNorms.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Llama<B> {
        let normal = Initializer::Normal { mean: 0.0, std: self.initializer_range };
        let d = self.hidden_size;
        let (q, kv) = (self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim);
        let linear = |d_in: usize, d_out: usize, bias: bool| {
            let weight = LinearConfig::new(d_in, d_out).with_initializer(normal.clone()).init::<B>(device).weight;
            Linear { weight, bias: bias.then(|| Param::from_tensor(Tensor::zeros([d_out], device))), lora: None }
        };
        let norm =
            |n: usize| RmsNorm { weight: Param::from_tensor(Tensor::ones([n], device)), epsilon: self.rms_norm_eps };
        let layers = (0..self.num_hidden_layers)
            .map(|_| DecoderLayer {
                input_layernorm: norm(d),
                self_attn: SelfAttention {
                    q_proj: linear(d, q, self.qkv_bias),
                    k_proj: linear(d, kv, self.qkv_bias),
                    v_proj: linear(d, kv, self.qkv_bias),
                    o_proj: linear(q, d, self.o_bias),
                    q_norm: self.qk_norm.then(|| norm(self.head_dim)),
                    k_norm: self.qk_norm.then(|| norm(self.head_dim)),
                    heads: self.num_attention_heads,
                    kv_heads: self.num_key_value_heads,
                    head_dim: self.head_dim,
                    attention_dropout: self.attention_dropout,
                },
                post_attention_layernorm: norm(d),
                mlp: SwiGlu {
                    gate_proj: linear(d, self.intermediate_size, self.mlp_bias),
                    up_proj: linear(d, self.intermediate_size, self.mlp_bias),
                    down_proj: linear(self.intermediate_size, d, self.mlp_bias),
                },
            })
            .collect();
        Llama {
            config: self.clone(),
            precision: Precision::F32,
            model: Body {
                embed_tokens: EmbeddingConfig::new(self.vocab_size, d).with_initializer(normal.clone()).init(device),
                layers,
                norm: norm(d),
            },
            lm_head: (!self.tie_word_embeddings).then(|| linear(d, self.vocab_size, false)),
            adapters: None,
        }
    }
}

#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    /// The architecture (not a parameter).
    pub config: LlamaConfig,
    /// What the linear layers' products run in (a run setting, not a weight).
    pub precision: Precision,
    /// transformers' `model`: everything but the LM head.
    pub model: Body<B>,
    /// The LM head, when not tied to the token embedding.
    pub lm_head: Option<Linear<B>>,
    /// With LoRA adapters: their settings and the frozen base model they adapt.
    pub adapters: Option<Adapters>,
}

#[derive(Module, Debug)]
pub struct Body<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: SelfAttention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: SwiGlu<B>,
}

#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    /// Qwen3: RMSNorm over each head's queries and keys.
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub attention_dropout: f64,
}

#[derive(Module, Debug)]
pub struct SwiGlu<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

/// A linear layer, the weight kept `[in, out]`, with an optional LoRA adapter beside the (then
/// frozen) weight.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// [in, out]
    pub weight: Param<Tensor<B, 2>>,
    /// [out]
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub lora: Option<Lora<B>>,
}

impl<B: FusedOps> Linear<B> {
    /// x·weight + bias, plus the adapter's low-rank term. x: [rows, in] → [rows, out]
    fn forward(&self, x: Tensor<B, 2>, precision: Precision) -> Tensor<B, 2> {
        let base = linear(x.clone(), self.weight.val(), self.bias.as_ref().map(Param::val), precision);
        match &self.lora {
            Some(lora) => base + lora.forward(x, precision),
            None => base,
        }
    }
}

/// RMSNorm over the last dimension: x/√(mean(x²) + ε)·weight.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub epsilon: f64,
}

impl<B: FusedOps> RmsNorm<B> {
    /// x: [rows, d] → [rows, d]
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        rms_norm(x, self.weight.val(), self.epsilon)
    }
}

/// The rotation of every position's queries and keys: cos and sin of position × frequency, one
/// per pair of a head's dimensions. [batch·seq, head_dim / 2] each.
struct Rotary<B: Backend> {
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
}

impl<B: Backend> Rotary<B> {
    /// positions: [batch, seq]
    fn at(positions: Tensor<B, 2, Int>, inverse_frequencies: &[f32]) -> Self {
        let half = inverse_frequencies.len();
        let [batch, seq] = positions.dims();
        let device = positions.device();
        let frequencies = Tensor::<B, 1>::from_data(TensorData::new(inverse_frequencies.to_vec(), [half]), &device);
        let angles = positions.float().reshape([batch * seq, 1]) * frequencies.reshape([1, half]); // [batch·seq, half]
        Rotary { cos: angles.clone().cos(), sin: angles.sin() }
    }

    /// The rotation of every head at every position. x: [batch, seq, heads, head_dim] → same
    fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [batch, seq, heads, head_dim] = x.dims();
        let rows = x.reshape([batch * seq, heads, head_dim]);
        rotate(rows, &self.cos, &self.sin, false).reshape([batch, seq, heads, head_dim])
    }
}

impl<B: Backend> Adaptable<B> for Llama<B> {
    const PEFT_PREFIX: &'static str = "base_model.model.";

    fn family(&self) -> &'static str {
        self.config.variant.model_type()
    }

    fn layers(&self) -> usize {
        self.model.layers.len()
    }

    fn slot(&mut self, layer: usize, target: Target) -> Option<Slot<'_, B>> {
        let layer = &mut self.model.layers[layer];
        let (attn, mlp) = (&mut layer.self_attn, &mut layer.mlp);
        let linear = match target {
            Target::QProj => &mut attn.q_proj,
            Target::KProj => &mut attn.k_proj,
            Target::VProj => &mut attn.v_proj,
            Target::OProj => &mut attn.o_proj,
            Target::GateProj => &mut mlp.gate_proj,
            Target::UpProj => &mut mlp.up_proj,
            Target::DownProj => &mut mlp.down_proj,
            _ => return None,
        };
        Some(Slot { weight: &mut linear.weight, lora: &mut linear.lora })
    }

    fn path(target: Target, layer: usize) -> String {
        let part =
            if matches!(target, Target::GateProj | Target::UpProj | Target::DownProj) { "mlp" } else { "self_attn" };
        format!("model.layers.{layer}.{part}.{}", target.peft_name())
    }

    fn adapters(&self) -> Option<&Adapters> {
        self.adapters.as_ref()
    }

    fn set_adapters(&mut self, adapters: Option<Adapters>) {
        self.adapters = adapters;
    }

    fn width(&self) -> usize {
        self.config.hidden_size
    }

    fn write_config(&self, eos_id: Option<usize>, dir: &std::path::Path) -> anyhow::Result<()> {
        super::llama_hf::write_config(&self.config, eos_id, dir)
    }
}

impl<B: FusedOps> Llama<B> {
    /// Final hidden states. With a cache, `tokens` are the positions after the cached ones;
    /// with `packing`, each row holds several examples, each rotated from position 0 and
    /// attending only within itself. tokens: [batch, seq] → [batch, seq, hidden]
    pub fn hidden(
        &self,
        tokens: Tensor<B, 2, Int>,
        mut cache: Option<&mut KvCache<B>>,
        packing: Option<Packing<B>>,
    ) -> Tensor<B, 3> {
        let [batch, seq] = tokens.dims();
        let start = KvCache::begin_step(&mut cache, seq, self.config.max_position_embeddings);
        let (positions, spans) = Packing::layout(packing, start, [batch, seq], &tokens.device()); // [batch, seq], spans
        let rotary = Rotary::at(positions, &self.config.inverse_frequencies());
        let mut x = self.model.embed_tokens.forward(tokens); // [batch, seq, hidden]
        for (index, layer) in self.model.layers.iter().enumerate() {
            let layer_cache = cache.as_mut().map(|c| c.layer(index));
            x = layer.forward(x, &rotary, layer_cache, spans.clone(), self.precision);
        }
        if let Some(cache) = cache {
            cache.advance(seq);
        }
        let hidden = x.dims()[2];
        self.model.norm.forward(x.reshape([batch * seq, hidden])).reshape([batch, seq, hidden])
    }

    /// Final hidden states at the row-major positions `at` (every position when `None`). The
    /// last layer finishes only those rows: nothing reads the others' outputs, only their keys
    /// and values. tokens: [batch, seq], at: [n] → [n, hidden] (or [batch·seq, hidden])
    fn hidden_at(
        &self,
        tokens: Tensor<B, 2, Int>,
        packing: Option<Packing<B>>,
        at: Option<Tensor<B, 1, Int>>,
    ) -> Tensor<B, 2> {
        let [batch, seq] = tokens.dims();
        let (positions, spans) = Packing::layout(packing, 0, [batch, seq], &tokens.device()); // [batch, seq], spans
        let rotary = Rotary::at(positions, &self.config.inverse_frequencies());
        let mut x = self.model.embed_tokens.forward(tokens); // [batch, seq, hidden]
        let (last, layers) = self.model.layers.split_last().expect("a model has layers");
        for layer in layers {
            x = layer.forward(x, &rotary, None, spans.clone(), self.precision);
        }
        self.model.norm.forward(last.forward_at(x, &rotary, None, spans, at, self.precision))
    }

    /// Next-token logits from hidden states. hidden: [tokens, hidden] → [tokens, vocab]
    pub fn lm_head(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(head) => head.forward(hidden, self.precision),
            None => linear(hidden, self.model.embed_tokens.weight.val().transpose(), None, self.precision),
        }
    }

    /// Per-token NLL of `targets` at the row-major positions `at` (`CausalLm::nll_at`).
    /// inputs, targets: [batch, seq], at: [n] → [n] (or [batch·seq])
    pub fn nll_at(
        &self,
        inputs: Tensor<B, 2, Int>,
        targets: Tensor<B, 2, Int>,
        packing: Option<Packing<B>>,
        at: Option<Tensor<B, 1, Int>>,
    ) -> Tensor<B, 1> {
        let head = match &self.lm_head {
            Some(head) => head.weight.val(),
            None => self.model.embed_tokens.weight.val().transpose(),
        }; // [hidden, vocab]
        nll_of_rows(self.hidden_at(inputs, packing, at.clone()), head, targets, at, self.precision)
    }

    /// The next-token logits after `tokens`, which follow the cached positions.
    /// tokens: [batch, seq] → [batch, vocab]
    pub fn next_logits(&self, tokens: Tensor<B, 2, Int>, cache: &mut KvCache<B>) -> Tensor<B, 2> {
        let hidden = self.hidden(tokens, Some(cache), None); // [batch, fed, hidden]
        let [batch, fed, width] = hidden.dims();
        self.lm_head(hidden.slice([0..batch, fed - 1..fed]).reshape([batch, width]))
        // [batch, vocab]
    }
}

impl<B: FusedOps> DecoderLayer<B> {
    /// x: [batch, seq, hidden] → [batch, seq, hidden]
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rotary: &Rotary<B>,
        cache: Option<LayerCache<'_, B>>,
        spans: Option<KeySpans<B>>,
        precision: Precision,
    ) -> Tensor<B, 3> {
        let [batch, seq, hidden] = x.dims();
        self.forward_at(x, rotary, cache, spans, None, precision).reshape([batch, seq, hidden])
    }

    /// `forward`'s output at the row-major positions `at` alone (every position when `None`):
    /// attention over every position, the output projection and the MLP at those rows only.
    /// x: [batch, seq, hidden], at: [n] → [n, hidden] (or [batch·seq, hidden])
    fn forward_at(
        &self,
        x: Tensor<B, 3>,
        rotary: &Rotary<B>,
        cache: Option<LayerCache<'_, B>>,
        spans: Option<KeySpans<B>>,
        at: Option<Tensor<B, 1, Int>>,
        precision: Precision,
    ) -> Tensor<B, 2> {
        let [batch, seq, hidden] = x.dims();
        let x = x.reshape([batch * seq, hidden]);
        let heads =
            self.self_attn.heads(self.input_layernorm.forward(x.clone()), batch, rotary, cache, spans, precision);
        let (x, heads) = match at {
            Some(at) => (x.select(0, at.clone()), heads.select(0, at)),
            None => (x, heads),
        }; // [n, hidden], [n, heads·head_dim]
        let x = x + self.self_attn.o_proj.forward(heads, precision);
        let mlp = self.mlp.forward(self.post_attention_layernorm.forward(x.clone()), precision);
        x + mlp
    }
}

impl<B: FusedOps> SelfAttention<B> {
    /// Causal grouped-query attention over rotated queries and keys, the heads' outputs side by
    /// side before the output projection (`o_proj`); `spans` (packed rows) confines each
    /// position to its own example's keys. x: [batch·seq, hidden] → [batch·seq, heads·head_dim]
    fn heads(
        &self,
        x: Tensor<B, 2>,
        batch: usize,
        rotary: &Rotary<B>,
        cache: Option<LayerCache<'_, B>>,
        spans: Option<KeySpans<B>>,
        precision: Precision,
    ) -> Tensor<B, 2> {
        let seq = x.dims()[0] / batch;
        let (heads, kv_heads, head_dim) = (self.heads, self.kv_heads, self.head_dim);
        let project = |proj: &Linear<B>, norm: &Option<RmsNorm<B>>, n: usize| {
            let y = proj.forward(x.clone(), precision); // [batch·seq, n·head_dim]
            match norm {
                Some(norm) => norm.forward(y.reshape([batch * seq * n, head_dim])).reshape([batch * seq, n * head_dim]),
                None => y,
            }
        };
        let q = project(&self.q_proj, &self.q_norm, heads); // [batch·seq, heads·head_dim]
        let k = project(&self.k_proj, &self.k_norm, kv_heads); // [batch·seq, kv_heads·head_dim]
        let v = project(&self.v_proj, &None, kv_heads); // [batch·seq, kv_heads·head_dim]
        let y = match cache {
            // Training and scoring: one op rotates and spreads the heads into the packed q·k·v
            // the fused attention reads. (Generation, below, runs without autodiff, so without
            // dropout.)
            None => {
                let (cos, sin) = (rotary.cos.clone(), rotary.sin.clone());
                let qkv = rotary_qkv(q, k, v, cos, sin, heads, kv_heads); // [batch·seq, 3·heads·head_dim]
                let qkv = qkv.reshape([batch, seq, 3 * heads * head_dim]);
                causal_attention(qkv, heads, self.attention_dropout, spans, precision)
                // [batch, seq, heads·head_dim]
            }
            Some(cache) => {
                let split = |t: Tensor<B, 2>, n: usize| t.reshape([batch, seq, n, head_dim]);
                let (q, k) = (rotary.apply(split(q, heads)), rotary.apply(split(k, kv_heads)));
                let v = split(v, kv_heads);
                cache.attend(q.swap_dims(1, 2), k.swap_dims(1, 2), v.swap_dims(1, 2))
            }
        };
        y.reshape([batch * seq, heads * head_dim])
    }
}

impl<B: FusedOps> SwiGlu<B> {
    /// down(silu(gate(x)) · up(x)). x: [rows, hidden] → [rows, hidden]
    fn forward(&self, x: Tensor<B, 2>, precision: Precision) -> Tensor<B, 2> {
        let gate = self.gate_proj.forward(x.clone(), precision); // [rows, inner]
        let up = self.up_proj.forward(x, precision); // [rows, inner]
        self.down_proj.forward(swiglu(gate, up), precision)
    }
}
