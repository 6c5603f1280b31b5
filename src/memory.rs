//! Whether training fits in the memory of what runs it, asked before anything is allocated:
//! on the CPU an allocation too large ends the process without a word, and on CUDA burn panics.
//! What is counted is a lower bound — the weights with their gradients and Adam's moments (the
//! weights alone under adapters), and for the largest micro-batch a device runs, the
//! activations every layer keeps for the backward pass and the logits — so a run refused here
//! could never have trained, and one let through may still be too large.

use anyhow::Result;

use crate::error::bad_input;
use crate::model::fused::{gpu_attention, GpuAttention, GPU_ATTENTION_MAX_HEAD_DIM};
use crate::model::{ModelConfig, Precision};
use crate::spec::BackendKind;

/// The memory one device trains in, and how to name it to the user.
#[derive(Debug, Clone, PartialEq)]
pub struct Room {
    pub bytes: f64,
    /// "this machine's 24 GiB", "CUDA device 0's 139 GiB free".
    pub name: String,
}

impl Room {
    /// What device `device` of `backend` has, where it can be known: the machine's memory on
    /// the CPU, the device's free memory on CUDA; wgpu has no way to ask.
    pub fn of(backend: BackendKind, device: usize) -> Option<Room> {
        match backend {
            BackendKind::Cpu => {
                let info = std::fs::read_to_string("/proc/meminfo").ok()?;
                let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
                let bytes = line.split_whitespace().nth(1)?.parse::<f64>().ok()? * 1024.0;
                Some(Room { bytes, name: format!("this machine's {:.0} GiB", gib(bytes)) })
            }
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => {
                // The primary context, the one burn's CUDA backend then uses: asking costs no
                // second context's memory.
                let context = cudarc::driver::CudaContext::new(device).ok()?;
                let (free, _total) = context.mem_get_info().ok()?;
                let bytes = free as f64;
                Some(Room { bytes, name: format!("CUDA device {device}'s {:.1} GiB free", gib(bytes)) })
            }
            _ => {
                let _ = device;
                None
            }
        }
    }
}

/// How attention keeps what its backward pass needs, per token, layer and head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKeeps {
    /// Nothing of the sequence's length (the GPU kernels keep one row's output and
    /// log-sum-exp, counted with the rest of the row).
    Rows,
    /// The causal half of each probability row (the CPU kernel).
    CausalProbabilities,
    /// A whole row of the sequence (the composite version's probabilities, or a dropout mask).
    FullRows,
}

impl AttentionKeeps {
    /// What `backend`'s attention keeps for `config`: the CPU kernel its causal probabilities;
    /// the GPU kernels rows only, unless attention dropout keeps its mask or the composite
    /// version runs (heads wider than the kernels take, or chosen with `--gpu-attention`).
    pub fn of(backend: BackendKind, config: &ModelConfig) -> AttentionKeeps {
        match backend {
            BackendKind::Cpu => AttentionKeeps::CausalProbabilities,
            _ if config.attention_dropout() > 0.0 => AttentionKeeps::FullRows,
            _ if gpu_attention() == GpuAttention::Kernels && config.head_dim() <= GPU_ATTENTION_MAX_HEAD_DIM => {
                AttentionKeeps::Rows
            }
            _ => AttentionKeeps::FullRows,
        }
    }
}

/// What one device's training of a model needs, at least.
#[derive(Debug, Clone, Copy)]
pub struct Footprint {
    pub params: usize,
    /// Weights, gradients and optimizer state.
    pub weights: f64,
    pub activations: f64,
    /// Tokens of the largest micro-batch the device holds at once.
    pub tokens: f64,
}

