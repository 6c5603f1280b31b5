//! Reading run folders back: resolving a run by path, name or `name@id`, the `pipe runs` table,
//! and `pipe compare` (spec differences, metrics, loss curves as SVG and sparklines).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::checkpoint::Snapshot;
use crate::data::{prompt_layout, PromptLayout};
use crate::error::bad_input;
use crate::model::hf;
use crate::response_metrics::ResponseEval;
use crate::run_dir::{self, Meta, MetricRecord, Status, WriterLock};
use crate::spec::{FinalModel, Spec};

/// One run folder, read back.
#[derive(Debug, Clone)]
pub struct Run {
    pub path: PathBuf,
    pub meta: Meta,
    /// (step, train loss) per optimizer step.
    pub train_loss: Vec<(u64, f64)>,
    /// (step, val loss) per evaluation during training (epoch ends, `train.eval_every`).
    pub val_loss: Vec<(u64, f64)>,
    /// (step, val loss) of the eval stage's evaluations after training: `final/`, and the last
    /// model when `final/` is the best one. Not part of the curve: they re-measure its models.
    pub eval_val_loss: Vec<(u64, f64)>,
    /// The resolved spec as a TOML table.
    pub spec: toml::Table,
    /// The eval stage's scores of answers to held-out prompts, if it made them.
    pub responses: Option<ResponseEval>,
    /// The dpo stage's records, if it ran: its steps count from 1 again, apart from SFT's.
    pub dpo: Option<DpoCurves>,
}

/// What a run's dpo stage recorded.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DpoCurves {
    /// (step, DPO loss) per optimizer step.
    pub loss: Vec<(u64, f64)>,
    /// Each evaluation on the held-out pairs.
    pub val: Vec<DpoVal>,
}

/// One evaluation of the dpo stage on its held-out pairs.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct DpoVal {
    pub step: u64,
    pub loss: f64,
    /// The fraction of pairs whose chosen completion the policy rewards above the rejected one.
    pub reward_accuracy: Option<f64>,
    /// The mean reward margin (chosen − rejected).
    pub reward_margin: Option<f64>,
}

impl DpoCurves {
    /// The last evaluation on the held-out pairs.
    pub fn last_val(&self) -> Option<&DpoVal> {
        self.val.last()
    }

    pub fn lowest_val_loss(&self) -> Option<f64> {
        self.val.iter().map(|v| v.loss).filter(|l| !l.is_nan()).min_by(f64::total_cmp)
    }

    /// The stage's last optimizer step, as a table cell (`-` before its first).
    fn steps_cell(&self) -> String {
        self.loss.last().map_or("-".into(), |p| p.0.to_string())
    }
}

impl Run {
    pub fn read(path: &Path) -> Result<Self> {
        let mut meta = Meta::read(path)?;
        // Runs of earlier versions recorded burn's name for the CPU backend.
        if meta.backend == "flex" {
            meta.backend = "cpu".into();
        }
        let (mut train_loss, mut val_loss, mut eval_val_loss, mut responses) =
            (Vec::new(), Vec::new(), Vec::new(), None);
        let mut dpo: Option<DpoCurves> = None;
        for record in run_dir::read_metrics(path) {
            let step = record.step() as u64;
            if record.stage() == Some("dpo") {
                let curves = dpo.get_or_insert_with(DpoCurves::default);
                let figure = |figures: &run_dir::Figures, name: &str| figures.get(name).map(|f| f.0);
                match record {
                    MetricRecord::Step(r) => curves.loss.push((step, r.loss)),
                    MetricRecord::Epoch(r) => curves.val.push(DpoVal {
                        step,
                        loss: r.val_loss,
                        reward_accuracy: figure(&r.figures, "rewards/accuracies"),
                        reward_margin: figure(&r.figures, "rewards/margins"),
                    }),
                    MetricRecord::Eval(_) => {}
                }
                continue;
            }
            match record {
                MetricRecord::Step(r) => train_loss.push((step, r.loss)),
                MetricRecord::Epoch(r) => val_loss.push((step, r.val_loss)),
                MetricRecord::Eval(r) => {
                    eval_val_loss.push((step, r.val_loss));
                    if r.eval == "final" {
                        responses = r.responses.or(responses);
                    }
                }
            }
        }
        let spec = std::fs::read_to_string(path.join(run_dir::SPEC_FILE))
            .ok()
            .and_then(|t| t.parse::<toml::Table>().ok())
            .unwrap_or_default();
        Ok(Self { path: path.to_path_buf(), meta, train_loss, val_loss, eval_val_loss, spec, responses, dpo })
    }

