//! Model selection during training: the best evaluation so far by `train.select_metric` (the
//! validation loss, or a score of answers to held-out prompts), whose model is kept as
//! `checkpoints/best/`, and early stopping when evaluations stop improving. Its state travels
//! in every checkpoint, so a resumed run selects and stops exactly as an uninterrupted one.

use serde::{Deserialize, Serialize};

use crate::spec::{FinalModel, SelectMetric, TrainSpec};

/// An evaluation: the step it was taken at and the selection metric's value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    pub step: usize,
    #[serde(with = "crate::json_float")]
    pub value: f64,
}

/// Where selection stood after an evaluation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    /// The lowest validation loss so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<Scored>,
    /// Evaluations since the last improvement of at least `train.early_stopping_min_delta`.
    #[serde(default)]
    pub evals_without_improvement: usize,
    /// Set when early stopping ended training, at this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_early_at: Option<usize>,
}

/// What one evaluation means for selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The evaluated model is the best so far: keep it.
    pub new_best: bool,
    /// Early stopping says training ends here.
    pub stop: bool,
}

impl Selection {
    /// Take an evaluation into account. The best model is the one with the best value;
    /// patience runs out after `early_stopping_patience` evaluations in a row that did not
    /// improve on the best before them by more than `early_stopping_min_delta` (as HF's
    /// EarlyStoppingCallback counts).
    pub fn observe(&mut self, scored: Scored, train: &TrainSpec) -> Verdict {
        // Gains in the metric's good direction.
        let sign = if train.select_metric.higher_is_better() { 1.0 } else { -1.0 };
        let gain = self.best.map(|b| sign * (scored.value - b.value));
        let new_best = gain.is_none_or(|g| g > 0.0);
        let improved = gain.is_none_or(|g| g > train.early_stopping_min_delta);
        if new_best {
            self.best = Some(scored);
        }
        self.evals_without_improvement = if improved { 0 } else { self.evals_without_improvement + 1 };
        let patience = train.early_stopping_patience;
        let stop = patience > 0 && self.evals_without_improvement >= patience;
        if stop {
            self.stopped_early_at = Some(scored.step);
        }
        Verdict { new_best, stop }
    }
}

/// What the train stage chose: the best model seen, whether it stopped early, and which model
/// `final/` (and the stages after it) is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingOutcome {
    #[serde(flatten)]
    pub selection: Selection,
    /// What `selection.best` is best by.
    pub select_metric: SelectMetric,
    pub final_model: FinalModel,
    /// The step the final model was trained to.
    pub final_step: usize,
    /// The training stage this is the outcome of, after the first (`dpo`); absent for `train`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
}
