//! The `pipe` command line: parses arguments, calls the library, maps errors to exit codes
//! (2 for bad input, 1 for a failed run). It lives in the library, not in the binaries, so that
//! `pipe` and the test build's `pipe-faults` share one compiled copy of it.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::data::PromptLayout;
use crate::data::Tok;
use crate::error::{bad_input, interrupted_by, is_bad_input};
use crate::generate::{Decode, Decoding, Generator, Sampling, WithDecoder};
use crate::model::fused::GpuAttention;
use crate::model::gpt2::Precision;
use crate::model::hf;
use crate::spec::{BackendKind, GenerateSpec};
use crate::{backend, chat, pipeline, runs, score, spec};

#[derive(Parser)]
#[command(
    name = "pipe",
    version,
    about = "Declarative fine-tuning pipelines (SFT, then DPO) for GPT-style models (GPT-2, Llama, Qwen2, Qwen3)",
    long_about = "pipe runs the fine-tuning pipeline a TOML spec describes — tokenizer, data, \
model, optimizer, then its stages: train (supervised fine-tuning), dpo (preference tuning), eval \
and generate — and writes everything a run produces into a new folder runs/<name>/<run-id>/.\n\nEvery spec field can be overridden: \
PIPE_SECTION__FIELD=value in the environment, then --set section.field=value on the command \
line (later wins). Set RUST_LOG=debug for per-step logs.",
    after_help = "Start with:  pipe run pipelines/sft.toml"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline: train (SFT, DPO), evaluate and sample as the spec says, into a new run folder.
    Run {
        /// The pipeline spec (TOML).
        spec: PathBuf,
        /// Override a field: --set optimizer.lr=3e-4 (repeatable; wins over PIPE_* variables).
        #[arg(long = "set", value_name = "FIELD=VALUE")]
        sets: Vec<String>,
        /// Continue this unfinished run of the spec instead of starting a new one.
        #[arg(long, value_name = "RUN_DIR")]
        resume: Option<PathBuf>,
        /// With --resume: continue even though a dataset, the tokenizer or the base model
        /// changed since the run started (otherwise refused).
        #[arg(long, requires = "resume")]
        allow_changed_inputs: bool,
    },
    /// Continue an interrupted or failed run from its latest checkpoint, in the same folder.
    Resume {
        /// The run folder (runs/<name>/<run-id>), `name` (its latest run) or `name@id`.
        run: PathBuf,
        #[command(flatten)]
        runs: RunsDirArg,
        /// Continue even though a dataset, the tokenizer or the base model changed since the
        /// run started (otherwise refused, naming what changed).
        #[arg(long)]
        allow_changed_inputs: bool,
    },
    /// Start the orchestrator the nodes of a multi-node run meet through (burn-collective's):
    /// each node's spec names it in `distributed.orchestrator` as host:port.
    Orchestrator {
        /// The port to listen on (1 to 65535; the nodes' specs name it).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        port: u16,
        /// The address to listen on: the loopback unless given (`0.0.0.0` is every interface).
        /// The collective is not authenticated: listen only where a private network is.
        #[arg(long, default_value = "127.0.0.1")]
        bind: std::net::IpAddr,
    },
    /// Validate a spec and print every resolved value with where it came from.
    Check {
        spec: PathBuf,
        #[arg(long = "set", value_name = "FIELD=VALUE")]
        sets: Vec<String>,
    },
    /// Show how a spec's data is rendered and tokenized: the first examples with the trained
    /// tokens marked [[...]], and counts; with a dpo stage, its first preference pairs too (each
    /// completion marked [[...]]).
    Data {
        spec: PathBuf,
        #[arg(long = "set", value_name = "FIELD=VALUE")]
        sets: Vec<String>,
        /// How many examples to show.
        #[arg(short, long, default_value_t = 3)]
        n: usize,
    },
    /// List the runs in a runs folder as a table.
    Runs {
        /// The runs folder.
        #[arg(default_value = "runs")]
        runs_dir: PathBuf,
        /// Only runs whose name contains this.
        #[arg(long)]
        name: Option<String>,
        /// Sort by: started, name, status, duration, steps, loss, val_loss.
        #[arg(long, default_value = "started")]
        sort: String,
    },
    /// Show one run's loss curves and metrics, or compare several: spec differences, final and
    /// best metrics, and loss curves (in the terminal; as an SVG with --out).
    Compare {
        /// Runs: folders, `name` (its latest run) or `name@id`; one or more.
        #[arg(required = true, num_args = 1..)]
        runs: Vec<String>,
        /// Where names are looked up.
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
        /// Also write loss.svg and comparison.json into this folder (nothing is written without it).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print the comparison as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Answer one prompt: laid out as the run's training data was (its prompt template or chat
    /// template), or exactly as given with --raw or for a HuggingFace directory.
    Generate {
        /// A run folder (its final model) or a HuggingFace model folder (GPT-2, Llama, Qwen2, Qwen3).
        model: PathBuf,
        #[command(flatten)]
        runs: RunsDirArg,
        #[arg(long)]
        prompt: String,
        /// Use the prompt exactly as given, not laid out as the run's data was.
        #[arg(long)]
        raw: bool,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[command(flatten)]
        on: BackendArgs,
        /// Print JSON with the token ids too.
        #[arg(long)]
        json: bool,
    },
    /// Per-token log-likelihood, loss and perplexity of texts, exactly as given (no BOS/EOS).
    Score {
        /// A run folder (its final model) or a HuggingFace model folder (GPT-2, Llama, Qwen2, Qwen3).
        model: PathBuf,
        #[command(flatten)]
        runs: RunsDirArg,
        /// A text to score (repeatable).
        #[arg(long, required_unless_present = "file")]
        text: Vec<String>,
        /// Texts from a file: one per line, or JSONL with a `text` field.
        #[arg(long)]
        file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// Instead of `final/`: `best` (the best model), `last` (the newest checkpoint), or a
        /// checkpoint folder inside the run (`checkpoints/step-000100`).
        #[arg(long)]
        checkpoint: Option<String>,
        /// `bf16`: score with the weights rounded to bf16 (activations and sums stay f32; on a
        /// GPU, the linear layers multiply in bf16).
        #[arg(long, value_enum, default_value_t = Precision::F32)]
        precision: Precision,
        #[command(flatten)]
        on: BackendArgs,
    },
    /// Talk to a model: each line is laid out with the run's prompt template, replies stream.
    /// The conversation is kept from line to line (its oldest turns dropped to fit the context);
    /// `/reset` clears it, `/exit` or Ctrl-D ends. Lines read from a pipe are echoed, so the
    /// transcript reads as the conversation.
    Chat {
        /// A run folder (its final model) or a HuggingFace model folder (GPT-2, Llama, Qwen2, Qwen3).
        model: PathBuf,
        #[command(flatten)]
        runs: RunsDirArg,
        /// The prompt template [default: the run's data.prompt_template, else "{prompt}\n"].
        #[arg(long)]
        template: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[command(flatten)]
        on: BackendArgs,
    },
    /// Measure training and generation speed (AdamW on random tokens, then greedy generation), as the
    /// PyTorch reference measures HF transformers (see docs/speed.md).
    Bench {
        #[command(flatten)]
        shape: crate::bench::BenchShape,
        #[command(flatten)]
        on: BackendArgs,
    },
    /// Write a run's model as a HuggingFace folder of its family that transformers loads; for a run
    /// with LoRA adapters, a PEFT adapter folder (`PeftModel.from_pretrained`), or with --merge a
    /// model folder with the adapters folded in. With `--format gguf`, one GGUF file for
    /// llama.cpp, ollama and LM Studio (adapters merged).
    Export {
        /// A run folder, `name` (its latest run) or `name@id`, or a HF model folder.
        run: PathBuf,
        #[command(flatten)]
        runs: RunsDirArg,
        /// `hf`: a HuggingFace folder; `gguf`: one GGUF file.
        #[arg(long, value_enum, default_value_t = ExportFormat::Hf)]
        format: ExportFormat,
        /// The new directory (must not exist or be empty); with `--format gguf`, the new file
        /// (default: `<run name>-<quant>.gguf`, or the model folder's name, here).
        #[arg(long)]
        out: Option<PathBuf>,
        /// `--format gguf`: how weights are stored: f32, f16, bf16 or q8_0 (8-bit blocks of 32).
        /// Norms and biases stay f32.
        /// Default: f16.
        #[arg(long, value_enum)]
        quant: Option<crate::export::gguf::Quant>,
        /// Instead of `final/`: `best` (the best model), `last` (the newest checkpoint),
        /// `step-N` (the checkpoint at step N), or a checkpoint folder inside the run
        /// (`checkpoints/step-000100`).
        #[arg(long)]
        checkpoint: Option<String>,
        /// Fold the run's LoRA adapters into the base weights: a full model folder.
        #[arg(long)]
        merge: bool,
        /// Store the weights as f32, bf16 or f16. Default: a model's, the dtype of the
        /// checkpoint the run started from (f32 for a model pipe made); adapters', f32.
        #[arg(long, value_enum)]
        dtype: Option<crate::export::Dtype>,
    },
}

