//! The pipeline spec: the TOML schema as plain serde structs, one `Default` per section (what
//! a field left out of the file means), loaded with provenance in `load` and checked in
//! `validate`.

mod load;
mod unused;
mod validate;

use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

pub use crate::model::gpt2::Precision;
pub use load::{flatten, load, load_with_env, LoadedSpec, Source};
pub use unused::{covers, unused};

/// Prefix of environment variables that override spec fields (`PIPE_TRAIN__EPOCHS=3`).
pub const ENV_PREFIX: &str = "PIPE_";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub run: RunSpec,
    /// The SFT data; a run whose only stages are `dpo` and `generate` has none.
    #[serde(default)]
    pub data: DataSpec,
    #[serde(default)]
    pub tokenizer: TokenizerSpec,
    pub model: ModelSpec,
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    #[serde(default)]
    pub train: TrainSpec,
    #[serde(default)]
    pub eval: EvalSpec,
    #[serde(default)]
    pub generate: GenerateSpec,
    /// Train LoRA adapters on the frozen base model instead of all its weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSpec>,
    /// Training across several machines (nodes), each running this spec with its own rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distributed: Option<DistributedSpec>,
    /// Preference tuning: the `dpo` stage's data and settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpo: Option<DpoSpec>,
}

impl RunSpec {
    /// The GPU devices a run uses: `device` first (the main one), then its peers' `devices`.
    pub fn device_indices(&self) -> Vec<usize> {
        std::iter::once(self.device).chain(self.devices.iter().copied()).collect()
    }
}

impl Spec {
    /// The spec less what legitimately differs between the nodes of one run (each node's rank,
    /// address, device indices, runs folder): what every node must agree on.
    pub fn shared_by_nodes(&self) -> Spec {
        let mut spec = self.clone();
        spec.run.runs_dir = PathBuf::new();
        spec.run.device = 0;
        spec.run.devices = vec![0; spec.run.devices.len()];
        if let Some(d) = &mut spec.distributed {
            (d.rank, d.host, d.port, d.serve_orchestrator) = (0, String::new(), 0, false);
            d.bind = String::new();
        }
        spec
    }
}

/// Several nodes (processes, usually machines) training one model data-parallel: each runs
/// `pipe run` on the same spec with its own `rank`, and they meet through burn-collective's
/// orchestrator (`pipe orchestrator --port P`, or started by node 0 with `serve_orchestrator`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistributedSpec {
    /// How many nodes take part.
    pub nodes: usize,
    /// This node's rank, 0..nodes; node 0 writes the run (metrics, checkpoints, final model).
    pub rank: usize,
    /// The orchestrator, `host:port`.
    #[serde(deserialize_with = "lenient_string")]
    pub orchestrator: String,
    /// Node 0 starts the orchestrator itself, on the port of `orchestrator`.
    pub serve_orchestrator: bool,
    /// The host other nodes reach this one at.
    #[serde(deserialize_with = "lenient_string")]
    pub host: String,
    /// The port this node serves its share of each all-reduce on.
    pub port: u16,
    /// The address this node's servers (its data port, and the orchestrator it serves) listen
    /// on: the loopback unless set (`0.0.0.0` is every interface). The collective is not
    /// authenticated: listen only where a private network is.
    #[serde(deserialize_with = "lenient_string")]
    pub bind: String,
    /// A peer that does not reach an all-reduce within this many seconds of the others is
    /// taken as lost: the run stops with an error naming it (evaluations and checkpoints by
    /// rank 0 happen between all-reduces, so leave room for them).
    pub timeout_s: f64,
}

impl Default for DistributedSpec {
    fn default() -> Self {
        Self {
            nodes: 1,
            rank: 0,
            orchestrator: String::new(),
            serve_orchestrator: false,
            host: "127.0.0.1".into(),
            port: 0,
            bind: "127.0.0.1".into(),
            timeout_s: 600.0,
        }
    }
}

