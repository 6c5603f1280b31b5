//! Preference tuning's objective (DPO): raise the policy's log-probability of each pair's
//! chosen completion over its rejected one, relative to a frozen reference model, with TRL's
//! losses of the same names. The reference is the model as the stage began; its
//! log-probabilities are computed once (`reference_logps`) and travel with the pairs, so no
//! second model is kept while training.

use std::sync::Arc;

use burn::tensor::activation::{log_sigmoid, relu};
use burn::tensor::{Tensor, TensorData};

use crate::data::{best_fit, Batch, PreferencePair, Sequence};
use crate::model::{CausalLm, FusedOps};
use crate::objective::{BatchCounts, MicroBatch, Objective, TrainingSet};
use crate::spec::DpoLoss;

/// A pair with its reference model's summed completion log-probabilities (chosen, rejected).
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredPair {
    pub pair: PreferencePair,
    pub reference: [f64; 2],
}

/// The stage's pairs with their reference log-probabilities, shared by the peers.
#[derive(Clone)]
pub struct ScoredPairs(pub Arc<Vec<ScoredPair>>);

impl TrainingSet for ScoredPairs {
    type Example = ScoredPair;

    fn len(&self) -> usize {
        self.0.len()
    }

    fn get(&self, i: usize) -> ScoredPair {
        self.0[i].clone()
    }

    fn token_len(&self, i: usize) -> usize {
        self.0[i].pair.token_len()
    }

    fn loss_units(&self, _: usize) -> usize {
        1
    }

    fn fingerprint(&self) -> u64 {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        for scored in self.0.iter() {
            for sequence in [&scored.pair.chosen, &scored.pair.rejected] {
                hasher.update((sequence.ids.len() as u64).to_le_bytes());
                sequence.ids.iter().for_each(|id| hasher.update(id.to_le_bytes()));
                hasher.update(sequence.trained.iter().map(|&t| t as u8).collect::<Vec<_>>());
            }
            scored.reference.iter().for_each(|r| hasher.update(r.to_le_bytes()));
        }
        u64::from_le_bytes(hasher.finalize()[..8].try_into().expect("8 bytes"))
    }
}

/// DPO's loss, as TRL's DPOTrainer computes it for `loss_type` = sigmoid, ipo, hinge or robust.
#[derive(Debug, Clone, Copy)]
pub struct Dpo {
    pub beta: f64,
    pub loss: DpoLoss,
    /// `robust` only.
    pub label_smoothing: f64,
    pub pad_id: u32,
}

/// The figures DPO reports, under TRL's names, as means over pairs.
const FIGURES: [&str; 6] =
    ["logps/chosen", "logps/rejected", "rewards/accuracies", "rewards/chosen", "rewards/margins", "rewards/rejected"];

/// Each sequence's summed log-probability of its trained (completion) tokens. → [sequences]
///
/// The sequences are packed end to end into as few rows as the longest of them fills (each
/// computed as if alone: positions and attention restart at each), so a step spends nothing on
/// padding but the rows' tails; the LM head runs only at the positions predicting a trained
/// token, and a matrix of which sequence owns each of those sums their log-probabilities per
/// sequence.
pub fn completion_logps<B: FusedOps, M: CausalLm<B>>(
    model: &M,
    sequences: &[&Sequence],
    pad_id: u32,
    device: &B::Device,
) -> (Tensor<B, 1>, BatchCounts) {
    let lengths: Vec<usize> = sequences.iter().map(|s| s.ids.len()).collect();
    let bins = best_fit(&lengths, lengths.iter().copied().max().unwrap_or(1));
    let rows: Vec<Sequence> =
        bins.iter().map(|bin| Sequence::packed(&bin.iter().map(|&i| sequences[i]).collect::<Vec<_>>())).collect();
    let batch = Batch::<B>::new(&rows.iter().collect::<Vec<_>>(), pad_id, device);
    let counts = BatchCounts { tokens: batch.tokens, positions: batch.positions };
    // The scored positions in row-major order: each row's sequences in bin order.
    let mut owners = Vec::with_capacity(batch.loss_tokens);
    for bin in &bins {
        for &s in bin {
            owners.extend(std::iter::repeat_n(s, sequences[s].loss_tokens()));
        }
    }
    debug_assert_eq!(owners.len(), batch.loss_tokens);
    // owner[s, i] = 1 where scored position i predicts a trained token of sequence s.
    let mut owner = vec![0f32; sequences.len() * owners.len()];
    for (i, &s) in owners.iter().enumerate() {
        owner[s * owners.len() + i] = 1.0;
    }
    let owner = Tensor::<B, 2>::from_data(TensorData::new(owner, [sequences.len(), owners.len()]), device);
    let nll = model.nll_at(batch.inputs, batch.targets, batch.packing, Some(batch.scored)); // [scored]
    let logps = owner.matmul(nll.unsqueeze_dim(1)).neg(); // [sequences, 1]
    (logps.squeeze_dim::<1>(1), counts)
}

