//! Decoding on the CPU with bf16 weights, for every family: at batch 1 each new token reads
//! every weight once, so generation runs at the speed memory delivers weights, and bf16 halves
//! the bytes.
//!
//! A model is mapped once onto one family-neutral layer — a norm, one product for the
//! queries, keys and values, an optional per-head norm of queries and keys (Qwen3), the
//! positions (GPT-2's learned rows or Llama's rotation), attention over a key/value cache of the
//! key/value heads' shape, the output product, a norm, and a GELU or SwiGLU MLP — with its
//! weights rounded to nearest bf16 (LoRA adapters folded in first). Activations, the residual
//! stream, norms, softmax and every sum stay f32, so the only rounding beyond the f32 model's is
//! in the weights and in the cached keys and values (also bf16). Each product reads a block of
//! weight rows once for all the rows being fed (the prompt's tokens at once), so prefill costs
//! one pass over the weights, not one per token.

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use half::bf16;
use rayon::prelude::*;

use super::cpu_kernels::{exp, gelu_chunk, layer_norm_rows, rms_norm_rows, rotate_head, swiglu_chunk};
use super::decode::Decode;
use super::gpt2::{self, Gpt2};
use super::llama::{self, Llama};
use super::lora;
use super::raw::{bf16_products, vectorised, widen};

/// A matrix of bf16 values stored as their bits, one output's weights contiguous: [out, in].
struct Bf16Rows {
    bits: Vec<u16>,
    /// Elements per row (the product's inner dimension).
    width: usize,
}

impl Bf16Rows {
    /// From f32 values laid out [rows, width], each rounded to the nearest bf16.
    fn from_rows(values: &[f32], width: usize) -> Self {
        Self { bits: values.iter().map(|&v| bf16::from_f32(v).to_bits()).collect(), width }
    }

    /// From an `[in, out]` weight (the layout both families keep), transposed so each output's
    /// weights are one contiguous row.
    fn from_columns(values: &[f32], d_in: usize, d_out: usize) -> Self {
        let mut bits = vec![0u16; d_in * d_out];
        for (i, row) in values.chunks_exact(d_out).enumerate() {
            for (o, &v) in row.iter().enumerate() {
                bits[o * d_in + i] = bf16::from_f32(v).to_bits();
            }
        }
        Self { bits, width: d_in }
    }

    fn rows(&self) -> usize {
        self.bits.len() / self.width
    }

    fn row(&self, r: usize) -> &[u16] {
        &self.bits[r * self.width..(r + 1) * self.width]
    }

    /// x·selfᵀ (+ bias): every row of `x` against every weight row.
    /// x: [n, width] → [n, rows]
    fn times(&self, x: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let (n, d, out) = (x.len() / self.width, self.width, self.rows());
        // Tasks own blocks of weight rows and write the transposed result [out, n], so their
        // outputs are disjoint slices; one transpose puts it back to [n, out].
        const ROWS_PER_TASK: usize = 64;
        let mut transposed = vec![0.0f32; out * n];
        transposed
            .par_chunks_mut(ROWS_PER_TASK * n)
            .zip(self.bits.par_chunks(ROWS_PER_TASK * d))
            .for_each(|(y, w)| bf16_products(y, w, x, d));
        let mut y = vec![0.0f32; n * out];
        for (o, column) in transposed.chunks_exact(n).enumerate() {
            let b = bias.map_or(0.0, |b| b[o]);
            for (r, &v) in column.iter().enumerate() {
                y[r * out + o] = v + b;
            }
        }
        y
    }
}

vectorised! {
    /// y += p·widen(v), in f32.
    fn add_scaled_bf16(y: &mut [f32], p: f32, v: &[u16]) {
        for (y, &v) in y.iter_mut().zip(v) {
            *y += p * widen(v);
        }
    }
}

fn values<B: Backend, const D: usize>(param: &Param<Tensor<B, D>>) -> Vec<f32> {
    param.val().into_data().convert::<f32>().to_vec().expect("f32 parameter")
}

/// A norm over the residual stream's width (or, for Qwen3's query and key norms, a head's).
enum Norm {
    /// GPT-2's: (x − mean)/√(var + ε)·weight + bias.
    Layer { weight: Vec<f32>, bias: Vec<f32>, epsilon: f32 },
    /// The Llama family's: x/√(mean(x²) + ε)·weight.
    Rms { weight: Vec<f32>, epsilon: f32 },
}

