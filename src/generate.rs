//! Sampling from the model: greedy, temperature, top-k and top-p, seeded, with a KV cache so
//! each new token costs one position of compute.

use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::SeedableRng;

use anyhow::Result;

use crate::backend::BackendJob;
use crate::data::{PromptLayout, Tok};
use crate::model::gpt2::Precision;
use crate::model::{CausalLm, FusedOps, Model, TrainBackend};
use crate::spec::BackendKind;

/// How tokens are chosen, and what decoding is, are the model floor's (the GPU backends draw on
/// the device); the tools name them from here.
pub use crate::model::decode::{Decode, OnDevice};
pub use crate::model::sampling::{argmax, distribution, sample, sample_with_draw, Sampling};

/// Work done with a decoder (generation, scoring, chat), whichever backend it runs on.
pub trait WithDecoder {
    type Output;
    fn with(self, decoder: impl Decode) -> Result<Self::Output>;
}

/// Load the model in `dir` on the chosen backend and hand `job` a decoder for it: in bf16 on
/// the CPU, the bf16 decoder; otherwise the burn model on the backend's device, its linear
/// layers in `precision`.
pub struct Decoding<W> {
    pub dir: PathBuf,
    pub kind: BackendKind,
    pub precision: Precision,
    pub job: W,
}

impl<W: WithDecoder> BackendJob for Decoding<W> {
    type Output = W::Output;
    fn run<B: TrainBackend>(self, device: B::Device, device_name: String) -> Result<W::Output> {
        tracing::info!(device = %device_name, precision = ?self.precision, "decoding on");
        let model = Model::<B::InnerBackend>::load(&self.dir, None, &device)?;
        let decoder = match (self.kind, self.precision) {
            (BackendKind::Cpu, Precision::Bf16) => Some(model.bf16_decoder()),
            _ => None,
        };
        match decoder {
            Some(decoder) => self.job.with(decoder),
            None => {
                let model = model.with_precision(self.precision);
                self.job.with(OnDevice { model: &model, device })
            }
        }
    }
}

/// A generator over one model, with its own seeded random stream.
pub struct Generator<D: Decode> {
    decoder: D,
    rng: StdRng,
}

impl<'a, B: FusedOps, M: CausalLm<B>> Generator<OnDevice<'a, B, M>> {
    /// Generation from a burn model on `device`.
    pub fn new(model: &'a M, device: &B::Device, seed: u64) -> Self {
        Self::with(OnDevice { model, device: device.clone() }, seed)
    }
}

impl<D: Decode> Generator<D> {
    pub fn with(decoder: D, seed: u64) -> Self {
        Self { decoder, rng: StdRng::seed_from_u64(seed) }
    }

    /// Continue `prompt` by up to `max_new_tokens`, stopping after any of the `stop` ids (which
    /// is returned as the last id), when the context is full, or when `on_token`, which sees each id as it is
    /// chosen, returns false (a caller's stop text).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        sampling: Sampling,
        stop: &[u32],
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Vec<u32> {
        let context = self.decoder.context();
        let mut cache = self.decoder.new_cache();
        let mut out = Vec::new();
        if prompt.is_empty() || prompt.len() >= context {
            return out;
        }
        let mut feed: Vec<u32> = prompt.to_vec();
        while out.len() < max_new_tokens && self.decoder.cached(&cache) + feed.len() <= context {
            let next = self.decoder.next_token(&feed, &mut cache, sampling, &mut self.rng);
            let go_on = on_token(next);
            out.push(next);
            if stop.contains(&next) || !go_on {
                break;
            }
            feed = vec![next];
        }
        out
    }

    /// An answer to `prompt`: generated until an end-of-sequence id, `max_new_tokens`, or `layout`'s stop text.
    pub fn answer(
        &mut self,
        tok: &Tok,
        layout: &PromptLayout,
        prompt: &[u32],
        max_new_tokens: usize,
        sampling: Sampling,
    ) -> Result<Vec<u32>> {
        let mut so_far = Vec::new();
        let new = self.generate(prompt, max_new_tokens, sampling, &tok.stop_ids, |id| {
            so_far.push(id);
            // Decoding is cheap beside a forward pass; only layouts with a stop text pay it.
            !layout.stop.as_deref().is_some_and(|stop| tok.decode(&so_far).is_ok_and(|text| text.contains(stop)))
        });
        Ok(new)
    }
}