/// LoRA adapters, with HF PEFT's meaning: each targeted projection of every layer adds
/// `(alpha / rank)·B·A·x`, A Kaiming-uniform and B zero at the start; the base stays frozen.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSpec {
    /// The adapters' rank (`r`), at most the model width.
    pub rank: usize,
    /// `lora_alpha`: the low-rank term is scaled by alpha / rank.
    pub alpha: f64,
    /// Dropout on the adapters' input while training (`lora_dropout`).
    pub dropout: f64,
    /// The projections adapted, as PEFT names them: `c_attn`, `attn.c_proj`, `c_fc`,
    /// `mlp.c_proj` (`c_proj` for both output projections, `all-linear` for all four).
    pub targets: Vec<String>,
    /// rsLoRA: scale by alpha / √rank (`use_rslora`).
    pub rslora: bool,
    /// Continue training the adapters of this PEFT adapter folder (`adapter_config.json` and
    /// `adapter_model.safetensors`, from PEFT or pipe) instead of fresh ones; its settings
    /// must agree with the fields above.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<PathBuf>,
}

impl Default for LoraSpec {
    fn default() -> Self {
        Self { rank: 8, alpha: 16.0, dropout: 0.0, targets: vec!["attention".into()], rslora: false, from: None }
    }
}

/// The eval stage: the validation loss, and how the model answers held-out prompts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSpec {
    /// Answer (greedily) this many validation prompts and score the answers against the
    /// references: exact match, token F1, ROUGE-L (0 = none).
    pub responses: usize,
    /// The longest answer, in tokens.
    pub max_new_tokens: usize,
}

impl Default for EvalSpec {
    fn default() -> Self {
        Self { responses: 0, max_new_tokens: 64 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSpec {
    /// Runs land in `<runs_dir>/<name>/<run-id>/`.
    #[serde(deserialize_with = "lenient_string")]
    pub name: String,
    pub seed: u64,
    pub runs_dir: PathBuf,
    pub backend: BackendKind,
    /// Device index for `cuda` (the CPU and wgpu have only device 0).
    pub device: usize,
    /// Train data-parallel on these devices, one peer (thread) each; each takes
    /// `train.batch_size` examples per micro-batch. On the CPU the indices only count peers.
    /// Empty: the one `device`.
    pub devices: Vec<usize>,
    /// "f32", or "bf16": linear layers and the LM head multiply in bf16, with f32 master
    /// weights, gradients, optimizer state, LayerNorm, attention, softmax and loss (mixed
    /// precision).
    pub precision: Precision,
    /// The stages to run, in order.
    pub stages: Vec<Stage>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// burn's flex backend on the CPU.
    #[default]
    Cpu,
    /// burn's CUDA backend (needs the `cuda` cargo feature).
    Cuda,
    /// burn's wgpu backend: Vulkan, Metal or DX12 GPUs (needs the `wgpu` cargo feature).
    Wgpu,
}

impl BackendKind {
    /// The backend as the spec names it (recorded in a run's `meta.json`); the GPU backends'
    /// names are also their cargo features.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
            BackendKind::Wgpu => "wgpu",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Train,
    /// Preference tuning (DPO) on `[dpo]`'s pairs, from the model as the stages before left it.
    Dpo,
    Eval,
    Generate,
}

impl Stage {
    /// The stage as the spec names it.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Train => "train",
            Stage::Dpo => "dpo",
            Stage::Eval => "eval",
            Stage::Generate => "generate",
        }
    }
}

/// `[dpo]`: preference pairs and how the `dpo` stage trains on them. Settings left out take
/// `[train]`'s and `[optimizer]`'s values.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoSpec {
    /// Preference records (any format `data.path` takes): a prompt, a chosen and a rejected
    /// completion each.
    pub path: DataPaths,
    /// Validation pairs; without it, `val_fraction` of `path`'s records are held out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_path: Option<DataPaths>,
    pub val_fraction: f64,
    pub format: DataFormat,
    #[serde(deserialize_with = "lenient_string")]
    pub prompt_field: String,
    #[serde(deserialize_with = "lenient_string")]
    pub chosen_field: String,
    #[serde(deserialize_with = "lenient_string")]
    pub rejected_field: String,
    /// How far the policy may move from the reference (DPO's β).
    pub beta: f64,
    pub loss: DpoLoss,
    /// `robust`: the assumed fraction of pairs whose preference is flipped, in [0, 0.5).
    pub label_smoothing: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_accum: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Tokens of prompt and completion together; longer sequences lose their start (the
    /// prompt's first tokens first), as TRL's `truncation_mode = "keep_end"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    /// What picks the stage's best model and stops it early: `val_loss` or `reward_accuracy`.
    pub select_metric: SelectMetric,
}

impl Default for DpoSpec {
    fn default() -> Self {
        Self {
            path: DataPaths::default(),
            val_path: None,
            val_fraction: 0.1,
            format: DataFormat::Auto,
            prompt_field: "prompt".into(),
            chosen_field: "chosen".into(),
            rejected_field: "rejected".into(),
            beta: 0.1,
            loss: DpoLoss::Sigmoid,
            label_smoothing: 0.0,
            epochs: None,
            batch_size: None,
            grad_accum: None,
            lr: None,
            max_length: None,
            select_metric: SelectMetric::ValLoss,
        }
    }
}

/// DPO's loss over a pair's reward margin, with TRL's formulas for the types of the same names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpoLoss {
    /// −log σ(β·m): the DPO paper's.
    #[default]
    Sigmoid,
    /// (m̄ − 1/(2β))², m̄ the margin of per-token mean log-probabilities (IPO).
    Ipo,
    /// max(0, 1 − β·m) (SLiC).
    Hinge,
    /// Robust DPO: unbiased under `label_smoothing` flipped labels.
    Robust,
}

