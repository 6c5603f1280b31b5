//! The run folder: `runs/<name>/<run-id>/` with the resolved spec, `meta.json` (status and
//! provenance), `metrics.jsonl`, checkpoints and samples. Every file is written atomically
//! (a temporary file renamed into place), so a crash never leaves a half-written file.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::error::bad_input;
use crate::files::write_atomic;
use crate::response_metrics::{Answer, ResponseEval, ResponseScores};
use crate::tensorboard::{self, EventFile, SessionStatus};

pub const SPEC_FILE: &str = "spec.toml";
pub const META_FILE: &str = "meta.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const SAMPLES_FILE: &str = "samples.jsonl";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// How the run lays prompts out for generation (`PromptLayout`), for `pipe generate` and `chat`.
pub const PROMPT_LAYOUT_FILE: &str = "prompt_layout.json";
/// The eval stage's figures.
pub const EVAL_FILE: &str = "eval.json";
/// The eval stage's answers to held-out prompts, one JSON line each.
pub const RESPONSES_FILE: &str = "responses.jsonl";
/// The final model, as a HuggingFace GPT-2 directory.
pub const FINAL_DIR: &str = "final";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Running,
    Completed,
    Failed,
    /// Stopped by Ctrl-C after a checkpoint; `pipe resume` continues it.
    Interrupted,
}

/// `meta.json`: what ran, where, and how it ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub pipe_version: String,
    pub name: String,
    pub run_id: String,
    pub spec_file: PathBuf,
    pub backend: String,
    pub device: String,
    pub seed: u64,
    pub started: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the run was resumed, each time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resumed: Vec<String>,
    /// A content hash of each input file, checked when the run resumes.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub inputs: crate::inputs::Inputs,
    /// How training ended: the best model, early stopping, which model `final/` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<crate::selection::TrainingOutcome>,
}

impl Meta {
    /// A run folder's `meta.json`: every reader of run folders goes through this.
    pub fn read(run: &Path) -> Result<Self> {
        let path = run.join(META_FILE);
        let text = fs::read_to_string(&path)
            .map_err(|e| bad_input(format!("{}: not a run folder (no readable {META_FILE}: {e})", run.display())))?;
        serde_json::from_str(&text).map_err(|e| bad_input(format!("{}: not a pipe meta.json: {e}", path.display())))
    }
}

/// One line of `metrics.jsonl`. Readers tell the kinds apart by their fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MetricRecord {
    Eval(EvalRecord),
    Step(StepRecord),
    Epoch(EpochRecord),
}

/// One optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: usize,
    pub epoch: usize,
    /// Mean loss over the step's trained tokens, before the update.
    #[serde(with = "crate::json_float")]
    pub loss: f64,
    #[serde(with = "crate::json_float")]
    pub lr: f64,
    /// Global gradient norm before clipping.
    #[serde(with = "crate::json_float")]
    pub grad_norm: f64,
    /// Real input tokens.
    pub tokens: usize,
    /// Input positions that were padding.
    pub padded_tokens: usize,
    #[serde(with = "crate::json_float")]
    pub tokens_per_s: f64,
    /// Seconds since training started (or resumed).
    #[serde(with = "crate::json_float")]
    pub elapsed_s: f64,
    /// Data-parallel runs: seconds this step spent in its all-reduce, waiting for the other
    /// peers included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allreduce_s: Option<f64>,
    /// The stage that trained the step, after the first (`dpo`); absent for `train`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// The objective's own figures (DPO's `rewards/chosen`, …), under their names.
    #[serde(default, flatten, skip_serializing_if = "Figures::is_empty")]
    pub figures: Figures,
}

/// Named figures an objective reports besides its loss, in name order.
pub type Figures = std::collections::BTreeMap<String, crate::json_float::Float>;

