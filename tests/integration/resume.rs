//! Runs that survive: a run killed (SIGKILL) at a chosen step, or in the middle of writing a
//! checkpoint, or stopped with Ctrl-C, and then resumed, ends with final weights byte-identical
//! to an uninterrupted run's, and with the same metrics for every step.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common;
use crate::common::{pipe, spawn, status, stderr, step_losses};

fn spec() -> String {
    common::spec(
        r#"
[run]
name = "survive"
seed = 11

[data]
val_fraction = 0.1
prompt_template = "{prompt}\n"

[tokenizer]
train_vocab_size = 400

[model]
layers = 2
embd = 64
context = 64
dropout = 0.1

[optimizer]
lr = 2e-3
schedule = "cosine"
warmup_steps = 3
grad_clip = 1.0

[train]
epochs = 3
batch_size = 4
grad_accum = 2
checkpoint_every = 3
keep_checkpoints = 2
eval_every = 2

[generate]
prompts = ["What is the capital of Kenya?"]
max_new_tokens = 6
"#,
    )
}

fn setup() -> tempfile::TempDir {
    common::folder_with(&spec(), 60)
}

fn runs(dir: &Path) -> Vec<PathBuf> {
    let mut runs: Vec<PathBuf> =
        std::fs::read_dir(dir.join("runs/survive")).map(|d| d.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
    runs.sort();
    runs
}

/// A `pipe run` that the fault hook kills (SIGKILL) while it writes the checkpoint of `step`;
/// its run folder.
fn killed_in_checkpoint(dir: &Path, step: &str) -> PathBuf {
    let mut child = spawn(dir, &["run", "spec.toml"], &[("PIPEFAULT_KILL_IN_CHECKPOINT", step)]);
    child.wait().unwrap();
    runs(dir).pop().unwrap()
}

/// The newest run folder, once `ready` holds for it.
fn wait_for_run(dir: &Path, ready: impl Fn(&Path) -> bool) -> PathBuf {
    loop {
        if let Some(run) = runs(dir).pop() {
            if ready(&run) {
                return run;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Validation records (epoch ends, `eval_every`, the eval stage) as (step, val_loss), in file order.
fn val_losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|m| m.get("val_loss").is_some())
        .map(|m| (m["step"].as_u64().unwrap(), m["val_loss"].as_f64().unwrap()))
        .collect()
}

fn last_step(run: &Path) -> u64 {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

fn weights(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("final/model.safetensors")).unwrap()
}

/// The uninterrupted run every interrupted one is compared with.
fn reference(dir: &Path) -> PathBuf {
    let out = pipe(dir, &["run", "spec.toml", "--set", "run.name=reference"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::read_dir(dir.join("runs/reference")).unwrap().next().unwrap().unwrap().path()
}

fn resume_and_compare(dir: &Path, run: &Path, reference: &Path) {
    let out = pipe(dir, &["resume", run.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(status(run), "completed");
    assert!(weights(run) == weights(reference), "final weights differ from the uninterrupted run's");
    let (ours, theirs) = (step_losses(run), step_losses(reference));
    assert_eq!(
        ours.iter().map(|s| s.0).collect::<Vec<_>>(),
        (1..=ours.len() as u64).collect::<Vec<_>>(),
        "no duplicate or missing steps"
    );
    assert_eq!(ours, theirs, "every step's loss is the same as the uninterrupted run's");
    assert_eq!(val_losses(run), val_losses(reference), "every evaluation once, with the same loss");
    let samples = |r: &Path| std::fs::read_to_string(r.join("samples.jsonl")).unwrap();
    assert_eq!(samples(run), samples(reference));
}

#[test]
fn sigkill_at_a_step_then_resume_is_exact() {
    let dir = setup();
    let reference = reference(dir.path());
    let total = step_losses(&reference).len() as u64;
    assert_eq!(total, 21, "54 examples in steps of 8, 3 epochs");
    for kill_after in [5, 13] {
        let mut child = spawn(dir.path(), &["run", "spec.toml"], &[]);
        let run = loop {
            if let Some(run) = runs(dir.path()).pop() {
                if last_step(&run) >= kill_after {
                    break run;
                }
            }
            assert!(child.try_wait().unwrap().is_none(), "the run ended before step {kill_after}");
            std::thread::sleep(Duration::from_millis(2));
        };
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert_eq!(status(&run), "running", "a killed run does not claim to be finished");
        assert!(last_step(&run) < total);
        resume_and_compare(dir.path(), &run, &reference);
        std::fs::remove_dir_all(&run).unwrap();
    }
}

#[test]
fn a_crash_while_writing_a_checkpoint_leaves_no_checkpoint_that_looks_complete() {
    let dir = setup();
    let reference = reference(dir.path());
    let mut child = spawn(dir.path(), &["run", "spec.toml"], &[("PIPEFAULT_KILL_IN_CHECKPOINT", "9")]);
    let status_code = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status_code.signal(), Some(libc::SIGKILL), "the run was killed in the checkpoint write");
    let run = runs(dir.path()).pop().unwrap();
    let checkpoints: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(checkpoints.contains(&".step-000009.partial".to_string()), "{checkpoints:?}");
    assert!(!checkpoints.contains(&"step-000009".to_string()), "{checkpoints:?}");
    assert!(checkpoints.contains(&"step-000006".to_string()), "the last good checkpoint is kept: {checkpoints:?}");
    // What a kill inside a pruning leaves (the checkpoint renamed to a hidden name, not yet
    // deleted): no later pruning names step 3 again, so the resumed run must clear it itself.
    let checkpoints_dir = run.join("checkpoints");
    std::fs::rename(checkpoints_dir.join("step-000003"), checkpoints_dir.join(".step-000003.removing")).unwrap();
    resume_and_compare(dir.path(), &run, &reference);
    let mut entries: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        ["best", "step-000018", "step-000021"],
        "keep_checkpoints = 2, the best apart, no partial or half-removed one left"
    );
}

#[test]
fn killed_before_the_first_checkpoint_resumes_from_the_start() {
    let dir = setup();
    let reference = reference(dir.path());
    let run = killed_in_checkpoint(dir.path(), "3");
    assert!(pipe::checkpoint::list(&run).is_empty());
    resume_and_compare(dir.path(), &run, &reference);
}

#[test]
fn ctrl_c_checkpoints_marks_interrupted_and_says_how_to_resume() {
    let dir = setup();
    let reference = reference(dir.path());
    let child = spawn(dir.path(), &["run", "spec.toml"], &[]);
    let run = wait_for_run(dir.path(), |run| last_step(run) >= 4);
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(message.contains("pipe resume") && message.contains(run.to_str().unwrap()), "{message}");
    assert_eq!(status(&run), "interrupted");
    let stopped_at = last_step(&run);
    let latest = pipe::checkpoint::list(&run).pop().unwrap();
    assert_eq!(
        pipe::checkpoint::progress(&latest).unwrap().step as u64,
        stopped_at,
        "checkpointed at the step it stopped"
    );
    resume_and_compare(dir.path(), &run, &reference);
}

#[test]
fn resuming_a_completed_run_does_nothing_and_resuming_a_non_run_is_bad_input() {
    let dir = setup();
    let reference = reference(dir.path());
    let before = std::fs::read_to_string(reference.join("metrics.jsonl")).unwrap();
    let out = pipe(dir.path(), &["resume", reference.to_str().unwrap()], &[]);
    assert!(out.status.success());
    assert!(common::stdout(&out).contains("already completed"));
    assert_eq!(std::fs::read_to_string(reference.join("metrics.jsonl")).unwrap(), before);
    let out = pipe(dir.path(), &["resume", "."], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not a run"), "{}", stderr(&out));
}

#[test]
fn run_with_resume_continues_the_same_spec_and_refuses_a_changed_one() {
    let dir = setup();
    let reference = reference(dir.path());
    let run = killed_in_checkpoint(dir.path(), "12");
    let out =
        pipe(dir.path(), &["run", "spec.toml", "--set", "train.epochs=4", "--resume", run.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("resolves differently") && stderr(&out).contains("pipe resume"), "{}", stderr(&out));
    let out = pipe(dir.path(), &["run", "spec.toml", "--resume", run.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(weights(&run) == weights(&reference));
}

#[test]
fn unreadable_optimizer_states_fail_the_resume_naming_the_checkpoint_and_the_way_out() {
    let dir = setup();
    let mut child = spawn(dir.path(), &["run", "spec.toml"], &[]);
    let run = loop {
        if let Some(run) = runs(dir.path()).pop() {
            if !pipe::checkpoint::list(&run).is_empty() {
                break run;
            }
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended before its first checkpoint");
        std::thread::sleep(Duration::from_millis(2));
    };
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // As checkpoints from a pipe whose optimizer records differ would read.
    for checkpoint in pipe::checkpoint::list(&run) {
        std::fs::write(checkpoint.join("optimizer.bin"), [13u8; 64]).unwrap();
    }
    let out = pipe(dir.path(), &["resume", run.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(message.contains("no checkpoint of") && message.contains("cannot read the optimizer state"), "{message}");
    let newest = pipe::checkpoint::list(&run).pop().unwrap();
    let absolute = newest.canonicalize().unwrap();
    assert!(message.contains(&format!("model.path = \"{}\"", absolute.display())), "{message}");
    assert!(!message.contains("panicked"), "{message}");
}

/// The optimizer state is keyed by parameter ids, which a checkpoint records by parameter name.
/// A record that does not match the model's parameters is not used (the checkpoint before it
/// is, with a warning naming the file and the parameter); a checkpoint from before names (ids in
/// the model's visiting order) still resumes exactly.
#[test]
fn parameter_ids_are_matched_by_name_and_old_checkpoints_still_resume() {
    let dir = setup();
    let reference = reference(dir.path());
    let run = killed_in_checkpoint(dir.path(), "9");
    let checkpoints = pipe::checkpoint::list(&run);
    let state = |checkpoint: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join("trainer.json")).unwrap()).unwrap()
    };

    let (older, newest) = (&checkpoints[0], &checkpoints[1]);
    let mut renamed = state(newest);
    let by_name = renamed["param_ids"].as_object().unwrap().clone();
    assert!(by_name.contains_key("h.1.attn.c_attn.weight") && by_name.contains_key("wte.weight"), "{by_name:?}");
    let id = renamed["param_ids"].as_object_mut().unwrap().remove("h.1.mlp.c_fc.bias").unwrap();
    renamed["param_ids"]["h.1.mlp.c_fc.b"] = id;
    std::fs::write(newest.join("trainer.json"), renamed.to_string()).unwrap();

    let model = pipe::model::hf::load::<burn::backend::Flex>(older, None, &Default::default()).unwrap().1;
    let mut legacy = state(older);
    let older_ids = legacy["param_ids"].as_object().unwrap().clone();
    let in_visiting_order: Vec<&serde_json::Value> =
        pipe::model::params::ids(&model).iter().map(|(name, _)| &older_ids[name]).collect();
    legacy["param_ids"] = serde_json::json!(in_visiting_order);
    std::fs::write(older.join("trainer.json"), legacy.to_string()).unwrap();

    let out = pipe(dir.path(), &["resume", run.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(
        message.contains("trainer.json")
            && message.contains("`h.1.mlp.c_fc.bias`")
            && message.contains("`h.1.mlp.c_fc.b`"),
        "{message}"
    );
    assert!(message.contains("from_step=3"), "resumed from the older, legacy checkpoint: {message}");
    resume_and_compare(dir.path(), &run, &reference);
}

/// One writer per run folder: while a run is being written, a resume of it is refused naming
/// the process that writes it; `pipe runs` tells a live run from one whose process died
/// without a word, and the dead one's lock does not block its resume.
#[test]
fn one_writer_per_run_and_a_killed_run_shows_as_crashed() {
    let dir = setup();
    let spec = std::fs::read_to_string(dir.path().join("spec.toml")).unwrap().replace("epochs = 3", "epochs = 400");
    std::fs::write(dir.path().join("spec.toml"), spec).unwrap();
    let mut child = spawn(dir.path(), &["run", "spec.toml"], &[]);
    let run = wait_for_run(dir.path(), |run| last_step(run) >= 1);
    let out = pipe(dir.path(), &["resume", run.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(message.contains(&format!("pid {}", child.id())) && message.contains("writing this run"), "{message}");
    let listed = |dir: &Path| common::stdout(&pipe(dir, &["runs"], &[]));
    assert!(listed(dir.path()).contains("running"), "{}", listed(dir.path()));

    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(status(&run), "running", "meta.json cannot know the process died");
    assert!(listed(dir.path()).contains("crashed"), "{}", listed(dir.path()));
    let spec = std::fs::read_to_string(run.join("spec.toml")).unwrap().replace("epochs = 400", "epochs = 1");
    std::fs::write(run.join("spec.toml"), spec).unwrap();
    let out = pipe(dir.path(), &["resume", run.to_str().unwrap()], &[]);
    assert!(out.status.success(), "the dead writer's lock does not block: {}", stderr(&out));
}

/// SIGTERM (docker stop, Slurm, timeout) and SIGHUP end a training run as Ctrl-C does: the
/// step finishes, a checkpoint is written, the run is `interrupted`, the exit code is 128 + the
/// signal, and the resumed run is exact.
#[test]
fn sigterm_and_sighup_in_training_checkpoint_and_resume_exactly() {
    let dir = setup();
    let reference = reference(dir.path());
    for (signal, code, name) in [(libc::SIGTERM, 143, "SIGTERM"), (libc::SIGHUP, 129, "SIGHUP")] {
        let child = spawn(dir.path(), &["run", "spec.toml"], &[]);
        let run = wait_for_run(dir.path(), |run| last_step(run) >= 4 && status(run) == "running");
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, signal) };
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(code), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains(name) && stderr(&out).contains("pipe resume"), "{}", stderr(&out));
        assert_eq!(status(&run), "interrupted", "{name}");
        let latest = pipe::checkpoint::list(&run).pop().unwrap();
        assert_eq!(pipe::checkpoint::progress(&latest).unwrap().step as u64, last_step(&run), "{name}");
        resume_and_compare(dir.path(), &run, &reference);
        std::fs::remove_dir_all(&run).unwrap();
    }
}

/// Each stop signal (Ctrl-C, SIGTERM, SIGHUP) in each stage ends the run the same way: the unit
/// of work in progress finishes (a training step, then a checkpoint), the run is `interrupted`,
/// the exit code is 128 + the signal, the message names the signal and says how to resume, and
/// the resumed run completes with the same model as an uninterrupted one.
#[test]
fn every_stop_signal_in_every_stage_interrupts_and_resumes() {
    let dir = setup();
    let reference = reference(dir.path());
    for stage in ["train", "eval", "generate"] {
        for (signal, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM"), (libc::SIGHUP, "SIGHUP")] {
            let asked = format!("{stage}:{signal}");
            let out = pipe(dir.path(), &["run", "spec.toml"], &[("PIPEFAULT_SIGNAL_AT_STAGE", &asked)]);
            let message = stderr(&out);
            assert_eq!(out.status.code(), Some(128 + signal), "{asked}: {message}");
            assert!(message.contains(name) && message.contains("pipe resume"), "{asked}: {message}");
            assert!(!message.contains("panicked"), "{asked}: {message}");
            let run = runs(dir.path()).pop().unwrap();
            assert_eq!(status(&run), "interrupted", "{asked}");
            let out = pipe(dir.path(), &["resume", run.to_str().unwrap()], &[]);
            assert!(out.status.success(), "{asked}: {}", stderr(&out));
            assert_eq!(status(&run), "completed", "{asked}");
            assert!(weights(&run) == weights(&reference), "{asked}");
            let samples = std::fs::read_to_string(run.join("samples.jsonl")).unwrap();
            assert_eq!(samples.lines().count(), 1, "{asked}");
            assert!(run.join("eval.json").is_file(), "{asked}");
            std::fs::remove_dir_all(&run).unwrap();
        }
    }
}

/// A signal in the generate stage stops after the sample in progress, marks the run
/// `interrupted`, and the resumed run writes every sample.
#[test]
fn a_signal_in_the_generate_stage_interrupts_it_and_resume_finishes_it() {
    let dir = setup();
    let prompts = vec!["\"What is the capital of Kenya?\""; 400].join(", ");
    let spec = std::fs::read_to_string(dir.path().join("spec.toml"))
        .unwrap()
        .replace("epochs = 3", "epochs = 1")
        .replace("prompts = [\"What is the capital of Kenya?\"]", &format!("prompts = [{prompts}]"))
        .replace("max_new_tokens = 6", "max_new_tokens = 40");
    std::fs::write(dir.path().join("spec.toml"), spec).unwrap();
    let child = spawn(dir.path(), &["run", "spec.toml"], &[]);
    let run = wait_for_run(dir.path(), |run| run.join("samples.jsonl").is_file());
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    assert!(stderr(&out).contains("generate stage"), "{}", stderr(&out));
    assert_eq!(status(&run), "interrupted");
    let samples =
        |run: &Path| std::fs::read_to_string(run.join("samples.jsonl")).map(|t| t.lines().count()).unwrap_or(0);
    assert!(samples(&run) < 400, "stopped before the last sample");
    let out = pipe(dir.path(), &["resume", run.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(status(&run), "completed");
    assert_eq!(samples(&run), 400);
}

/// A newest checkpoint with any of its files damaged (weights, optimizer state, trainer state)
/// is passed over for the one before it, with a warning, and the resumed run is still exact; a
/// metrics.jsonl cut mid-line is repaired and the repair reported.
#[test]
fn a_damaged_newest_checkpoint_falls_back_and_a_cut_metrics_line_is_repaired() {
    let dir = setup();
    let reference = reference(dir.path());
    for damaged in ["model.safetensors", "optimizer.bin", "trainer.json"] {
        let run = killed_in_checkpoint(dir.path(), "9");
        let checkpoints = pipe::checkpoint::list(&run);
        assert_eq!(checkpoints.len(), 2, "{checkpoints:?}");
        let newest = checkpoints[1].join(damaged);
        let bytes = std::fs::read(&newest).unwrap();
        std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
        let metrics = run.join("metrics.jsonl");
        let mut text = std::fs::read_to_string(&metrics).unwrap();
        text.push_str("{\"step\":10,\"epoch\":2,\"lo");
        std::fs::write(&metrics, text).unwrap();

        let out = pipe(dir.path(), &["resume", run.to_str().unwrap()], &[]);
        assert!(out.status.success(), "{damaged}: {}", stderr(&out));
        let message = stderr(&out);
        assert!(
            message.contains("step-000006") && message.contains("trying the one before it"),
            "{damaged}: {message}"
        );
        assert!(message.contains("from_step=3"), "{damaged}: {message}");
        assert!(message.contains("metrics.jsonl: dropped 1 unreadable line"), "{damaged}: {message}");
        resume_and_compare(dir.path(), &run, &reference);
        std::fs::remove_dir_all(&run).unwrap();
    }
}

/// A checkpoint whose optimizer state is keyed by ids no parameter has (here its trainer.json
/// names other ids) is passed over like a damaged one: taking it would start every parameter's
/// Adam moments over in silence.
#[test]
fn an_optimizer_state_that_fits_no_parameter_is_passed_over() {
    let dir = setup();
    let reference = reference(dir.path());
    let run = killed_in_checkpoint(dir.path(), "9");
    let trainer = pipe::checkpoint::list(&run)[1].join("trainer.json");
    let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trainer).unwrap()).unwrap();
    for id in state["param_ids"].as_object_mut().unwrap().values_mut() {
        *id = (id.as_u64().unwrap() ^ 1).into();
    }
    std::fs::write(&trainer, state.to_string()).unwrap();
    let out = pipe(dir.path(), &["resume", run.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(message.contains("belong to no parameter") && message.contains("trying the one before it"), "{message}");
    resume_and_compare(dir.path(), &run, &reference);
}

/// A resumed run's TensorBoard events continue from the checkpoint without duplicated or
/// backwards steps (a record cut off by the kill is dropped), and hold one start and one end of
/// the session.
#[test]
fn tensorboard_events_continue_across_a_resume_without_duplicates() {
    let dir = setup();
    let reference = reference(dir.path());
    let run = killed_in_checkpoint(dir.path(), "9");
    let events_file = pipe::tensorboard::find(&run).unwrap();
    let mut bytes = std::fs::read(&events_file).unwrap();
    bytes.extend_from_slice(&[7, 0, 0, 0, 0, 0, 0]); // a frame cut off mid-write
    std::fs::write(&events_file, bytes).unwrap();
    resume_and_compare(dir.path(), &run, &reference);

    let tags_at = |run: &Path| -> Vec<(String, i64)> {
        pipe::tensorboard::read(&pipe::tensorboard::find(run).unwrap())
            .unwrap()
            .iter()
            .flat_map(|e| e.summary.iter().flat_map(|s| &s.value).map(move |v| (v.tag.clone(), e.step)))
            .collect()
    };
    let (resumed, uninterrupted) = (tags_at(&run), tags_at(&reference));
    let steps = |tags: &[(String, i64)], tag: &str| -> Vec<i64> {
        tags.iter().filter(|(t, _)| t == tag).map(|&(_, s)| s).collect()
    };
    for tag in [
        "train/loss",
        "train/lr",
        "val/loss",
        "eval/val_loss",
        "samples/0",
        "_hparams_/session_start_info",
        "_hparams_/session_end_info",
    ] {
        assert_eq!(steps(&resumed, tag), steps(&uninterrupted, tag), "{tag}");
    }
    let losses = steps(&resumed, "train/loss");
    assert!(losses.windows(2).all(|w| w[0] < w[1]), "{losses:?}");
}

/// A dataset edited under an unfinished run is refused on resume (exit 2, naming the field,
/// the file and the way on) with the run folder untouched; `--allow-changed-inputs` continues
/// on the data as it is now, even when it shrank below where the epoch stood.
#[test]
fn resume_refuses_a_changed_dataset_unless_asked() {
    let dir = setup();
    let run = killed_in_checkpoint(dir.path(), "9");
    let train = dir.path().join("train.jsonl");
    let data = std::fs::read_to_string(&train).unwrap();
    std::fs::write(&train, data.lines().take(10).collect::<Vec<_>>().join("\n")).unwrap();
    let metrics_before = std::fs::read(run.join("metrics.jsonl")).unwrap();

    let out = pipe(dir.path(), &["resume", run.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let message = stderr(&out);
    let absolute = train.canonicalize().unwrap();
    assert!(message.contains(&format!("data.path {}: its contents changed", absolute.display())), "{message}");
    assert!(message.contains("--allow-changed-inputs"), "{message}");
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), metrics_before, "the run folder is untouched");
    assert_eq!(status(&run), "running", "the refused resume leaves the status as it was");

    let out = pipe(dir.path(), &["resume", run.to_str().unwrap(), "--allow-changed-inputs"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("its contents changed"), "the change is still reported: {}", stderr(&out));
    assert_eq!(status(&run), "completed");
    // The run now records the data it finished on: a later resume has nothing to refuse.
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("meta.json")).unwrap()).unwrap();
    let recorded = meta["inputs"]["data.path"]["sha256"].as_str().unwrap().to_string();
    let now = pipe::inputs::of(&pipe::spec::load(&run.join("spec.toml"), &[]).unwrap().spec, None).unwrap();
    assert_eq!(now["data.path"].sha256, recorded);
}

/// Every input a run can have is hashed: the datasets, the tokenizer, the base model's
/// config.json and weights; a change to any one of them is named.
#[test]
fn every_input_is_hashed_and_each_change_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(common::fixture_dir().join(file), model.join(file)).unwrap();
    }
    std::fs::write(dir.path().join("train.jsonl"), "{\"prompt\": \"a\", \"response\": \"b\"}\n").unwrap();
    std::fs::write(dir.path().join("val.jsonl"), "{\"prompt\": \"c\", \"response\": \"d\"}\n").unwrap();
    let spec_path = dir.path().join("spec.toml");
    std::fs::write(
        &spec_path,
        "[run]\nname = \"h\"\n[data]\npath = \"train.jsonl\"\nval_path = \"val.jsonl\"\n[model]\npath = \"model\"\n",
    )
    .unwrap();
    let spec = pipe::spec::load(&spec_path, &[]).unwrap().spec;
    let before = pipe::inputs::of(&spec, Some(&model)).unwrap();
    let fields: Vec<&str> = before.keys().map(String::as_str).collect();
    assert_eq!(fields, ["data.path", "data.val_path", "model.path", "tokenizer"]);
    assert!(pipe::inputs::changes(&before, &before).is_empty());
    for (field, file) in [
        ("data.path", dir.path().join("train.jsonl")),
        ("data.val_path", dir.path().join("val.jsonl")),
        ("tokenizer", model.join("tokenizer.json")),
        ("model.path", model.join("config.json")),
        ("model.path", model.join("model.safetensors")),
    ] {
        let original = std::fs::read(&file).unwrap();
        let mut edited = original.clone();
        edited[original.len() / 2] ^= 1;
        std::fs::write(&file, &edited).unwrap();
        let changes = pipe::inputs::changes(&before, &pipe::inputs::of(&spec, Some(&model)).unwrap());
        assert_eq!(changes.len(), 1, "{file:?}: {changes:?}");
        assert!(changes[0].starts_with(&format!("{field} ")), "{changes:?}");
        std::fs::write(&file, &original).unwrap();
    }
}
