//! The tokenizer: a HuggingFace `tokenizer.json`, or a byte-level BPE (GPT-2's scheme)
//! trained on the training texts. Either way it has an end-of-text token the model learns to
//! emit: the `eos_token` of the `tokenizer_config.json` beside it, else `<|endoftext|>`. A
//! `generation_config.json` beside it may name more end-of-sequence ids (Qwen's chat models end
//! turns with `<|im_end|>` and documents with `<|endoftext|>`): any of them ends generation.
//! Where the tokenizer's post-processor puts a BOS before every text (Llama's), pipe's
//! examples start with it too, as transformers' tokenizers encode them.

use std::path::Path;

use anyhow::Result;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{bad_input, without_panics};

/// GPT-2's end-of-text token, the EOS (and padding, which is never trained on) of a tokenizer
/// whose `tokenizer_config.json` names none.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// The files beside a `tokenizer.json` that say which of its tokens are special.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// A byte range of a text: (start, end).
pub type ByteSpan = (usize, usize);

/// A tokenizer with its special tokens.
#[derive(Clone)]
pub struct Tok {
    pub inner: Tokenizer,
    /// The token responses end with (and padding).
    pub eos_id: u32,
    /// Every id that ends generation: the EOS and those `generation_config.json` names.
    pub stop_ids: Vec<u32>,
    /// The token the post-processor puts before every text, if it puts one.
    pub bos_id: Option<u32>,
    /// The `tokenizer_config.json` it came with (its chat template among other settings),
    /// written back beside it.
    config: Option<serde_json::Value>,
    /// Where it came from, for messages.
    origin: String,
}

