//! Preference tuning's objective (DPO): raise the policy's log-probability of each pair's
//! chosen completion over its rejected one, relative to a frozen reference model, with TRL's
//! losses of the same names. The reference is the model as the stage began; its
//! log-probabilities are computed once (`reference_logps`) and travel with the pairs, so no
//! second model is kept while training.

use std::sync::Arc;

use burn::tensor::activation::{log_sigmoid, relu};
use burn::tensor::{Int, Tensor, TensorData};

use crate::data::{best_fit, PreferencePair, Sequence};
use crate::model::{CausalLm, FusedOps, Packing};
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

/// One pair laid out for a row: its chosen sequence's inputs, then its rejected sequence's from
/// the last position of their common prefix on. The rejected tokens continue the prefix's
/// positions and skip the chosen tail (a gap in their attention), so the prefix is computed
/// once and serves both: the prefix's last token, fed a second time, predicts the rejected
/// tail's first (the first copy predicts the chosen tail's). Per token, offsets within the unit.
#[derive(Debug, Default)]
struct PairUnit {
    inputs: Vec<u32>,
    targets: Vec<u32>,
    positions: Vec<usize>,
    /// The keys (offsets) a token skips, [from, to): empty but in the rejected part, whose
    /// tokens skip the chosen tail and the first copy of the last shared token.
    gaps: Vec<(usize, usize)>,
    /// Whether the token's target is a trained token of the chosen, of the rejected sequence.
    scored: Vec<[bool; 2]>,
}

impl PairUnit {
    fn new(pair: &PreferencePair) -> Self {
        let (chosen, rejected) = (&pair.chosen, &pair.rejected);
        let (nc, nr) = (chosen.ids.len(), rejected.ids.len());
        let common = chosen.ids.iter().zip(&rejected.ids).take_while(|(c, r)| c == r).count();
        // Shared inputs: the first `shared` chosen tokens predict the same targets for both
        // (never a sequence's last token, which is no input).
        let shared = common.min(nc - 1).min(nr - 1).saturating_sub(1);
        let mut unit = PairUnit::default();
        for t in 0..nc - 1 {
            let for_rejected = t < shared && rejected.trained[t + 1];
            unit.push(chosen.ids[t], chosen.ids[t + 1], t, (0, 0), [chosen.trained[t + 1], for_rejected]);
        }
        let chosen_end = nc - 1;
        for t in shared..nr - 1 {
            unit.push(rejected.ids[t], rejected.ids[t + 1], t, (shared, chosen_end), [false, rejected.trained[t + 1]]);
        }
        unit
    }

    fn push(&mut self, input: u32, target: u32, position: usize, gap: (usize, usize), scored: [bool; 2]) {
        self.inputs.push(input);
        self.targets.push(target);
        self.positions.push(position);
        self.gaps.push(gap);
        self.scored.push(scored);
    }

    fn len(&self) -> usize {
        self.inputs.len()
    }
}

/// The tokens `pair_logps` lays `pair` out in, its prompt shared (its row, when alone).
pub fn pair_row_len(pair: &PreferencePair) -> usize {
    PairUnit::new(pair).len()
}

/// Each pair's summed log-probabilities of its chosen and rejected completions' trained tokens:
/// the chosen ones, then the rejected ones. → [2·pairs]
///
/// Each pair is one `PairUnit` (its prompt computed once for both completions), the units
/// packed end to end into rows (each computed as if alone) of `row_length`, so a step spends
/// nothing on padding but the rows' tails; the LM head (and the last layer past attention)
/// runs only at the positions predicting a trained token, and a matrix of which sequences own
/// each of those sums their log-probabilities per sequence.
pub fn pair_logps<B: FusedOps, M: CausalLm<B>>(
    model: &M,
    pairs: &[&PreferencePair],
    pad_id: u32,
    device: &B::Device,
) -> (Tensor<B, 1>, BatchCounts) {
    let units: Vec<PairUnit> = pairs.iter().map(|p| PairUnit::new(p)).collect();
    let lengths: Vec<usize> = units.iter().map(PairUnit::len).collect();
    let seq = row_length(&lengths, model.position_cost_in_keys());
    let bins = best_fit(&lengths, seq);
    let (rows, n) = (bins.len(), pairs.len());
    let mut inputs = vec![pad_id as i32; rows * seq];
    let mut targets = vec![pad_id as i32; rows * seq];
    let (mut positions, mut starts, mut gaps) =
        (vec![0i32; rows * seq], vec![0i32; rows * seq], vec![0i32; rows * seq * 2]);
    // The scored positions in row-major order, and the sequences (0..n chosen, n..2n rejected)
    // each one's log-probability counts for.
    let (mut scored, mut owners): (Vec<i32>, Vec<[Option<usize>; 2]>) = (Vec::new(), Vec::new());
    for (row, bin) in bins.iter().enumerate() {
        let mut offset = 0;
        for &p in bin {
            let unit = &units[p];
            for t in 0..unit.len() {
                let at = row * seq + offset + t;
                (inputs[at], targets[at]) = (unit.inputs[t] as i32, unit.targets[t] as i32);
                (positions[at], starts[at]) = (unit.positions[t] as i32, offset as i32);
                let (from, to) = unit.gaps[t];
                (gaps[2 * at], gaps[2 * at + 1]) = ((offset + from) as i32, (offset + to) as i32);
                let [chosen, rejected] = unit.scored[t];
                if chosen || rejected {
                    scored.push(at as i32);
                    owners.push([chosen.then_some(p), rejected.then_some(n + p)]);
                }
            }
            offset += unit.len();
        }
        // Padding, which feeds nothing, sees itself alone (at position 0: a unit may be longer
        // than the model's context, its positions never are).
        for j in offset..seq {
            let at = row * seq + j;
            starts[at] = j as i32;
            (gaps[2 * at], gaps[2 * at + 1]) = (j as i32, j as i32);
        }
    }
    let tokens = lengths.iter().sum();
    let counts = BatchCounts { tokens, positions: rows * seq };
    // With nothing scored, position 0 is scored and owned by none: a zero reaching every parameter.
    if scored.is_empty() {
        (scored, owners) = (vec![0], vec![[None, None]]);
    }
    // owner[s, i] = 1 where scored position i predicts a trained token of sequence s.
    let mut owner = vec![0f32; 2 * n * owners.len()];
    for (i, sequences) in owners.iter().enumerate() {
        sequences.iter().flatten().for_each(|&s| owner[s * owners.len() + i] = 1.0);
    }
    let int =
        |values: Vec<i32>, shape: [usize; 2]| Tensor::<B, 2, Int>::from_data(TensorData::new(values, shape), device);
    let packing = Packing {
        positions: int(positions, [rows, seq]),
        starts: int(starts, [rows, seq]),
        gaps: Some(Tensor::from_data(TensorData::new(gaps, [rows, seq, 2]), device)),
    };
    let at = Tensor::<B, 1, Int>::from_data(TensorData::new(scored, [owners.len()]), device);
    let owner = Tensor::<B, 2>::from_data(TensorData::new(owner, [2 * n, owners.len()]), device);
    let nll = model.nll_at(int(inputs, [rows, seq]), int(targets, [rows, seq]), Some(packing), Some(at)); // [scored]
    let logps = owner.matmul(nll.unsqueeze_dim(1)).neg(); // [2n, 1]
    (logps.squeeze_dim::<1>(1), counts)
}

