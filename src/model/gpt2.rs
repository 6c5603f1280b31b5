//! GPT-2 in burn: the whole model in one file, numerically matching HuggingFace
//! transformers' `GPT2LMHeadModel` (pre-LayerNorm blocks, tanh GELU, tied LM head).
//!
//! Field names follow transformers' module names (`h`, `ln_1`, `c_attn`, a LayerNorm's `weight`
//! and `bias`), so a parameter's module path is its name in a HF checkpoint: `h.0.attn.c_attn.weight`.

use std::path::Path;

use anyhow::Result;
use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use super::fused::{causal_attention, gelu_new, layer_norm, linear, FusedOps, KeySpans};
use super::kv_cache::{KvCache, LayerCache};
use super::lora::{self, Adaptable, Adapters, Lora, Slot, Target};
use super::{hf, nll_of_rows, Bf16Decoder, CausalLm, Packing};

/// The architecture, with the same meaning as the fields of HF's `GPT2Config`.
#[derive(Config, Debug, PartialEq)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    /// Context length: the number of learned positions.
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[config(default = 1e-5)]
    pub layer_norm_epsilon: f64,
    /// Dropout on the embeddings' sum (`embd_pdrop`).
    #[config(default = 0.0)]
    pub embd_pdrop: f64,
    /// Dropout on each block's attention and MLP outputs (`resid_pdrop`).
    #[config(default = 0.0)]
    pub resid_pdrop: f64,
    /// Dropout on the attention probabilities (`attn_pdrop`).
    #[config(default = 0.0)]
    pub attn_pdrop: f64,
    /// Standard deviation of the normal initialisation (GPT-2 uses 0.02).
    #[config(default = 0.02)]
    pub initializer_range: f64,
}

impl Gpt2Config {
    /// The same probability for all three dropouts (what `model.dropout` sets).
    pub fn with_dropout(self, p: f64) -> Self {
        Self { embd_pdrop: p, resid_pdrop: p, attn_pdrop: p, ..self }
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// `CausalLm::position_cost_in_keys`: a block's multiply-adds a position (4·d² in attention's
    /// projections, 8·d² in the MLP) over what each key it attends to costs (d: a score and a
    /// weighted value per dimension).
    pub fn position_cost_in_keys(&self) -> usize {
        12 * self.n_embd
    }

    /// Parameter count (the tied LM head counted once).
    pub fn num_params(&self) -> usize {
        self.checked_num_params().unwrap_or(usize::MAX)
    }

    /// The parameter count, or None when it does not fit in a `usize` (no such model can be
    /// allocated).
    pub fn checked_num_params(&self) -> Option<usize> {
        let d = self.n_embd;
        let d2 = d.checked_mul(d)?;
        // Two LayerNorms, c_attn, attn.c_proj, c_fc, mlp.c_proj: 12·d² + 13·d.
        let block = d2.checked_mul(12)?.checked_add(d.checked_mul(13)?)?;
        let embeddings = self.vocab_size.checked_add(self.n_positions)?.checked_mul(d)?;
        embeddings.checked_add(self.n_layer.checked_mul(block)?)?.checked_add(d.checked_mul(2)?)
    }

    /// A freshly initialised model, as GPT-2 initialises one: N(0, initializer_range) weights,
    /// zero biases, unit LayerNorms, and residual projections scaled by 1/sqrt(2·n_layer).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Gpt2<B> {
        let std = self.initializer_range;
        let normal = |std: f64| Initializer::Normal { mean: 0.0, std };
        let proj_std = std / (2.0 * self.n_layer as f64).sqrt();
        let linear = |d_in: usize, d_out: usize, std: f64| {
            let Linear { weight, .. } = LinearConfig::new(d_in, d_out).with_initializer(normal(std)).init(device);
            Projection { weight, bias: Param::from_tensor(Tensor::zeros([d_out], device)), lora: None }
        };
        let layer_norm = || LayerNorm {
            weight: Param::from_tensor(Tensor::ones([self.n_embd], device)),
            bias: Param::from_tensor(Tensor::zeros([self.n_embd], device)),
            epsilon: self.layer_norm_epsilon,
        };
        let d = self.n_embd;
        let h = (0..self.n_layer)
            .map(|_| Block {
                ln_1: layer_norm(),
                attn: Attention {
                    c_attn: linear(d, 3 * d, std),
                    c_proj: linear(d, d, proj_std),
                    n_head: self.n_head,
                    attn_pdrop: self.attn_pdrop,
                },
                ln_2: layer_norm(),
                mlp: Mlp { c_fc: linear(d, 4 * d, std), c_proj: linear(4 * d, d, proj_std) },
                dropout: DropoutConfig::new(self.resid_pdrop).init(),
            })
            .collect();
        Gpt2 {
            config: self.clone(),
            precision: Precision::F32,
            adapters: None,
            wte: EmbeddingConfig::new(self.vocab_size, d).with_initializer(normal(std)).init(device),
            wpe: EmbeddingConfig::new(self.n_positions, d).with_initializer(normal(0.01)).init(device),
            h,
            ln_f: layer_norm(),
            dropout: DropoutConfig::new(self.embd_pdrop).init(),
        }
    }
}

