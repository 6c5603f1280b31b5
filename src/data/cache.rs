//! The tokenized dataset, cached under the runs folder (`<runs_dir>/.cache/tokenized/`) and
//! keyed by a hash of everything tokenizing depends on: the dataset files' contents, the
//! tokenizer, and the data settings.
//!
//! An entry is one binary file that training memory-maps (`Examples::Mapped`):
//!
//! ```text
//! 0..8      magic "PIPETOK" and the format version
//! 8..40     SHA-256 of everything after it (a corrupt or partial entry is rebuilt)
//! 40..48    header length H, then H bytes of JSON header: the report, the validation
//!           sequences, the training sequences' count and tokens; zero padding to 8 bytes
//! ...       count + 1 token offsets (u64), the token ids (u32), the trained flags (u8)
//! ```
//!
//! It is written while tokenizing, sequence by sequence, beside its final name and renamed
//! into place, so an entry is never modified once it exists.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;

use super::examples::{Examples, Mapped};
use super::{Sequence, TokenizeReport};

const MAGIC: &[u8; 8] = b"PIPETOK\x01";
const PREFIX: usize = 8 + 32 + 8;

/// A tokenized dataset: the training set (mapped from the entry when read from the cache),
/// the validation set and the report.
pub struct Tokenized {
    pub train: Examples,
    pub val: Vec<Sequence>,
    pub report: TokenizeReport,
}

#[derive(Serialize, Deserialize)]
struct Header {
    report: TokenizeReport,
    val: Vec<Sequence>,
    count: usize,
    tokens: usize,
}

/// Where the entry for these inputs lives: parts are hashed with their lengths, so no two
/// different lists of parts share a key.
pub fn entry_path(runs_dir: &Path, parts: &[&[u8]]) -> PathBuf {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    runs_dir.join(".cache").join("tokenized").join(format!("{}.tok", hex(&hasher.finalize())))
}

/// The cached tokenized data, if the entry exists and is intact.
pub fn load(path: &Path) -> Option<Tokenized> {
    let mut file = File::open(path).ok()?;
    let mut prefix = [0u8; PREFIX];
    file.read_exact(&mut prefix).ok()?;
    if &prefix[..8] != MAGIC {
        return None;
    }
    // The checksum is read through the file, not the map, so checking it does not pull the
    // whole entry into this process's memory.
    let mut hasher = Sha256::new();
    file.seek(SeekFrom::Start(40)).ok()?;
    std::io::copy(&mut BufReader::with_capacity(1 << 20, &mut file), &mut hasher).ok()?;
    if hasher.finalize()[..] != prefix[8..40] {
        tracing::warn!(path = %path.display(), "the tokenized cache entry is corrupt; rebuilding it");
        return None;
    }
    let header_len = u64::from_le_bytes(prefix[40..48].try_into().ok()?) as usize;
    // SAFETY: entries are written under another name and renamed into place, never modified
    // afterwards (a rebuild renames a new file over the name; this map keeps the old inode),
    // so the mapped bytes do not change while the map lives.
    let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    let header: Header = serde_json::from_slice(map.get(PREFIX..PREFIX + header_len)?).ok()?;
    let offsets_at = (PREFIX + header_len).next_multiple_of(8);
    let ids_at = offsets_at + 8 * (header.count + 1);
    let trained_at = ids_at + 4 * header.tokens;
    if map.len() != trained_at + header.tokens {
        return None;
    }
    let offset = |i: usize| u64::from_le_bytes(map[offsets_at + 8 * i..offsets_at + 8 * i + 8].try_into().expect("8"));
    let ordered = (0..header.count).all(|i| offset(i) <= offset(i + 1));
    if offset(0) != 0 || !ordered || offset(header.count) as usize != header.tokens {
        return None;
    }
    let mapped = Mapped { map, count: header.count, offsets_at, ids_at, trained_at };
    Some(Tokenized { train: Examples::Mapped(Arc::new(mapped)), val: header.val, report: header.report })
}