    /// `name@id`, how runs are named on the command line.
    /// The status as `pipe runs` shows it: `crashed` for a run that says `running` while no
    /// process holds its lock (killed, out of memory).
    pub fn status(&self) -> String {
        match self.meta.status {
            Status::Running if !WriterLock::is_held(&self.path) => "crashed".into(),
            status => format!("{status:?}").to_lowercase(),
        }
    }

    pub fn label(&self) -> String {
        format!("{}@{}", self.meta.name, self.meta.run_id)
    }

    pub fn steps(&self) -> u64 {
        self.train_loss.last().map_or(0, |&(s, _)| s)
    }

    pub fn final_train_loss(&self) -> Option<f64> {
        self.train_loss.last().map(|&(_, l)| l)
    }

    pub fn lowest_val_loss(&self) -> Option<f64> {
        self.lowest_val().map(|(_, loss)| loss)
    }

    /// The lowest validation loss and the step it was measured at (the first, on a tie):
    /// among the evaluations during training, or the eval stage's where training made none.
    pub fn lowest_val(&self) -> Option<(u64, f64)> {
        let measured = if self.val_loss.is_empty() { &self.eval_val_loss } else { &self.val_loss };
        // A NaN (a failed run's last evaluation) is no value, let alone the lowest.
        measured.iter().copied().filter(|v| !v.1.is_nan()).reduce(|lowest, v| if v.1 < lowest.1 { v } else { lowest })
    }

    /// `lowest val loss` as the tables show it: the value and its step.
    fn lowest_val_cell(&self) -> String {
        self.lowest_val().map_or("-".into(), |(step, loss)| format!("{loss:.4} @{step}"))
    }

    /// Which model `final/` is and the step it was trained to: `last @506`, or the best by the
    /// selection metric, `best rouge_l @322`.
    pub fn final_model(&self) -> String {
        match &self.meta.training {
            Some(t) if t.final_model == FinalModel::Best => {
                let metric = toml::Value::try_from(t.select_metric)
                    .map_or(String::new(), |v| v.as_str().map_or(String::new(), |name| format!("{name} ")));
                format!("best {metric}@{}", t.final_step)
            }
            Some(t) => format!("last @{}", t.final_step),
            None => "-".into(),
        }
    }

    pub fn duration_s(&self) -> Option<f64> {
        let start = humantime::parse_rfc3339(&self.meta.started).ok()?;
        let end = match &self.meta.ended {
            Some(end) => humantime::parse_rfc3339(end).ok()?,
            None => SystemTime::now(),
        };
        end.duration_since(start).ok().map(|d| d.as_secs_f64())
    }
}

/// Every run under `runs_dir` (folders `<name>/<id>/` with a meta.json); a run whose meta.json
/// cannot be read is skipped with a warning naming it.
pub fn list(runs_dir: &Path) -> Result<Vec<Run>> {
    let names = std::fs::read_dir(runs_dir)
        .map_err(|e| bad_input(format!("runs folder {}: cannot read it: {e}", runs_dir.display())))?;
    let mut runs = Vec::new();
    for name in names.flatten() {
        let Ok(ids) = std::fs::read_dir(name.path()) else { continue };
        for id in ids.flatten() {
            if id.path().join(run_dir::META_FILE).is_file() {
                // One damaged run folder must not hide the others.
                match Run::read(&id.path()) {
                    Ok(run) => runs.push(run),
                    Err(error) => tracing::warn!("skipping {}: {error:#}", id.path().display()),
                }
            }
        }
    }
    runs.sort_by(|a, b| a.meta.started.cmp(&b.meta.started).then(a.path.cmp(&b.path)));
    Ok(runs)
}

/// A run named on the command line: a folder, `name` (its latest run) or `name@id`.
pub fn resolve(runs_dir: &Path, reference: &str) -> Result<PathBuf> {
    let as_path = Path::new(reference);
    if as_path.join(run_dir::META_FILE).is_file() {
        return Ok(as_path.to_path_buf());
    }
    if let Some(latest) = latest_run_in(as_path) {
        return Ok(latest);
    }
    let (name, id) = match reference.split_once('@') {
        Some((name, id)) => (name, Some(id)),
        None => (reference, None),
    };
    let folder = runs_dir.join(name);
    let path = match id {
        Some(id) => folder.join(id),
        None => latest_run_in(&folder).unwrap_or(folder),
    };
    if path.join(run_dir::META_FILE).is_file() {
        Ok(path)
    } else {
        Err(bad_input(format!(
            "`{reference}` is not a run: no folder with a meta.json, and no run {} under {}",
            if id.is_some() { "with that name and id" } else { "of that name" },
            runs_dir.display()
        )))
    }
}

