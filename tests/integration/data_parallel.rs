//! Data-parallel training: peers on threads (`run.devices`) and nodes as processes meeting on
//! loopback through the orchestrator train exactly what one device trains with their combined
//! batch; a peer that fails, hangs or is killed stops the others within a bounded time, naming
//! it, and the run resumes from its last checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use crate::common;
use crate::common::{pipe, spawn, status, stderr, step_losses, val_losses};

fn spec() -> String {
    common::spec(
        r#"
[run]
name = "dp"
seed = 11
stages = ["train"]

[data]
val_fraction = 0.1
prompt_template = "{prompt}\n"

[tokenizer]
train_vocab_size = 400

[model]
layers = 2
embd = 64
context = 64
dropout = 0.0

[optimizer]
lr = 2e-3
warmup_steps = 3
grad_clip = 1.0

[train]
epochs = 2
batch_size = 8
eval_every = 3
checkpoint_every = 4
"#,
    )
}

fn setup() -> tempfile::TempDir {
    common::folder_with(&spec(), 60)
}

fn runs(dir: &Path) -> Vec<PathBuf> {
    let mut runs: Vec<PathBuf> =
        std::fs::read_dir(dir.join("runs/dp")).map(|d| d.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
    runs.sort();
    runs
}

/// Run the spec in `dir` with these overrides; returns the new run folder.
fn run(dir: &Path, env: &[(&str, &str)]) -> PathBuf {
    let before = runs(dir);
    let out = pipe(dir, &["run", "spec.toml"], env);
    assert!(out.status.success(), "{}", stderr(&out));
    let after: Vec<PathBuf> = runs(dir).into_iter().filter(|r| !before.contains(r)).collect();
    assert_eq!(after.len(), 1, "one run folder, written by rank 0 alone: {after:?}");
    after[0].clone()
}

fn weights(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            (name, values)
        })
        .collect()
}

