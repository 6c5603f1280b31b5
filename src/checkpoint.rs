//! Training checkpoints: `checkpoints/step-000040/` holds the model as a HF GPT-2 directory
//! (so `--checkpoint` works with generate, chat and export), the optimizer state, and where
//! training stood. A checkpoint is written into `.step-000040.partial/` and renamed into
//! place, so a crash mid-write never leaves one that looks complete.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::record::{BinBytesRecorder, BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::data::Tok;
use crate::error::{bad_input, without_panics};
use crate::files::Staged;
use crate::model::{params, CausalLm, FusedOps, TrainBackend, TrainableLm};
use crate::selection::{Scored, Selection};

pub const CHECKPOINTS_DIR: &str = "checkpoints";
const STATE_FILE: &str = "trainer.json";
const OPTIMIZER_FILE: &str = "optimizer.bin";

/// Where training stood after an optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps done.
    pub step: usize,
    /// The epoch in progress (1-based).
    pub epoch: usize,
    /// Examples of this epoch's shuffled order already trained on.
    pub position: usize,
    /// The best model so far and early stopping's count.
    #[serde(default)]
    pub selection: Selection,
}

/// The best model of a run, kept apart from the rolling checkpoints.
pub const BEST_DIR: &str = "best";
/// In `checkpoints/best/`: which evaluation it is the model of.
const BEST_FILE: &str = "best.json";

#[derive(Serialize, Deserialize)]
struct TrainerState {
    progress: Progress,
    /// The id of each parameter by name; the optimizer state is keyed by these ids.
    param_ids: ParamIds,
    /// The CRC-32C of the optimizer file, checked before it is decoded: burn's decoder trusts
    /// the lengths in it, and a damaged length would ask for any amount of memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    optimizer_crc32c: Option<u32>,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum ParamIds {
    ByName(BTreeMap<String, u64>),
    /// Checkpoints written before parameters were named: ids in the model's visiting order.
    InVisitingOrder(Vec<u64>),
}

fn step_dir_name(step: usize) -> String {
    format!("step-{step:06}")
}

/// Write a checkpoint of `model` and the optimizer record, keeping the newest `keep`.
pub fn save<B: TrainBackend, M: TrainableLm<B>, R: burn::record::Record<B>>(
    run: &Path,
    model: &M,
    tok: &Tok,
    optimizer: R,
    progress: Progress,
    keep: usize,
) -> Result<PathBuf> {
    let root = run.join(CHECKPOINTS_DIR);
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let name = step_dir_name(progress.step);
    let staged = Staged::new(&root.join(&name), root.join(format!(".{name}.partial")))?;
    let partial = staged.path();
    model.valid().save(partial, Some(tok.eos_id as usize))?;
    tok.save(&partial.join(crate::model::hf::TOKENIZER_FILE))?;
    // Recorded in memory and written here, so a failed write names the file and says why.
    let optimizer_bytes = BinBytesRecorder::<FullPrecisionSettings>::new()
        .record(optimizer, ())
        .map_err(|e| anyhow::anyhow!("cannot encode the optimizer state: {e}"))?;
    crate::files::write_atomic(&partial.join(OPTIMIZER_FILE), &optimizer_bytes)?;
    let ids = params::ids(model).into_iter().map(|(name, id)| (name, id.val())).collect();
    let state = TrainerState {
        progress,
        param_ids: ParamIds::ByName(ids),
        optimizer_crc32c: Some(crc32c::crc32c(&optimizer_bytes)),
    };
    drop(optimizer_bytes);
    crate::files::write_atomic(&partial.join(STATE_FILE), serde_json::to_string(&state)?.as_bytes())?;
    if let Some(hooks) = crate::hooks::installed() {
        hooks.checkpoint_written(progress.step);
    }
    let done = staged.commit()?;
    for old in list(run).into_iter().rev().skip(keep.max(1)) {
        crate::files::remove_dir(&old).with_context(|| format!("cannot remove old checkpoint {}", old.display()))?;
    }
    // A process killed while pruning left its checkpoint under a hidden name no later prune uses.
    crate::files::remove_leftover_removals(&root)
        .with_context(|| format!("cannot remove the leftovers of an earlier pruning in {}", root.display()))?;
    tracing::debug!(path = %done.display(), "checkpoint");
    Ok(done)
}

/// Keep `model` as the run's best, `checkpoints/best/` (a HF directory and `best.json`),
/// replacing the one before; written beside and renamed into place.
pub fn save_best<B: FusedOps, M: CausalLm<B>>(run: &Path, model: &M, tok: &Tok, scored: Scored) -> Result<PathBuf> {
    let root = run.join(CHECKPOINTS_DIR);
    let staged = Staged::new(&root.join(BEST_DIR), root.join(format!(".{BEST_DIR}.partial")))?;
    model.save(staged.path(), Some(tok.eos_id as usize))?;
    tok.save(&staged.path().join(crate::model::hf::TOKENIZER_FILE))?;
    crate::files::write_atomic(&staged.path().join(BEST_FILE), serde_json::to_string_pretty(&scored)?.as_bytes())?;
    let done = staged.commit()?;
    tracing::debug!(step = scored.step, value = scored.value, "kept as the best model");
    Ok(done)
}

