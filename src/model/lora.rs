//! LoRA adapters (Hu et al. 2021) as HuggingFace PEFT defines them, for every family: a targeted
//! projection computes `x·W + b + (alpha/rank)·(dropout(x)·A)·B` with the base weight `W`
//! frozen; `A` starts Kaiming-uniform (bound 1/√in, PEFT's `kaiming_uniform_(a=√5)`) and `B` at
//! zero, so a fresh adapter leaves the model exactly as it was.
//!
//! On disk a model with adapters is a folder holding `adapter/` in PEFT's format
//! (`adapter_config.json`, `adapter_model.safetensors` with PEFT's tensor names, loadable with
//! `PeftModel.from_pretrained`), `base.json` (where the frozen base is and the SHA-256 of its
//! files, checked whenever the folder is loaded) and the base's `config.json`: never a copy of
//! the base's weights.
//!
//! pipe keeps `A` as `[in, rank]` and `B` as `[rank, out]` (its linear layers multiply `x·W`);
//! PEFT's `lora_A.weight` is `[rank, in]` and `lora_B.weight` `[out, rank]`, so both are
//! transposed on the way in and out.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::fused::{linear, FusedOps};
use super::gpt2::Precision;
use super::hf::{self, TensorFile};
use crate::error::bad_input;
use crate::files::write_atomic;

/// The PEFT adapter folder inside a model folder with adapters.
pub const ADAPTER_DIR: &str = "adapter";
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Beside `adapter/`: the frozen base model the adapters were trained on.
pub const BASE_FILE: &str = "base.json";

/// A projection an adapter can be attached to, named as PEFT's `target_modules` names it: GPT-2's
/// four, or the Llama family's seven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// GPT-2's query/key/value projection.
    CAttn,
    /// GPT-2's attention output projection.
    AttnCProj,
    /// GPT-2's first MLP layer.
    CFc,
    /// GPT-2's MLP output projection.
    MlpCProj,
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

/// The projections of each family, and which of them are its attention's.
const GPT2_TARGETS: [Target; 4] = [Target::CAttn, Target::AttnCProj, Target::CFc, Target::MlpCProj];
const LLAMA_TARGETS: [Target; 7] =
    [Target::QProj, Target::KProj, Target::VProj, Target::OProj, Target::GateProj, Target::UpProj, Target::DownProj];
const ATTENTION: [Target; 6] =
    [Target::CAttn, Target::AttnCProj, Target::QProj, Target::KProj, Target::VProj, Target::OProj];

impl Target {
    /// The name written in `target_modules` (matched as a suffix of the module path, as PEFT does).
    pub fn peft_name(self) -> &'static str {
        match self {
            Target::CAttn => "c_attn",
            Target::AttnCProj => "attn.c_proj",
            Target::CFc => "c_fc",
            Target::MlpCProj => "mlp.c_proj",
            Target::QProj => "q_proj",
            Target::KProj => "k_proj",
            Target::VProj => "v_proj",
            Target::OProj => "o_proj",
            Target::GateProj => "gate_proj",
            Target::UpProj => "up_proj",
            Target::DownProj => "down_proj",
        }
    }

    /// The projections a list of `target_modules` names selects in a model of `family`
    /// (`gpt2`, or a Llama-family `model_type`), as PEFT matches them against its module paths
    /// (GPT-2's `c_proj` is both attention's and the MLP's; `all-linear` is every projection but
    /// the LM head; pipe's `attention` is the attention's projections). Names the family does
    /// not have are an error listing those it has.
    pub fn parse_list(names: &[String], family: &str) -> std::result::Result<Vec<Target>, String> {
        let gpt2 = family == "gpt2";
        let own: &[Target] = if gpt2 { &GPT2_TARGETS } else { &LLAMA_TARGETS };
        let known = || {
            let listed: Vec<&str> = own.iter().map(|t| t.peft_name()).collect();
            let extra = if gpt2 { "`c_proj` for both output projections, " } else { "" };
            format!(
                "a {family} model's are `{}` ({extra}`attention` for the attention's, `all-linear` for all)",
                listed.join("`, `")
            )
        };
        let mut targets = Vec::new();
        for name in names {
            let selected: Vec<Target> = match name.as_str() {
                "all-linear" => own.to_vec(),
                "attention" => own.iter().copied().filter(|t| ATTENTION.contains(t)).collect(),
                "c_proj" if gpt2 => vec![Target::AttnCProj, Target::MlpCProj],
                "attn.c_attn" if gpt2 => vec![Target::CAttn],
                "mlp.c_fc" if gpt2 => vec![Target::CFc],
                other => match own.iter().find(|t| t.peft_name() == other) {
                    Some(&target) => vec![target],
                    None => return Err(format!("`{other}` is not a projection of a {family} model; {}", known())),
                },
            };
            targets.extend(selected);
        }
        if targets.is_empty() {
            return Err(format!("names no projection; {}", known()));
        }
        targets.sort();
        targets.dedup();
        Ok(targets)
    }

    /// Whether `names` select projections of some family (checked against the model's own
    /// once it is read).
    pub fn check_names(names: &[String]) -> std::result::Result<(), String> {
        match (Target::parse_list(names, "gpt2"), Target::parse_list(names, "llama")) {
            (Err(gpt2), Err(llama)) => Err(format!("{gpt2}; {llama}")),
            _ => Ok(()),
        }
    }
}

