//! The Llama family (Llama, Qwen2, Qwen3) against transformers, one suite run over every
//! fixture: tests/fixtures/tiny-{llama,qwen2,qwen3}, made with transformers 5.25 / PyTorch 2.15
//! (eager attention, float32, CPU) by scripts/make_llama_fixtures.py. Each fixture exercises its
//! family's features (grouped-query attention, biases, llama3 RoPE scaling, q/k norms, a wide
//! head_dim, tied and untied heads) and its weights' storage (f32, bf16 in shards, f16).
//!
//! Tolerances: per-token NLL and losses within 1e-4, every gradient within 1e-5 of its
//! tensor's largest, AdamW steps within 1e-4, greedy ids identical.

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::tensor::{Int, Tensor, TensorData};
use pipe::data::{Batch, Sequence, Tok};
use pipe::generate::{Decode, Generator, Sampling};
use pipe::model::lora::{self, Adapters, BaseModel, Target};
use pipe::model::{family, CausalLm, Model, ModelConfig};
use pipe::spec::{OptimizerKind, OptimizerSpec};
use pipe::train::Trainer;

use crate::common::{fed_at_once_or_token_by_token_alike, floats, gradients_by_name as named_gradients, ids, repo};

type B = Flex;
type AD = Autodiff<Flex>;

const FIXTURES: [&str; 3] = ["tiny-llama", "tiny-qwen2", "tiny-qwen3"];

fn dir(fixture: &str) -> PathBuf {
    repo().join("tests/fixtures").join(fixture)
}

fn reference(fixture: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir(fixture).join("reference.json")).unwrap()).unwrap()
}

fn load<Bk: pipe::model::FusedOps>(fixture: &str) -> Model<Bk> {
    family::load::<Bk>(&dir(fixture), None, &Default::default()).unwrap_or_else(|e| panic!("{fixture}: {e:#}"))
}

/// The fixture's end-of-text id, which pads its batches.
fn eos(fixture: &str) -> u32 {
    Tok::load(&dir(fixture).join("tokenizer.json")).unwrap().eos_id
}

fn sequences(r: &serde_json::Value) -> Vec<Sequence> {
    r["encoded"].as_array().unwrap().iter().map(|e| Sequence::all_trained(ids(e))).collect()
}

fn batch_loss(model: &Model<B>, sequences: &[Sequence], pad: u32) -> f64 {
    let refs: Vec<&Sequence> = sequences.iter().collect();
    let batch = Batch::<B>::new(&refs, pad, &Default::default());
    let sum: f32 = model.loss_sum(batch.inputs, batch.targets, batch.scored, batch.packing).into_scalar();
    sum as f64 / batch.loss_tokens as f64
}

fn assert_close(what: &str, got: f64, want: f64, tol: f64) {
    assert!((got - want).abs() <= tol, "{what}: got {got}, transformers {want} (tolerance {tol})");
}

#[test]
fn each_config_is_read_as_its_family() {
    for (fixture, family, kv_heads, head_dim) in
        [("tiny-llama", "llama", 2, 8), ("tiny-qwen2", "qwen2", 1, 8), ("tiny-qwen3", "qwen3", 2, 16)]
    {
        let config = family::read_config(&dir(fixture)).unwrap();
        assert_eq!(config.family(), family);
        assert_eq!((config.heads(), config.kv_heads(), config.head_dim()), (4, kv_heads, head_dim), "{fixture}");
        let ModelConfig::Llama(c) = config else { panic!("{fixture} is not of the Llama family") };
        let count = CausalLm::num_params(&load::<B>(fixture));
        assert_eq!(c.num_params(), count, "{fixture}: the config's count is the model's");
    }
}

/// The special tokens as the fixture's files name them (tokenizer_config.json's EOS, the BOS
/// the post-processor adds, generation_config.json's end-of-sequence ids), and texts encoded
/// as transformers' tokenizer encodes them (with that BOS).
#[test]
fn special_tokens_and_ids_match_transformers() {
    for fixture in FIXTURES {
        let r = reference(fixture);
        let tok = Tok::load(&dir(fixture).join("tokenizer.json")).unwrap();
        assert_eq!(tok.eos_id as u64, r["eos_id"].as_u64().unwrap(), "{fixture}: EOS");
        assert_eq!(tok.bos_id.map(u64::from), r["bos_id"].as_u64(), "{fixture}: BOS");
        assert_eq!(tok.stop_ids, ids(&r["stop_ids"]), "{fixture}: end-of-sequence ids");
        for (text, want) in r["texts"].as_array().unwrap().iter().zip(r["encoded"].as_array().unwrap()) {
            assert_eq!(tok.encode_prompt(text.as_str().unwrap()).unwrap(), ids(want), "{fixture}");
        }
    }
}

