//! HuggingFace chat templates: the Jinja templates models ship in `tokenizer_config.json`, a
//! `.jinja` file, or the built-in ChatML, rendered with minijinja and its Python-compatibility
//! methods (`.strip()`, `.items()`, …) as transformers' `apply_chat_template` renders them
//! (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`).
//!
//! The assistant-only loss needs to know which characters are the assistant's. pipe derives it
//! from message boundaries, without a "response template" search and without HF's
//! `{% generation %}` tag: for each assistant message `i`, the conversation up to it rendered
//! with the generation prompt ends where the answer begins, and the conversation through it
//! ends where the answer (with its end-of-turn marker) ends. A template for which these
//! renderings are not prefixes of the whole conversation's is refused, naming the message.

use std::ops::Range;
use std::path::Path;

use anyhow::Result;
use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use super::records::{Message, Role};
use super::Tok;
use crate::error::bad_input;

/// ChatML, the layout of OpenAI's and many open models' chat fine-tunes.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// What stands for the user's text while a prompt layout is rendered.
const PROMPT_MARK: &str = "\u{E000}pipe-prompt\u{E000}";

/// A Jinja chat template with the special tokens it is rendered with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JinjaTemplate {
    /// The template text.
    pub source: String,
    /// Where it came from, for messages: `chatml`, a `.jinja` file, a `tokenizer_config.json`.
    pub origin: String,
    pub bos_token: String,
    pub eos_token: String,
    /// How much a rendering may take: they bound the work, not the result, so they are not
    /// part of what a template is (nor of the cache key).
    #[serde(skip)]
    pub limits: RenderLimits,
}

/// The most a template may do to render one conversation (`data.max_template_steps`,
/// `data.max_record_bytes`): a loop without end or a runaway output is refused, not waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenderLimits {
    pub steps: u64,
    pub bytes: usize,
}

impl Default for RenderLimits {
    fn default() -> Self {
        let data = crate::spec::DataSpec::default();
        Self { steps: data.max_template_steps, bytes: data.max_record_bytes }
    }
}

