//! pipe: declarative supervised fine-tuning pipelines for GPT-2-style models, on burn.
//!
//! Data flows one way: spec → prepared inputs → stages → run folder, and so do imports: each
//! module imports only from the floors below it (docs/development.md draws them;
//! `tests/integration/imports.rs` holds them). The seams: a model family implements
//! `model::CausalLm`; a training objective implements `objective::Objective`; a stage is a file
//! in `stages/`.

pub mod adam;
pub mod backend;
pub mod bench;
pub mod chat;
pub mod checkpoint;
// The library's unit-test build leaves the command line out: nothing in it is unit-tested (the
// integration tests run the binaries), and it instantiates the whole stack for every backend.
#[cfg(not(test))]
pub mod cli;
pub mod data;
pub mod distributed;
pub mod dpo;
pub mod error;
pub mod export;
pub mod files;
pub mod generate;
pub mod hooks;
pub mod inputs;
pub mod json_float;
pub mod memory;
pub mod model;
pub mod objective;
pub mod pipeline;
pub mod response_metrics;
pub mod run_dir;
pub mod runs;
pub mod score;
pub mod selection;
pub mod signals;
pub mod spec;
pub mod stages;
pub mod tensorboard;
pub mod train;
