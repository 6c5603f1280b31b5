//! Files written whole or not at all, and files' content hashes: what every floor of pipe that
//! writes or compares files shares.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::error::bad_input;

/// Write `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |file| Ok(file.write_all(bytes)?))
}

/// Write `path` with `write` through a temporary file in the same folder and a rename, so a
/// write that fails (or a process killed) leaves no `path` that looks complete.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut std::io::BufWriter<File>) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path.file_name().context("a file path has a name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = || -> Result<()> {
        let mut file = std::io::BufWriter::new(File::create(&tmp)?);
        write(&mut file)?;
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(fs::rename(&tmp, path)?)
    };
    written().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        anyhow::anyhow!("cannot write {}: {e:#}", path.display())
    })
}

/// Open `path` to read, if it is a regular file (or a link to one). Anything else is refused,
/// naming what it is: a device (`/dev/zero`) never ends, a FIFO can be read only once (and
/// opening it waits for a writer), a folder is no file.
pub fn open_regular(path: &Path) -> Result<File> {
    let cannot = |e: std::io::Error| bad_input(format!("{}: cannot read: {e}", path.display()));
    let kind = fs::metadata(path).map_err(cannot)?.file_type();
    if !kind.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let what = match () {
            _ if kind.is_dir() => "a folder",
            _ if kind.is_char_device() => "a character device",
            _ if kind.is_block_device() => "a block device",
            _ if kind.is_fifo() => "a FIFO (named pipe)",
            _ if kind.is_socket() => "a socket",
            _ => "not a file",
        };
        return Err(bad_input(format!("{}: is {what}; pipe reads its inputs from regular files only", path.display())));
    }
    File::open(path).map_err(cannot)
}

/// Whether `path` is free to write a folder of outputs into: absent, or an empty folder (a
/// file, or a folder that cannot be read, is not).
pub fn absent_or_empty(path: &Path) -> bool {
    !path.exists() || fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_none())
}

/// The text of the regular file `path` (see [`open_regular`]).
pub fn read_regular_to_string(path: &Path) -> Result<String> {
    let mut text = String::new();
    open_regular(path)?
        .read_to_string(&mut text)
        .map_err(|e| bad_input(format!("{}: cannot read: {e}", path.display())))?;
    Ok(text)
}

/// The SHA-256 of the files' contents (each with its length), read a block at a time.
pub fn hash_files(paths: &[PathBuf]) -> Result<String> {
    let mut hasher = Sha256::new();
    for path in paths {
        let cannot = |e: std::io::Error| bad_input(format!("{}: cannot read: {e}", path.display()));
        let mut file = open_regular(path)?;
        hasher.update(file.metadata().map_err(cannot)?.len().to_le_bytes());
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buffer).map_err(cannot)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Remove the folder `dir`: renamed to a hidden name beside it first, then deleted, so that a
/// reader never finds a half-deleted folder under its name (`checkpoint::Snapshot` relies on
/// it). A leftover of a process killed between the two is removed by the next removal of a
/// folder of the same name, or by [`remove_leftover_removals`].
pub fn remove_dir(dir: &Path) -> std::io::Result<()> {
    let removing = removing_name(dir);
    if removing.exists() {
        fs::remove_dir_all(&removing)?;
    }
    fs::rename(dir, &removing)?;
    fs::remove_dir_all(&removing)
}

/// How [`remove_dir`] names a folder it is deleting: `.NAME` followed by this, beside it.
const REMOVING_SUFFIX: &str = ".removing";

/// Where [`remove_dir`] moves `dir` before deleting it.
fn removing_name(dir: &Path) -> PathBuf {
    let name = dir.file_name().map_or_else(Default::default, |n| n.to_string_lossy().into_owned());
    dir.with_file_name(format!(".{name}{REMOVING_SUFFIX}"))
}

/// Remove every folder in `parent` that a process killed inside [`remove_dir`] left under its
/// hidden name: no reader looks there (readers go by the visible names), and a folder whose
/// name never comes back (a pruned checkpoint's step) would otherwise keep its disk forever.
/// Only for a folder whose removals one process makes at a time (a run's, under its lock).
pub fn remove_leftover_removals(parent: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(parent)? {
        let path = entry?.path();
        let leftover = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            n.strip_prefix('.').and_then(|n| n.strip_suffix(REMOVING_SUFFIX)).is_some_and(|n| !n.is_empty())
        });
        if leftover && path.is_dir() {
            fs::remove_dir_all(&path)?;
        }
    }
    Ok(())
}

