//! LoRA adapters against HF PEFT on the tiny fixture, and what a user relies on around them:
//! a fresh adapter leaves the model exactly as it was, only the adapters train, merging
//! computes what base and adapters compute, and an adapter never loads onto another base.
//! `tests/fixtures/tiny-lora` was written by PEFT 0.21 / PyTorch 2.15 on CPU in float32
//! (`scripts/make_lora_reference.py`). Tolerances: 1e-4 absolute on logits and NLL (as the
//! fidelity suite holds the base model), 1e-5 absolute plus 1e-4 relative on adapter gradients.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::common::{fixture_dir, ids, reference};
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::tensor::{Int, Tensor, TensorData};
use pipe::data::Sequence;
use pipe::model::lora::{self, Adapters, BaseModel, LoraConfig, Target};
use pipe::model::{hf, CausalLm, Gpt2};
use pipe::spec::{OptimizerKind, OptimizerSpec};
use pipe::train::Trainer;
use safetensors::SafeTensors;

type B = Flex;
type AD = Autodiff<Flex>;

fn lora_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-lora")
}

/// The PEFT reference tensors, by name, as ([shape], values).
fn peft_reference() -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(lora_fixture().join("reference.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

fn base<Bk: burn::tensor::backend::Backend>() -> Gpt2<Bk> {
    hf::load::<Bk>(&fixture_dir(), None, &Default::default()).unwrap().1
}

fn base_ref() -> BaseModel {
    BaseModel::of("tiny-gpt2".into(), &fixture_dir()).unwrap()
}

/// The fixture base with PEFT's adapter.
fn with_peft<Bk: burn::tensor::backend::Backend>() -> Gpt2<Bk> {
    let (config, _) = lora::read_peft_config(&lora_fixture(), "gpt2").unwrap();
    lora::with_peft_adapter(base::<Bk>(), &lora_fixture(), Adapters { config, base: base_ref() }).unwrap()
}

fn tokens<Bk: burn::tensor::backend::Backend>(ids: &[u32]) -> Tensor<Bk, 2, Int> {
    let data = TensorData::new(ids.iter().map(|&t| t as i32).collect(), [1, ids.len()]);
    Tensor::from_data(data, &Default::default())
}

fn logits(model: &Gpt2<B>, ids: &[u32]) -> Vec<f32> {
    model.logits(tokens(ids), None).into_data().to_vec().unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], abs: f32, rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= abs + rel * w.abs(), "{what}[{i}]: got {g}, PEFT {w}");
    }
}

#[test]
fn adapter_logits_and_nll_match_peft() {
    let reference = peft_reference();
    let text = ids(&reference_text());
    let model = with_peft::<B>();
    let vocab = model.config.vocab_size;
    let all = logits(&model, &text);
    let (shape, want) = &reference["logits"];
    let got: Vec<f32> = all.chunks(vocab).flat_map(|row| row[..shape[1]].to_vec()).collect();
    assert_close("logits", &got, want, 1e-4, 0.0);
    let n = text.len() - 1;
    let nll: Vec<f32> = model.token_nll(tokens(&text[..n]), tokens(&text[1..])).into_data().to_vec().unwrap();
    assert_close("per-token NLL", &nll, &reference["nll"].1, 1e-4, 0.0);
    // The adapter changes the model: the same text under the base alone differs.
    let plain = logits(&base::<B>(), &text);
    assert!(plain.iter().zip(&all).any(|(a, b)| (a - b).abs() > 1e-2), "the PEFT adapter has an effect");
}

/// Decoding with bf16 weights folds the adapters in first: the NLL follows PEFT's within bf16
/// resolution (0.01 absolute, as for the base model in tests/integration/bf16_decode.rs), not the base's.
#[test]
fn bf16_decoding_includes_the_adapters() {
    use pipe::generate::Decode;
    let reference = peft_reference();
    let text = ids(&reference_text());
    let adapted = pipe::model::Bf16Decoder::of_gpt2(&with_peft::<B>()).token_nll(&text);
    assert_close("bf16 per-token NLL", &adapted, &reference["nll"].1, 1e-2, 0.0);
    let plain = pipe::model::Bf16Decoder::of_gpt2(&base::<B>()).token_nll(&text);
    assert!(plain.iter().zip(&adapted).any(|(a, b)| (a - b).abs() > 0.05), "the adapters change the bf16 NLL");
}

fn reference_text() -> serde_json::Value {
    reference()["encoded"][0].clone()
}