/// A whole run on a checkpoint of the family: training, evaluation and samples, the run's
/// folders written in the family's format with the tokenizer's special tokens, and the
/// examples laid out as transformers' tokenizer starts a text.
#[test]
fn a_pipeline_on_a_llama_checkpoint_runs_and_writes_the_family_format() {
    let folder = crate::common::folder_with("", 20);
    let spec = format!(
        "[run]\nname = \"llama\"\nruns_dir = \"runs\"\nstages = [\"train\", \"eval\", \"generate\"]\n\
         [data]\npath = \"train.jsonl\"\nval_fraction = 0.2\nprompt_template = \"{{prompt}}\\n\"\n\
         [model]\npath = {:?}\n[train]\nepochs = 1\nbatch_size = 4\nmax_length = 48\n\
         [eval]\nresponses = 2\nmax_new_tokens = 4\n[generate]\nprompts = [\"What is the capital of Italy?\"]\nmax_new_tokens = 4\n",
        dir("tiny-llama").display().to_string()
    );
    std::fs::write(folder.path().join("spec.toml"), spec).unwrap();
    let shown = crate::common::pipe(folder.path(), &["data", "spec.toml"], &[]);
    assert!(shown.status.success(), "{}", crate::common::stderr(&shown));
    let first = crate::common::stdout(&shown).lines().nth(1).unwrap_or_default().to_string();
    assert!(first.starts_with("<s>The best reasons"), "the example starts with the BOS: {first}");
    let out = crate::common::pipe(folder.path(), &["run", "spec.toml"], &[]);
    assert!(out.status.success(), "{}", crate::common::stderr(&out));
    let run = crate::common::newest_run(folder.path(), "llama");
    assert_eq!(crate::common::status(&run), "completed");
    let read =
        |path: PathBuf| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap() };
    let final_dir = run.join("final");
    assert_eq!(read(final_dir.join("config.json"))["architectures"][0], "LlamaForCausalLM");
    assert_eq!(read(final_dir.join("generation_config.json"))["eos_token_id"], serde_json::json!([2, 4]));
    assert_eq!(read(final_dir.join("tokenizer_config.json"))["eos_token"], "</s>");
    let model = family::load::<B>(&final_dir, None, &Default::default()).unwrap();
    assert_eq!(model.config(), family::read_config(&dir("tiny-llama")).unwrap());
    let sample = std::fs::read_to_string(run.join("samples.jsonl")).unwrap();
    assert!(sample.contains("What is the capital of Italy?"), "{sample}");
}

#[test]
fn per_token_nll_and_losses_match() {
    for fixture in FIXTURES {
        let (r, model) = (reference(fixture), load::<B>(fixture));
        for (i, encoded) in r["encoded"].as_array().unwrap().iter().enumerate() {
            let x = ids(encoded);
            let tokens = |range: std::ops::Range<usize>| {
                let part: Vec<i32> = x[range.clone()].iter().map(|&t| t as i32).collect();
                Tensor::<B, 2, Int>::from_data(TensorData::new(part, [1, range.len()]), &Default::default())
            };
            let nll: Vec<f32> =
                model.token_nll(tokens(0..x.len() - 1), tokens(1..x.len())).into_data().to_vec().unwrap();
            let want = floats(&r["nll"][i]);
            assert_eq!(nll.len(), want.len());
            for (j, (got, want)) in nll.iter().zip(&want).enumerate() {
                assert_close(&format!("{fixture} text {i} token {j} NLL"), *got as f64, *want, 1e-4);
            }
        }
        let pad = eos(fixture);
        assert_close(
            &format!("{fixture} padded batch loss"),
            batch_loss(&model, &sequences(&r), pad),
            r["batch_loss"].as_f64().unwrap(),
            1e-4,
        );
        let pairs: Vec<Sequence> = (0..2)
            .map(|i| {
                let all = ids(&r["pair_encoded"][i]);
                Sequence::with_prompt(all, r["pair_prompt_lens"][i].as_u64().unwrap() as usize)
            })
            .collect();
        assert_close(
            &format!("{fixture} completion-only loss"),
            batch_loss(&model, &pairs, pad),
            r["masked_loss"].as_f64().unwrap(),
            1e-4,
        );
    }
}

