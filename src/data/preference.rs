//! Preference pairs for the `dpo` stage: a prompt with a chosen and a rejected completion,
//! read from `[dpo]`'s files and tokenized as TRL's DPOTrainer tokenizes them, so that the
//! same pair gives the same tokens: the prompt (laid out by the data's prompt template) alone,
//! and prompt + completion + EOS as one text, the completion starting where the two part.

use std::path::PathBuf;

use anyhow::Result;

use super::prepare::split;
use super::records::{self, Example, Message, Record};
use super::{JinjaTemplate, Sequence, Tok};
use crate::error::bad_input;
use crate::spec::{DataKind, DataPaths, DataSpec, DpoSpec};

/// One preference pair, tokenized: the prompt's tokens untrained in both sequences, each
/// completion's trained.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub chosen: Sequence,
    pub rejected: Sequence,
}

impl PreferencePair {
    /// The longer sequence's length, for batching by length.
    pub fn token_len(&self) -> usize {
        self.chosen.ids.len().max(self.rejected.ids.len())
    }
}

/// The stage's training and validation pairs, and what tokenizing them did.
#[derive(Debug, Clone, Default)]
pub struct PreferenceData {
    pub train: Vec<PreferencePair>,
    pub val: Vec<PreferencePair>,
    /// Sequences cut to `max_length` (chosen and rejected counted apart).
    pub truncated: usize,
}

/// Read and tokenize `dpo`'s pairs: prompts laid out as `data` lays them out (conversations
/// by `chat`, the data's Jinja chat template), sequences of at
/// most `max_length` tokens, validation pairs from `dpo.val_path` or held out of `dpo.path`
/// (`dpo.val_fraction`, drawn with `seed`).
pub fn prepare(
    dpo: &DpoSpec,
    data: &DataSpec,
    chat: Option<&JinjaTemplate>,
    tok: &Tok,
    max_length: usize,
    seed: u64,
) -> Result<PreferenceData> {
    let reading = DataSpec {
        kind: DataKind::Preference,
        format: dpo.format,
        prompt_field: dpo.prompt_field.clone(),
        response_field: dpo.chosen_field.clone(),
        rejected_field: dpo.rejected_field.clone(),
        ..data.clone()
    };
    let read = |paths: &DataPaths| -> Result<Vec<Example>> {
        let files: Vec<PathBuf> = paths.files()?;
        records::read_all(&files, &reading)
    };
    let (train, val) = match &dpo.val_path {
        Some(val_path) => (read(&dpo.path)?, read(val_path)?),
        None => split(read(&dpo.path)?, dpo.val_fraction, seed),
    };
    let mut truncated = 0;
    let mut tokenize = |examples: Vec<Example>| -> Result<Vec<PreferencePair>> {
        examples
            .iter()
            .map(|example| {
                let (pair, cut) = tokenize_pair(example, &data.prompt_template, chat, tok, max_length)?;
                truncated += cut;
                Ok(pair)
            })
            .collect()
    };
    let data = PreferenceData { train: tokenize(train)?, val: tokenize(val)?, truncated };
    if data.train.is_empty() {
        return Err(bad_input(format!("{}: no preference pairs are left for training", dpo.path.display())));
    }
    if data.truncated > 0 {
        tracing::warn!(sequences = data.truncated, max_length, "preference sequences cut to max_length (their start)");
    }
    Ok(data)
}

/// One pair as TRL tokenizes it: the prompt alone, and prompt + completion as one text. A pair
/// of strings is laid out by the data's prompt template, the completion ended with EOS (its
/// text, unless it already ends with it), each text encoded after the BOS where the tokenizer
/// adds one; a conversational pair is rendered by the chat template (the prompt's turns with
/// the generation prompt, then the prompt's and the completion's turns), its special tokens
/// the template's. The completion's tokens are what follows the longest prefix the prompt's
/// tokens share with both texts' (a token may merge across the boundary). Each sequence
/// longer than `max_length` keeps its last `max_length` tokens; also returns how many of the
/// two were cut.
fn tokenize_pair(
    example: &Example,
    template: &str,
    chat: Option<&JinjaTemplate>,
    tok: &Tok,
    max_length: usize,
) -> Result<(PreferencePair, usize)> {
    let at = || format!("{}:{}", example.file.display(), example.line);
    let (prompt_ids, chosen_ids, rejected_ids) = match &example.record {
        Record::Preference { prompt, chosen, rejected } => {
            let prompt = super::apply_template(template, prompt);
            let eos = tok.eos_token();
            let ended = |completion: &str| match completion.ends_with(&eos) {
                true => format!("{prompt}{completion}"),
                false => format!("{prompt}{completion}{eos}"),
            };
            (tok.encode_prompt(&prompt)?, tok.encode_prompt(&ended(chosen))?, tok.encode_prompt(&ended(rejected))?)
        }
        Record::ChatPreference { prompt, chosen, rejected } => {
            let Some(jinja) = chat else {
                return Err(bad_input(format!(
                    "{}: a conversational pair (lists of messages) is laid out by a Jinja chat template: set data.chat_template to \"chatml\", \"hf\" or a .jinja file",
                    at()
                )));
            };
            let whole = |completion: &[Message]| -> Result<Vec<u32>> {
                tok.encode(&jinja.render(&[&prompt[..], completion].concat(), false)?)
            };
            (tok.encode(&jinja.render(prompt, true)?)?, whole(chosen)?, whole(rejected)?)
        }
        _ => unreachable!("preference records are read as such"),
    };
    let shared = |ids: &[u32]| prompt_ids.iter().zip(ids).take_while(|(a, b)| a == b).count();
    let prompt_len = shared(&chosen_ids).min(shared(&rejected_ids));
    let mut cut = 0;
    let mut sequence = |ids: Vec<u32>, which: &str| -> Result<Sequence> {
        if ids.len() == prompt_len {
            return Err(bad_input(format!("{}: the {which} completion has no tokens", at())));
        }
        let mut sequence = Sequence::with_prompt(ids, prompt_len);
        if sequence.ids.len() > max_length {
            let start = sequence.ids.len() - max_length;
            sequence = Sequence::new(sequence.ids.split_off(start), sequence.trained.split_off(start));
            cut += 1;
        }
        Ok(sequence)
    };
    let pair =
        PreferencePair { chosen: sequence(chosen_ids, "chosen")?, rejected: sequence(rejected_ids, "rejected")? };
    Ok((pair, cut))
}
