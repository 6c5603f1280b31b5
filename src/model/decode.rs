//! Decoding, the one way generation, scoring and chat use a model: host token ids in, the next
//! position's logits (or a chosen token) out, with a cache per session. A burn model decodes
//! through [`OnDevice`], on its backend and in its own precision; on the CPU, every family also
//! decodes with bf16 weights through [`super::Bf16Decoder`] (`CausalLm::bf16_decoder`).

use burn::tensor::{Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::Rng;

use super::sampling::{sample, Sampling};
use super::{CausalLm, FusedOps};

/// What generation, scoring and chat need of a model: its context, a cache per decoding
/// session, the next-token logits, and every position's NLL.
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
