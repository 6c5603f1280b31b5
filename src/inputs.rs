//! What a run was made from: a content hash (SHA-256) of each input the user supplied — the
//! datasets, the tokenizer, the base model — recorded in `meta.json` when the run starts and
//! compared when it resumes, so that a run never continues on other data or weights without
//! the user saying so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::files;
use crate::model::{hf, lora};
use crate::spec::{Spec, Stage};

/// One input: where it was read from and the SHA-256 of its contents (of its files in order,
/// each with its length, for the base model's folder and several data files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputHash {
    pub path: PathBuf,
    pub sha256: String,
}

/// A run's inputs, keyed by the spec field that names each (`data.path`, `model.path`, …).
pub type Inputs = BTreeMap<String, InputHash>;

/// The inputs of a spec whose base model (if any) is the HF folder `model_dir`.
pub fn of(spec: &Spec, model_dir: Option<&Path>) -> Result<Inputs> {
    let mut files: Vec<(&str, PathBuf, Vec<PathBuf>)> = Vec::new();
    // A run of the dpo stage alone has no SFT data.
    if !spec.data.path.is_empty() {
        // Several data files are one input: their hashes together, under the paths as named.
        let data_files = crate::data::sources::train_files(&spec.data)?;
        let data = match data_files.as_slice() {
            [one] => (one.clone(), vec![]),
            _ => (PathBuf::from(spec.data.path.display()), data_files),
        };
        files.push(("data.path", data.0, data.1));
        match (&spec.data.val_path, crate::data::sources::val_files(&spec.data)?) {
            (Some(val), Some(parts)) => files.push(("data.val_path", val.clone(), parts)),
            (None, Some(parts)) => files.push(("data.val_split", PathBuf::from(spec.data.path.display()), parts)),
            _ => {}
        }
    }
    match (&spec.tokenizer.path, spec.tokenizer.train_vocab_size, model_dir) {
        (Some(path), _, _) => files.push(("tokenizer.path", path.clone(), vec![])),
        (None, None, Some(dir)) => files.push(("tokenizer", dir.join(hf::TOKENIZER_FILE), vec![])),
        _ => {} // trained on the data, which is hashed
    }
    if let Some(dir) = model_dir {
        let field = if spec.model.path.is_some() { "model.path" } else { "model.hub" };
        files.push((field, dir.to_path_buf(), hf::model_files(dir)?));
    }
    if let Some(dpo) = spec.dpo.as_ref().filter(|_| spec.run.stages.contains(&Stage::Dpo)) {
        files.push(("dpo.path", PathBuf::from(dpo.path.display()), dpo.path.files()?));
        if let Some(val) = &dpo.val_path {
            files.push(("dpo.val_path", PathBuf::from(val.display()), val.files()?));
        }
    }
    if let Some(dir) = spec.lora.as_ref().and_then(|lora| lora.from.as_ref()) {
        let files_of = vec![dir.join(lora::ADAPTER_CONFIG_FILE), dir.join(lora::ADAPTER_WEIGHTS_FILE)];
        files.push(("lora.from", dir.clone(), files_of));
    }
    files
        .into_iter()
        .map(|(field, path, parts)| {
            let parts = if parts.is_empty() { vec![path.clone()] } else { parts };
            Ok((field.to_string(), InputHash { sha256: files::hash_files(&parts)?, path }))
        })
        .collect()
}

/// How `now` differs from what the run recorded, one line per changed input; empty when
/// nothing changed. A run from before inputs were recorded has nothing to compare.
pub fn changes(recorded: &Inputs, now: &Inputs) -> Vec<String> {
    let short = |hash: &str| hash.chars().take(12).collect::<String>();
    recorded
        .iter()
        .filter(|(field, then)| now.get(*field).is_none_or(|input| input.sha256 != then.sha256))
        .map(|(field, then)| {
            let now = now.get(field).map_or("no such input now".to_string(), |i| format!("{}… now", short(&i.sha256)));
            format!(
                "{field} {}: its contents changed since the run started (sha256 {}… then, {now})",
                then.path.display(),
                short(&then.sha256)
            )
        })
        .collect()
}
