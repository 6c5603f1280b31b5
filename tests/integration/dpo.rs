//! Preference tuning (the `dpo` stage): its loss, figures and gradients against TRL's
//! DPOTrainer (tests/fixtures/dpo, from scripts/make_dpo_reference.py: TRL 1.16, transformers
//! 5.25, PyTorch 2.15, float32 on CPU), and the stage in a run: after SFT or alone, its records,
//! its resume after SIGKILL or a signal, and its refusals.
//! Tolerances: token ids exact; losses and rewards 1e-5 absolute; summed log-probabilities
//! 1e-5 relative; every gradient within 1e-5 of its tensor's largest.

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Int, Tensor, TensorData};
use pipe::data::{preference, JinjaTemplate, PreferencePair, RenderLimits, Sequence, Tok};
use pipe::dpo::{pair_logps, reference_logps, Dpo, ScoredPair};
use pipe::model::{family, hf, CausalLm, Gpt2};
use pipe::objective::Objective;
use pipe::spec::{DataSpec, DpoLoss, DpoSpec};

use crate::common;
use crate::common::{fixture_dir, pipe, spawn, status, stderr};

type AD = Autodiff<Flex>;
const EOS: u32 = 50256;

fn trl() -> serde_json::Value {
    let text = std::fs::read_to_string(common::repo().join("tests/fixtures/dpo/reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn policy() -> Gpt2<AD> {
    hf::load::<AD>(&fixture_dir(), None, &Default::default()).unwrap().1
}

/// The fixture's pairs as pipe reads and tokenizes them from a JSONL file, prompts as written.
fn pipe_pairs(r: &serde_json::Value) -> Vec<PreferencePair> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pairs.jsonl");
    let lines: Vec<String> = r["pairs"].as_array().unwrap().iter().map(|p| p.to_string()).collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let dpo = DpoSpec { path: file.clone().into(), val_path: Some(file.into()), ..DpoSpec::default() };
    let tok = Tok::load(&fixture_dir().join("tokenizer.json")).unwrap();
    let max_length = r["max_length"].as_u64().unwrap() as usize;
    let data = preference::prepare(&dpo, &DataSpec::default(), None, &tok, max_length, 0).unwrap();
    // The file is read as training and as validation pairs: the long pair's two sequences are
    // cut in each.
    assert_eq!(data.truncated, 4);
    data.train
}

fn close(what: &str, got: f64, want: f64, tol: f64) {
    assert!((got - want).abs() <= tol, "{what}: pipe {got}, TRL {want} (tolerance {tol:e})");
}

/// `pairs` hold TRL's collated sequences (all chosen, then all rejected): the same ids, the
/// same completion tokens.
fn tokenized_as_trl(pairs: &[PreferencePair], sequences: &serde_json::Value) {
    let sequences = sequences.as_array().unwrap();
    let n = pairs.len();
    assert_eq!(sequences.len(), 2 * n);
    for (i, pair) in pairs.iter().enumerate() {
        for (which, ours, theirs) in
            [("chosen", &pair.chosen, &sequences[i]), ("rejected", &pair.rejected, &sequences[n + i])]
        {
            assert_eq!(ours.ids, common::ids(&theirs["ids"]), "pair {i} {which}: ids");
            let completion: Vec<bool> = theirs["completion"].as_array().unwrap().iter().map(|v| v == 1).collect();
            assert_eq!(ours.trained, completion, "pair {i} {which}: which tokens are the completion");
        }
    }
}

#[test]
fn pairs_are_tokenized_and_truncated_as_trl_does() {
    let r = trl();
    let pairs = pipe_pairs(&r);
    tokenized_as_trl(&pairs, &r["sequences"]);
}

/// Every file kind pipe reads holds preference pairs: the same pairs as CSV and as Parquet
/// (tests/fixtures/dpo/pairs.parquet, written by pyarrow) tokenize as from JSONL.
#[test]
fn csv_and_parquet_pairs_read_as_jsonl_pairs() {
    let r = trl();
    let from_jsonl = pipe_pairs(&r);
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("pairs.csv");
    let mut writer = String::from("prompt,chosen,rejected\n");
    for p in r["pairs"].as_array().unwrap() {
        let quoted = |k: &str| format!("\"{}\"", p[k].as_str().unwrap().replace('"', "\"\""));
        writer += &format!("{},{},{}\n", quoted("prompt"), quoted("chosen"), quoted("rejected"));
    }
    std::fs::write(&csv, writer).unwrap();
    let parquet = common::repo().join("tests/fixtures/dpo/pairs.parquet");
    let tok = Tok::load(&fixture_dir().join("tokenizer.json")).unwrap();
    let max_length = r["max_length"].as_u64().unwrap() as usize;
    for file in [csv, parquet] {
        let dpo = DpoSpec { path: file.clone().into(), val_path: Some(file.clone().into()), ..DpoSpec::default() };
        let pairs = preference::prepare(&dpo, &DataSpec::default(), None, &tok, max_length, 0).unwrap().train;
        assert_eq!(pairs, from_jsonl, "{}", file.display());
    }
}

/// TRL's conversational pairs (lists of messages), rendered by the data's chat template.
#[test]
fn conversational_pairs_are_laid_out_by_the_chat_template_as_trl_does() {
    let r = trl();
    let conversational = &r["conversational"];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pairs.jsonl");
    let lines: Vec<String> = conversational["pairs"].as_array().unwrap().iter().map(|p| p.to_string()).collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let template = common::repo().join("tests/fixtures/chat_templates/chatml.jinja");
    let data = DataSpec { chat_template: template.display().to_string(), ..DataSpec::default() };
    let tok = Tok::load(&fixture_dir().join("tokenizer.json")).unwrap();
    let limits = RenderLimits { steps: data.max_template_steps, bytes: data.max_record_bytes };
    let chat = JinjaTemplate::resolve(&data.chat_template, None, &tok, limits).unwrap().unwrap();
    let dpo = DpoSpec { path: file.clone().into(), val_path: Some(file.into()), ..DpoSpec::default() };
    let max_length = r["max_length"].as_u64().unwrap() as usize;
    let pairs = preference::prepare(&dpo, &data, Some(&chat), &tok, max_length, 0).unwrap().train;
    tokenized_as_trl(&pairs, &conversational["sequences"]);
    // Without a Jinja template, conversational pairs are refused, naming the record.
    let err = preference::prepare(&dpo, &DataSpec::default(), None, &tok, max_length, 0).unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("pairs.jsonl:1") && message.contains("data.chat_template"), "{message}");
}