/// One projection an adapter attaches to: its weight [in, out] and its adapter slot.
pub struct Slot<'a, B: Backend> {
    pub weight: &'a mut Param<Tensor<B, 2>>,
    pub lora: &'a mut Option<Lora<B>>,
}

/// A model family LoRA adapters attach to: its projections by layer and target, named as PEFT
/// names them.
pub trait Adaptable<B: Backend>: Module<B> + Sized {
    /// What PEFT puts before the module paths (`base_model.model.` and the body's name).
    const PEFT_PREFIX: &'static str;
    /// The family's `model_type`.
    fn family(&self) -> &'static str;
    fn layers(&self) -> usize;
    /// The projection `target` of layer `layer`, if the family has it.
    fn slot(&mut self, layer: usize, target: Target) -> Option<Slot<'_, B>>;
    /// Its module path in layer `layer`: `h.0.attn.c_attn`, `model.layers.0.self_attn.q_proj`.
    fn path(target: Target, layer: usize) -> String;
    fn adapters(&self) -> Option<&Adapters>;
    fn set_adapters(&mut self, adapters: Option<Adapters>);
    /// The width adapters' ranks are bounded by.
    fn width(&self) -> usize;
    /// Write the architecture's `config.json` (and generation config) into `dir`.
    fn write_config(&self, eos_id: Option<usize>, dir: &Path) -> Result<()>;
}

/// An adapter's settings, with PEFT's meaning.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// `r`
    pub rank: usize,
    /// `lora_alpha`
    pub alpha: f64,
    /// `lora_dropout`, on the adapter's input.
    pub dropout: f64,
    /// `target_modules`
    pub targets: Vec<Target>,
    /// `use_rslora`: scale by alpha/√rank instead of alpha/rank.
    pub rslora: bool,
}

impl LoraConfig {
    /// The factor on the low-rank term.
    pub fn scale(&self) -> f64 {
        match self.rslora {
            true => self.alpha / (self.rank as f64).sqrt(),
            false => self.alpha / self.rank as f64,
        }
    }
}

/// The frozen model adapters were trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseModel {
    /// As the spec named it (a hub id or a folder): PEFT's `base_model_name_or_path`.
    pub name: String,
    /// The HF folder it was read from.
    pub path: PathBuf,
    /// SHA-256 of its `config.json` and `model.safetensors` (as `meta.json` records a base model).
    pub sha256: String,
}

impl BaseModel {
    /// The base model in HF folder `path`, as `name` names it, with its files' hash.
    pub fn of(name: String, path: &Path) -> Result<Self> {
        let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        Ok(Self { name, sha256: hf::sha256(&path)?, path })
    }
}

/// A model's adapters: their settings and the base they adapt.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapters {
    pub config: LoraConfig,
    pub base: BaseModel,
}

/// One projection's adapter.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// [in, rank]
    pub a: Param<Tensor<B, 2>>,
    /// [rank, out]
    pub b: Param<Tensor<B, 2>>,
    /// alpha/rank (or alpha/√rank).
    pub scale: f64,
    /// On the adapter's input.
    pub dropout: Dropout,
}