/// The validation loss at the end of an epoch, or every `train.eval_every` steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub step: usize,
    pub epoch: usize,
    #[serde(with = "crate::json_float")]
    pub val_loss: f64,
    /// The validation perplexity, of a token loss (not of DPO's).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::json_float::optional")]
    pub val_ppl: Option<f64>,
    /// The answers' mean scores, when `train.select_metric` is one of them.
    #[serde(default, flatten, skip_serializing_if = "Option::is_none")]
    pub responses: Option<ResponseScores>,
    /// The stage that trained the model evaluated, after the first (`dpo`); absent for `train`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// The objective's own figures on the validation set, under their names.
    #[serde(default, flatten, skip_serializing_if = "Figures::is_empty")]
    pub figures: Figures,
}

/// The eval stage's figures (also written as `eval.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Which model: `final` (the eval stage's), or `last` (the last one trained, evaluated too
    /// when `final/` is the best one).
    pub eval: String,
    /// Optimizer steps the evaluated model was trained for.
    pub step: usize,
    #[serde(with = "crate::json_float")]
    pub val_loss: f64,
    #[serde(with = "crate::json_float")]
    pub val_ppl: f64,
    pub val_tokens: usize,
    pub val_examples: usize,
    /// The answers to held-out prompts (`eval.responses`), scored against the references.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub responses: Option<ResponseEval>,
    /// The training stage that trained the model, after the first (`dpo`: `step` counts its
    /// steps); absent for `train`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
}

impl MetricRecord {
    /// The training stage after the first that wrote the record (`dpo`), if one did.
    pub fn stage(&self) -> Option<&str> {
        match self {
            Self::Eval(_) => None,
            Self::Step(r) => r.stage.as_deref(),
            Self::Epoch(r) => r.stage.as_deref(),
        }
    }

    /// The optimizer step the record was taken at.
    pub fn step(&self) -> usize {
        match self {
            Self::Eval(r) => r.step,
            Self::Step(r) => r.step,
            Self::Epoch(r) => r.step,
        }
    }

    /// The validation loss, for evaluations.
    pub fn val_loss(&self) -> Option<f64> {
        match self {
            Self::Eval(r) => Some(r.val_loss),
            Self::Epoch(r) => Some(r.val_loss),
            Self::Step(_) => None,
        }
    }
}

/// One line of `samples.jsonl`: a generate-stage sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    pub prompt: String,
    pub completion: String,
    pub ids: Vec<u32>,
    pub stopped_at_eos: bool,
}

/// A run's metric records, in order; lines that are not records (a line cut by a crash) are
/// skipped. A run with no metrics file has none.
pub fn read_metrics(run: &Path) -> Vec<MetricRecord> {
    fs::read_to_string(run.join(METRICS_FILE))
        .map(|text| text.lines().filter_map(|line| serde_json::from_str(line).ok()).collect())
        .unwrap_or_default()
}

/// An open run folder.
pub struct RunDir {
    pub path: PathBuf,
    pub meta: Meta,
    /// The writer's lock on the folder, held while this value lives (see [`WriterLock`]).
    _lock: Option<WriterLock>,
    /// The TensorBoard view of the metrics and samples, when the folder is open for writing.
    events: Option<EventFile>,
}

/// The process that writes a run holds an exclusive OS lock on the run folder itself (a file
/// inside could be deleted, and a second writer would then lock a new one), and writes its
/// process id in this file for the message that refuses a second writer. The OS drops the lock
/// when the process ends, however it ends, so a crashed run never blocks the next writer.
const LOCK_FILE: &str = ".lock";

/// Room kept in a run folder being written, freed to write the status when the disk is full.
const RESERVE_FILE: &str = ".reserve";
/// Several times what `meta.json` needs.
const RESERVE_BYTES: usize = 64 * 1024;

/// An exclusive lock on a run folder, for as long as it lives.
pub struct WriterLock {
    /// The folder, open for as long as the lock is held: closing it releases the lock.
    _folder: File,
}