/// The same losses at every step (and evaluation), and final weights within 1e-5 relative per
/// tensor: only the order of the gradient sums differs.
fn assert_same_training(run: &Path, reference: &Path) {
    let (a, b) = (step_losses(run), step_losses(reference));
    assert_eq!(a.len(), b.len(), "the same steps");
    assert!(!a.is_empty());
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * y.abs(), "step {step}: loss {x} vs {y}");
    }
    let (a, b) = (val_losses(run), val_losses(reference));
    assert_eq!(a.iter().map(|v| v.0).collect::<Vec<_>>(), b.iter().map(|v| v.0).collect::<Vec<_>>());
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * y.abs(), "evaluation at step {step}: {x} vs {y}");
    }
    let (a, b) = (weights(&run.join("final")), weights(&reference.join("final")));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, x) in &a {
        let y = &b[name];
        // The key bias has no gradient at all (adding one vector to every key shifts each
        // query's scores by a constant, which softmax ignores): its updates are Adam's
        // normalised rounding noise, which depends on the summation order. Queries and values
        // must agree.
        let (x, y) = match name.ends_with("attn.c_attn.bias") {
            true => {
                let third = x.len() / 3;
                let outside = |v: &[f32]| [&v[..third], &v[2 * third..]].concat();
                (outside(x), outside(y))
            }
            false => (x.clone(), y.clone()),
        };
        let diff: f64 = x.iter().zip(&y).map(|(p, q)| ((p - q) as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum::<f64>().sqrt();
        assert!(diff <= 1e-5 * norm.max(1e-12), "{name}: relative difference {}", diff / norm);
    }
}

#[test]
fn two_peers_on_threads_train_what_one_device_trains_with_their_combined_batch() {
    let dir = setup();
    let d = dir.path();
    let single = run(d, &[]);
    let peers = run(d, &[("PIPE_TRAIN__BATCH_SIZE", "4"), ("PIPE_RUN__DEVICES", "[0, 1]")]);
    assert_same_training(&peers, &single);
    // Gradient accumulation within each peer: 2 peers × 2 micro-batches × 2 examples.
    let accumulated =
        run(d, &[("PIPE_TRAIN__BATCH_SIZE", "2"), ("PIPE_TRAIN__GRAD_ACCUM", "2"), ("PIPE_RUN__DEVICES", "[0, 1]")]);
    assert_same_training(&accumulated, &single);
    let single_accumulated = run(d, &[("PIPE_TRAIN__BATCH_SIZE", "4"), ("PIPE_TRAIN__GRAD_ACCUM", "2")]);
    assert_same_training(&single_accumulated, &single);
}

/// Wait until `run`'s metrics hold `steps` step records, then SIGKILL `child`.
fn kill_after(child: &mut Child, run_parent: &Path, steps: usize) {
    let started = Instant::now();
    loop {
        let newest = std::fs::read_dir(run_parent).ok().and_then(|d| d.map(|e| e.unwrap().path()).max());
        let logged = newest
            .and_then(|r| std::fs::read_to_string(r.join("metrics.jsonl")).ok())
            .map_or(0, |m| m.lines().filter(|l| l.contains("\"loss\"")).count());
        if logged >= steps {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "the run never reached step {steps}");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before step {steps}");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn thread_peers_draw_dropout_deterministically_and_resume_exactly_after_sigkill() {
    let dir = setup();
    let d = dir.path();
    let env = [
        ("PIPE_TRAIN__BATCH_SIZE", "4"),
        ("PIPE_RUN__DEVICES", "[0, 1]"),
        ("PIPE_MODEL__DROPOUT", "0.1"),
        ("PIPE_TRAIN__EPOCHS", "6"),
    ];
    let whole = run(d, &env);
    let again = run(d, &env);
    assert_eq!(step_losses(&again), step_losses(&whole), "the peers' dropout masks depend on the seed alone");
    let mut child = spawn(d, &["run", "spec.toml"], &env);
    kill_after(&mut child, &d.join("runs/dp"), 10);
    let killed = runs(d).pop().unwrap();
    // The world size is the spec's: continuing on three peers is refused, and changes nothing.
    let three: Vec<_> = env
        .iter()
        .copied()
        .filter(|(k, _)| *k != "PIPE_RUN__DEVICES")
        .chain([("PIPE_RUN__DEVICES", "[0, 1, 2]")])
        .collect();
    let out = pipe(d, &["run", "spec.toml", "--resume", killed.to_str().unwrap()], &three);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("resolves differently"), "{}", stderr(&out));
    let out = pipe(d, &["resume", killed.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(step_losses(&killed), step_losses(&whole), "every step's loss, across the kill");
    let final_bytes = |r: &Path| std::fs::read(r.join("final/model.safetensors")).unwrap();
    assert!(final_bytes(&killed) == final_bytes(&whole), "the resumed run's final weights are the uninterrupted run's");
}

#[test]
fn a_thread_peer_that_fails_or_hangs_stops_the_run_naming_it_and_the_run_resumes() {
    let dir = setup();
    let d = dir.path();
    let env = [("PIPE_TRAIN__BATCH_SIZE", "4"), ("PIPE_RUN__DEVICES", "[0, 1]"), ("PIPE_DISTRIBUTED__TIMEOUT_S", "2")];
    let reference = run(d, &env);

    let failing: Vec<_> = env.iter().copied().chain([("PIPEFAULT_PEER", "fail:1:6")]).collect();
    let out = pipe(d, &["run", "spec.toml"], &failing);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("peer rank 1 failed: an injected failure at step 6"), "{}", stderr(&out));
    let failed = runs(d).pop().unwrap();
    assert_eq!(status(&failed), "failed");

    let hanging: Vec<_> = env.iter().copied().chain([("PIPEFAULT_PEER", "hang:1:7")]).collect();
    let started = Instant::now();
    let out = pipe(d, &["run", "spec.toml"], &hanging);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(60), "stopped within the timeout, not never");
    assert!(stderr(&out).contains("peer rank 1 did not reach collective call"), "{}", stderr(&out));
    let hung = runs(d).pop().unwrap();
    assert_eq!(status(&hung), "failed");

    for run in [failed, hung] {
        let out = pipe(d, &["resume", run.to_str().unwrap()], &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(status(&run), "completed");
        assert_eq!(step_losses(&run), step_losses(&reference), "resumed from the last checkpoint, exactly");
    }
}

/// A free port on 127.0.0.1 (free when asked; the tests' ports do not collide in practice).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Nodes {
    orchestrator: u16,
    ports: [u16; 2],
}

impl Nodes {
    fn new() -> Self {
        Self { orchestrator: free_port(), ports: [free_port(), free_port()] }
    }

    fn env(&self, rank: usize, extra: &[(&'static str, &'static str)]) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("PIPE_DISTRIBUTED__NODES".into(), "2".into()),
            ("PIPE_DISTRIBUTED__RANK".into(), rank.to_string()),
            ("PIPE_DISTRIBUTED__ORCHESTRATOR".into(), format!("127.0.0.1:{}", self.orchestrator)),
            ("PIPE_DISTRIBUTED__HOST".into(), "127.0.0.1".into()),
            ("PIPE_DISTRIBUTED__PORT".into(), self.ports[rank].to_string()),
            ("PIPE_TRAIN__BATCH_SIZE".into(), "4".into()),
        ];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    }

    /// Start both nodes (node 0 first), with `args` after `pipe`.
    fn spawn(&self, dir: &Path, args: &[&str], extra: &[(&'static str, &'static str)]) -> [Child; 2] {
        self.spawn_differing(dir, args, extra, &[])
    }

    /// `spawn`, node 1 with `node_1` on top of `extra` (the later setting of a variable wins).
    fn spawn_differing(
        &self,
        dir: &Path,
        args: &[&str],
        extra: &[(&'static str, &'static str)],
        node_1: &[(&'static str, &'static str)],
    ) -> [Child; 2] {
        [0, 1].map(|rank| {
            let mut env = self.env(rank, extra);
            if rank == 1 {
                env.extend(node_1.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            }
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let child = spawn(dir, args, &env);
            std::thread::sleep(Duration::from_millis(200));
            child
        })
    }
}