impl Spec {
    /// The spec the `dpo` stage trains with: `[train]` and `[optimizer]` with `[dpo]`'s own
    /// settings in their places.
    pub fn for_dpo(&self) -> Spec {
        let mut spec = self.clone();
        if let Some(dpo) = &self.dpo {
            let train = &mut spec.train;
            train.epochs = dpo.epochs.unwrap_or(train.epochs);
            train.batch_size = dpo.batch_size.unwrap_or(train.batch_size);
            train.grad_accum = dpo.grad_accum.unwrap_or(train.grad_accum);
            train.packing = false;
            train.select_metric = dpo.select_metric;
            spec.optimizer.lr = dpo.lr.unwrap_or(spec.optimizer.lr);
        }
        spec
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSpec {
    /// Training data: JSON array, JSONL, CSV with a header row, or plain text; one file, a glob
    /// (`data/train-*.jsonl`), or a list of either, all of one kind, read in order.
    pub path: DataPaths,
    /// How the file is laid out; `auto` goes by the extension (.jsonl, .csv, .txt) or content.
    pub format: DataFormat,
    /// What each record holds.
    pub kind: DataKind,
    /// `pair` records: which fields hold prompt and response.
    #[serde(deserialize_with = "lenient_string")]
    pub prompt_field: String,
    #[serde(deserialize_with = "lenient_string")]
    pub response_field: String,
    /// `pair` records: how a prompt is laid out before the response (`{prompt}` is the prompt).
    /// The generate stage's prompts and `pipe chat` use the same template.
    pub prompt_template: String,
    /// `alpaca` records: instruction, optional input, output.
    #[serde(deserialize_with = "lenient_string")]
    pub instruction_field: String,
    #[serde(deserialize_with = "lenient_string")]
    pub input_field: String,
    #[serde(deserialize_with = "lenient_string")]
    pub output_field: String,
    /// `chat` records: the field with the list of {role, content} messages.
    #[serde(deserialize_with = "lenient_string")]
    pub messages_field: String,
    /// `chat` records: `simple`, or a format string with `{role}` and `{content}` that every
    /// message is rendered with; assistant messages are followed by EOS.
    pub chat_template: String,
    /// `text` records: the field that holds the text (JSON, JSONL or CSV).
    #[serde(deserialize_with = "lenient_string")]
    pub text_field: String,
    /// `preference` records: the field with the rejected completion.
    #[serde(skip)]
    pub rejected_field: String,
    /// Plain-text files: one document per `line`, or the whole `file` as one document.
    pub documents: Documents,
    /// The split a dataset folder in `path` is read at: a `datasets` save_to_disk folder, or a
    /// hub dataset repo's `data/<split>-*.parquet`.
    #[serde(deserialize_with = "lenient_string")]
    pub split: String,
    /// Validation examples from a second file or folder; otherwise `val_split` of `path`'s
    /// folder, or else `val_fraction` of `path` held out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_path: Option<PathBuf>,
    /// The validation split of `path`'s dataset folder (or of `val_path`'s): `test`, `validation`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_split: Option<String>,
    pub val_fraction: f64,
    /// The largest record read, in bytes: a line of JSONL, CSV or text, a record of a JSON
    /// array, a text file read as one document, a conversation as its chat template renders it.
    /// Longer ones are refused, naming where (endless or runaway inputs must not exhaust memory).
    pub max_record_bytes: usize,
    /// The most steps (minijinja's instructions) a chat template may take to render one
    /// conversation; a template that takes more (a loop without end) is refused.
    pub max_template_steps: u64,
}

/// `data.path`: the training data's files as the spec names them, each a path or a glob.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataPaths(pub Vec<PathBuf>);

impl DataPaths {
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|p| p.as_os_str().is_empty())
    }