/// What the matrix products of the linear layers and the LM head run in. With `Bf16` their
/// operands (inputs and weights forward; output gradients, weights and inputs backward) are
/// rounded to bf16 and their products summed in f32: the weights themselves, their gradients,
/// the optimizer state, LayerNorm, attention and the loss stay f32. On the CPU the products'
/// results stay f32; burn's bf16 product elsewhere (a GPU) rounds them to bf16 too, as
/// PyTorch's autocast does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

#[derive(Module, Debug)]
pub struct Gpt2<B: Backend> {
    /// The architecture (not a parameter).
    pub config: Gpt2Config,
    /// What the linear layers' products run in (not saved: a run setting, not a weight).
    pub precision: Precision,
    /// With LoRA adapters: their settings and the frozen base model they adapt.
    pub adapters: Option<Adapters>,
    /// Token embedding; also the LM head (tied weights, as in GPT-2).
    pub wte: Embedding<B>,
    /// Learned position embedding.
    pub wpe: Embedding<B>,
    /// The transformer blocks.
    pub h: Vec<Block<B>>,
    pub ln_f: LayerNorm<B>,
    /// On the embeddings' sum.
    pub dropout: Dropout,
}

/// LayerNorm over the last dimension: (x − mean)/√(var + ε)·weight + bias, biased variance.
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Param<Tensor<B, 1>>,
    pub epsilon: f64,
}

impl<B: FusedOps> LayerNorm<B> {
    /// x: [batch, seq, d_model] → [batch, seq, d_model]
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, seq, d_model] = x.dims();
        self.rows(x.reshape([batch * seq, d_model])).reshape([batch, seq, d_model])
    }

    /// x: [rows, d_model] → [rows, d_model]
    pub fn rows(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        layer_norm(x, self.weight.val(), self.bias.val(), self.epsilon)
    }
}

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub ln_1: LayerNorm<B>,
    pub attn: Attention<B>,
    pub ln_2: LayerNorm<B>,
    pub mlp: Mlp<B>,
    /// On the attention and MLP outputs, before each joins the residual stream.
    pub dropout: Dropout,
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Query, key and value projections in one matrix: [d, 3d].
    pub c_attn: Projection<B>,
    pub c_proj: Projection<B>,
    pub n_head: usize,
    /// Dropout on the attention probabilities while training.
    pub attn_pdrop: f64,
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub c_fc: Projection<B>,
    pub c_proj: Projection<B>,
}

/// A linear layer as GPT-2's Conv1D stores it (weight `[in, out]`), with an optional LoRA
/// adapter beside the (then frozen) weight.
#[derive(Module, Debug)]
pub struct Projection<B: Backend> {
    /// [in, out]
    pub weight: Param<Tensor<B, 2>>,
    /// [out]
    pub bias: Param<Tensor<B, 1>>,
    pub lora: Option<Lora<B>>,
}

