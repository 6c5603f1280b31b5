//! The tokenizer: a HuggingFace `tokenizer.json`, or a byte-level BPE (GPT-2's scheme)
//! trained on the training texts. Either way it has an end-of-text token the model learns to
//! emit.

use std::path::Path;

use anyhow::Result;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{bad_input, without_panics};

/// GPT-2's end-of-text token, used as EOS (and as padding, which is never trained on).
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// A byte range of a text: (start, end).
pub type ByteSpan = (usize, usize);

/// A tokenizer with its EOS id.
#[derive(Clone)]
pub struct Tok {
    pub inner: Tokenizer,
    pub eos_id: u32,
    /// Where it came from, for messages.
    origin: String,
}

impl Tok {
    /// Load a `tokenizer.json`.
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(bad_input(format!("tokenizer file {} does not exist", path.display())));
        }
        let invalid = |why: String| bad_input(format!("{}: not a valid tokenizer.json: {why}", path.display()));
        let inner =
            without_panics(|| Tokenizer::from_file(path)).map_err(invalid)?.map_err(|e| invalid(e.to_string()))?;
        Self::with_eos(inner, path)
    }

    fn with_eos(inner: Tokenizer, origin: &Path) -> Result<Self> {
        let eos_id = inner.token_to_id(EOS_TOKEN).ok_or_else(|| {
            bad_input(format!("{}: the tokenizer has no `{EOS_TOKEN}` token to end responses with", origin.display()))
        })?;
        Ok(Self { inner, eos_id, origin: origin.display().to_string() })
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
        Self::with_eos(inner, Path::new("the trained tokenizer"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`, exactly as given (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.guarded("tokenizing", || self.inner.encode_fast(text, false))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` with each token's byte range in it (start, end).
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<ByteSpan>)> {
        let encoding = self.guarded("tokenizing", || self.inner.encode(text, false))?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// The end-of-text token as text.
    pub fn eos_token(&self) -> String {
        EOS_TOKEN.to_string()
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

    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self.inner.to_string(false).map_err(|e| anyhow::anyhow!("cannot serialise the tokenizer: {e}"))?;
        crate::files::write_atomic(path, json.as_bytes())
    }
}
