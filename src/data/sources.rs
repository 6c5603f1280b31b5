//! Which files a spec's data is: `data.path`'s files and globs, and dataset folders read at a
//! split — a `datasets` save_to_disk folder (one split's Arrow files, or a DatasetDict of
//! split folders), or a dataset repo as downloaded from the hub (`data/train-00000-of-00002.parquet`,
//! `train.jsonl`, a `train/` folder, …).

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Deserialize;

use crate::error::bad_input;
use crate::spec::DataSpec;

/// The training data's files, in order: `data.path`'s entries, each folder read at `data.split`.
pub fn train_files(data: &DataSpec) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in data.path.files()? {
        match entry.is_dir() {
            true => files.extend(split_files(&entry, &data.split, "data.split")?),
            false => files.push(entry),
        }
    }
    Ok(files)
}

/// The validation data's files, if the spec names any: `data.val_path` (a folder read at
/// `data.val_split`, or else `data.split`), or `data.val_split` of `data.path`'s folders.
pub fn val_files(data: &DataSpec) -> Result<Option<Vec<PathBuf>>> {
    let (split, field) = match &data.val_split {
        Some(split) => (split.as_str(), "data.val_split"),
        None => (data.split.as_str(), "data.split"),
    };
    match (&data.val_path, &data.val_split) {
        (Some(path), _) if path.is_dir() => Ok(Some(split_files(path, split, field)?)),
        (Some(path), _) => Ok(Some(vec![path.clone()])),
        (None, Some(split)) => {
            let mut files = Vec::new();
            for entry in data.path.files()? {
                if !entry.is_dir() {
                    return Err(bad_input(format!(
                        "data.val_split = {split:?} names a split of a dataset folder, but data.path {} is a file: name the validation file with data.val_path",
                        entry.display()
                    )));
                }
                files.extend(split_files(&entry, split, field)?);
            }
            Ok(Some(files))
        }
        (None, None) => Ok(None),
    }
}

/// The extensions of the files a dataset folder's splits are made of.
const DATA_EXTENSIONS: &[&str] = &["parquet", "arrow", "jsonl", "json", "csv", "txt"];

/// The files of split `split` (asked for by spec field `field`) of dataset folder `dir`.
fn split_files(dir: &Path, split: &str, field: &str) -> Result<Vec<PathBuf>> {
    let at = |why: String| bad_input(format!("{}: {why}", dir.display()));
    if dir.join("dataset_dict.json").is_file() {
        #[derive(Deserialize)]
        struct DatasetDict {
            splits: Vec<String>,
        }
        let dict: DatasetDict = read_json(&dir.join("dataset_dict.json"))?;
        if !dict.splits.iter().any(|s| s == split) {
            return Err(at(format!(
                "a `datasets` folder of the splits {}, not `{split}` ({field})",
                dict.splits.join(", ")
            )));
        }
        let dir = dir.join(split);
        return saved_files(&dir, &saved_state(&dir)?);
    }
    if dir.join("state.json").is_file() {
        let state = saved_state(dir)?;
        match &state.split {
            Some(held) if held != split => {
                return Err(at(format!("a `datasets` folder of the split `{held}`, not `{split}` ({field})")));
            }
            None if field == "data.val_split" => {
                return Err(at(format!(
                    "a `datasets` folder of one unnamed split, so it has no `{split}` ({field}): name the validation data with data.val_path"
                )));
            }
            _ => return saved_files(dir, &state),
        }
    }
    // A dataset repo: the split's files under `data/` (or the folder itself), named
    // `<split>.<ext>` or `<split>-…`/`<split>_…`, or in a folder named for the split.
    let base = match dir.join("data").is_dir() {
        true => dir.join("data"),
        false => dir.to_path_buf(),
    };
    let mut found = Vec::new();
    let mut splits = std::collections::BTreeSet::new();
    for (path, first) in data_files(&base).map_err(|e| at(format!("cannot list the folder: {e}")))? {
        let named = split_name(&first);
        if named == split {
            found.push(path);
        }
        splits.insert(named.to_string());
    }
    if found.is_empty() {
        let held = match splits.is_empty() {
            true => format!("holds no data files ({})", DATA_EXTENSIONS.join(", ")),
            false => format!("holds the splits {}", splits.into_iter().collect::<Vec<_>>().join(", ")),
        };
        return Err(at(format!("no `{split}` split ({field}): the folder {held}")));
    }
    found.sort();
    Ok(found)
}

/// What a `datasets` save_to_disk folder's `state.json` says of it.
#[derive(Deserialize)]
struct SavedState {
    #[serde(rename = "_data_files")]
    data_files: Vec<SavedFile>,
    #[serde(rename = "_split", default)]
    split: Option<String>,
}

#[derive(Deserialize)]
struct SavedFile {
    filename: String,
}

fn saved_state(dir: &Path) -> Result<SavedState> {
    read_json(&dir.join("state.json"))
}

/// The Arrow files of a save_to_disk folder, as its state lists them.
fn saved_files(dir: &Path, state: &SavedState) -> Result<Vec<PathBuf>> {
    let at = |why: String| bad_input(format!("{}: {why}", dir.join("state.json").display()));
    let files = state.data_files.iter().map(|f| {
        let name = Path::new(&f.filename);
        match name.components().count() == 1 && name.file_name().is_some() {
            true => Ok(dir.join(name)),
            false => Err(at(format!("names a data file outside its folder: {:?}", f.filename))),
        }
    });
    let files = files.collect::<Result<Vec<_>>>()?;
    if files.is_empty() {
        return Err(at("names no data files".into()));
    }
    Ok(files)
}

/// The data files in `base` and its folders one level down, each with the first component of
/// its path under `base` (the file's name, or the folder it is in).
fn data_files(base: &Path) -> std::io::Result<Vec<(PathBuf, String)>> {
    let is_data = |path: &Path| {
        path.is_file() && path.extension().and_then(|e| e.to_str()).is_some_and(|e| DATA_EXTENSIONS.contains(&e))
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(base)? {
        let path = entry?.path();
        let first = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if first.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            for inner in std::fs::read_dir(&path)? {
                let inner = inner?.path();
                if is_data(&inner) {
                    files.push((inner, first.clone()));
                }
            }
        } else if is_data(&path) {
            files.push((path, first));
        }
    }
    Ok(files)
}

/// The split a file or folder name is of: the name up to its first `-`, `_` or `.`
/// (`train-00000-of-00002.parquet`, `train.jsonl`, `train/` are all `train`).
fn split_name(name: &str) -> &str {
    name.split(['-', '_', '.']).next().unwrap_or(name)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = crate::files::read_regular_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| bad_input(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::split_name;

    #[test]
    fn files_and_folders_name_their_split() {
        for (name, split) in [
            ("train-00000-of-00002.parquet", "train"),
            ("train.jsonl", "train"),
            ("validation_0.arrow", "validation"),
            ("test", "test"),
        ] {
            assert_eq!(split_name(name), split, "{name}");
        }
    }
}
