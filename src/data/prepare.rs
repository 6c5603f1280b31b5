//! Preparing a spec's data: read the records, split off the validation set, load or train the
//! tokenizer, tokenize (through the cache), and check the result against the model's
//! vocabulary and context.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::{
    cache, pack, prompt_layout, records, tokenize, tokenize_into, Example, Examples, JinjaTemplate, PromptLayout,
    Sequence, Tok, TokenizeReport, TokenizeSettings,
};
use crate::error::bad_input;
use crate::model::hf;
use crate::spec::{DataKind, ModelSpec, Spec};

/// The tokenizer and the tokenized train and validation sets of a spec.
pub struct PreparedData {
    pub tok: Tok,
    /// Read in place from the tokenized cache (unless packed, or the cache cannot be written).
    pub train: Examples,
    pub val: Vec<Sequence>,
    pub report: TokenizeReport,
    /// The HuggingFace directory the model comes from, if the spec names one.
    pub model_dir: Option<PathBuf>,
    /// How prompts are laid out for generation, as the data was.
    pub layout: PromptLayout,
    /// With `train.packing`: how the training examples were packed.
    pub packing: Option<PackingReport>,
}

/// What packing made of the training examples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PackingReport {
    pub examples: usize,
    /// Packed sequences.
    pub sequences: usize,
    /// Tokens over the packed sequences' room (sequences × max_length).
    pub fill: f64,
}

impl PreparedData {
    /// Read, split and tokenize the spec's data (from the tokenized cache when the inputs are
    /// unchanged), checking it against the model's vocabulary and context.
    pub fn prepare(spec: &Spec, tokenizer: Option<&Path>) -> Result<Self> {
        let model_dir = model_dir(&spec.model)?;
        // The records are read only when needed: to train a tokenizer, or to tokenize (a
        // cache hit needs neither, so reading a large cached dataset costs no memory).
        let read_examples = || -> Result<(Vec<Example>, Vec<Example>, PathBuf)> {
            let train_examples = records::read(&spec.data.path, &spec.data)?;
            Ok(match &spec.data.val_path {
                Some(path) => (train_examples, records::read(path, &spec.data)?, path.clone()),
                None => {
                    let (train, val) = split(train_examples, spec.data.val_fraction, spec.run.seed);
                    (train, val, spec.data.path.clone())
                }
            })
        };
        let mut examples = None;
        let tokenizer_path = tokenizer.map(Path::to_path_buf).or_else(|| spec.tokenizer.path.clone());
        let (tok, tok_origin) = match (&tokenizer_path, spec.tokenizer.train_vocab_size, &model_dir) {
            (Some(path), _, _) => (Tok::load(path)?, path.display().to_string()),
            (None, Some(vocab), _) => {
                tracing::info!(vocab, "training a byte-level BPE tokenizer on the training data");
                let (train_examples, ..) = examples.insert(read_examples()?);
                let tok = Tok::train(train_examples.iter().flat_map(Example::texts), vocab)?;
                if tok.vocab_size() < vocab {
                    tracing::warn!(
                        asked = vocab,
                        learned = tok.vocab_size(),
                        "the training texts support fewer BPE merges than asked"
                    );
                }
                (tok, "trained on data.path".to_string())
            }
            (None, None, Some(dir)) => {
                let path = dir.join(hf::TOKENIZER_FILE);
                (Tok::load(&path)?, path.display().to_string())
            }
            (None, None, None) => unreachable!("validated: a new model names its tokenizer"),
        };
        let (vocab_size, context) = match &model_dir {
            Some(dir) => {
                let config = hf::read_config(dir)?;
                (config.vocab_size, config.n_positions)
            }
            None => (tok.vocab_size(), spec.model.context.expect("validated: a new model has a context")),
        };
        if tok.vocab_size() > vocab_size {
            return Err(bad_input(format!(
                "the tokenizer ({tok_origin}) has {} tokens but the model's vocabulary has {vocab_size}{}: use the tokenizer the model was trained with",
                tok.vocab_size(),
                model_dir.as_ref().map(|d| format!(" ({})", d.display())).unwrap_or_default()
            )));
        }
        let max_length = spec.train.max_length.unwrap_or(context);
        if max_length > context {
            return Err(bad_input(format!(
                "train.max_length = {max_length} is longer than the model's context of {context} positions"
            )));
        }
        // `hf` reads the template beside the tokenizer: the spec's, or the model's.
        let tokenizer_dir = tokenizer_path.as_deref().and_then(Path::parent).or(model_dir.as_deref());
        let chat = match spec.data.kind {
            DataKind::Chat => JinjaTemplate::resolve(&spec.data.chat_template, tokenizer_dir, &tok)?,
            _ => None,
        };
        let layout = prompt_layout(&spec.data, chat.as_ref())?;
        let entry = cache_entry(spec, &tok, chat.as_ref(), max_length)?;
        let tokenized = match cache::load(&entry) {
            Some(cached) => {
                tracing::info!(path = %entry.display(), "reusing the tokenized data from the cache");
                cached
            }
            None => {
                let (train_examples, val_examples, val_origin) = match examples.take() {
                    Some(examples) => examples,
                    None => read_examples()?,
                };
                let (data, loss_on) = (&spec.data, spec.train.loss_on);
                let settings =
                    TokenizeSettings { tok: &tok, data, chat: chat.as_ref(), max_length, loss_on, origin: &data.path };
                let (val, _) = tokenize(&val_examples, &tok, data, chat.as_ref(), max_length, loss_on, &val_origin)?;
                match cache::Writer::create(&entry) {
                    Ok(mut writer) => {
                        let report = tokenize_into(&train_examples, &settings, |sequence| writer.push(&sequence))?;
                        writer.finish(val, report).context("cannot write the tokenized cache")?;
                        tracing::info!(path = %entry.display(), "tokenized the data and cached it");
                        cache::load(&entry).with_context(|| format!("{}: cannot read back", entry.display()))?
                    }
                    Err(e) => {
                        tracing::warn!("could not cache the tokenized data: {e:#}; keeping it in memory");
                        let mut train = Vec::new();
                        let report = tokenize_into(&train_examples, &settings, |sequence| {
                            train.push(sequence);
                            Ok(())
                        })?;
                        cache::Tokenized { train: train.into(), val, report }
                    }
                }
            }
        };
        if tokenized.train.is_empty() {
            return Err(bad_input(format!(
                "{}: no training sequences are left after tokenizing",
                spec.data.path.display()
            )));
        }
        let (train, packing) = match spec.train.packing {
            true => {
                let packed = pack(&tokenized.train.iter().collect::<Vec<_>>(), max_length);
                let tokens: usize = packed.iter().map(|s| s.ids.len()).sum();
                let fill = tokens as f64 / (packed.len() * max_length) as f64;
                let report = PackingReport { examples: tokenized.train.len(), sequences: packed.len(), fill };
                tracing::info!(
                    examples = report.examples,
                    sequences = report.sequences,
                    fill = format!("{fill:.3}"),
                    "packed"
                );
                (packed.into(), Some(report))
            }
            false => (tokenized.train, None),
        };
        Ok(Self { tok, train, val: tokenized.val, report: tokenized.report, model_dir, layout, packing })
    }
}

