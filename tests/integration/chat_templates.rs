//! Jinja chat templates against transformers' `apply_chat_template` (transformers 5.24, GPT-2's
//! tokenizer): five templates in the styles HF models ship, rendered text and token ids
//! identical, the assistant-only loss mask identical to `return_assistant_tokens_mask` (which
//! pipe derives from message boundaries, without `{% generation %}`), the generation prompt
//! identical, and a template's own refusals (`raise_exception`) reported naming the template.
//! References: `scripts/make_chat_template_reference.py` → `tests/fixtures/chat_templates`.

use std::path::{Path, PathBuf};

use crate::common::{fixture_dir, pipe, stderr, stdout};
use pipe::data::records::{Message, Record, Role};
use pipe::data::{prompt_layout, tokenize, Example, JinjaTemplate, Tok};
use pipe::error::is_bad_input;
use pipe::spec::{DataSpec, LossOn};
use serde_json::Value;

fn templates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates")
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(templates_dir().join("reference.json")).unwrap()).unwrap()
}

fn tok() -> Tok {
    Tok::load(&fixture_dir().join("tokenizer.json")).unwrap()
}

fn chat_data(template: &str) -> DataSpec {
    let text = format!(
        "[run]\nname = \"t\"\n[data]\npath = \"unused\"\nkind = \"chat\"\nchat_template = {template:?}\n[model]\npath = \"m\"\n"
    );
    toml::from_str::<pipe::spec::Spec>(&text).unwrap().data
}

fn messages(conversation: &Value) -> Vec<Message> {
    conversation
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "user" => Role::User,
                _ => Role::Assistant,
            };
            Message { role, content: m["content"].as_str().unwrap().to_string() }
        })
        .collect()
}

