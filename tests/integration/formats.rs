//! Datasets as people have them: each format's rendered text and loss mask checked token by
//! token, bad records reported with their line, and the tokenized cache's hits, misses,
//! invalidation and repair.

use std::path::Path;

use crate::common;
use crate::common::{fixture_dir, pipe, stderr, stdout};
use pipe::data::records::{self, Message, Record, Role};
use pipe::data::{prompt_layout, tokenize, Example, Sequence, Tok};
use pipe::error::is_bad_input;
use pipe::spec::{DataSpec, LossOn};

fn tok() -> Tok {
    Tok::load(&fixture_dir().join("tokenizer.json")).unwrap()
}

/// A data section as the spec would give it, from TOML lines.
fn data_spec(extra: &str) -> DataSpec {
    let text = format!("[run]\nname = \"t\"\n[data]\npath = \"unused\"\n{extra}\n[model]\npath = \"m\"\n");
    toml::from_str::<pipe::spec::Spec>(&text).unwrap().data
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Expected ids and mask from (text, trained) pieces and EOS markers.
fn expect(tok: &Tok, pieces: &[(&str, bool)]) -> Sequence {
    let (mut ids, mut trained) = (Vec::new(), Vec::new());
    for &(text, train) in pieces {
        let piece = if text == "<EOS>" { vec![tok.eos_id] } else { tok.encode(text).unwrap() };
        trained.extend(std::iter::repeat_n(train, piece.len()));
        ids.extend(piece);
    }
    Sequence::new(ids, trained)
}

#[test]
fn csv_with_quotes_and_embedded_newlines() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "pairs.csv",
        "question,answer,notes\n\"Say \"\"hi\"\", please\",\"Hi,\nthere.\",x\nplain,simple,y\n",
    );
    let spec = data_spec("prompt_field = \"question\"\nresponse_field = \"answer\"");
    let examples = records::read(&path, &spec).unwrap();
    assert_eq!(examples.len(), 2);
    assert_eq!(
        examples[0].record,
        Record::Pair { prompt: "Say \"hi\", please".into(), response: "Hi,\nthere.".into() }
    );
    assert_eq!((examples[0].line, examples[1].line), (2, 4), "lines where the records start");
}

#[test]
fn csv_and_jsonl_bad_records_name_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let spec = data_spec("");
    let err = |name: &str, text: &str, spec: &DataSpec| {
        let e = records::read(&write(dir.path(), name, text), spec).unwrap_err();
        assert!(is_bad_input(&e));
        format!("{e}")
    };
    let m = err("a.csv", "prompt,response\na,b\nc,d,e\n", &spec);
    assert!(m.contains("a.csv:3"), "{m}");
    let m = err("b.csv", "prompt,answer\na,b\n", &spec);
    assert!(m.contains("b.csv:2") && m.contains("`response`"), "{m}");
    let chat = data_spec("kind = \"chat\"");
    let m = err("c.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"assistant\", \"content\": \"y\"}]}\n{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}\n", &chat);
    assert!(m.contains("c.jsonl:2") && m.contains("`robot`"), "{m}");
    let m = err("d.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n", &chat);
    assert!(m.contains("d.jsonl:1") && m.contains("no assistant message"), "{m}");
    let m = err(
        "e.jsonl",
        "{\"messages\": [{\"role\": \"user\"}, {\"role\": \"assistant\", \"content\": \"y\"}]}\n",
        &chat,
    );
    assert!(m.contains("e.jsonl:1") && m.contains("message 1"), "{m}");
    let m = err("f.csv", "messages\nx\n", &chat);
    assert!(m.contains("f.csv:2") && m.contains("JSON"), "{m}");
    let alpaca = data_spec("kind = \"alpaca\"");
    let m = err("g.jsonl", "{\"instruction\": \"x\", \"output\": \"y\"}\n{\"output\": \"y\"}\n", &alpaca);
    assert!(m.contains("g.jsonl:2") && m.contains("`instruction`"), "{m}");
    let m = err("h.txt", "a document\n", &spec);
    assert!(m.contains("h.txt") && m.contains("kind = \"text\""), "{m}");
}

#[test]
fn alpaca_layouts_with_and_without_input() {
    let tok = tok();
    let spec = data_spec("kind = \"alpaca\"");
    let examples = [
        Example {
            record: Record::Alpaca { instruction: "Add the numbers.".into(), input: "2, 3".into(), output: "5".into() },
            file: Path::new("x").into(),
            line: 1,
        },
        Example {
            record: Record::Alpaca { instruction: "Say hello.".into(), input: "".into(), output: "Hello!".into() },
            file: Path::new("x").into(),
            line: 2,
        },
    ];
    let (sequences, _) = tokenize(&examples, &tok, &spec, None, 200, LossOn::Response).unwrap();
    let with_input = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2, 3\n\n### Response:\n";
    let without = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nSay hello.\n\n### Response:\n";
    assert_eq!(sequences[0], expect(&tok, &[(with_input, false), ("5", true), ("<EOS>", true)]));
    assert_eq!(sequences[1], expect(&tok, &[(without, false), ("Hello!", true), ("<EOS>", true)]));
    assert_eq!(
        prompt_layout(&spec, None).unwrap().template.replace("{prompt}", "Say hello."),
        without,
        "generation uses the no-input layout"
    );
}