    /// The files named, in order: each glob's matches sorted by name (the shards of a hub
    /// dataset, `train-00000-of-00003.jsonl`, …, in their order). A glob that matches no file
    /// is an error naming it; a plain path is kept as it is, for its reader to name if absent.
    pub fn files(&self) -> anyhow::Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for entry in &self.0 {
            let text = entry.to_string_lossy();
            if !text.contains(['*', '?', '[']) || entry.is_file() {
                files.push(entry.clone());
                continue;
            }
            let bad = |why: String| crate::error::bad_input(format!("data.path `{text}`: {why}"));
            let matches = glob::glob(&text).map_err(|e| bad(format!("not a glob pattern: {e}")))?;
            let mut found = matches.collect::<Result<Vec<_>, _>>().map_err(|e| bad(e.to_string()))?;
            if found.is_empty() {
                return Err(bad("matches no file".into()));
            }
            found.sort();
            files.extend(found);
        }
        Ok(files)
    }

    /// The paths as the spec names them, for messages.
    pub fn display(&self) -> String {
        let all: Vec<String> = self.0.iter().map(|p| p.display().to_string()).collect();
        all.join(", ")
    }

    /// The first path, for what a spec's first file decides (its format by extension).
    pub fn first(&self) -> Option<&PathBuf> {
        self.0.first()
    }
}

impl From<PathBuf> for DataPaths {
    fn from(path: PathBuf) -> Self {
        Self(vec![path])
    }
}