impl Footprint {
    /// `tokens` in micro-batches padded to `longest`, each token keeping per layer its residual,
    /// LayerNorm outputs, q·k·v, attention output and the MLP's two hidden rows (14·width
    /// values, counted at 2 bytes in bf16 runs), what `attention` keeps, and its logits (f32).
    pub fn training(
        config: &ModelConfig,
        adapters: bool,
        precision: Precision,
        tokens: f64,
        longest: f64,
        attention: AttentionKeeps,
    ) -> Footprint {
        let params = config.num_params();
        let weights = params as f64 * if adapters { 4.0 } else { 16.0 };
        let (layers, embd, heads) = (config.layers() as f64, config.width() as f64, config.heads() as f64);
        let row_bytes = if precision == Precision::Bf16 { 2.0 } else { 4.0 };
        let attention_row = match attention {
            AttentionKeeps::Rows => 0.0,
            AttentionKeeps::CausalProbabilities => 4.0 * heads * longest / 2.0,
            AttentionKeeps::FullRows => 4.0 * heads * longest,
        };
        let per_token = layers * (row_bytes * 14.0 * embd + attention_row) + 4.0 * config.vocab_size() as f64;
        Footprint { params, weights, activations: tokens * per_token, tokens }
    }

    /// Refused, naming `what` was asked (the model and batch, as the user wrote them), the
    /// figures, `room` and what to `lower`, when it cannot fit.
    pub fn check(&self, room: &Room, what: &str, lower: &str) -> Result<()> {
        if self.weights + self.activations <= room.bytes {
            return Ok(());
        }
        Err(bad_input(format!(
            "{what}: a model of {} parameters needs at least {:.0} GiB to train ({:.0} GiB of weights, gradients \
             and optimizer state, {:.0} GiB of activations for micro-batches of up to {} tokens), more than {}; {lower}",
            self.params,
            gib(self.weights + self.activations),
            gib(self.weights),
            gib(self.activations),
            self.tokens,
            room.name
        )))
    }
}

fn gib(bytes: f64) -> f64 {
    bytes / (1u64 << 30) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> ModelConfig {
        ModelConfig::Gpt2(crate::model::Gpt2Config::new(50257, 1024, 768, 12, 12))
    }

    #[test]
    fn a_batch_past_the_room_is_refused_naming_the_figures_and_the_device() {
        let room = Room { bytes: 139.0 * (1u64 << 30) as f64, name: "CUDA device 0's 139.0 GiB free".into() };
        let footprint =
            Footprint::training(&small(), false, Precision::Bf16, 4096.0 * 1024.0, 1024.0, AttentionKeeps::Rows);
        let error = footprint.check(&room, "--batch 4096, --seq 1024", "lower --batch or --seq").unwrap_err();
        let message = format!("{error:#}");
        assert!(crate::error::is_bad_input(&error), "{message}");
        for part in ["--batch 4096, --seq 1024", "CUDA device 0's 139.0 GiB free", "lower --batch", "4194304 tokens"] {
            assert!(message.contains(part), "{part:?} in {message}");
        }
        // The same model at batch 16 fits: weights 16 bytes each, about 1.9 GiB, and the logits
        // and rows of 16,384 tokens, about 6 GiB.
        let fits = Footprint::training(&small(), false, Precision::Bf16, 16.0 * 1024.0, 1024.0, AttentionKeeps::Rows);
        assert!(fits.check(&room, "batch 16", "").is_ok());
        assert!((fits.weights - 16.0 * small().num_params() as f64).abs() < 1.0);
    }

    #[test]
    fn what_attention_keeps_is_counted_by_how_it_keeps_it() {
        let at = |keeps| Footprint::training(&small(), false, Precision::F32, 1024.0, 1024.0, keeps).activations;
        let (rows, half, full) =
            (at(AttentionKeeps::Rows), at(AttentionKeeps::CausalProbabilities), at(AttentionKeeps::FullRows));
        // Per token and layer, each head's row of 1,024 f32 probabilities (half of it causal).
        let row = 1024.0 * 12.0 * 12.0 * 4.0 * 1024.0;
        assert!((half - rows - row / 2.0).abs() < 1.0 && (full - rows - row).abs() < 1.0);
        let adapters = Footprint::training(&small(), true, Precision::F32, 1024.0, 1024.0, AttentionKeeps::Rows);
        // Under adapters the frozen weights need no gradient or moments.
        assert!((adapters.weights - 4.0 * small().num_params() as f64).abs() < 1.0);
    }
}