/// Writes an entry while the training sequences arrive; `finish` puts it in place. Every file
/// it writes has a name of its own (two processes preparing the same entry do not collide: the
/// last rename wins, with the same bytes) and is removed if the writer is dropped unfinished.
pub struct Writer {
    path: PathBuf,
    ids: Staging,
    trained: Staging,
    offsets: Vec<u64>,
}

/// A staging file of the entry: unique, buffered, removed when dropped.
struct Staging {
    file: BufWriter<NamedTempFile>,
}

impl Staging {
    fn new(dir: &Path) -> Result<Self> {
        let file = tempfile::Builder::new()
            .prefix(".staging-")
            .tempfile_in(dir)
            .with_context(|| format!("cannot create a file in {}", dir.display()))?;
        Ok(Self { file: BufWriter::with_capacity(1 << 20, file) })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let written = self.file.write_all(bytes);
        written.with_context(|| format!("cannot write {}", self.file.get_ref().path().display()))
    }

    /// The written file, flushed to disk.
    fn finish(self) -> Result<NamedTempFile> {
        let file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.as_file().sync_all().with_context(|| format!("cannot write {}", file.path().display()))?;
        Ok(file)
    }
}

impl Writer {
    pub fn create(path: &Path) -> Result<Self> {
        let dir = path.parent().context("a cache entry has a folder")?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self { path: path.to_path_buf(), ids: Staging::new(dir)?, trained: Staging::new(dir)?, offsets: vec![0] })
    }

    pub fn push(&mut self, sequence: &Sequence) -> Result<()> {
        let ids: Vec<u8> = sequence.ids.iter().flat_map(|id| id.to_le_bytes()).collect();
        self.ids.write(&ids)?;
        self.trained.write(&sequence.trained.iter().map(|&t| t as u8).collect::<Vec<_>>())?;
        self.offsets.push(self.offsets.last().expect("starts with 0") + sequence.ids.len() as u64);
        Ok(())
    }

    /// Write the entry (header, offsets, then the staged ids and flags), checksummed, and
    /// rename it into place.
    pub fn finish(self, val: Vec<Sequence>, report: TokenizeReport) -> Result<()> {
        let Self { path, ids, trained, offsets } = self;
        let staged = [ids.finish()?, trained.finish()?];
        let count = offsets.len() - 1;
        let tokens = *offsets.last().expect("starts with 0") as usize;
        let header = serde_json::to_vec(&Header { report, val, count, tokens })?;
        let dir = path.parent().context("a cache entry has a folder")?;
        let mut out = Staging::new(dir)?;
        let mut hasher = Sha256::new();
        let mut put = |out: &mut Staging, bytes: &[u8]| -> Result<()> {
            hasher.update(bytes);
            out.write(bytes)
        };
        out.write(MAGIC)?;
        out.write(&[0u8; 32])?;
        put(&mut out, &(header.len() as u64).to_le_bytes())?;
        put(&mut out, &header)?;
        put(&mut out, &vec![0u8; (PREFIX + header.len()).next_multiple_of(8) - PREFIX - header.len()])?;
        for offset in &offsets {
            put(&mut out, &offset.to_le_bytes())?;
        }
        for staged in &staged {
            let mut reader = BufReader::with_capacity(1 << 20, staged.reopen()?);
            let mut buffer = vec![0u8; 1 << 20];
            loop {
                let n = reader.read(&mut buffer)?;
                if n == 0 {
                    break;
                }
                put(&mut out, &buffer[..n])?;
            }
        }
        let mut file = out.finish()?;
        let written = file.path().to_path_buf();
        let checksum = |file: &mut NamedTempFile| -> std::io::Result<()> {
            file.seek(SeekFrom::Start(8))?;
            file.write_all(&hasher.finalize())?;
            file.as_file().sync_all()
        };
        checksum(&mut file).with_context(|| format!("cannot write {}", written.display()))?;
        file.persist(&path).with_context(|| format!("cannot move the tokenized data into {}", path.display()))?;
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