/// The length of the rows units of these `lengths` are packed into: of the lengths from the
/// longest unit's on, the one whose rows cost least, a position costing `position_cost` (in
/// attended keys, `CausalLm::position_cost_in_keys`) plus the keys it attends (about the row's
/// length, the attention kernels computing causal blocks). Longer rows waste less on padding
/// but attend more; none holds more of attention's work and memory than a row per unit would.
fn row_length(lengths: &[usize], position_cost: usize) -> usize {
    let longest = lengths.iter().copied().max().unwrap_or(1).max(1);
    let (units, total) = (lengths.len(), lengths.iter().sum::<usize>().max(1));
    // rows·length² ≤ units·longest², and rows ≥ total / length.
    let longest_allowed = (units * longest * longest / total).max(longest);
    // A few dozen candidates suffice: the cost changes slowly with the length.
    let step = ((longest_allowed - longest) / 64).max(1);
    let mut best = (usize::MAX, longest);
    for length in (longest..=longest_allowed).step_by(step) {
        let rows = best_fit(lengths, length).len();
        let cost = rows * length * (position_cost + length);
        if rows * length * length <= units * longest * longest && cost < best.0 {
            best = (cost, length);
        }
    }
    best.1
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
        let (logps, _) = pair_logps(model, &chunk.iter().collect::<Vec<_>>(), pad_id, device);
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
        let (logps, counts) =
            pair_logps(model, &pairs.iter().map(|p| &p.pair).collect::<Vec<_>>(), self.pad_id, device); // [2n]
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(lengths: &[usize], length: usize, position_cost: usize) -> usize {
        best_fit(lengths, length).len() * length * (position_cost + length)
    }

    #[test]
    fn rows_grow_past_the_longest_unit_where_that_removes_padding() {
        // At 20 a row each (100 positions for 68 tokens); at 24 the four 12s pair up (72).
        for position_cost in [0, 1536] {
            assert_eq!(row_length(&[12, 20, 12, 12, 12], position_cost), 24, "position cost {position_cost}");
        }
        // Nothing to gain: as long as the longest unit.
        assert_eq!(row_length(&[20, 20, 20], 1536), 20);
        assert_eq!(row_length(&[7], 1536), 7);
    }

    #[test]
    fn rows_cost_no_more_than_a_row_per_unit_and_hold_no_more_attention() {
        let mut state = 12345u64;
        let mut next = |below: usize| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as usize % below
        };
        for _ in 0..500 {
            let units = 1 + next(40);
            let lengths: Vec<usize> = (0..units).map(|_| 1 + next(300)).collect();
            let position_cost = next(8000);
            let (length, longest) = (row_length(&lengths, position_cost), *lengths.iter().max().unwrap());
            let rows = best_fit(&lengths, length).len();
            assert!(length >= longest, "{lengths:?}: rows of {length} hold no unit of {longest}");
            assert!(rows * length * length <= units * longest * longest, "{lengths:?}: rows of {length} attend more");
            assert!(
                cost(&lengths, length, position_cost) <= cost(&lengths, longest, position_cost),
                "{lengths:?}: rows of {length} cost more than rows of {longest}"
            );
        }
    }
}