fn conversation() -> Example {
    let m = |role, content: &str| Message { role, content: content.into() };
    Example {
        record: Record::Chat {
            messages: vec![
                m(Role::System, "Be brief."),
                m(Role::User, "Capital of France?"),
                m(Role::Assistant, "Paris."),
                m(Role::User, "And Spain?"),
                m(Role::Assistant, "Madrid."),
            ],
        },
        file: Path::new("x").into(),
        line: 1,
    }
}

#[test]
fn multi_turn_chat_trains_only_assistant_turns_each_ending_with_eos() {
    let tok = tok();
    let spec = data_spec("kind = \"chat\"");
    let (sequences, report) = tokenize(&[conversation()], &tok, &spec, None, 200, LossOn::Response).unwrap();
    let want = expect(
        &tok,
        &[
            ("<|system|>\nBe brief.\n", false),
            ("<|user|>\nCapital of France?\n", false),
            ("<|assistant|>\n", false),
            ("Paris.\n", true),
            ("<EOS>", true),
            ("<|user|>\nAnd Spain?\n", false),
            ("<|assistant|>\n", false),
            ("Madrid.\n", true),
            ("<EOS>", true),
        ],
    );
    assert_eq!(sequences[0], want);
    assert_eq!(report.trained_tokens, want.trained.iter().filter(|&&t| t).count());
    assert_eq!(prompt_layout(&spec, None).unwrap().template, "<|user|>\n{prompt}\n<|assistant|>\n");

    // With the loss on everything, every token after the first is trained on.
    let (all, _) = tokenize(&[conversation()], &tok, &spec, None, 200, LossOn::All).unwrap();
    assert_eq!(all[0].ids, want.ids);
    assert!(all[0].trained.iter().all(|&t| t));
}

/// ShareGPT's conversations (`{from, value}` turns, roles system/human/gpt, under
/// `conversations`) read as the same messages as OpenAI's `{role, content}`, and so train alike.
#[test]
fn sharegpt_conversations_read_as_the_same_messages() {
    let dir = tempfile::tempdir().unwrap();
    let sharegpt = write(
        dir.path(),
        "sharegpt.jsonl",
        r#"{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."}, {"from": "human", "value": "And Spain?"}, {"from": "gpt", "value": "Madrid."}]}"#,
    );
    let openai = write(
        dir.path(),
        "openai.jsonl",
        r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"}, {"role": "assistant", "content": "Madrid."}]}"#,
    );
    let read_sharegpt =
        records::read(&sharegpt, &data_spec("kind = \"chat\"\nmessages_field = \"conversations\"")).unwrap();
    let read_openai = records::read(&openai, &data_spec("kind = \"chat\"")).unwrap();
    let records = |examples: Vec<Example>| examples.into_iter().map(|e| (e.record, e.line)).collect::<Vec<_>>();
    let want = records(vec![conversation()]);
    assert_eq!(records(read_sharegpt), want);
    assert_eq!(records(read_openai), want);

    // Left at `messages`, the field is named; a role ShareGPT data may hold but pipe does not
    // train (tool turns) is refused naming it.
    let error = format!("{:#}", records::read(&sharegpt, &data_spec("kind = \"chat\"")).unwrap_err());
    assert!(error.contains("sharegpt.jsonl:1") && error.contains("data.messages_field = \"conversations\""), "{error}");
    let tool = write(
        dir.path(),
        "tool.jsonl",
        r#"{"conversations": [{"from": "human", "value": "Weather?"}, {"from": "observation", "value": "{}"}, {"from": "gpt", "value": "Sunny."}]}"#,
    );
    let error = format!(
        "{:#}",
        records::read(&tool, &data_spec("kind = \"chat\"\nmessages_field = \"conversations\"")).unwrap_err()
    );
    assert!(
        error.contains("tool.jsonl:1: message 2") && error.contains("`observation`") && error.contains("human or gpt"),
        "{error}"
    );
}

