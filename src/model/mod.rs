//! The model: GPT-2 itself, and HuggingFace checkpoint directories in and out.

pub mod gpt2;
pub mod hf;

pub use gpt2::{Gpt2, Gpt2Config, KvCache};
