//! `pipe bench`: the PyTorch reference's protocol (`torch_ref.py`) through pipe's own model,
//! optimizer and sampler — the code paths a pipeline uses, not a separate fast path. AdamW on
//! random token ids: training tokens/s over the median step after warm-up, then greedy
//! generation tokens/s with the KV cache, and peak RSS, as one JSON line (with the last step's
//! loss, so that two builds or settings can be seen to train alike).

use std::time::Instant;

use crate::model::TrainBackend;
use anyhow::Result;
use burn::module::AutodiffModule;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};

use crate::backend::BackendJob;
use crate::data::Sequence;
use crate::generate::{Decode, Generator, Sampling};
use crate::memory::{AttentionKeeps, Footprint, Room};
use crate::model::fused::{set_gpu_attention, GpuAttention};
use crate::model::gpt2::Precision;
use crate::model::lora::{self, Adapters, BaseModel, LoraConfig, Target};
use crate::model::{CausalLm, Gpt2Config, LlamaConfig, Model, ModelConfig};
use crate::spec::{BackendKind, LoraSpec, OptimizerKind, OptimizerSpec};
use crate::train::Trainer;

/// The model and run sizes, as `pipe bench` flags (torch_ref.py's, plus the precision).
#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct BenchShape {
    /// The model family (torch_ref.py's `--arch`): gpt2, or llama (RoPE, RMSNorm, SwiGLU,
    /// grouped-query attention, tied head, as the reference builds it).
    #[arg(long, alias = "arch", value_enum, default_value_t = BenchFamily::Gpt2)]
    pub family: BenchFamily,
    /// Llama: key/value heads (dividing --heads; default --heads).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// The MLP's width (default 4·embd for gpt2, 8/3·embd for llama, as the reference).
    #[arg(long)]
    pub inner: Option<usize>,
    /// Transformer blocks.
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// Attention heads per block.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Model width (divisible by --heads).
    #[arg(long, default_value_t = 256)]
    pub embd: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 8192)]
    pub vocab: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Sequences per training step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Timed training steps (the median is reported).
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// Untimed steps before the timed ones.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Tokens to generate greedily after training (after a 16-token prompt).
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// f32, or bf16: training's linear layers multiply in bf16 with f32 master weights (as
    /// run.precision); on the CPU, generation decodes with bf16 weights (as generate --precision).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// Train LoRA adapters of this rank (alpha = 2·rank) on the attention projections of a
    /// frozen model instead of all its weights.
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// On a GPU backend: attention by pipe's flash-style kernels, or by the composite version
    /// of burn's ops (to measure one against the other).
    #[arg(long, value_enum, default_value_t = GpuAttention::Kernels)]
    pub gpu_attention: GpuAttention,
}

/// `pipe bench --family`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BenchFamily {
    Gpt2,
    Llama,
}

impl BenchShape {
    /// The benchmarked architecture, as the reference script builds it.
    pub fn config(&self) -> ModelConfig {
        match self.family {
            BenchFamily::Gpt2 => {
                ModelConfig::Gpt2(Gpt2Config::new(self.vocab, self.seq.max(1024), self.embd, self.layers, self.heads))
            }
            BenchFamily::Llama => {
                let inner = self.inner.unwrap_or(8 * self.embd / 3);
                let kv_heads = self.kv_heads.unwrap_or(self.heads);
                let config = LlamaConfig::new(
                    self.vocab,
                    self.seq.max(2048),
                    self.embd,
                    inner,
                    self.layers,
                    self.heads,
                    kv_heads,
                );
                ModelConfig::Llama(LlamaConfig { tie_word_embeddings: true, ..config })
            }
        }
    }

    /// Training FLOPs per token: 6·params for the matmuls forward and backward, plus attention's
    /// 12·layers·seq·width (the estimate torch_ref's figures are compared on). With LoRA the
    /// frozen weights need no gradient: 4·params, plus 6·(the adapters').
    pub fn train_flops_per_token(&self, params: usize, trainable: usize) -> f64 {
        let matmuls = match self.lora_rank {
            Some(_) => 4.0 * params as f64 + 6.0 * trainable as f64,
            None => 6.0 * params as f64,
        };
        let attention_width = match self.family {
            BenchFamily::Gpt2 => self.embd,
            BenchFamily::Llama => self.heads * (self.embd / self.heads),
        };
        matmuls + 12.0 * (self.layers * self.seq * attention_width) as f64
    }
}