#[test]
fn log_probabilities_losses_figures_and_gradients_match_trl_at_step_0() {
    let r = trl();
    let pairs = pipe_pairs(&r);
    let model = policy();
    let device = Default::default();
    // The policy's own summed completion log-probabilities, as TRL computes them.
    let ours = reference_logps(&model, &pairs, 4, EOS, &device, |_| Ok(())).unwrap();
    for (i, (got, want)) in ours.iter().zip(r["policy_logps"].as_array().unwrap()).enumerate() {
        for (k, which) in ["chosen", "rejected"].iter().enumerate() {
            let want = want[k].as_f64().unwrap();
            close(&format!("pair {i} {which} log-probability"), got[k], want, 1e-5 * want.abs());
        }
    }
    let scored: Vec<ScoredPair> = pairs
        .into_iter()
        .zip(r["reference_logps"].as_array().unwrap())
        .map(|(pair, reference)| ScoredPair {
            pair,
            reference: [reference[0].as_f64().unwrap(), reference[1].as_f64().unwrap()],
        })
        .collect();
    let refs: Vec<&ScoredPair> = scored.iter().collect();
    let bytes = std::fs::read(common::repo().join("tests/fixtures/dpo/grads.safetensors")).unwrap();
    let grads = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let beta = r["beta"].as_f64().unwrap();
    for (name, loss) in
        [("sigmoid", DpoLoss::Sigmoid), ("ipo", DpoLoss::Ipo), ("hinge", DpoLoss::Hinge), ("robust", DpoLoss::Robust)]
    {
        let label_smoothing = if loss == DpoLoss::Robust { r["label_smoothing"].as_f64().unwrap() } else { 0.0 };
        let objective = Dpo { beta, loss, label_smoothing, pad_id: EOS };
        let batch = Objective::<AD, Gpt2<AD>>::loss_sum(&objective, &model, &refs, &device);
        let pairs = refs.len() as f64;
        let want = &r["losses"][name];
        let loss_tensor = batch.loss.div_scalar(pairs);
        close(&format!("{name} loss"), loss_tensor.clone().into_scalar() as f64, want["loss"].as_f64().unwrap(), 1e-5);
        let names = Objective::<AD, Gpt2<AD>>::figure_names(&objective);
        assert_eq!(names.len(), want["figures"].as_object().unwrap().len(), "{name}: TRL's figures, no more, no fewer");
        for (figure, sum) in names.iter().zip(&batch.figures) {
            let theirs = want["figures"][*figure].as_f64().unwrap_or_else(|| panic!("TRL logs no {figure}"));
            close(&format!("{name} {figure}"), sum / pairs, theirs, 1e-5 * theirs.abs().max(1.0));
        }
        let ours = common::gradients_by_name(&model, loss_tensor);
        let mut compared = 0;
        for (param, _, got) in ours {
            let Ok(want) = grads.tensor(&format!("{name}/transformer.{param}")) else {
                assert!(name != "sigmoid", "sigmoid: no reference gradient for {param}");
                continue;
            };
            let want: Vec<f32> =
                want.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            assert_eq!(got.len(), want.len(), "{name} {param}");
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
            assert!(diff <= 1e-5 * scale + 1e-9, "{name} {param}: off by {diff:e}, largest gradient {scale:e}");
            compared += 1;
        }
        assert!(compared >= 25, "{name}: compared only {compared} gradients");
    }
}

