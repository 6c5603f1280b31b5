//! The model families pipe has, behind one type: [`Model`] is a GPT-2 or a Llama-family model,
//! and [`read_config`] is the one place a checkpoint's `config.json` (`model_type`,
//! `architectures`) is mapped to its family. Everything above the model floor holds a `Model`
//! and asks it through [`CausalLm`].

use std::path::Path;

use anyhow::Result;
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use serde_json::Value;

use super::gpt2::{Gpt2, Gpt2Config, Precision};
use super::hf::{self, CONFIG_FILE};
use super::kv_cache::KvCache;
use super::llama::{Llama, LlamaConfig, Variant};
use super::{llama_hf, lora, Bf16Decoder, CausalLm, FusedOps, Packing};
use crate::error::bad_input;

/// A model of one of pipe's families.
// The variants' sizes are their configs' (the weights are behind pointers); a run holds one.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Model<B: Backend> {
    Gpt2(Gpt2<B>),
    Llama(Llama<B>),
}

/// The architecture of a model of one of pipe's families.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Gpt2(Gpt2Config),
    Llama(LlamaConfig),
}

impl ModelConfig {
    /// The family's name as the user writes it (`model.family`) and `config.json`'s
    /// `model_type` says it.
    pub fn family(&self) -> &'static str {
        match self {
            ModelConfig::Gpt2(_) => "gpt2",
            ModelConfig::Llama(c) => c.variant.model_type(),
        }
    }

    pub fn layers(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_layer,
            ModelConfig::Llama(c) => c.num_hidden_layers,
        }
    }

    /// The residual stream's width.
    pub fn width(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_embd,
            ModelConfig::Llama(c) => c.hidden_size,
        }
    }

    pub fn heads(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_head,
            ModelConfig::Llama(c) => c.num_attention_heads,
        }
    }

    pub fn kv_heads(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_head,
            ModelConfig::Llama(c) => c.num_key_value_heads,
        }
    }

    pub fn head_dim(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.head_dim(),
            ModelConfig::Llama(c) => c.head_dim,
        }
    }

    /// The MLP's hidden width.
    pub fn inner(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => 4 * c.n_embd,
            ModelConfig::Llama(c) => c.intermediate_size,
        }
    }

    /// The positions the model attends over.
    pub fn context(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_positions,
            ModelConfig::Llama(c) => c.max_position_embeddings,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.vocab_size,
            ModelConfig::Llama(c) => c.vocab_size,
        }
    }

    /// Parameter count (a tied LM head counted once).
    pub fn num_params(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.num_params(),
            ModelConfig::Llama(c) => c.num_params(),
        }
    }

    /// The parameter count, or None when it does not fit in a `usize`.
    pub fn checked_num_params(&self) -> Option<usize> {
        match self {
            ModelConfig::Gpt2(c) => c.checked_num_params(),
            ModelConfig::Llama(c) => c.checked_num_params(),
        }
    }

    /// The dropout on attention probabilities while training.
    pub fn attention_dropout(&self) -> f64 {
        match self {
            ModelConfig::Gpt2(c) => c.attn_pdrop,
            ModelConfig::Llama(c) => c.attention_dropout,
        }
    }

    /// The same dropout probability everywhere the family has one (what `model.dropout` sets).
    pub fn with_dropout(self, p: f64) -> Self {
        match self {
            ModelConfig::Gpt2(c) => ModelConfig::Gpt2(c.with_dropout(p)),
            ModelConfig::Llama(c) => ModelConfig::Llama(LlamaConfig { attention_dropout: p, ..c }),
        }
    }

    /// A freshly initialised model of this architecture, as its family initialises one.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Model<B> {
        match self {
            ModelConfig::Gpt2(c) => Model::Gpt2(c.init(device)),
            ModelConfig::Llama(c) => Model::Llama(c.init(device)),
        }
    }
}

