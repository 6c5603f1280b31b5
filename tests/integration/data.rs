//! The data path: records and their line numbers, tokenization with EOS, loss masks, padding,
//! truncation, and gradient accumulation that does not change the step.

use std::path::Path;

use crate::common::fixture_dir;
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use pipe::data::{records, tokenize, Batch, Example, Record, Sequence, Tok};
use pipe::error::is_bad_input;
use pipe::model::{hf, Gpt2};
use pipe::spec::{DataSpec, LossOn, OptimizerSpec};
use pipe::train::Trainer;

fn data_spec() -> DataSpec {
    let spec: pipe::spec::Spec =
        toml::from_str("[run]\nname = \"t\"\n[data]\npath = \"unused\"\n[model]\npath = \"m\"\n").unwrap();
    spec.data
}

fn gpt2_tok() -> Tok {
    Tok::load(&fixture_dir().join("tokenizer.json")).unwrap()
}

fn example(prompt: &str, response: &str) -> Example {
    Example {
        record: Record::Pair { prompt: prompt.into(), response: response.into() },
        file: std::path::Path::new("x").into(),
        line: 1,
    }
}

fn pair_spec(template: &str) -> DataSpec {
    DataSpec { prompt_template: template.into(), ..data_spec() }
}

fn read_error(name: &str, contents: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, contents).unwrap();
    let error = records::read(&path, &data_spec()).unwrap_err();
    assert!(is_bad_input(&error));
    format!("{error:#}")
}

#[test]
fn jsonl_and_json_array_records_keep_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("a.jsonl");
    std::fs::write(
        &jsonl,
        "{\"prompt\": \"p1\", \"response\": \"r1\"}\n\n{\"prompt\": \"p2\", \"response\": \"r2\", \"extra\": 1}\n",
    )
    .unwrap();
    let examples = records::read(&jsonl, &data_spec()).unwrap();
    assert_eq!(
        examples,
        vec![
            Example {
                record: Record::Pair { prompt: "p1".into(), response: "r1".into() },
                file: jsonl.as_path().into(),
                line: 1
            },
            Example {
                record: Record::Pair { prompt: "p2".into(), response: "r2".into() },
                file: jsonl.as_path().into(),
                line: 3
            },
        ]
    );
    let json = dir.path().join("a.json");
    std::fs::write(&json, "[\n  {\"prompt\": \"p1\", \"response\": \"r1 {not a brace}\"},\n  {\n    \"prompt\": \"p2\",\n    \"response\": \"r2\"\n  }\n]\n").unwrap();
    let examples = records::read(&json, &data_spec()).unwrap();
    assert_eq!(examples.iter().map(|e| e.line).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(examples[0].record, Record::Pair { prompt: "p1".into(), response: "r1 {not a brace}".into() });
}

#[test]
fn custom_field_names_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qa.jsonl");
    std::fs::write(&path, "{\"question\": \"q\", \"answer\": \"a\"}\n").unwrap();
    let spec = DataSpec { prompt_field: "question".into(), response_field: "answer".into(), ..data_spec() };
    assert_eq!(
        records::read(&path, &spec).unwrap()[0].record,
        Record::Pair { prompt: "q".into(), response: "a".into() }
    );
}

#[test]
fn bad_records_name_file_and_line() {
    let message = read_error(
        "d.jsonl",
        b"{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\", \"response\": \"b\"}\n{not json}\n",
    );
    assert!(message.contains("d.jsonl:3") && message.contains("not a JSON object"), "{message}");
    let message = read_error("d.jsonl", b"{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\"}\n");
    assert!(message.contains("d.jsonl:2") && message.contains("`response`"), "{message}");
    let message = read_error("d.jsonl", b"{\"prompt\": \"a\", \"response\": 3}\n");
    assert!(message.contains("d.jsonl:1") && message.contains("must be a string"), "{message}");
    let message = read_error(
        "d.jsonl",
        b"{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"\xff\", \"response\": \"b\"}\n",
    );
    assert!(message.contains("d.jsonl:2") && message.contains("UTF-8"), "{message}");
    let message = read_error("d.jsonl", b"\n\n");
    assert!(message.contains("d.jsonl") && message.contains("no examples"), "{message}");
    let message = read_error(
        "d.json",
        b"[\n{\"prompt\": \"a\", \"response\": \"b\"},\n{\"prompt\": \"a\" \"response\": \"b\"}\n]",
    );
    assert!(message.contains("d.json:3"), "{message}");
    let error = records::read(Path::new("/nonexistent/train.jsonl"), &data_spec()).unwrap_err();
    assert!(is_bad_input(&error) && format!("{error}").contains("/nonexistent/train.jsonl"));
}