impl Norm {
    fn layer<B: Backend>(norm: &gpt2::LayerNorm<B>) -> Self {
        Norm::Layer { weight: values(&norm.weight), bias: values(&norm.bias), epsilon: norm.epsilon as f32 }
    }

    fn rms<B: Backend>(norm: &llama::RmsNorm<B>) -> Self {
        Norm::Rms { weight: values(&norm.weight), epsilon: norm.epsilon as f32 }
    }

    /// x: [n, d] → [n, d]
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0f32; x.len()];
        match self {
            Norm::Layer { weight, bias, epsilon } => {
                let n = x.len() / weight.len();
                let (mut mean, mut rstd) = (vec![0.0f32; n], vec![0.0f32; n]);
                layer_norm_rows(&mut y, x, &mut mean, &mut rstd, weight, bias, *epsilon);
            }
            Norm::Rms { weight, epsilon } => {
                let mut rstd = vec![0.0f32; x.len() / weight.len()];
                rms_norm_rows(&mut y, x, &mut rstd, weight, *epsilon);
            }
        }
        y
    }
}

/// An `[in, out]` weight and its bias, where it has one.
type WeightAndBias<'a, B> = (&'a Param<Tensor<B, 2>>, Option<&'a Param<Tensor<B, 1>>>);

/// A product with bf16 weights and an optional f32 bias.
struct Linear {
    weight: Bf16Rows,
    bias: Option<Vec<f32>>,
}

impl Linear {
    /// Several `[in, out]` weights over the same input as one product, their outputs side by
    /// side (a missing bias is zeros where another part has one).
    fn stacked<B: Backend>(parts: &[WeightAndBias<'_, B>]) -> Self {
        let d_in = parts[0].0.val().dims()[0];
        let mut bits = Vec::new();
        let mut bias = Vec::new();
        for (weight, part_bias) in parts {
            let d_out = weight.val().dims()[1];
            bits.extend(Bf16Rows::from_columns(&values(weight), d_in, d_out).bits);
            bias.extend(part_bias.map_or_else(|| vec![0.0; d_out], values));
        }
        let any_bias = parts.iter().any(|(_, b)| b.is_some());
        Self { weight: Bf16Rows { bits, width: d_in }, bias: any_bias.then_some(bias) }
    }

    fn gpt2<B: Backend>(projection: &gpt2::Projection<B>) -> Self {
        Self::stacked(&[(&projection.weight, Some(&projection.bias))])
    }

    /// Llama-family projections over the same input as one product.
    fn llama<B: Backend>(parts: &[&llama::Linear<B>]) -> Self {
        let parts: Vec<WeightAndBias<'_, B>> = parts.iter().map(|l| (&l.weight, l.bias.as_ref())).collect();
        Self::stacked(&parts)
    }

    fn outputs(&self) -> usize {
        self.weight.rows()
    }

    /// x: [n, in] → [n, out]
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        self.weight.times(x, self.bias.as_deref())
    }
}

enum Mlp {
    /// GPT-2's: proj(gelu(fc(x))).
    Gelu { fc: Linear, proj: Linear },
    /// The Llama family's: down(silu(gate(x))·up(x)), gate and up as one product.
    SwiGlu { gate_up: Linear, down: Linear },
}

impl Mlp {
    /// x: [n, d] → [n, d]
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        match self {
            Mlp::Gelu { fc, proj } => {
                let mut h = fc.apply(x); // [n, inner]
                let pre = h.clone();
                gelu_chunk(&mut h, &pre);
                proj.apply(&h)
            }
            Mlp::SwiGlu { gate_up, down } => {
                let inner = gate_up.outputs() / 2;
                let both = gate_up.apply(x); // [n, 2·inner]
                let mut h = vec![0.0f32; both.len() / 2]; // [n, inner]
                for (h, row) in h.chunks_exact_mut(inner).zip(both.chunks_exact(2 * inner)) {
                    let (gate, up) = row.split_at(inner);
                    swiglu_chunk(h, gate, up);
                }
                down.apply(&h)
            }
        }
    }
}

struct Layer {
    attn_norm: Norm,
    /// Queries, keys and values as one product: [n, d] → [n, (heads + 2·kv_heads)·head_dim]
    qkv: Linear,
    /// Qwen3: RMSNorm of each head's queries and keys, before the rotation.
    qk_norm: Option<(Norm, Norm)>,
    out: Linear,
    mlp_norm: Norm,
    mlp: Mlp,
}

