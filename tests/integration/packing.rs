//! Packing several examples into one sequence: the same loss and gradients as the examples
//! unpacked (block-diagonal attention, positions restarting at each example), best-fit
//! decreasing packing, and packed runs through the binary: `pipe data`, exact resume after a
//! kill, and the settings that are refused.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::common;
use crate::common::{fixture_dir, newest_run, pipe, stderr, stdout, step_losses};
use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use pipe::data::{pack, Batch, Sequence};
use pipe::model::{hf, params, CausalLm, Gpt2};

type AD = Autodiff<Flex>;

/// Examples of different lengths with prompts (untrained) and responses (trained).
fn examples() -> Vec<Sequence> {
    let ids = |n: usize, seed: u32| (0..n as u32).map(|i| (i * 7919 + seed * 104729) % 50000).collect::<Vec<u32>>();
    vec![
        Sequence::with_prompt(ids(9, 1), 4),
        Sequence::with_prompt(ids(17, 2), 6),
        Sequence::with_prompt(ids(5, 3), 2),
        Sequence::all_trained(ids(12, 4)),
        Sequence::with_prompt(ids(23, 5), 10),
    ]
}

/// The summed loss of `sequences` as one batch, and every parameter's gradient in visiting order.
fn loss_and_grads(sequences: &[Sequence]) -> (f32, Vec<(String, Vec<f32>)>) {
    use burn::module::{ModuleVisitor, Param};
    use burn::optim::GradientsParams;
    use burn::tensor::Tensor;
    struct Collect<'a>(&'a GradientsParams, Vec<Vec<f32>>);
    impl ModuleVisitor<AD> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
            let grad = self.0.get::<Flex, D>(param.id).expect("every parameter has a gradient");
            self.1.push(grad.into_data().to_vec().unwrap());
        }
    }
    let model: Gpt2<AD> = hf::load::<AD>(&fixture_dir(), None, &Default::default()).unwrap().1;
    let refs: Vec<&Sequence> = sequences.iter().collect();
    let batch = Batch::<AD>::new(&refs, 50256, &Default::default());
    let loss = model.loss_sum(batch.inputs, batch.targets, batch.scored, batch.packing);
    let value = loss.clone().into_scalar();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let mut collect = Collect(&grads, Vec::new());
    model.visit(&mut collect);
    let names = params::ids(&model).into_iter().map(|(name, _)| name);
    (value, names.zip(collect.1).collect())
}

#[test]
fn a_packed_batch_has_the_loss_and_gradients_of_its_examples_unpacked() {
    let examples = examples();
    let (unpacked_loss, unpacked_grads) = loss_and_grads(&examples);
    // Two packed rows: [0, 1, 2] and [3, 4], against the five examples one per row.
    let packed = vec![
        Sequence::packed(&[&examples[0], &examples[1], &examples[2]]),
        Sequence::packed(&[&examples[3], &examples[4]]),
    ];
    assert_eq!(
        packed.iter().map(Sequence::loss_tokens).sum::<usize>(),
        examples.iter().map(Sequence::loss_tokens).sum::<usize>(),
        "packing trains the same tokens, and nothing across a boundary"
    );
    let (packed_loss, packed_grads) = loss_and_grads(&packed);
    // The same rows without packing's attention mask and restarted positions differ.
    let naive: Vec<Sequence> = packed.iter().map(|s| Sequence::new(s.ids.clone(), s.trained.clone())).collect();
    let (naive_loss, _) = loss_and_grads(&naive);
    assert!((naive_loss - unpacked_loss).abs() > 1e-3 * unpacked_loss.abs(), "the examples would see each other");
    assert!(
        (packed_loss - unpacked_loss).abs() <= 1e-5 * unpacked_loss.abs(),
        "loss: packed {packed_loss}, unpacked {unpacked_loss}"
    );
    for ((name, got), (_, want)) in packed_grads.iter().zip(&unpacked_grads) {
        let scale = want.iter().fold(0f32, |m, g| m.max(g.abs())).max(1e-12);
        let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5 * scale.max(1.0), "{name}: gradients differ by {worst} (largest {scale})");
    }
}

#[test]
fn best_fit_decreasing_packs_every_example_once_within_capacity() {
    let lengths = [30, 5, 17, 12, 28, 3, 9, 40, 22, 1, 14, 6];
    let sequences: Vec<Sequence> =
        lengths.iter().enumerate().map(|(i, &n)| Sequence::all_trained(vec![i as u32; n])).collect();
    let packed = pack(&sequences, 40);
    let mut seen: Vec<u32> = packed
        .iter()
        .flat_map(|s| {
            let mut starts = vec![0];
            starts.extend(&s.segments);
            starts.into_iter().map(move |start| s.ids[start])
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (0..lengths.len() as u32).collect::<Vec<_>>(), "every example exactly once");
    assert!(packed.iter().all(|s| s.ids.len() <= 40), "no packed sequence over capacity");
    let total: usize = lengths.iter().sum();
    assert_eq!(packed.len(), total.div_ceil(40), "187 tokens fit the fewest 40-token sequences here");
    assert_eq!(pack(&sequences, 40), packed, "deterministic");
}

fn spec() -> String {
    common::spec(
        r#"
[run]
name = "packed"
seed = 3
stages = ["train"]

[data]
val_fraction = 0.1
prompt_template = "{prompt}\n"

[tokenizer]
train_vocab_size = 400

[model]
layers = 2
embd = 32
context = 128
dropout = 0.1

[optimizer]
lr = 2e-3

[train]
epochs = 2
batch_size = 2
max_length = 128
packing = true
checkpoint_every = 3
"#,
    )
}

fn setup() -> tempfile::TempDir {
    common::folder_with(&spec(), 60)
}

#[test]
fn a_packed_run_shows_its_packing_and_resumes_exactly_after_a_kill() {
    let dir = setup();
    let out = pipe(dir.path(), &["data", "spec.toml", "-n", "1"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = stdout(&out);
    assert!(shown.contains("--- packed: 54 examples into") && shown.contains("% full"), "{shown}");
    assert!(shown.matches("<|endoftext|>").count() >= 2, "the first sequence holds several examples: {shown}");

    let out = pipe(dir.path(), &["run", "spec.toml", "--set", "run.name=reference"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let reference = newest_run(dir.path(), "reference");
    let status = Command::new(env!("CARGO_BIN_EXE_pipe-faults"))
        .current_dir(dir.path())
        .args(["run", "spec.toml"])
        .env("PIPEFAULT_KILL_IN_CHECKPOINT", "3")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let run = newest_run(dir.path(), "packed");
    let out = pipe(dir.path(), &["resume", run.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let weights = |r: &Path| std::fs::read(r.join("final/model.safetensors")).unwrap();
    assert!(weights(&run) == weights(&reference), "final weights equal the uninterrupted run's");
    assert_eq!(step_losses(&run), step_losses(&reference));
    // Fewer, fuller steps than unpacked: 54 examples in batches of 2 would be 27 steps an epoch.
    assert!(step_losses(&run).len() < 2 * 27, "{} steps", step_losses(&run).len());
}

#[test]
fn packing_where_it_makes_no_sense_is_refused() {
    let dir = setup();
    for (sets, needle) in [
        (&["--set", "data.kind=text"][..], "train.packing"),
        (&["--set", "train.group_by_length=true"][..], "train.packing"),
    ] {
        let mut args = vec!["run", "spec.toml"];
        args.extend_from_slice(sets);
        let out = pipe(dir.path(), &args, &[]);
        assert_eq!(out.status.code(), Some(2), "{sets:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{sets:?}: {}", stderr(&out));
    }
}