/// Read the architecture of the HF model folder `dir`: its family from `config.json`'s
/// `model_type` (or, where that is absent, `architectures`), then the family's own fields.
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join(CONFIG_FILE);
    if !dir.is_dir() {
        return Err(bad_input(format!("model directory {} does not exist", dir.display())));
    }
    let text = crate::files::read_regular_to_string(&path)?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| bad_input(format!("{}: not valid JSON: {e}", path.display())))?;
    let from_architectures = || {
        let names = value.get("architectures")?.as_array()?;
        names.iter().filter_map(Value::as_str).find_map(|name| match name {
            "GPT2LMHeadModel" | "GPT2Model" => Some("gpt2"),
            "LlamaForCausalLM" => Some("llama"),
            "Qwen2ForCausalLM" => Some("qwen2"),
            "Qwen3ForCausalLM" => Some("qwen3"),
            _ => None,
        })
    };
    let family = match value.get("model_type") {
        Some(Value::String(kind)) => kind.as_str(),
        Some(other) => return Err(bad_input(format!("{}: `model_type` = {other}: must be a string", path.display()))),
        // GPT-2 checkpoints written before `model_type` existed name neither.
        None => from_architectures().unwrap_or("gpt2"),
    };
    let config = match family {
        "gpt2" => ModelConfig::Gpt2(hf::gpt2_config(&path, &value)?),
        "llama" => ModelConfig::Llama(llama_hf::read_config(&path, &value, Variant::Llama)?),
        "qwen2" => ModelConfig::Llama(llama_hf::read_config(&path, &value, Variant::Qwen2)?),
        "qwen3" => ModelConfig::Llama(llama_hf::read_config(&path, &value, Variant::Qwen3)?),
        other => {
            return Err(bad_input(format!(
                "{}: `model_type` = \"{other}\": pipe loads gpt2, llama, qwen2 and qwen3 checkpoints",
                path.display()
            )))
        }
    };
    Ok(config)
}

impl<B: Backend> Model<B> {
    pub fn config(&self) -> ModelConfig {
        match self {
            Model::Gpt2(m) => ModelConfig::Gpt2(m.config.clone()),
            Model::Llama(m) => ModelConfig::Llama(m.config.clone()),
        }
    }

    /// The model's LoRA adapters, if it carries them.
    pub fn adapters(&self) -> Option<&lora::Adapters> {
        match self {
            Model::Gpt2(m) => m.adapters.as_ref(),
            Model::Llama(m) => m.adapters.as_ref(),
        }
    }

    /// The weights as a HF checkpoint of its family holds them (f32, HF's names and layouts),
    /// for a model without adapters (merge them first).
    pub fn hf_tensors(&self) -> Vec<(String, burn::tensor::TensorData)> {
        debug_assert!(self.adapters().is_none(), "adapters are merged before their weights are named as HF's");
        match self {
            Model::Gpt2(m) => hf::hf_tensors(m),
            Model::Llama(m) => llama_hf::hf_tensors(m),
        }
    }

    /// The same model with its LoRA adapters folded into the weights it adapts (unchanged
    /// without adapters).
    pub fn merged(self) -> Self {
        match self {
            Model::Gpt2(m) if m.adapters.is_some() => Model::Gpt2(lora::merged(m)),
            Model::Llama(m) if m.adapters.is_some() => Model::Llama(lora::merged(m)),
            plain => plain,
        }
    }
}

impl<B: FusedOps> CausalLm<B> for Model<B> {
    type Cache = KvCache<B>;

    fn context(&self) -> usize {
        match self {
            Model::Gpt2(m) => m.context(),
            Model::Llama(m) => m.config.max_position_embeddings,
        }
    }

    fn vocab_size(&self) -> usize {
        match self {
            Model::Gpt2(m) => m.vocab_size(),
            Model::Llama(m) => m.config.vocab_size,
        }
    }