/// The latest run in a folder of runs of one name (ids sort by start time).
fn latest_run_in(folder: &Path) -> Option<PathBuf> {
    let mut ids: Vec<PathBuf> = std::fs::read_dir(folder)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join(run_dir::META_FILE).is_file())
        .collect();
    ids.sort_by_key(|p| {
        // `20261127-152125-2` sorts after `20261127-152125`: compare (stamp, counter).
        let name = p.file_name().unwrap_or_default().to_string_lossy().to_string();
        let counter = name.get(16..).and_then(|c| c.parse::<u32>().ok()).unwrap_or(1);
        (name.get(..15).unwrap_or(&name).to_string(), counter)
    });
    ids.pop()
}

/// N of `step-N` (`--checkpoint step-100`).
fn step_number(name: &str) -> Option<u64> {
    name.strip_prefix("step-").filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))?.parse().ok()
}

/// The run's checkpoint at step `step`: of its training stage (`checkpoints/`) or of its DPO
/// stage (`dpo/checkpoints/`); refused where there is none, or one in each.
fn checkpoint_at_step(run: &Path, step: u64) -> Result<PathBuf> {
    let stages = std::iter::once(run.to_path_buf()).chain(run_dir::LATER_STAGES.iter().map(|stage| run.join(stage)));
    let found: Vec<PathBuf> = stages
        .flat_map(|stage| crate::checkpoint::list(&stage))
        .filter(|dir| dir.file_name().and_then(|n| step_number(&n.to_string_lossy())) == Some(step))
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(bad_input(format!(
            "{}: --checkpoint step-{step}: the run has no checkpoint at step {step} (`pipe runs` lists them; name best, last or a folder inside the run)",
            run.display()
        ))),
        several => Err(bad_input(format!(
            "--checkpoint step-{step}: the run has a checkpoint at step {step} in each of its training stages; name one folder: {}",
            several.iter().map(|d| d.strip_prefix(run).unwrap_or(d).display().to_string()).collect::<Vec<_>>().join(" or ")
        ))),
    }
}

/// A model argument: a run folder (its `final/` model, or `--checkpoint`) or a HF directory.
pub struct ModelSource {
    /// Where to read the model: a snapshot of a run's folder (see [`Snapshot`]), or the folder.
    pub dir: PathBuf,
    /// The folder the model is, for messages.
    pub origin: PathBuf,
    /// Keeps `dir` while the source lives, when it is a snapshot.
    _snapshot: Option<Snapshot>,
    /// The run's spec, when the model comes from a run.
    pub spec: Option<Spec>,
    /// How the run laid prompts out, when the model comes from a run.
    pub layout: Option<PromptLayout>,
}