fn ids(value: &Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

#[test]
fn rendering_tokens_and_assistant_masks_equal_transformers() {
    let (r, tok) = (reference(), tok());
    let mut compared = 0;
    for (name, entry) in r["templates"].as_object().unwrap() {
        let path = templates_dir().join(format!("{name}.jinja"));
        let template = JinjaTemplate::resolve(path.to_str().unwrap(), None, &tok, Default::default()).unwrap().unwrap();
        let data = chat_data(path.to_str().unwrap());
        for (conversation, want) in entry["conversations"].as_object().unwrap() {
            let messages = messages(&r["conversations"][conversation]);
            let what = format!("{name} / {conversation}");
            if let Some(error) = want.get("error") {
                let got = template.render(&messages, false).unwrap_err();
                let message = format!("{got:#}");
                assert!(is_bad_input(&got), "{what}");
                assert!(
                    message.contains(error.as_str().unwrap()) && message.contains(&format!("{name}.jinja")),
                    "{what}: {message}"
                );
                continue;
            }
            assert_eq!(template.render(&messages, false).unwrap(), want["text"].as_str().unwrap(), "{what}: text");
            let example =
                Example { record: Record::Chat { messages }, file: std::path::Path::new("x").into(), line: 1 };
            // Cut before the first answer: dropped and counted, not an error.
            let cut = tokenize(std::slice::from_ref(&example), &tok, &data, Some(&template), 6, LossOn::Response);
            let (none, cut_report) = cut.unwrap();
            assert!(none.is_empty() && cut_report.dropped == 1, "{what}: nothing to train on within 6 tokens");
            let (sequences, report) =
                tokenize(&[example], &tok, &data, Some(&template), 1000, LossOn::Response).unwrap();
            assert_eq!(report.truncated + report.dropped, 0);
            assert_eq!(sequences[0].ids, ids(&want["ids"]), "{what}: token ids");
            let mask: Vec<bool> = want["assistant_masks"].as_array().unwrap().iter().map(|v| v == 1).collect();
            assert_eq!(sequences[0].trained, mask, "{what}: the assistant-only loss mask");
            compared += 1;
        }
        let layout = prompt_layout(&data, Some(&template)).unwrap();
        assert_eq!(layout.apply("Hi there"), entry["generation_prompt"].as_str().unwrap(), "{name}: generation prompt");
    }
    assert_eq!(compared, 8, "conversations compared across the five templates");
}

#[test]
fn hf_reads_the_default_of_named_templates_and_its_special_tokens() {
    let tok = tok();
    let template = JinjaTemplate::resolve("hf", Some(&templates_dir()), &tok, Default::default()).unwrap().unwrap();
    let zephyr = std::fs::read_to_string(templates_dir().join("zephyr.jinja")).unwrap();
    assert_eq!(template.source, zephyr, "the `default` of the named templates");
    assert_eq!((template.bos_token.as_str(), template.eos_token.as_str()), ("<|endoftext|>", "<|endoftext|>"));
    assert!(template.origin.ends_with("tokenizer_config.json"));
    let chatml = JinjaTemplate::resolve("chatml", None, &tok, Default::default()).unwrap().unwrap();
    let layout = prompt_layout(&chat_data("chatml"), Some(&chatml)).unwrap();
    assert_eq!(layout.template, "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n");
    assert_eq!(layout.stop.as_deref(), Some("<|im_end|>"), "generation stops at the end-of-turn marker");
    assert_eq!(
        layout.ended("Nairobi.", "<|endoftext|>"),
        "Nairobi.<|im_end|>\n",
        "a chat's history ends turns as the data does"
    );
    assert_eq!(layout.cut("Nairobi.<|im_end|>\n<|im_start|>user"), "Nairobi.");
    // Without a template to read: named.
    let dir = tempfile::tempdir().unwrap();
    let error = format!("{:#}", JinjaTemplate::resolve("hf", Some(dir.path()), &tok, Default::default()).unwrap_err());
    assert!(error.contains("tokenizer_config.json"), "{error}");
}

#[test]
fn a_template_that_does_not_render_is_reported_with_its_line() {
    let tok = tok();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.jinja");
    std::fs::write(&path, "{% for message in messages %}\n{{ message['content'] }\n{% endfor %}").unwrap();
    let template = JinjaTemplate::resolve(path.to_str().unwrap(), None, &tok, Default::default()).unwrap().unwrap();
    let error = template.render(&[Message { role: Role::User, content: "hi".into() }], false).unwrap_err();
    let message = format!("{error:#}");
    assert!(is_bad_input(&error) && message.contains("broken.jinja") && message.contains("line 2"), "{message}");
}

#[test]
fn a_chat_run_with_a_jinja_template_trains_and_generates_with_its_layout() {
    let dir = tempfile::tempdir().unwrap();
    let chats = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/chat.jsonl")).unwrap();
    std::fs::write(dir.path().join("chat.jsonl"), chats).unwrap();
    std::fs::copy(templates_dir().join("gemma.jinja"), dir.path().join("style.jinja")).unwrap();
    let spec = format!(
        "[run]\nname = \"jinja\"\nruns_dir = \"runs\"\nstages = [\"train\"]\n[data]\npath = \"chat.jsonl\"\nkind = \"chat\"\nchat_template = \"chatml\"\n\
         val_fraction = 0.0\n[model]\npath = \"{}\"\n[train]\nepochs = 1\nbatch_size = 4\nmax_length = 64\n",
        fixture_dir().display()
    );
    std::fs::write(dir.path().join("spec.toml"), &spec).unwrap();
    let out = pipe(dir.path(), &["data", "spec.toml", "-n", "1"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("<|im_start|>assistant\n[["), "the answer is trained: {}", stdout(&out));
    let out = pipe(dir.path(), &["run", "spec.toml"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = std::fs::read_dir(dir.path().join("runs/jinja")).unwrap().next().unwrap().unwrap().path();
    let layout: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("prompt_layout.json")).unwrap()).unwrap();
    assert_eq!(layout["stop"], "<|im_end|>");
    let out = pipe(
        dir.path(),
        &["generate", run.to_str().unwrap(), "--prompt", "Hi", "--max-new-tokens", "3", "--json"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let record: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(record["laid_out"], "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    let out = pipe(
        dir.path(),
        &["generate", run.to_str().unwrap(), "--prompt", "Hi", "--raw", "--max-new-tokens", "3", "--json"],
        &[],
    );
    let record: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(record["laid_out"], "Hi", "--raw keeps the text as given");

    // A template that refuses the data's conversations (gemma-style: no system role) stops the
    // run before it starts, naming the data line and the template's own message.
    let with_system = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#;
    std::fs::write(dir.path().join("chat.jsonl"), format!("{with_system}\n")).unwrap();
    let out = pipe(dir.path(), &["run", "spec.toml", "--set", "data.chat_template=style.jinja"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(
        message.contains("chat.jsonl:1")
            && message.contains("System role not supported")
            && message.contains("style.jinja"),
        "{message}"
    );
}