/// What `pipe export` writes.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ExportFormat {
    Hf,
    Gguf,
}

/// Where the model runs.
#[derive(clap::Args)]
struct BackendArgs {
    /// `cpu`, or a GPU backend compiled into this pipe: `cuda` (`--features cuda`) or `wgpu`
    /// (`--features wgpu`: Vulkan, Metal, DX12).
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    backend: BackendKind,
    /// GPU index (cuda; the CPU and wgpu have only device 0).
    #[arg(long, default_value_t = 0)]
    device: usize,
}

/// Where runs named by `name` or `name@id` are looked up.
#[derive(clap::Args)]
struct RunsDirArg {
    /// The runs folder names are looked up in.
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
}

/// Sampling flags; unset ones default to the run's generate stage, else to plain sampling.
#[derive(clap::Args)]
struct SamplingArgs {
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// 0 = greedy.
    #[arg(long)]
    temperature: Option<f64>,
    /// 0 = off.
    #[arg(long)]
    top_k: Option<usize>,
    /// 1 = off.
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Greedy decoding (same as --temperature 0).
    #[arg(long)]
    greedy: bool,
    /// Instead of `final/`: `best` (the best model), `last` (the newest checkpoint),
    /// `step-N` (the checkpoint at step N), or a checkpoint folder inside the run
    /// (`checkpoints/step-000100`).
    #[arg(long)]
    checkpoint: Option<String>,
    /// `bf16`: decode with the weights rounded to bf16 (half the memory each token reads;
    /// activations and sums stay f32) [default: the run's generate.precision, else f32].
    #[arg(long, value_enum)]
    precision: Option<Precision>,
}