/// A model named on the command line: a HF directory, or a run as [`resolve`] takes it
/// (names looked up under `runs_dir`).
pub fn model_source(runs_dir: &Path, reference: &Path, checkpoint: Option<&str>) -> Result<ModelSource> {
    let path = if reference.join(hf::CONFIG_FILE).is_file() {
        reference.to_path_buf()
    } else {
        match resolve(runs_dir, &reference.to_string_lossy()) {
            Ok(run) => run,
            Err(_) => reference.to_path_buf(),
        }
    };
    let path = path.as_path();
    if path.join(run_dir::META_FILE).is_file() {
        let named = || -> Result<PathBuf> {
            let dir = match checkpoint {
                None => path.join(run_dir::FINAL_DIR),
                Some("best") => crate::checkpoint::best(path)?.map(|(dir, _)| dir).ok_or_else(|| {
                    bad_input(format!(
                    "{}: --checkpoint best: the run kept no best model (it has no evaluation on a validation set yet)",
                    path.display()
                ))
                })?,
                Some("last") => crate::checkpoint::list(path).pop().ok_or_else(|| {
                    bad_input(format!("{}: --checkpoint last: the run has no checkpoint", path.display()))
                })?,
                Some(step) if step_number(step).is_some() && !path.join(step).exists() => {
                    checkpoint_at_step(path, step_number(step).expect("a step number"))?
                }
                Some(other) => {
                    let dir = path.join(other);
                    // A folder of this run only: `../another-run/final` would pass off another
                    // run's model with this run's spec and layout.
                    let inside = match (dir.canonicalize(), path.canonicalize()) {
                        (Ok(dir), Ok(run)) => dir.starts_with(run),
                        _ => true,
                    };
                    if !inside {
                        return Err(bad_input(format!(
                        "--checkpoint {other}: not a folder of the run {}; name best, last or a folder inside it (checkpoints/step-000100)",
                        path.display()
                    )));
                    }
                    dir
                }
            };
            if !dir.join(hf::CONFIG_FILE).is_file() {
                return Err(bad_input(format!(
                    "{}: the run has no model there (no {})",
                    dir.display(),
                    hf::CONFIG_FILE
                )));
            }
            Ok(dir)
        };
        // Training may prune or replace the folder while it is named or linked (a listing made
        // while checkpoints are renamed may miss them all; `best/` is absent for a moment while
        // replaced): then it is named anew, a few times, before what is missing is reported.
        let mut tries = 0;
        let (origin, snapshot) = loop {
            let dir = match named() {
                Ok(dir) => dir,
                Err(_) if tries < 3 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(e),
            };
            match Snapshot::of(path, &dir) {
                Ok(snapshot) => break (dir, snapshot),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 3 => tries += 1,
                Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", dir.display())),
            }
        };
        let dir = snapshot.as_ref().map_or_else(|| origin.clone(), |s| s.path().to_path_buf());
        let spec_path = path.join(run_dir::SPEC_FILE);
        let spec = std::fs::read_to_string(&spec_path)
            .ok()
            .map(|text| toml::from_str::<Spec>(&text))
            .transpose()
            .map_err(|e| bad_input(format!("{}: {e}", spec_path.display())))?;
        let layout_path = path.join(run_dir::PROMPT_LAYOUT_FILE);
        let layout = match std::fs::read_to_string(&layout_path) {
            Ok(text) => {
                Some(serde_json::from_str(&text).map_err(|e| bad_input(format!("{}: {e}", layout_path.display())))?)
            }
            // Runs from before the layout was recorded: their spec's (they had no Jinja templates).
            Err(_) => spec.as_ref().map(|s| prompt_layout(&s.data, None)).transpose()?,
        };
        return Ok(ModelSource { dir, origin, _snapshot: snapshot, spec, layout });
    }
    if checkpoint.is_some() {
        return Err(bad_input(format!("{}: --checkpoint needs a run folder", path.display())));
    }
    if path.join(hf::CONFIG_FILE).is_file() {
        return Ok(ModelSource {
            dir: path.to_path_buf(),
            origin: path.to_path_buf(),
            _snapshot: None,
            spec: None,
            layout: None,
        });
    }
    Err(bad_input(format!(
        "{}: neither a run folder (meta.json) nor a HuggingFace GPT-2 directory ({})",
        path.display(),
        hf::CONFIG_FILE
    )))
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn fmt_duration(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s < 60.0 => format!("{s:.0}s"),
        Some(s) if s < 3600.0 => format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64),
        Some(s) => format!("{}h{:02}m", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64),
    }
}

/// Columns `pipe runs` can sort by.
pub const SORT_COLUMNS: &[&str] = &["started", "name", "status", "duration", "steps", "loss", "val_loss"];

/// The `pipe runs` table.
pub fn table(runs: &[Run]) -> String {
    let header = [
        "name",
        "id",
        "status",
        "started",
        "duration",
        "steps",
        "last train loss",
        "lowest val loss",
        "final model",
        "backend",
    ];
    let with_dpo = runs.iter().any(|r| r.dpo.is_some());
    let rows = runs.iter().map(|r| {
        let mut row = vec![
            r.meta.name.clone(),
            r.meta.run_id.clone(),
            r.status(),
            r.meta.started.replace('T', " ").trim_end_matches('Z').to_string(),
            fmt_duration(r.duration_s()),
            r.steps().to_string(),
            fmt_opt(r.final_train_loss(), 4),
            r.lowest_val_cell(),
            r.final_model(),
            r.meta.backend.clone(),
        ];
        if with_dpo {
            // The steps column counts SFT's; the dpo stage's count from 1 again, so they are shown here.
            row.push(r.dpo.as_ref().map_or("-".into(), |d| {
                let steps = d.steps_cell();
                let val = d.last_val().map_or("-".into(), |v| {
                    format!("{} / {}", fmt_opt(v.reward_accuracy, 3), fmt_opt(v.reward_margin, 3))
                });
                format!("{steps}, {val}")
            }));
        }
        row
    });
    let mut header: Vec<String> = header.map(String::from).to_vec();
    if with_dpo {
        header.push("dpo steps, val reward acc / margin".into());
    }
    let rows: Vec<Vec<String>> = std::iter::once(header).chain(rows).collect();
    render_rows(&rows)
}

