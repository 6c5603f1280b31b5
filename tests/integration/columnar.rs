//! Datasets as the hub ships them: Parquet files (each compression, string type and row-group
//! layout pyarrow writes), `datasets` save_to_disk folders, and downloaded dataset repos, read
//! at a split. The fixtures are written by pyarrow and `datasets`
//! (`scripts/make_columnar_fixtures.py`), each beside the same records as JSONL; every
//! columnar file must read as the same examples as its JSONL twin.

use std::path::{Path, PathBuf};

use crate::common::{pipe, repo, stderr, stdout};
use pipe::data::records::{self, Record};
use pipe::data::sources;
use pipe::error::is_bad_input;
use pipe::spec::DataSpec;

fn fixtures() -> PathBuf {
    repo().join("tests/fixtures/columnar")
}

/// A data section as the spec would give it, from TOML lines.
fn data_spec(extra: &str) -> DataSpec {
    let text = format!("[run]\nname = \"t\"\n[data]\npath = \"unused\"\n{extra}\n[model]\npath = \"m\"\n");
    toml::from_str::<pipe::spec::Spec>(&text).unwrap().data
}

/// The records of `files` with their line (a columnar file's row), in order.
fn records_of(files: &[PathBuf], spec: &DataSpec) -> Vec<(Record, usize)> {
    records::read_all(files, spec).unwrap().into_iter().map(|e| (e.record, e.line)).collect()
}

/// The records alone.
fn just_records(files: &[PathBuf], spec: &DataSpec) -> Vec<Record> {
    records_of(files, spec).into_iter().map(|(record, _)| record).collect()
}

fn read_error(path: &Path, spec: &DataSpec) -> String {
    let error = records::read(path, spec).unwrap_err();
    assert!(is_bad_input(&error), "{error:#}");
    format!("{error:#}")
}

#[test]
fn parquet_reads_as_jsonl_does_for_every_kind() {
    let f = fixtures();
    let pairs = data_spec("");
    let want = records_of(&[f.join("pairs.jsonl")], &pairs);
    assert_eq!(want.len(), 20);
    for name in ["snappy", "zstd", "gzip", "lz4", "brotli", "none", "large-and-view", "dictionary"] {
        // Several row groups (six rows each) and the `id` and `scores` columns pipe does not read.
        let file = f.join(format!("pairs-{name}.parquet"));
        assert_eq!(records_of(&[file], &pairs), want, "{name}");
    }
    // Arrow IPC's file format (Feather v2), in batches of seven rows, uncompressed or compressed.
    for name in ["pairs.feather", "pairs-lz4.feather", "pairs-zstd.arrow"] {
        assert_eq!(records_of(&[f.join(name)], &pairs), want, "{name}");
    }
    for (file, jsonl, extra) in [
        ("alpaca.parquet", "alpaca.jsonl", "kind = \"alpaca\""),
        ("chat.parquet", "chat.jsonl", "kind = \"chat\""),
        ("chat-large-list.parquet", "chat.jsonl", "kind = \"chat\""),
        ("text.parquet", "text.jsonl", "kind = \"text\""),
    ] {
        let spec = data_spec(extra);
        let want = records_of(&[f.join(jsonl)], &spec);
        assert!(want.len() > 5, "{jsonl}");
        assert_eq!(records_of(&[f.join(file)], &spec), want, "{file}");
    }
    // ShareGPT's conversations in a list-of-struct column of {from, value}.
    let sharegpt = data_spec("kind = \"chat\"\nmessages_field = \"conversations\"");
    assert_eq!(
        just_records(&[f.join("sharegpt.parquet")], &sharegpt),
        just_records(&[f.join("chat.jsonl")], &data_spec("kind = \"chat\""))
    );
    // data.format names the format where the extension does not.
    let dir = tempfile::tempdir().unwrap();
    let renamed = dir.path().join("pairs.data");
    std::fs::copy(f.join("pairs-zstd.parquet"), &renamed).unwrap();
    assert_eq!(records_of(std::slice::from_ref(&renamed), &data_spec("format = \"parquet\"")), want_pairs());
}

fn want_pairs() -> Vec<(Record, usize)> {
    records_of(&[fixtures().join("pairs.jsonl")], &data_spec(""))
}