    fn num_params(&self) -> usize {
        match self {
            Model::Gpt2(m) => CausalLm::num_params(m),
            Model::Llama(m) if m.adapters.is_some() => lora::trainable_params(m),
            Model::Llama(m) => m.config.num_params(),
        }
    }

    fn position_cost_in_keys(&self) -> usize {
        match self {
            Model::Gpt2(m) => m.config.position_cost_in_keys(),
            Model::Llama(m) => m.config.position_cost_in_keys(),
        }
    }

    fn nll_at(
        &self,
        inputs: Tensor<B, 2, Int>,
        targets: Tensor<B, 2, Int>,
        packing: Option<Packing<B>>,
        at: Option<Tensor<B, 1, Int>>,
    ) -> Tensor<B, 1> {
        match self {
            Model::Gpt2(m) => m.nll_at(inputs, targets, packing, at),
            Model::Llama(m) => m.nll_at(inputs, targets, packing, at),
        }
    }

    fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.config().layers())
    }

    fn cached(cache: &KvCache<B>) -> usize {
        cache.seen()
    }

    fn next_logits(&self, tokens: Tensor<B, 2, Int>, cache: &mut KvCache<B>) -> Tensor<B, 2> {
        match self {
            Model::Gpt2(m) => m.next_logits(tokens, cache),
            Model::Llama(m) => m.next_logits(tokens, cache),
        }
    }

    fn with_precision(self, precision: Precision) -> Self {
        match self {
            Model::Gpt2(m) => Model::Gpt2(Gpt2 { precision, ..m }),
            Model::Llama(m) => Model::Llama(Llama { precision, ..m }),
        }
    }

    fn bf16_decoder(&self) -> Bf16Decoder {
        match self {
            Model::Gpt2(m) => m.bf16_decoder(),
            Model::Llama(m) => Bf16Decoder::of_llama(m),
        }
    }

    fn save(&self, dir: &Path, eos_id: Option<usize>) -> Result<()> {
        match self {
            Model::Gpt2(m) => m.save(dir, eos_id),
            Model::Llama(m) => llama_hf::save(m, eos_id, dir),
        }
    }

    fn load(dir: &Path, dropout: Option<f64>, device: &B::Device) -> Result<Self> {
        if lora::is_adapter_dir(dir) {
            return lora::load(dir, dropout, device);
        }
        load(dir, dropout, device)
    }

    fn with_weights_of(self, dir: &Path) -> Result<Self> {
        match self {
            Model::Gpt2(m) => Ok(Model::Gpt2(m.with_weights_of(dir)?)),
            Model::Llama(m) if lora::is_adapter_dir(dir) => Ok(Model::Llama(lora::load_weights(m, dir)?)),
            Model::Llama(m) => Ok(Model::Llama(llama_hf::load_weights(m, dir)?)),
        }
    }
}

/// Check that the weights in HF folder `dir` have the sizes `config` says, reading their
/// headers only: before memory is counted for a config far larger than its weights.
pub fn check_sizes(config: &ModelConfig, dir: &Path) -> Result<()> {
    match config {
        ModelConfig::Gpt2(c) => hf::check_sizes(c, dir),
        ModelConfig::Llama(c) => llama_hf::check_sizes(c, dir),
    }
}

/// Read a model of any family from the HF folder `dir`; `dropout` replaces the folder's
/// dropout probabilities. The tensors that pin the config's sizes are checked against the
/// weights before the model is allocated.
pub fn load<B: Backend>(dir: &Path, dropout: Option<f64>, device: &B::Device) -> Result<Model<B>> {
    let config = match (read_config(dir)?, dropout) {
        (config, Some(p)) => config.with_dropout(p),
        (config, None) => config,
    };
    match config {
        ModelConfig::Gpt2(config) => Ok(Model::Gpt2(hf::load_with(config, dir, device)?)),
        ModelConfig::Llama(config) => Ok(Model::Llama(llama_hf::load(config, dir, device)?)),
    }
}
