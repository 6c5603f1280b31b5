//! The tokenized dataset, cached under the runs folder (`<runs_dir>/.cache/tokenized/`) and
//! keyed by a hash of everything tokenizing depends on: the dataset files' contents, the
//! tokenizer, and the data settings. An entry's first line is the SHA-256 of the rest, so a
//! corrupt or partial entry is detected and rebuilt.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Sequence, TokenizeReport};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tokenized {
    pub train: Vec<Sequence>,
    pub val: Vec<Sequence>,
    pub report: TokenizeReport,
}

/// Where the entry for these inputs lives: parts are hashed with their lengths, so no two
/// different lists of parts share a key.
pub fn entry_path(runs_dir: &Path, parts: &[&[u8]]) -> PathBuf {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    runs_dir.join(".cache").join("tokenized").join(format!("{}.json", hex(&hasher.finalize())))
}

/// The cached tokenized data, if the entry exists and is intact.
pub fn load(path: &Path) -> Option<Tokenized> {
    let text = std::fs::read_to_string(path).ok()?;
    let (checksum, payload) = text.split_once('\n')?;
    if hex(&Sha256::digest(payload.as_bytes())) != checksum {
        tracing::warn!(path = %path.display(), "the tokenized cache entry is corrupt; rebuilding it");
        return None;
    }
    serde_json::from_str(payload).ok()
}

pub fn store(path: &Path, tokenized: &Tokenized) -> Result<()> {
    let payload = serde_json::to_string(tokenized)?;
    let text = format!("{}\n{payload}", hex(&Sha256::digest(payload.as_bytes())));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::run_dir::write_atomic(path, text.as_bytes())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