fn finish(children: [Child; 2]) -> [Output; 2] {
    children.map(|c| c.wait_with_output().unwrap())
}

#[test]
fn two_nodes_on_loopback_train_what_one_device_trains() {
    let dir = setup();
    let d = dir.path();
    let single = run(d, &[]);
    let nodes = Nodes::new();
    let port = nodes.orchestrator.to_string();
    let mut orchestrator = spawn(d, &["orchestrator", "--port", &port], &[]);
    std::thread::sleep(Duration::from_millis(300));
    let before = runs(d);
    let [node0, node1] = finish(nodes.spawn(d, &["run", "spec.toml"], &[]));
    orchestrator.kill().unwrap();
    orchestrator.wait().unwrap();
    assert!(node0.status.success(), "{}", stderr(&node0));
    assert!(node1.status.success(), "{}", stderr(&node1));
    assert!(common::stdout(&node1).contains("node 1 of 2: trained its share"), "{}", common::stdout(&node1));
    let new: Vec<PathBuf> = runs(d).into_iter().filter(|r| !before.contains(r)).collect();
    assert_eq!(new.len(), 1, "node 0 alone writes a run folder: {new:?}");
    assert_same_training(&new[0], &single);

    // Two nodes of two peers each, batch 2 apiece.
    let nodes = Nodes::new();
    let four = [
        ("PIPE_RUN__DEVICES", "[0, 1]"),
        ("PIPE_TRAIN__BATCH_SIZE", "2"),
        ("PIPE_DISTRIBUTED__SERVE_ORCHESTRATOR", "true"),
    ];
    let [node0, node1] = finish(nodes.spawn(d, &["run", "spec.toml"], &four));
    assert!(node0.status.success(), "{}", stderr(&node0));
    assert!(node1.status.success(), "{}", stderr(&node1));
    assert_same_training(&runs(d).pop().unwrap(), &single);
}

#[test]
fn a_killed_node_stops_the_other_naming_it_and_both_resume_from_the_last_checkpoint() {
    let dir = setup();
    let d = dir.path();
    let single = run(d, &[("PIPE_TRAIN__EPOCHS", "6")]);
    let nodes = Nodes::new();
    let extra = [
        ("PIPE_TRAIN__EPOCHS", "6"),
        ("PIPE_DISTRIBUTED__SERVE_ORCHESTRATOR", "true"),
        ("PIPE_DISTRIBUTED__TIMEOUT_S", "10"),
    ];
    let [node0, mut node1] = nodes.spawn(d, &["run", "spec.toml"], &extra);
    kill_after(&mut node1, &d.join("runs/dp"), 9);
    let killed_at = Instant::now();
    let out = node0.wait_with_output().unwrap();
    let stopped_after = killed_at.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stopped_after < Duration::from_secs(30), "node 0 stopped {stopped_after:?} after node 1 died");
    let message = stderr(&out);
    assert!(message.contains("node 1 (127.0.0.1:") && message.contains("is gone"), "{message}");
    let run = runs(d).pop().unwrap();
    assert_eq!(status(&run), "failed");

    let resume = ["run", "spec.toml", "--resume", run.to_str().unwrap()];
    let [node0, node1] = finish(nodes.spawn(d, &resume, &extra));
    assert!(node0.status.success(), "{}", stderr(&node0));
    assert!(node1.status.success(), "{}", stderr(&node1));
    assert_eq!(status(&run), "completed");
    assert_same_training(&run, &single);
}