impl Tok {
    /// Load a `tokenizer.json`.
    pub fn load(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(bad_input(format!("tokenizer file {} does not exist", path.display())));
        }
        crate::files::open_regular(path)?;
        let invalid = |why: String| bad_input(format!("{}: not a valid tokenizer.json: {why}", path.display()));
        let inner =
            without_panics(|| Tokenizer::from_file(path)).map_err(invalid)?.map_err(|e| invalid(e.to_string()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let config = read_json(&dir.join(TOKENIZER_CONFIG_FILE))?;
        let mut tok = Self::with_special_tokens(inner, config, path)?;
        let generation_path = dir.join(GENERATION_CONFIG_FILE);
        if let Some(generation) = read_json(&generation_path)? {
            let not_an_id = |found: &serde_json::Value| {
                bad_input(format!(
                    "{}: `eos_token_id` = {found}: must be a token id (an integer ≥ 0), a list of them, or null",
                    generation_path.display()
                ))
            };
            let id = |v: &serde_json::Value| v.as_u64().ok_or_else(|| not_an_id(v));
            let ids: Vec<u64> = match generation.get("eos_token_id") {
                Some(serde_json::Value::Array(ids)) => ids.iter().map(id).collect::<Result<_>>()?,
                None | Some(serde_json::Value::Null) => Vec::new(),
                Some(one) => vec![id(one)?],
            };
            let vocab = tok.vocab_size() as u64;
            for id in ids.into_iter().filter(|&id| id < vocab) {
                if !tok.stop_ids.contains(&(id as u32)) {
                    tok.stop_ids.push(id as u32);
                }
            }
        }
        Ok(tok)
    }

    /// The EOS `config` names (else `<|endoftext|>`), and the BOS the post-processor adds.
    fn with_special_tokens(inner: Tokenizer, config: Option<serde_json::Value>, origin: &Path) -> Result<Self> {
        // A special token written as neither form is refused, not read as absent.
        if let Some(config) = &config {
            for key in SPECIAL_TOKEN_KEYS {
                let found = &config[key];
                if !found.is_null() && special_token(config, key).is_none() {
                    return Err(bad_input(format!(
                        "{}: `{key}` = {found}: must be a token (a string, or an object with a string `content`) or null",
                        origin.with_file_name(TOKENIZER_CONFIG_FILE).display()
                    )));
                }
            }
        }
        let named = config.as_ref().and_then(|c| special_token(c, "eos_token"));
        let eos = named.clone().unwrap_or_else(|| EOS_TOKEN.to_string());
        let eos_id = inner.token_to_id(&eos).ok_or_else(|| match named {
            Some(_) => bad_input(format!(
                "{}: `eos_token` = {eos:?} is not a token of the tokenizer",
                origin.with_file_name(TOKENIZER_CONFIG_FILE).display()
            )),
            None => bad_input(format!(
                "{}: the tokenizer has no `{EOS_TOKEN}` token to end responses with, and no {TOKENIZER_CONFIG_FILE} beside it names its `eos_token`",
                origin.display()
            )),
        })?;
        // What the post-processor adds to an empty text is what it adds before every text.
        let added = without_panics(|| inner.encode("", true)).ok().and_then(Result::ok);
        let bos_id = added.and_then(|e| e.get_ids().first().copied()).filter(|&id| id != eos_id);
        Ok(Self { inner, eos_id, stop_ids: vec![eos_id], bos_id, config, origin: origin.display().to_string() })
    }

    /// Train a byte-level BPE of `vocab_size` tokens (including the 256 bytes and EOS).
    pub fn train<'a>(texts: impl Iterator<Item = &'a str>, vocab_size: usize) -> Result<Self> {
        let byte_level = ByteLevel::default().add_prefix_space(false).trim_offsets(false);
        let mut inner = Tokenizer::new(BPE::default());
        inner.with_pre_tokenizer(Some(byte_level));
        inner.with_decoder(Some(byte_level));
        inner.with_post_processor(Some(byte_level));
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .min_frequency(2)
            .special_tokens(vec![AddedToken::from(EOS_TOKEN, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        let texts: Vec<String> = texts.map(str::to_string).collect();
        inner
            .train(&mut trainer, texts.into_iter())
            .map_err(|e| anyhow::anyhow!("training the tokenizer failed: {e}"))?;
        Self::with_special_tokens(inner, None, Path::new("the trained tokenizer"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`, exactly as given (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.guarded("tokenizing", || self.inner.encode_fast(text, false))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of a prompt as training saw the start of its examples: the BOS, where the
    /// tokenizer puts one before every text, then `text`'s ids.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.bos_id.into_iter().chain(self.encode(text)?).collect())
    }

    /// Token ids of `text` with each token's byte range in it (start, end).
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<ByteSpan>)> {
        let encoding = self.guarded("tokenizing", || self.inner.encode(text, false))?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// The end-of-text token as text.
    pub fn eos_token(&self) -> String {
        self.inner.id_to_token(self.eos_id).unwrap_or_else(|| EOS_TOKEN.to_string())
    }

    /// The id of a special token its `tokenizer_config.json` names (`"pad_token"`, `"unk_token"`…).
    pub fn configured_token_id(&self, key: &str) -> Option<u32> {
        special_token(self.config.as_ref()?, key).and_then(|token| self.inner.token_to_id(&token))
    }

    /// The chat template its `tokenizer_config.json` carries, if one.
    pub fn chat_template(&self) -> Option<&str> {
        self.config.as_ref()?.get("chat_template")?.as_str()
    }

    /// Whether `id` ends generation.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.guarded("decoding", || self.inner.decode(ids, true))
    }

    /// Decode with special tokens shown (`<|endoftext|>`).
    pub fn decode_all(&self, ids: &[u32]) -> Result<String> {
        self.guarded("decoding", || self.inner.decode(ids, false))
    }

    /// A tokenizers call whose failure, or panic (some malformed tokenizer.json files load but
    /// panic when used), is an error naming the tokenizer.
    fn guarded<T>(&self, doing: &str, call: impl FnOnce() -> tokenizers::Result<T>) -> Result<T> {
        let failed = |why: String| bad_input(format!("{}: {doing} failed: {why}", self.origin));
        without_panics(call).map_err(failed)?.map_err(|e| failed(e.to_string()))
    }

    /// Write `tokenizer.json` at `path`, and beside it the `tokenizer_config.json` it came with
    /// (or one naming its EOS) and its further end-of-sequence ids in `generation_config.json`
    /// (added to one already there), so that it reads back with the same special tokens.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self.inner.to_string(false).map_err(|e| anyhow::anyhow!("cannot serialise the tokenizer: {e}"))?;
        crate::files::write_atomic(path, json.as_bytes())?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut config = self.config.clone().unwrap_or_else(|| serde_json::json!({}));
        if let Some(object) = config.as_object_mut() {
            object.insert("eos_token".into(), self.eos_token().into());
        }
        crate::files::write_atomic(
            &dir.join(TOKENIZER_CONFIG_FILE),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        if self.stop_ids.len() > 1 {
            let path = dir.join(GENERATION_CONFIG_FILE);
            let mut generation = read_json(&path)?.unwrap_or_else(|| serde_json::json!({}));
            if let Some(object) = generation.as_object_mut() {
                object.insert("eos_token_id".into(), self.stop_ids.clone().into());
            }
            crate::files::write_atomic(&path, serde_json::to_string_pretty(&generation)?.as_bytes())?;
        }
        Ok(())
    }
}

/// A JSON file, or None where there is none.
fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| bad_input(format!("{}: not valid JSON: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(bad_input(format!("{}: cannot read: {e}", path.display()))),
    }
}

/// The special tokens a `tokenizer_config.json` may name that pipe reads.
const SPECIAL_TOKEN_KEYS: [&str; 4] = ["eos_token", "bos_token", "pad_token", "unk_token"];

/// A special token of a `tokenizer_config.json`, written as a string or as `{"content": …}`.
fn special_token(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(token) => Some(token.clone()),
        other => other.get("content")?.as_str().map(str::to_string),
    }
}
