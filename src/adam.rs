//! Adam and AdamW as one fused update per parameter tensor (`FusedOps::adam_step`), plugged
//! into burn's optimizer machinery (`SimpleOptimizer`, so burn keeps the per-parameter state
//! and its records). The arithmetic is PyTorch's: m̂ / (√v̂ + ε), L2 decay added to the
//! gradient for Adam, decoupled `lr·wd` decay for AdamW.

use burn::module::{AutodiffModule, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::record::{AdaptorRecord, AdaptorRecordV1};
use burn::optim::{LearningRate, Optimizer, SimpleOptimizer};
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

/// The optimizer state of a whole model, as burn records it: each parameter's, by id.
pub type ModelState<B, M> = <OptimizerAdaptor<FusedAdam, M, B> as Optimizer<M, B>>::Record;

/// Check a saved state against the parameters it is for (name, id, shape): every state must
/// belong to a parameter and have its shape, or a step would read past it or update with
/// another parameter's moments.
pub fn check_state<B: AutodiffBackend<InnerBackend: FusedOps>, M: AutodiffModule<B>>(
    state: &ModelState<B, M>,
    params: &[(String, ParamId, Vec<usize>)],
) -> Result<(), String> {
    let mut matched = 0;
    for (name, id, dims) in params {
        let Some(record) = state.get(id) else { continue }; // a parameter not stepped yet
        matched += 1;
        let AdaptorRecord::V1(record) = record;
        let moments = |s: &dyn MomentDims| s.moment_dims();
        let found = match record {
            AdaptorRecordV1::Rank0(s) => moments(s),
            AdaptorRecordV1::Rank1(s) => moments(s),
            AdaptorRecordV1::Rank2(s) => moments(s),
            AdaptorRecordV1::Rank3(s) => moments(s),
            AdaptorRecordV1::Rank4(s) => moments(s),
            AdaptorRecordV1::Rank5(s) => moments(s),
            AdaptorRecordV1::Rank6(s) => moments(s),
            AdaptorRecordV1::Rank7(s) => moments(s),
            AdaptorRecordV1::Rank8(s) => moments(s),
        };
        if found.iter().any(|m| m != dims) {
            return Err(format!("the state of `{name}` has shape {:?}, the parameter {dims:?}", found[0]));
        }
    }
    // States keyed by ids no parameter has would be dropped, and their moments start over.
    if matched != state.len() {
        return Err(format!(
            "{} of its {} parameter states belong to no parameter of the model (its parameter ids differ)",
            state.len() - matched,
            state.len()
        ));
    }
    Ok(())
}

/// The shapes of a state's two moments, whatever its rank.
trait MomentDims {
    fn moment_dims(&self) -> [Vec<usize>; 2];
}

impl<B: Backend, const D: usize> MomentDims for AdamState<B, D> {
    fn moment_dims(&self) -> [Vec<usize>; 2] {
        [self.moment_1.dims().to_vec(), self.moment_2.dims().to_vec()]
    }
}
