//! Faults of the real world (issue 35): a write that fails (a full disk, a file-size limit), a
//! loss or gradient that goes non-finite, two processes at once. Nothing is lost, nothing looks
//! complete that is not, and the exit code and the run's status say what happened.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::common;
use crate::common::{newest_run, pipe, spawn, status, stderr};

fn spec(runs_dir: &str) -> String {
    common::spec(&format!(
        r#"
[run]
name = "faults"
runs_dir = "{runs_dir}"

[data]
val_fraction = 0.2

[model]
layers = 2
embd = 64
context = 48

[train]
epochs = 2
batch_size = 4
checkpoint_every = 4
eval_every = 4
"#
    ))
}

/// Checkpoint folders of `run` that are not complete: staging (`.step-N.partial`, `.best.partial`).
fn partial_folders(run: &Path) -> Vec<String> {
    let names = std::fs::read_dir(run.join("checkpoints")).map(|d| d.flatten().collect::<Vec<_>>()).unwrap_or_default();
    let mut partial: Vec<String> = names
        .iter()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect();
    partial.extend(std::fs::read_dir(run).unwrap().flatten().filter_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name.contains("partial").then_some(name)
    }));
    partial
}

/// A small tmpfs mounted on a folder, unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    /// A tmpfs of `size` (as mount takes it: `600k`), or None where this machine does not let
    /// a test mount one.
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .is_ok_and(|out| out.status.success());
        mounted.then_some(Self(dir))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    fn resize(&self, size: &str) {
        let out =
            Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(self.path()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).output();
    }
}