#[test]
fn nodes_that_disagree_are_refused_before_training() {
    let dir = setup();
    let d = dir.path();
    let nodes = Nodes::new();
    let serve = [("PIPE_DISTRIBUTED__SERVE_ORCHESTRATOR", "true"), ("PIPE_DISTRIBUTED__TIMEOUT_S", "20")];
    let [node0, node1] =
        finish(nodes.spawn_differing(d, &["run", "spec.toml"], &serve, &[("PIPE_OPTIMIZER__LR", "1e-3")]));
    for out in [&node0, &node1] {
        assert_eq!(out.status.code(), Some(1), "{}", stderr(out));
        assert!(stderr(out).contains("rank 1's spec differs from rank 0's"), "{}", stderr(out));
    }
    let run = runs(d).pop().unwrap();
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    assert!(!metrics.contains("\"loss\""), "no step was trained: {metrics}");
    assert_eq!(status(&run), "failed");

    // Two nodes given the same rank (each its own port, one orchestrator apart).
    let nodes = Nodes::new();
    let mut orchestrator = spawn(d, &["orchestrator", "--port", &nodes.orchestrator.to_string()], &[]);
    std::thread::sleep(Duration::from_millis(200));
    let timeout = [("PIPE_DISTRIBUTED__TIMEOUT_S", "20")];
    let twins = finish(nodes.spawn_differing(d, &["run", "spec.toml"], &timeout, &[("PIPE_DISTRIBUTED__RANK", "0")]));
    orchestrator.kill().unwrap();
    orchestrator.wait().unwrap();
    for out in &twins {
        assert_eq!(out.status.code(), Some(1), "{}", stderr(out));
        assert!(stderr(out).contains("2 nodes joined as node 0 and none as node [1]"), "{}", stderr(out));
    }

    // Node 1 counts three nodes: refused as it joins (or node 0 is, if node 1 joined first);
    // the other stops within the timeout, pointing at the specs.
    let nodes = Nodes::new();
    let serve = [("PIPE_DISTRIBUTED__SERVE_ORCHESTRATOR", "true"), ("PIPE_DISTRIBUTED__TIMEOUT_S", "5")];
    let pair = finish(nodes.spawn_differing(d, &["run", "spec.toml"], &serve, &[("PIPE_DISTRIBUTED__NODES", "3")]));
    for out in &pair {
        assert_eq!(out.status.code(), Some(1), "{}", stderr(out));
    }
    let messages: Vec<String> = pair.iter().map(stderr).collect();
    let refused = messages.iter().filter(|m| m.contains("joined with another number of nodes or peers")).count();
    let pointed = messages.iter().filter(|m| m.contains("compare the nodes' specs")).count();
    assert_eq!((refused, pointed), (1, 1), "{messages:#?}");
}

#[test]
fn bad_parallel_settings_are_refused_naming_the_field() {
    let dir = setup();
    let d = dir.path();
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("PIPE_RUN__DEVICES", "[0, 0]")], "run.devices"),
        (&[("PIPE_DISTRIBUTED__NODES", "0")], "distributed.nodes"),
        (&[("PIPE_DISTRIBUTED__NODES", "2"), ("PIPE_DISTRIBUTED__RANK", "2")], "distributed.rank"),
        (&[("PIPE_DISTRIBUTED__NODES", "2"), ("PIPE_DISTRIBUTED__ORCHESTRATOR", "nohost")], "distributed.orchestrator"),
        (&[("PIPE_DISTRIBUTED__NODES", "2"), ("PIPE_DISTRIBUTED__ORCHESTRATOR", "127.0.0.1:5000")], "distributed.port"),
        (&[("PIPE_DISTRIBUTED__TIMEOUT_S", "0")], "distributed.timeout_s"),
        (
            &[
                ("PIPE_DISTRIBUTED__NODES", "2"),
                ("PIPE_DISTRIBUTED__ORCHESTRATOR", "127.0.0.1:5000"),
                ("PIPE_DISTRIBUTED__PORT", "5001"),
                ("PIPE_DISTRIBUTED__HOST", "my host"),
            ],
            "distributed.host",
        ),
        (&[("PIPE_DISTRIBUTED__BIND", "everywhere")], "distributed.bind"),
        (
            // Listening on the loopback (the default), a node other machines address cannot be reached.
            &[
                ("PIPE_DISTRIBUTED__NODES", "2"),
                ("PIPE_DISTRIBUTED__ORCHESTRATOR", "10.0.0.1:5000"),
                ("PIPE_DISTRIBUTED__PORT", "5001"),
                ("PIPE_DISTRIBUTED__HOST", "10.0.0.2"),
            ],
            "distributed.bind",
        ),
    ];
    for (env, field) in cases {
        let out = pipe(d, &["run", "spec.toml"], env);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(&format!("field `{field}`")), "{env:?}: {}", stderr(&out));
    }
    assert!(runs(d).is_empty(), "no run folder for a refused spec");
}

