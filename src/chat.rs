//! `pipe chat`: a conversation with a model, like the notebook's chat(). Each user line is laid
//! out with the prompt template the run trained with, the reply streams token by token until
//! EOS, and the history is kept within the context window by dropping the oldest turns.

use std::io::{BufRead, Write};

use anyhow::Result;

use crate::data::{PromptLayout, Tok};
use crate::generate::{Decode, Generator, Sampling};

pub struct ChatSettings {
    pub layout: PromptLayout,
    pub sampling: Sampling,
    pub max_new_tokens: usize,
    pub seed: u64,
}

/// Converse over `input` until EOF or `/exit`, writing replies to `output`; with `echo` (input
/// that is not a terminal, which shows what is typed itself) each line is written after its
/// prompt too, so that the transcript reads as the conversation.
pub fn chat(
    model: impl Decode,
    tok: &Tok,
    settings: &ChatSettings,
    input: impl BufRead,
    mut output: impl Write,
    echo: bool,
) -> Result<()> {
    // The conversation's tokens after the BOS (where the tokenizer starts texts with one).
    let context = model.context().saturating_sub(tok.bos_id.is_some() as usize).max(1);
    let mut generator = Generator::with(model, settings.seed);
    // Each finished turn: the laid-out user line, the reply and EOS, as token ids.
    let mut history: Vec<Vec<u32>> = Vec::new();
    writeln!(
        output,
        "chat with the model: type a message and press enter; /reset clears the history, /exit or Ctrl-D ends"
    )?;
    write!(output, "> ")?;
    output.flush()?;
    for line in input.split(b'\n') {
        // A line that is not UTF-8 (a terminal in another encoding) is set aside, not the end.
        let Ok(line) = String::from_utf8(line?) else {
            writeln!(output, "(that line is not UTF-8 text, so it was not sent; type it again)")?;
            write!(output, "> ")?;
            output.flush()?;
            continue;
        };
        if echo {
            writeln!(output, "{line}")?;
        }
        match line.trim() {
            "" => {}
            "/exit" | "/quit" => break,
            "/reset" => {
                history.clear();
                writeln!(output, "(history cleared)")?;
            }
            message => {
                let mut turn = tok.encode(&settings.layout.apply(message))?;
                // Leave room for at least a few reply tokens; keep the end of a very long message.
                let room = context.saturating_sub(settings.max_new_tokens.min(context / 2)).max(1);
                if turn.len() > room {
                    turn.drain(..turn.len() - room);
                    writeln!(output, "(message cut to its last {room} tokens to fit the context)")?;
                }
                let budget = context - settings.max_new_tokens.min(context - turn.len());
                while !history.is_empty() && history.iter().map(Vec::len).sum::<usize>() + turn.len() > budget {
                    history.remove(0);
                }
                let prompt: Vec<u32> =
                    tok.bos_id.iter().chain(history.iter().flatten()).chain(&turn).copied().collect();
                let max_new = settings.max_new_tokens.min(context + tok.bos_id.is_some() as usize - prompt.len());
                let mut reply = Vec::new();
                let mut shown = String::new();
                generator.generate(&prompt, max_new, settings.sampling, &tok.stop_ids, |id| {
                    if tok.is_stop(id) {
                        return false;
                    }
                    reply.push(id);
                    // Decode the whole reply so far: a character may span several tokens.
                    let Ok(text) = tok.decode(&reply) else { return true };
                    // Up to the layout's stop text, which ends the turn and is not shown.
                    let answer = settings.layout.cut(&text);
                    if let Some(new) = answer.strip_prefix(shown.as_str()) {
                        let _ = write!(output, "{new}");
                        let _ = output.flush();
                    }
                    shown = answer.to_string();
                    answer.len() == text.len()
                });
                writeln!(output)?;
                // The exchange joins the history as the data laid exchanges out (the template's
                // end of turn, or EOS), not as the reply happened to stop.
                let answer = settings.layout.cut(&tok.decode(&reply)?).to_string();
                turn.extend(tok.encode(&settings.layout.ended(&answer, &tok.eos_token()))?);
                history.push(turn);
            }
        }
        write!(output, "> ")?;
        output.flush()?;
    }
    writeln!(output)?;
    Ok(())
}