/// The reference log-probabilities of `pairs` under `model`, `batch_size` pairs at a time;
/// `done` hears how many pairs each batch scored, and may stop the work with an error.
pub fn reference_logps<B: FusedOps, M: CausalLm<B>>(
    model: &M,
    pairs: &[PreferencePair],
    batch_size: usize,
    pad_id: u32,
    device: &B::Device,
    mut done: impl FnMut(usize) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<[f64; 2]>> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let sequences: Vec<&Sequence> =
            chunk.iter().map(|p| &p.chosen).chain(chunk.iter().map(|p| &p.rejected)).collect();
        let (logps, _) = completion_logps(model, &sequences, pad_id, device);
        let logps = values(logps);
        let n = chunk.len();
        out.extend((0..n).map(|i| [logps[i], logps[n + i]]));
        done(n)?;
    }
    Ok(out)
}

/// A tensor's values as f64, read back from the device.
fn values<B: FusedOps>(tensor: Tensor<B, 1>) -> Vec<f64> {
    tensor.into_data().convert::<f64>().into_vec().expect("f64 values")
}

impl<B: FusedOps, M: CausalLm<B>> Objective<B, M> for Dpo {
    type Example = ScoredPair;

    fn loss_tokens(&self, _: &ScoredPair) -> usize {
        1
    }

    fn loss_sum(&self, model: &M, pairs: &[&ScoredPair], device: &B::Device) -> MicroBatch<B> {
        let n = pairs.len();
        // The chosen sequences, then the rejected ones, in one batch (as TRL batches them).
        let sequences: Vec<&Sequence> =
            pairs.iter().map(|p| &p.pair.chosen).chain(pairs.iter().map(|p| &p.pair.rejected)).collect();
        let (logps, counts) = completion_logps(model, &sequences, self.pad_id, device); // [2n]
        let chosen = logps.clone().slice(0..n); // [n]
        let rejected = logps.slice(n..2 * n); // [n]
        let column = |values: Vec<f64>| Tensor::<B, 1>::from_data(TensorData::new(values, [n]), device);
        let ref_chosen = column(pairs.iter().map(|p| p.reference[0]).collect());
        let ref_rejected = column(pairs.iter().map(|p| p.reference[1]).collect());
        let chosen_ratio = chosen.clone() - ref_chosen; // [n]
        let rejected_ratio = rejected.clone() - ref_rejected; // [n]
        let delta = chosen_ratio.clone() - rejected_ratio.clone(); // [n]
        let beta = self.beta;
        let per_pair = match self.loss {
            DpoLoss::Sigmoid => log_sigmoid(delta.mul_scalar(beta)).neg(),
            DpoLoss::Hinge => relu(delta.mul_scalar(-beta).add_scalar(1.0)),
            DpoLoss::Ipo => {
                // Per-token means: each completion's log-ratio over its completion tokens.
                let lengths = |pick: fn(&ScoredPair) -> &Sequence| {
                    column(pairs.iter().map(|p| pick(p).trained.iter().filter(|&&t| t).count().max(1) as f64).collect())
                };
                let mean_delta = chosen_ratio.clone() / lengths(|p| &p.pair.chosen)
                    - rejected_ratio.clone() / lengths(|p| &p.pair.rejected);
                mean_delta.sub_scalar(1.0 / (2.0 * beta)).powi_scalar(2)
            }
            DpoLoss::Robust => {
                let smoothing = self.label_smoothing;
                let clean = log_sigmoid(delta.clone().mul_scalar(beta)).mul_scalar(-(1.0 - smoothing));
                let flipped = log_sigmoid(delta.mul_scalar(-beta)).mul_scalar(-smoothing);
                (clean - flipped).div_scalar(1.0 - 2.0 * smoothing)
            }
        };
        let (chosen_rewards, rejected_rewards) = (values(chosen_ratio).into_iter(), values(rejected_ratio));
        let (mut accuracies, mut chosen_sum, mut rejected_sum) = (0.0, 0.0, 0.0);
        for (c, r) in chosen_rewards.zip(rejected_rewards) {
            let (c, r) = (beta * c, beta * r);
            accuracies += f64::from(c > r);
            chosen_sum += c;
            rejected_sum += r;
        }
        let sum = |values: Vec<f64>| values.iter().sum::<f64>();
        let figures = vec![
            sum(values(chosen.detach())),
            sum(values(rejected.detach())),
            accuracies,
            chosen_sum,
            chosen_sum - rejected_sum,
            rejected_sum,
        ];
        MicroBatch { loss: per_pair.sum(), counts, figures }
    }

    fn figure_names(&self) -> &'static [&'static str] {
        &FIGURES
    }
}