/// One path is written as a string, as it is usually given; several as a list.
impl Serialize for DataPaths {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(serializer),
            many => many.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for DataPaths {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Given {
            One(PathBuf),
            Many(Vec<PathBuf>),
        }
        match Given::deserialize(de) {
            Ok(Given::One(path)) => Ok(Self(vec![path])),
            Ok(Given::Many(paths)) => Ok(Self(paths)),
            Err(_) => Err(serde::de::Error::custom("expected a path, a glob, or a list of them")),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// By extension: `.jsonl`, `.csv`, `.txt`, `.parquet`, `.arrow`; otherwise a JSON array
    /// or, failing that, JSONL.
    #[default]
    Auto,
    Json,
    Jsonl,
    Csv,
    Text,
    /// Apache Parquet, as the hub ships datasets.
    Parquet,
    /// Arrow IPC, stream or file (`datasets`' save_to_disk writes streams).
    Arrow,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataKind {
    /// A prompt and a response.
    #[default]
    Pair,
    /// Alpaca records: instruction, optional input, output, in the two Alpaca prompt layouts.
    Alpaca,
    /// A list of {role, content} messages (system, user, assistant), several turns.
    Chat,
    /// Plain documents for continued pre-training, packed into blocks with EOS between.
    Text,
    /// A prompt with a chosen and a rejected completion (`prompt_field`, `response_field` for
    /// the chosen one, `rejected_field`): the `dpo` stage reads `[dpo]`'s records so, never a
    /// spec's `[data]`.
    #[serde(skip)]
    Preference,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Documents {
    #[default]
    Line,
    File,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenizerSpec {
    /// A HuggingFace `tokenizer.json`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Train a byte-level BPE of this vocabulary size on the training data instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_vocab_size: Option<usize>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSpec {
    /// A HuggingFace model directory (config.json + model.safetensors) of a family pipe has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// A hub id such as `openai-community/gpt2`, resolved through the HuggingFace cache.
    #[serde(skip_serializing_if = "Option::is_none", deserialize_with = "lenient_opt_string")]
    pub hub: Option<String>,
    /// Or an architecture to initialise from scratch, of this family (GPT-2 by default):
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<NewModelFamily>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heads: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embd: Option<usize>,
    /// Context length (positions attended over).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<usize>,
    /// Llama: key/value heads (dividing `heads`; the heads by default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_heads: Option<usize>,
    /// Llama: the MLP's hidden width (4·embd by default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inner: Option<usize>,
    /// Dropout probability; defaults to the checkpoint's, or 0 for a new model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropout: Option<f64>,
}

impl ModelSpec {
    /// The architecture of the new model this section describes, for a vocabulary of
    /// `vocab_size`; None when it names a checkpoint. (Validated: the sizes are given.)
    pub fn new_model_config(&self, vocab_size: usize) -> Option<crate::model::ModelConfig> {
        use crate::model::{Gpt2Config, LlamaConfig, ModelConfig};
        let (layers, heads, embd, context) = (self.layers?, self.heads?, self.embd?, self.context?);
        let dropout = self.dropout.unwrap_or(0.0);
        let config = match self.family.unwrap_or_default() {
            NewModelFamily::Gpt2 => ModelConfig::Gpt2(Gpt2Config::new(vocab_size, context, embd, layers, heads)),
            NewModelFamily::Llama => {
                let inner = self.inner.unwrap_or(4 * embd);
                let kv_heads = self.kv_heads.unwrap_or(heads);
                ModelConfig::Llama(LlamaConfig::new(vocab_size, context, embd, inner, layers, heads, kv_heads))
            }
        };
        Some(config.with_dropout(dropout))
    }
}

/// The architecture of a model made from scratch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NewModelFamily {
    #[default]
    Gpt2,
    Llama,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerSpec {
    pub name: OptimizerKind,
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// L2 penalty added to the gradient for `adam`; decoupled decay for `adamw` (as PyTorch).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value, as `torch.nn.utils.clip_grad_norm_`; 0 = off.
    pub grad_clip: f64,
    pub schedule: Schedule,
    /// Linear warmup from 0 to `lr` over this many optimizer steps.
    pub warmup_steps: usize,
    /// The learning rate the cosine schedule decays to, as a fraction of `lr`.
    pub min_lr_ratio: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adam,
    #[default]
    Adamw,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Constant after the warmup.
    #[default]
    Constant,
    /// Cosine decay to `min_lr_ratio · lr` over the run, after the warmup.
    Cosine,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSpec {
    pub epochs: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Batch examples of similar length together (less padding), as TRL's `group_by_length`.
    pub group_by_length: bool,
    /// Pack several examples into each `max_length` sequence (best-fit decreasing), each
    /// attending only to itself with positions restarting at 0: no padding, no cross-talk.
    pub packing: bool,
    /// Longest example in tokens (prompt + response + EOS); defaults to the model's context.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    pub loss_on: LossOn,
    /// Log a metrics line every this many optimizer steps.
    pub log_every: usize,
    /// Evaluate on the validation set every N optimizer steps, besides each epoch's end (0 = only there).
    pub eval_every: usize,
    /// Checkpoint every this many optimizer steps (and always at the end); 0 = only at the end.
    pub checkpoint_every: usize,
    /// How many checkpoints to keep (the newest); the best model is kept apart.
    pub keep_checkpoints: usize,
    /// Which model `final/` is: the last one trained, or the best by `select_metric`.
    #[serde(rename = "final")]
    pub final_model: FinalModel,
    /// What "best" means: the lowest validation loss, or the highest score of the answers to
    /// `eval.responses` held-out prompts (then answered at every evaluation).
    pub select_metric: SelectMetric,
    /// End training after this many evaluations without improvement (0 = never).
    pub early_stopping_patience: usize,
    /// The least change of the selection metric (in its good direction) that counts as an improvement.
    pub early_stopping_min_delta: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectMetric {
    #[default]
    ValLoss,
    ExactMatch,
    TokenF1,
    RougeL,
    /// The dpo stage's: the fraction of validation pairs whose chosen completion the model
    /// rewards above the rejected one.
    RewardAccuracy,
}

impl SelectMetric {
    /// Whether a higher value is better (the scores, the accuracy) or a lower one (the loss).
    pub fn higher_is_better(self) -> bool {
        self != Self::ValLoss
    }

    /// Whether it scores answers to held-out prompts (which validation then generates).
    pub fn scores_answers(self) -> bool {
        matches!(self, Self::ExactMatch | Self::TokenF1 | Self::RougeL)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinalModel {
    /// The model after the last optimizer step (as HF's Trainer).
    #[default]
    Last,
    /// The model with the lowest validation loss (`checkpoints/best/`).
    Best,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossOn {
    /// Only the response tokens (and the EOS after them) are trained on.
    #[default]
    Response,
    /// Every token of prompt + response + EOS.
    All,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerateSpec {
    pub prompts: Vec<String>,
    pub max_new_tokens: usize,
    /// 0 means greedy decoding.
    pub temperature: f64,
    /// Keep the k most likely tokens; 0 = no limit.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1 = no limit.
    pub top_p: f64,
    pub seed: u64,
    /// `bf16`: the generate stage, `pipe generate` and `pipe chat` decode with the weights
    /// rounded to bf16 (on the CPU).
    pub precision: Precision,
}

impl Default for RunSpec {
    fn default() -> Self {
        Self {
            name: String::new(),
            seed: 0,
            runs_dir: "runs".into(),
            backend: BackendKind::Cpu,
            device: 0,
            devices: Vec::new(),
            precision: Precision::F32,
            stages: vec![Stage::Train, Stage::Eval, Stage::Generate],
        }
    }
}

impl DataSpec {
    /// Whether validation examples come from files of their own (not held out of `path`).
    pub fn has_val_files(&self) -> bool {
        self.val_path.is_some() || self.val_split.is_some()
    }
}

impl Default for DataSpec {
    fn default() -> Self {
        Self {
            path: DataPaths::default(),
            format: DataFormat::Auto,
            kind: DataKind::Pair,
            prompt_field: "prompt".into(),
            response_field: "response".into(),
            prompt_template: "{prompt}".into(),
            instruction_field: "instruction".into(),
            input_field: "input".into(),
            output_field: "output".into(),
            messages_field: "messages".into(),
            chat_template: "simple".into(),
            text_field: "text".into(),
            rejected_field: String::new(),
            documents: Documents::Line,
            split: "train".into(),
            val_path: None,
            val_split: None,
            val_fraction: 0.1,
            max_record_bytes: 1 << 20,
            max_template_steps: 10_000_000,
        }
    }
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        Self {
            name: OptimizerKind::Adamw,
            lr: 1e-4,
            betas: [0.9, 0.95],
            eps: 1e-8,
            weight_decay: 0.0,
            grad_clip: 0.0,
            schedule: Schedule::Constant,
            warmup_steps: 0,
            min_lr_ratio: 0.0,
        }
    }
}

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 8,
            grad_accum: 1,
            group_by_length: false,
            packing: false,
            max_length: None,
            loss_on: LossOn::Response,
            log_every: 1,
            eval_every: 0,
            checkpoint_every: 100,
            keep_checkpoints: 2,
            final_model: FinalModel::Last,
            select_metric: SelectMetric::ValLoss,
            early_stopping_patience: 0,
            early_stopping_min_delta: 0.0,
        }
    }
}

impl Default for GenerateSpec {
    fn default() -> Self {
        Self {
            prompts: Vec::new(),
            max_new_tokens: 64,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            precision: Precision::F32,
        }
    }
}

/// A string field also takes a number or a boolean (`--set run.name=2024`).
fn lenient_string<'de, D: Deserializer<'de>>(de: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        U(u64),
        F(f64),
        B(bool),
    }
    Ok(match Scalar::deserialize(de)? {
        Scalar::S(s) => s,
        Scalar::I(i) => i.to_string(),
        Scalar::U(u) => u.to_string(),
        Scalar::F(f) => f.to_string(),
        Scalar::B(b) => b.to_string(),
    })
}

fn lenient_opt_string<'de, D: Deserializer<'de>>(de: D) -> Result<Option<String>, D::Error> {
    lenient_string(de).map(Some)
}