impl<B: Backend> Lora<B> {
    /// A fresh adapter: A Kaiming-uniform as PEFT initialises it, B zero.
    fn new(d_in: usize, d_out: usize, config: &LoraConfig, device: &B::Device) -> Self {
        let bound = 1.0 / (d_in as f64).sqrt();
        let a = Tensor::random([d_in, config.rank], Distribution::Uniform(-bound, bound), device);
        Self::from_tensors(a, Tensor::zeros([config.rank, d_out], device), config)
    }

    /// a: [in, rank], b: [rank, out]
    fn from_tensors(a: Tensor<B, 2>, b: Tensor<B, 2>, config: &LoraConfig) -> Self {
        Self {
            a: Param::from_tensor(a),
            b: Param::from_tensor(b),
            scale: config.scale(),
            dropout: DropoutConfig::new(config.dropout).init(),
        }
    }

    /// The change the adapter makes to its projection's weight: scale·A·B. → [in, out]
    fn delta(&self) -> Tensor<B, 2> {
        self.a.val().matmul(self.b.val()) * self.scale
    }
}

impl<B: FusedOps> Lora<B> {
    /// The low-rank term, both products in `precision` as the base layer's.
    /// x: [rows, in] → [rows, out]
    pub fn forward(&self, x: Tensor<B, 2>, precision: Precision) -> Tensor<B, 2> {
        let x = self.dropout.forward(x);
        // The scale goes on the narrow [rows, rank] intermediate: the same product, less work.
        let low = linear(x, self.a.val(), None, precision) * self.scale; // [rows, rank]
        linear(low, self.b.val(), None, precision)
    }
}

/// `model` with fresh adapters on the targeted projections of every layer and its own weights
/// frozen (no gradient, so no optimizer state).
pub fn attach<B: Backend, M: Adaptable<B>>(model: M, adapters: Adapters, device: &B::Device) -> Result<M> {
    let fresh = |_: String, [d_in, d_out]: [usize; 2], config: &LoraConfig| Ok(Lora::new(d_in, d_out, config, device));
    attach_with(model, adapters, fresh)
}

/// Attach an adapter to every targeted projection, each made by `make(module path, [in, out],
/// config)`; a target the family does not have is refused.
fn attach_with<B: Backend, M: Adaptable<B>>(
    model: M,
    adapters: Adapters,
    mut make: impl FnMut(String, [usize; 2], &LoraConfig) -> Result<Lora<B>>,
) -> Result<M> {
    let mut model = model.no_grad();
    let family = model.family();
    for layer in 0..model.layers() {
        for &target in &adapters.config.targets {
            let Some(slot) = model.slot(layer, target) else {
                return Err(bad_input(format!("`{}` is not a projection of a {family} model", target.peft_name())));
            };
            let dims = slot.weight.val().dims();
            *slot.lora = Some(make(M::path(target, layer), dims, &adapters.config)?);
        }
    }
    model.set_adapters(Some(adapters));
    Ok(model)
}

/// The name of an adapter's tensor as a parameter (`h.0.attn.c_attn.lora.a`), as PEFT names it
/// (`…h.0.attn.c_attn.lora_A.weight`), or None for a parameter of the base.
fn peft_name<B: Backend, M: Adaptable<B>>(param: &str) -> Option<String> {
    let (module, tensor) = param.rsplit_once(".lora.")?;
    let which = match tensor {
        "a" => "A",
        "b" => "B",
        _ => return None,
    };
    Some(format!("{}{module}.lora_{which}.weight", M::PEFT_PREFIX))
}

/// The adapters' parameter count (what trains).
pub fn trainable_params<B: Backend, M: Adaptable<B>>(model: &M) -> usize {
    let tensors = super::params::tensors(model);
    tensors.iter().filter(|(name, _)| peft_name::<B, M>(name).is_some()).map(|(_, data)| data.num_elements()).sum()
}

/// The model with each adapter folded into its projection's weight (W + scale·A·B, PEFT's
/// merge) and no adapters: a plain model of its family computing what base and adapters did.
pub fn merged<B: Backend, M: Adaptable<B>>(mut model: M) -> M {
    for layer in 0..model.layers() {
        for target in ALL_TARGETS {
            let Some(slot) = model.slot(layer, target) else { continue };
            if let Some(lora) = slot.lora.take() {
                let weight = slot.weight.val() + lora.delta();
                *slot.weight = Param::from_tensor(weight);
            }
        }
    }
    model.set_adapters(None);
    model
}