/// Before the first update the policy is its reference: every log-ratio is 0, the loss ln 2.
#[test]
fn the_first_loss_is_ln_2_when_the_policy_is_its_reference() {
    let r = trl();
    let pairs = pipe_pairs(&r);
    let model = policy();
    let device = Default::default();
    let reference = reference_logps(&model, &pairs, 2, EOS, &device, |_| Ok(())).unwrap();
    let scored: Vec<ScoredPair> =
        pairs.into_iter().zip(reference).map(|(pair, reference)| ScoredPair { pair, reference }).collect();
    let refs: Vec<&ScoredPair> = scored.iter().collect();
    let objective = Dpo { beta: 0.1, loss: DpoLoss::Sigmoid, label_smoothing: 0.0, pad_id: EOS };
    let batch = Objective::<AD, Gpt2<AD>>::loss_sum(&objective, &model, &refs, &device);
    let loss = batch.loss.into_scalar() as f64 / refs.len() as f64;
    close("loss", loss, std::f64::consts::LN_2, 1e-6);
}

/// Each pair is laid out with its common prefix computed once for both completions (the
/// rejected tokens continuing its positions and skipping the chosen ones): each sequence's
/// log-probability, and its gradients, must be those of the sequence computed alone, whatever
/// the two share — a prompt, a prompt and a completion's start, one the other's start, all, a
/// single token, nothing, or a prefix trained in one and not the other — for GPT-2 and for a
/// rotary family. Tolerances: log-probabilities 1e-5 relative, gradients 1e-5 of the largest.
#[test]
fn pairs_sharing_their_prefix_score_as_each_sequence_alone() {
    let device = Default::default();
    for fixture in ["tiny-gpt2", "tiny-qwen3"] {
        let model = family::load::<AD>(&common::repo().join("tests/fixtures").join(fixture), None, &device).unwrap();
        let vocab = model.vocab_size() as u32;
        let sequence =
            |ids: &[u32], prompt: usize| Sequence::with_prompt(ids.iter().map(|i| (i * 37) % vocab).collect(), prompt);
        let pair = |chosen: (&[u32], usize), rejected: (&[u32], usize)| PreferencePair {
            chosen: sequence(chosen.0, chosen.1),
            rejected: sequence(rejected.0, rejected.1),
        };
        let pairs = [
            pair((&[5, 6, 7, 8, 9, 10], 3), (&[5, 6, 7, 11, 12], 3)),
            pair((&[5, 6, 7, 8, 9, 10, 11], 3), (&[5, 6, 7, 8, 9, 13], 3)),
            pair((&[20, 21, 22, 23], 2), (&[20, 21, 22, 23, 24, 25], 2)),
            pair((&[20, 21, 22, 23, 24, 25, 26], 2), (&[20, 21, 22, 23], 2)),
            pair((&[30, 31, 32, 33], 2), (&[30, 31, 32, 33], 2)),
            pair((&[40, 41, 42], 1), (&[43, 44, 45, 46], 1)),
            pair((&[50, 51, 52, 53, 54], 3), (&[50, 51, 52, 53, 55], 1)),
            pair((&[60, 61, 62], 1), (&[60, 63, 64, 65], 1)),
        ];
        let n = pairs.len();
        let refs: Vec<&PreferencePair> = pairs.iter().collect();
        let (shared, _) = pair_logps(&model, &refs, EOS % vocab, &device); // [2n]
                                                                           // Each sequence alone: its trained tokens' summed log-probability. → [2n]
        let alone: Vec<Tensor<AD, 1>> = pairs
            .iter()
            .map(|p| &p.chosen)
            .chain(pairs.iter().map(|p| &p.rejected))
            .map(|s| {
                let len = s.ids.len() - 1;
                let ids = |range: std::ops::Range<usize>| {
                    let ids: Vec<i32> = s.ids[range].iter().map(|&i| i as i32).collect();
                    Tensor::<AD, 2, Int>::from_data(TensorData::new(ids, [1, len]), &device)
                };
                let mask: Vec<f32> = s.trained[1..].iter().map(|&t| f32::from(u8::from(t))).collect();
                let mask = Tensor::<AD, 2>::from_data(TensorData::new(mask, [1, len]), &device);
                (model.token_nll(ids(0..len), ids(1..len + 1)) * mask).sum().neg()
            })
            .collect();
        let alone = Tensor::cat(alone, 0);
        let (got, want): (Vec<f32>, Vec<f32>) =
            (shared.clone().into_data().to_vec().unwrap(), alone.clone().into_data().to_vec().unwrap());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let which = if i < n { "chosen" } else { "rejected" };
            assert!((g - w).abs() <= 1e-5 * w.abs(), "{fixture} pair {} {which}: {g} shared, {w} alone", i % n);
        }
        // Unequal weights, so that no sequence's gradient can hide behind another's.
        let weights: Vec<f32> =
            (0..2 * n).map(|i| 1.0 + 0.37 * i as f32 * if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
        let weights = Tensor::<AD, 1>::from_data(TensorData::new(weights, [2 * n]), &device);
        let shared = common::gradients_by_name(&model, (shared * weights.clone()).sum());
        let alone = common::gradients_by_name(&model, (alone * weights).sum());
        assert_eq!(shared.len(), alone.len(), "{fixture}: the same parameters have gradients");
        for ((name, _, got), (_, _, want)) in shared.iter().zip(&alone) {
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff <= 1e-5 * scale, "{fixture} {name}: off by {diff:e}, largest gradient {scale:e}");
        }
    }
}