#[test]
fn adapter_gradients_at_step_0_match_peft() {
    let reference = peft_reference();
    let text = ids(&reference_text());
    let model = with_peft::<AD>();
    let n = text.len() - 1;
    let loss = model.token_nll(tokens(&text[..n]), tokens(&text[1..])).mean();
    let grads = loss.backward();
    let mut compared = 0;
    for (layer, block) in model.h.iter().enumerate() {
        let projections = [
            ("attn.c_attn", &block.attn.c_attn),
            ("attn.c_proj", &block.attn.c_proj),
            ("mlp.c_fc", &block.mlp.c_fc),
            ("mlp.c_proj", &block.mlp.c_proj),
        ];
        for (path, projection) in projections {
            let adapter = projection.lora.as_ref().expect("every projection is targeted");
            let name = format!("grad.base_model.model.transformer.h.{layer}.{path}");
            // pipe keeps A as [in, rank] and B as [rank, out]: PEFT's transposes.
            for (part, param) in [("lora_A", &adapter.a), ("lora_B", &adapter.b)] {
                let grad = param.grad(&grads).expect("the adapters have gradients").transpose();
                let got: Vec<f32> = grad.into_data().to_vec().unwrap();
                let (_, want) = &reference[&format!("{name}.{part}.weight")];
                assert_close(&format!("{name}.{part}"), &got, want, 1e-5, 1e-4);
                compared += 1;
            }
            assert!(projection.weight.grad(&grads).is_none(), "the frozen base weight has no gradient");
            assert!(projection.bias.grad(&grads).is_none(), "the frozen base bias has no gradient");
        }
    }
    assert_eq!(compared, 16);
    assert!(model.wte.weight.grad(&grads).is_none() && model.h[0].ln_1.weight.grad(&grads).is_none());
}

fn fresh_config(targets: &[&str]) -> LoraConfig {
    let targets = Target::parse_list(&targets.iter().map(|t| t.to_string()).collect::<Vec<_>>(), "gpt2").unwrap();
    LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, targets, rslora: false }
}

#[test]
fn fresh_adapters_leave_the_model_exactly_as_it_was() {
    let text = ids(&reference_text());
    let plain = logits(&base::<B>(), &text);
    for targets in [&["c_attn", "attn.c_proj"][..], &["all-linear"][..]] {
        let adapters = Adapters { config: fresh_config(targets), base: base_ref() };
        let model = lora::attach(base::<B>(), adapters, &Default::default()).unwrap();
        assert_eq!(logits(&model, &text), plain, "{targets:?}: step 0 is the base model, bit for bit");
    }
}

#[test]
fn merging_computes_what_base_and_adapters_compute() {
    let text = ids(&reference_text());
    let model = with_peft::<B>();
    let with_adapters = logits(&model, &text);
    let merged = lora::merged(model);
    assert!(merged.adapters.is_none() && merged.h.iter().all(|b| b.attn.c_attn.lora.is_none()));
    assert_close("merged logits", &logits(&merged, &text), &with_adapters, 1e-5, 1e-5);
}

#[test]
fn only_the_adapters_train() {
    let device = Default::default();
    let adapters = Adapters { config: fresh_config(&["c_attn", "c_fc"]), base: base_ref() };
    let model = lora::attach(base::<AD>(), adapters, &device).unwrap();
    assert_eq!(model.num_params(), 2 * (32 * 4 + 4 * 96 + 32 * 4 + 4 * 128), "trainable parameters: the adapters'");
    let text = ids(&reference_text());
    let examples = [Sequence::all_trained(text)];
    let batch: Vec<&Sequence> = examples.iter().collect();
    let opt = OptimizerSpec { name: OptimizerKind::Adamw, lr: 1e-2, weight_decay: 0.1, ..Default::default() };
    let mut trainer = Trainer::<AD, Gpt2<AD>>::new(&opt, 50256, &device);
    let before = model.valid();
    let (mut model, first) = trainer.step(model, std::slice::from_ref(&batch), opt.lr).unwrap();
    for _ in 0..2 {
        (model, _) = trainer.step(model, std::slice::from_ref(&batch), opt.lr).unwrap();
    }
    let after = model.valid();
    let values = |t: Tensor<B, 2>| t.into_data().to_vec::<f32>().unwrap();
    for (old, new) in before.h.iter().zip(&after.h) {
        assert_eq!(values(old.attn.c_attn.weight.val()), values(new.attn.c_attn.weight.val()), "base weight frozen");
        assert_eq!(values(old.mlp.c_proj.weight.val()), values(new.mlp.c_proj.weight.val()), "base weight frozen");
        assert_eq!(values(old.ln_1.weight.val().unsqueeze()), values(new.ln_1.weight.val().unsqueeze()));
        let (a, b) = (old.attn.c_attn.lora.as_ref().unwrap(), new.attn.c_attn.lora.as_ref().unwrap());
        assert_ne!(values(a.b.val()), values(b.b.val()), "B trains away from zero");
        assert_ne!(values(a.a.val()), values(b.a.val()), "A trains once B is not zero");
    }
    assert_eq!(values(before.wte.weight.val()), values(after.wte.weight.val()), "embedding frozen");
    let loss = first.loss;
    let (_, later) = trainer.step(model, std::slice::from_ref(&batch), opt.lr).unwrap();
    assert!(later.loss < loss, "the adapters learn: {} then {}", loss, later.loss);
}