/// Every projection of both families.
const ALL_TARGETS: [Target; 11] = [
    Target::CAttn,
    Target::AttnCProj,
    Target::CFc,
    Target::MlpCProj,
    Target::QProj,
    Target::KProj,
    Target::VProj,
    Target::OProj,
    Target::GateProj,
    Target::UpProj,
    Target::DownProj,
];

/// The adapters' tensors under PEFT's names, in PEFT's layout.
fn peft_tensors<B: Backend, M: Adaptable<B>>(model: &M) -> Vec<(String, TensorData)> {
    let transpose = |data: TensorData| {
        let [rows, cols] = [data.shape[0], data.shape[1]];
        let values = data.to_vec::<f32>().expect("adapters are f32");
        let out: Vec<f32> = (0..rows * cols).map(|i| values[(i % rows) * cols + i / rows]).collect();
        TensorData::new(out, [cols, rows])
    };
    super::params::tensors(model)
        .into_iter()
        .filter_map(|(name, data)| Some((peft_name::<B, M>(&name)?, transpose(data))))
        .collect()
}

/// PEFT's `adapter_config.json` for these adapters.
fn peft_config(adapters: &Adapters) -> Value {
    let config = &adapters.config;
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapters.base.name,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.targets.iter().map(|t| t.peft_name()).collect::<Vec<_>>(),
        // GPT-2's Conv1D stores weights [in, out]; the Llama family's nn.Linear [out, in].
        "fan_in_fan_out": config.targets.iter().all(|t| GPT2_TARGETS.contains(t)),
        "bias": "none",
        "use_rslora": config.rslora,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    })
}

/// Write the adapters as a PEFT adapter folder: `adapter_config.json` and `adapter_model.safetensors`.
pub fn save_peft<B: Backend, M: Adaptable<B>>(model: &M, adapters: &Adapters, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    hf::write_safetensors(&dir.join(ADAPTER_WEIGHTS_FILE), peft_tensors(model))?;
    write_atomic(&dir.join(ADAPTER_CONFIG_FILE), serde_json::to_string_pretty(&peft_config(adapters))?.as_bytes())
}

/// Write a model with adapters as a folder: `adapter/` (PEFT), `base.json` and the base's
/// architecture as `config.json` (so every command that takes a model folder takes this one).
pub fn save<B: Backend, M: Adaptable<B>>(
    model: &M,
    adapters: &Adapters,
    dir: &Path,
    eos_id: Option<usize>,
) -> Result<()> {
    save_peft(model, adapters, &dir.join(ADAPTER_DIR))?;
    write_atomic(&dir.join(BASE_FILE), serde_json::to_string_pretty(&adapters.base)?.as_bytes())?;
    model.write_config(eos_id, dir)
}

/// Whether `dir` is a model folder with adapters (as `save` writes one).
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_DIR).join(ADAPTER_CONFIG_FILE).is_file()
}

/// Read a model folder with adapters: the base from `base.json` (its files' hash checked), the
/// adapters from `adapter/`.
pub fn load<B: super::FusedOps>(dir: &Path, dropout: Option<f64>, device: &B::Device) -> Result<super::Model<B>> {
    let base = read_base(dir)?;
    let model = super::family::load::<B>(&base.path, dropout, device)
        .with_context(|| format!("{}: cannot load the base model", dir.join(BASE_FILE).display()))?;
    let (config, _) = read_peft_config(&dir.join(ADAPTER_DIR), model.config().family())?;
    let adapters = Adapters { config, base };
    match model {
        super::Model::Gpt2(m) => Ok(super::Model::Gpt2(with_peft_adapter(m, &dir.join(ADAPTER_DIR), adapters)?)),
        super::Model::Llama(m) => Ok(super::Model::Llama(with_peft_adapter(m, &dir.join(ADAPTER_DIR), adapters)?)),
    }
}

