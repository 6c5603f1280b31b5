//! The compiled-in backends: burn's flex on the CPU always, CUDA and wgpu behind their features.
//! The rest of pipe is generic over `B: TrainBackend` (autodiff over a backend with the fused ops); this module picks the concrete one.

use crate::model::TrainBackend;
use anyhow::Result;
use burn::backend::{Autodiff, Flex};

use crate::spec::BackendKind;

/// Training on the CPU: flex with autodiff.
pub type Cpu = Autodiff<Flex>;
#[cfg(feature = "cuda")]
pub type Gpu = Autodiff<burn::backend::Cuda>;
#[cfg(feature = "wgpu")]
pub type WebGpu = Autodiff<burn::backend::Wgpu>;

/// Work that runs on whichever backend the user chose.
pub trait BackendJob {
    type Output;
    fn run<B: TrainBackend>(self, device: B::Device, device_name: String) -> Result<Self::Output>;
}

/// Run `job` on `kind`: on GPUs, on device `devices[0]`, the job's peers (if any) on the rest.
/// Devices the backend cannot give are refused, not ignored.
pub fn dispatch<J: BackendJob>(kind: BackendKind, devices: &[usize], job: J) -> Result<J::Output> {
    match kind {
        BackendKind::Cpu => {
            // Peers' indices (`run.devices`) only count peers on the CPU; the main device is the CPU.
            if devices[0] != 0 {
                return Err(crate::error::bad_input(format!(
                    "backend `cpu` has one device: device {} was asked for (run.device or --device); leave it at 0",
                    devices[0]
                )));
            }
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            job.run::<Cpu>(Default::default(), format!("cpu (flex, {threads} threads)"))
        }
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => {
            cuda::devices_present(devices)?;
            let index = devices[0];
            job.run::<Gpu>(burn::backend::cuda::CudaDevice::new(index), format!("cuda:{index}"))
        }
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => {
            // wgpu picks the adapter (the best GPU there is, else a software one such as lavapipe).
            if let Some(other) = devices.iter().find(|&&d| d != 0) {
                return Err(crate::error::bad_input(format!(
                    "backend `wgpu` runs on its default adapter only: device {other} was asked for \
                     (run.device, run.devices or --device); leave them at 0, or choose GPUs with backend `cuda`"
                )));
            }
            wgpu::adapter_present()?;
            job.run::<WebGpu>(burn::backend::wgpu::WgpuDevice::DefaultDevice, "wgpu (default adapter)".into())
        }
        #[cfg(not(all(feature = "cuda", feature = "wgpu")))]
        missing => Err(crate::error::bad_input(format!(
            "backend `{}` is not compiled into this pipe; rebuild with `cargo build --release --features {}`",
            missing.name(),
            missing.name()
        ))),
    }
}

/// burn's CUDA backend panics when the driver or a device is missing; these checks come first
/// and say what to fix instead.
#[cfg(feature = "cuda")]
mod cuda {
    use crate::error::bad_input;
    use anyhow::Result;
    use cudarc::driver::{result, sys};

    /// Whether the driver and NVRTC load, the driver starts, and it has every device in `devices`.
    pub fn devices_present(devices: &[usize]) -> Result<()> {
        // SAFETY: the function only tries to open the driver library under its usual names (the
        // library's initialisers run, as they will when burn loads it) and closes it again.
        if !unsafe { sys::is_culib_present() } {
            return Err(bad_input(
                "backend `cuda`: the NVIDIA driver's library (libcuda.so.1) was not found: install the \
                 driver, or put the folder that holds libcuda.so.1 on LD_LIBRARY_PATH",
            ));
        }
        // SAFETY: as above, for NVRTC's library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(bad_input(
                "backend `cuda`: NVIDIA's runtime compiler (libnvrtc.so), which compiles the GPU kernels, \
                 was not found: install NVRTC (the CUDA toolkit's, or the nvidia-cuda-nvrtc wheel from PyPI) \
                 and put the folder that holds libnvrtc.so on LD_LIBRARY_PATH",
            ));
        }
        result::init().map_err(|e| bad_input(format!("backend `cuda`: the NVIDIA driver did not start: {e}")))?;
        let count = result::device::get_count()
            .map_err(|e| bad_input(format!("backend `cuda`: the NVIDIA driver could not count its devices: {e}")))?;
        let count = usize::try_from(count).unwrap_or(0);
        if let Some(missing) = devices.iter().find(|&&d| d >= count) {
            let there = match count {
                0 => "no CUDA device".to_string(),
                1 => "one CUDA device, index 0".to_string(),
                n => format!("{n} CUDA devices, indices 0 to {}", n - 1),
            };
            return Err(bad_input(format!(
                "backend `cuda`: device {missing} was asked for (run.device, run.devices or --device), but this machine has {there}"
            )));
        }
        Ok(())
    }
}

/// burn's wgpu backend panics when no graphics adapter is there; this check comes first.
#[cfg(feature = "wgpu")]
mod wgpu {
    use crate::error::bad_input;
    use anyhow::Result;
    use burn::backend::wgpu::graphics::{AutoGraphicsApi, GraphicsApi};
    use burn::backend::wgpu::WgpuRuntime;
    use cubecl::Runtime;

    /// Whether the graphics API burn picks on this platform (Vulkan on Linux) has an adapter.
    pub fn adapter_present() -> Result<()> {
        let api = AutoGraphicsApi::backend();
        if WgpuRuntime::enumerate_all_devices(&api).is_empty() {
            return Err(bad_input(format!(
                "backend `wgpu`: no {api:?} adapter was found: install a driver for the GPU, or \
                 Mesa's lavapipe to run on the CPU (Debian: mesa-vulkan-drivers and libvulkan1)"
            )));
        }
        Ok(())
    }
}
