//! The training set as the training loop reads it: sequences held in memory, or read one at a
//! time from a memory-mapped cache file (`cache.rs`), so that memory does not grow with the
//! dataset and the peers of a data-parallel run share one copy.

use std::sync::Arc;

use memmap2::Mmap;
use sha2::{Digest, Sha256};

use super::Sequence;

/// Training sequences, by index.
#[derive(Clone)]
pub enum Examples {
    Memory(Arc<Vec<Sequence>>),
    Mapped(Arc<Mapped>),
}

/// A cache file's training section, mapped: `count + 1` token offsets (u64), then the token
/// ids (u32) and the trained flags (u8) of all sequences one after another, little-endian.
pub struct Mapped {
    pub(super) map: Mmap,
    pub(super) count: usize,
    pub(super) offsets_at: usize,
    pub(super) ids_at: usize,
    pub(super) trained_at: usize,
}

impl Mapped {
    fn offset(&self, i: usize) -> usize {
        let at = self.offsets_at + 8 * i;
        u64::from_le_bytes(self.map[at..at + 8].try_into().expect("8 bytes")) as usize
    }

    fn span(&self, i: usize) -> std::ops::Range<usize> {
        self.offset(i)..self.offset(i + 1)
    }

    fn trained(&self, i: usize) -> &[u8] {
        let span = self.span(i);
        &self.map[self.trained_at + span.start..self.trained_at + span.end]
    }
}

impl From<Vec<Sequence>> for Examples {
    fn from(sequences: Vec<Sequence>) -> Self {
        Examples::Memory(Arc::new(sequences))
    }
}

impl Examples {
    pub fn len(&self) -> usize {
        match self {
            Examples::Memory(v) => v.len(),
            Examples::Mapped(m) => m.count,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sequence `i`, copied out.
    pub fn get(&self, i: usize) -> Sequence {
        match self {
            Examples::Memory(v) => v[i].clone(),
            Examples::Mapped(m) => {
                let span = m.span(i);
                let ids = m.map[m.ids_at + 4 * span.start..m.ids_at + 4 * span.end]
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
                    .collect();
                Sequence::new(ids, m.trained(i).iter().map(|&t| t != 0).collect())
            }
        }
    }

    /// Sequence `i`'s length in tokens.
    pub fn token_len(&self, i: usize) -> usize {
        match self {
            Examples::Memory(v) => v[i].ids.len(),
            Examples::Mapped(m) => m.span(i).len(),
        }
    }

    /// The tokens sequence `i` contributes to the loss.
    pub fn loss_tokens(&self, i: usize) -> usize {
        match self {
            Examples::Memory(v) => v[i].loss_tokens(),
            Examples::Mapped(m) => m.trained(i).iter().skip(1).filter(|&&t| t != 0).count(),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = Sequence> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// A 64-bit digest of every sequence's tokens and trained flags: equal sets, equal digests,
    /// however they are held.
    pub fn fingerprint(&self) -> u64 {
        let mut hasher = Sha256::new();
        for sequence in self.iter() {
            hasher.update((sequence.ids.len() as u64).to_le_bytes());
            sequence.ids.iter().for_each(|id| hasher.update(id.to_le_bytes()));
            hasher.update(sequence.trained.iter().map(|&t| t as u8).collect::<Vec<_>>());
        }
        u64::from_le_bytes(hasher.finalize()[..8].try_into().expect("8 bytes"))
    }
}