/// Where a token is, to the model.
enum Positions {
    /// GPT-2: a learned row added to the token's embedding, kept f32 (one row read per token):
    /// [context, d].
    Learned(Vec<f32>),
    /// The Llama family: queries and keys rotated by position × frequency, one frequency per
    /// pair of a head's dimensions: [head_dim / 2].
    Rotary(Vec<f32>),
}

/// A model with bf16 weights, for decoding on the CPU.
pub struct Bf16Decoder {
    context: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Token embedding rows: [vocab, d].
    embedding: Bf16Rows,
    positions: Positions,
    layers: Vec<Layer>,
    final_norm: Norm,
    /// The LM head's rows, [vocab, d]; None where it is the token embedding (tied).
    head: Option<Bf16Rows>,
}

/// One decoding session's keys and values, bf16, per layer and key/value head:
/// [positions seen, head_dim] each.
pub struct Bf16Cache {
    keys: Vec<Vec<Vec<u16>>>,
    values: Vec<Vec<Vec<u16>>>,
    seen: usize,
}

impl Bf16Cache {
    /// How many positions the cache holds.
    pub fn seen(&self) -> usize {
        self.seen
    }
}

impl Bf16Decoder {
    /// GPT-2's weights as bf16, read from any backend.
    pub fn of_gpt2<B: Backend>(model: &Gpt2<B>) -> Self {
        // A model's clone shares its weights; merging changes only the adapted projections.
        let model = &lora::merged(model.clone());
        let c = &model.config;
        Self {
            context: c.n_positions,
            heads: c.n_head,
            kv_heads: c.n_head,
            head_dim: c.head_dim(),
            embedding: Bf16Rows::from_rows(&values(&model.wte.weight), c.n_embd),
            positions: Positions::Learned(values(&model.wpe.weight)),
            layers: model
                .h
                .iter()
                .map(|block| Layer {
                    attn_norm: Norm::layer(&block.ln_1),
                    qkv: Linear::gpt2(&block.attn.c_attn),
                    qk_norm: None,
                    out: Linear::gpt2(&block.attn.c_proj),
                    mlp_norm: Norm::layer(&block.ln_2),
                    mlp: Mlp::Gelu { fc: Linear::gpt2(&block.mlp.c_fc), proj: Linear::gpt2(&block.mlp.c_proj) },
                })
                .collect(),
            final_norm: Norm::layer(&model.ln_f),
            head: None,
        }
    }

    /// A Llama, Qwen2 or Qwen3 model's weights as bf16, read from any backend.
    pub fn of_llama<B: Backend>(model: &Llama<B>) -> Self {
        // A model's clone shares its weights; merging changes only the adapted projections.
        let model = &lora::merged(model.clone());
        let c = &model.config;
        Self {
            context: c.max_position_embeddings,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            embedding: Bf16Rows::from_rows(&values(&model.model.embed_tokens.weight), c.hidden_size),
            positions: Positions::Rotary(c.inverse_frequencies()),
            layers: model
                .model
                .layers
                .iter()
                .map(|layer| {
                    let (attn, mlp) = (&layer.self_attn, &layer.mlp);
                    let qk_norm = match (&attn.q_norm, &attn.k_norm) {
                        (Some(q), Some(k)) => Some((Norm::rms(q), Norm::rms(k))),
                        _ => None,
                    };
                    Layer {
                        attn_norm: Norm::rms(&layer.input_layernorm),
                        qkv: Linear::llama(&[&attn.q_proj, &attn.k_proj, &attn.v_proj]),
                        qk_norm,
                        out: Linear::llama(&[&attn.o_proj]),
                        mlp_norm: Norm::rms(&layer.post_attention_layernorm),
                        mlp: Mlp::SwiGlu {
                            gate_up: Linear::llama(&[&mlp.gate_proj, &mlp.up_proj]),
                            down: Linear::llama(&[&mlp.down_proj]),
                        },
                    }
                })
                .collect(),
            final_norm: Norm::rms(&model.model.norm),
            head: model.lm_head.as_ref().map(|head| {
                let [d_in, d_out] = head.weight.val().dims();
                Bf16Rows::from_columns(&values(&head.weight), d_in, d_out)
            }),
        }
    }

    /// An empty cache.
    pub fn new_cache(&self) -> Bf16Cache {
        let empty = || (0..self.layers.len()).map(|_| vec![Vec::new(); self.kv_heads]).collect();
        Bf16Cache { keys: empty(), values: empty(), seen: 0 }
    }