/// A disk that fills while a checkpoint is written: the run exits 1 naming the file that could
/// not be written and the OS's reason in words, leaves no partial checkpoint, says `failed`
/// (the status is written although the disk is full), and resumes once there is room.
#[test]
fn a_full_disk_fails_the_run_naming_the_file_and_resume_continues_once_space_is_freed() {
    // Room for the run's set-up files, not for a checkpoint of this model's weights and
    // optimizer state.
    let Some(disk) = Tmpfs::mount("700k") else {
        eprintln!("skipped: this machine does not let the test mount a tmpfs (mount -t tmpfs needs root)");
        return;
    };
    let dir = common::folder_with(&spec(disk.path().join("runs").to_str().unwrap()), 64);
    let out = pipe(dir.path(), &["run", "spec.toml"], &[]);
    let message = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{message}");
    assert!(message.contains("No space left on device"), "the OS's reason in words: {message}");
    assert!(!message.contains("Io {") && !message.contains("Os {"), "no debug text: {message}");
    let run = newest_run(disk.path(), "faults").canonicalize().unwrap();
    assert!(message.contains(&run.join("checkpoints").display().to_string()), "names the checkpoint's file: {message}");
    assert_eq!(status(&run), "failed");
    assert_eq!(partial_folders(&run), Vec::<String>::new(), "no partial folder is left");
    assert!(common::list_checkpoints(&run).is_empty());

    disk.resize("64m");
    let out = pipe(dir.path(), &["resume", run.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(status(&run), "completed");
    assert!(run.join("final/model.safetensors").is_file());
}

/// A write refused for its size (the file-size limit, `ulimit -f`): the same, reported as the
/// OS says it (EFBIG's words), never as Rust's debug text.
#[test]
fn a_write_past_the_file_size_limit_is_reported_in_words_and_the_run_resumes_without_it() {
    let dir = common::folder_with(&spec("runs"), 64);
    let mut limited = Command::new(common::pipe_bin());
    limited.current_dir(dir.path()).args(["run", "spec.toml"]);
    // SAFETY: between fork and exec, only async-signal-safe calls: ignore SIGXFSZ (so the
    // write fails with EFBIG instead of killing the process) and cap file sizes at 400 KiB: room for the run's set-up files, not for a checkpoint's weights.
    unsafe {
        limited.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit { rlim_cur: 400 * 1024, rlim_max: 400 * 1024 };
            match libc::setrlimit(libc::RLIMIT_FSIZE, &limit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    let out: Output = limited.output().unwrap();
    let message = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{message}");
    assert!(message.contains("File too large"), "{message}");
    assert!(!message.contains("Unknown(") && !message.contains("Io {"), "no debug text: {message}");
    let run = newest_run(dir.path(), "faults");
    assert_eq!(status(&run), "failed");
    assert_eq!(partial_folders(&run), Vec::<String>::new());

    let out = pipe(dir.path(), &["resume", run.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(status(&run), "completed");
}

/// A training loss, gradient norm or validation loss that is not a number stops the run at
/// that step (exit 1, `failed`, the message naming the step and the figure); no model that
/// measured so is selected; every record written, NaN included, reads back.
#[test]
fn non_finite_losses_and_gradients_stop_the_run_at_their_step_and_are_never_selected() {
    let dir = common::folder_with(&spec("runs").replace("[train]\n", "[train]\nfinal = \"best\"\n"), 64);
    for (fault, says) in [
        ("loss:3", "step 3 (epoch 1): the training loss became NaN"),
        ("grad_norm:5", "step 5 (epoch 1): the gradient norm became NaN"),
        ("val_loss:2", "the validation loss at step 8 (epoch 1) became NaN"),
    ] {
        let out = pipe(dir.path(), &["run", "spec.toml"], &[("PIPEFAULT_NAN", fault)]);
        let message = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{fault}: {message}");
        assert!(message.contains(says), "{fault}: {message}");
        let run = newest_run(dir.path(), "faults");
        assert_eq!(status(&run), "failed", "{fault}");
        let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        assert!(!metrics.contains("null"), "{fault}: every value is written as itself: {metrics}");
    }
    // The last run: the NaN evaluation is recorded as NaN, and the model of the finite one
    // before it stays the best.
    let run = newest_run(dir.path(), "faults");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains(r#""val_loss":"NaN""#), "{metrics}");
    let best: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoints/best/best.json")).unwrap()).unwrap();
    assert_eq!(best["step"], 4);
    assert!(best["value"].as_f64().is_some_and(f64::is_finite), "{best}");
    let json = common::stdout(&pipe(dir.path(), &["compare", run.to_str().unwrap(), "--json"], &[]));
    let compared: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(compared["runs"][0]["lowest_val_loss_step"], 4, "the NaN is no lowest value: {json}");

    // A best-model record written before NaN was written as itself (null) still reads.
    std::fs::write(run.join("checkpoints/best/best.json"), r#"{"step": 4, "value": null}"#).unwrap();
    let out = pipe(dir.path(), &["export", run.to_str().unwrap(), "--checkpoint", "best", "--out", "exported"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Two processes preparing the same tokenized-cache entry at once both succeed, and their
/// runs see the same data.
#[test]
fn two_processes_preparing_the_same_cache_entry_do_not_collide() {
    let dir = common::folder_with(&spec("runs"), 0);
    let pairs = std::fs::read_to_string(common::repo().join("data/sft.jsonl")).unwrap();
    let many: Vec<&str> = pairs.lines().cycle().take(3000).collect();
    std::fs::write(dir.path().join("train.jsonl"), many.join("\n")).unwrap();
    for attempt in 0..3 {
        let _ = std::fs::remove_dir_all(dir.path().join("runs"));
        let children: Vec<_> = (0..2).map(|_| spawn(dir.path(), &["data", "spec.toml", "-n", "1"], &[])).collect();
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "attempt {attempt}: {}", stderr(&out));
        }
        let cache: Vec<String> = std::fs::read_dir(dir.path().join("runs/.cache/tokenized"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(cache.len(), 1, "one entry, no staging files left: {cache:?}");
    }
}

/// The run's lock is the folder's, not a file's: deleting `.lock` while a run trains does not
/// let a second writer in.
#[test]
fn deleting_the_lock_file_does_not_let_a_second_writer_in() {
    let dir = common::folder_with(&spec("runs").replace("epochs = 2", "epochs = 400"), 64);
    let mut child = spawn(dir.path(), &["run", "spec.toml"], &[]);
    let run = wait_for(|| {
        let run = std::fs::read_dir(dir.path().join("runs/faults")).ok()?.flatten().next()?.path();
        run.join("metrics.jsonl").is_file().then_some(run)
    });
    std::fs::remove_file(run.join(".lock")).unwrap();
    let out = pipe(dir.path(), &["resume", run.to_str().unwrap()], &[]);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("another pipe process"), "{}", stderr(&out));
}

/// `pipe export --checkpoint last` while training checkpoints every step and keeps one: the
/// checkpoint being read may be pruned, and the export still succeeds, whole.
#[test]
fn exports_during_training_are_safe_from_pruning() {
    let spec = spec("runs")
        .replace("epochs = 2", "epochs = 400")
        .replace("checkpoint_every = 4", "checkpoint_every = 1\nkeep_checkpoints = 1");
    let dir = common::folder_with(&spec, 64);
    let mut child = spawn(dir.path(), &["run", "spec.toml"], &[]);
    let run = wait_for(|| {
        let run = std::fs::read_dir(dir.path().join("runs/faults")).ok()?.flatten().next()?.path();
        (!common::list_checkpoints(&run).is_empty()).then_some(run)
    });
    let mut failures = Vec::new();
    for i in 0..12 {
        let out_dir = format!("export-{i}");
        let out = pipe(dir.path(), &["export", run.to_str().unwrap(), "--checkpoint", "last", "--out", &out_dir], &[]);
        if !out.status.success() {
            failures.push(stderr(&out));
        } else {
            assert!(dir.path().join(&out_dir).join("tokenizer.json").is_file());
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(failures, Vec::<String>::new());
    let readers: Vec<PathBuf> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(".reading-"))
        .collect();
    assert_eq!(readers, Vec::<PathBuf>::new(), "every reader's snapshot went with it");
}

fn wait_for<T>(ready: impl Fn() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(value) = ready() {
            return value;
        }
        assert!(Instant::now() < deadline, "waited two minutes");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `pipe data SPEC` in `dir`, with `sets` as overrides, killed if it takes a minute.
fn prepare_within_a_minute(dir: &Path, spec: &str, sets: &[&str]) -> Output {
    let mut args = vec!["data", spec, "-n", "1"];
    for set in sets {
        args.extend(["--set", set]);
    }
    let mut child = spawn(dir, &args, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("{sets:?}: still running after a minute");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Inputs without end are bounded: files by type, records by size, chat templates by work and
/// output. Each refusal exits 2 promptly, names the input and the limit, and says how to raise
/// it; raising it lets the record through.
#[test]
fn inputs_without_end_are_refused_naming_the_limit() {
    let dir = common::folder_with(&spec("runs").replace("val_fraction = 0.2", "val_fraction = 0.0"), 40);
    let d = dir.path();
    let refused_by = |spec: &str, sets: &[&str], says: &[&str]| {
        let out = prepare_within_a_minute(d, spec, sets);
        let message = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{sets:?}: {message}");
        for part in says {
            assert!(message.contains(part), "{sets:?}: expected {part:?} in: {message}");
        }
        assert!(!message.contains("panicked"), "{message}");
    };
    let refused = |sets: &[&str], says: &[&str]| refused_by("spec.toml", sets, says);

    // Files that are not regular files: a device never ends, a FIFO is read once.
    refused(&["data.path=/dev/zero"], &["/dev/zero", "is a character device", "regular files only"]);
    let given_tokenizer = spec("runs").replace("train_vocab_size = 300", "path = \"/dev/zero\"");
    std::fs::write(d.join("tokenizer.toml"), given_tokenizer).unwrap();
    refused_by("tokenizer.toml", &[], &["/dev/zero", "is a character device"]);
    let fifo = d.join("pairs.fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    refused(&["data.path=pairs.fifo"], &["pairs.fifo", "is a FIFO"]);

    // Records past data.max_record_bytes: a long JSONL line, a line that never ends, a long
    // CSV line, a record of a JSON array, a text read whole.
    let pairs = std::fs::read_to_string(d.join("train.jsonl")).unwrap();
    let long = format!(r#"{{"prompt": "say it", "response": "{}"}}"#, "word ".repeat(300_000));
    std::fs::write(d.join("long.jsonl"), format!("{pairs}\n{long}\n")).unwrap();
    refused(
        &["data.path=long.jsonl"],
        &["long.jsonl:41", "data.max_record_bytes allows (1048576)", "raise data.max_record_bytes"],
    );
    std::fs::write(d.join("endless.jsonl"), "x".repeat(3 << 20)).unwrap();
    refused(&["data.path=endless.jsonl"], &["endless.jsonl:1", "data.max_record_bytes"]);
    let csv = format!("prompt,response\nhello,there\nsay it,{}\n", "word ".repeat(300_000));
    std::fs::write(d.join("long.csv"), csv).unwrap();
    refused(&["data.path=long.csv"], &["long.csv:3", "data.max_record_bytes"]);
    let array = format!(
        r#"[{{"prompt": "a", "response": "b"}}, {{"prompt": "say it", "response": "{}"}}]"#,
        "w".repeat(2 << 20)
    );
    std::fs::write(d.join("long.json"), array).unwrap();
    refused(&["data.path=long.json"], &["long.json:1", "the record holds 2097158 bytes", "data.max_record_bytes"]);
    std::fs::write(d.join("book.txt"), "word ".repeat(300_000)).unwrap();
    refused(&["data.path=book.txt", "data.kind=text", "data.documents=file"], &["book.txt", "data.max_record_bytes"]);
    let out = prepare_within_a_minute(d, "spec.toml", &["data.path=long.jsonl", "data.max_record_bytes=2000000"]);
    assert!(out.status.success(), "raised, the record is read: {}", stderr(&out));

    // Chat templates: one that loops without end, one that renders without end.
    let chat = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;
    std::fs::write(d.join("chat.jsonl"), format!("{chat}\n").repeat(8)).unwrap();
    let looping = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
    std::fs::write(d.join("looping.jinja"), looping).unwrap();
    let chat_with = |template: &'static str| ["data.path=chat.jsonl", "data.kind=chat", template];
    refused(
        &chat_with("data.chat_template=looping.jinja"),
        &["looping.jinja", "data.max_template_steps (10000000 steps", "raise data.max_template_steps"],
    );
    let runaway = "{% for i in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}";
    std::fs::write(d.join("runaway.jinja"), runaway).unwrap();
    refused(
        &chat_with("data.chat_template=runaway.jinja"),
        &["runaway.jinja", "more than data.max_record_bytes allows (1048576)"],
    );
}

/// The tokenized cache truncated under a training run: the process stops saying why (not a
/// bare SIGBUS), and the run resumes, rebuilding the cache.
#[test]
fn a_cache_truncated_while_training_stops_the_run_with_a_message_and_it_resumes() {
    let dir = common::folder_with(&spec("runs").replace("epochs = 2", "epochs = 400"), 64);
    let child = spawn(dir.path(), &["run", "spec.toml"], &[]);
    let run = wait_for(|| {
        let run = std::fs::read_dir(dir.path().join("runs/faults")).ok()?.flatten().next()?.path();
        run.join("metrics.jsonl").is_file().then_some(run)
    });
    for entry in std::fs::read_dir(dir.path().join("runs/.cache/tokenized")).unwrap() {
        std::fs::File::options().write(true).open(entry.unwrap().path()).unwrap().set_len(0).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let message = stderr(&out);
    assert_eq!(out.status.code(), Some(128 + libc::SIGBUS), "{message}");
    assert!(
        message.contains("was truncated while this process read it") && message.contains("pipe resume"),
        "{message}"
    );

    let spec = std::fs::read_to_string(run.join("spec.toml")).unwrap().replace("epochs = 400", "epochs = 1");
    std::fs::write(run.join("spec.toml"), spec).unwrap();
    let out = pipe(dir.path(), &["resume", run.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(status(&run), "completed");
}
