//! From records to token sequences with their loss masks: the prompt layouts (a template for
//! pairs, the two Alpaca layouts, chat templates), EOS where a response ends, truncation to
//! the length limit, and plain documents packed into blocks.

use anyhow::Result;

use super::chat_template::JinjaTemplate;
use super::records::{Example, Record, Role};
use super::{Sequence, Tok};
use crate::error::bad_input;
use crate::spec::{DataKind, DataSpec, LossOn};

/// The Alpaca prompt layouts, for records with and without an input.
pub const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
pub const ALPACA_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";
/// The built-in chat template (`chat_template = "simple"`).
pub const SIMPLE_CHAT: &str = "<|{role}|>\n{content}\n";

/// Lay a prompt out as `template` says (`{prompt}` stands for the prompt).
pub fn apply_template(template: &str, prompt: &str) -> String {
    template.replace("{prompt}", prompt)
}

fn chat_template(data: &DataSpec) -> &str {
    if data.chat_template == "simple" {
        SIMPLE_CHAT
    } else {
        &data.chat_template
    }
}

/// What a chat message renders to before and after its content.
fn message_parts(template: &str, role: Role) -> (String, String) {
    let (before, after) = template.split_once("{content}").expect("validated: the template has {content}");
    (before.replace("{role}", role.name()), after.replace("{role}", role.name()))
}

/// How a user's prompt is laid out for generation (the generate stage, `pipe generate` and
/// `pipe chat` on a run), so that the model sees what it was trained on, and the text that ends
/// an answer when the layout has one besides EOS (a chat template's end-of-turn marker).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PromptLayout {
    /// `{prompt}` stands for the user's text.
    pub template: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<String>,
    /// What follows an answer in the data, whitespace and all (a chat template's end of turn);
    /// None: EOS. A conversation's history is laid out with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
}

impl PromptLayout {
    /// `template` with `{prompt}`, answers ended by EOS.
    pub fn new(template: String) -> Self {
        Self { template, stop: None, end: None }
    }

    /// The text as given, ended by EOS only.
    pub fn raw() -> Self {
        Self::new("{prompt}".into())
    }

    /// An answer ended as the data ends one (`eos` is the end-of-text token's text).
    pub fn ended(&self, answer: &str, eos: &str) -> String {
        format!("{answer}{}", self.end.as_deref().unwrap_or(eos))
    }

    /// `prompt` laid out.
    pub fn apply(&self, prompt: &str) -> String {
        apply_template(&self.template, prompt)
    }

    /// A completion cut where the answer ends (at the stop text, which is dropped).
    pub fn cut<'a>(&self, completion: &'a str) -> &'a str {
        match &self.stop {
            Some(stop) => completion.split_once(stop.as_str()).map_or(completion, |(answer, _)| answer),
            None => completion,
        }
    }
}

/// The layout of the data's kind; `chat` is the data's Jinja chat template, if it has one.
pub fn prompt_layout(data: &DataSpec, chat: Option<&JinjaTemplate>) -> Result<PromptLayout> {
    let template = match data.kind {
        DataKind::Pair | DataKind::Preference => data.prompt_template.clone(),
        DataKind::Alpaca => ALPACA_NO_INPUT.replace("{instruction}", "{prompt}"),
        DataKind::Chat => match chat {
            Some(jinja) => {
                let end = jinja.after_answer()?;
                let stop = Some(end.trim().to_string()).filter(|s| !s.is_empty());
                return Ok(PromptLayout { template: jinja.prompt_layout()?, stop, end: Some(end) });
            }
            None => {
                let template = chat_template(data);
                let (user_before, user_after) = message_parts(template, Role::User);
                let (assistant_before, _) = message_parts(template, Role::Assistant);
                format!("{user_before}{{prompt}}{user_after}{assistant_before}")
            }
        },
        DataKind::Text => "{prompt}".into(),
    };
    Ok(PromptLayout::new(template))
}

/// A rendered record: text pieces and EOS tokens, each trained on or not.
enum Piece {
    Text(String, bool),
    Eos(bool),
}

