//! Model selection: the best model by validation loss kept apart from the rolling checkpoints,
//! `final/` written from it when `train.final = "best"`, early stopping, and exact resume of a
//! run that tracks them.

use std::path::{Path, PathBuf};

use crate::common;
use crate::common::{pipe, stderr, stdout};
use pipe::selection::{Scored, Selection};
use pipe::spec::TrainSpec;

fn spec() -> String {
    common::spec(
        r#"
[run]
name = "select"
seed = 5
stages = ["train", "eval"]

[data]
val_fraction = 0.2
prompt_template = "{prompt}\n"

[tokenizer]
train_vocab_size = 400

[model]
layers = 2
embd = 64
context = 64

[optimizer]
lr = 5e-3

[train]
epochs = 20
batch_size = 8
eval_every = 2
checkpoint_every = 4
keep_checkpoints = 1
final = "best"
early_stopping_patience = 3
"#,
    )
}

fn setup() -> tempfile::TempDir {
    common::folder_with(&spec(), 60)
}

fn run_spec(dir: &Path, name: &str, env: &[(&str, &str)]) -> (std::process::Output, PathBuf) {
    let out = pipe(dir, &["run", "spec.toml", "--set", &format!("run.name={name}")], env);
    let run = std::fs::read_dir(dir.join("runs").join(name)).unwrap().next().unwrap().unwrap().path();
    (out, run)
}

/// The training stage's evaluations, (step, val_loss), in order.
fn evaluations(run: &Path) -> Vec<(usize, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|m| m.get("val_loss").is_some() && m.get("eval").is_none())
        .map(|m| (m["step"].as_u64().unwrap() as usize, m["val_loss"].as_f64().unwrap()))
        .collect()
}

fn meta(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("meta.json")).unwrap()).unwrap()
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