    /// Logits after each of `tokens`, which follow the cached positions (and join the cache):
    /// every fed position's with `all`, else the last one's. tokens: [n] → [n or 1, vocab]
    pub fn logits(&self, tokens: &[u32], cache: &mut Bf16Cache, all: bool) -> Vec<f32> {
        let (d, start, n) = (self.embedding.width, cache.seen, tokens.len());
        assert!(n > 0 && start + n <= self.context, "{n} tokens after {start} overflow the context");
        let mut x = vec![0.0f32; n * d]; // [n, d]
        for (i, (row, &token)) in x.chunks_exact_mut(d).zip(tokens).enumerate() {
            let embedding = self.embedding.row(token as usize);
            match &self.positions {
                Positions::Learned(wpe) => {
                    let position = &wpe[(start + i) * d..(start + i + 1) * d];
                    for ((x, &t), &p) in row.iter_mut().zip(embedding).zip(position) {
                        *x = widen(t) + p;
                    }
                }
                Positions::Rotary(_) => row.iter_mut().zip(embedding).for_each(|(x, &t)| *x = widen(t)),
            }
        }
        let rotation = self.rotation(start, n);
        for (l, layer) in self.layers.iter().enumerate() {
            let mut qkv = layer.qkv.apply(&layer.attn_norm.apply(&x)); // [n, (heads + 2·kv_heads)·head_dim]
            self.position_queries_and_keys(&mut qkv, layer, rotation.as_ref());
            let attended = self.attend(&qkv, &mut cache.keys[l], &mut cache.values[l]); // [n, heads·head_dim]
            add_into(&mut x, &layer.out.apply(&attended));
            let mlp = layer.mlp.apply(&layer.mlp_norm.apply(&x));
            add_into(&mut x, &mlp);
        }
        cache.seen += n;
        let last = if all { &x[..] } else { &x[(n - 1) * d..] };
        let head = self.head.as_ref().unwrap_or(&self.embedding);
        head.times(&self.final_norm.apply(last), None) // [rows, vocab]
    }

    /// With rotary positions, cos and sin of each new position × each frequency, as
    /// transformers computes them (the angle in f32). → ([n, head_dim / 2], same)
    fn rotation(&self, start: usize, n: usize) -> Option<(Vec<f32>, Vec<f32>)> {
        let Positions::Rotary(frequencies) = &self.positions else { return None };
        let angles: Vec<f32> =
            (start..start + n).flat_map(|p| frequencies.iter().map(move |&f| p as f32 * f)).collect();
        Some((angles.iter().map(|a| a.cos()).collect(), angles.iter().map(|a| a.sin()).collect()))
    }

    /// Each new row's query and key heads normalised (Qwen3) and rotated to their position, in
    /// place. qkv: [n, (heads + 2·kv_heads)·head_dim]
    fn position_queries_and_keys(&self, qkv: &mut [f32], layer: &Layer, rotation: Option<&(Vec<f32>, Vec<f32>)>) {
        if layer.qk_norm.is_none() && rotation.is_none() {
            return;
        }
        let (hd, heads, kv_heads) = (self.head_dim, self.heads, self.kv_heads);
        let half = hd / 2;
        let mut head = vec![0.0f32; hd];
        for (i, row) in qkv.chunks_exact_mut((heads + 2 * kv_heads) * hd).enumerate() {
            // Queries' heads, then keys' (values are neither normalised nor rotated).
            for (h, part) in row[..(heads + kv_heads) * hd].chunks_exact_mut(hd).enumerate() {
                if let Some((q_norm, k_norm)) = &layer.qk_norm {
                    let norm = if h < heads { q_norm } else { k_norm };
                    part.copy_from_slice(&norm.apply(part));
                }
                if let Some((cos, sin)) = rotation {
                    head.copy_from_slice(part);
                    rotate_head(part, &head, &cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half], 1.0);
                }
            }
        }
    }

    /// Causal attention of the new positions over the cache, which their keys and values join
    /// first; each query head reads the key/value head it shares with its group.
    /// qkv: [n, (heads + 2·kv_heads)·head_dim] → [n, heads·head_dim]
    fn attend(&self, qkv: &[f32], keys: &mut [Vec<u16>], values: &mut [Vec<u16>]) -> Vec<f32> {
        let (hd, heads, kv_heads) = (self.head_dim, self.heads, self.kv_heads);
        let (q_width, kv_width) = (heads * hd, kv_heads * hd);
        let row_width = q_width + 2 * kv_width;
        let n = qkv.len() / row_width;
        for row in qkv.chunks_exact(row_width) {
            for (h, (keys, values)) in keys.iter_mut().zip(values.iter_mut()).enumerate() {
                keys.extend(bits(&row[q_width + h * hd..q_width + (h + 1) * hd]));
                values.extend(bits(&row[q_width + kv_width + h * hd..q_width + kv_width + (h + 1) * hd]));
            }
        }
        let start = keys[0].len() / hd - n;
        let group = heads / kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let (keys, values) = (&*keys, &*values);
        let per_head: Vec<Vec<f32>> = (0..heads)
            .into_par_iter()
            .map(|h| {
                let (keys, values) = (&keys[h / group], &values[h / group]);
                let mut out = vec![0.0f32; n * hd]; // [n, head_dim]
                for (i, (row, y)) in qkv.chunks_exact(row_width).zip(out.chunks_exact_mut(hd)).enumerate() {
                    let q = &row[h * hd..(h + 1) * hd];
                    let seen = start + i + 1;
                    let mut scores = vec![0.0f32; seen]; // q against every key so far
                    bf16_products(&mut scores, &keys[..seen * hd], q, hd);
                    scores.iter_mut().for_each(|s| *s *= scale);
                    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                    let weights: Vec<f32> = scores.iter().map(|&s| exp(s - max)).collect();
                    let total: f32 = weights.iter().sum();
                    for (&p, v) in weights.iter().zip(values.chunks_exact(hd)) {
                        add_scaled_bf16(y, p / total, v);
                    }
                }
                out
            })
            .collect();
        let mut y = vec![0.0f32; n * q_width];
        for (h, out) in per_head.iter().enumerate() {
            for (row, head) in y.chunks_exact_mut(q_width).zip(out.chunks_exact(hd)) {
                row[h * hd..(h + 1) * hd].copy_from_slice(head);
            }
        }
        y
    }
}