/// The bench at a shape, on a backend's device (by index).
pub struct Bench(pub BenchShape, pub BackendKind, pub usize);

impl BackendJob for Bench {
    type Output = Value;

    fn run<B: TrainBackend>(self, device: B::Device, device_name: String) -> Result<Value> {
        let shape = self.0;
        set_gpu_attention(shape.gpu_attention);
        B::seed(&device, 0);
        let config = shape.config();
        if let Some(room) = Room::of(self.1, self.2) {
            let tokens = (shape.batch * shape.seq) as f64;
            let keeps = AttentionKeeps::of(self.1, &config);
            let adapters = shape.lora_rank.is_some();
            Footprint::training(&config, adapters, shape.precision, tokens, shape.seq as f64, keeps).check(
                &room,
                &format!("pipe bench --batch {} --seq {}", shape.batch, shape.seq),
                "lower --batch or --seq",
            )?;
        }
        let mut model = config.init::<B>(&device).with_precision(shape.precision);
        let params = model.num_params();
        if let Some(rank) = shape.lora_rank {
            let targets = LoraSpec::default().targets;
            let targets =
                Target::parse_list(&targets, config.family()).expect("the default targets are every family's");
            let config = LoraConfig { rank, alpha: 2.0 * rank as f64, dropout: 0.0, targets, rslora: false };
            // Never saved, so no base folder to refer to.
            let base =
                BaseModel { name: "random (pipe bench)".into(), path: Default::default(), sha256: String::new() };
            let adapters = Adapters { config, base };
            model = match model {
                Model::Gpt2(m) => Model::Gpt2(lora::attach(m, adapters, &device)?),
                Model::Llama(m) => Model::Llama(lora::attach(m, adapters, &device)?),
            };
        }
        let trainable = model.num_params();
        let opt = OptimizerSpec { name: OptimizerKind::Adamw, lr: 1e-4, weight_decay: 0.01, ..Default::default() };
        let mut trainer = Trainer::<B>::new(&opt, 0, &device);
        let mut rng = StdRng::seed_from_u64(0);
        let mut random_ids =
            |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..shape.vocab as u32)).collect() };

        let (mut times, mut last_loss) = (Vec::new(), f64::NAN);
        for step in 0..shape.warmup + shape.steps {
            // seq + 1 ids give seq input positions, each with a next-token target.
            let sequences: Vec<Sequence> =
                (0..shape.batch).map(|_| Sequence::all_trained(random_ids(shape.seq + 1))).collect();
            let batch: Vec<&Sequence> = sequences.iter().collect();
            let started = Instant::now();
            let stats;
            (model, stats) = trainer.step(model, std::slice::from_ref(&batch), opt.lr)?;
            B::sync(&device)?;
            let seconds = started.elapsed().as_secs_f64();
            tracing::debug!(step, loss = stats.loss, seconds, "bench step");
            last_loss = stats.loss;
            if step >= shape.warmup {
                times.push(seconds);
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let train_tps = (shape.batch * shape.seq) as f64 / median;

        let inference = model.valid();
        let prompt = random_ids(16);
        // On the CPU, bf16 generation is the family's bf16-weight decoder where it has one
        // (what `pipe generate --precision bf16` runs); elsewhere the model's own bf16 products.
        let decoder = match (shape.precision, self.1) {
            (Precision::Bf16, BackendKind::Cpu) => Some(inference.bf16_decoder()),
            _ => None,
        };
        let decoder_ran = decoder.is_some();
        let gen_tps = match decoder {
            Some(decoder) => generation_speed(Generator::with(decoder, 0), &prompt, shape.gen_tokens),
            None => generation_speed(Generator::new(&inference, &device, 0), &prompt, shape.gen_tokens),
        };

        let peak_rss = peak_rss_mib(); // before the yardsticks below allocate their own buffers
        let train_gflops = train_tps * shape.train_flops_per_token(params, trainable) / 1e9;
        // What generation reads per token: every weight but the unused position rows, at the
        // bytes the decoder holds them in.
        let unread_positions = match shape.family {
            BenchFamily::Gpt2 => shape.seq.max(1024) * shape.embd,
            BenchFamily::Llama => 0,
        };
        let weight_bytes = match (shape.precision, self.1) {
            (Precision::Bf16, BackendKind::Cpu) if decoder_ran => 2.0,
            _ => 4.0,
        } * params.saturating_sub(unread_positions) as f64;
        let machine = match self.1 {
            // The same machine's yardsticks, so that figures compare across CPUs. The GEMM rate
            // is the best of ten products, a ceiling that a shared host's slow moments do not
            // lower (which would flatter the fraction of it training reaches).
            BackendKind::Cpu => {
                let (gemm, memory) =
                    (crate::model::gemm_gflops(2048, GEMM_REPS, Precision::F32), memory_read_gb_per_s());
                // Training against the product of its own precision: bf16's is pipe's bf16
                // kernel (vdpbf16ps where the CPU has AVX512-BF16).
                let own = match shape.precision {
                    Precision::F32 => gemm,
                    Precision::Bf16 => crate::model::gemm_gflops(2048, GEMM_REPS, Precision::Bf16),
                };
                json!({
                    "gemm_f32_gflops": gemm.round(),
                    "gemm_bf16_gflops": (shape.precision == Precision::Bf16).then(|| own.round()),
                    "bf16_instructions": crate::model::bf16_native(),
                    "train_fraction_of_gemm": (train_gflops / own * 1000.0).round() / 1000.0,
                    "memory_read_gb_per_s": (memory * 10.0).round() / 10.0,
                    "gen_fraction_of_memory": (gen_tps * weight_bytes / 1e9 / memory * 1000.0).round() / 1000.0,
                })
            }
            _ => json!(null),
        };
        Ok(json!({
            "impl": format!("pipe {} burn 0.21 {}", env!("CARGO_PKG_VERSION"), device_name),
            "params": params,
            "trainable_params": trainable,
            "last_loss": last_loss,
            "train_tokens_per_s": (train_tps * 10.0).round() / 10.0,
            "gen_tokens_per_s": (gen_tps * 10.0).round() / 10.0,
            "peak_rss_mib": peak_rss,
            "train_tflops": (train_gflops / 1e3 * 1000.0).round() / 1000.0,
            "gen_weight_gb_per_s": (gen_tps * weight_bytes / 1e9 * 10.0).round() / 10.0,
            "machine": machine,
            "shape": shape,
        }))
    }
}