/// Sort runs by a column of the table (see [`SORT_COLUMNS`]).
pub fn sort(runs: &mut [Run], column: &str) -> Result<()> {
    let key = |r: &Run| -> f64 {
        match column {
            "duration" => r.duration_s().unwrap_or(f64::INFINITY),
            "steps" => r.steps() as f64,
            "loss" => r.final_train_loss().unwrap_or(f64::INFINITY),
            "val_loss" => r.lowest_val_loss().unwrap_or(f64::INFINITY),
            _ => 0.0,
        }
    };
    match column {
        "started" => runs.sort_by(|a, b| a.meta.started.cmp(&b.meta.started)),
        "name" => runs.sort_by(|a, b| a.meta.name.cmp(&b.meta.name).then(a.meta.run_id.cmp(&b.meta.run_id))),
        "status" => runs.sort_by_key(Run::status),
        c if SORT_COLUMNS.contains(&c) => runs.sort_by(|a, b| key(a).total_cmp(&key(b))),
        other => {
            return Err(bad_input(format!("--sort {other}: not a column; one of {}", SORT_COLUMNS.join(", "))));
        }
    }
    Ok(())
}

/// Runs side by side: what differs in their specs, their metrics, and their curves.
pub struct Comparison<'a> {
    pub runs: &'a [Run],
    /// Spec keys whose resolved values differ, with each run's value ("-" where unset).
    pub spec_diff: BTreeMap<String, Vec<String>>,
}

impl<'a> Comparison<'a> {
    pub fn new(runs: &'a [Run]) -> Self {
        let flat: Vec<BTreeMap<String, String>> =
            runs.iter().map(|r| crate::spec::flatten(&toml::Value::Table(r.spec.clone()))).collect();
        let keys: BTreeSet<&String> = flat.iter().flat_map(|f| f.keys()).collect();
        let spec_diff = keys
            .into_iter()
            .filter_map(|k| {
                let values: Vec<String> =
                    flat.iter().map(|f| f.get(k).cloned().unwrap_or_else(|| "-".into())).collect();
                (values.iter().any(|v| v != &values[0])).then(|| (k.clone(), values))
            })
            .collect();
        Self { runs, spec_diff }
    }

    pub fn to_json(&self, plot: Option<&Path>) -> Value {
        json!({
            "runs": self.runs.iter().map(|r| json!({
                "run": r.label(),
                "path": r.path,
                "status": r.status(),
                "steps": r.steps(),
                "final_train_loss": r.final_train_loss(),
                "lowest_val_loss": r.lowest_val_loss(),
                "lowest_val_loss_step": r.lowest_val().map(|(step, _)| step),
                "final_model": r.final_model(),
                "training": r.meta.training,
                "responses": r.responses,
                "duration_s": r.duration_s(),
                "backend": r.meta.backend,
                "train_loss": r.train_loss,
                "val_loss": r.val_loss,
                "eval_val_loss": r.eval_val_loss,
                "dpo": r.dpo,
            })).collect::<Vec<_>>(),
            "spec_diff": self.spec_diff,
            "plot": plot,
        })
    }

