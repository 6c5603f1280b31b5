//! The model: GPT-2 itself, the fused operations its hot spots run as, and HuggingFace
//! checkpoint directories in and out.

mod cpu_kernels;
pub mod fused;
pub mod gpt2;
pub mod hf;

pub use fused::{FusedOps, TrainBackend};
pub use gpt2::{Gpt2, Gpt2Config, KvCache};