/// A slice's values rounded to bf16 bits.
fn bits(part: &[f32]) -> impl Iterator<Item = u16> + '_ {
    part.iter().map(|&v| bf16::from_f32(v).to_bits())
}

fn add_into(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
}

impl Decode for Bf16Decoder {
    type Cache = Bf16Cache;
    fn context(&self) -> usize {
        self.context
    }
    fn new_cache(&self) -> Bf16Cache {
        Bf16Decoder::new_cache(self)
    }
    fn cached(&self, cache: &Bf16Cache) -> usize {
        cache.seen()
    }
    fn next_logits(&self, tokens: &[u32], cache: &mut Bf16Cache) -> Vec<f32> {
        self.logits(tokens, cache, false)
    }
    fn token_nll(&self, ids: &[u32]) -> Vec<f32> {
        let n = ids.len() - 1;
        let logits = self.logits(&ids[..n], &mut self.new_cache(), true); // [n, vocab]
        let vocab = logits.len() / n;
        logits
            .chunks_exact(vocab)
            .zip(&ids[1..])
            .map(|(row, &target)| log_sum_exp(row) - row[target as usize])
            .collect()
    }
}

/// log Σ e^x, shifted by the maximum so that nothing overflows.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    max + row.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product (the AVX2 kernel on CPUs with it) against an f64 sum of the same bf16
    /// weights, for shapes that leave remainders everywhere (rows not a multiple of 4 or of a
    /// task's block, width not of 8). Tolerance: 1e-5 relative, f32 sums of up to 768 terms.
    #[test]
    fn bf16_products_match_an_f64_reference() {
        for (n, d_in, d_out) in [(1, 8, 4), (3, 37, 130), (2, 64, 67), (5, 3, 9), (1, 768, 70)] {
            let x: Vec<f32> = (0..n * d_in).map(|i| ((i * 7919 % 101) as f32 / 50.0) - 1.0).collect();
            let w: Vec<f32> = (0..d_in * d_out).map(|i| ((i * 104_729 % 211) as f32 / 100.0) - 1.05).collect();
            let bias: Vec<f32> = (0..d_out).map(|o| o as f32 / 10.0).collect();
            let weight = Bf16Rows::from_columns(&w, d_in, d_out);
            let y = weight.times(&x, Some(&bias));
            for r in 0..n {
                for o in 0..d_out {
                    let want: f64 = bias[o] as f64
                        + (0..d_in)
                            .map(|i| x[r * d_in + i] as f64 * bf16::from_f32(w[i * d_out + o]).to_f64())
                            .sum::<f64>();
                    let got = y[r * d_out + o] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "({n},{d_in},{d_out}) [{r},{o}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}