#[test]
fn a_custom_chat_template_and_conversations_that_do_not_fit() {
    let tok = tok();
    let spec = data_spec("kind = \"chat\"\nchat_template = \"[{role}] {content} |\"");
    let (sequences, _) = tokenize(&[conversation()], &tok, &spec, None, 200, LossOn::Response).unwrap();
    let want = expect(
        &tok,
        &[
            ("[system] Be brief. |", false),
            ("[user] Capital of France? |", false),
            ("[assistant] ", false),
            ("Paris. |", true),
            ("<EOS>", true),
            ("[user] And Spain? |", false),
            ("[assistant] ", false),
            ("Madrid. |", true),
            ("<EOS>", true),
        ],
    );
    assert_eq!(sequences[0], want);
    // Cut inside the second exchange: the first answer stays trained, the rest is dropped.
    let cut = want.trained.iter().rposition(|&t| !t).unwrap();
    let (short, report) = tokenize(&[conversation()], &tok, &spec, None, cut, LossOn::Response).unwrap();
    assert_eq!(short[0].ids, want.ids[..cut]);
    assert_eq!(report.truncated, 1);
    // A limit before the first answer leaves nothing to train on: the conversation is dropped.
    let (none, report) = tokenize(&[conversation()], &tok, &spec, None, 8, LossOn::Response).unwrap();
    assert!(none.is_empty());
    assert_eq!(report.dropped, 1);
}

#[test]
fn documents_are_packed_with_eos_between_and_every_token_trained_once() {
    let tok = tok();
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "corpus.txt",
        "The first document is short.\n\nThe second one is a little longer than the first.\nThird.\n",
    );
    let spec = data_spec("kind = \"text\"");
    let examples = records::read(&path, &spec).unwrap();
    assert_eq!(examples.iter().map(|e| e.line).collect::<Vec<_>>(), vec![1, 3, 4]);
    let mut stream = Vec::new();
    for doc in ["The first document is short.", "The second one is a little longer than the first.", "Third."] {
        stream.extend(tok.encode(doc).unwrap());
        stream.push(tok.eos_id);
    }
    let (blocks, report) = tokenize(&examples, &tok, &spec, None, 8, LossOn::Response).unwrap();
    assert!(blocks.iter().all(|b| b.ids.len() <= 8 && b.trained.iter().all(|&t| t)));
    // Consecutive blocks overlap by one token, so each token after the first is a target once.
    let mut rebuilt = blocks[0].ids.clone();
    for b in &blocks[1..] {
        assert_eq!(b.ids[0], *rebuilt.last().unwrap());
        rebuilt.extend(&b.ids[1..]);
    }
    assert_eq!(rebuilt, stream);
    assert_eq!(report.trained_tokens, stream.len() - 1);
    let whole = data_spec("kind = \"text\"\ndocuments = \"file\"");
    assert_eq!(records::read(&path, &whole).unwrap().len(), 1);
}

fn spec() -> String {
    common::spec(
        r#"
[run]
name = "cache"
"#,
    )
}

