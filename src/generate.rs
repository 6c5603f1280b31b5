//! Sampling from the model: greedy, temperature, top-k and top-p, seeded, with a KV cache so
//! each new token costs one position of compute.

use burn::tensor::{Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use anyhow::Result;

use crate::data::{PromptLayout, Tok};
use crate::model::{CausalLm, FusedOps};

/// How to pick each next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 = greedy (argmax).
    pub temperature: f64,
    /// Keep the k most likely tokens; 0 = all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p; 1 = all.
    pub top_p: f64,
}

impl Sampling {
    pub const GREEDY: Sampling = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 };
}

/// A generator over one model, with its own seeded random stream.
pub struct Generator<'a, B: FusedOps, M: CausalLm<B>> {
    model: &'a M,
    device: B::Device,
    rng: StdRng,
}

impl<'a, B: FusedOps, M: CausalLm<B>> Generator<'a, B, M> {
    pub fn new(model: &'a M, device: &B::Device, seed: u64) -> Self {
        Self { model, device: device.clone(), rng: StdRng::seed_from_u64(seed) }
    }

    /// Continue `prompt` by up to `max_new_tokens`, stopping after `eos` (which is returned as
    /// the last id), when the context is full, or when `on_token`, which sees each id as it is
    /// chosen, returns false (a caller's stop text).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        sampling: Sampling,
        eos: Option<u32>,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Vec<u32> {
        let context = self.model.context();
        let mut cache = self.model.new_cache();
        let mut out = Vec::new();
        if prompt.is_empty() || prompt.len() >= context {
            return out;
        }
        let mut feed: Vec<u32> = prompt.to_vec();
        while out.len() < max_new_tokens && M::cached(&cache) + feed.len() <= context {
            let tokens = Tensor::<B, 2, Int>::from_data(
                TensorData::new(feed.iter().map(|&t| t as i32).collect(), [1, feed.len()]),
                &self.device,
            );
            let logits = self.model.next_logits(tokens, &mut cache); // [1, vocab]
            let logits: Vec<f32> = logits.into_data().to_vec().expect("f32 logits");
            let next = sample(&logits, sampling, &mut self.rng);
            let go_on = on_token(next);
            out.push(next);
            if Some(next) == eos || !go_on {
                break;
            }
            feed = vec![next];
        }
        out
    }

    /// An answer to `prompt`: generated until EOS, `max_new_tokens`, or `layout`'s stop text.
    pub fn answer(
        &mut self,
        tok: &Tok,
        layout: &PromptLayout,
        prompt: &[u32],
        max_new_tokens: usize,
        sampling: Sampling,
    ) -> Result<Vec<u32>> {
        let mut so_far = Vec::new();
        let new = self.generate(prompt, max_new_tokens, sampling, Some(tok.eos_id), |id| {
            so_far.push(id);
            // Decoding is cheap beside a forward pass; only layouts with a stop text pay it.
            !layout.stop.as_deref().is_some_and(|stop| tok.decode(&so_far).is_ok_and(|text| text.contains(stop)))
        });
        Ok(new)
    }
}

/// Choose a token id from one position's logits.
pub fn sample(logits: &[f32], sampling: Sampling, rng: &mut impl Rng) -> u32 {
    if sampling.temperature == 0.0 {
        return argmax(logits);
    }
    let candidates = distribution(logits, sampling);
    let mut draw: f64 = rng.random();
    for &(id, p) in &candidates {
        if draw < p {
            return id;
        }
        draw -= p;
    }
    candidates[candidates.len() - 1].0
}

/// The distribution `sample` draws from at a temperature above 0: (token id, probability)
/// after temperature, top-k and top-p, most likely first (ties: lower id first), summing to 1.
pub fn distribution(logits: &[f32], sampling: Sampling) -> Vec<(u32, f64)> {
    let mut candidates: Vec<(u32, f64)> =
        logits.iter().enumerate().map(|(i, &l)| (i as u32, l as f64 / sampling.temperature)).collect();
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if sampling.top_k > 0 {
        candidates.truncate(sampling.top_k);
    }
    let max = candidates[0].1;
    let mut probs: Vec<f64> = candidates.iter().map(|&(_, l)| (l - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if sampling.top_p < 1.0 {
        // Keep tokens until the mass before them reaches top_p (the first is always kept).
        let mut mass = 0.0;
        let keep = probs
            .iter()
            .take_while(|&&p| {
                let before = mass;
                mass += p;
                before < sampling.top_p
            })
            .count();
        probs.truncate(keep.max(1));
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    candidates.into_iter().zip(probs).map(|((id, _), p)| (id, p)).collect()
}

/// The index of the largest logit (the first, on ties, as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}