impl SamplingArgs {
    fn resolve(&self, defaults: &GenerateSpec) -> anyhow::Result<(Sampling, usize, u64)> {
        let sampling = Sampling {
            temperature: if self.greedy { 0.0 } else { self.temperature.unwrap_or(defaults.temperature) },
            top_k: self.top_k.unwrap_or(defaults.top_k),
            top_p: self.top_p.unwrap_or(defaults.top_p),
        };
        if !(sampling.temperature >= 0.0 && sampling.temperature.is_finite()) {
            return Err(bad_input(format!("--temperature {}: must be a finite number ≥ 0", sampling.temperature)));
        }
        if !(sampling.top_p > 0.0 && sampling.top_p <= 1.0) {
            return Err(bad_input(format!("--top-p {}: must be in (0, 1]", sampling.top_p)));
        }
        Ok((sampling, self.max_new_tokens.unwrap_or(defaults.max_new_tokens), self.seed.unwrap_or(defaults.seed)))
    }
}

pub fn main() -> ExitCode {
    keep_freed_memory();
    restore_default_sigpipe();
    explain_sigbus();
    // burn-collective logs its configuration and every connection at info.
    let quiet = "info,burn_collective=warn,burn_communication=warn";
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| quiet.into());
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    match on_kernel_thread(|| execute(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            if is_bad_input(&error) {
                ExitCode::from(2)
            } else if let Some(signal) = interrupted_by(&error) {
                ExitCode::from((128 + signal).clamp(0, 255) as u8)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// Run `work` on a thread of its own pool of CPU-kernel threads (as many as rayon's global
/// pool would have), blocking until it returns. A CPU kernel split across the pool then keeps
/// one part on the thread that asked for it, where from a thread outside the pool it would hand
/// every part over and sleep until woken: at a small model's sizes, those hand-offs cost a large
/// share of a training step (docs/speed.md). Threads the command starts itself (data-parallel
/// peers) use rayon's global pool, as before.
fn on_kernel_thread<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    // The main thread's usual stack, which the command's work ran on before.
    const STACK_BYTES: usize = 8 << 20;
    match rayon::ThreadPoolBuilder::new().thread_name(|i| format!("pipe-cpu-{i}")).stack_size(STACK_BYTES).build() {
        Ok(pool) => pool.install(work),
        // No threads to be had: the work runs on this thread, as it would without the pool.
        Err(_) => work(),
    }
}

/// A model's folder (a run's final model or checkpoint, or a HF directory), its tokenizer and
/// run spec.
fn model_source(runs: &RunsDirArg, path: &Path, checkpoint: Option<&str>) -> anyhow::Result<(Tok, runs::ModelSource)> {
    let source = runs::model_source(&runs.runs_dir, path, checkpoint)?;
    let tok = Tok::load(&source.dir.join(hf::TOKENIZER_FILE))?;
    Ok((tok, source))
}

/// Run `job` with a decoder for the model in `dir`, where `on` says.
fn decode<W: WithDecoder>(dir: &Path, on: &BackendArgs, precision: Precision, job: W) -> anyhow::Result<W::Output> {
    let decoding = Decoding { dir: dir.to_path_buf(), kind: on.backend, precision, job };
    backend::dispatch(on.backend, &[on.device], decoding)
}

/// `pipe generate`: one answer.
struct Answer<'a> {
    tok: &'a Tok,
    layout: &'a PromptLayout,
    ids: &'a [u32],
    max_new_tokens: usize,
    sampling: Sampling,
    seed: u64,
}

impl WithDecoder for Answer<'_> {
    type Output = Vec<u32>;
    fn with(self, decoder: impl Decode) -> anyhow::Result<Vec<u32>> {
        let context = decoder.context();
        if self.ids.is_empty() || self.ids.len() >= context {
            return Err(bad_input(format!(
                "--prompt is {} tokens; it must be 1 to {} for this model's context",
                self.ids.len(),
                context - 1
            )));
        }
        Generator::with(decoder, self.seed).answer(self.tok, self.layout, self.ids, self.max_new_tokens, self.sampling)
    }
}

