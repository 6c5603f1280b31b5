//! pipe's GPT-2 against HuggingFace transformers on the tiny fixture: the numbers in
//! reference.json were computed by transformers 5.24 / PyTorch 2.15 on CPU in float32.
//! Tolerances: 1e-4 absolute on NLL and losses, exact token ids, 1e-3 on optimizer-step losses.

use crate::common;
use crate::common::{batch_loss, fixture_dir, floats, ids, reference, sequences_of};
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::tensor::{Int, Tensor, TensorData};
use pipe::data::{Batch, Sequence, Tok};
use pipe::generate::{Generator, Sampling};
use pipe::model::gpt2::Precision;
use pipe::model::{hf, CausalLm, Gpt2};
use pipe::spec::{OptimizerKind, OptimizerSpec};
use pipe::train::Trainer;

type B = Flex;
type AD = Autodiff<Flex>;

fn model() -> Gpt2<B> {
    hf::load::<B>(&fixture_dir(), None, &Default::default()).unwrap().1
}

fn assert_close(what: &str, got: f64, want: f64, tol: f64) {
    assert!((got - want).abs() <= tol, "{what}: got {got}, transformers {want} (tolerance {tol})");
}

#[test]
fn tokenizer_matches_transformers_ids() {
    let r = reference();
    let tok = Tok::load(&fixture_dir().join("tokenizer.json")).unwrap();
    for (text, want) in r["texts"].as_array().unwrap().iter().zip(r["encoded"].as_array().unwrap()) {
        assert_eq!(tok.encode(text.as_str().unwrap()).unwrap(), ids(want), "{text}");
    }
    assert_eq!(tok.eos_id, 50256);
}

#[test]
fn per_token_nll_and_loss_match() {
    let r = reference();
    let model = model();
    let device = Default::default();
    for (i, encoded) in r["encoded"].as_array().unwrap().iter().enumerate() {
        let x = ids(encoded);
        let n = x.len() - 1;
        let inputs = Tensor::<B, 2, Int>::from_data(
            TensorData::new(x[..n].iter().map(|&t| t as i32).collect(), [1, n]),
            &device,
        );
        let targets = Tensor::<B, 2, Int>::from_data(
            TensorData::new(x[1..].iter().map(|&t| t as i32).collect(), [1, n]),
            &device,
        );
        let nll: Vec<f32> = model.token_nll(inputs, targets).into_data().to_vec().unwrap();
        let want = floats(&r["nll"][i]);
        assert_eq!(nll.len(), want.len());
        for (j, (g, w)) in nll.iter().zip(&want).enumerate() {
            assert_close(&format!("text {i} token {j} NLL"), *g as f64, *w, 1e-4);
        }
        let mean = nll.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        assert_close(&format!("text {i} loss"), mean, r["loss"][i].as_f64().unwrap(), 1e-4);
    }
}

#[test]
fn top5_next_tokens_match() {
    let r = reference();
    let model = model();
    let x = ids(&r["encoded"][0]);
    let tokens = Tensor::<B, 2, Int>::from_data(
        TensorData::new(x.iter().map(|&t| t as i32).collect(), [1, x.len()]),
        &Default::default(),
    );
    let logits = model.logits(tokens, None); // [1, seq, vocab]
    let (_, top) = logits.topk_with_indices(5, 2);
    let top: Vec<i64> = top.into_data().convert::<i64>().to_vec().unwrap();
    for (pos, want) in r["top5"].as_array().unwrap().iter().enumerate() {
        let want: Vec<i64> = ids(want).into_iter().map(i64::from).collect();
        assert_eq!(&top[pos * 5..pos * 5 + 5], &want[..], "position {pos}");
    }
}

#[test]
fn padded_batch_loss_matches() {
    let r = reference();
    assert_close("batch loss", batch_loss(&model(), &sequences_of(&r)), r["batch_loss"].as_f64().unwrap(), 1e-4);
}