#[test]
fn response_only_mask_trains_response_and_eos_never_prompt_or_padding() {
    let tok = gpt2_tok();
    let examples = [example("What is the capital of France?\n", "Paris."), example("Hi\n", "Hello there, friend.")];
    let (sequences, report) = tokenize(&examples, &tok, &data_spec(), None, 64, LossOn::Response).unwrap();
    let prompt = tok.encode("What is the capital of France?\n").unwrap();
    let response = tok.encode("Paris.").unwrap();
    let mut want = prompt.clone();
    want.extend(&response);
    want.push(tok.eos_id);
    assert_eq!(sequences[0].ids, want);
    assert_eq!(sequences[0], Sequence::with_prompt(want.clone(), prompt.len()));
    assert_eq!(report.truncated, 0);

    // EOS doubles as padding; the EOS that ends a response must still be trained on.
    let refs: Vec<&Sequence> = sequences.iter().collect();
    let batch = Batch::<Flex>::new(&refs, tok.eos_id, &Default::default());
    let scored: Vec<i32> = batch.scored.to_data().convert::<i32>().to_vec().unwrap();
    let targets: Vec<i32> = batch.targets.to_data().convert::<i32>().to_vec().unwrap();
    let width = batch.targets.dims()[1];
    assert!(scored.windows(2).all(|w| w[0] < w[1]), "scored positions are in row-major order");
    for (row, s) in sequences.iter().enumerate() {
        for j in 0..width {
            let trained = scored.contains(&((row * width + j) as i32));
            let target_index = j + 1;
            let expect = target_index < s.ids.len() && s.trained[target_index];
            assert_eq!(trained, expect, "row {row} position {j}");
        }
        let last = s.ids.len() - 2;
        assert_eq!(targets[row * width + last], tok.eos_id as i32, "row {row} ends with EOS as a target");
        assert!(scored.contains(&((row * width + last) as i32)), "row {row}: the EOS target is trained on");
    }
    assert_eq!(batch.loss_tokens, sequences.iter().map(Sequence::loss_tokens).sum::<usize>());
    assert_eq!(sequences[0].loss_tokens(), response.len() + 1);
}

#[test]
fn whole_text_mask_trains_every_real_token() {
    let tok = gpt2_tok();
    let (sequences, _) = tokenize(&[example("Q\n", "A.")], &tok, &data_spec(), None, 64, LossOn::All).unwrap();
    assert!(sequences[0].trained.iter().all(|&t| t));
    assert_eq!(sequences[0].loss_tokens(), sequences[0].ids.len() - 1);
}

#[test]
fn long_examples_are_truncated_and_counted() {
    let tok = gpt2_tok();
    let long = "word ".repeat(50);
    let examples = [example("Prompt:\n", &long), example("Prompt:\n", "short")];
    let (sequences, report) = tokenize(&examples, &tok, &data_spec(), None, 16, LossOn::Response).unwrap();
    assert_eq!(report.truncated, 1);
    assert_eq!(sequences[0].ids.len(), 16);
    assert_ne!(*sequences[0].ids.last().unwrap(), tok.eos_id, "a cut response does not end with EOS");
    assert_eq!(*sequences[1].ids.last().unwrap(), tok.eos_id);
}

#[test]
fn a_prompt_that_does_not_fit_is_an_error_naming_the_line() {
    let tok = gpt2_tok();
    let examples = [Example {
        record: Record::Pair { prompt: "one two three four five six seven eight".into(), response: "x".into() },
        file: std::path::Path::new("data/train.jsonl").into(),
        line: 17,
    }];
    let error = tokenize(&examples, &tok, &data_spec(), None, 6, LossOn::Response).unwrap_err();
    assert!(is_bad_input(&error));
    let message = format!("{error}");
    assert!(message.contains("data/train.jsonl:17") && message.contains("max_length = 6"), "{message}");
}

type AD = Autodiff<Flex>;