/// A folder written under a hidden name beside where it belongs and renamed into place once
/// complete: dropped before [`Staged::commit`] (a failed write, a full disk), it is removed,
/// so no half-written folder is left behind or looks complete.
pub struct Staged {
    staging: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl Staged {
    /// Stage `target` in `staging` (a leftover of a killed process there is removed first).
    pub fn new(target: &Path, staging: PathBuf) -> Result<Self> {
        if staging.exists() {
            fs::remove_dir_all(&staging).with_context(|| format!("cannot remove {}", staging.display()))?;
        }
        fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
        Ok(Self { staging, target: target.to_path_buf(), committed: false })
    }

    /// Where to write the folder's files.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Move the written folder into place, replacing what was there. Where the file system
    /// can swap two folders at once, the old one is swapped out (to the hidden staging name,
    /// then deleted), so a reader never finds the name missing; elsewhere the old one is
    /// removed first (`remove_dir`), and the name is missing for a moment.
    pub fn commit(mut self) -> Result<PathBuf> {
        let cannot_replace = || format!("cannot replace {}", self.target.display());
        match exchange(&self.staging, &self.target) {
            Ok(()) => {
                self.committed = true;
                fs::remove_dir_all(&self.staging).with_context(cannot_replace)?;
                return Ok(self.target.clone());
            }
            // Nothing there yet, or no atomic swap on this file system: below.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL | libc::ENOSYS | libc::ENOTSUP)) => {}
            Err(e) => return Err(e).with_context(cannot_replace),
        }
        if self.target.exists() {
            remove_dir(&self.target).with_context(cannot_replace)?;
        }
        fs::rename(&self.staging, &self.target)
            .with_context(|| format!("cannot move {} into place", self.target.display()))?;
        self.committed = true;
        Ok(self.target.clone())
    }
}

/// Swap the folders `a` and `b` in one step (both must exist).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE).map_err(std::io::Error::from)
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.staging);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A folder replaced again and again while another thread looks for it: where the file
    /// system can swap folders at once (Linux's tmpfs, ext4, xfs, btrfs), the reader never finds
    /// the name missing; everywhere, each replacement leaves the new folder whole and nothing
    /// else behind.
    #[test]
    fn a_replaced_folder_is_never_missing_under_its_name() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("best");
        let staging = root.path().join(".best.partial");
        let write = |round: usize| {
            let staged = Staged::new(&target, staging.clone()).unwrap();
            for file in 0..20 {
                fs::write(staged.path().join(format!("part-{file}")), round.to_string()).unwrap();
            }
            staged.commit().unwrap();
        };
        write(0);
        let swaps = {
            let (a, b) = (root.path().join("a"), root.path().join("b"));
            fs::create_dir(&a).unwrap();
            fs::create_dir(&b).unwrap();
            let swaps = exchange(&a, &b).is_ok();
            fs::remove_dir(&a).unwrap();
            fs::remove_dir(&b).unwrap();
            swaps
        };
        let (done, missing) = (AtomicBool::new(false), AtomicUsize::new(0));
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    if !target.is_dir() {
                        missing.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            for round in 1..=200 {
                write(round);
            }
            done.store(true, Ordering::Relaxed);
        });
        for file in 0..20 {
            assert_eq!(fs::read_to_string(target.join(format!("part-{file}"))).unwrap(), "200");
        }
        let names: Vec<_> = fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["best"], "only the folder is left");
        if swaps {
            assert_eq!(missing.load(Ordering::Relaxed), 0, "the reader found the folder missing");
        } else {
            eprintln!(
                "this file system cannot swap folders at once: the folder was missing {} times",
                missing.into_inner()
            );
        }
    }
}