fn pieces(record: &Record, data: &DataSpec, loss_on: LossOn) -> Vec<Piece> {
    let all = loss_on == LossOn::All;
    match record {
        Record::Pair { prompt, response } | Record::Preference { prompt, chosen: response, .. } => vec![
            Piece::Text(apply_template(&data.prompt_template, prompt), all),
            Piece::Text(response.clone(), true),
            Piece::Eos(true),
        ],
        Record::Alpaca { instruction, input, output } => {
            let layout = if input.trim().is_empty() { ALPACA_NO_INPUT } else { ALPACA_WITH_INPUT };
            let prompt = layout.replace("{instruction}", instruction).replace("{input}", input);
            vec![Piece::Text(prompt, all), Piece::Text(output.clone(), true), Piece::Eos(true)]
        }
        Record::Chat { messages } => {
            let template = chat_template(data);
            let mut out = Vec::new();
            for m in messages {
                let (before, after) = message_parts(template, m.role);
                if m.role == Role::Assistant {
                    out.push(Piece::Text(before, all));
                    out.push(Piece::Text(format!("{}{after}", m.content), true));
                    out.push(Piece::Eos(true));
                } else {
                    out.push(Piece::Text(format!("{before}{}{after}", m.content), all));
                }
            }
            out
        }
        Record::Text { text } => vec![Piece::Text(text.clone(), true), Piece::Eos(true)],
        // A preference pair read as SFT data is its prompt and chosen answer.
        Record::ChatPreference { prompt, chosen, .. } => {
            pieces(&Record::Chat { messages: [&prompt[..], &chosen[..]].concat() }, data, loss_on)
        }
    }
}

/// What tokenizing a dataset did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenizeReport {
    pub examples: usize,
    /// Sequences produced (packed blocks for documents).
    pub sequences: usize,
    pub tokens: usize,
    /// Tokens the loss is computed on.
    pub trained_tokens: usize,
    /// Sequences cut at the length limit.
    pub truncated: usize,
    /// Conversations with nothing left to train on within the length limit.
    pub dropped: usize,
}

/// Rendered pieces as token ids, each marked trained or not, after the BOS where the tokenizer
/// puts one before every text (as transformers' tokenizers encode an example).
fn tokenize_pieces(pieces: Vec<Piece>, tok: &Tok) -> Result<(Vec<u32>, Vec<bool>)> {
    let (mut ids, mut trained): (Vec<u32>, Vec<bool>) = tok.bos_id.map(|bos| (bos, false)).into_iter().unzip();
    for piece in pieces {
        match piece {
            Piece::Text(text, train) => {
                let piece_ids = tok.encode(&text)?;
                trained.extend(std::iter::repeat_n(train, piece_ids.len()));
                ids.extend(piece_ids);
            }
            Piece::Eos(train) => {
                ids.push(tok.eos_id);
                trained.push(train);
            }
        }
    }
    Ok((ids, trained))
}

/// A conversation laid out by a Jinja chat template, tokenized as one text (as transformers
/// tokenizes `apply_chat_template`'s output), each token trained when it overlaps an answer.
fn tokenize_conversation(
    messages: &[super::records::Message],
    template: &JinjaTemplate,
    tok: &Tok,
    loss_on: LossOn,
) -> Result<(Vec<u32>, Vec<bool>)> {
    let (text, answers) = template.render_with_answers(messages)?;
    let (ids, offsets) = tok.encode_with_offsets(&text)?;
    let trained = offsets
        .iter()
        .map(|&(start, end)| loss_on == LossOn::All || answers.iter().any(|a| start < a.end && end > a.start))
        .collect();
    Ok((ids, trained))
}

/// Tokenize examples into sequences of at most `max_length` tokens; conversations go through
/// `chat` when the data has a Jinja chat template. A pair or alpaca example whose prompt
/// leaves no room for a response token is an error naming its line; longer ones are cut from
/// the end (and counted); documents are packed into blocks of `max_length`.
pub fn tokenize(
    examples: &[Example],
    tok: &Tok,
    data: &DataSpec,
    chat: Option<&JinjaTemplate>,
    max_length: usize,
    loss_on: LossOn,
) -> Result<(Vec<Sequence>, TokenizeReport)> {
    let mut sequences = Vec::with_capacity(examples.len());
    let settings = TokenizeSettings { tok, data, chat, max_length, loss_on };
    let mut tokenizing = Tokenizing::new(&settings, |sequence| {
        sequences.push(sequence);
        Ok(())
    });
    examples.chunks(super::records::CHUNK).try_for_each(|chunk| tokenizing.push(chunk))?;
    let report = tokenizing.finish()?;
    Ok((sequences, report))
}

/// What tokenizing depends on besides the examples.
pub struct TokenizeSettings<'a> {
    pub tok: &'a Tok,
    pub data: &'a DataSpec,
    pub chat: Option<&'a JinjaTemplate>,
    pub max_length: usize,
    pub loss_on: LossOn,
}