fn flat_params(model: &Gpt2<Flex>) -> Vec<f32> {
    let dir = tempfile::tempdir().unwrap();
    hf::save(model, None, dir.path()).unwrap();
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

#[test]
fn gradient_accumulation_does_not_change_the_step() {
    let tok = gpt2_tok();
    let examples = [
        example("Name three primary colours.\n", "Red, yellow and blue."),
        example("What is the capital of France?\n", "The capital of France is Paris."),
        example("How many legs does a spider have?\n", "Eight."),
        example("Write a haiku about the sea.\n", "Grey waves fold and break."),
    ];
    let (sequences, _) = tokenize(&examples, &tok, &data_spec(), None, 64, LossOn::Response).unwrap();
    let all: Vec<&Sequence> = sequences.iter().collect();
    let device = Default::default();
    // Adam's first step is lr·g/(|g|+ε): with the usual tiny ε it is nearly lr·sign(g), which
    // magnifies float summation-order noise in gradients close to zero. With ε = 1 the update is
    // a smooth function of the gradient, so equal weights after the step mean equal gradients.
    let opt = OptimizerSpec { lr: 1.0, eps: 1.0, ..Default::default() };
    let step = |micro_batches: Vec<Vec<&Sequence>>| {
        let model = hf::load::<AD>(&fixture_dir(), None, &device).unwrap().1;
        let mut trainer = Trainer::<AD, Gpt2<AD>>::new(&opt, tok.eos_id, &device);
        let (model, stats) = trainer.step(model, &micro_batches, opt.lr).unwrap();
        (flat_params(&model.valid()), stats)
    };
    let (whole, whole_stats) = step(vec![all.clone()]);
    let (split, split_stats) = step(vec![all[..1].to_vec(), all[1..3].to_vec(), all[3..].to_vec()]);
    assert!((whole_stats.loss - split_stats.loss).abs() < 1e-5, "{} vs {}", whole_stats.loss, split_stats.loss);
    assert!((whole_stats.grad_norm - split_stats.grad_norm).abs() < 1e-4 * whole_stats.grad_norm);
    let max_diff = whole.iter().zip(&split).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max_diff < 1e-6, "weights differ by {max_diff} after one step");
}

#[test]
fn the_prompt_template_lays_out_the_prompt_and_is_masked_with_it() {
    let tok = gpt2_tok();
    let template = "### Question\n{prompt}\n### Answer\n";
    let examples = [example("Why is the sky blue?", "Scattering.")];
    let (sequences, _) = tokenize(&examples, &tok, &pair_spec(template), None, 64, LossOn::Response).unwrap();
    let prompt = tok.encode("### Question\nWhy is the sky blue?\n### Answer\n").unwrap();
    assert_eq!(&sequences[0].ids[..prompt.len()], &prompt[..]);
    assert_eq!(sequences[0].trained.iter().position(|&t| t), Some(prompt.len()), "the whole laid-out prompt is masked");
    assert_eq!(tok.decode(&sequences[0].ids[prompt.len()..]).unwrap(), "Scattering.");
}

/// Sequences of lengths 2..=101 in a scrambled order.
fn varied_lengths(n: usize) -> Vec<Sequence> {
    (0..n).map(|i| Sequence::all_trained(vec![1; 2 + (i * 37) % 100])).collect()
}

/// Padded positions over the steps of an order: each step padded to its longest sequence.
fn padding(train: &[Sequence], order: &[usize], per_step: usize) -> usize {
    order
        .chunks(per_step)
        .map(|step| {
            let longest = step.iter().map(|&i| train[i].ids.len()).max().unwrap();
            step.iter().map(|&i| longest - train[i].ids.len()).sum::<usize>()
        })
        .sum()
}

#[test]
fn group_by_length_keeps_every_example_once_cuts_padding_and_is_reproducible() {
    use pipe::train::epoch_order;
    let (train, per_step) = (varied_lengths(1003), 8);
    let examples = pipe::data::Examples::from(train.clone());
    let plain = epoch_order(&examples, 7, 1, None);
    let grouped = epoch_order(&examples, 7, 1, Some(per_step));
    let mut sorted = grouped.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..train.len()).collect::<Vec<_>>(), "a permutation of the examples");
    assert_eq!(grouped, epoch_order(&examples, 7, 1, Some(per_step)), "same seed and epoch, same order");
    assert_ne!(grouped, epoch_order(&examples, 7, 2, Some(per_step)), "a new order each epoch");
    let (plain_padding, grouped_padding) = (padding(&train, &plain, per_step), padding(&train, &grouped, per_step));
    assert!(grouped_padding * 5 < plain_padding, "padding {grouped_padding} grouped vs {plain_padding} plain");
    // Steps are shuffled after sorting: the epoch does not run from longest to shortest.
    let step_longest: Vec<usize> =
        grouped[..1000].chunks(per_step).map(|s| s.iter().map(|&i| train[i].ids.len()).max().unwrap()).collect();
    assert!(step_longest.windows(2).any(|w| w[1] > w[0]), "steps in sorted order");
}