// --- the stage in a run ---

/// SFT on the shipped pairs, then DPO on pairs made from them: the reference answer chosen,
/// its words in reverse order rejected.
fn run_spec(train_extra: &str, dpo_extra: &str) -> String {
    common::spec(&format!(
        r#"
[run]
name = "prefs"
seed = 5
stages = ["train", "dpo", "eval"]

[data]
val_fraction = 0.1
prompt_template = "{{prompt}}\n"

[model]
context = 64

[train]
epochs = 1
batch_size = 8
{train_extra}

[dpo]
path = "prefs.jsonl"
val_fraction = 0.2
epochs = 2
batch_size = 4
lr = 3e-3
{dpo_extra}
"#
    ))
}

/// A folder with the spec, 40 SFT pairs and 40 preference pairs.
fn folder(spec: &str) -> tempfile::TempDir {
    let dir = common::folder_with(spec, 40);
    let sft = std::fs::read_to_string(dir.path().join("train.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = sft.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let prefs: Vec<String> = (0..records.len())
        .map(|i| {
            serde_json::json!({
                "prompt": records[i]["prompt"],
                "chosen": records[i]["response"],
                "rejected": records[i]["response"].as_str().unwrap().split(' ').rev().collect::<Vec<_>>().join(" "),
            })
            .to_string()
        })
        .collect();
    std::fs::write(dir.path().join("prefs.jsonl"), prefs.join("\n")).unwrap();
    dir
}

fn runs(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut runs: Vec<PathBuf> = std::fs::read_dir(dir.join("runs").join(name))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    runs.sort();
    runs
}

fn records(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn dpo_steps(run: &Path) -> Vec<serde_json::Value> {
    records(run).into_iter().filter(|m| m["stage"] == "dpo" && m.get("lr").is_some()).collect()
}

#[test]
fn sft_then_dpo_records_trl_figures_and_saves_the_dpo_model() {
    let dir = folder(&run_spec("eval_every = 5", ""));
    let out = pipe(dir.path(), &["run", "spec.toml"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = runs(dir.path(), "prefs").pop().unwrap();
    assert_eq!(status(&run), "completed");
    // 32 training pairs (8 held out), 4 a step, 2 epochs.
    let steps = dpo_steps(&run);
    assert_eq!(steps.iter().map(|s| s["step"].as_u64().unwrap()).collect::<Vec<_>>(), (1..=16).collect::<Vec<_>>());
    close("first DPO loss", steps[0]["loss"].as_f64().unwrap(), std::f64::consts::LN_2, 1e-6);
    for figure in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert!(steps.iter().all(|s| s[figure].is_number()), "every DPO step records {figure}");
    }
    assert_eq!(steps[0]["rewards/margins"].as_f64().unwrap(), 0.0, "no margin before the first update");
    let losses: Vec<f64> = steps.iter().map(|s| s["loss"].as_f64().unwrap()).collect();
    let margins: Vec<f64> = steps.iter().map(|s| s["rewards/margins"].as_f64().unwrap()).collect();
    let late = |v: &[f64]| v[12..].iter().sum::<f64>() / 4.0;
    assert!(late(&losses) < std::f64::consts::LN_2 - 0.01, "DPO lowered its loss: {losses:?}");
    assert!(late(&margins) > 0.05, "the chosen answers pulled ahead: {margins:?}");
    // SFT's records are unmarked and keep their figures to themselves.
    let sft: Vec<_> = records(&run).into_iter().filter(|m| m.get("stage").is_none()).collect();
    assert!(!sft.is_empty() && sft.iter().all(|m| m.get("rewards/chosen").is_none()));
    // Validation on the held-out pairs, every 5 steps and at each epoch's end.
    let evals: Vec<_> =
        records(&run).into_iter().filter(|m| m["stage"] == "dpo" && m.get("val_loss").is_some()).collect();
    assert!(evals.len() >= 3, "{evals:?}");
    let during: Vec<_> = evals.iter().filter(|m| m.get("epoch").is_some()).collect();
    assert_eq!(during.iter().map(|m| m["step"].as_u64().unwrap()).collect::<Vec<_>>(), [5, 8, 10, 15, 16]);
    assert!(during.iter().all(|m| m["rewards/accuracies"].is_number() && m["rewards/margins"].is_number()));
    let accuracy = |m: &serde_json::Value| m["rewards/accuracies"].as_f64().unwrap();
    assert!(accuracy(during.last().unwrap()) >= accuracy(during[0]), "{during:?}");
    // The reference's log-probabilities are kept for a resume; final/ is the DPO model.
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("dpo/reference_logps.json")).unwrap()).unwrap();
    assert!(reference.to_string().len() > 100);
    assert!(run.join("final/model.safetensors").is_file());

    // `pipe runs` and `pipe compare` show the DPO figures apart from SFT's.
    let last = during.last().unwrap();
    let out = pipe(dir.path(), &["runs", "runs"], &[]);
    let table = common::stdout(&out);
    assert!(table.contains("dpo steps, val reward acc / margin"), "{table}");
    let cell = format!("16, {:.3} / {:.3}", accuracy(last), last["rewards/margins"].as_f64().unwrap());
    assert!(table.contains(&cell), "{cell} in {table}");
    let out = pipe(dir.path(), &["compare", "prefs", "--json"], &[]);
    let comparison: serde_json::Value = serde_json::from_str(&common::stdout(&out)).unwrap();
    let shown = &comparison["runs"][0];
    assert_eq!(shown["dpo"]["loss"].as_array().unwrap().len(), 16);
    assert_eq!(shown["dpo"]["val"].as_array().unwrap().len(), during.len());
    assert_eq!(shown["dpo"]["val"][during.len() - 1]["reward_accuracy"], last["rewards/accuracies"]);
    assert_eq!(shown["train_loss"].as_array().unwrap().len(), 5, "SFT's curve holds SFT's steps only");
    let out = pipe(dir.path(), &["compare", "prefs"], &[]);
    assert!(common::stdout(&out).contains("preference tuning (dpo)"), "{}", common::stdout(&out));
    // `pipe data` previews the pairs, each completion marked.
    let out = pipe(dir.path(), &["data", "spec.toml", "-n", "1"], &[]);
    let preview = common::stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(preview.contains("--- pair 1 chosen (") && preview.contains("--- pair 1 rejected ("), "{preview}");
    assert!(preview.contains("--- 32 preference pairs for training, 8 for validation"), "{preview}");
    // TensorBoard: DPO's figures under dpo/train/ and dpo/val/, a value per step and evaluation.
    let events = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("events.out"))
        .unwrap();
    let mut tags: std::collections::BTreeMap<String, usize> = Default::default();
    for event in pipe::tensorboard::read(&events).unwrap() {
        for value in event.summary.iter().flat_map(|s| &s.value) {
            *tags.entry(value.tag.clone()).or_default() += 1;
        }
    }
    assert_eq!(tags.get("dpo/train/loss"), Some(&16), "{tags:?}");
    assert_eq!(tags.get("dpo/train/rewards/accuracies"), Some(&16), "{tags:?}");
    assert_eq!(tags.get("dpo/val/rewards/margins"), Some(&during.len()), "{tags:?}");
}

/// SIGKILL mid-DPO (in the middle of writing its checkpoint), then `pipe resume`: the DPO
/// stage picks up from its own checkpoint with the stored reference, and ends byte-identical.
#[test]
fn sigkill_mid_dpo_then_resume_is_exact() {
    let spec = run_spec("checkpoint_every = 3", "");
    let dir = folder(&spec);
    let out = pipe(dir.path(), &["run", "spec.toml", "--set", "run.name=reference"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let reference = runs(dir.path(), "reference").pop().unwrap();
    // SFT runs 5 steps; step 9 is DPO's.
    let mut child = spawn(dir.path(), &["run", "spec.toml"], &[("PIPEFAULT_KILL_IN_CHECKPOINT", "9")]);
    child.wait().unwrap();
    let run = runs(dir.path(), "prefs").pop().unwrap();
    assert_ne!(status(&run), "completed");
    let out = pipe(dir.path(), &["resume", run.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("scoring the pairs with the reference model"),
        "the reference is read back, not recomputed"
    );
    assert_eq!(status(&run), "completed");
    let weights = |r: &Path| std::fs::read(r.join("final/model.safetensors")).unwrap();
    assert!(weights(&run) == weights(&reference), "final weights differ from the uninterrupted run's");
    let losses = |r: &Path| {
        dpo_steps(r).iter().map(|s| (s["step"].as_u64().unwrap(), s["loss"].as_f64().unwrap())).collect::<Vec<_>>()
    };
    assert_eq!(losses(&run), losses(&reference), "every DPO step once, with the same loss");
}

/// A run stopped as its DPO stage begins resumes at DPO, not at SFT.
#[test]
fn a_run_stopped_between_sft_and_dpo_resumes_at_dpo() {
    let dir = folder(&run_spec("", ""));
    let out = pipe(dir.path(), &["run", "spec.toml", "--set", "run.name=reference"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let reference = runs(dir.path(), "reference").pop().unwrap();
    let out = pipe(dir.path(), &["run", "spec.toml"], &[("PIPEFAULT_SIGNAL_AT_STAGE", "dpo:15")]);
    assert_eq!(out.status.code(), Some(130 + 13), "{}", stderr(&out));
    let run = runs(dir.path(), "prefs").pop().unwrap();
    assert_eq!(status(&run), "interrupted");
    let sft_steps = |r: &Path| records(r).iter().filter(|m| m.get("stage").is_none() && m.get("lr").is_some()).count();
    let before = sft_steps(&run);
    // The preference data is one of the run's inputs: changed, the resume is refused naming it.
    let prefs = dir.path().join("prefs.jsonl");
    let original = std::fs::read_to_string(&prefs).unwrap();
    std::fs::write(&prefs, original.replacen("\n", "\n\n", 1)).unwrap();
    let out = pipe(dir.path(), &["resume", run.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("dpo.path"), "{}", stderr(&out));
    std::fs::write(&prefs, original).unwrap();
    let out = pipe(dir.path(), &["resume", run.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sft_steps(&run), before, "SFT is not run again");
    let weights = |r: &Path| std::fs::read(r.join("final/model.safetensors")).unwrap();
    assert!(weights(&run) == weights(&reference));
}

/// `stages = ["dpo"]` from a model folder needs no [data] or [train].
#[test]
fn dpo_alone_from_a_model_needs_no_data_or_train_section() {
    let dir = tempfile::tempdir().unwrap();
    let pairs: Vec<String> = trl()["pairs"].as_array().unwrap().iter().map(|p| p.to_string()).collect();
    std::fs::write(dir.path().join("prefs.jsonl"), [&pairs[..], &pairs[..], &pairs[..]].concat().join("\n")).unwrap();
    let spec = format!(
        "[run]\nname = \"alone\"\nruns_dir = \"runs\"\nstages = [\"dpo\"]\n\n[model]\npath = {:?}\n\n\
         [dpo]\npath = \"prefs.jsonl\"\nval_fraction = 0.0\nbatch_size = 3\nmax_length = 48\n",
        fixture_dir().display().to_string()
    );
    std::fs::write(dir.path().join("spec.toml"), spec).unwrap();
    let out = pipe(dir.path(), &["run", "spec.toml"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = runs(dir.path(), "alone").pop().unwrap();
    let steps = dpo_steps(&run);
    assert_eq!(steps.len(), 6, "18 pairs, 3 a step, one epoch");
    close("first loss", steps[0]["loss"].as_f64().unwrap(), std::f64::consts::LN_2, 1e-6);
    assert!(run.join("final/model.safetensors").is_file());
    // `pipe runs` shows the DPO stage's steps (its own steps column counts SFT's, none here),
    // and `pipe data` sums up the pairs alone: there are no SFT examples to speak of.
    let table = common::stdout(&pipe(dir.path(), &["runs", "runs"], &[]));
    assert!(table.lines().any(|l| l.starts_with("alone") && l.contains(" 6, ")), "{table}");
    let preview = common::stdout(&pipe(dir.path(), &["data", "spec.toml", "-n", "1"], &[]));
    assert!(preview.contains("--- 18 preference pairs for training, 0 for validation"), "{preview}");
    assert!(!preview.contains("examples ->"), "{preview}");
}

/// Under [lora] the adapters are what DPO trains; the reference is the base as the stage
/// began (adapters off: no second copy), so the first loss is ln 2 and final/ holds adapters.
#[test]
fn dpo_trains_lora_adapters_against_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let pairs: Vec<String> = trl()["pairs"].as_array().unwrap().iter().map(|p| p.to_string()).collect();
    std::fs::write(dir.path().join("prefs.jsonl"), [&pairs[..], &pairs[..], &pairs[..]].concat().join("\n")).unwrap();
    let spec = format!(
        "[run]\nname = \"adapters\"\nruns_dir = \"runs\"\nstages = [\"dpo\"]\n\n[model]\npath = {:?}\n\n\
         [dpo]\npath = \"prefs.jsonl\"\nval_fraction = 0.0\nbatch_size = 3\nmax_length = 48\nlr = 1e-2\nepochs = 3\n\n\
         [lora]\nrank = 4\nalpha = 8\ntargets = [\"c_attn\", \"mlp.c_proj\"]\n",
        fixture_dir().display().to_string()
    );
    std::fs::write(dir.path().join("spec.toml"), spec).unwrap();
    let out = pipe(dir.path(), &["run", "spec.toml"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = runs(dir.path(), "adapters").pop().unwrap();
    let steps = dpo_steps(&run);
    assert_eq!(steps.len(), 18);
    close("first loss", steps[0]["loss"].as_f64().unwrap(), std::f64::consts::LN_2, 1e-6);
    let late: f64 = steps[15..].iter().map(|s| s["loss"].as_f64().unwrap()).sum::<f64>() / 3.0;
    assert!(late < 0.6, "the adapters learned the pairs: {late}");
    assert!(run.join("final/adapter/adapter_model.safetensors").is_file(), "final/ holds the adapters");
    assert!(!run.join("final/model.safetensors").exists(), "not a copy of the base");
}

/// A dpo stage alone, from a model folder, killed while writing a checkpoint and resumed, ends
/// with the weights of an uninterrupted run, full and under [lora]: each process makes the
/// model's parameters afresh, and the resumed one takes the checkpoint's parameter ids back, so
/// the optimizer's moments are found again rather than started over.
#[test]
fn sigkill_mid_dpo_alone_then_resume_is_exact() {
    let pairs: Vec<String> = trl()["pairs"].as_array().unwrap().iter().map(|p| p.to_string()).collect();
    for (lora, weights) in [("", "final/model.safetensors"), (LORA, "final/adapter/adapter_model.safetensors")] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("prefs.jsonl"), [&pairs[..], &pairs[..], &pairs[..]].concat().join("\n"))
            .unwrap();
        let spec = format!(
            "[run]\nname = \"alone\"\nruns_dir = \"runs\"\nstages = [\"dpo\"]\n\n[model]\npath = {:?}\n\n\
             [train]\ncheckpoint_every = 2\n\n\
             [dpo]\npath = \"prefs.jsonl\"\nval_fraction = 0.0\nbatch_size = 3\nmax_length = 48\nlr = 1e-2\n{lora}",
            fixture_dir().display().to_string()
        );
        std::fs::write(dir.path().join("spec.toml"), spec).unwrap();
        let out = pipe(dir.path(), &["run", "spec.toml", "--set", "run.name=reference"], &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let reference = runs(dir.path(), "reference").pop().unwrap();
        // Six steps; killed writing step 4's checkpoint, the run goes on from step 2's.
        spawn(dir.path(), &["run", "spec.toml"], &[("PIPEFAULT_KILL_IN_CHECKPOINT", "4")]).wait().unwrap();
        let run = runs(dir.path(), "alone").pop().unwrap();
        assert_ne!(status(&run), "completed");
        let out = pipe(dir.path(), &["resume", run.to_str().unwrap()], &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let losses = |r: &Path| dpo_steps(r).iter().map(|s| s["loss"].as_f64().unwrap()).collect::<Vec<_>>();
        assert_eq!(losses(&run), losses(&reference), "{lora}: every step's loss as uninterrupted");
        let read = |r: &Path| std::fs::read(r.join(weights)).unwrap();
        assert!(read(&run) == read(&reference), "{lora}: final weights differ from the uninterrupted run's");
    }
}

/// The adapters the resume tests put on the fixture.
const LORA: &str = "\n[lora]\nrank = 4\nalpha = 8\ntargets = [\"c_attn\", \"mlp.c_proj\"]\n";

#[test]
fn bad_preference_input_exits_2_naming_the_file_record_and_field() {
    let cases: [(&str, &str, &[&str]); 5] = [
        (r#"{"prompt": "a", "chosen": "b"}"#, "", &["prefs.jsonl:2", "rejected"]),
        (r#"{"prompt": "a", "chosen": 3, "rejected": "c"}"#, "", &["prefs.jsonl:2", "chosen"]),
        (r#"{"question": "a", "chosen": "b", "rejected": "c"}"#, "", &["prefs.jsonl:2", "prompt"]),
        (r#"{"prompt": "a", "chosen": "b", "rejected": "c"}"#, "beta = 0.0", &["dpo.beta"]),
        (
            r#"{"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": [{"role": "assistant", "content": "c"}]}"#,
            "",
            &["prefs.jsonl:2", "`chosen` must be a list of messages"],
        ),
    ];
    for (second, extra, wanted) in cases {
        let dir = folder(&run_spec("", extra));
        let first = r#"{"prompt": "x", "chosen": "y", "rejected": "z"}"#;
        std::fs::write(dir.path().join("prefs.jsonl"), format!("{first}\n{second}\n{first}\n")).unwrap();
        let out = pipe(dir.path(), &["run", "spec.toml"], &[]);
        assert_eq!(out.status.code(), Some(2), "{second} / {extra}: {}", stderr(&out));
        let message = stderr(&out);
        for w in wanted {
            assert!(message.contains(w), "{second} / {extra}: the message names {w}: {message}");
        }
        assert!(!message.contains("panicked"), "{message}");
    }
}

/// A dpo stage whose micro-batches cannot fit in the machine's memory is refused before the run
/// starts, naming the dpo batch and what to lower, though the SFT before it would fit.
#[test]
fn a_dpo_stage_too_large_for_memory_is_refused_before_the_run_starts() {
    let changes = "[model]\nlayers = 8\nheads = 1024\nembd = 1024\ncontext = 1024\n[dpo]\nbatch_size = 64";
    let dir = folder(&common::overlaid(&run_spec("", ""), changes));
    let long = |seed: usize| (0..600).map(|i| format!("w{}", (i * 7 + seed) % 97)).collect::<Vec<_>>().join(" ");
    let pairs: Vec<String> = (0..64)
        .map(|i| serde_json::json!({"prompt": long(i), "chosen": long(i + 1), "rejected": long(i + 2)}).to_string())
        .collect();
    std::fs::write(dir.path().join("prefs.jsonl"), pairs.join("\n")).unwrap();
    let out = pipe(dir.path(), &["run", "spec.toml"], &[]);
    let message = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{message}");
    for wanted in ["the dpo stage's batch of 64 pairs", "GiB of activations", "lower dpo.batch_size"] {
        assert!(message.contains(wanted), "the message names {wanted}: {message}");
    }
    assert!(runs(dir.path(), "prefs").is_empty(), "no run folder is made");
}

/// Settings the dpo stage cannot honour are refused by `pipe check`, naming the field; a [dpo]
/// section without the stage is reported as doing nothing.
#[test]
fn dpo_settings_are_checked_naming_the_field() {
    let cases: [(&str, &str); 6] = [
        ("[run]\nstages = [\"dpo\", \"train\"]", "run.stages"),
        ("[dpo]\nlabel_smoothing = 0.1", "dpo.label_smoothing"),
        ("[dpo]\nloss = \"robust\"\nlabel_smoothing = 0.5", "dpo.label_smoothing"),
        ("[dpo]\nselect_metric = \"rouge_l\"", "dpo.select_metric"),
        ("[dpo]\nval_fraction = 0.0\n[train]\nfinal = \"best\"", "dpo.val_fraction"),
        ("[dpo]\nmax_length = 1", "dpo.max_length"),
    ];
    for (changes, field) in cases {
        let dir = folder(&common::overlaid(&run_spec("", ""), changes));
        let out = pipe(dir.path(), &["check", "spec.toml"], &[]);
        assert_eq!(out.status.code(), Some(2), "{changes}: {}", stderr(&out));
        assert!(stderr(&out).contains(field), "{changes}: the message names {field}: {}", stderr(&out));
    }
    let dir = folder(&common::overlaid(&run_spec("", ""), "[run]\nstages = [\"train\"]"));
    let out = pipe(dir.path(), &["check", "spec.toml"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(common::stdout(&out).contains("dpo.*: run.stages has no dpo stage"), "{}", common::stdout(&out));
}