/// The cache entry for a spec's data: the dataset files' bytes, the tokenizer, the chat
/// template's text, and every setting that changes the tokenized result (paths themselves do not).
fn cache_entry(spec: &Spec, tok: &Tok, chat: Option<&JinjaTemplate>, max_length: usize) -> Result<PathBuf> {
    // Hashed as they are read: a large dataset is never held whole for its key.
    let hash = |p: &Path| crate::inputs::hash_files(&[p.to_path_buf()]);
    let train = hash(&spec.data.path)?;
    let val = spec.data.val_path.as_deref().map(hash).transpose()?.unwrap_or_default();
    let tokenizer = tok.inner.to_string(false).map_err(|e| anyhow::anyhow!("cannot serialise the tokenizer: {e}"))?;
    let mut data = spec.data.clone();
    data.path = PathBuf::new();
    data.val_path = None;
    let settings = format!(
        "{}\nseed={} max_length={max_length} loss_on={:?} version={}",
        toml::to_string(&data)?,
        spec.run.seed,
        spec.train.loss_on,
        env!("CARGO_PKG_VERSION")
    );
    let template = chat.map(serde_json::to_string).transpose()?.unwrap_or_default();
    let parts: [&[u8]; 5] =
        [train.as_bytes(), val.as_bytes(), tokenizer.as_bytes(), settings.as_bytes(), template.as_bytes()];
    Ok(cache::entry_path(&spec.run.runs_dir, &parts))
}

/// The HF directory a spec's model comes from, if it names one.
fn model_dir(model: &ModelSpec) -> Result<Option<PathBuf>> {
    match (&model.path, &model.hub) {
        (Some(path), _) => {
            if !path.join(hf::CONFIG_FILE).is_file() {
                return Err(bad_input(format!("model.path {}: no {} there", path.display(), hf::CONFIG_FILE)));
            }
            Ok(Some(path.clone()))
        }
        (None, Some(id)) => hf::resolve_hub_model(id).map(Some),
        (None, None) => Ok(None),
    }
}

/// Hold out `fraction` of the examples for validation, chosen by a seeded shuffle (at least
/// one when the fraction is positive and there are two or more examples).
fn split(mut examples: Vec<Example>, fraction: f64, seed: u64) -> (Vec<Example>, Vec<Example>) {
    if fraction <= 0.0 || examples.len() < 2 {
        return (examples, Vec::new());
    }
    let n_val = ((examples.len() as f64 * fraction).round() as usize).clamp(1, examples.len() - 1);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let val_set: std::collections::HashSet<usize> = order[..n_val].iter().copied().collect();
    let mut val = Vec::with_capacity(n_val);
    let mut i = 0;
    examples.retain(|e| {
        let held_out = val_set.contains(&i);
        if held_out {
            val.push(e.clone());
        }
        i += 1;
        !held_out
    });
    (examples, val)
}