    /// The terminal report: spec differences, metrics with the best of each marked `*`, and
    /// loss sparklines on a shared scale.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let labels: Vec<String> = self.runs.iter().map(Run::label).collect();
        // One run has no differences to show.
        if self.runs.len() > 1 {
            out.push_str("spec differences:\n");
            if self.spec_diff.is_empty() {
                out.push_str("  (none)\n");
            } else {
                let mut header = vec!["field".to_string()];
                header.extend(labels.iter().cloned());
                let mut rows = vec![header];
                rows.extend(
                    self.spec_diff.iter().map(|(k, vs)| std::iter::once(k.clone()).chain(vs.iter().cloned()).collect()),
                );
                out.push_str(&indent(&render_rows(&rows)));
            }
            out.push('\n');
        }
        // One run has no best to mark.
        let marks = self.runs.len() > 1;
        out.push_str(if marks { "metrics (* the best of these runs):\n" } else { "metrics:\n" });
        let best = |values: Vec<Option<f64>>, digits: usize| -> Vec<String> {
            let min = values.iter().flatten().copied().min_by(f64::total_cmp);
            let mark = |v: &Option<f64>| if marks && v.is_some() && *v == min { "*" } else { "" };
            values.iter().map(|v| fmt_opt(*v, digits) + mark(v)).collect()
        };
        let final_loss = best(self.runs.iter().map(Run::final_train_loss).collect(), 4);
        let val = best(self.runs.iter().map(Run::lowest_val_loss).collect(), 4);
        let mut rows = vec![[
            "run",
            "status",
            "steps",
            "last train loss",
            "lowest val loss",
            "at step",
            "final model",
            "duration",
        ]
        .map(String::from)
        .to_vec()];
        for (i, r) in self.runs.iter().enumerate() {
            rows.push(vec![
                labels[i].clone(),
                r.status(),
                r.steps().to_string(),
                final_loss[i].clone(),
                val[i].clone(),
                r.lowest_val().map_or("-".into(), |(step, _)| step.to_string()),
                r.final_model(),
                fmt_duration(r.duration_s()),
            ]);
        }
        out.push_str(&indent(&render_rows(&rows)));
        if self.runs.iter().any(|r| r.responses.is_some()) {
            out.push_str(match marks {
                true => "\nfinal/'s answers to held-out prompts (* the best; high is good):\n",
                false => "\nfinal/'s answers to held-out prompts (high is good):\n",
            });
            let score = |f: fn(&ResponseEval) -> f64| -> Vec<String> {
                let values: Vec<Option<f64>> = self.runs.iter().map(|r| r.responses.as_ref().map(f)).collect();
                let max = values.iter().flatten().copied().max_by(f64::total_cmp);
                let mark = |v: &Option<f64>| if marks && v.is_some() && *v == max { "*" } else { "" };
                values.iter().map(|v| fmt_opt(*v, 3) + mark(v)).collect()
            };
            let (em, f1, rl) =
                (score(|r| r.scores.exact_match), score(|r| r.scores.token_f1), score(|r| r.scores.rouge_l));
            let mut rows = vec![["run", "answers", "exact match", "token F1", "ROUGE-L"].map(String::from).to_vec()];
            for (i, r) in self.runs.iter().enumerate() {
                let n = r.responses.as_ref().map_or("-".into(), |r| r.examples.to_string());
                rows.push(vec![labels[i].clone(), n, em[i].clone(), f1[i].clone(), rl[i].clone()]);
            }
            out.push_str(&indent(&render_rows(&rows)));
        }
        if self.runs.iter().any(|r| r.dpo.is_some()) {
            out.push_str(match marks {
                true => "\npreference tuning (dpo) on its held-out pairs (* the best):\n",
                false => "\npreference tuning (dpo) on its held-out pairs:\n",
            });
            let pick = |f: &dyn Fn(&DpoCurves) -> Option<f64>, high: bool, digits: usize| -> Vec<String> {
                let values: Vec<Option<f64>> = self.runs.iter().map(|r| r.dpo.as_ref().and_then(f)).collect();
                let best = values.iter().flatten().copied().reduce(|a, b| if (b > a) == high { b } else { a });
                let mark = |v: &Option<f64>| if marks && v.is_some() && *v == best { "*" } else { "" };
                values.iter().map(|v| fmt_opt(*v, digits) + mark(v)).collect()
            };
            let last_loss = pick(&|d| d.loss.last().map(|p| p.1), false, 4);
            let val = pick(&|d| d.lowest_val_loss(), false, 4);
            let accuracy = pick(&|d| d.last_val().and_then(|v| v.reward_accuracy), true, 3);
            let margin = pick(&|d| d.last_val().and_then(|v| v.reward_margin), true, 3);
            let mut rows = vec![[
                "run",
                "steps",
                "last train loss",
                "lowest val loss",
                "last val reward accuracy",
                "last val reward margin",
            ]
            .map(String::from)
            .to_vec()];
            for (i, r) in self.runs.iter().enumerate() {
                let steps = r.dpo.as_ref().map_or("-".into(), DpoCurves::steps_cell);
                let row = [&labels[i], &steps, &last_loss[i], &val[i], &accuracy[i], &margin[i]];
                rows.push(row.map(|c| c.to_string()).to_vec());
            }
            out.push_str(&indent(&render_rows(&rows)));
        }
        let all: Vec<&(u64, f64)> = self.runs.iter().flat_map(|r| r.train_loss.iter().chain(&r.val_loss)).collect();
        let last_step = all.iter().map(|p| p.0).max().unwrap_or(0);
        let (lo, hi) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
        let _ = writeln!(out, "\nloss by step, 0 to {last_step} (one scale; low is good):");
        let width = labels.iter().map(String::len).max().unwrap_or(0);
        for (label, r) in labels.iter().zip(self.runs) {
            let train = sparkline(&r.train_loss, lo, hi, last_step, 48);
            let _ = writeln!(out, "  {label:<width$}  train {}", train.trim_end());
            if !r.val_loss.is_empty() {
                let val = sparkline(&r.val_loss, lo, hi, last_step, 48);
                let _ = writeln!(out, "  {:<width$}  val   {}", "", val.trim_end());
            }
        }
        out
    }

    /// Train and validation loss of every run against the optimizer step, as an SVG image.
    pub fn write_svg(&self, path: &Path) -> Result<()> {
        use plotters::prelude::*;
        let all: Vec<&(u64, f64)> = self.runs.iter().flat_map(|r| r.train_loss.iter().chain(&r.val_loss)).collect();
        let max_step = all.iter().map(|p| p.0).max().unwrap_or(1).max(1);
        let (lo, hi) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
        let (lo, hi) = if lo.is_finite() { (lo.min(hi - 1e-3), hi) } else { (0.0, 1.0) };
        let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
        let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(&root)
                .caption("loss by optimizer step (solid: train, thick: validation)", ("sans-serif", 20))
                .margin(16)
                .x_label_area_size(36)
                .y_label_area_size(56)
                .build_cartesian_2d(0u64..max_step, lo..hi)?;
            chart.configure_mesh().x_desc("step").y_desc("loss").draw()?;
            for (i, r) in self.runs.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(r.train_loss.iter().copied(), color.stroke_width(1)))?
                    .label(format!("{} train", r.label()))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1)));
                if !r.val_loss.is_empty() {
                    chart
                        .draw_series(LineSeries::new(r.val_loss.iter().copied(), color.stroke_width(3)))?
                        .label(format!("{} val", r.label()))
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
                }
            }
            chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", path.display()))
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn render_rows(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            cells.join("  ").trim_end().to_string() + "\n"
        })
        .collect()
}