#[test]
fn top5_and_greedy_ids_match() {
    for fixture in FIXTURES {
        let (r, model) = (reference(fixture), load::<B>(fixture));
        let x = ids(&r["encoded"][0]);
        let data: Vec<i32> = x.iter().map(|&t| t as i32).collect();
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(data, [1, x.len()]), &Default::default());
        let Model::Llama(llama) = &model else { panic!("{fixture} is not of the Llama family") };
        let hidden = llama.hidden(tokens, None, None);
        let logits = llama.lm_head(hidden.reshape([x.len(), llama.config.hidden_size])); // [seq, vocab]
        let top5: Vec<i32> =
            logits.argsort_descending(1).narrow(1, 0, 5).into_data().convert::<i32>().to_vec().unwrap();
        let want: Vec<i32> = r["top5"].as_array().unwrap().iter().flat_map(ids).map(|t| t as i32).collect();
        assert_eq!(top5, want, "{fixture}: top-5 ids");

        let g = &r["greedy"];
        let new_ids = ids(&g["new_ids"]);
        let mut generator = Generator::new(&model, &Default::default(), 0);
        let new = generator.generate(&ids(&g["prompt_ids"]), new_ids.len(), Sampling::GREEDY, &[], |_| true);
        assert_eq!(new, new_ids, "{fixture}: greedy ids through the KV cache");
        // Any of the stop ids ends generation, returned as the last id.
        let stop = new_ids[2];
        let until = new_ids.iter().position(|&id| id == stop).unwrap() + 1;
        let mut generator = Generator::new(&model, &Default::default(), 0);
        let stopped =
            generator.generate(&ids(&g["prompt_ids"]), new_ids.len(), Sampling::GREEDY, &[9999, stop], |_| true);
        assert_eq!(stopped, new_ids[..until], "{fixture}: stopped at {stop}");
    }
}

/// Decoding with bf16 weights (`--precision bf16` on the CPU), one decoder for every family:
/// per-token NLL within 0.01 of transformers' f32 (the weights carry 8 significant bits, as
/// for GPT-2 in bf16_decode.rs) and not equal to pipe's f32 (the weights were rounded), the
/// same greedy ids through its cache, and a prompt fed at once or token by token giving
/// bit-identical logits.
#[test]
fn bf16_decoding_follows_transformers() {
    for fixture in FIXTURES {
        let (r, model) = (reference(fixture), load::<B>(fixture));
        let decoder = model.bf16_decoder();
        let exact = texts_nll(&model, &r["encoded"]);
        let mut got = Vec::new();
        for (i, encoded) in r["encoded"].as_array().unwrap().iter().enumerate() {
            let nll = decoder.token_nll(&ids(encoded));
            let want = floats(&r["nll"][i]);
            assert_eq!(nll.len(), want.len());
            for (j, (g, w)) in nll.iter().zip(&want).enumerate() {
                assert_close(&format!("{fixture} text {i} token {j} bf16 NLL"), *g as f64, *w, 0.01);
            }
            got.extend(nll);
        }
        assert!(got != exact, "{fixture}: bf16 NLL equal to f32's: the weights were not rounded");

        let g = &r["greedy"];
        let (prompt, new_ids) = (ids(&g["prompt_ids"]), ids(&g["new_ids"]));
        let new = Generator::with(&decoder, 0).generate(&prompt, new_ids.len(), Sampling::GREEDY, &[], |_| true);
        assert_eq!(new, new_ids, "{fixture}: bf16 greedy ids");
        fed_at_once_or_token_by_token_alike(&decoder, &prompt, fixture);
    }
}

/// bf16 decoding folds a Llama's adapters in: the NLL follows PEFT's within bf16 resolution
/// (0.02 absolute: the merged weights, base + B·A, are what is rounded), not the base's.
#[test]
fn bf16_decoding_of_a_llama_includes_its_adapters() {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lora_dir().join("reference.json")).unwrap()).unwrap();
    let decoder = llama_with_peft_adapter::<B>().bf16_decoder();
    let got: Vec<f32> = r["encoded"].as_array().unwrap().iter().flat_map(|e| decoder.token_nll(&ids(e))).collect();
    let want: Vec<f64> = r["nll"].as_array().unwrap().iter().flat_map(floats).collect();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_close(&format!("adapted token {i} bf16 NLL"), *g as f64, *w, 0.02);
    }
    let plain: Vec<f32> = {
        let base = load::<B>("tiny-llama").bf16_decoder();
        r["encoded"].as_array().unwrap().iter().flat_map(|e| base.token_nll(&ids(e))).collect()
    };
    assert!(plain.iter().zip(&got).any(|(a, b)| (a - b).abs() > 0.05), "the adapters change the bf16 NLL");
}

