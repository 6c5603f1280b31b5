//! The GPU path on a machine without a GPU: burn's wgpu backend, on Mesa's lavapipe (Vulkan on
//! the CPU) in CI, runs the same cubecl kernels burn's CUDA backend compiles — so the model,
//! its fused operations' composite versions (what every GPU backend runs) and a training step
//! are held here to transformers' numbers and to the CPU kernels on every change.
//! Run with `cargo test --release --features wgpu --test wgpu` (needs a Vulkan driver:
//! `apt-get install mesa-vulkan-drivers libvulkan1`). Tolerances: as the CPU fidelity suite
//! (1e-4 on NLL, identical top-5 and greedy tokens); 1e-4 between backends on fused ops. The
//! tests themselves are `tests/gpu/suite.rs`, which `tests/cuda.rs` runs on CUDA.
#![cfg(feature = "wgpu")]

mod common;

/// burn's wgpu backend: the fusion wrapper over the cube backend, what `run.backend = "wgpu"` runs.
type G = burn::backend::Wgpu;
/// burn's cube backend on wgpu without the fusion wrapper: pipe's kernels run on it directly.
type Cube = burn::backend::wgpu::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;
/// The CLI's name for it.
const BACKEND: &str = "wgpu";
/// lavapipe multiplies f32 as f32: the checks through burn's matmuls hold the CPU's tolerances.
const MATMUL_SLACK: f32 = 1.0;

include!("gpu/suite.rs");
