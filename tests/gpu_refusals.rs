//! The GPU backends asked for on a machine that cannot run them: a missing driver, adapter or
//! device is refused with exit 2 and what to fix, before any run folder exists, never with
//! burn's panic. These need no GPU, so CI runs them; each backend's tests are here under its
//! feature (`cargo test --release --features cuda,wgpu --test gpu_refusals`), apart from the
//! GPU suites in `tests/cuda.rs` and `tests/wgpu.rs`, so that running them builds neither suite.
#![cfg(any(feature = "cuda", feature = "wgpu"))]

mod common;

use std::path::Path;

/// The model `pipe bench` is asked for: the refusal comes before any of it is built.
const TINY: [&str; 12] =
    ["--layers", "1", "--heads", "1", "--embd", "8", "--vocab", "16", "--seq", "8", "--batch", "1"];

/// A command line for `pipe` and the environment it runs with.
type Invocation<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>);

/// `pipe` with each of `asked` in `dir` exits 2, without a panic, with a message `explains`
/// accepts, and no run folder is left behind.
fn assert_refused(dir: &Path, asked: Vec<Invocation<'_>>, explains: impl Fn(&str) -> bool) {
    for (args, env) in asked {
        let output = common::pipe(dir, &args, &env);
        let err = common::stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?} {env:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?} {env:?}: {err}");
        assert!(explains(&err), "{args:?} {env:?}: {err}");
    }
    assert!(!dir.join("runs").exists(), "a refused run left a folder");
}

/// `--backend cuda` asked of a driver or device that is not there: exit 2 and what to fix,
/// before any run folder exists, never burn's panic. Without the NVIDIA driver (CI) the
/// message names its library; with it (a GPU machine), the device index past the count.
#[cfg(feature = "cuda")]
#[test]
fn cuda_without_its_driver_or_device_is_refused_clearly() {
    let dir = common::folder_with(&common::tiny_spec("cuda"), 8);
    let bench = [&["bench", "--backend", "cuda", "--device", "999"][..], &TINY].concat();
    let run = vec!["run", "spec.toml"];
    let asked = vec![
        (bench, vec![]),
        (run.clone(), vec![("PIPE_RUN__DEVICE", "999")]),
        (run, vec![("PIPE_RUN__DEVICES", "[0, 999]")]),
    ];
    assert_refused(dir.path(), asked, |err| {
        let no_driver = err.contains("libcuda.so.1") && err.contains("LD_LIBRARY_PATH");
        let no_device = err.contains("device 999 was asked for") && err.contains("this machine has");
        no_driver || no_device
    });
}

/// `--backend wgpu` where Vulkan has no adapter (its loader pointed at no driver here): exit 2
/// and what to install, before any run folder exists, never burn's panic.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_without_an_adapter_is_refused_clearly() {
    let dir = common::folder_with(&common::tiny_spec("wgpu"), 8);
    let no_driver = vec![("VK_ICD_FILENAMES", "/nonexistent/icd.json"), ("VK_DRIVER_FILES", "/nonexistent/icd.json")];
    let bench = [&["bench", "--backend", "wgpu"][..], &TINY].concat();
    let asked = vec![(bench, no_driver.clone()), (vec!["run", "spec.toml"], no_driver)];
    assert_refused(dir.path(), asked, |err| {
        err.contains("no Vulkan adapter was found") && err.contains("mesa-vulkan-drivers")
    });
}

/// wgpu runs on its default adapter: any other device index is refused, not ignored.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_refuses_a_device_index_it_would_ignore() {
    let dir = common::folder_with(&common::tiny_spec("wgpu"), 8);
    let bench = [&["bench", "--backend", "wgpu", "--device", "1"][..], &TINY].concat();
    let run = vec!["run", "spec.toml"];
    let asked = vec![
        (bench, vec![]),
        (run.clone(), vec![("PIPE_RUN__DEVICE", "1")]),
        (run, vec![("PIPE_RUN__DEVICES", "[0, 1]")]),
    ];
    assert_refused(dir.path(), asked, |err| err.contains("runs on its default adapter only: device 1 was asked for"));
}