/// Every parameter's gradient at step 0, by name as transformers names it (linear weights in
/// its [out, in] layout), on the reference's padded batch.
fn gradients_by_name(model: &Model<AD>, r: &serde_json::Value, pad: u32) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let sequences = sequences(r);
    let refs: Vec<&Sequence> = sequences.iter().collect();
    let batch = Batch::<AD>::new(&refs, pad, &Default::default());
    let loss =
        model.loss_sum(batch.inputs, batch.targets, batch.scored, batch.packing).div_scalar(batch.loss_tokens as f64);
    let hf_layout = |(name, dims, values): (String, Vec<usize>, Vec<f32>)| {
        if !(name.ends_with("_proj.weight") || name == "lm_head.weight") {
            return (name, dims, values);
        }
        let [rows, cols] = [dims[0], dims[1]];
        let transposed = (0..rows * cols).map(|i| values[(i % rows) * cols + i / rows]).collect();
        (name, vec![cols, rows], transposed)
    };
    named_gradients(model, loss).into_iter().map(hf_layout).collect()
}

/// llm.c's parity check, tensor by tensor: every parameter's gradient equals transformers'.
#[test]
fn every_parameter_gradient_matches_transformers() {
    for fixture in FIXTURES {
        let r = reference(fixture);
        let model = load::<AD>(fixture);
        let bytes = std::fs::read(dir(fixture).join("grads.safetensors")).unwrap();
        let reference = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let ours = gradients_by_name(&model, &r, eos(fixture));
        assert_eq!(ours.len(), reference.len(), "{fixture}: one gradient per parameter");
        for (name, shape, got) in ours {
            let want = reference.tensor(&name).unwrap_or_else(|_| panic!("{fixture}: no reference for {name}"));
            assert_eq!(want.shape(), shape.as_slice(), "{fixture}: {name}");
            let want: Vec<f32> =
                want.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
            assert!(diff <= 1e-5 * scale + 1e-8, "{fixture} {name}: off by {diff:e}, largest gradient {scale:e}");
        }
    }
}

#[test]
fn adamw_steps_match_pytorch() {
    for fixture in FIXTURES {
        let r = reference(fixture);
        let device = Default::default();
        let mut model = load::<AD>(fixture);
        let opt = OptimizerSpec {
            name: OptimizerKind::Adamw,
            lr: 1e-3,
            betas: [0.9, 0.95],
            eps: 1e-8,
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut trainer = Trainer::<AD>::new(&opt, eos(fixture), &device);
        let sequences = sequences(&r);
        let batch: Vec<&Sequence> = sequences.iter().collect();
        for (step, want) in floats(&r["adamw_losses"]).into_iter().enumerate() {
            let stats;
            (model, stats) = trainer.step(model, std::slice::from_ref(&batch), 1e-3).unwrap();
            assert_close(&format!("{fixture} AdamW step {step} loss"), stats.loss, want, 1e-4);
        }
        let _ = model.valid();
    }
}

/// Packed rows: each example is rotated from position 0 and attends within itself, so its NLL
/// is what it has alone.
#[test]
fn a_packed_row_computes_each_example_as_if_alone() {
    for fixture in FIXTURES {
        let (r, model) = (reference(fixture), load::<B>(fixture));
        let parts = sequences(&r);
        let alone: Vec<f64> = parts.iter().map(|s| batch_loss(&model, std::slice::from_ref(s), 0)).collect();
        let refs: Vec<&Sequence> = parts.iter().collect();
        let packed = Sequence::packed(&refs);
        let tokens: Vec<usize> = parts.iter().map(|s| s.ids.len() - 1).collect();
        let want =
            alone.iter().zip(&tokens).map(|(l, &n)| l * n as f64).sum::<f64>() / tokens.iter().sum::<usize>() as f64;
        assert_close(&format!("{fixture} packed loss"), batch_loss(&model, &[packed], 0), want, 1e-5);
    }
}

/// What pipe writes reads back as the same model (config and weights), in the family's format.
#[test]
fn a_saved_model_reads_back_the_same() {
    for fixture in FIXTURES {
        let (r, model) = (reference(fixture), load::<B>(fixture));
        let out = tempfile::tempdir().unwrap();
        model.save(out.path(), None).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap()).unwrap();
        let source: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir(fixture).join("config.json")).unwrap()).unwrap();
        for key in ["model_type", "architectures", "num_key_value_heads", "tie_word_embeddings", "vocab_size"] {
            assert_eq!(config[key], source[key], "{fixture}: {key}");
        }
        let heads = source["num_attention_heads"].as_u64().unwrap();
        let head_dim =
            source.get("head_dim").map_or(source["hidden_size"].as_u64().unwrap() / heads, |d| d.as_u64().unwrap());
        assert_eq!(config["head_dim"], head_dim, "{fixture}: head_dim");
        let again = family::load::<B>(out.path(), None, &Default::default()).unwrap();
        assert_eq!(again.config(), model.config());
        let pad = eos(fixture);
        assert_eq!(batch_loss(&again, &sequences(&r), pad), batch_loss(&model, &sequences(&r), pad), "{fixture}");
    }
}

