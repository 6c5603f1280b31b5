//! How the next token is chosen from one position's logits: greedy, or drawn after temperature,
//! top-k and top-p. This is the definition the GPU backends' on-device draw is held to.

use rand::Rng;

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

/// Choose a token id from one position's logits.
pub fn sample(logits: &[f32], sampling: Sampling, rng: &mut impl Rng) -> u32 {
    if sampling.temperature == 0.0 {
        return argmax(logits);
    }
    sample_with_draw(logits, sampling, rng.random())
}

/// The token drawn from `distribution(logits, sampling)` by `draw` ∈ [0, 1): the first, most
/// likely first, whose cumulative probability exceeds it.
pub fn sample_with_draw(logits: &[f32], sampling: Sampling, draw: f64) -> u32 {
    let candidates = distribution(logits, sampling);
    let mut draw = draw;
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