/// A series of (step, value) as block characters on the scale lo..hi, on a step axis from 1 to
/// `last_step` cut into `width` columns (fewer when there are fewer steps): each column shows
/// the mean of the points whose steps fall in it, or a space where none do, so series measured
/// at different steps (training and validation losses) line up column by column.
pub fn sparkline(series: &[(u64, f64)], lo: f64, hi: f64, last_step: u64, width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let columns = (last_step as usize).clamp(1, width.max(1));
    let mut sums = vec![(0.0, 0usize); columns];
    for &(step, value) in series {
        // Steps 1..=last_step onto columns 0..columns.
        let column = (step.saturating_sub(1) as usize * columns / last_step.max(1) as usize).min(columns - 1);
        sums[column].0 += value;
        sums[column].1 += 1;
    }
    sums.iter()
        .map(|&(sum, n)| match n {
            0 => ' ',
            n => {
                let mean = sum / n as f64;
                let level = if hi > lo { ((mean - lo) / (hi - lo) * 7.0).round() as usize } else { 0 };
                BARS[level.min(7)]
            }
        })
        .collect()
}

/// Write the comparison's files: `loss.svg` and `comparison.json`.
pub fn write_comparison(comparison: &Comparison, out: &Path) -> Result<PathBuf> {
    if !crate::files::absent_or_empty(out) {
        return Err(bad_input(format!(
            "--out {}: already exists and is not empty; choose a new folder (nothing is overwritten)",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let svg = out.join("loss.svg");
    comparison.write_svg(&svg)?;
    let json = serde_json::to_string_pretty(&comparison.to_json(Some(&svg)))?;
    crate::files::write_atomic(&out.join("comparison.json"), json.as_bytes())?;
    Ok(svg)
}