/// A copy of a fixture's folder with its config.json changed by `edit`.
fn with_config(fixture: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir(fixture)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, out.path().join(path.file_name().unwrap())).unwrap();
    }
    let path = out.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
    out
}

fn refusal(folder: &Path) -> String {
    let Err(error) = family::load::<B>(folder, None, &Default::default()) else {
        panic!("{} was read", folder.display())
    };
    assert!(pipe::error::is_bad_input(&error));
    format!("{error:#}")
}

/// Every config field that changes the arithmetic is implemented or refused, naming the key and
/// the value; the RoPE base is read as transformers 4 writes it and as 5 does.
#[test]
fn settings_pipe_does_not_compute_are_refused_naming_key_and_value() {
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: [(&str, Edit, &str); 13] = [
        ("tiny-llama", Box::new(|c| c["hidden_act"] = "gelu".into()), "`hidden_act` = \"gelu\""),
        ("tiny-qwen2", Box::new(|c| c["use_sliding_window"] = true.into()), "`use_sliding_window` = true"),
        (
            "tiny-qwen3",
            Box::new(|c| c["rope_parameters"]["rope_type"] = "yarn".into()),
            "rope_type \"yarn\" is not implemented",
        ),
        ("tiny-llama", Box::new(|c| c["num_key_value_heads"] = 3.into()), "`num_key_value_heads` = 3"),
        ("tiny-llama", Box::new(|c| c["model_type"] = "mistral".into()), "`model_type` = \"mistral\""),
        ("tiny-qwen3", Box::new(|c| c["layer_types"][1] = "sliding_attention".into()), "`layer_types`"),
        // Fields transformers reads that pipe would otherwise not: a second RoPE (which
        // transformers 5 lets override the first), a partial rotation, a layer count the
        // layer list contradicts.
        (
            "tiny-llama",
            Box::new(|c| c["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 2.0})),
            "`rope_scaling` = {\"factor\":2.0,\"rope_type\":\"linear\"}: disagrees with `rope_parameters`",
        ),
        ("tiny-llama", Box::new(|c| c["partial_rotary_factor"] = 0.5.into()), "`partial_rotary_factor` = 0.5"),
        (
            "tiny-qwen3",
            Box::new(|c| c["rope_parameters"]["partial_rotary_factor"] = 0.25.into()),
            "`rope_parameters.partial_rotary_factor` = 0.25",
        ),
        ("tiny-qwen2", Box::new(|c| c["rope_parameters"]["rope_type"] = 3.into()), "`rope_type` must be a string"),
        ("tiny-qwen3", Box::new(|c| c["layer_types"] = serde_json::json!(["full_attention"])), "lists 1 layers"),
        // Special-token ids are written back on export: one that is no id is refused, not dropped.
        ("tiny-qwen2", Box::new(|c| c["eos_token_id"] = serde_json::json!([4, "x"])), "`eos_token_id` = \"x\""),
        ("tiny-llama", Box::new(|c| c["bos_token_id"] = (-1).into()), "`bos_token_id` = -1"),
    ];
    for (fixture, edit, expected) in cases {
        let folder = with_config(fixture, edit);
        let message = refusal(folder.path());
        assert!(message.contains(expected) && message.contains("config.json"), "{fixture}: {message}");
    }
    // transformers 4's spelling of the same RoPE base reads as the same model.
    let folder = with_config("tiny-qwen2", |c| {
        let theta = c["rope_parameters"]["rope_theta"].clone();
        c.as_object_mut().unwrap().remove("rope_parameters");
        c["rope_theta"] = theta;
    });
    let r = reference("tiny-qwen2");
    let model = family::load::<B>(folder.path(), None, &Default::default()).unwrap();
    assert_close(
        "rope_theta as transformers 4 writes it",
        batch_loss(&model, &sequences(&r), 0),
        r["batch_loss"].as_f64().unwrap(),
        1e-4,
    );
}

/// The tokenizer's own files: a special token or an end-of-sequence id written in no form pipe
/// reads is refused naming the file, key and value, where it used to be read as absent (the
/// EOS would then fall back to `<|endoftext|>`, or a stop id be lost).
#[test]
fn special_tokens_in_no_readable_form_are_refused() {
    let cases: [(&str, &str, serde_json::Value, &str); 3] = [
        ("tokenizer_config.json", "eos_token", serde_json::json!(5), "`eos_token` = 5"),
        ("tokenizer_config.json", "pad_token", serde_json::json!({"id": 3}), "`pad_token` = {\"id\":3}"),
        ("generation_config.json", "eos_token_id", serde_json::json!([2, 4.5]), "`eos_token_id` = 4.5"),
    ];
    for (file, key, value, expected) in cases {
        let folder = with_config("tiny-qwen2", |_| {});
        let path = folder.path().join(file);
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        json[key] = value;
        std::fs::write(&path, json.to_string()).unwrap();
        let Err(error) = Tok::load(&folder.path().join("tokenizer.json")) else { panic!("{file} {key} was read") };
        let message = format!("{error:#}");
        assert!(pipe::error::is_bad_input(&error), "{message}");
        assert!(message.contains(file) && message.contains(expected), "{message}");
    }
}

/// Shards: a tensor listed in the index but missing from its file, or one no parameter takes,
/// is named.
#[test]
fn missing_and_unexpected_tensors_of_a_sharded_checkpoint_are_named() {
    let layers = |n: usize| {
        move |c: &mut serde_json::Value| {
            c["num_hidden_layers"] = n.into();
            c["layer_types"] = vec!["full_attention"; n].into();
        }
    };
    let folder = with_config("tiny-qwen2", layers(3));
    let message = refusal(folder.path());
    assert!(message.contains("model.layers.2.input_layernorm.weight") && message.contains("missing"), "{message}");
    let folder = with_config("tiny-qwen2", layers(1));
    let message = refusal(folder.path());
    assert!(message.contains("unexpected tensors") && message.contains("model.layers.1."), "{message}");
}

fn lora_dir() -> PathBuf {
    dir("tiny-llama-lora")
}

/// tiny-llama with PEFT's adapter (rank 4 on all seven projections), as the spec's
/// `lora.from` reads it.
fn llama_with_peft_adapter<Bk: pipe::model::FusedOps>() -> Model<Bk> {
    let Model::Llama(base) = load::<Bk>("tiny-llama") else { panic!("tiny-llama is a Llama") };
    let (config, _) = lora::read_peft_config(&lora_dir(), "llama").unwrap();
    assert_eq!(config.targets.len(), 7);
    let adapters = Adapters { config, base: BaseModel::of("tiny-llama".into(), &dir("tiny-llama")).unwrap() };
    Model::Llama(lora::with_peft_adapter(base, &lora_dir(), adapters).unwrap())
}

fn texts_nll(model: &Model<B>, encoded: &serde_json::Value) -> Vec<f32> {
    let mut all = Vec::new();
    for x in encoded.as_array().unwrap().iter().map(ids) {
        let tokens = |range: std::ops::Range<usize>| {
            let part: Vec<i32> = x[range.clone()].iter().map(|&t| t as i32).collect();
            Tensor::<B, 2, Int>::from_data(TensorData::new(part, [1, range.len()]), &Default::default())
        };
        let nll: Vec<f32> = model.token_nll(tokens(0..x.len() - 1), tokens(1..x.len())).into_data().to_vec().unwrap();
        all.extend(nll);
    }
    all
}

/// PEFT's adapter on a Llama: per-token NLL within 1e-4 of PEFT's, every lora_A and lora_B
/// gradient within 1e-5 of its tensor's largest (the base frozen: no gradient), merged weights
/// computing the same, and pipe's own adapter folder reading back to the same model.
#[test]
fn peft_adapters_on_a_llama_match_peft() {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lora_dir().join("reference.json")).unwrap()).unwrap();
    let model = llama_with_peft_adapter::<B>();
    let got = texts_nll(&model, &r["encoded"]);
    let want: Vec<f64> = r["nll"].as_array().unwrap().iter().flat_map(floats).collect();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_close(&format!("adapted token {i} NLL"), *g as f64, *w, 1e-4);
    }

    let trained = llama_with_peft_adapter::<AD>();
    let sequences: Vec<Sequence> =
        r["encoded"].as_array().unwrap().iter().map(|e| Sequence::all_trained(ids(e))).collect();
    let refs: Vec<&Sequence> = sequences.iter().collect();
    let batch = Batch::<AD>::new(&refs, eos("tiny-llama"), &Default::default());
    let loss =
        trained.loss_sum(batch.inputs, batch.targets, batch.scored, batch.packing).div_scalar(batch.loss_tokens as f64);
    let grads = named_gradients(&trained, loss);
    let bytes = std::fs::read(lora_dir().join("grads.safetensors")).unwrap();
    let reference = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(grads.len(), reference.len(), "gradients for the adapters only");
    for (name, dims, values) in grads {
        let (module, which) = name.rsplit_once(".lora.").unwrap();
        let peft = format!("base_model.model.{module}.lora_{}.weight", which.to_uppercase());
        let want = reference.tensor(&peft).unwrap_or_else(|_| panic!("no reference for {peft}"));
        assert_eq!(want.shape(), [dims[1], dims[0]], "{peft}");
        let want: Vec<f32> =
            want.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let [rows, cols] = [dims[0], dims[1]];
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let diff =
            (0..rows * cols).map(|i| (values[(i % rows) * cols + i / rows] - want[i]).abs() as f64).fold(0.0, f64::max);
        assert!(diff <= 1e-5 * scale + 1e-8, "{peft}: off by {diff:e}, largest gradient {scale:e}");
    }

    let Model::Llama(adapted) = llama_with_peft_adapter::<B>() else { unreachable!() };
    let merged = Model::Llama(lora::merged(adapted));
    assert!(merged.adapters().is_none());
    for (m, a) in texts_nll(&merged, &r["encoded"]).iter().zip(&got) {
        assert!((m - a).abs() < 1e-5, "merged {m}, adapted {a}");
    }

    let out = tempfile::tempdir().unwrap();
    model.save(out.path(), None).unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("adapter/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(written["fan_in_fan_out"], false, "nn.Linear weights are [out, in]");
    let again = <Model<B> as CausalLm<B>>::load(out.path(), None, &Default::default()).unwrap();
    assert_eq!(texts_nll(&again, &r["encoded"]), got, "read back bit for bit");
}