#[test]
fn completion_only_loss_matches() {
    let r = reference();
    let tok = Tok::load(&fixture_dir().join("tokenizer.json")).unwrap();
    let mut sequences = Vec::new();
    for (i, pair) in r["pairs"].as_array().unwrap().iter().enumerate() {
        let (prompt, response) = (pair[0].as_str().unwrap(), pair[1].as_str().unwrap());
        let prompt_ids = tok.encode(prompt).unwrap();
        let mut all = prompt_ids.clone();
        all.extend(tok.encode(response).unwrap());
        // Tokenizing prompt and response apart gives transformers' ids for the joined text.
        assert_eq!(all, ids(&r["pair_encoded"][i]));
        assert_eq!(prompt_ids.len() as u64, r["pair_prompt_lens"][i].as_u64().unwrap());
        sequences.push(Sequence::with_prompt(all, prompt_ids.len()));
    }
    assert_close("masked loss", batch_loss(&model(), &sequences), r["masked_loss"].as_f64().unwrap(), 1e-4);
}

#[test]
fn greedy_continuation_is_identical() {
    let r = reference();
    let model = model();
    let g = &r["greedy"];
    let mut generator = Generator::new(&model, &Default::default(), 0);
    let new = generator.generate(
        &ids(&g["prompt_ids"]),
        g["max_new_tokens"].as_u64().unwrap() as usize,
        Sampling::GREEDY,
        &[],
        |_| true,
    );
    assert_eq!(new, ids(&g["new_ids"]));
}

#[test]
fn cached_decoding_matches_the_full_forward_across_cache_blocks() {
    common::cached_decoding_matches_the_full_forward::<B>();
}

fn optimizer_steps_match(name: OptimizerKind, weight_decay: f64, key: &str) {
    let r = reference();
    let want = &r["train"][key];
    let device = Default::default();
    let mut model = hf::load::<AD>(&fixture_dir(), None, &device).unwrap().1;
    let opt = OptimizerSpec { name, lr: 1e-3, betas: [0.9, 0.95], eps: 1e-8, weight_decay, ..Default::default() };
    let mut trainer = Trainer::<AD, Gpt2<AD>>::new(&opt, 50256, &device);
    let sequences = sequences_of(&r);
    let batch: Vec<&Sequence> = sequences.iter().collect();
    for (step, (loss, norm)) in
        floats(&want["losses_before_each_step"]).into_iter().zip(floats(&want["grad_norms"])).enumerate()
    {
        let stats;
        (model, stats) = trainer.step(model, std::slice::from_ref(&batch), 1e-3).unwrap();
        assert_close(&format!("{key} step {step} loss"), stats.loss, loss, 1e-3);
        assert_close(&format!("{key} step {step} grad norm"), stats.grad_norm, norm, 1e-3 * norm);
    }
    // And the weights after the last step give the next loss the same way.
    let _ = model.valid();
}

#[test]
fn adam_steps_match_pytorch() {
    optimizer_steps_match(OptimizerKind::Adam, 0.0, "adam_lr1e-3_b0.9_0.95");
}

#[test]
fn adamw_steps_match_pytorch() {
    optimizer_steps_match(OptimizerKind::Adamw, 0.1, "adamw_lr1e-3_b0.9_0.95_wd0.1");
}

#[test]
fn gelu_new_is_the_tanh_approximation() {
    let xs: Vec<f32> = (-800..=800).map(|i| i as f32 / 100.0).collect();
    let x = Tensor::<B, 2>::from_data(TensorData::new(xs.clone(), [1, xs.len()]), &Default::default());
    let ours: Vec<f32> = pipe::model::fused::gelu_new(x).into_data().to_vec().unwrap();
    for (x, y) in xs.iter().zip(ours) {
        let x = *x as f64;
        let want = 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
        assert!((y as f64 - want).abs() < 2e-6 * (1.0 + want.abs()), "gelu_new({x}) = {y}, tanh form {want}");
    }
}

