//! The integration tests, one crate (one binary to build and link) with a module per topic.
//! The GPU suite is apart: `tests/wgpu.rs` and `tests/cuda.rs`, each behind its cargo feature.

#[path = "../common/mod.rs"]
mod common;

mod bad_input;
mod bf16_decode;
mod chat_templates;
mod cli;
mod columnar;
mod data;
mod data_parallel;
mod dpo;
mod families;
mod faults;
mod fidelity;
mod formats;
mod fused;
mod fuzz;
mod gguf;
mod imports;
mod lora;
mod lora_runs;
mod model_config;
mod packing;
mod pipeline;
mod response_metrics;
mod resume;
mod selection;
mod spec;
mod tensorboard;
mod tools;
mod training;