/// What the template writes, up to `max` bytes; past that, the rendering fails.
struct Capped {
    written: Vec<u8>,
    max: usize,
    over: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.written.len() + bytes.len() > self.max {
            self.over = true;
            return Err(std::io::Error::other("past data.max_record_bytes"));
        }
        self.written.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl JinjaTemplate {
    /// The Jinja template `chat_template` names, or None when it is pipe's `simple` layout or a
    /// `{role}`/`{content}` format string: `chatml`; `hf`, the `chat_template` of
    /// `tokenizer_config.json` in `tokenizer_dir` (a string, or the `default` of a list of named
    /// templates); or a path to a `.jinja` file.
    pub fn resolve(
        chat_template: &str,
        tokenizer_dir: Option<&Path>,
        tok: &Tok,
        limits: RenderLimits,
    ) -> Result<Option<Self>> {
        let eos = tok.eos_token();
        let plain = |source: String, origin: String| Self {
            source,
            origin,
            bos_token: eos.clone(),
            eos_token: eos.clone(),
            limits,
        };
        match chat_template {
            "chatml" => Ok(Some(plain(CHATML.to_string(), "chatml".into()))),
            "hf" => {
                let Some(dir) = tokenizer_dir else {
                    return Err(bad_input(
                        "data.chat_template = \"hf\": there is no model or tokenizer folder to read tokenizer_config.json from",
                    ));
                };
                Self::from_tokenizer_config(&dir.join("tokenizer_config.json"), &eos, limits).map(Some)
            }
            path if path.ends_with(".jinja") => {
                let source = crate::files::read_regular_to_string(Path::new(path))
                    .map_err(|e| bad_input(format!("data.chat_template: {e}")))?;
                Ok(Some(plain(source, path.to_string())))
            }
            _ => Ok(None),
        }
    }

    fn from_tokenizer_config(path: &Path, eos: &str, limits: RenderLimits) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad_input(format!("data.chat_template = \"hf\": {}: cannot read: {e}", path.display())))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad_input(format!("{}: not valid JSON: {e}", path.display())))?;
        let source = match config.get("chat_template") {
            Some(serde_json::Value::String(source)) => source.clone(),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .map(str::to_string)
                .ok_or_else(|| bad_input(format!("{}: `chat_template` lists no `default` template", path.display())))?,
            _ => {
                return Err(bad_input(format!(
                    "{}: no `chat_template` (data.chat_template = \"hf\" reads the model's own template)",
                    path.display()
                )))
            }
        };
        // A special token is a string or an AddedToken object with its `content`.
        let token = |key: &str| match config.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(object) => object.get("content")?.as_str().map(str::to_string),
            None => None,
        };
        Ok(Self {
            source,
            origin: path.display().to_string(),
            bos_token: token("bos_token").unwrap_or_else(|| eos.to_string()),
            eos_token: token("eos_token").unwrap_or_else(|| eos.to_string()),
            limits,
        })
    }

    /// The conversation as the template lays it out.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        let failed = |e: minijinja::Error| {
            let line = e.line().map(|l| format!(" (template line {l})")).unwrap_or_default();
            let detail = e.detail().map(|d| format!(": {d}")).unwrap_or_default();
            bad_input(format!("{}: the chat template does not render{line}: {}{detail}", self.origin, e.kind()))
        };
        env.set_fuel(Some(self.limits.steps));
        let template = env.template_from_str(&self.source).map_err(failed)?;
        let messages: Vec<_> =
            messages.iter().map(|m| context! { role => m.role.name(), content => m.content.as_str() }).collect();
        let mut out = Capped { written: Vec::new(), max: self.limits.bytes, over: false };
        let rendered = template.render_captured_to(
            context! {
                messages,
                add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            },
            &mut out,
        );
        match rendered {
            Ok(_) => String::from_utf8(out.written)
                .map_err(|_| bad_input(format!("{}: the chat template renders text that is not UTF-8", self.origin))),
            Err(_) if out.over => Err(bad_input(format!(
                "{}: the chat template renders a conversation to more than data.max_record_bytes allows ({}); raise data.max_record_bytes if that is meant",
                self.origin, self.limits.bytes
            ))),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(bad_input(format!(
                "{}: the chat template did not finish rendering a conversation within data.max_template_steps ({} steps; a loop without end?); raise data.max_template_steps if that is meant",
                self.origin, self.limits.steps
            ))),
            Err(e) => Err(failed(e)),
        }
    }

    /// The whole conversation, and the byte ranges of it that are the assistant's answers (each
    /// with its end-of-turn marker, without the whitespace that follows).
    pub fn render_with_answers(&self, messages: &[Message]) -> Result<(String, Vec<Range<usize>>)> {
        let text = self.render(messages, false)?;
        let mut answers = Vec::new();
        for (i, message) in messages.iter().enumerate().filter(|(_, m)| m.role == Role::Assistant) {
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !text.starts_with(&before) || !text.starts_with(&through) || through.len() < before.len() {
                return Err(bad_input(format!(
                    "{}: the chat template does not lay a conversation out message by message (rendering it up to message {i} is not the start of the whole), so the assistant's tokens cannot be found",
                    self.origin
                )));
            }
            let answer = through[before.len()..].trim_end();
            if !message.content.trim().is_empty() && answer.is_empty() {
                return Err(bad_input(format!("{}: the chat template drops assistant message {i}", self.origin)));
            }
            answers.push(before.len()..before.len() + answer.len());
        }
        Ok((text, answers))
    }

    /// How a user's prompt is laid out to be answered: one user message and the generation
    /// prompt, with `{prompt}` where the text goes.
    pub fn prompt_layout(&self) -> Result<String> {
        let user = Message { role: Role::User, content: PROMPT_MARK.to_string() };
        let layout = self.render(std::slice::from_ref(&user), true)?;
        if !layout.contains(PROMPT_MARK) {
            return Err(bad_input(format!("{}: the chat template does not show the user's message", self.origin)));
        }
        Ok(layout.replace(PROMPT_MARK, "{prompt}"))
    }

    /// What the template puts after an assistant's answer to end its turn, whitespace and all
    /// (`<|im_end|>\n`); its trimmed text is where generation stops.
    pub fn after_answer(&self) -> Result<String> {
        let messages = [
            Message { role: Role::User, content: "hi".into() },
            Message { role: Role::Assistant, content: PROMPT_MARK.to_string() },
        ];
        let text = self.render(&messages, false)?;
        Ok(text.split_once(PROMPT_MARK).map(|(_, after)| after.to_string()).unwrap_or_default())
    }
}