#[test]
fn the_tokenized_cache_hits_misses_invalidates_and_repairs() {
    let dir = tempfile::tempdir().unwrap();
    let data = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sft.jsonl")).unwrap();
    let lines: Vec<&str> = data.lines().take(20).collect();
    std::fs::write(dir.path().join("train.jsonl"), lines.join("\n")).unwrap();
    std::fs::write(dir.path().join("spec.toml"), spec()).unwrap();
    let data_cmd = |args: &[&str]| {
        let mut all = vec!["data", "spec.toml", "-n", "1"];
        all.extend_from_slice(args);
        let out = pipe(dir.path(), &all, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        (stderr(&out), stdout(&out))
    };
    let (first, shown) = data_cmd(&[]);
    assert!(first.contains("tokenized the data and cached it"), "{first}");
    let (second, shown_again) = data_cmd(&[]);
    assert!(second.contains("reusing the tokenized data from the cache"), "{second}");
    assert_eq!(shown, shown_again, "the cache gives back what tokenizing gave");
    // A setting that changes the result is a miss.
    let (changed, _) = data_cmd(&["--set", "train.max_length=40"]);
    assert!(changed.contains("tokenized the data and cached it"), "{changed}");
    // So is a change to the data file.
    std::fs::write(dir.path().join("train.jsonl"), lines[..19].join("\n")).unwrap();
    let (edited, _) = data_cmd(&[]);
    assert!(edited.contains("tokenized the data and cached it"), "{edited}");
    // A damaged entry is detected and rebuilt.
    let entries: Vec<_> =
        std::fs::read_dir(dir.path().join("runs/.cache/tokenized")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(entries.len(), 3);
    // Cut short, or one token id changed in place.
    for (i, entry) in entries.iter().enumerate() {
        let mut bytes = std::fs::read(entry).unwrap();
        match i {
            0 => bytes.truncate(bytes.len() / 2),
            _ => *bytes.last_mut().unwrap() ^= 1,
        }
        std::fs::write(entry, &bytes).unwrap();
    }
    let (repaired, _) = data_cmd(&[]);
    assert!(
        repaired.contains("corrupt; rebuilding") && repaired.contains("tokenized the data and cached it"),
        "{repaired}"
    );
    let (again, _) = data_cmd(&[]);
    assert!(again.contains("reusing the tokenized data from the cache"), "{again}");
}

#[test]
fn every_shipped_pipeline_checks_and_renders() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut specs: Vec<_> = std::fs::read_dir(root.join("pipelines")).unwrap().map(|e| e.unwrap().path()).collect();
    specs.sort();
    assert!(specs.len() >= 7, "{specs:?}");
    for path in specs {
        let spec = path.file_stem().unwrap().to_string_lossy().to_string();
        let out = pipe(root, &["check", path.to_str().unwrap()], &[]);
        assert!(out.status.success(), "{spec}: {}", stderr(&out));
        let text: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
        let model = text["model"].get("path").and_then(|p| p.as_str()).map(|p| root.join("pipelines").join(p));
        if model.is_some_and(|dir| !dir.exists()) {
            continue; // the checkpoint it fine-tunes is not shipped
        }
        let runs = tempfile::tempdir().unwrap();
        let out = pipe(
            root,
            &["data", path.to_str().unwrap(), "-n", "1", "--set", &format!("run.runs_dir={}", runs.path().display())],
            &[],
        );
        assert!(out.status.success(), "{spec}: {}", stderr(&out));
        let text = stdout(&out);
        assert!(text.contains("[[") && text.contains("<|endoftext|>"), "{spec}: {text}");
    }
}

/// `data.path` names several files — a list, or a glob whose matches are read in name order —
/// all of one kind: their examples are read one file after another, a bad record is named by
/// its own file and line, the run's input hash covers every file, and a glob that matches
/// nothing is refused naming it.
#[test]
fn several_data_files_by_list_or_glob_are_read_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lines: Vec<String> = std::fs::read_to_string(common::repo().join("data/sft.jsonl"))
        .unwrap()
        .lines()
        .take(30)
        .map(str::to_string)
        .collect();
    std::fs::create_dir(d.join("shards")).unwrap();
    write(d, "shards/train-00001-of-00002.jsonl", &lines[20..].join("\n"));
    write(d, "shards/train-00000-of-00002.jsonl", &lines[..20].join("\n"));
    write(d, "all.jsonl", &lines.join("\n"));
    let spec = |path: &str| {
        common::spec(&format!("[data]\npath = {path}\nval_fraction = 0.1\n[train]\nepochs = 1\nbatch_size = 4"))
    };
    let printed = |spec_text: String| {
        write(d, "spec.toml", &spec_text);
        let out = pipe(d, &["data", "spec.toml", "-n", "30"], &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let whole = printed(spec("\"all.jsonl\""));
    assert!(whole.contains("27 examples"), "{whole}");
    assert_eq!(printed(spec("\"shards/train-*.jsonl\"")), whole, "a glob reads the shards in name order");
    let listed = spec("[\"shards/train-00000-of-00002.jsonl\", \"shards/train-00001-of-00002.jsonl\"]");
    assert_eq!(printed(listed.clone()), whole, "as does the list");

    // The run's recorded input covers both shards: a change to the second is found on resume.
    write(d, "spec.toml", &listed);
    let out = pipe(d, &["run", "spec.toml"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = common::newest_run(d, "test");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("meta.json")).unwrap()).unwrap();
    assert!(meta["inputs"]["data.path"]["path"].as_str().unwrap().contains("train-00001-of-00002.jsonl"), "{meta}");
    let meta_text = std::fs::read_to_string(run.join("meta.json")).unwrap().replace("\"completed\"", "\"failed\"");
    std::fs::write(run.join("meta.json"), meta_text).unwrap();
    write(d, "shards/train-00001-of-00002.jsonl", &lines[21..].join("\n"));
    let out = pipe(d, &["resume", run.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("data.path") && stderr(&out).contains("changed"), "{}", stderr(&out));

    // A bad record is named by its shard and line; a glob that matches nothing is refused.
    write(d, "shards/train-00001-of-00002.jsonl", &format!("{}\n{{\"prompt\": 5}}", lines[20]));
    write(d, "spec.toml", &spec("\"shards/train-*.jsonl\""));
    let out = pipe(d, &["data", "spec.toml"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("train-00001-of-00002.jsonl:2"), "{}", stderr(&out));
    write(d, "spec.toml", &spec("\"shards/valid-*.jsonl\""));
    let out = pipe(d, &["data", "spec.toml"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("valid-*.jsonl") && stderr(&out).contains("matches no file"), "{}", stderr(&out));
}
