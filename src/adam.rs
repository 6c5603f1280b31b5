//! Adam and AdamW as one fused update per parameter tensor (`FusedOps::adam_step`), plugged
//! into burn's optimizer machinery (`SimpleOptimizer`, so burn keeps the per-parameter state
//! and its records). The arithmetic is PyTorch's: m̂ / (√v̂ + ε), L2 decay added to the
//! gradient for Adam, decoupled `lr·wd` decay for AdamW.

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{LearningRate, SimpleOptimizer};
use burn::record::Record;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorPrimitive};

use crate::model::fused::AdamUpdate;
use crate::model::FusedOps;
use crate::spec::{OptimizerKind, OptimizerSpec};

/// The hyper-parameters of Adam or AdamW.
#[derive(Debug, Clone, Copy)]
pub struct FusedAdam {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    /// AdamW's decoupled decay rather than Adam's L2 term.
    decoupled: bool,
}

/// One parameter's optimizer state.
#[derive(Record, Clone)]
pub struct AdamState<B: Backend, const D: usize> {
    /// Updates taken so far.
    pub time: usize,
    /// First and second moment estimates.
    pub moment_1: Tensor<B, D>,
    pub moment_2: Tensor<B, D>,
}

impl FusedAdam {
    pub fn new(opt: &OptimizerSpec) -> Self {
        Self {
            beta_1: opt.betas[0] as f32,
            beta_2: opt.betas[1] as f32,
            epsilon: opt.eps as f32,
            weight_decay: opt.weight_decay as f32,
            decoupled: opt.name == OptimizerKind::Adamw,
        }
    }

    /// The optimizer over a whole model.
    pub fn init<B: AutodiffBackend<InnerBackend: FusedOps>, M: AutodiffModule<B>>(
        self,
    ) -> OptimizerAdaptor<Self, M, B> {
        OptimizerAdaptor::from(self)
    }
}

fn primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> B::FloatTensorPrimitive {
    t.into_primitive().tensor()
}

fn tensor<B: Backend, const D: usize>(t: B::FloatTensorPrimitive) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

impl<B: FusedOps> SimpleOptimizer<B> for FusedAdam {
    type State<const D: usize> = AdamState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        param: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let time = state.as_ref().map_or(1, |s| s.time + 1);
        let update = AdamUpdate {
            lr,
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
            decoupled: self.decoupled,
            time,
        };
        let moments = state.map(|s| (primitive(s.moment_1), primitive(s.moment_2)));
        let (param, moment_1, moment_2) = B::adam_step(primitive(param), primitive(grad), moments, update);
        let state = AdamState { time, moment_1: tensor(moment_1), moment_2: tensor(moment_2) };
        (tensor(param), Some(state))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        AdamState { moment_1: state.moment_1.to_device(device), moment_2: state.moment_2.to_device(device), ..state }
    }
}