#[test]
fn an_adapter_folder_reloads_exactly_and_refuses_a_changed_base() {
    let dir = tempfile::tempdir().unwrap();
    let base_dir = dir.path().join("base");
    std::fs::create_dir(&base_dir).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture_dir().join(file), base_dir.join(file)).unwrap();
    }
    let (config, _) = lora::read_peft_config(&lora_fixture(), "gpt2").unwrap();
    let copied = BaseModel::of("base".into(), &base_dir).unwrap();
    let model = lora::with_peft_adapter(base::<B>(), &lora_fixture(), Adapters { config, base: copied }).unwrap();
    let saved = dir.path().join("saved");
    model.save(&saved, None).unwrap();
    assert!(!saved.join("model.safetensors").exists(), "no copy of the base's weights");
    for file in ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "base.json", "config.json"] {
        assert!(saved.join(file).is_file(), "{file}");
    }
    let text = ids(&reference_text());
    let reloaded = Gpt2::<B>::load(&saved, None, &Default::default()).unwrap();
    assert_eq!(logits(&reloaded, &text), logits(&model, &text), "reloaded adapters compute the same logits");

    // The base's weights change under the adapters: refused, naming base.json and the base.
    let mut weights = std::fs::read(base_dir.join("model.safetensors")).unwrap();
    let last = weights.len() - 1;
    weights[last] ^= 1;
    std::fs::write(base_dir.join("model.safetensors"), weights).unwrap();
    let error = format!("{:#}", Gpt2::<B>::load(&saved, None, &Default::default()).unwrap_err());
    assert!(error.contains("base.json") && error.contains("has changed"), "{error}");
    assert!(pipe::error::is_bad_input(&Gpt2::<B>::load(&saved, None, &Default::default()).unwrap_err()));
}

#[test]
fn peft_settings_pipe_does_not_compute_are_refused_naming_the_key() {
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lora_fixture().join("adapter_config.json")).unwrap()).unwrap();
    let cases: [(&str, serde_json::Value); 7] = [
        ("use_dora", true.into()),
        ("r", 0.into()),
        ("target_modules", ".*attn.*".into()),
        ("target_modules", serde_json::json!(["c_attn", "lm_head"])),
        ("layer_replication", serde_json::json!([[0, 1]])),
        ("bias", "all".into()),
        ("peft_type", "IA3".into()),
    ];
    for (key, value) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut config = original.clone();
        config[key] = value.clone();
        std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
        let error = lora::read_peft_config(dir.path(), "gpt2").unwrap_err();
        let message = format!("{error:#}");
        assert!(message.contains(&format!("`{key}`")) && message.contains("adapter_config.json"), "{key}: {message}");
        assert!(pipe::error::is_bad_input(&error), "{key}: a bad-input error");
    }
    // An adapter for another architecture: its tensors do not fit, named.
    let (mut config, _) = lora::read_peft_config(&lora_fixture(), "gpt2").unwrap();
    config.targets = Target::parse_list(&["c_attn".to_string()], "gpt2").unwrap();
    let error = lora::with_peft_adapter(base::<B>(), &lora_fixture(), Adapters { config, base: base_ref() });
    let message = format!("{:#}", error.unwrap_err());
    assert!(message.contains("not adapters of the targeted projections") && message.contains("c_proj"), "{message}");
}

#[test]
fn adapters_are_written_in_peft_format() {
    // PEFT's adapter, read by pipe and written back: the same tensor names, shapes and values
    // as PEFT's own file, and the config keys PeftModel.from_pretrained reads.
    let model = with_peft::<B>();
    let dir = tempfile::tempdir().unwrap();
    lora::save_peft(&model, model.adapters.as_ref().unwrap(), dir.path()).unwrap();
    let read = |path: PathBuf| {
        let bytes = std::fs::read(path).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> =
            file.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec())).collect();
        tensors.sort();
        tensors
    };
    let (ours, peft) =
        (read(dir.path().join("adapter_model.safetensors")), read(lora_fixture().join("adapter_model.safetensors")));
    assert_eq!(ours.len(), peft.len());
    for (o, p) in ours.iter().zip(&peft) {
        assert_eq!((&o.0, &o.1), (&p.0, &p.1), "name and shape");
        assert!(o.2 == p.2, "{}: the same values", o.0);
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!((config["r"].as_u64(), config["lora_alpha"].as_f64()), (Some(4), Some(8.0)));
    assert_eq!(config["fan_in_fan_out"], true);
    assert_eq!(config["base_model_name_or_path"], "tiny-gpt2");
    let (reread, _) = lora::read_peft_config(dir.path(), "gpt2").unwrap();
    assert_eq!(&reread, &model.adapters.as_ref().unwrap().config);
}