/// The fixture's tensors re-saved under other names, as the original GPT-2 checkpoint names them.
fn resaved(rename: impl Fn(&str) -> Option<String>, extra: &[(&str, Vec<usize>)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture_dir().join("config.json"), dir.path().join("config.json")).unwrap();
    let bytes = std::fs::read(fixture_dir().join("model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .filter_map(|(name, view)| rename(&name).map(|n| (n, view.shape().to_vec(), view.data().to_vec())))
        .collect();
    for (name, shape) in extra {
        let data = vec![0u8; shape.iter().product::<usize>() * 4];
        tensors.push((name.to_string(), shape.clone(), data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, shape, data)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data).unwrap())
        })
        .collect();
    std::fs::write(dir.path().join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    dir
}

#[test]
fn unprefixed_names_and_attention_mask_buffers_load_to_the_same_model() {
    let r = reference();
    let bias: Vec<(String, Vec<usize>)> = (0..2).map(|i| (format!("h.{i}.attn.bias"), vec![1, 1, 64, 64])).collect();
    let bias: Vec<(&str, Vec<usize>)> = bias.iter().map(|(n, s)| (n.as_str(), s.clone())).collect();
    let dir = resaved(|name| Some(name.trim_start_matches("transformer.").to_string()), &bias);
    let model = hf::load::<B>(dir.path(), None, &Default::default()).unwrap().1;
    assert_close("batch loss", batch_loss(&model, &sequences_of(&r)), r["batch_loss"].as_f64().unwrap(), 1e-4);
}

#[test]
fn missing_and_unexpected_tensors_are_named() {
    let dir = resaved(|name| (name != "transformer.h.1.mlp.c_fc.bias").then(|| name.to_string()), &[]);
    let error = hf::load::<B>(dir.path(), None, &Default::default()).err().unwrap();
    assert!(format!("{error}").contains("`h.1.mlp.c_fc.bias` is missing"), "{error}");
    let dir = resaved(|name| Some(name.to_string()), &[("transformer.h.2.attn.c_attn.weight", vec![32, 96])]);
    let error = hf::load::<B>(dir.path(), None, &Default::default()).err().unwrap();
    assert!(
        format!("{error}").contains("unexpected tensors")
            && format!("{error}").contains("`transformer.h.2.attn.c_attn.weight`"),
        "{error}"
    );
}

/// bf16 mixed precision: the linear layers multiply in bf16, so the loss moves off the f32
/// reference by about bf16's resolution (8 mantissa bits) but no more.
#[test]
fn bf16_loss_is_within_bf16_resolution_of_transformers() {
    let r = reference();
    let want = r["batch_loss"].as_f64().unwrap();
    let got = batch_loss(&Gpt2 { precision: Precision::Bf16, ..model() }, &sequences_of(&r));
    let f32_loss = batch_loss(&model(), &sequences_of(&r));
    assert!((got - want).abs() < 0.01 * want, "bf16 batch loss {got}, transformers (f32) {want}");
    assert!((got - f32_loss).abs() > 1e-4, "bf16 loss {got} equals f32's {f32_loss}: no product ran in bf16");
}

/// With bf16 products, the master weights stay f32, receive f32 gradients and train: AdamW
/// steps on the reference batch lower the loss as the f32 run does, within bf16 resolution.
#[test]
fn bf16_training_keeps_f32_master_weights_and_follows_f32() {
    let r = reference();
    let device = Default::default();
    let opt =
        OptimizerSpec { name: OptimizerKind::Adamw, lr: 1e-3, betas: [0.9, 0.95], eps: 1e-8, ..Default::default() };
    let sequences = sequences_of(&r);
    let batch: Vec<&Sequence> = sequences.iter().collect();
    let losses = |precision: Precision| {
        let mut model = Gpt2 { precision, ..hf::load::<AD>(&fixture_dir(), None, &device).unwrap().1 };
        let mut trainer = Trainer::<AD, Gpt2<AD>>::new(&opt, 50256, &device);
        let mut losses = Vec::new();
        for _ in 0..5 {
            let stats;
            (model, stats) = trainer.step(model, std::slice::from_ref(&batch), 1e-3).unwrap();
            losses.push(stats.loss);
        }
        let weight = model.h[0].mlp.c_fc.weight.val();
        assert_eq!(weight.dtype(), burn::tensor::DType::F32, "{precision:?} master weights");
        losses
    };
    let (f32_losses, bf16_losses) = (losses(Precision::F32), losses(Precision::Bf16));
    assert!(bf16_losses[4] < bf16_losses[0] - 0.1, "bf16 did not train: {bf16_losses:?}");
    for (step, (a, b)) in f32_losses.iter().zip(&bf16_losses).enumerate() {
        assert!((a - b).abs() < 0.01 * a, "step {step}: f32 loss {a}, bf16 {b}");
    }
}

/// Every parameter's gradient at step 0, by module path, on the reference batch.
fn gradients_by_name(model: &Gpt2<AD>) -> Vec<(String, Vec<f32>)> {
    let sequences = sequences_of(&reference());
    let refs: Vec<&Sequence> = sequences.iter().collect();
    let batch = Batch::<AD>::new(&refs, 50256, &Default::default());
    let loss =
        model.loss_sum(batch.inputs, batch.targets, batch.scored, batch.packing).div_scalar(batch.loss_tokens as f64);
    common::gradients_by_name(model, loss).into_iter().map(|(name, _, values)| (name, values)).collect()
}

/// llm.c's parity check: not only the global norm but every parameter's gradient equals
/// transformers', tensor by tensor (grads.safetensors, from scripts/make_training_reference.py).
/// The tied LM head's gradient arrives in `wte.weight`, as in transformers.
#[test]
fn every_parameter_gradient_matches_transformers() {
    let model = hf::load::<AD>(&fixture_dir(), None, &Default::default()).unwrap().1;
    let bytes = std::fs::read(fixture_dir().join("grads.safetensors")).unwrap();
    let reference = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ours = gradients_by_name(&model);
    assert_eq!(ours.len(), reference.len(), "one gradient per parameter");
    let mut worst = (String::new(), 0.0f64);
    for (name, got) in ours {
        let want =
            reference.tensor(&format!("transformer.{name}")).unwrap_or_else(|_| panic!("no reference for {name}"));
        let want: Vec<f32> =
            want.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        assert_eq!(got.len(), want.len(), "{name}");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
        // Relative to the tensor's largest gradient: float32 sums in another order.
        assert!(diff <= 1e-5 * scale + 1e-7, "{name}: off by {diff:e}, largest gradient {scale:e}");
        if diff / scale > worst.1 {
            worst = (name, diff / scale);
        }
    }
    eprintln!("largest relative gradient difference: {} {:e}", worst.0, worst.1);
}

/// Eight AdamW steps with linear warmup, cosine decay to a floor and global-norm clipping that
/// bites in the first steps, against PyTorch running the same schedule and
/// `clip_grad_norm_` (training_reference.json).
#[test]
fn warmup_cosine_and_clipping_follow_pytorch() {
    use pipe::spec::Schedule;
    use pipe::train::LrSchedule;
    let text = std::fs::read_to_string(fixture_dir().join("training_reference.json")).unwrap();
    let want: serde_json::Value = serde_json::from_str(&text).unwrap();
    let device = Default::default();
    let opt = OptimizerSpec {
        name: OptimizerKind::Adamw,
        lr: 1e-3,
        betas: [0.9, 0.95],
        eps: 1e-8,
        weight_decay: 0.1,
        grad_clip: 2.5,
        schedule: Schedule::Cosine,
        warmup_steps: 2,
        min_lr_ratio: 0.1,
    };
    let steps = want["steps"].as_u64().unwrap() as usize;
    let schedule = LrSchedule::new(&opt, steps);
    let mut model = hf::load::<AD>(&fixture_dir(), None, &device).unwrap().1;
    let mut trainer = Trainer::<AD, Gpt2<AD>>::new(&opt, 50256, &device);
    let sequences = sequences_of(&reference());
    let batch: Vec<&Sequence> = sequences.iter().collect();
    let (losses, norms, lrs) =
        (floats(&want["losses_before_each_step"]), floats(&want["grad_norms_before_clipping"]), floats(&want["lrs"]));
    assert!(norms[0] > 2.5 && norms[steps - 1] < 2.5, "the reference clips some steps and not others");
    for step in 0..steps {
        let lr = schedule.at(step);
        assert!((lr - lrs[step]).abs() < 1e-12, "step {step}: lr {lr}, reference {}", lrs[step]);
        let stats;
        (model, stats) = trainer.step(model, std::slice::from_ref(&batch), lr).unwrap();
        assert_close(&format!("step {step} loss"), stats.loss, losses[step], 1e-3);
        assert_close(&format!("step {step} grad norm"), stats.grad_norm, norms[step], 1e-3 * norms[step]);
    }
}