impl WriterLock {
    /// Take the run's lock, or fail (bad input) naming the process that holds it.
    pub fn take(run: &Path) -> Result<Self> {
        let folder = File::open(run).with_context(|| format!("cannot open {}", run.display()))?;
        let holder = run.join(LOCK_FILE);
        match folder.try_lock() {
            Ok(()) => {
                write_atomic(&holder, std::process::id().to_string().as_bytes())?;
                Ok(Self { _folder: folder })
            }
            Err(fs::TryLockError::WouldBlock) => {
                let pid = fs::read_to_string(&holder).unwrap_or_default();
                Err(bad_input(format!(
                    "{}: another pipe process (pid {}) is writing this run; wait for it to end or stop it first",
                    run.display(),
                    if pid.trim().is_empty() { "unknown" } else { pid.trim() }
                )))
            }
            Err(fs::TryLockError::Error(e)) => Err(anyhow::anyhow!("cannot lock {}: {e}", run.display())),
        }
    }

    /// Whether some process holds `run`'s lock now (a `running` run whose lock is free has
    /// died without a word).
    pub fn is_held(run: &Path) -> bool {
        let Ok(folder) = File::open(run) else { return false };
        folder.try_lock_shared().is_err()
    }
}

/// The current time as RFC 3339, to the second.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl RunDir {
    /// Create a new, never-used folder `<runs_dir>/<name>/<run-id>`. The id is the UTC start
    /// time; runs started in the same second get `-2`, `-3`, … (`create_dir` decides, so two
    /// processes cannot take the same id).
    pub fn create(runs_dir: &Path, meta: Meta) -> Result<Self> {
        let parent = runs_dir.join(&meta.name);
        fs::create_dir_all(&parent)
            .map_err(|e| bad_input(format!("runs folder {}: cannot create it: {e}", parent.display())))?;
        let parent = parent.canonicalize()?;
        let stamp: String = meta.started.chars().filter(char::is_ascii_digit).collect();
        let base = format!("{}-{}", &stamp[..8], &stamp[8..14]);
        for n in 1.. {
            let id = if n == 1 { base.clone() } else { format!("{base}-{n}") };
            let path = parent.join(&id);
            match fs::create_dir(&path) {
                Ok(()) => {
                    let lock = WriterLock::take(&path)?;
                    let events = EventFile::open(&path)?;
                    let mut run = Self { path, meta, _lock: Some(lock), events: Some(events) };
                    run.meta.run_id = id;
                    // A folder that could not be set up is no run: it goes.
                    if let Err(error) = run.write_meta().and_then(|()| run.reserve_room()) {
                        let _ = fs::remove_dir_all(&run.path);
                        return Err(error);
                    }
                    return Ok(run);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(bad_input(format!("runs folder {}: cannot create a run in it: {e}", parent.display())))
                }
            }
        }
        unreachable!("some run id is free")
    }

    /// An existing run folder, to read.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self { path: path.to_path_buf(), meta: Meta::read(path)?, _lock: None, events: None })
    }

    /// An existing run folder, to continue writing: its lock is taken first (and its meta.json
    /// read after, so that it is the current one).
    pub fn open_for_writing(path: &Path) -> Result<Self> {
        Meta::read(path)?; // a run folder, before a lock file is made in it
        let lock = WriterLock::take(path)?;
        let events = EventFile::open(path)?;
        let run = Self { path: path.to_path_buf(), meta: Meta::read(path)?, _lock: Some(lock), events: Some(events) };
        run.reserve_room()?;
        Ok(run)
    }

    /// Make the folder ready to continue from optimizer step `step`: metrics after that step
    /// are dropped (they will be recorded again), as are the outputs of later stages, and the
    /// status is `running` again.
    pub fn restart(&mut self, step: usize) -> Result<()> {
        let metrics = self.file(METRICS_FILE);
        if metrics.exists() {
            let lines = fs::read_to_string(&metrics).map(|t| t.lines().count()).unwrap_or(0);
            let records = read_metrics(&self.path);
            if records.len() < lines {
                tracing::warn!(
                    "{}: dropped {} unreadable line(s), such as a record cut off when the process died",
                    metrics.display(),
                    lines - records.len()
                );
            }
            let mut kept = String::new();
            for record in records {
                // What training logged up to the checkpoint stays (a checkpoint is taken after
                // its step's evaluation); the eval stage runs again after training.
                let stays = match &record {
                    MetricRecord::Eval(_) => false,
                    // A later training stage's records are its own to restart (`restart_stage`).
                    other if other.stage().is_some() => true,
                    other => other.step() <= step,
                };
                if stays {
                    kept += &serde_json::to_string(&record)?;
                    kept.push('\n');
                }
            }
            write_atomic(&metrics, kept.as_bytes())?;
        }
        if let Some(events) = &self.events {
            // As for metrics.jsonl: training's scalars up to the checkpoint stay, as do the
            // hyperparameters; the later stages' figures and samples, and how the run ended, go.
            let dropped = events.retain(|tag, at| match tag {
                tensorboard::HPARAMS_START_TAG => true,
                tag if TRAINING_TAGS.iter().any(|prefix| tag.starts_with(prefix)) => at <= step,
                tag if LATER_STAGES.iter().any(|stage| tag.starts_with(&stage_prefix(Some(stage)))) => true,
                _ => false,
            })?;
            if dropped > 0 {
                tracing::warn!("{}: dropped a record cut off when the process died", events.path().display());
            }
        }
        for later in [SAMPLES_FILE, EVAL_FILE, RESPONSES_FILE] {
            let _ = fs::remove_file(self.file(later));
        }
        self.meta.status = Status::Running;
        self.meta.ended = None;
        self.meta.error = None;
        self.meta.resumed.push(now());
        self.write_meta()
    }

    /// Make the folder ready for training stage `stage` (after the first) to continue from
    /// its optimizer step `step` (0: from its start): its records after that step go.
    pub fn restart_stage(&self, stage: &str, step: usize) -> Result<()> {
        let metrics = self.file(METRICS_FILE);
        if metrics.exists() {
            let mut kept = String::new();
            for record in read_metrics(&self.path) {
                if record.stage() != Some(stage) || record.step() <= step {
                    kept += &serde_json::to_string(&record)?;
                    kept.push('\n');
                }
            }
            write_atomic(&metrics, kept.as_bytes())?;
        }
        if let Some(events) = &self.events {
            let prefix = stage_prefix(Some(stage));
            events.retain(|tag, at| !tag.starts_with(&prefix) || at <= step)?;
        }
        Ok(())
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn write_meta(&self) -> Result<()> {
        write_atomic(&self.file(META_FILE), serde_json::to_string_pretty(&self.meta)?.as_bytes())
    }

    /// Mark the run ended with `status`, recording the error if any. The space kept in reserve
    /// is freed first, so the status is written even when a full disk is what ended the run.
    pub fn finish(&mut self, status: Status, error: Option<String>) -> Result<()> {
        let _ = fs::remove_file(self.file(RESERVE_FILE));
        self.meta.status = status;
        self.meta.error = error;
        self.meta.ended = Some(now());
        self.write_meta()?;
        let Some(events) = &self.events else { return Ok(()) };
        let ended = match status {
            Status::Completed => events.session_end(SessionStatus::Success),
            Status::Failed => events.session_end(SessionStatus::Failure),
            Status::Running | Status::Interrupted => Ok(()), // to be resumed
        };
        // meta.json says how the run ended; TensorBoard's view of it is worth a warning only.
        if let Err(error) = ended {
            tracing::warn!("{error:#}");
        }
        Ok(())
    }

    /// Set aside room for the status a failed run writes at its end (see [`RunDir::finish`]).
    fn reserve_room(&self) -> Result<()> {
        write_atomic(&self.file(RESERVE_FILE), &vec![0u8; RESERVE_BYTES])
    }

    /// Record the resolved spec, as TensorBoard's hyperparameters.
    pub fn log_spec(&self, spec: &toml::Value) -> Result<()> {
        self.events.as_ref().map_or(Ok(()), |events| events.hparams(spec))
    }

    /// Append one record to `metrics.jsonl`, and its figures to TensorBoard's.
    pub fn log_metrics(&self, record: &MetricRecord) -> Result<()> {
        append_line(&self.file(METRICS_FILE), &serde_json::to_string(record)?)?;
        let Some(events) = &self.events else { return Ok(()) };
        match record {
            MetricRecord::Step(r) => {
                let prefix = stage_prefix(r.stage.as_deref());
                let mut values = vec![
                    ("train/loss".to_string(), r.loss),
                    ("train/lr".into(), r.lr),
                    ("train/grad_norm".into(), r.grad_norm),
                    ("train/tokens_per_s".into(), r.tokens_per_s),
                    ("train/epoch".into(), r.epoch as f64),
                ];
                values.extend(r.figures.iter().map(|(name, v)| (format!("train/{name}"), v.0)));
                let tagged: Vec<(String, f64)> = values.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)).collect();
                events.scalars(r.step, &tagged.iter().map(|(k, v)| (k.as_str(), *v)).collect::<Vec<_>>())
            }
            MetricRecord::Epoch(r) => {
                let prefix = stage_prefix(r.stage.as_deref());
                let mut values = vec![(format!("{prefix}val/loss"), r.val_loss)];
                values.extend(r.val_ppl.map(|ppl| (format!("{prefix}val/ppl"), ppl)));
                values.extend(r.figures.iter().map(|(name, v)| (format!("{prefix}val/{name}"), v.0)));
                events.scalars(r.step, &values.iter().map(|(k, v)| (k.as_str(), *v)).collect::<Vec<_>>())?;
                match &r.responses {
                    Some(scores) => events.scalars(
                        r.step,
                        &[
                            ("val/exact_match", scores.exact_match),
                            ("val/token_f1", scores.token_f1),
                            ("val/rouge_l", scores.rouge_l),
                        ],
                    ),
                    None => Ok(()),
                }
            }
            MetricRecord::Eval(r) => {
                // The final model's figures as `eval/…`, another model's as `eval/<name>_…`.
                let prefix = if r.eval == "final" { "eval/".to_string() } else { format!("eval/{}_", r.eval) };
                let mut values = vec![("val_loss", r.val_loss), ("val_ppl", r.val_ppl)];
                if let Some(answers) = &r.responses {
                    let s = answers.scores;
                    values.extend([("exact_match", s.exact_match), ("token_f1", s.token_f1), ("rouge_l", s.rouge_l)]);
                }
                let tagged: Vec<(String, f64)> = values.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)).collect();
                let tagged: Vec<(&str, f64)> = tagged.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                events.scalars(r.step, &tagged)
            }
        }
    }

    /// Append one answer to a held-out prompt to `responses.jsonl`.
    pub fn log_response(&self, answer: &Answer) -> Result<()> {
        append_line(&self.file(RESPONSES_FILE), &serde_json::to_string(answer)?)
    }

    /// Append the `index`th sample of the model trained for `step` steps to `samples.jsonl`,
    /// and to TensorBoard's text.
    pub fn log_sample(&self, record: &SampleRecord, index: usize, step: usize) -> Result<()> {
        append_line(&self.file(SAMPLES_FILE), &serde_json::to_string(record)?)?;
        let Some(events) = &self.events else { return Ok(()) };
        // Fenced, so that the text shows as it is rather than as markdown.
        let fence = |text: &str| format!("```\n{}\n```", text.replace("```", "` ` `"));
        let text = format!("prompt:\n\n{}\n\ncompletion:\n\n{}", fence(&record.prompt), fence(&record.completion));
        events.text(&format!("samples/{index}"), step, &text)
    }
}

/// The TensorBoard tags the training stage writes (steps and validation).
const TRAINING_TAGS: [&str; 2] = ["train/", "val/"];

/// The training stages that come after the first and count their own steps.
pub const LATER_STAGES: [&str; 1] = ["dpo"];

/// Where a later training stage's TensorBoard tags go: `dpo/train/loss`, … (the first
/// stage's are `train/loss`, …).
fn stage_prefix(stage: Option<&str>) -> String {
    stage.map(|s| format!("{s}/")).unwrap_or_default()
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(file, "{line}").with_context(|| format!("cannot write {}", path.display()))
}
