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

pub const SPEC_FILE: &str = "spec.toml";
pub const META_FILE: &str = "meta.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const SAMPLES_FILE: &str = "samples.jsonl";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The final model, as a HuggingFace GPT-2 directory.
pub const FINAL_DIR: &str = "final";

/// Write `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().context("a file path has a name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        anyhow::anyhow!("cannot write {}: {e}", path.display())
    })
}

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
}

/// An open run folder.
pub struct RunDir {
    pub path: PathBuf,
    pub meta: Meta,
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
                    let mut run = Self { path, meta };
                    run.meta.run_id = id;
                    run.write_meta()?;
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

    /// An existing run folder.
    pub fn open(path: &Path) -> Result<Self> {
        let meta_path = path.join(META_FILE);
        let text = fs::read_to_string(&meta_path)
            .map_err(|e| bad_input(format!("{}: not a run folder: {e}", path.display())))?;
        let meta = serde_json::from_str(&text)
            .map_err(|e| bad_input(format!("{}: not a pipe meta.json: {e}", meta_path.display())))?;
        Ok(Self { path: path.to_path_buf(), meta })
    }

    /// Make the folder ready to continue from optimizer step `step`: metrics after that step
    /// are dropped (they will be recorded again), as are the outputs of later stages, and the
    /// status is `running` again.
    pub fn restart(&mut self, step: usize) -> Result<()> {
        let metrics = self.file(METRICS_FILE);
        if let Ok(text) = fs::read_to_string(&metrics) {
            let kept: String = text
                .lines()
                .filter(|line| {
                    let Ok(record) = serde_json::from_str::<serde_json::Value>(line) else { return false };
                    let at = record["step"].as_u64().unwrap_or(0) as usize;
                    // Step records up to the checkpoint stay; evaluations at its step came after it.
                    if record.get("loss").is_some() {
                        at <= step
                    } else {
                        at < step
                    }
                })
                .map(|line| format!("{line}\n"))
                .collect();
            write_atomic(&metrics, kept.as_bytes())?;
        }
        for later in [SAMPLES_FILE, "eval.json"] {
            let _ = fs::remove_file(self.file(later));
        }
        self.meta.status = Status::Running;
        self.meta.ended = None;
        self.meta.error = None;
        self.meta.resumed.push(now());
        self.write_meta()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn write_meta(&self) -> Result<()> {
        write_atomic(&self.file(META_FILE), serde_json::to_string_pretty(&self.meta)?.as_bytes())
    }

    /// Mark the run ended with `status`, recording the error if any.
    pub fn finish(&mut self, status: Status, error: Option<String>) -> Result<()> {
        self.meta.status = status;
        self.meta.error = error;
        self.meta.ended = Some(now());
        self.write_meta()
    }

    /// Append one JSON record to `metrics.jsonl`.
    pub fn log_metrics(&self, record: &serde_json::Value) -> Result<()> {
        append_line(&self.file(METRICS_FILE), &record.to_string())
    }

    /// Append one JSON record to `samples.jsonl`.
    pub fn log_sample(&self, record: &serde_json::Value) -> Result<()> {
        append_line(&self.file(SAMPLES_FILE), &record.to_string())
    }
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(file, "{line}").with_context(|| format!("cannot write {}", path.display()))
}