impl<B: FusedOps> Projection<B> {
    /// x·weight + bias, plus the adapter's low-rank term. x: [rows, in] → [rows, out]
    pub fn forward(&self, x: Tensor<B, 2>, precision: Precision) -> Tensor<B, 2> {
        let base = linear(x.clone(), self.weight.val(), Some(self.bias.val()), precision);
        match &self.lora {
            Some(lora) => base + lora.forward(x, precision),
            None => base,
        }
    }
}

impl<B: FusedOps> CausalLm<B> for Gpt2<B> {
    type Cache = KvCache<B>;

    fn context(&self) -> usize {
        self.config.n_positions
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn num_params(&self) -> usize {
        match &self.adapters {
            Some(_) => lora::trainable_params(self),
            None => self.config.num_params(),
        }
    }

    fn position_cost_in_keys(&self) -> usize {
        self.config.position_cost_in_keys()
    }

    fn nll_at(
        &self,
        inputs: Tensor<B, 2, Int>,
        targets: Tensor<B, 2, Int>,
        packing: Option<Packing<B>>,
        at: Option<Tensor<B, 1, Int>>,
    ) -> Tensor<B, 1> {
        let head = self.wte.weight.val().transpose(); // [d_model, vocab]
        nll_of_rows(self.hidden_at(inputs, packing, at.clone()), head, targets, at, self.precision)
    }

    fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.h.len())
    }

    fn cached(cache: &KvCache<B>) -> usize {
        cache.seen()
    }

    fn next_logits(&self, tokens: Tensor<B, 2, Int>, cache: &mut KvCache<B>) -> Tensor<B, 2> {
        let hidden = self.hidden(tokens, Some(cache), None); // [batch, fed, d_model]
        let [batch, fed, d_model] = hidden.dims();
        self.lm_head(hidden.slice([0..batch, fed - 1..fed]).reshape([batch, d_model]))
        // [batch, vocab]
    }

    fn with_precision(self, precision: Precision) -> Self {
        Gpt2 { precision, ..self }
    }

    fn bf16_decoder(&self) -> Bf16Decoder {
        Bf16Decoder::of_gpt2(self)
    }

    fn save(&self, dir: &Path, eos_id: Option<usize>) -> Result<()> {
        match &self.adapters {
            Some(adapters) => lora::save(self, adapters, dir, eos_id),
            None => hf::save(self, eos_id, dir),
        }
    }

    fn load(dir: &Path, dropout: Option<f64>, device: &B::Device) -> Result<Self> {
        match lora::is_adapter_dir(dir) {
            true => match lora::load(dir, dropout, device)? {
                super::Model::Gpt2(model) => Ok(model),
                _ => {
                    Err(crate::error::bad_input(format!("{}: adapters on a model that is not a GPT-2", dir.display())))
                }
            },
            false => Ok(hf::load(dir, dropout, device)?.1),
        }
    }

    fn with_weights_of(self, dir: &Path) -> Result<Self> {
        match lora::is_adapter_dir(dir) {
            true => lora::load_weights(self, dir),
            false => hf::load_weights(self, dir),
        }
    }
}

impl<B: Backend> Adaptable<B> for Gpt2<B> {
    const PEFT_PREFIX: &'static str = "base_model.model.transformer.";

