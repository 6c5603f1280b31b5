//! Sampling from the model: greedy, temperature, top-k and top-p, seeded, with a KV cache so
//! each new token costs one position of compute.

use std::path::PathBuf;

use burn::tensor::{Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use anyhow::Result;

use crate::backend::BackendJob;
use crate::data::{PromptLayout, Tok};
use crate::model::bf16_decoder::Bf16Cache;
use crate::model::gpt2::Precision;
use crate::model::{Bf16Decoder, CausalLm, FusedOps, Gpt2, TrainBackend};
use crate::spec::BackendKind;

/// How tokens are chosen is the model floor's (the GPU backends draw on the device); the
/// tools name it from here.
pub use crate::model::sampling::{argmax, distribution, sample, sample_with_draw, Sampling};

/// What generation, scoring and chat need of a model: its context, a cache per decoding
/// session, the next-token logits, and every position's NLL. Two kinds: a burn model on its
/// device ([`OnDevice`], in the model's own precision) and [`Bf16Decoder`] (the CPU, bf16 weights).
pub trait Decode {
    type Cache;
    /// The positions the model attends over.
    fn context(&self) -> usize;
    /// An empty cache for one decoding session.
    fn new_cache(&self) -> Self::Cache;
    /// How many positions `cache` holds.
    fn cached(&self, cache: &Self::Cache) -> usize;
    /// The next-token logits after `tokens`, which follow the cached positions (and join
    /// them). tokens: [n] → [vocab]
    fn next_logits(&self, tokens: &[u32], cache: &mut Self::Cache) -> Vec<f32>;
    /// The next token after `tokens` (as `next_logits`), chosen by `sample`.
    fn next_token(&self, tokens: &[u32], cache: &mut Self::Cache, sampling: Sampling, rng: &mut StdRng) -> u32 {
        sample(&self.next_logits(tokens, cache), sampling, rng)
    }
    /// −log p(ids[i + 1] | ids[..= i]) for each position i. ids: [n] → [n − 1]
    fn token_nll(&self, ids: &[u32]) -> Vec<f32>;
}

impl<T: Decode> Decode for &T {
    type Cache = T::Cache;
    fn context(&self) -> usize {
        (*self).context()
    }
    fn new_cache(&self) -> T::Cache {
        (*self).new_cache()
    }
    fn cached(&self, cache: &T::Cache) -> usize {
        (*self).cached(cache)
    }
    fn next_logits(&self, tokens: &[u32], cache: &mut T::Cache) -> Vec<f32> {
        (*self).next_logits(tokens, cache)
    }
    fn next_token(&self, tokens: &[u32], cache: &mut T::Cache, sampling: Sampling, rng: &mut StdRng) -> u32 {
        (*self).next_token(tokens, cache, sampling, rng)
    }
    fn token_nll(&self, ids: &[u32]) -> Vec<f32> {
        (*self).token_nll(ids)
    }
}

/// A burn model on its device: decoding through its tensors, in its own precision.
pub struct OnDevice<'a, B: FusedOps, M: CausalLm<B>> {
    pub model: &'a M,
    pub device: B::Device,
}

impl<B: FusedOps, M: CausalLm<B>> OnDevice<'_, B, M> {
    /// ids: [n] → [1, n]
    fn tensor(&self, ids: &[u32]) -> Tensor<B, 2, Int> {
        Tensor::from_data(TensorData::new(ids.iter().map(|&t| t as i32).collect(), [1, ids.len()]), &self.device)
    }
}

impl<B: FusedOps, M: CausalLm<B>> Decode for OnDevice<'_, B, M> {
    type Cache = M::Cache;
    fn context(&self) -> usize {
        self.model.context()
    }
    fn new_cache(&self) -> M::Cache {
        self.model.new_cache()
    }
    fn cached(&self, cache: &M::Cache) -> usize {
        M::cached(cache)
    }
    fn next_logits(&self, tokens: &[u32], cache: &mut M::Cache) -> Vec<f32> {
        let logits = self.model.next_logits(self.tensor(tokens), cache); // [1, vocab]
        logits.into_data().convert::<f32>().to_vec().expect("f32 logits")
    }
    /// The token is picked where the logits are (on a GPU, the device): one id comes back.
    fn next_token(&self, tokens: &[u32], cache: &mut M::Cache, sampling: Sampling, rng: &mut StdRng) -> u32 {
        let logits = self.model.next_logits(self.tensor(tokens), cache); // [1, vocab]
        let id = if sampling.temperature > 0.0 {
            let token = B::sample_token(logits.into_primitive().tensor(), sampling, rng.random());
            Tensor::<B, 1, Int>::from_primitive(token).into_data() // [1]
        } else {
            logits.argmax(1).into_data() // [1, 1]
        };
        id.convert::<i64>().to_vec::<i64>().expect("an index")[0] as u32
    }
    fn token_nll(&self, ids: &[u32]) -> Vec<f32> {
        let n = ids.len() - 1;
        let nll = self.model.token_nll(self.tensor(&ids[..n]), self.tensor(&ids[1..])); // [1, n]
        nll.into_data().convert::<f32>().to_vec().expect("f32 NLL")
    }
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
        let mut model = Gpt2::<B::InnerBackend>::load(&self.dir, None, &device)?;
        match (self.kind, self.precision) {
            (BackendKind::Cpu, Precision::Bf16) => self.job.with(Bf16Decoder::new(&model)),
            (_, precision) => {
                model.precision = precision;
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
