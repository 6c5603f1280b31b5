//! GPT-2 decoding on the CPU with bf16 weights: at batch 1 each new token reads every weight
//! once, so generation runs at the speed memory delivers weights, and bf16 halves the bytes.
//!
//! The weights are converted once (rounded to nearest bf16) when the decoder is made; the
//! activations, residual stream, LayerNorm, softmax and every sum stay f32, so the only rounding
//! beyond the f32 model's is in the weights and in the cached keys and values (also bf16). The
//! cache is allocated whole for the model's context when a session starts, so decoding never
//! reallocates. Each product reads a block of weight rows once for all the rows being fed (the
//! prompt's tokens at once), so prefill costs one pass over the weights, not one per token.

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use half::bf16;
use rayon::prelude::*;

use super::cpu_kernels::{exp, gelu_chunk, layer_norm_rows};
use super::decode::Decode;
use super::gpt2::{Gpt2, Gpt2Config, LayerNorm, Projection};
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

    /// From a `[in, out]` weight (GPT-2's Conv1D layout), transposed so each output's weights
    /// are one contiguous row.
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

struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    epsilon: f32,
}

impl Norm {
    fn of<B: Backend>(norm: &LayerNorm<B>) -> Self {
        Self { weight: values(&norm.weight), bias: values(&norm.bias), epsilon: norm.epsilon as f32 }
    }

    /// x: [n, d] → [n, d]
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        let n = x.len() / self.weight.len();
        let (mut y, mut mean, mut rstd) = (vec![0.0f32; x.len()], vec![0.0f32; n], vec![0.0f32; n]);
        layer_norm_rows(&mut y, x, &mut mean, &mut rstd, &self.weight, &self.bias, self.epsilon);
        y
    }
}

struct Linear {
    weight: Bf16Rows,
    bias: Vec<f32>,
}

impl Linear {
    fn of<B: Backend>(projection: &Projection<B>) -> Self {
        let [d_in, d_out] = projection.weight.val().dims();
        Self {
            weight: Bf16Rows::from_columns(&values(&projection.weight), d_in, d_out),
            bias: values(&projection.bias),
        }
    }

    /// x: [n, in] → [n, out]
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        self.weight.times(x, Some(&self.bias))
    }
}

struct Layer {
    ln_1: Norm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: Norm,
    c_fc: Linear,
    mlp_proj: Linear,
}

/// GPT-2 with bf16 weights, for decoding on the CPU.
pub struct Bf16Decoder {
    config: Gpt2Config,
    /// Token embedding rows, also the LM head (tied): [vocab, d_model].
    wte: Bf16Rows,
    /// Position embedding, kept f32 (one row read per token): [n_positions, d_model].
    wpe: Vec<f32>,
    layers: Vec<Layer>,
    ln_f: Norm,
}

/// One decoding session's keys and values, bf16, allocated for the whole context:
/// per layer [heads, context, head_dim] each.
pub struct Bf16Cache {
    keys: Vec<Vec<u16>>,
    values: Vec<Vec<u16>>,
    seen: usize,
}

impl Bf16Cache {
    /// How many positions the cache holds.
    pub fn seen(&self) -> usize {
        self.seen
    }
}

fn values<B: Backend, const D: usize>(param: &Param<Tensor<B, D>>) -> Vec<f32> {
    param.val().into_data().convert::<f32>().to_vec().expect("f32 parameter")
}

impl Bf16Decoder {
    /// The model's weights as bf16 (LoRA adapters folded in first), read from any backend.
    pub fn new<B: Backend>(model: &Gpt2<B>) -> Self {
        let merged;
        let model = match model.adapters {
            Some(_) => {
                merged = lora::merged(model.clone());
                &merged
            }
            None => model,
        };
        let d = model.config.n_embd;
        Self {
            config: model.config.clone(),
            wte: Bf16Rows::from_rows(&values(&model.wte.weight), d),
            wpe: values(&model.wpe.weight),
            layers: model
                .h
                .iter()
                .map(|block| Layer {
                    ln_1: Norm::of(&block.ln_1),
                    c_attn: Linear::of(&block.attn.c_attn),
                    attn_proj: Linear::of(&block.attn.c_proj),
                    ln_2: Norm::of(&block.ln_2),
                    c_fc: Linear::of(&block.mlp.c_fc),
                    mlp_proj: Linear::of(&block.mlp.c_proj),
                })
                .collect(),
            ln_f: Norm::of(&model.ln_f),
        }
    }

    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    /// An empty cache with room for the whole context.
    pub fn new_cache(&self) -> Bf16Cache {
        let size = self.config.n_positions * self.config.n_embd;
        let zeroed = || (0..self.config.n_layer).map(|_| vec![0u16; size]).collect();
        Bf16Cache { keys: zeroed(), values: zeroed(), seen: 0 }
    }

