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
//! One test here runs without a GPU too, and CI runs it: `--backend cuda` where the driver or
//! the device is missing.
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

/// `--backend cuda` asked of a driver or device that is not there: exit 2 and what to fix,
/// before any run folder exists, never burn's panic. Without the NVIDIA driver (CI) the
/// message names its library; with it (a GPU machine), the device index past the count.
#[test]
fn cuda_without_its_driver_or_device_is_refused_clearly() {
    let dir = common::folder_with(&common::tiny_spec("cuda"), 8);
    let tiny = ["--layers", "1", "--heads", "1", "--embd", "8", "--vocab", "16", "--seq", "8", "--batch", "1"];
    let bench = [&["bench", "--backend", "cuda", "--device", "999"][..], &tiny].concat();
    let run = vec!["run", "spec.toml"];
    let asked = [
        (bench, vec![]),
        (run.clone(), vec![("PIPE_RUN__DEVICE", "999")]),
        (run, vec![("PIPE_RUN__DEVICES", "[0, 999]")]),
    ];
    for (args, env) in asked {
        let output = common::pipe(dir.path(), &args, &env);
        let err = common::stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?} {env:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?} {env:?}: {err}");
        let no_driver = err.contains("libcuda.so.1") && err.contains("LD_LIBRARY_PATH");
        let no_device = err.contains("device 999 was asked for") && err.contains("this machine has");
        assert!(no_driver || no_device, "{args:?} {env:?}: {err}");
    }
    assert!(!dir.path().join("runs").exists(), "a refused run left a folder");
}