/// The projection names a Llama has, and GPT-2's refused on it naming the family's own.
#[test]
fn lora_targets_are_the_familys_own() {
    let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(Target::parse_list(&names(&["all-linear"]), "llama").unwrap().len(), 7);
    assert_eq!(Target::parse_list(&names(&["attention"]), "qwen2").unwrap().len(), 4);
    assert_eq!(Target::parse_list(&names(&["attention"]), "gpt2").unwrap().len(), 2);
    let error = Target::parse_list(&names(&["c_attn"]), "llama").unwrap_err();
    assert!(error.contains("`c_attn` is not a projection of a llama model") && error.contains("q_proj"), "{error}");
    let error = Target::parse_list(&names(&["q_proj"]), "gpt2").unwrap_err();
    assert!(error.contains("c_attn"), "{error}");
}

/// LoRA on a Llama-family checkpoint through the whole tool: a run trains adapters on every
/// projection, `pipe export` writes them as a PEFT folder (PEFT's names, `fan_in_fan_out`
/// false) and, with --merge, as a plain checkpoint computing what base and adapters do.
#[test]
fn a_lora_run_on_a_llama_exports_peft_adapters_and_a_merged_model() {
    let folder = crate::common::folder_with("", 16);
    let spec = format!(
        "[run]\nname = \"lora\"\nruns_dir = \"runs\"\nstages = [\"train\"]\n[data]\npath = \"train.jsonl\"\n\
         [model]\npath = {:?}\n[optimizer]\nlr = 1e-2\n[train]\nepochs = 1\nbatch_size = 4\nmax_length = 48\n\
         [lora]\nrank = 4\ntargets = [\"all-linear\"]\n",
        dir("tiny-qwen2").display().to_string()
    );
    std::fs::write(folder.path().join("spec.toml"), spec).unwrap();
    let out = crate::common::pipe(folder.path(), &["run", "spec.toml"], &[]);
    assert!(out.status.success(), "{}", crate::common::stderr(&out));
    let run = crate::common::newest_run(folder.path(), "lora");
    for (args, name) in [(&[][..], "peft"), (&["--merge"][..], "merged")] {
        let target = folder.path().join(name);
        let mut command = vec!["export", run.to_str().unwrap(), "--out", target.to_str().unwrap()];
        command.extend(args);
        let out = crate::common::pipe(folder.path(), &command, &[]);
        assert!(out.status.success(), "{}", crate::common::stderr(&out));
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder.path().join("peft/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["fan_in_fan_out"], false);
    assert_eq!(config["target_modules"].as_array().unwrap().len(), 7);
    let bytes = std::fs::read(folder.path().join("peft/adapter_model.safetensors")).unwrap();
    let names: Vec<String> =
        safetensors::SafeTensors::deserialize(&bytes).unwrap().names().into_iter().map(str::to_string).collect();
    assert_eq!(names.len(), 2 * 7 * 2, "two tensors for each of seven projections in two layers");
    assert!(names.iter().all(|n| n.starts_with("base_model.model.model.layers.")), "{names:?}");
    // Unasked, adapters are stored as trained (f32), and a merged model as its bf16 base was.
    let dtypes = |file: &Path| -> std::collections::BTreeSet<String> {
        let bytes = std::fs::read(file).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        tensors.tensors().iter().map(|(_, view)| format!("{:?}", view.dtype())).collect()
    };
    assert_eq!(dtypes(&folder.path().join("peft/adapter_model.safetensors")), ["F32".to_string()].into());
    let merged_files: Vec<PathBuf> = std::fs::read_dir(folder.path().join("merged"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    assert!(!merged_files.is_empty());
    for file in &merged_files {
        assert_eq!(dtypes(file), ["BF16".to_string()].into(), "{}", file.display());
    }
    let merged_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder.path().join("merged/config.json")).unwrap()).unwrap();
    assert_eq!(merged_config["torch_dtype"], "bfloat16");

    let r = reference("tiny-qwen2");
    let adapted = <Model<B> as CausalLm<B>>::load(&run.join("final"), None, &Default::default()).unwrap();
    assert!(adapted.adapters().is_some());
    let merged = family::load::<B>(&folder.path().join("merged"), None, &Default::default()).unwrap();
    let (a, m) = (batch_loss(&adapted, &sequences(&r), 0), batch_loss(&merged, &sequences(&r), 0));
    assert!((a - m).abs() < 1e-5, "adapted {a}, merged {m}");
    let base = batch_loss(&load::<B>("tiny-qwen2"), &sequences(&r), 0);
    assert!((a - base).abs() > 1e-4, "the adapters trained: {a} against the base's {base}");
}

/// The loss over a large vocabulary is computed a block of rows at a time, the backward
/// recomputing each block's logits: the same NLL and the same gradients as all rows at once.
#[test]
fn the_loss_in_blocks_of_rows_equals_the_loss_at_once() {
    use pipe::model::fused::with_lm_head_block_values;
    for fixture in ["tiny-llama", "tiny-qwen2"] {
        let r = reference(fixture);
        let run = |values: usize| {
            with_lm_head_block_values(values, || {
                let model = load::<AD>(fixture);
                let sequences = sequences(&r);
                let refs: Vec<&Sequence> = sequences.iter().collect();
                let batch = Batch::<AD>::new(&refs, eos(fixture), &Default::default());
                let loss = model.loss_sum(batch.inputs, batch.targets, batch.scored, batch.packing);
                let value: f32 = loss.clone().into_scalar();
                (value, named_gradients(&model, loss))
            })
        };
        let vocab = family::read_config(&dir(fixture)).unwrap().vocab_size();
        let (whole, whole_grads) = run(usize::MAX);
        let (blocked, blocked_grads) = run(vocab * 5); // blocks of 5 rows
        assert!((whole - blocked).abs() <= 1e-5 * whole.abs(), "{fixture}: {whole} at once, {blocked} in blocks");
        assert_eq!(whole_grads.len(), blocked_grads.len());
        for ((name, _, a), (_, _, b)) in whole_grads.iter().zip(&blocked_grads) {
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(diff <= 1e-5 * scale + 1e-8, "{fixture} {name}: off by {diff:e} of {scale:e}");
        }
    }
}