    /// Logits after each of `tokens`, which follow the cached positions (and join the cache):
    /// every fed position's with `all`, else the last one's. tokens: [n] → [n or 1, vocab]
    pub fn logits(&self, tokens: &[u32], cache: &mut Bf16Cache, all: bool) -> Vec<f32> {
        let (d, start, n) = (self.config.n_embd, cache.seen, tokens.len());
        assert!(n > 0 && start + n <= self.config.n_positions, "{n} tokens after {start} overflow the context");
        let mut x = vec![0.0f32; n * d]; // [n, d]
        for (i, (row, &token)) in x.chunks_exact_mut(d).zip(tokens).enumerate() {
            let position = &self.wpe[(start + i) * d..(start + i + 1) * d];
            for ((x, &t), &p) in row.iter_mut().zip(self.wte.row(token as usize)).zip(position) {
                *x = widen(t) + p;
            }
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let qkv = layer.c_attn.apply(&layer.ln_1.apply(&x)); // [n, 3d]
            let attended = self.attend(&qkv, &mut cache.keys[l], &mut cache.values[l], start); // [n, d]
            add_into(&mut x, &layer.attn_proj.apply(&attended));
            let mut h = layer.c_fc.apply(&layer.ln_2.apply(&x)); // [n, 4d]
            let pre = h.clone();
            gelu_chunk(&mut h, &pre);
            add_into(&mut x, &layer.mlp_proj.apply(&h));
        }
        cache.seen += n;
        let last = if all { &x[..] } else { &x[(n - 1) * d..] };
        self.wte.times(&self.ln_f.apply(last), None) // [rows, vocab]
    }

    /// Causal attention of the new positions (after `start` cached ones) over the cache, which
    /// their keys and values join first. qkv: [n, 3d] → [n, d]
    fn attend(&self, qkv: &[f32], keys: &mut [u16], values: &mut [u16], start: usize) -> Vec<f32> {
        let (d, heads, context) = (self.config.n_embd, self.config.n_head, self.config.n_positions);
        let head_dim = d / heads;
        let n = qkv.len() / (3 * d);
        let scale = 1.0 / (head_dim as f32).sqrt();
        let per_head: Vec<Vec<f32>> = keys
            .par_chunks_mut(context * head_dim)
            .zip(values.par_chunks_mut(context * head_dim))
            .enumerate()
            .map(|(h, (keys, values))| {
                for (i, row) in qkv.chunks_exact(3 * d).enumerate() {
                    let slot = (start + i) * head_dim..(start + i + 1) * head_dim;
                    let part = |p: usize| &row[p * d + h * head_dim..p * d + (h + 1) * head_dim];
                    keys[slot.clone()].iter_mut().zip(part(1)).for_each(|(k, &v)| *k = bf16::from_f32(v).to_bits());
                    values[slot].iter_mut().zip(part(2)).for_each(|(k, &v)| *k = bf16::from_f32(v).to_bits());
                }
                let mut out = vec![0.0f32; n * head_dim]; // [n, head_dim]
                for (i, (row, y)) in qkv.chunks_exact(3 * d).zip(out.chunks_exact_mut(head_dim)).enumerate() {
                    let q = &row[h * head_dim..(h + 1) * head_dim];
                    let seen = start + i + 1;
                    let mut scores = vec![0.0f32; seen]; // q against every key so far
                    bf16_products(&mut scores, &keys[..seen * head_dim], q, head_dim);
                    scores.iter_mut().for_each(|s| *s *= scale);
                    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                    let weights: Vec<f32> = scores.iter().map(|&s| exp(s - max)).collect();
                    let total: f32 = weights.iter().sum();
                    for (&p, v) in weights.iter().zip(values.chunks_exact(head_dim)) {
                        add_scaled_bf16(y, p / total, v);
                    }
                }
                out
            })
            .collect();
        let mut y = vec![0.0f32; n * d];
        for (h, out) in per_head.iter().enumerate() {
            for (row, head) in y.chunks_exact_mut(d).zip(out.chunks_exact(head_dim)) {
                row[h * head_dim..(h + 1) * head_dim].copy_from_slice(head);
            }
        }
        y
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
}

impl Decode for Bf16Decoder {
    type Cache = Bf16Cache;
    fn context(&self) -> usize {
        self.config().n_positions
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
