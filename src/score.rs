//! `pipe score`: the log-likelihood a model gives each token of a text, exactly as given (no
//! BOS or EOS added), so that pipe can be checked against transformers token by token.

use anyhow::Result;
use serde::Serialize;

use crate::data::Tok;
use crate::error::bad_input;
use crate::generate::Decode;

#[derive(Debug, Clone, Serialize)]
pub struct TextScore {
    pub text: String,
    pub ids: Vec<u32>,
    /// log p(token i | tokens before it), for i = 1..len (the first token has no context).
    pub token_logprobs: Vec<f64>,
    /// Mean negative log-likelihood over the scored tokens.
    pub loss: Option<f64>,
    pub perplexity: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Overall {
    pub scored_tokens: usize,
    pub loss: Option<f64>,
    pub perplexity: Option<f64>,
}

/// Score each text; texts longer than the model's context are an error naming them.
pub fn score(model: &impl Decode, tok: &Tok, texts: &[String]) -> Result<(Vec<TextScore>, Overall)> {
    if texts.is_empty() {
        return Err(bad_input("no texts to score: give --text or a --file with texts in it"));
    }
    let context = model.context();
    let mut scores = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let ids = tok.encode(text)?;
        if ids.is_empty() {
            return Err(bad_input(format!("text {} is empty: nothing to score", i + 1)));
        }
        if ids.len() > context {
            return Err(bad_input(format!(
                "text {} is {} tokens, longer than the model's context of {context}",
                i + 1,
                ids.len()
            )));
        }
        let token_logprobs = match ids.len() {
            0 | 1 => Vec::new(),
            _ => model.token_nll(&ids).into_iter().map(|v| -(v as f64)).collect(),
        };
        let loss = mean_nll(&token_logprobs);
        scores.push(TextScore { text: text.clone(), ids, token_logprobs, loss, perplexity: loss.map(f64::exp) });
    }
    let all: Vec<f64> = scores.iter().flat_map(|s| s.token_logprobs.iter().copied()).collect();
    let loss = mean_nll(&all);
    Ok((scores, Overall { scored_tokens: all.len(), loss, perplexity: loss.map(f64::exp) }))
}

fn mean_nll(logprobs: &[f64]) -> Option<f64> {
    (!logprobs.is_empty()).then(|| -logprobs.iter().sum::<f64>() / logprobs.len() as f64)
}

/// Texts from a file: JSONL with a `text` field (`.jsonl`), else one text per line.
pub fn read_texts(path: &std::path::Path) -> Result<Vec<String>> {
    let content =
        std::fs::read_to_string(path).map_err(|e| bad_input(format!("{}: cannot read: {e}", path.display())))?;
    if path.extension().is_some_and(|e| e == "jsonl") {
        content
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, line)| {
                let value: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| bad_input(format!("{}:{}: not JSON: {e}", path.display(), i + 1)))?;
                value["text"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad_input(format!("{}:{}: no string field `text`", path.display(), i + 1)))
            })
            .collect()
    } else {
        Ok(content.lines().filter(|l| !l.is_empty()).map(str::to_string).collect())
    }
}

/// The human-readable report: each token with its log-likelihood, then the totals.
pub fn render(tok: &Tok, scores: &[TextScore], overall: &Overall) -> Result<String> {
    use std::fmt::Write as _;
    let mut out = String::new();
    for (i, s) in scores.iter().enumerate() {
        let figure = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
        writeln!(
            out,
            "text {}: {} tokens, loss {}, perplexity {}",
            i + 1,
            s.ids.len(),
            figure(s.loss),
            figure(s.perplexity)
        )?;
        for (j, id) in s.ids.iter().enumerate() {
            let piece = serde_json::to_string(&tok.decode(&[*id])?)?;
            match j.checked_sub(1).and_then(|k| s.token_logprobs.get(k)) {
                Some(lp) => writeln!(out, "  {piece:<24} {lp:>10.4}")?,
                None => writeln!(out, "  {piece:<24} {:>10}", "(first)")?,
            }
        }
    }
    let figure = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    writeln!(
        out,
        "overall: {} scored tokens, loss {}, perplexity {}",
        overall.scored_tokens,
        figure(overall.loss),
        figure(overall.perplexity)
    )?;
    Ok(out)
}