/// `pipe score`: every text's per-token NLL.
struct Scores<'a> {
    tok: &'a Tok,
    texts: &'a [String],
}

impl WithDecoder for Scores<'_> {
    type Output = (Vec<score::TextScore>, score::Overall);
    fn with(self, decoder: impl Decode) -> anyhow::Result<Self::Output> {
        score::score(&decoder, self.tok, self.texts)
    }
}

/// `pipe chat`: a conversation over stdin and stdout.
struct Conversation<'a> {
    tok: &'a Tok,
    settings: &'a chat::ChatSettings,
}

impl WithDecoder for Conversation<'_> {
    type Output = ();
    fn with(self, decoder: impl Decode) -> anyhow::Result<()> {
        use std::io::IsTerminal;
        let echo = !std::io::stdin().is_terminal();
        chat::chat(decoder, self.tok, self.settings, std::io::stdin().lock(), std::io::stdout(), echo)
    }
}

fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { spec, sets, resume, allow_changed_inputs } => {
            let loaded = spec::load(&spec, &sets)?;
            let resume = match resume {
                Some(run) => Some(runs::resolve(&loaded.spec.run.runs_dir, &run.to_string_lossy())?),
                None => None,
            };
            match (&loaded.spec.distributed, resume) {
                (Some(d), resume) if d.rank > 0 => {
                    pipeline::run_node(&loaded, resume.as_deref())?;
                    println!("node {} of {}: trained its share; node 0 writes the run", d.rank, d.nodes);
                }
                (_, None) => {
                    let run = pipeline::run(&loaded)?;
                    println!("run completed: {}", run.display());
                }
                (_, Some(run)) => report_resume(pipeline::resume(&run, Some(&loaded), allow_changed_inputs)?),
            }
        }
        Command::Orchestrator { port, bind } => {
            crate::distributed::port_free(bind, port, "--port")?;
            eprintln!("orchestrator listening on {bind} port {port} (Ctrl-C to stop)");
            crate::distributed::serve_orchestrator(bind, port)?;
        }
        Command::Resume { run, runs, allow_changed_inputs } => {
            let run = runs::resolve(&runs.runs_dir, &run.to_string_lossy())?;
            report_resume(pipeline::resume(&run, None, allow_changed_inputs)?);
        }
        Command::Check { spec, sets } => {
            let loaded = spec::load(&spec, &sets)?;
            println!("{}: valid", loaded.path.display());
            let unused = spec::unused(&loaded.spec);
            let (rows, unused_rows): (Vec<_>, Vec<_>) = loaded
                .provenance()
                .into_iter()
                .partition(|(key, _, _)| !unused.iter().any(|(keys, _)| spec::covers(keys, key)));
            let width = rows.iter().map(|(k, v, _)| k.len() + v.len() + 3).filter(|&w| w <= 60).max().unwrap_or(0);
            for (key, value, source) in rows {
                println!("{:width$}  # {source}", format!("{key} = {value}"));
            }
            if !unused.is_empty() {
                println!("not used by this spec:");
            }
            for (keys, why) in unused {
                // A field the user set that does nothing is worth saying so.
                let set: Vec<String> = unused_rows
                    .iter()
                    .filter(|(key, _, source)| spec::covers(&keys, key) && *source != spec::Source::Default)
                    .map(|(key, _, source)| format!("{key} set by {source}"))
                    .collect();
                let set = if set.is_empty() { String::new() } else { format!(" ({})", set.join(", ")) };
                println!("  {}: {why}{set}", keys.join(", "));
            }
        }
        Command::Data { spec, sets, n } => {
            let loaded = spec::load(&spec, &sets)?;
            let data = crate::data::PreparedData::prepare(&loaded.spec, None)?;
            for (i, sequence) in data.train.iter().take(n).enumerate() {
                println!("--- example {} ({} tokens, {} trained)", i + 1, sequence.ids.len(), sequence.loss_tokens());
                println!("{}", crate::data::render::show(&sequence, &data.tok)?);
            }
            let r = &data.report;
            // A pipeline whose only training is DPO reads no SFT examples: nothing to sum up.
            if loaded.spec.run.stages.contains(&spec::Stage::Train) || data.preference.is_none() {
                println!(
                    "--- {} examples -> {} training sequences, {} tokens, {} trained on; {} truncated, {} dropped; {} validation sequences",
                    r.examples, r.sequences, r.tokens, r.trained_tokens, r.truncated, r.dropped, data.val.len()
                );
            }
            if let Some(p) = data.packing {
                println!(
                    "--- packed: {} examples into {} sequences of up to max_length tokens, {:.1}% full",
                    p.examples,
                    p.sequences,
                    100.0 * p.fill
                );
            }
            if let Some(pairs) = &data.preference {
                for (i, pair) in pairs.train.iter().take(n).enumerate() {
                    for (which, sequence) in [("chosen", &pair.chosen), ("rejected", &pair.rejected)] {
                        let (tokens, completion) = (sequence.ids.len(), sequence.loss_tokens());
                        println!("--- pair {} {which} ({tokens} tokens, {completion} in the completion)", i + 1);
                        println!("{}", crate::data::render::show(sequence, &data.tok)?);
                    }
                }
                println!(
                    "--- {} preference pairs for training, {} for validation; {} sequences cut to dpo.max_length",
                    pairs.train.len(),
                    pairs.val.len(),
                    pairs.truncated
                );
            }
        }
        Command::Runs { runs_dir, name, sort } => {
            let mut all = runs::list(&runs_dir)?;
            if let Some(name) = name {
                all.retain(|r| r.meta.name.contains(&name));
            }
            runs::sort(&mut all, &sort)?;
            print!("{}", runs::table(&all));
        }
        Command::Compare { runs: refs, runs_dir, out, json } => {
            let all = refs
                .iter()
                .map(|r| runs::resolve(&runs_dir, r).and_then(|p| runs::Run::read(&p)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let comparison = runs::Comparison::new(&all);
            let svg = out.map(|out| runs::write_comparison(&comparison, &out)).transpose()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&comparison.to_json(svg.as_deref()))?);
            } else {
                print!("{}", comparison.render());
                if let Some(svg) = svg {
                    println!("\nplot: {}", svg.display());
                }
            }
        }
        Command::Generate { model, runs, prompt, raw, sampling, on, json } => {
            let (tok, source) = model_source(&runs, &model, sampling.checkpoint.as_deref())?;
            let layout = source.layout.clone().filter(|_| !raw).unwrap_or_else(PromptLayout::raw);
            let defaults = source.spec.as_ref().map(|s| s.generate.clone()).unwrap_or_default();
            let (settings, max_new_tokens, seed) = sampling.resolve(&defaults)?;
            let precision = sampling.precision.unwrap_or(defaults.precision);
            let text_in = layout.apply(&prompt);
            let ids = tok.encode_prompt(&text_in)?;
            let answer = Answer { tok: &tok, layout: &layout, ids: &ids, max_new_tokens, sampling: settings, seed };
            let new = decode(&source.dir, &on, precision, answer)?;
            let text = layout.cut(&tok.decode(&new)?).to_string();
            if json {
                let record = serde_json::json!({"prompt": prompt, "laid_out": text_in, "completion": text, "prompt_ids": ids, "new_ids": new});
                println!("{record}");
            } else {
                println!("{text_in}{text}");
            }
        }
        Command::Score { model, runs, text, file, json, checkpoint, precision, on } => {
            let (tok, source) = model_source(&runs, &model, checkpoint.as_deref())?;
            let mut texts = text;
            if let Some(file) = file {
                texts.extend(score::read_texts(&file)?);
            }
            let (scores, overall) = decode(&source.dir, &on, precision, Scores { tok: &tok, texts: &texts })?;
            if json {
                println!("{}", serde_json::json!({"texts": scores, "overall": overall}));
            } else {
                print!("{}", score::render(&tok, &scores, &overall)?);
            }
        }
        Command::Chat { model, runs, template, sampling, on } => {
            let (tok, source) = model_source(&runs, &model, sampling.checkpoint.as_deref())?;
            let layout = match (template, source.layout.clone()) {
                (Some(template), _) if !template.contains("{prompt}") => {
                    return Err(bad_input("--template must contain `{prompt}`"))
                }
                (Some(template), _) => PromptLayout::new(template),
                (None, Some(layout)) => layout,
                (None, None) => PromptLayout::new("{prompt}\n".into()),
            };
            let defaults = source.spec.as_ref().map(|s| s.generate.clone()).unwrap_or_default();
            let precision = sampling.precision.unwrap_or(defaults.precision);
            let (sampling, max_new_tokens, seed) = sampling.resolve(&defaults)?;
            let settings = chat::ChatSettings { layout, sampling, max_new_tokens, seed };
            decode(&source.dir, &on, precision, Conversation { tok: &tok, settings: &settings })?;
        }
        Command::Bench { shape, on } => {
            let sizes = [shape.layers, shape.heads, shape.embd, shape.vocab, shape.seq, shape.batch, shape.steps];
            if sizes.contains(&0) || shape.embd % shape.heads != 0 {
                return Err(bad_input("bench sizes must be at least 1, and --embd divisible by --heads"));
            }
            if let Some(kv_heads) = shape.kv_heads {
                if shape.family != crate::bench::BenchFamily::Llama {
                    return Err(bad_input("--kv-heads: only for --family llama"));
                }
                if kv_heads == 0 || shape.heads % kv_heads != 0 {
                    return Err(bad_input(format!("--kv-heads {kv_heads}: must divide --heads ({})", shape.heads)));
                }
            }
            if shape.inner == Some(0) {
                return Err(bad_input("--inner: must be at least 1"));
            }
            if shape.family == crate::bench::BenchFamily::Llama && (shape.embd / shape.heads) % 2 != 0 {
                return Err(bad_input("--family llama: --embd / --heads must be even (rotary embeddings)"));
            }
            if let Some(rank) = shape.lora_rank.filter(|&r| r == 0 || r > shape.embd) {
                return Err(bad_input(format!("--lora-rank {rank}: must be 1 to --embd ({})", shape.embd)));
            }
            if shape.gpu_attention != GpuAttention::Kernels && on.backend == BackendKind::Cpu {
                return Err(bad_input("--gpu-attention: only for the GPU backends (--backend cuda or wgpu)"));
            }
            let result =
                backend::dispatch(on.backend, &[on.device], crate::bench::Bench(shape, on.backend, on.device))?;
            println!("{result}");
        }
        Command::Export { run, runs, format: ExportFormat::Gguf, out, checkpoint, merge, dtype, quant } => {
            if merge || dtype.is_some() {
                return Err(bad_input(
                    "--merge and --dtype are for --format hf: a GGUF file always has its adapters merged, and --quant says how its weights are stored",
                ));
            }
            let quant = quant.unwrap_or(crate::export::gguf::Quant::F16);
            let source = runs::model_source(&runs.runs_dir, &run, checkpoint.as_deref())?;
            let tok = crate::data::Tok::load(&source.dir.join(hf::TOKENIZER_FILE))?;
            // A chat run's Jinja template (`hf` reads the one saved beside the run's tokenizer).
            let jinja = match &source.spec {
                Some(spec) if spec.data.kind == crate::spec::DataKind::Chat => {
                    let limits = crate::data::RenderLimits::default();
                    let resolved =
                        crate::data::JinjaTemplate::resolve(&spec.data.chat_template, Some(&source.dir), &tok, limits);
                    resolved.ok().flatten().map(|t| t.source)
                }
                _ => None,
            };
            let template = crate::export::gguf::chat_template(jinja, source.layout.as_ref(), &tok);
            // The run's name, or the model folder's.
            let name = match &source.spec {
                Some(spec) => spec.run.name.clone(),
                None => source.origin.file_name().map_or("model".into(), |n| n.to_string_lossy().to_string()),
            };
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}-{}.gguf", quant.name())));
            crate::export::gguf::export(&source.dir, &tok, &out, quant, template.as_deref(), &name)?;
            let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
            println!(
                "exported {} to {} as GGUF {} ({:.1} MB)",
                source.origin.display(),
                out.display(),
                quant.name(),
                size as f64 / 1e6
            );
        }
        Command::Export { run, runs, format: ExportFormat::Hf, out, checkpoint, merge, dtype, quant } => {
            if quant.is_some() {
                return Err(bad_input(
                    "--quant is for --format gguf; a HF folder's weights are stored as --dtype says",
                ));
            }
            let Some(out) = out else {
                return Err(bad_input("--out: name the new folder to write the model into"));
            };
            let source = runs::model_source(&runs.runs_dir, &run, checkpoint.as_deref())?;
            let dtype = match dtype {
                Some(dtype) => dtype,
                None => export_dtype(&source, merge)?,
            };
            crate::export::export(&source.dir, &out, merge, dtype)?;
            let how = if merge { " with its adapters merged" } else { "" };
            println!("exported {}{how} to {} as {}", source.origin.display(), out.display(), dtype.torch_name());
        }
    }
    Ok(())
}