/// `model` (which has adapters) with the adapter weights of model folder `dir`, which must
/// have the same settings and base.
pub fn load_weights<B: Backend, M: Adaptable<B>>(model: M, dir: &Path) -> Result<M> {
    let adapters = model.adapters().cloned().ok_or_else(|| {
        bad_input(format!("{}: holds LoRA adapters, and the model they would go on has none", dir.display()))
    })?;
    let (config, _) = read_peft_config(&dir.join(ADAPTER_DIR), model.family())?;
    if config != adapters.config || read_base(dir)? != adapters.base {
        return Err(bad_input(format!("{}: its adapters' settings or base differ from the model's", dir.display())));
    }
    with_peft_adapter(without_adapters(model), &dir.join(ADAPTER_DIR), adapters)
}

/// The model without its adapters (the base, still frozen).
fn without_adapters<B: Backend, M: Adaptable<B>>(mut model: M) -> M {
    for layer in 0..model.layers() {
        for target in ALL_TARGETS {
            if let Some(slot) = model.slot(layer, target) {
                *slot.lora = None;
            }
        }
    }
    model.set_adapters(None);
    model
}

/// The base reference of a model folder with adapters, checked against the base's files.
fn read_base(dir: &Path) -> Result<BaseModel> {
    let path = dir.join(BASE_FILE);
    let text =
        std::fs::read_to_string(&path).map_err(|e| bad_input(format!("{}: cannot read: {e}", path.display())))?;
    let base: BaseModel =
        serde_json::from_str(&text).map_err(|e| bad_input(format!("{}: not a base reference: {e}", path.display())))?;
    let now = hf::sha256(&base.path).map_err(|e| {
        bad_input(format!("{}: the base model {} cannot be read: {e:#}", path.display(), base.path.display()))
    })?;
    if now != base.sha256 {
        return Err(bad_input(format!(
            "{}: the base model {} has changed since the adapters were trained on it (SHA-256 {now}, recorded {})",
            path.display(),
            base.path.display(),
            base.sha256
        )));
    }
    Ok(base)
}

/// `model` (a plain model) with the adapters of the PEFT folder `peft_dir` (written by pipe or
/// by PEFT itself, as `lora.from` reads one), under the settings of `adapters`: every targeted
/// projection of every layer must have its two tensors, with the projection's shapes, and the
/// file no other tensors.
pub fn with_peft_adapter<B: Backend, M: Adaptable<B>>(model: M, peft_dir: &Path, adapters: Adapters) -> Result<M> {
    let path = peft_dir.join(ADAPTER_WEIGHTS_FILE);
    if !path.is_file() && peft_dir.join("adapter_model.bin").is_file() {
        return Err(bad_input(format!(
            "{}: pipe reads adapters saved as safetensors (PEFT's default; `save_pretrained(..., safe_serialization=True)`)",
            peft_dir.display()
        )));
    }
    let mut file = TensorFile::read(&path)?;
    let device = model.devices().into_iter().next().unwrap_or_default();
    let rank = adapters.config.rank;
    let settings = || {
        let targets: Vec<&str> = adapters.config.targets.iter().map(|t| t.peft_name()).collect();
        let config = peft_dir.join(ADAPTER_CONFIG_FILE);
        format!("as {} sets them: r = {rank}, target_modules = {}", config.display(), targets.join(", "))
    };
    let model = attach_with(model, adapters.clone(), |path, [d_in, d_out], config| {
        let name = format!("{}{path}", M::PEFT_PREFIX);
        let a = file.take_named(&format!("{name}.lora_A.weight"), &[rank, d_in]).with_context(settings)?;
        let b = file.take_named(&format!("{name}.lora_B.weight"), &[d_out, rank]).with_context(settings)?;
        // Laid out as a fresh adapter's ([in, rank], [rank, out], row-major), not as views of
        // PEFT's: the products then run the same kernels in the same order, and a run resumed
        // from a checkpoint computes what it would have computed going on.
        let a = Tensor::<B, 2>::from_data(super::params::transposed(a), &device);
        let b = Tensor::<B, 2>::from_data(super::params::transposed(b), &device);
        Ok(Lora::from_tensors(a, b, config))
    })?;
    let mut unexpected: Vec<String> = file.names().map(|n| format!("`{n}`")).collect();
    if !unexpected.is_empty() {
        unexpected.sort();
        return Err(bad_input(format!(
            "{}: tensors that are not adapters of the targeted projections of this {}-layer model (`target_modules` = {} in {}): {}",
            path.display(),
            model.layers(),
            adapters.config.targets.iter().map(|t| t.peft_name()).collect::<Vec<_>>().join(", "),
            peft_dir.join(ADAPTER_CONFIG_FILE).display(),
            unexpected.join(", ")
        )));
    }
    Ok(model)
}