/// Greedy tokens per second after `prompt`, after a short warm-up.
fn generation_speed(mut generator: Generator<impl Decode>, prompt: &[u32], tokens: usize) -> f64 {
    generator.generate(prompt, 4, Sampling::GREEDY, &[], |_| true);
    let started = Instant::now();
    let new = generator.generate(prompt, tokens, Sampling::GREEDY, &[], |_| true);
    new.len() as f64 / started.elapsed().as_secs_f64()
}

/// How many 2048³ products the GEMM yardstick times (it keeps the fastest).
const GEMM_REPS: usize = 10;

/// How fast all threads together read memory: the best of three sums over 512 MiB, more than
/// any cache holds.
fn memory_read_gb_per_s() -> f64 {
    use rayon::prelude::*;
    let buffer = vec![1.0f32; 128 << 20];
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let started = Instant::now();
        let sum: f32 = buffer
            .par_chunks(1 << 16)
            .map(|chunk| {
                // Sixteen lanes, so that the loop vectorises.
                let mut lanes = [0.0f32; 16];
                chunk.chunks_exact(16).for_each(|c| lanes.iter_mut().zip(c).for_each(|(l, v)| *l += v));
                lanes.iter().sum::<f32>()
            })
            .sum();
        best = best.min(started.elapsed().as_secs_f64());
        std::hint::black_box(sum);
    }
    (buffer.len() * 4) as f64 / best / 1e9
}

/// The process's peak resident set size in MiB.
fn peak_rss_mib() -> u64 {
    #[cfg(unix)]
    {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is always valid.
        let usage = unsafe {
            libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
            usage.assume_init()
        };
        (usage.ru_maxrss as u64) / 1024
    }
    #[cfg(not(unix))]
    0
}