/// The dtype `pipe export` stores weights in when not told: that of the checkpoint the model
/// came from — the run's base model, or a model folder itself — and f32 for a model pipe made
/// and for LoRA adapters (trained in f32) unless merged.
fn export_dtype(source: &runs::ModelSource, merge: bool) -> anyhow::Result<crate::export::Dtype> {
    use crate::export::Dtype;
    let adapters_only = !merge && source.dir.join(crate::model::lora::ADAPTER_DIR).is_dir();
    if adapters_only {
        return Ok(Dtype::F32);
    }
    let base = match &source.spec {
        Some(spec) => match (&spec.model.path, &spec.model.hub) {
            (Some(path), _) => Some(path.clone()),
            (None, Some(hub)) => Some(hf::resolve_hub_model(hub)?),
            (None, None) => None,
        },
        None => Some(source.dir.clone()),
    };
    let Some(base) = base else { return Ok(Dtype::F32) };
    Dtype::of_checkpoint(&base).map_err(|e| {
        bad_input(format!(
            "cannot read the weights of {} to export in their dtype ({e:#}); name one with --dtype f32, bf16 or f16",
            base.display()
        ))
    })
}

fn report_resume(resumed: pipeline::Resumed) {
    match resumed {
        pipeline::Resumed::Completed(run) => println!("run completed: {}", run.display()),
        pipeline::Resumed::AlreadyCompleted(run) => {
            println!("run {} is already completed; nothing to resume", run.display())
        }
    }
}