/// The run's best model folder and which evaluation it is the model of, if it has one.
pub fn best(run: &Path) -> Result<Option<(PathBuf, Scored)>> {
    let dir = run.join(CHECKPOINTS_DIR).join(BEST_DIR);
    let file = dir.join(BEST_FILE);
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", file.display())),
    };
    let scored = serde_json::from_str(&text).with_context(|| format!("{}: not a best-model record", file.display()))?;
    Ok(Some((dir, scored)))
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

/// A checkpoint's model, with the parameter ids its optimizer state is keyed by, and where
/// training stood; the optimizer record is read by [`load_optimizer`].
pub fn load<B: FusedOps, M: CausalLm<B>>(
    dir: &Path,
    dropout: Option<f64>,
    device: &B::Device,
) -> Result<(M, Progress)> {
    let state = read_state(dir)?;
    let model = with_recorded_ids(M::load(dir, dropout, device)?, state.param_ids, dir)?;
    Ok((model, state.progress))
}

/// `model` (of the checkpoint's architecture) with the weights of checkpoint `dir` and the
/// parameter ids its optimizer state is keyed by, as a stage that goes on from the checkpoint
/// needs it: a model made afresh has ids of its own, which would match none of the states.
pub fn restore<B: FusedOps, M: CausalLm<B>>(model: M, dir: &Path) -> Result<M> {
    let state = read_state(dir)?;
    with_recorded_ids(model.with_weights_of(dir)?, state.param_ids, dir)
}

fn with_recorded_ids<B: FusedOps, M: CausalLm<B>>(model: M, ids: ParamIds, dir: &Path) -> Result<M> {
    let ids = match ids {
        ParamIds::ByName(ids) => ids,
        ParamIds::InVisitingOrder(ids) => {
            let names = params::ids(&model).into_iter().map(|(name, _)| name);
            let count = names.len();
            if count != ids.len() {
                return Err(bad_input(format!(
                    "{}: lists {} parameter ids, the model has {count} parameters",
                    dir.join(STATE_FILE).display(),
                    ids.len()
                )));
            }
            names.zip(ids).collect()
        }
    };
    params::set_ids(model, &ids).map_err(|why| {
        bad_input(format!("{}: does not match the checkpoint's model: {why}", dir.join(STATE_FILE).display()))
    })
}

fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: no trainer state", dir.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: unreadable trainer state", path.display()))
}

/// Where training stood when a checkpoint was taken.
pub fn progress(dir: &Path) -> Result<Progress> {
    Ok(read_state(dir)?.progress)
}

/// The optimizer record saved in a checkpoint.
pub fn load_optimizer<B: Backend, R: burn::record::Record<B>>(dir: &Path, device: &B::Device) -> Result<R> {
    let unreadable = |why: String| {
        let absolute = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        anyhow::anyhow!(
            "{}: cannot read the optimizer state ({why}); its weights still load with model.path = \"{}\"",
            dir.display(),
            absolute.display()
        )
    };
    let file = dir.join(OPTIMIZER_FILE);
    if let Some(expected) = read_state(dir)?.optimizer_crc32c {
        let bytes = std::fs::read(&file).map_err(|e| unreadable(format!("{}: {e}", file.display())))?;
        if crc32c::crc32c(&bytes) != expected {
            return Err(unreadable(format!("{} is damaged: its checksum differs from trainer.json's", file.display())));
        }
    }
    // burn's recorder panics on some damaged records (a tensor whose shape disagrees with its data).
    let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
    let loaded = without_panics(|| recorder.load(dir.join(OPTIMIZER_FILE), device).map_err(|e| e.to_string()));
    loaded.and_then(|loaded| loaded).map_err(|e| unreadable(format!("was it written by another pipe version? {e}")))
}

/// A model folder of a run (a checkpoint, the best model, `final/`) as a reader sees it: hard
/// links to its files, in a hidden folder of the reader's own under `checkpoints/`. Pruning or
/// replacing the folder while it is read then takes nothing from the reader (a file's contents
/// stay until its last link goes, and pipe never rewrites a file in place); the links go when
/// the snapshot is dropped. A reader holds a lock on its snapshot while it lives, so one left by
/// a reader that was killed (and whose links would keep pruned checkpoints on disk) is found
/// unlocked and removed by the run's next reader.
pub struct Snapshot {
    dir: tempfile::TempDir,
    /// The folder, opened and locked (`flock`) for the snapshot's life; the lock goes with the
    /// process however it ends.
    _lock: Option<std::fs::File>,
}

/// How the hidden snapshot folders under `checkpoints/` are named.
const SNAPSHOT_PREFIX: &str = ".reading-";

/// A snapshot this recent is left alone even when unlocked: its reader may not have locked it yet.
const SNAPSHOT_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

