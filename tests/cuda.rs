//! The GPU suite (`tests/gpu/suite.rs`, which `tests/wgpu.rs` runs on lavapipe in CI) on burn's
//! CUDA backend: the model against transformers, decoding, the CLI, training steps, and every
//! cubecl kernel of pipe's against its composite version, on an NVIDIA GPU. Needs a GPU and its
//! driver (no CUDA toolkit: the kernels compile at run time through NVRTC, which cudarc loads).
//! Build here, run there: `cargo test --release --features cuda --test cuda --no-run` prints the
//! test binary; run it on the GPU machine from the repository root (it reads
//! `tests/fixtures/`, and `CARGO_BIN_EXE_pipe`'s binary for the CLI tests, so carry both).
//! Tolerances: those of the wgpu suite, except the checks that go through burn's matmuls: on
//! tensor cores burn multiplies f32 operands as TF32 (cubek-matmul's `adjust_dtypes`: 10 bits of
//! mantissa, a relative error of up to 2⁻¹¹ per operand), so those allow `MATMUL_SLACK` times
//! more (2e-3 on NLL and losses, relative to the largest value). pipe's own kernels compute in
//! f32 and hold the wgpu suite's tolerances.
//! `--backend cuda` where the driver or the device is missing needs no GPU: that test is in
//! `tests/gpu_refusals.rs`, which CI runs.
#![cfg(feature = "cuda")]

mod common;

/// burn's CUDA backend: the fusion wrapper over the cube backend, what `run.backend = "cuda"` runs.
type G = burn::backend::Cuda;
/// burn's cube backend on CUDA without the fusion wrapper: pipe's kernels run on it directly.
type Cube = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
/// The CLI's name for it.
const BACKEND: &str = "cuda";
/// TF32 products (see above).
const MATMUL_SLACK: f32 = 20.0;

include!("gpu/suite.rs");