/// Keep freed memory for reuse. Each training step frees and re-allocates the same large
/// buffers (the logits alone are tokens × vocabulary floats); by default glibc serves those with
/// mmap and returns them on free, so the kernel zeroes fresh pages for them every step
/// (docs/speed.md has what this saves).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation policy; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
}

/// Say why, on SIGBUS, instead of dying without a word. pipe maps its tokenized-data cache
/// (and reads weights) from files that it never changes once written; the one way to a SIGBUS
/// is such a file truncated by someone else while this process reads it. The process still
/// ends (the mapped data is gone); `pipe resume` rebuilds the cache, whose checksum then fails.
fn explain_sigbus() {
    #[cfg(unix)]
    extern "C" fn on_sigbus(_: libc::c_int) {
        const MESSAGE: &[u8] =
            b"error: a file pipe had mapped into memory (the tokenized data under <runs_dir>/.cache, or a \
model's weights) was truncated while this process read it (SIGBUS); the process stops here. \
A run continues with: pipe resume RUN\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe; MESSAGE is static.
        unsafe {
            libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len());
            libc::_exit(128 + libc::SIGBUS);
        }
    }
    #[cfg(unix)]
    // SAFETY: installing a handler that only calls async-signal-safe functions, before any
    // thread is started.
    unsafe {
        libc::signal(libc::SIGBUS, on_sigbus as *const () as libc::sighandler_t);
    }
}

/// Die quietly on a closed pipe (`pipe check spec.toml | head`), as command-line tools do,
/// instead of Rust's default of panicking on the failed write.
fn restore_default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to the default before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