    fn family(&self) -> &'static str {
        "gpt2"
    }

    fn layers(&self) -> usize {
        self.h.len()
    }

    fn slot(&mut self, layer: usize, target: Target) -> Option<Slot<'_, B>> {
        let block = &mut self.h[layer];
        let projection = match target {
            Target::CAttn => &mut block.attn.c_attn,
            Target::AttnCProj => &mut block.attn.c_proj,
            Target::CFc => &mut block.mlp.c_fc,
            Target::MlpCProj => &mut block.mlp.c_proj,
            _ => return None,
        };
        Some(Slot { weight: &mut projection.weight, lora: &mut projection.lora })
    }

    fn path(target: Target, layer: usize) -> String {
        let module = match target {
            Target::CAttn => "attn.c_attn",
            Target::AttnCProj => "attn.c_proj",
            Target::CFc => "mlp.c_fc",
            _ => "mlp.c_proj",
        };
        format!("h.{layer}.{module}")
    }

    fn adapters(&self) -> Option<&Adapters> {
        self.adapters.as_ref()
    }

    fn set_adapters(&mut self, adapters: Option<Adapters>) {
        self.adapters = adapters;
    }

    fn width(&self) -> usize {
        self.config.n_embd
    }

    fn write_config(&self, eos_id: Option<usize>, dir: &Path) -> Result<()> {
        hf::write_config(&self.config, eos_id, dir)
    }
}

impl<B: FusedOps> Gpt2<B> {
    /// Final hidden states. With a cache, `tokens` are the positions after the cached ones;
    /// with `packing`, each row holds several examples, each computed as if alone.
    /// tokens: [batch, seq] → [batch, seq, d_model]
    pub fn hidden(
        &self,
        tokens: Tensor<B, 2, Int>,
        mut cache: Option<&mut KvCache<B>>,
        packing: Option<Packing<B>>,
    ) -> Tensor<B, 3> {
        let [batch, seq] = tokens.dims();
        let start = KvCache::begin_step(&mut cache, seq, self.config.n_positions);
        let (positions, spans) = Packing::layout(packing, start, [batch, seq], &tokens.device()); // [batch, seq], spans
        let mut x = self.embed(tokens, positions); // [batch, seq, d_model]
        for (layer, block) in self.h.iter().enumerate() {
            let layer_cache = cache.as_mut().map(|c| c.layer(layer));
            x = block.forward(x, layer_cache, spans.clone(), self.precision);
        }
        if let Some(cache) = cache {
            cache.advance(seq);
        }
        self.ln_f.forward(x)
    }

    /// Token and position embeddings, with dropout. tokens, positions: [batch, seq] → [batch, seq, d_model]
    fn embed(&self, tokens: Tensor<B, 2, Int>, positions: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.dropout.forward(self.wte.forward(tokens) + self.wpe.forward(positions))
    }

    /// Final hidden states at the row-major positions `at` (every position when `None`). The
    /// last block finishes only those rows: nothing reads the others' outputs, only their keys
    /// and values. tokens: [batch, seq], at: [n] → [n, d_model] (or [batch·seq, d_model])
    fn hidden_at(
        &self,
        tokens: Tensor<B, 2, Int>,
        packing: Option<Packing<B>>,
        at: Option<Tensor<B, 1, Int>>,
    ) -> Tensor<B, 2> {
        let [batch, seq] = tokens.dims();
        let (positions, spans) = Packing::layout(packing, 0, [batch, seq], &tokens.device()); // [batch, seq], spans
        let mut x = self.embed(tokens, positions); // [batch, seq, d_model]
        let (last, blocks) = self.h.split_last().expect("a model has blocks");
        for block in blocks {
            x = block.forward(x, None, spans.clone(), self.precision);
        }
        self.ln_f.rows(last.forward_at(x, None, spans, at, self.precision))
    }

    /// Next-token logits from hidden states, through the tied LM head.
    /// hidden: [tokens, d_model] → [tokens, vocab]
    pub fn lm_head(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        linear(hidden, self.wte.weight.val().transpose(), None, self.precision)
    }

    /// Logits at every position. tokens: [batch, seq] → [batch, seq, vocab]
    pub fn logits(&self, tokens: Tensor<B, 2, Int>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        let hidden = self.hidden(tokens, cache, None); // [batch, seq, d_model]
        let [batch, seq, d_model] = hidden.dims();
        self.lm_head(hidden.reshape([batch * seq, d_model])).reshape([batch, seq, self.config.vocab_size])
    }
}

