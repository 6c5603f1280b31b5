//! The pieces of a training step and of sampling, each against its definition: the learning-rate
//! schedule, global-norm clipping, and the distribution top-k/top-p sampling draws from.

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor, TensorData};
use pipe::generate::{argmax, distribution, sample, Sampling};
use pipe::model::{CausalLm, Gpt2Config};
use pipe::spec::{OptimizerSpec, Schedule};
use pipe::train::{clip_global_norm, LrSchedule};
use rand::rngs::StdRng;
use rand::SeedableRng;

type AD = Autodiff<Flex>;

fn schedule(schedule: Schedule, warmup_steps: usize, min_lr_ratio: f64, total: usize) -> LrSchedule {
    let opt = OptimizerSpec { lr: 1e-3, schedule, warmup_steps, min_lr_ratio, ..Default::default() };
    LrSchedule::new(&opt, total)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1e-3)
}

#[test]
fn warmup_rises_linearly_to_the_peak_and_never_starts_at_zero() {
    let s = schedule(Schedule::Constant, 4, 0.0, 100);
    let lrs: Vec<f64> = (0..6).map(|step| s.at(step)).collect();
    let want = [0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 1e-3, 1e-3];
    for (step, (got, want)) in lrs.iter().zip(want).enumerate() {
        assert!(close(*got, want), "step {step}: lr {got}, want {want}");
    }
    let no_warmup = schedule(Schedule::Constant, 0, 0.0, 10);
    assert!((0..10).all(|step| no_warmup.at(step) == 1e-3));
}

#[test]
fn cosine_decays_from_the_peak_to_the_floor_at_the_end_of_the_run() {
    let (warmup, total, ratio) = (10, 110, 0.1);
    let s = schedule(Schedule::Cosine, warmup, ratio, total);
    assert!(close(s.at(warmup), 1e-3), "the peak right after warmup: {}", s.at(warmup));
    assert!(close(s.at(warmup + 50), 0.55e-3), "half way, half way down: {}", s.at(warmup + 50));
    assert!(close(s.at(total), 1e-4), "the floor after the last step: {}", s.at(total));
    assert!(close(s.at(total + 7), 1e-4), "and it stays there: {}", s.at(total + 7));
    let last = s.at(total - 1);
    let want = 1e-4 + 0.9e-3 * 0.5 * (1.0 + (std::f64::consts::PI * 99.0 / 100.0).cos());
    assert!(close(last, want), "the last step: {last}, want {want}");
    let lrs: Vec<f64> = (warmup..=total).map(|step| s.at(step)).collect();
    assert!(lrs.windows(2).all(|w| w[1] <= w[0]), "monotone decay");
    let to_zero = schedule(Schedule::Cosine, 0, 0.0, 8);
    assert!(close(to_zero.at(0), 1e-3) && to_zero.at(8) == 0.0);
}

/// Every gradient of `model` in `grads`, flattened.
fn grad_values(model: &impl Module<AD>, grads: &GradientsParams) -> Vec<Vec<f32>> {
    struct Collect<'a>(&'a GradientsParams, Vec<Vec<f32>>);
    impl ModuleVisitor<AD> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
            if let Some(grad) = self.0.get::<Flex, D>(param.id) {
                self.1.push(grad.into_data().to_vec().unwrap());
            }
        }
    }
    let mut collect = Collect(grads, Vec::new());
    model.visit(&mut collect);
    collect.1
}

fn norm(values: &[Vec<f32>]) -> f64 {
    values.iter().flatten().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt()
}