#[test]
fn the_best_model_is_kept_final_is_it_and_training_stops_when_nothing_improves() {
    let dir = setup();
    let (out, run) = run_spec(dir.path(), "select", &[("PIPE_EVAL__RESPONSES", "5")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let evals = evaluations(&run);
    let (best_at, &(best_step, best_loss)) = evals.iter().enumerate().min_by(|a, b| a.1 .1.total_cmp(&b.1 .1)).unwrap();

    // Kept apart from the rolling checkpoints (keep_checkpoints = 1), and final/ is it.
    let kept: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoints/best/best.json")).unwrap()).unwrap();
    assert_eq!(kept["step"], best_step);
    assert_eq!(pipe::checkpoint::list(&run).len(), 1);
    assert!(weights(&run.join("final")) == weights(&run.join("checkpoints/best")));
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval.json")).unwrap()).unwrap();
    assert_eq!(eval["step"], best_step, "the eval stage evaluates final/, the best model");
    assert!((eval["val_loss"].as_f64().unwrap() - best_loss).abs() < 1e-9);

    // The last model is evaluated too, beside final/ (the best).
    let last_eval: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|m| m["eval"] == "last")
        .collect();
    assert_eq!(last_eval.len(), 1);
    assert_eq!(last_eval[0]["step"], evals.last().unwrap().0);
    assert!((last_eval[0]["val_loss"].as_f64().unwrap() - evals.last().unwrap().1).abs() < 1e-9);
    assert_eq!(last_eval[0]["responses"]["examples"], 5);

    // Early stopping: exactly `patience` evaluations after the best did not improve on it.
    let patience = 3;
    assert_eq!(evals.len(), best_at + 1 + patience, "{evals:?}");
    let last_step = evals.last().unwrap().0;
    assert!(last_step < 20 * 6, "stopped before the 20 epochs' 120 steps");
    let message = stderr(&out);
    assert!(message.contains("early stopping") && message.contains(&format!("step={last_step}")), "{message}");
    let training = &meta(&run)["training"];
    assert_eq!(meta(&run)["status"], "completed");
    assert_eq!(training["stopped_early_at"], last_step);
    assert_eq!(training["best"]["step"], best_step);
    assert_eq!(
        (training["final_model"].as_str(), training["final_step"].as_u64()),
        (Some("best"), Some(best_step as u64))
    );

    // Shown by `pipe runs`, and the tools can name either model.
    let listed = stdout(&pipe(dir.path(), &["runs"], &[]));
    assert!(listed.contains(&format!("best val_loss @{best_step}")), "{listed}");
    for checkpoint in ["best", "last"] {
        let out = pipe(
            dir.path(),
            &[
                "generate",
                run.to_str().unwrap(),
                "--checkpoint",
                checkpoint,
                "--prompt",
                "Hi",
                "--greedy",
                "--max-new-tokens",
                "3",
            ],
            &[],
        );
        assert!(out.status.success(), "{checkpoint}: {}", stderr(&out));
        let out =
            pipe(dir.path(), &["score", run.to_str().unwrap(), "--checkpoint", checkpoint, "--text", "Hi there"], &[]);
        assert!(out.status.success(), "{checkpoint}: {}", stderr(&out));
    }
    let compared = stdout(&pipe(dir.path(), &["compare", "select", "select", "--json"], &[]));
    let compared: serde_json::Value = serde_json::from_str(&compared).unwrap();
    assert_eq!(compared["runs"][0]["lowest_val_loss_step"], best_step);
    assert_eq!(compared["runs"][0]["final_model"], format!("best val_loss @{best_step}"));

    // The final model's answers to five held-out prompts, scored, in eval.json, responses.jsonl,
    // TensorBoard and `pipe compare`.
    let answers = &eval["responses"];
    assert_eq!(answers["examples"], 5);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.join("responses.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    let mean_rouge = lines.iter().map(|l| l["scores"]["rouge_l"].as_f64().unwrap()).sum::<f64>() / 5.0;
    assert!((answers["rouge_l"].as_f64().unwrap() - mean_rouge).abs() < 1e-12);
    for line in &lines {
        let scores = pipe::response_metrics::ResponseScores::of(
            line["prediction"].as_str().unwrap(),
            line["reference"].as_str().unwrap(),
        );
        assert!((line["scores"]["token_f1"].as_f64().unwrap() - scores.token_f1).abs() < 1e-12);
        assert!(line["prompt"].as_str().unwrap().ends_with('\n'), "the prompt as laid out for training");
    }
    let events = pipe::tensorboard::read(&pipe::tensorboard::find(&run).unwrap()).unwrap();
    let tags: Vec<&str> =
        events.iter().flat_map(|e| e.summary.iter().flat_map(|s| &s.value)).map(|v| v.tag.as_str()).collect();
    assert!(tags.contains(&"eval/rouge_l") && tags.contains(&"eval/exact_match"), "{tags:?}");
    let compared = stdout(&pipe(dir.path(), &["compare", "select", run.to_str().unwrap()], &[]));
    assert!(compared.contains("ROUGE-L") && compared.contains("token F1"), "{compared}");
}

/// A run killed mid-training, and one stopped by a signal in the stage after early stopping,
/// resume to the same best model, the same stop and the same final weights.
#[test]
fn best_tracking_and_early_stopping_resume_exactly() {
    let dir = setup();
    let (out, reference) = run_spec(dir.path(), "reference", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    for (name, fault) in
        [("killed", ("PIPEFAULT_KILL_IN_CHECKPOINT", "12")), ("stopped", ("PIPEFAULT_SIGNAL_AT_STAGE", "eval:15"))]
    {
        let (out, run) = run_spec(dir.path(), name, &[fault]);
        assert!(!out.status.success(), "{name}");
        let out = pipe(dir.path(), &["resume", run.to_str().unwrap()], &[]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        assert!(weights(&run.join("final")) == weights(&reference.join("final")), "{name}");
        assert_eq!(evaluations(&run), evaluations(&reference), "{name}");
        assert_eq!(meta(&run)["training"], meta(&reference)["training"], "{name}");
        let out = pipe(dir.path(), &["resume", run.to_str().unwrap()], &[]);
        assert!(stdout(&out).contains("already completed"), "{name}: {}", stdout(&out));
    }
}

#[test]
fn patience_counts_evaluations_that_do_not_beat_the_best_by_min_delta() {
    let train = TrainSpec { early_stopping_patience: 2, early_stopping_min_delta: 0.1, ..TrainSpec::default() };
    let mut selection = Selection::default();
    let mut observe = |step, value| selection.observe(Scored { step, value }, &train);
    assert!(observe(1, 3.0).new_best);
    // A new best, but by less than min_delta: kept, yet patience runs.
    let small = observe(2, 2.95);
    assert!(small.new_best && !small.stop);
    // No new best: the second evaluation in a row without a real improvement ends training.
    let stop = observe(3, 2.96);
    assert!(stop.stop && !stop.new_best);
    assert_eq!(selection.best, Some(Scored { step: 2, value: 2.95 }));
    assert_eq!(selection.stopped_early_at, Some(3));
}

/// Selecting by a score of the answers to held-out prompts: every evaluation answers them, the
/// best model is the one with the highest score, and patience counts in that direction.
#[test]
fn the_best_model_can_be_chosen_by_the_answers_rouge_l() {
    let dir = setup();
    let env = [("PIPE_EVAL__RESPONSES", "4"), ("PIPE_TRAIN__SELECT_METRIC", "rouge_l"), ("PIPE_TRAIN__EPOCHS", "6")];
    let (out, run) = run_spec(dir.path(), "by-rouge", &env);
    assert!(out.status.success(), "{}", stderr(&out));
    // Each epoch's log line shows the answers' scores beside the losses.
    let epoch_lines: Vec<&str> =
        std::str::from_utf8(&out.stderr).unwrap().lines().filter(|l| l.contains("epoch done")).collect();
    assert!(!epoch_lines.is_empty());
    for line in &epoch_lines {
        for field in ["train_loss=", "val_loss=", "exact_match=", "token_f1=", "rouge_l="] {
            assert!(line.contains(field), "{field} in: {line}");
        }
    }
    let scores: Vec<(u64, f64)> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|m| m.get("val_loss").is_some() && m.get("eval").is_none())
        .map(|m| (m["step"].as_u64().unwrap(), m["rouge_l"].as_f64().expect("each evaluation scores the answers")))
        .collect();
    let best = scores.iter().copied().reduce(|best, s| if s.1 > best.1 { s } else { best }).unwrap();
    let training = &meta(&run)["training"];
    assert_eq!(training["select_metric"], "rouge_l");
    assert_eq!(training["best"]["step"], best.0);
    assert!((training["best"]["value"].as_f64().unwrap() - best.1).abs() < 1e-12);
    assert_eq!(training["final_step"], best.0);
    let events = pipe::tensorboard::read(&pipe::tensorboard::find(&run).unwrap()).unwrap();
    let rouge: usize =
        events.iter().flat_map(|e| e.summary.iter().flat_map(|s| &s.value)).filter(|v| v.tag == "val/rouge_l").count();
    assert_eq!(rouge, scores.len());
}
