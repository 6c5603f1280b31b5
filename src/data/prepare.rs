//! Preparing a spec's data: read the records, split off the validation set, load or train the
//! tokenizer, tokenize (through the cache), and check the result against the model's
//! vocabulary and context.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::{
    cache, pack, preference, prompt_layout, records, sources, tokenize, Example, Examples, JinjaTemplate,
    PreferenceData, PromptLayout, RenderLimits, Sequence, Tok, TokenizeReport, TokenizeSettings, Tokenizing,
};
use crate::error::bad_input;
use crate::model::{family, hf};
use crate::spec::{DataKind, DataPaths, ModelSpec, Spec, Stage};

/// The tokenizer and the tokenized train and validation sets of a spec.
#[derive(Clone)]
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
    /// The `dpo` stage's preference pairs, when the spec runs it.
    pub preference: Option<Arc<PreferenceData>>,
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
        let files = match spec.data.path.is_empty() {
            true => Vec::new(),
            false => sources::train_files(&spec.data)?,
        };
        let val_files = sources::val_files(&spec.data)?;
        // The records are read whole only to train a tokenizer on them; tokenizing streams
        // them, and a cache hit reads none.
        let read_examples = || -> Result<ReadExamples> {
            let train_examples = records::read_all(&files, &spec.data)?;
            Ok(match &val_files {
                Some(val) => (train_examples, records::read_all(val, &spec.data)?),
                None => split(train_examples, spec.data.val_fraction, spec.run.seed),
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
                let config = family::read_config(dir)?;
                (config.vocab_size(), config.context())
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
            DataKind::Chat => {
                let limits = RenderLimits { steps: spec.data.max_template_steps, bytes: spec.data.max_record_bytes };
                JinjaTemplate::resolve(&spec.data.chat_template, tokenizer_dir, &tok, limits)?
            }
            _ => None,
        };
        let layout = prompt_layout(&spec.data, chat.as_ref())?;
        let tokenized = if spec.data.path.is_empty() {
            // Only the dpo stage runs (validated): there is no SFT data to tokenize.
            cache::Tokenized { train: Vec::new().into(), val: Vec::new(), report: Default::default() }
        } else {
            tokenize_sft(spec, &files, val_files.as_deref(), &tok, chat.as_ref(), max_length, examples.take())?
        };
        if tokenized.train.is_empty() && !spec.data.path.is_empty() {
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
        let preference = match (&spec.dpo, spec.run.stages.contains(&Stage::Dpo)) {
            (Some(dpo), true) => {
                let dpo_max_length = dpo.max_length.unwrap_or(max_length);
                if dpo_max_length > context {
                    return Err(bad_input(format!(
                        "dpo.max_length = {dpo_max_length} is longer than the model's context of {context} positions"
                    )));
                }
                // Conversational pairs are laid out by the data's chat template, whatever its kind.
                let limits = RenderLimits { steps: spec.data.max_template_steps, bytes: spec.data.max_record_bytes };
                let dpo_chat = match &chat {
                    Some(jinja) => Some(jinja.clone()),
                    None => JinjaTemplate::resolve(&spec.data.chat_template, tokenizer_dir, &tok, limits)?,
                };
                let pairs =
                    preference::prepare(dpo, &spec.data, dpo_chat.as_ref(), &tok, dpo_max_length, spec.run.seed)?;
                tracing::info!(train = pairs.train.len(), val = pairs.val.len(), "preference pairs");
                Some(Arc::new(pairs))
            }
            _ => None,
        };
        Ok(Self { tok, train, val: tokenized.val, report: tokenized.report, model_dir, layout, packing, preference })
    }
}

/// The SFT data tokenized, from the cache when an entry for the same files and settings is
/// there, else tokenized (streamed, or from `examples` already read) and cached.
fn tokenize_sft(
    spec: &Spec,
    files: &[PathBuf],
    val_files: Option<&[PathBuf]>,
    tok: &Tok,
    chat: Option<&JinjaTemplate>,
    max_length: usize,
    examples: Option<ReadExamples>,
) -> Result<cache::Tokenized> {
    let entry = cache_entry(spec, files, val_files, tok, chat, max_length)?;
    Ok(match cache::load(&entry) {
        Some(cached) => {
            tracing::info!(path = %entry.display(), "reusing the tokenized data from the cache");
            cached
        }
        None => {
            let (data, loss_on) = (&spec.data, spec.train.loss_on);
            let settings = TokenizeSettings { tok, data, chat, max_length, loss_on };
            match cache::Writer::create(&entry) {
                Ok(mut writer) => {
                    let (report, val) =
                        tokenize_data(spec, files, val_files, &settings, examples, |sequence| writer.push(&sequence))?;
                    writer.finish(val, report).context("cannot write the tokenized cache")?;
                    tracing::info!(path = %entry.display(), "tokenized the data and cached it");
                    cache::load(&entry).with_context(|| format!("{}: cannot read back", entry.display()))?
                }
                Err(e) => {
                    tracing::warn!("could not cache the tokenized data: {e:#}; keeping it in memory");
                    let mut train = Vec::new();
                    let (report, val) = tokenize_data(spec, files, val_files, &settings, examples, |sequence| {
                        train.push(sequence);
                        Ok(())
                    })?;
                    cache::Tokenized { train: train.into(), val, report }
                }
            }
        }
    })
}

/// The cache entry for a spec's data: the training and validation files' bytes, the tokenizer, the chat
/// template's text, and every setting that changes the tokenized result (paths themselves do not).
fn cache_entry(
    spec: &Spec,
    files: &[PathBuf],
    val_files: Option<&[PathBuf]>,
    tok: &Tok,
    chat: Option<&JinjaTemplate>,
    max_length: usize,
) -> Result<PathBuf> {
    // Hashed as they are read: a large dataset is never held whole for its key.
    let train = crate::files::hash_files(files)?;
    let val = val_files.map(crate::files::hash_files).transpose()?.unwrap_or_default();
    let tokenizer = tok.inner.to_string(false).map_err(|e| anyhow::anyhow!("cannot serialise the tokenizer: {e}"))?;
    let mut data = spec.data.clone();
    data.path = DataPaths::default();
    data.val_path = None;
    data.split = String::new();
    data.val_split = None;
    let settings = format!(
        "{}\nseed={} max_length={max_length} loss_on={:?} eos={} bos={:?} version={}",
        toml::to_string(&data)?,
        spec.run.seed,
        spec.train.loss_on,
        tok.eos_id,
        tok.bos_id,
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

/// The training examples and the validation examples, with the file the latter came from.
/// The training and validation examples, read whole.
type ReadExamples = (Vec<Example>, Vec<Example>);

/// Tokenize the training data into `sink`, returning the report and the validation sequences:
/// from examples already read (to train a tokenizer), or streamed from the files a chunk at a
/// time, the validation share held back as it passes (after a first pass that counts the
/// examples, so that the seeded split is the one `split` makes).
fn tokenize_data(
    spec: &Spec,
    files: &[PathBuf],
    val_files: Option<&[PathBuf]>,
    settings: &TokenizeSettings<'_>,
    read: Option<ReadExamples>,
    sink: impl FnMut(Sequence) -> Result<()>,
) -> Result<(TokenizeReport, Vec<Sequence>)> {
    let data = &spec.data;
    let mut tokenizing = Tokenizing::new(settings, sink);
    let val_examples = match (read, val_files) {
        (Some((train, val)), _) => {
            let bar = examples_bar("tokenizing", Some(train.len()));
            train.chunks(records::CHUNK).try_for_each(|chunk| {
                bar.inc(chunk.len() as u64);
                tokenizing.push(chunk)
            })?;
            bar.finish_and_clear();
            val
        }
        (None, Some(val_files)) => {
            let bar = examples_bar("tokenizing", None);
            records::read_chunks_of(files, data, |chunk| {
                bar.inc(chunk.len() as u64);
                tokenizing.push(&chunk)
            })?;
            bar.finish_and_clear();
            records::read_all(val_files, data)?
        }
        (None, None) => {
            let bar = examples_bar("counting", None);
            let count = records::read_chunks_of(files, data, |chunk| {
                bar.inc(chunk.len() as u64);
                Ok(())
            })?;
            bar.finish_and_clear();
            let held_out = held_out(count, data.val_fraction, spec.run.seed);
            let (mut val, mut index) = (Vec::new(), 0);
            let bar = examples_bar("tokenizing", Some(count));
            records::read_chunks_of(files, data, |mut chunk| {
                bar.inc(chunk.len() as u64);
                chunk.retain(|example| {
                    let keep = !held_out.contains(&index);
                    index += 1;
                    if !keep {
                        val.push(example.clone());
                    }
                    keep
                });
                tokenizing.push(&chunk)
            })?;
            bar.finish_and_clear();
            val
        }
    };
    let report = tokenizing.finish()?;
    let TokenizeSettings { tok, chat, max_length, loss_on, .. } = *settings;
    let (val, _) = tokenize(&val_examples, tok, data, chat, max_length, loss_on)?;
    Ok((report, val))
}

/// A bar over the examples read (a counter where their number is not known yet); drawn only
/// on a terminal.
fn examples_bar(what: &str, total: Option<usize>) -> indicatif::ProgressBar {
    let (bar, template) = match total {
        Some(total) => (
            indicatif::ProgressBar::new(total as u64),
            "{prefix} [{bar:30}] {human_pos}/{human_len} examples ({per_sec}, {eta})",
        ),
        None => (indicatif::ProgressBar::new_spinner(), "{spinner} {prefix} {human_pos} examples ({per_sec})"),
    };
    let style = indicatif::ProgressStyle::with_template(template).expect("a valid template").progress_chars("=> ");
    bar.with_style(style).with_prefix(what.to_string())
}

/// The indexes of the examples held out for validation: `fraction` of `count`, chosen by a
/// seeded shuffle (at least one when the fraction is positive and there are two or more).
fn held_out(count: usize, fraction: f64, seed: u64) -> std::collections::HashSet<usize> {
    if fraction <= 0.0 || count < 2 {
        return Default::default();
    }
    let n_val = ((count as f64 * fraction).round() as usize).clamp(1, count - 1);
    let mut order: Vec<usize> = (0..count).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    order[..n_val].iter().copied().collect()
}

/// Hold out `fraction` of the examples for validation, as `held_out` chooses them.
pub(super) fn split(examples: Vec<Example>, fraction: f64, seed: u64) -> (Vec<Example>, Vec<Example>) {
    let held_out = held_out(examples.len(), fraction, seed);
    let (val, train): (Vec<_>, Vec<_>) = examples.into_iter().enumerate().partition(|(i, _)| held_out.contains(i));
    (train.into_iter().map(|(_, e)| e).collect(), val.into_iter().map(|(_, e)| e).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streaming the records (the usual path) tokenizes exactly what reading them whole and
    /// splitting them does (the path a trained tokenizer takes): the same training sequences in
    /// the same order, the same validation set and report, across several chunks, with blank
    /// lines and CRLF endings in the file.
    #[test]
    fn streamed_records_tokenize_as_records_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.jsonl");
        let lines: Vec<String> = (0..2 * records::CHUNK + 123)
            .map(|i| match i % 1000 {
                7 => String::new(),
                _ => format!("{{\"prompt\": \"question {i}?\", \"response\": \"answer {}\"}}", i * 31 % 97),
            })
            .collect();
        std::fs::write(&path, lines.join("\r\n")).unwrap();
        let toml = format!(
            "[run]\nname = \"t\"\nseed = 3\n[data]\npath = {path:?}\nval_fraction = 0.1\n[model]\npath = \"m\"\n"
        );
        let spec: Spec = toml::from_str(&toml).unwrap();
        let tok =
            Tok::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2/tokenizer.json")).unwrap();
        let settings =
            TokenizeSettings { tok: &tok, data: &spec.data, chat: None, max_length: 64, loss_on: spec.train.loss_on };
        let tokenized = |read: Option<ReadExamples>| {
            let mut train = Vec::new();
            let files = spec.data.path.files().unwrap();
            let (report, val) = tokenize_data(&spec, &files, None, &settings, read, |s| {
                train.push(s);
                Ok(())
            })
            .unwrap();
            (train, val, report)
        };
        let whole = records::read_all(&spec.data.path.files().unwrap(), &spec.data).unwrap();
        let (streamed, read_whole) =
            (tokenized(None), tokenized(Some(split(whole, spec.data.val_fraction, spec.run.seed))));
        assert_eq!(streamed.2.examples + streamed.1.len(), lines.len() - 9, "every non-blank line is an example");
        assert_eq!(streamed.1.len(), ((lines.len() - 9) as f64 * 0.1).round() as usize);
        assert_eq!(streamed, read_whole);
    }
}