/// The loss over the trained positions runs the LM head there alone; it must be the loss (and
/// give the gradients) of every position's NLL with the rest weighted 0, and a batch with
/// nothing trained must still give every parameter a (zero) gradient.
#[test]
fn the_loss_at_trained_positions_alone_equals_the_masked_loss_of_every_position() {
    let device = Default::default();
    let model = Gpt2Config::new(50, 16, 16, 2, 2).init::<AD>(&device);
    let tokens = |ids: Vec<i32>| Tensor::<AD, 2, Int>::from_data(TensorData::new(ids, [2, 4]), &device);
    let (inputs, targets) = (vec![1, 2, 3, 4, 5, 6, 7, 8], vec![2, 3, 4, 5, 6, 7, 8, 9]);
    // Row 0 trains on its last two targets (a prompt before them), row 1 on its second only.
    let trained = [2, 3, 5];
    let mask: Vec<f32> = (0..8).map(|i| f32::from(u8::from(trained.contains(&i)))).collect();
    let scored = Tensor::from_data(TensorData::new(trained.to_vec(), [3]), &device);
    let alone = model.loss_sum(tokens(inputs.clone()), tokens(targets.clone()), scored, None);
    let masked = model.token_nll(tokens(inputs.clone()), tokens(targets.clone()))
        * Tensor::from_data(TensorData::new(mask, [2, 4]), &device);
    let masked = masked.sum();
    let (a, m): (f32, f32) = (alone.clone().into_scalar(), masked.clone().into_scalar());
    assert!((a - m).abs() <= 1e-6 * m.abs(), "loss {a} against the masked {m}");
    let (alone, masked) = (
        grad_values(&model, &GradientsParams::from_grads(alone.backward(), &model)),
        grad_values(&model, &GradientsParams::from_grads(masked.backward(), &model)),
    );
    assert_eq!(alone.len(), masked.len(), "the same parameters have gradients");
    for (got, want) in alone.iter().zip(&masked) {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0);
        assert!(got.iter().zip(want).all(|(g, w)| (g - w).abs() <= 1e-5 * scale), "gradients differ");
    }

    let nothing = Tensor::<AD, 1, Int>::from_data(TensorData::new(Vec::<i32>::new(), [0]), &device);
    let empty = model.loss_sum(tokens(inputs), tokens(targets), nothing, None);
    assert_eq!(empty.clone().into_scalar(), 0.0);
    let grads = grad_values(&model, &GradientsParams::from_grads(empty.backward(), &model));
    assert_eq!(grads.len(), masked.len(), "every parameter still has a gradient");
    assert!(grads.iter().flatten().all(|&g| g == 0.0));
}

#[test]
fn clipping_scales_every_gradient_by_one_factor_to_the_global_norm() {
    let device = Default::default();
    let model = Gpt2Config::new(50, 16, 16, 2, 2).init::<AD>(&device);
    let tokens = |ids: Vec<i32>| Tensor::<AD, 2, Int>::from_data(TensorData::new(ids, [2, 4]), &device);
    let fresh = || {
        let inputs = tokens(vec![1, 2, 3, 4, 5, 6, 7, 8]);
        let every = Tensor::arange(0..8, &device);
        let loss = model.loss_sum(inputs, tokens(vec![2, 3, 4, 5, 6, 7, 8, 9]), every, None);
        GradientsParams::from_grads(loss.backward(), &model)
    };
    let grads = fresh();
    let before = grad_values(&model, &grads);
    let want = norm(&before);

    let mut unclipped = fresh();
    assert!((clip_global_norm(&model, &mut unclipped, 0.0) - want).abs() < 1e-6 * want, "0 is off");
    assert_eq!(grad_values(&model, &unclipped), before, "0 leaves the gradients alone");
    let mut loose = fresh();
    clip_global_norm(&model, &mut loose, want * 2.0);
    assert_eq!(grad_values(&model, &loose), before, "a norm under the limit is left alone");

    let mut clipped = grads;
    let reported = clip_global_norm(&model, &mut clipped, want / 4.0);
    assert!((reported - want).abs() < 1e-6 * want, "reports the norm before clipping: {reported} vs {want}");
    let after = grad_values(&model, &clipped);
    let factor = (want / 4.0) / (want + 1e-6);
    assert!((norm(&after) - want / 4.0).abs() < 1e-5 * want, "clipped to the limit: {}", norm(&after));
    for (a, b) in after.iter().flatten().zip(before.iter().flatten()) {
        assert!((*a as f64 - *b as f64 * factor).abs() <= 1e-6 * (b.abs() as f64).max(1e-6), "{a} vs {b}·{factor}");
    }
}