impl Snapshot {
    /// Snapshot `dir` of `run`. `Ok(None)` where the run folder cannot take one (a read-only
    /// copy, which nothing prunes either): read `dir` itself. An error of kind `NotFound`
    /// means the folder went while it was linked: resolve it again.
    pub fn of(run: &Path, dir: &Path) -> std::io::Result<Option<Self>> {
        let root = run.join(CHECKPOINTS_DIR);
        let made = std::fs::create_dir_all(&root)
            .and_then(|()| tempfile::Builder::new().prefix(SNAPSHOT_PREFIX).tempdir_in(&root));
        let Ok(snapshot) = made else { return Ok(None) };
        // A file system without locks leaves snapshots unlocked, and then none is ever removed
        // but by its own reader.
        let lock = std::fs::File::open(snapshot.path()).ok().filter(locked);
        remove_abandoned_snapshots(&root, snapshot.path());
        // pipe removes a folder by renaming it away before deleting its files
        // (`files::remove_dir`), so the same folder still under its name after linking means
        // nothing was deleted from it meanwhile: the links are all of it.
        let folder = std::fs::metadata(dir)?;
        link_all(dir, snapshot.path())?;
        let still = std::fs::metadata(dir)?;
        if (still.dev(), still.ino()) != (folder.dev(), folder.ino()) {
            let gone = format!("{} was replaced while it was read", dir.display());
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, gone));
        }
        Ok(Some(Self { dir: snapshot, _lock: lock }))
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Whether this process now holds the exclusive lock of `file` (taken without waiting).
fn locked(file: &std::fs::File) -> bool {
    rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok()
}

/// Remove the snapshots under `root` (but `own`) whose readers are gone: a live reader holds
/// its snapshot's lock. Best effort: a snapshot that cannot be examined or removed stays.
fn remove_abandoned_snapshots(root: &Path, own: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path == own || !entry.file_name().to_string_lossy().starts_with(SNAPSHOT_PREFIX) {
            continue;
        }
        let age = entry.metadata().and_then(|m| m.modified()).map(|t| t.elapsed().unwrap_or_default());
        if !age.is_ok_and(|age| age >= SNAPSHOT_GRACE) {
            continue;
        }
        let Ok(folder) = std::fs::File::open(&path) else { continue };
        // The lock is held while the folder is removed, so no other reader removes it too.
        if locked(&folder) {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Hard-link every file under `from` into `to`, folder by folder.
fn link_all(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            std::fs::create_dir(&target)?;
            link_all(&entry.path(), &target)?;
        } else {
            std::fs::hard_link(entry.path(), &target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The snapshots left under a run's `checkpoints/`, by name.
    fn snapshots(run: &Path) -> Vec<PathBuf> {
        let entries = std::fs::read_dir(run.join(CHECKPOINTS_DIR)).unwrap().map(|e| e.unwrap().path());
        let mut found: Vec<PathBuf> =
            entries.filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(SNAPSHOT_PREFIX)).collect();
        found.sort();
        found
    }

    /// A snapshot whose reader died (its lock gone, its folder kept) `age` ago.
    fn abandoned(run: &Path, model: &Path, age: std::time::Duration) -> PathBuf {
        let Snapshot { dir, _lock } = Snapshot::of(run, model).unwrap().unwrap();
        drop(_lock);
        let path = dir.keep();
        let when = std::time::SystemTime::now() - age;
        std::fs::File::open(&path).unwrap().set_modified(when).unwrap();
        path
    }

    /// A reader killed while it read leaves its snapshot (hard links that would keep pruned
    /// checkpoints on disk); the run's next reader removes it once it is past the grace period,
    /// and never one whose reader still holds it.
    #[test]
    fn snapshots_of_readers_that_died_are_removed_by_the_next_reader() {
        let run = tempfile::tempdir().unwrap();
        let model = run.path().join("final");
        std::fs::create_dir_all(model.join("sub")).unwrap();
        std::fs::write(model.join("model.safetensors"), b"weights").unwrap();
        std::fs::write(model.join("sub/file"), b"more").unwrap();

        let live = Snapshot::of(run.path(), &model).unwrap().unwrap();
        std::fs::File::open(live.path())
            .unwrap()
            .set_modified(std::time::SystemTime::now() - SNAPSHOT_GRACE * 2)
            .unwrap();
        let dead_just_now = abandoned(run.path(), &model, std::time::Duration::ZERO);
        let dead = abandoned(run.path(), &model, SNAPSHOT_GRACE * 2);
        assert_eq!(snapshots(run.path()).len(), 3);

        let next = Snapshot::of(run.path(), &model).unwrap().unwrap();
        assert_eq!(std::fs::read(next.path().join("sub/file")).unwrap(), b"more");
        let mut left = vec![live.path().to_path_buf(), dead_just_now.clone(), next.path().to_path_buf()];
        left.sort();
        assert_eq!(snapshots(run.path()), left, "only {} goes", dead.display());
        assert_eq!(std::fs::read(live.path().join("model.safetensors")).unwrap(), b"weights");

        drop((live, next));
        assert_eq!(snapshots(run.path()), [dead_just_now]);
        assert_eq!(std::fs::read(model.join("model.safetensors")).unwrap(), b"weights", "the model stays");
    }
}
