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

/// Run `job` on `kind` (device `index` for GPUs).
pub fn dispatch<J: BackendJob>(kind: BackendKind, index: usize, job: J) -> Result<J::Output> {
    match kind {
        BackendKind::Cpu => {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            job.run::<Cpu>(Default::default(), format!("cpu (flex, {threads} threads)"))
        }
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => job.run::<Gpu>(burn::backend::cuda::CudaDevice::new(index), format!("cuda:{index}")),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => {
            // wgpu picks the adapter (the best GPU there is, else a software one such as lavapipe).
            let _ = index;
            job.run::<WebGpu>(burn::backend::wgpu::WgpuDevice::DefaultDevice, "wgpu (default adapter)".into())
        }
        #[cfg(not(all(feature = "cuda", feature = "wgpu")))]
        missing => {
            let _ = index;
            Err(crate::error::bad_input(format!(
                "backend `{}` is not compiled into this pipe; rebuild with `cargo build --release --features {}`",
                name(missing),
                name(missing)
            )))
        }
    }
}

pub fn name(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Cpu => "flex",
        BackendKind::Cuda => "cuda",
        BackendKind::Wgpu => "wgpu",
    }
}