/// A port pipe would listen on that another process holds: exit 2 at once naming it, not a
/// logged error and exit 0 (the orchestrator) or a wait for the timeout (a node).
#[test]
fn a_port_in_use_is_refused_naming_it() {
    let dir = setup();
    let d = dir.path();
    let within = |mut child: Child| {
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(20) {
                child.kill().unwrap();
                panic!("still running after 20 s: {}", stderr(&child.wait_with_output().unwrap()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    };
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    let out = within(spawn(d, &["orchestrator", "--port", &port], &[]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("--port: port {port} cannot be listened on")), "{}", stderr(&out));
    let out = pipe(d, &["orchestrator", "--port", "0"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--port"), "{}", stderr(&out));

    let nodes = Nodes::new();
    let held_ports = [(nodes.ports[0], "distributed.port"), (nodes.orchestrator, "distributed.orchestrator")];
    for (held, field) in held_ports {
        let _held = std::net::TcpListener::bind(("127.0.0.1", held)).unwrap();
        let env =
            nodes.env(0, &[("PIPE_DISTRIBUTED__SERVE_ORCHESTRATOR", "true"), ("PIPE_DISTRIBUTED__TIMEOUT_S", "5")]);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let out = within(spawn(d, &["run", "spec.toml"], &env));
        assert_eq!(out.status.code(), Some(2), "{field}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(field) && stderr(&out).contains(&format!("port {held} cannot be listened on")),
            "{}",
            stderr(&out)
        );
    }
}

/// A node whose orchestrator is not there stops within the timeout and says so, with the fix.
#[test]
fn an_orchestrator_that_does_not_answer_is_named() {
    let dir = setup();
    let nodes = Nodes::new();
    let env = nodes.env(0, &[("PIPE_DISTRIBUTED__TIMEOUT_S", "3")]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let started = Instant::now();
    let out = pipe(dir.path(), &["run", "spec.toml"], &env);
    assert!(started.elapsed() < Duration::from_secs(30), "stopped after {:?}", started.elapsed());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let wanted = format!("the orchestrator at 127.0.0.1:{} does not answer", nodes.orchestrator);
    assert!(stderr(&out).contains(&wanted) && stderr(&out).contains("pipe orchestrator --port"), "{}", stderr(&out));
}

/// The IPv4 address a socket listening on `port` is bound to (`127.0.0.1`, `0.0.0.0`), from
/// /proc/net/tcp.
fn listening_on(port: u16) -> Option<std::net::Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (address, at) = fields.get(1)?.split_once(':')?;
        let listening = fields.get(3) == Some(&"0A");
        let address = std::net::Ipv4Addr::from(u32::from_str_radix(address, 16).ok()?.to_le_bytes());
        (listening && u16::from_str_radix(at, 16).ok()? == port).then_some(address)
    })
}

/// The collective is not authenticated, so its servers listen on the loopback unless told:
/// the orchestrator (`--bind`), a node's data port and the orchestrator it serves
/// (`distributed.bind`).
#[test]
fn servers_listen_on_the_loopback_unless_told_otherwise() {
    let dir = setup();
    let d = dir.path();
    let wait_listening = |port: u16| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(address) = listening_on(port) {
                return address;
            }
            assert!(Instant::now() < deadline, "nothing listens on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    for (bind, expected) in [(None, "127.0.0.1"), (Some("0.0.0.0"), "0.0.0.0")] {
        let port = free_port();
        let mut args = vec!["orchestrator".to_string(), "--port".into(), port.to_string()];
        args.extend(bind.map(|b| ["--bind".to_string(), b.to_string()]).into_iter().flatten());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut orchestrator = spawn(d, &args, &[]);
        assert_eq!(wait_listening(port).to_string(), expected, "{args:?}");
        orchestrator.kill().unwrap();
        orchestrator.wait().unwrap();
    }

    let nodes = Nodes::new();
    let serve = [("PIPE_DISTRIBUTED__SERVE_ORCHESTRATOR", "true"), ("PIPE_TRAIN__EPOCHS", "200")];
    let mut children = nodes.spawn(d, &["run", "spec.toml"], &serve);
    let data_port = wait_listening(nodes.ports[0]);
    let orchestrator = wait_listening(nodes.orchestrator);
    for child in &mut children {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    assert_eq!(data_port.to_string(), "127.0.0.1");
    assert_eq!(orchestrator.to_string(), "127.0.0.1");
}
