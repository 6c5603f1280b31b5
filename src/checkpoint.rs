//! Training checkpoints: `checkpoints/step-000040/` holds the model as a HF GPT-2 directory
//! (so `--checkpoint` works with generate, chat and export), the optimizer state, and where
//! training stood. A checkpoint is written into `.step-000040.partial/` and renamed into
//! place, so a crash mid-write never leaves one that looks complete.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::Backend;

use crate::model::TrainBackend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::data::Tok;
use crate::model::{hf, Gpt2, Gpt2Config};

pub const CHECKPOINTS_DIR: &str = "checkpoints";
const STATE_FILE: &str = "trainer.json";
/// burn's recorder adds the `.bin` extension.
const OPTIMIZER_FILE: &str = "optimizer";

/// Where training stood after an optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps done.
    pub step: usize,
    /// The epoch in progress (1-based).
    pub epoch: usize,
    /// Examples of this epoch's shuffled order already trained on.
    pub position: usize,
}

#[derive(Serialize, Deserialize)]
struct TrainerState {
    progress: Progress,
    /// The model's parameter ids in visiting order; the optimizer state is keyed by them.
    param_ids: Vec<u64>,
}

fn step_dir_name(step: usize) -> String {
    format!("step-{step:06}")
}

/// Write a checkpoint of `model` and the optimizer record, keeping the newest `keep`.
pub fn save<B: TrainBackend, R: burn::record::Record<B>>(
    run: &Path,
    model: &Gpt2<B>,
    config: &Gpt2Config,
    tok: &Tok,
    optimizer: R,
    progress: Progress,
    keep: usize,
) -> Result<PathBuf> {
    let root = run.join(CHECKPOINTS_DIR);
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let name = step_dir_name(progress.step);
    let partial = root.join(format!(".{name}.partial"));
    if partial.exists() {
        std::fs::remove_dir_all(&partial)?;
    }
    hf::save(&model.valid(), config, Some(tok.eos_id as usize), &partial)?;
    tok.save(&partial.join(hf::TOKENIZER_FILE))?;
    BinFileRecorder::<FullPrecisionSettings>::new()
        .record(optimizer, partial.join(OPTIMIZER_FILE))
        .map_err(|e| anyhow::anyhow!("cannot write the optimizer state: {e}"))?;
    let state = TrainerState { progress, param_ids: param_ids(model) };
    crate::run_dir::write_atomic(&partial.join(STATE_FILE), serde_json::to_string(&state)?.as_bytes())?;
    fault_injection_point(progress.step);
    let done = root.join(&name);
    if done.exists() {
        std::fs::remove_dir_all(&done)?;
    }
    std::fs::rename(&partial, &done).with_context(|| format!("cannot move the checkpoint into {}", done.display()))?;
    for old in list(run).into_iter().rev().skip(keep.max(1)) {
        std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove old checkpoint {}", old.display()))?;
    }
    tracing::debug!(path = %done.display(), "checkpoint");
    Ok(done)
}

/// Tests kill pipe (SIGKILL) in the middle of writing a checkpoint by naming its step here.
fn fault_injection_point(step: usize) {
    if std::env::var("PIPEFAULT_KILL_IN_CHECKPOINT").is_ok_and(|s| s == step.to_string()) {
        #[cfg(unix)]
        // SAFETY: sending SIGKILL to this very process, as an outside `kill -9` would.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        std::process::abort();
    }
}

/// Complete checkpoints of a run, oldest first (partial ones are not listed).
pub fn list(run: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(run.join(CHECKPOINTS_DIR))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")))
                .filter(|p| p.join(STATE_FILE).is_file())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

/// A checkpoint's model (with its original parameter ids) and where training stood; the
/// optimizer record is read by [`load_optimizer`].
pub struct Restored<B: TrainBackend> {
    pub model: Gpt2<B>,
    pub progress: Progress,
}

pub fn load<B: TrainBackend>(dir: &Path, dropout: Option<f64>, device: &B::Device) -> Result<Restored<B>> {
    let state: TrainerState = serde_json::from_str(&std::fs::read_to_string(dir.join(STATE_FILE))?)
        .with_context(|| format!("{}: unreadable trainer state", dir.display()))?;
    let (_, model) = hf::load::<B>(dir, dropout, device)?;
    let model = model.map(&mut SetIds { ids: state.param_ids.into_iter() });
    Ok(Restored { model, progress: state.progress })
}

/// Where training stood when a checkpoint was taken.
pub fn progress(dir: &Path) -> Result<Progress> {
    let text = std::fs::read_to_string(dir.join(STATE_FILE))
        .with_context(|| format!("{}: no trainer state", dir.display()))?;
    let state: TrainerState =
        serde_json::from_str(&text).with_context(|| format!("{}: unreadable trainer state", dir.display()))?;
    Ok(state.progress)
}

/// The optimizer record saved in a checkpoint.
pub fn load_optimizer<B: Backend, R: burn::record::Record<B>>(dir: &Path, device: &B::Device) -> Result<R> {
    BinFileRecorder::<FullPrecisionSettings>::new().load(dir.join(OPTIMIZER_FILE), device).map_err(|e| {
        anyhow::anyhow!(
            "{}: cannot read the optimizer state (was it written by another pipe version? its weights still \
             load with model.path = \"{}\"): {e}",
            dir.display(),
            dir.canonicalize().as_deref().unwrap_or(dir).display()
        )
    })
}

fn param_ids<B: Backend>(model: &Gpt2<B>) -> Vec<u64> {
    struct Ids(Vec<u64>);
    impl<B: Backend> ModuleVisitor<B> for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push(param.id.val());
        }
    }
    let mut ids = Ids(Vec::new());
    model.visit(&mut ids);
    ids.0
}

/// Give a freshly loaded model the parameter ids it had when saved.
struct SetIds {
    ids: std::vec::IntoIter<u64>,
}

impl<B: Backend> ModuleMapper<B> for SetIds {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (_, tensor, mapper) = param.consume();
        let id = ParamId::from(self.ids.next().expect("a checkpoint lists every parameter"));
        Param::from_mapped_value(id, tensor, mapper)
    }
}
