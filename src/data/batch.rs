//! Token sequences with loss masks, several packed into one, and right-padded batches of them.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::model::Packing;

/// One tokenized example (or several packed), and which of its tokens the loss is computed on.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sequence {
    pub ids: Vec<u32>,
    /// Per token: whether predicting it counts in the loss (the first token never does).
    pub trained: Vec<bool>,
    /// Packed examples: where each example after the first begins in `ids` (empty for one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<usize>,
}

impl Sequence {
    pub fn new(ids: Vec<u32>, trained: Vec<bool>) -> Self {
        Self { ids, trained, segments: Vec::new() }
    }

    /// Every token after the first is trained on (plain language modelling).
    pub fn all_trained(ids: Vec<u32>) -> Self {
        let trained = vec![true; ids.len()];
        Self::new(ids, trained)
    }

    /// The first `untrained` tokens are context (a prompt); the rest are trained on.
    pub fn with_prompt(ids: Vec<u32>, untrained: usize) -> Self {
        let trained = (0..ids.len()).map(|i| i >= untrained).collect();
        Self::new(ids, trained)
    }

    /// Examples one after another in one sequence, each computed as if alone: attention and
    /// positions restart at each (see `Batch`), and nothing predicts across a boundary (an
    /// example's first token is never trained, as a sequence's first never is).
    pub fn packed(parts: &[&Sequence]) -> Self {
        let mut out = Sequence::new(Vec::new(), Vec::new());
        for part in parts {
            debug_assert!(part.segments.is_empty(), "packing packed sequences");
            if !out.ids.is_empty() {
                out.segments.push(out.ids.len());
            }
            out.ids.extend(&part.ids);
            out.trained.push(false);
            out.trained.extend(&part.trained[1..]);
        }
        out
    }

    /// Where the example holding token `i` begins.
    fn segment_start(&self, i: usize) -> usize {
        self.segments.iter().rev().find(|&&start| start <= i).copied().unwrap_or(0)
    }

    /// The number of tokens this sequence contributes to the loss.
    pub fn loss_tokens(&self) -> usize {
        self.trained.iter().skip(1).filter(|&&t| t).count()
    }
}

/// A right-padded batch: inputs are each sequence without its last token, targets without its
/// first, and the scored positions those whose target is trained on (not prompt, not padding).
pub struct Batch<B: Backend> {
    /// [batch, seq]
    pub inputs: Tensor<B, 2, Int>,
    /// [batch, seq]
    pub targets: Tensor<B, 2, Int>,
    /// The row-major positions of [batch, seq] whose targets are trained on. [loss_tokens]
    pub scored: Tensor<B, 1, Int>,
    /// How many targets are trained on.
    pub loss_tokens: usize,
    /// Real (non-padding) input tokens.
    pub tokens: usize,
    /// Input positions, padding included (batch · longest sequence).
    pub positions: usize,
    /// When a sequence packs several examples: where each one's positions and attention start.
    pub packing: Option<Packing<B>>,
}

impl<B: Backend> Batch<B> {
    pub fn new(sequences: &[&Sequence], pad_id: u32, device: &B::Device) -> Self {
        let batch = sequences.len();
        let seq = sequences.iter().map(|s| s.ids.len() - 1).max().unwrap_or(1).max(1);
        let mut inputs = vec![pad_id as i32; batch * seq];
        let mut targets = vec![pad_id as i32; batch * seq];
        let mut scored = Vec::new();
        let mut tokens = 0;
        for (row, s) in sequences.iter().enumerate() {
            let n = s.ids.len() - 1;
            tokens += n;
            for j in 0..n {
                inputs[row * seq + j] = s.ids[j] as i32;
                targets[row * seq + j] = s.ids[j + 1] as i32;
                if s.trained[j + 1] {
                    scored.push((row * seq + j) as i32);
                }
            }
        }
        let loss_tokens = scored.len();
        let packed = sequences.iter().any(|s| !s.segments.is_empty());
        let packing = packed.then(|| {
            let (mut positions, mut starts) = (vec![0i32; batch * seq], vec![0i32; batch * seq]);
            for (row, s) in sequences.iter().enumerate() {
                for j in 0..seq {
                    // Padding continues the last example, which it never feeds.
                    let start = s.segment_start(j);
                    (positions[row * seq + j], starts[row * seq + j]) = ((j - start) as i32, start as i32);
                }
            }
            Packing {
                positions: Tensor::from_data(TensorData::new(positions, [batch, seq]), device),
                starts: Tensor::from_data(TensorData::new(starts, [batch, seq]), device),
                gaps: None,
            }
        });
        Self {
            inputs: Tensor::from_data(TensorData::new(inputs, [batch, seq]), device),
            targets: Tensor::from_data(TensorData::new(targets, [batch, seq]), device),
            loss_tokens,
            scored: Tensor::from_data(TensorData::new(scored, [loss_tokens]), device),
            tokens,
            positions: batch * seq,
            packing,
        }
    }
}

/// Pack sequences of at most `capacity` tokens into as few sequences of at most `capacity`
/// as best-fit decreasing finds: longest first, each into the fullest sequence it still fits.
/// The result does not depend on the input order beyond ties, and packed sequences come out in
/// the order they were opened.
pub fn pack(sequences: &[Sequence], capacity: usize) -> Vec<Sequence> {
    let lengths: Vec<usize> = sequences.iter().map(|s| s.ids.len()).collect();
    let bins = best_fit(&lengths, capacity);
    bins.iter().map(|bin| Sequence::packed(&bin.iter().map(|&i| &sequences[i]).collect::<Vec<_>>())).collect()
}

/// Best-fit decreasing of items of `lengths` into bins of `capacity`: each bin's item indices,
/// in the order they went in; bins in the order they were opened.
pub fn best_fit(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    // Open bins by room left; the smallest room that fits is the best fit.
    let mut by_room: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    let mut bins: Vec<Vec<usize>> = Vec::new();
    for i in order {
        let len = lengths[i];
        let fit = by_room.range(len..).next().map(|(&room, _)| room);
        let (bin, room) = match fit {
            Some(room) => {
                let slot = by_room.get_mut(&room).expect("listed");
                let bin = slot.pop().expect("non-empty");
                if slot.is_empty() {
                    by_room.remove(&room);
                }
                (bin, room)
            }
            None => {
                bins.push(Vec::new());
                (bins.len() - 1, capacity)
            }
        };
        bins[bin].push(i);
        by_room.entry(room - len.min(room)).or_default().push(bin);
    }
    bins
}
