//! The tokenizer as GGUF metadata, as llama.cpp's converter writes a byte-level BPE
//! (`tokenizer.ggml.model = "gpt2"`, the scheme of GPT-2, Llama 3, Qwen and SmolLM): every id's
//! token text and type, the merges, the pre-tokenizer llama.cpp should split text with, the
//! special ids, whether a BOS starts every text, and the chat template.

use std::path::Path;

use anyhow::Result;
use serde_json::Value as Json;

use super::file::Value;
use crate::data::Tok;
use crate::error::bad_input;

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The pre-tokenizers llama.cpp implements that pipe recognises, by the regex a
/// `tokenizer.json` splits with before its byte-level step, and llama.cpp's name for each.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer's metadata (`tokenizer_file` is where it came from, for messages) for a model
/// of `vocab_size` rows; `bos_id` is the model's BOS where
/// its tokenizer adds none, `chat_template` the one chats are laid out with.
pub fn metadata(
    tok: &Tok,
    tokenizer_file: &Path,
    vocab_size: usize,
    bos_id: Option<u32>,
    chat_template: Option<&str>,
) -> Result<Vec<(String, Value)>> {
    let json = tok.inner.to_string(false).map_err(|e| anyhow::anyhow!("cannot serialise the tokenizer: {e}"))?;
    let json: Json = serde_json::from_str(&json)?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(refused(
            tokenizer_file,
            format!("its tokenizer is a {} model; pipe writes byte-level BPE tokenizers", model["type"]),
        ));
    }
    if model["byte_fallback"] == true {
        return Err(refused(
            tokenizer_file,
            "its tokenizer is a SentencePiece-style BPE (byte_fallback), llama.cpp's \"llama\" vocabulary, which pipe does not write"
                .into(),
        ));
    }
    match json["normalizer"]["type"].as_str() {
        None | Some("NFC") => {}
        Some(other) => {
            return Err(refused(tokenizer_file, format!("its tokenizer's {other} normalizer has no GGUF equivalent")))
        }
    }
    let pre = pre_tokenizer(&json["pre_tokenizer"], tokenizer_file)?;

    let mut tokens = vec![None; vocab_size];
    let mut types = vec![UNUSED; vocab_size];
    let mut place = |id: u64, text: &str, ty: i32| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            refused(
                tokenizer_file,
                format!("its tokenizer has token {id} ({text:?}), past the model's {vocab_size} embedding rows"),
            )
        })?;
        *slot = Some(text.to_string());
        types[id as usize] = ty;
        Ok(())
    };
    for (text, id) in model["vocab"].as_object().into_iter().flatten() {
        place(id.as_u64().unwrap_or(u64::MAX), text, NORMAL)?;
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let text = added["content"].as_str().unwrap_or_default();
        let looks_special = text.starts_with("<|") && text.ends_with("|>");
        let ty = if added["special"] == true || looks_special { CONTROL } else { USER_DEFINED };
        place(added["id"].as_u64().unwrap_or(u64::MAX), text, ty)?;
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, token)| Value::String(token.unwrap_or_else(|| format!("[PAD{id}]"))))
        .collect();

    let mut out = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges(&model["merges"], tokenizer_file)?)),
    ];
    if let Some(bos) = tok.bos_id.or(bos_id) {
        out.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)));
    }
    out.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(tok.eos_id)));
    for (key, name) in [("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")] {
        if let Some(id) = tok.configured_token_id(key) {
            out.push((format!("tokenizer.ggml.{name}"), Value::U32(id)));
        }
    }
    // pipe's examples start with the BOS where the tokenizer adds one, and end with EOS only
    // where the data says so: llama.cpp should tokenize prompts the same way.
    out.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(tok.bos_id.is_some())));
    out.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)));
    if let Some(template) = chat_template {
        out.push(("tokenizer.chat_template".into(), Value::String(template.to_string())));
    }
    Ok(out)
}

/// llama.cpp's name for the pre-tokenizer, recognised by its structure and split regex.
fn pre_tokenizer(pre: &Json, tokenizer_file: &Path) -> Result<&'static str> {
    let byte_level =
        |p: &Json, regex: bool| p["type"] == "ByteLevel" && p["use_regex"] == regex && p["add_prefix_space"] != true;
    if byte_level(pre, true) {
        return Ok("gpt-2");
    }
    if let [first, second] = pre["pretokenizers"].as_array().map(Vec::as_slice).unwrap_or_default() {
        if first["type"] == "Digits" && first["individual_digits"] == true && byte_level(second, true) {
            return Ok("smollm");
        }
        let splits = first["type"] == "Split" && first["behavior"] == "Isolated" && first["invert"] != true;
        if splits && byte_level(second, false) {
            match first["pattern"]["Regex"].as_str() {
                Some(LLAMA3_SPLIT) => return Ok("llama-bpe"),
                Some(QWEN2_SPLIT) => return Ok("qwen2"),
                _ => {}
            }
        }
    }
    Err(refused(tokenizer_file, format!(
        "its tokenizer's pre-tokenizer is none llama.cpp names that pipe recognises (GPT-2's, Llama 3's, Qwen2's, SmolLM's): {}",
        truncated(&pre.to_string())
    )))
}

/// The merges as llama.cpp reads them: "left right", a space inside a part written as U+0120
/// (what the byte-level alphabet maps a space to), as the converter writes the pair form.
fn merges(merges: &Json, tokenizer_file: &Path) -> Result<Vec<Value>> {
    merges
        .as_array()
        .into_iter()
        .flatten()
        .map(|merge| match merge {
            Json::String(pair) => Ok(Value::String(pair.clone())),
            Json::Array(parts) if parts.len() == 2 => {
                let part = |p: &Json| p.as_str().unwrap_or_default().replace(' ', "\u{120}");
                Ok(Value::String(format!("{} {}", part(&parts[0]), part(&parts[1]))))
            }
            other => Err(refused(tokenizer_file, format!("its tokenizer has a merge written as {other}"))),
        })
        .collect()
}

fn truncated(text: &str) -> String {
    match text.char_indices().nth(200) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

fn refused(file: &Path, why: String) -> anyhow::Error {
    bad_input(format!("{}: cannot write this model as GGUF: {why}", file.display()))
}
