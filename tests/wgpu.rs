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

/// `--backend wgpu` where Vulkan has no adapter (its loader pointed at no driver here): exit 2
/// and what to install, before any run folder exists, never burn's panic.
#[test]
fn wgpu_without_an_adapter_is_refused_clearly() {
    let dir = common::folder_with(&common::tiny_spec("wgpu"), 8);
    let no_driver = [("VK_ICD_FILENAMES", "/nonexistent/icd.json"), ("VK_DRIVER_FILES", "/nonexistent/icd.json")];
    let tiny = ["--layers", "1", "--heads", "1", "--embd", "8", "--vocab", "16", "--seq", "8", "--batch", "1"];
    let bench = [&["bench", "--backend", "wgpu"][..], &tiny].concat();
    for args in [bench, vec!["run", "spec.toml"]] {
        let output = common::pipe(dir.path(), &args, &no_driver);
        let err = common::stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(err.contains("no Vulkan adapter was found") && err.contains("mesa-vulkan-drivers"), "{args:?}: {err}");
    }
    assert!(!dir.path().join("runs").exists(), "a refused run left a folder");
}

/// wgpu runs on its default adapter: any other device index is refused, not ignored.
#[test]
fn wgpu_refuses_a_device_index_it_would_ignore() {
    let dir = common::folder_with(&common::tiny_spec("wgpu"), 8);
    let tiny = ["--layers", "1", "--heads", "1", "--embd", "8", "--vocab", "16", "--seq", "8", "--batch", "1"];
    let bench = [&["bench", "--backend", "wgpu", "--device", "1"][..], &tiny].concat();
    let run = vec!["run", "spec.toml"];
    for (args, env) in
        [(bench, vec![]), (run.clone(), vec![("PIPE_RUN__DEVICE", "1")]), (run, vec![("PIPE_RUN__DEVICES", "[0, 1]")])]
    {
        let output = common::pipe(dir.path(), &args, &env);
        let err = common::stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?} {env:?}: {err}");
        assert!(err.contains("runs on its default adapter only: device 1 was asked for"), "{args:?} {env:?}: {err}");
    }
    assert!(!dir.path().join("runs").exists(), "a refused run left a folder");
}