fn softmax(logits: &[f64]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f64 = exps.iter().sum();
    exps.iter().map(|e| e / total).collect()
}

const LOGITS: [f32; 6] = [1.0, 3.0, 0.5, 2.0, 3.0, -1.0];

fn sampling(temperature: f64, top_k: usize, top_p: f64) -> Sampling {
    Sampling { temperature, top_k, top_p }
}

#[test]
fn top_k_keeps_the_k_most_likely_renormalised_ties_by_lower_id() {
    let d = distribution(&LOGITS, sampling(1.0, 3, 1.0));
    let ids: Vec<u32> = d.iter().map(|&(id, _)| id).collect();
    assert_eq!(ids, [1, 4, 3], "ids 1 and 4 tie at 3.0; then 3 at 2.0");
    let want = softmax(&[3.0, 3.0, 2.0]);
    for ((_, p), w) in d.iter().zip(&want) {
        assert!((p - w).abs() < 1e-12, "{p} vs {w}");
    }
    let all = distribution(&LOGITS, sampling(1.0, 0, 1.0));
    assert_eq!(all.len(), LOGITS.len(), "top_k = 0 keeps everything");
    assert!((all.iter().map(|&(_, p)| p).sum::<f64>() - 1.0).abs() < 1e-12);
}

#[test]
fn top_p_keeps_the_smallest_prefix_reaching_p_and_temperature_sharpens() {
    let full = softmax(&LOGITS.map(f64::from));
    // Sorted: ids 1, 4 (0.384 each), 3 (0.141), 0, 2, 5. Two tokens hold 0.768: enough for
    // p = 0.7, not for 0.8, which takes a third.
    let ids = |p: f64| distribution(&LOGITS, sampling(1.0, 0, p)).iter().map(|&(id, _)| id).collect::<Vec<_>>();
    assert_eq!(ids(0.7), [1, 4]);
    assert_eq!(ids(0.8), [1, 4, 3]);
    let d = distribution(&LOGITS, sampling(1.0, 0, 0.8));
    let kept: f64 = [1, 4, 3].iter().map(|&i| full[i]).sum();
    assert!((d[2].1 - full[3] / kept).abs() < 1e-12);
    let tiny = distribution(&LOGITS, sampling(1.0, 0, 1e-9));
    assert_eq!(tiny.len(), 1, "the most likely token is always kept");
    let cold = distribution(&LOGITS, sampling(0.5, 0, 1.0));
    let want = softmax(&LOGITS.map(|l| l as f64 / 0.5));
    assert!((cold[2].1 - want[3]).abs() < 1e-12, "temperature divides the logits");
}

#[test]
fn sampling_draws_from_that_distribution_reproducibly_and_greedy_is_argmax() {
    assert_eq!(argmax(&LOGITS), 1, "the first of tied maxima, as torch.argmax");
    let mut rng = StdRng::seed_from_u64(0);
    assert_eq!(sample(&LOGITS, Sampling::GREEDY, &mut rng), 1);
    let s = sampling(1.0, 3, 1.0);
    let draw = |seed: u64| {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..20_000).map(|_| sample(&LOGITS, s, &mut rng)).collect::<Vec<u32>>()
    };
    let draws = draw(7);
    assert_eq!(draws, draw(7), "the same seed draws the same tokens");
    for (id, p) in distribution(&LOGITS, s) {
        let share = draws.iter().filter(|&&d| d == id).count() as f64 / draws.len() as f64;
        assert!((share - p).abs() < 0.015, "token {id}: drawn {share}, probability {p}");
    }
    assert!(draws.iter().all(|d| [1, 4, 3].contains(d)), "nothing outside the top 3");
}