/// The settings of PEFT folder `dir` and its `base_model_name_or_path`. Every PEFT setting that
/// would change the arithmetic is either implemented or refused, naming the key.
/// `family` is the base model's, whose projections `target_modules` must name.
pub fn read_peft_config(dir: &Path, family: &str) -> Result<(LoraConfig, String)> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| bad_input(format!("{}: cannot read the adapter config: {e}", path.display())))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| bad_input(format!("{}: not valid JSON: {e}", path.display())))?;
    let refuse = |key: &str, why: &str| {
        let found = value.get(key).map_or("missing".to_string(), |v| v.to_string());
        bad_input(format!("{}: `{key}` = {found}: {why}", path.display()))
    };
    if value.get("peft_type").and_then(Value::as_str) != Some("LORA") {
        return Err(refuse("peft_type", "pipe loads LoRA adapters (`LORA`) only"));
    }
    let rank = value.get("r").and_then(Value::as_u64).filter(|&r| r > 0);
    let rank = rank.ok_or_else(|| refuse("r", "must be an integer ≥ 1"))? as usize;
    let alpha = value.get("lora_alpha").and_then(Value::as_f64).filter(|a| a.is_finite() && *a > 0.0);
    let alpha = alpha.ok_or_else(|| refuse("lora_alpha", "must be a number > 0"))?;
    let dropout = match value.get("lora_dropout") {
        None | Some(Value::Null) => 0.0,
        Some(v) => v
            .as_f64()
            .filter(|p| (0.0..1.0).contains(p))
            .ok_or_else(|| refuse("lora_dropout", "must be a probability in [0, 1)"))?,
    };
    let names: Vec<String> = match value.get("target_modules") {
        Some(Value::Array(names)) => names
            .iter()
            .map(|n| n.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| refuse("target_modules", "must be a list of module names"))?,
        Some(Value::String(name)) if name == "all-linear" => vec![name.clone()],
        _ => {
            return Err(refuse(
                "target_modules",
                "pipe reads a list of module names or \"all-linear\" (not a regular expression)",
            ))
        }
    };
    let targets = Target::parse_list(&names, family).map_err(|why| refuse("target_modules", &why))?;
    let flag = |key: &str| value.get(key).and_then(Value::as_bool).unwrap_or(false);
    let rslora = flag("use_rslora");
    // Every other key must hold its default (null, false, empty, "none") unless it is one that
    // only matters when adapters are created or saved, not to what a loaded one computes.
    let is_default = |v: &Value| match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s == "none",
        _ => false,
    };
    const READ: [&str; 6] = ["peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora"];
    const NO_EFFECT_ON_A_LOADED_ADAPTER: [&str; 17] = [
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "init_lora_weights",
        "peft_version",
        "auto_mapping",
        "fan_in_fan_out", // the layout of the base's weights, which pipe knows
        "megatron_core",
        "megatron_config",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "kasa_config",
        "qalora_group_size", // read only with use_qalora
        "ensure_weight_tying",
    ];
    let object = value.as_object().ok_or_else(|| bad_input(format!("{}: not a JSON object", path.display())))?;
    let mut unsupported: Vec<&String> = object
        .iter()
        .filter(|(key, v)| {
            !READ.contains(&key.as_str()) && !NO_EFFECT_ON_A_LOADED_ADAPTER.contains(&key.as_str()) && !is_default(v)
        })
        .map(|(key, _)| key)
        .collect();
    if let Some(key) = unsupported.pop() {
        return Err(refuse(key, "pipe implements plain LoRA (rank, alpha, dropout, targets, rsLoRA); this setting would change what the adapter computes"));
    }
    let base_name = value.get("base_model_name_or_path").and_then(Value::as_str).unwrap_or_default().to_string();
    Ok((LoraConfig { rank, alpha, dropout, targets, rslora }, base_name))
}