/// Tokenizing examples a chunk at a time as they are read, each chunk in parallel, handing
/// each sequence to the sink in order: memory holds one chunk's tokens, not the dataset's
/// (documents excepted: their token stream is cut into blocks at the end).
pub struct Tokenizing<'a, S: FnMut(Sequence) -> Result<()>> {
    settings: &'a TokenizeSettings<'a>,
    sink: S,
    report: TokenizeReport,
    /// Documents' tokens, joined, and whether each is trained on.
    stream: Vec<u32>,
    stream_trained: Vec<bool>,
}

impl<'a, S: FnMut(Sequence) -> Result<()>> Tokenizing<'a, S> {
    pub fn new(settings: &'a TokenizeSettings<'a>, sink: S) -> Self {
        Self { settings, sink, report: TokenizeReport::default(), stream: Vec::new(), stream_trained: Vec::new() }
    }

    fn emit(&mut self, sequence: Sequence) -> Result<()> {
        self.report.sequences += 1;
        self.report.tokens += sequence.ids.len();
        self.report.trained_tokens += sequence.loss_tokens();
        (self.sink)(sequence)
    }

    /// The next examples, in the order of the data.
    pub fn push(&mut self, chunk: &[Example]) -> Result<()> {
        use rayon::prelude::*;
        let TokenizeSettings { tok, data, chat, max_length, loss_on } = *self.settings;
        self.report.examples += chunk.len();
        let encoded: Vec<Result<(Vec<u32>, Vec<bool>)>> = chunk
            .par_iter()
            .map(|example| match (&example.record, chat) {
                (Record::Chat { messages }, Some(template)) => tokenize_conversation(messages, template, tok, loss_on)
                    .map_err(|e| bad_input(format!("{}:{}: {e:#}", example.file.display(), example.line))),
                (record, _) => tokenize_pieces(pieces(record, data, loss_on), tok),
            })
            .collect();
        for (example, encoded) in chunk.iter().zip(encoded) {
            let (mut ids, mut trained) = encoded?;
            if matches!(example.record, Record::Text { .. }) {
                self.stream.extend(ids);
                self.stream_trained.extend(trained);
                continue;
            }
            let first_trained = trained.iter().skip(1).position(|&t| t).map_or(ids.len(), |p| p + 1);
            if first_trained >= max_length {
                if matches!(example.record, Record::Chat { .. }) {
                    self.report.dropped += 1;
                    continue;
                }
                return Err(bad_input(format!(
                    "{}:{}: the prompt is {first_trained} tokens, which leaves no room for a response within max_length = {max_length}",
                    example.file.display(),
                    example.line,
                )));
            }
            if ids.len() > max_length {
                ids.truncate(max_length);
                trained.truncate(max_length);
                self.report.truncated += 1;
            }
            self.emit(Sequence::new(ids, trained))?;
        }
        Ok(())
    }

    /// The documents' blocks, then what was made of the examples.
    pub fn finish(mut self) -> Result<TokenizeReport> {
        let max_length = self.settings.max_length;
        // Documents: one stream, cut into blocks that overlap by one token so every token after
        // the first is a target exactly once.
        let (stream, stream_trained) = (std::mem::take(&mut self.stream), std::mem::take(&mut self.stream_trained));
        if stream.len() >= 2 {
            let stride = max_length - 1;
            let mut start = 0;
            while start + 1 < stream.len() {
                let end = (start + max_length).min(stream.len());
                self.emit(Sequence::new(stream[start..end].to_vec(), stream_trained[start..end].to_vec()))?;
                start += stride;
            }
        }
        let report = self.report;
        if report.truncated > 0 || report.dropped > 0 {
            tracing::warn!(
                truncated = report.truncated,
                dropped = report.dropped,
                of = report.examples,
                max_length,
                "examples longer than max_length were cut from the end (dropped when nothing to train on was left)"
            );
        }
        Ok(report)
    }
}

/// A sequence as text with the trained tokens marked `[[...]]`, to see what the loss is on.
pub fn show(sequence: &Sequence, tok: &Tok) -> Result<String> {
    let mut out = String::new();
    let mut i = 0;
    while i < sequence.ids.len() {
        // Token 0 is never a target.
        let trained = i > 0 && sequence.trained[i];
        let mut j = i + 1;
        while j < sequence.ids.len() && (j > 0 && sequence.trained[j]) == trained {
            j += 1;
        }
        let text = tok.decode_all(&sequence.ids[i..j])?;
        if trained {
            out.push_str(&format!("[[{text}]]"));
        } else {
            out.push_str(&text);
        }
        i = j;
    }
    Ok(out)
}