impl<B: FusedOps> Block<B> {
    /// x: [batch, seq, d_model] → [batch, seq, d_model]
    fn forward(
        &self,
        x: Tensor<B, 3>,
        cache: Option<LayerCache<'_, B>>,
        spans: Option<KeySpans<B>>,
        precision: Precision,
    ) -> Tensor<B, 3> {
        let [batch, seq, d_model] = x.dims();
        self.forward_at(x, cache, spans, None, precision).reshape([batch, seq, d_model])
    }

    /// `forward`'s output at the row-major positions `at` alone (every position when `None`):
    /// attention over every position, the output projection and the MLP at those rows only.
    /// x: [batch, seq, d_model], at: [n] → [n, d_model] (or [batch·seq, d_model])
    fn forward_at(
        &self,
        x: Tensor<B, 3>,
        cache: Option<LayerCache<'_, B>>,
        spans: Option<KeySpans<B>>,
        at: Option<Tensor<B, 1, Int>>,
        precision: Precision,
    ) -> Tensor<B, 2> {
        let [batch, seq, d_model] = x.dims();
        let heads = self.attn.heads(self.ln_1.forward(x.clone()), cache, spans, precision); // [batch, seq, d_model]
        let rows = |t: Tensor<B, 3>| {
            let t = t.reshape([batch * seq, d_model]);
            match &at {
                Some(at) => t.select(0, at.clone()),
                None => t,
            }
        };
        let (x, heads) = (rows(x), rows(heads)); // [n, d_model]
        let x = x + self.dropout.forward(self.attn.c_proj.forward(heads, precision));
        let mlp = self.mlp.forward(self.ln_2.rows(x.clone()), precision);
        x + self.dropout.forward(mlp)
    }
}

impl<B: FusedOps> Attention<B> {
    /// Causal multi-head self-attention, with `attn_pdrop` on its probabilities while training,
    /// the heads' outputs side by side before the output projection (`c_proj`); `spans` (packed
    /// rows) confines each position to its own example's keys.
    /// x: [batch, seq, d_model] → [batch, seq, d_model]
    fn heads(
        &self,
        x: Tensor<B, 3>,
        cache: Option<LayerCache<'_, B>>,
        spans: Option<KeySpans<B>>,
        precision: Precision,
    ) -> Tensor<B, 3> {
        let [batch, seq, d_model] = x.dims();
        let qkv = self.c_attn.forward(x.reshape([batch * seq, d_model]), precision); // [batch·seq, 3·d_model]
        match cache {
            // Training and scoring: one fused op reads the heads out of qkv directly.
            // (Generation, below, runs without autodiff, so without dropout.)
            None => {
                causal_attention(qkv.reshape([batch, seq, 3 * d_model]), self.n_head, self.attn_pdrop, spans, precision)
            }
            Some(cache) => self.cached_attention(qkv, batch, seq, cache),
        }
    }

    /// Generation: the new positions against the cache (see `LayerCache::attend`).
    /// qkv: [batch·seq, 3·d_model] → [batch, seq, d_model]
    fn cached_attention(&self, qkv: Tensor<B, 2>, batch: usize, seq: usize, cache: LayerCache<'_, B>) -> Tensor<B, 3> {
        let d_model = qkv.dims()[1] / 3;
        let (heads, head_dim) = (self.n_head, d_model / self.n_head);
        let part = |part: usize| {
            qkv.clone().narrow(1, part * d_model, d_model).reshape([batch, seq, heads, head_dim]).swap_dims(1, 2)
            // [batch, heads, seq, head_dim]
        };
        cache.attend(part(0), part(1), part(2))
    }
}

impl<B: FusedOps> Mlp<B> {
    /// x: [rows, d_model] → [rows, d_model]
    fn forward(&self, x: Tensor<B, 2>, precision: Precision) -> Tensor<B, 2> {
        let h = self.c_fc.forward(x, precision); // [rows, 4·d_model]
        self.c_proj.forward(gelu_new(h), precision)
    }
}