#[test]
fn columnar_errors_name_the_file_the_column_and_what_it_holds() {
    let f = fixtures();
    let pairs = data_spec("");
    let missing = read_error(&f.join("pairs-snappy.parquet"), &data_spec("prompt_field = \"question\""));
    assert!(
        missing.contains("pairs-snappy.parquet: no column `question`")
            && missing.contains("`id`, `prompt`, `response`, `scores`"),
        "{missing}"
    );
    let mistyped = read_error(&f.join("int-prompt.parquet"), &pairs);
    assert!(mistyped.contains("int-prompt.parquet: column `prompt` holds Int64, not text"), "{mistyped}");
    let null = read_error(&f.join("null-response.parquet"), &pairs);
    assert!(null.contains("null-response.parquet:2: field `response` is null"), "{null}");
    // Chat records need a list of turns, and ShareGPT's column is pointed out.
    let chat = data_spec("kind = \"chat\"");
    let not_turns =
        read_error(&f.join("pairs-snappy.parquet"), &data_spec("kind = \"chat\"\nmessages_field = \"prompt\""));
    assert!(not_turns.contains("column `prompt` holds Utf8, not a list of turns"), "{not_turns}");
    let sharegpt = read_error(&f.join("sharegpt.parquet"), &chat);
    assert!(sharegpt.contains("set data.messages_field = \"conversations\""), "{sharegpt}");
    // A damaged file: cut short, its footer overwritten, or not Parquet at all.
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(f.join("pairs-snappy.parquet")).unwrap();
    let mut footer = bytes.clone();
    let at = footer.len() - 20;
    footer[at..at + 8].copy_from_slice(b"garbage!");
    for (name, damaged) in [
        ("cut.parquet", bytes[..bytes.len() / 2].to_vec()),
        ("footer.parquet", footer),
        ("json.parquet", b"{}\n".to_vec()),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, damaged).unwrap();
        let message = read_error(&path, &pairs);
        assert!(message.contains(&format!("{name}: not a readable Parquet file")), "{message}");
    }
    // An Arrow file cut short.
    let arrow = std::fs::read(f.join("saved-dataset/data-00000-of-00002.arrow")).unwrap();
    let path = dir.path().join("cut.arrow");
    std::fs::write(&path, &arrow[..arrow.len() - 100]).unwrap();
    let message = read_error(&path, &pairs);
    assert!(message.contains("cut.arrow: not a readable Arrow file"), "{message}");
}

#[test]
fn datasets_folders_and_hub_repos_are_read_at_their_split() {
    let f = fixtures();
    let test = just_records(&[f.join("pairs-test.jsonl")], &data_spec(""));
    let train: Vec<Record> = want_pairs().into_iter().map(|(record, _)| record).collect();
    for (folder, val_split) in
        [("saved-dataset", None), ("saved-dataset-dict", Some("test")), ("hub-repo", Some("test"))]
    {
        let mut spec = data_spec("");
        spec.path = f.join(folder).into();
        spec.val_split = val_split.map(String::from);
        let files = sources::train_files(&spec).unwrap();
        assert_eq!(just_records(&files, &spec), train, "{folder}: train");
        match sources::val_files(&spec).unwrap() {
            Some(val) => assert_eq!(just_records(&val, &spec), test, "{folder}: test"),
            None => assert!(val_split.is_none()),
        }
    }
    // The hub repo's shards are read in order, and a glob over them reads the same.
    let mut spec = data_spec("");
    spec.path = pipe::spec::DataPaths(vec![f.join("hub-repo/data/train-*.parquet")]);
    let files = sources::train_files(&spec).unwrap();
    assert_eq!(files.len(), 2);
    assert_eq!(just_records(&files, &spec), train);
    // A split the folder does not have is named with those it has.
    let refused = |folder: &str, split: &str, val_split: Option<&str>| {
        let mut spec = data_spec("");
        spec.path = f.join(folder).into();
        spec.split = split.into();
        spec.val_split = val_split.map(String::from);
        let error = sources::train_files(&spec).and_then(|_| sources::val_files(&spec)).unwrap_err();
        assert!(is_bad_input(&error));
        format!("{error:#}")
    };
    let message = refused("hub-repo", "validation", None);
    assert!(
        message.contains("no `validation` split (data.split): the folder holds the splits test, train"),
        "{message}"
    );
    let message = refused("saved-dataset-dict", "train", Some("validation"));
    assert!(message.contains("of the splits train, test, not `validation` (data.val_split)"), "{message}");
    let message = refused("saved-dataset", "train", Some("test"));
    assert!(message.contains("one unnamed split"), "{message}");
    let message = refused("pairs.jsonl", "train", Some("test"));
    assert!(message.contains("is a file: name the validation file with data.val_path"), "{message}");
}

/// `pipe data` on a hub repo folder with its test split for validation: every training row is
/// an example, the test split is the validation set, and the input hashes cover every shard.
#[test]
fn a_dataset_folder_prepares_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let spec = crate::common::spec(&format!(
        "[data]\npath = {:?}\nval_split = \"test\"\n",
        fixtures().join("hub-repo").display().to_string()
    ));
    std::fs::write(dir.path().join("spec.toml"), spec).unwrap();
    let out = pipe(dir.path(), &["data", "spec.toml", "-n", "1"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("--- 20 examples -> 20 training sequences"), "{}", stdout(&out));
    assert!(stdout(&out).contains("4 validation sequences"), "{}", stdout(&out));
}
