//! HuggingFace directories of the Llama family in and out: `config.json` read field by field
//! (every field that changes the arithmetic implemented or refused), the weights from one
//! safetensors file or several (`model.safetensors.index.json`) in f32, f16 or bf16, and the
//! model written back as transformers loads it.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::TensorData;
use serde_json::{json, Value};

use super::hf::{
    check_stored, weight_files, write_safetensors, TensorFile, CONFIG_FILE, GENERATION_CONFIG_FILE, WEIGHTS_FILE,
};
use super::llama::{Llama, LlamaConfig, RopeScaling, Variant};
use super::params::{self, transposed};
use crate::error::bad_input;
use crate::files::write_atomic;

/// Read the architecture of a model of `variant` from its parsed `config.json` at `path`.
pub fn read_config(path: &Path, value: &Value, variant: Variant) -> Result<LlamaConfig> {
    let refuse =
        |key: &str, found: &Value, why: &str| bad_input(format!("{}: `{key}` = {found}: {why}", path.display()));
    let present = |key: &str| value.get(key).filter(|v| !v.is_null());
    let size = |key: &str, default: Option<usize>| -> Result<usize> {
        match present(key) {
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| refuse(key, v, "must be an integer ≥ 1")),
            None => default.ok_or_else(|| bad_input(format!("{}: field `{key}` is missing", path.display()))),
        }
    };
    let number = |key: &str, default: f64, ok: fn(f64) -> bool, what: &str| -> Result<f64> {
        match present(key) {
            None => Ok(default),
            Some(v) => v.as_f64().filter(|&x| x.is_finite() && ok(x)).ok_or_else(|| refuse(key, v, what)),
        }
    };
    let flag = |key: &str, default: bool| -> Result<bool> {
        match present(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| refuse(key, v, "must be true or false")),
        }
    };

    if let Some(act) = present("hidden_act") {
        if act != "silu" {
            return Err(refuse("hidden_act", act, "pipe's MLP is SwiGLU with SiLU (`silu`) only"));
        }
    }
    if flag("use_sliding_window", false)? {
        return Err(refuse(
            "use_sliding_window",
            &Value::Bool(true),
            "pipe does not implement sliding-window attention",
        ));
    }
    let layer_types = present("layer_types");
    if let Some(types) = layer_types {
        let full = types.as_array().is_some_and(|t| t.iter().all(|t| t == "full_attention"));
        if !full {
            return Err(refuse("layer_types", types, "pipe implements full attention in every layer only"));
        }
    }
    if let Some(tp) = present("pretraining_tp") {
        if tp.as_u64() != Some(1) {
            return Err(refuse("pretraining_tp", tp, "pipe computes the projections whole (1)"));
        }
    }
    let (hidden_size, heads) = (size("hidden_size", None)?, size("num_attention_heads", None)?);
    // transformers' defaults where a field is absent: Llama's key/value heads are its heads,
    // Qwen's are 32; Qwen3's heads are 128 wide, the others' hidden_size / heads.
    let kv_default = if variant == Variant::Llama { heads } else { 32 };
    let kv_heads = size("num_key_value_heads", Some(kv_default))?;
    if heads % kv_heads != 0 {
        return Err(refuse(
            "num_key_value_heads",
            &json!(kv_heads),
            &format!("does not divide num_attention_heads = {heads}"),
        ));
    }
    let head_default = match variant {
        Variant::Qwen3 => 128,
        _ if hidden_size % heads != 0 => {
            return Err(refuse(
                "num_attention_heads",
                &json!(heads),
                &format!("does not divide hidden_size = {hidden_size}"),
            ))
        }
        _ => hidden_size / heads,
    };
    let head_dim = size("head_dim", Some(head_default))?;
    if head_dim % 2 != 0 {
        return Err(refuse("head_dim", &json!(head_dim), "rotary embeddings need an even head_dim"));
    }
    // The RoPE settings, as transformers 4 writes them (`rope_theta`, `rope_scaling`) or 5
    // (`rope_parameters`, holding both). transformers 5 lets a `rope_scaling` beside
    // `rope_parameters` override it, which a reader of the file would not guess: two that
    // disagree are refused.
    if let (Some(parameters), Some(scaling)) = (present("rope_parameters"), present("rope_scaling")) {
        if parameters != scaling {
            return Err(refuse(
                "rope_scaling",
                scaling,
                &format!("disagrees with `rope_parameters` = {parameters}; a config should say its RoPE once"),
            ));
        }
    }
    let rope = present("rope_parameters").or(present("rope_scaling"));
    for (key, factor) in [
        ("partial_rotary_factor", present("partial_rotary_factor")),
        ("rope_parameters.partial_rotary_factor", rope.and_then(|r| r.get("partial_rotary_factor"))),
    ] {
        if let Some(factor) = factor.filter(|f| f.as_f64() != Some(1.0)) {
            return Err(refuse(key, factor, "pipe rotates every dimension of each head (1.0)"));
        }
    }
    let theta_in = |v: Option<&Value>, key: &str| -> Result<Option<f64>> {
        match v {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|&x| x.is_finite() && x > 0.0)
                .map(Some)
                .ok_or_else(|| refuse(key, v, "must be a number > 0")),
        }
    };
    let rope_theta = match theta_in(rope.and_then(|r| r.get("rope_theta")), "rope_parameters.rope_theta")? {
        Some(theta) => theta,
        None => theta_in(present("rope_theta"), "rope_theta")?.unwrap_or(10_000.0),
    };
    let rope_scaling = match rope {
        None => None,
        Some(rope) => rope_scaling(rope).map_err(|why| {
            let key = if present("rope_parameters").is_some() { "rope_parameters" } else { "rope_scaling" };
            refuse(key, rope, &why)
        })?,
    };
    let qkv_default = variant == Variant::Qwen2;
    let attention_bias = match variant {
        Variant::Qwen2 => None,
        _ => Some(flag("attention_bias", false)?),
    };
    let mlp_bias = match variant {
        Variant::Llama => flag("mlp_bias", false)?,
        _ => false,
    };
    let attention_dropout =
        number("attention_dropout", 0.0, |p| (0.0..1.0).contains(&p), "must be a probability in [0, 1)")?;
    // Special-token ids are written back on export: one that is not an id is refused, not dropped.
    let token_id = |key: &str, v: &Value| {
        v.as_u64().map(|n| n as usize).ok_or_else(|| refuse(key, v, "must be a token id (an integer ≥ 0) or null"))
    };
    let bos_token_id = present("bos_token_id").map(|v| token_id("bos_token_id", v)).transpose()?;
    let eos_token_ids = match present("eos_token_id") {
        Some(Value::Array(ids)) => ids.iter().map(|id| token_id("eos_token_id", id)).collect::<Result<_>>()?,
        Some(id) => vec![token_id("eos_token_id", id)?],
        None => Vec::new(),
    };
    let config = LlamaConfig {
        variant,
        bos_token_id,
        eos_token_ids,
        vocab_size: size("vocab_size", None)?,
        hidden_size,
        intermediate_size: size("intermediate_size", None)?,
        num_hidden_layers: size("num_hidden_layers", None)?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        max_position_embeddings: size("max_position_embeddings", Some(2048))?,
        rms_norm_eps: number("rms_norm_eps", 1e-6, |e| e > 0.0, "must be a number > 0")?,
        rope_theta,
        rope_scaling,
        tie_word_embeddings: flag("tie_word_embeddings", false)?,
        qkv_bias: attention_bias.unwrap_or(qkv_default),
        o_bias: attention_bias.unwrap_or(false),
        mlp_bias,
        qk_norm: variant == Variant::Qwen3,
        attention_dropout,
        initializer_range: number("initializer_range", 0.02, |r| r >= 0.0, "must be a number ≥ 0")?,
    };
    if let Some(types) = layer_types.and_then(Value::as_array) {
        if types.len() != config.num_hidden_layers {
            let why = format!("lists {} layers, not num_hidden_layers = {}", types.len(), config.num_hidden_layers);
            return Err(refuse("layer_types", &json!(types), &why));
        }
    }
    if config.checked_num_params().is_none() {
        return Err(bad_input(format!("{}: more parameters than can be counted", path.display())));
    }
    Ok(config)
}

/// A `rope_scaling` (or `rope_parameters`) object: None for the default rotation, the
/// scaling pipe implements, or why it is refused.
fn rope_scaling(rope: &Value) -> std::result::Result<Option<RopeScaling>, String> {
    let kind = match rope.get("rope_type").or(rope.get("type")) {
        None | Some(Value::Null) => "default",
        Some(kind) => kind.as_str().ok_or_else(|| format!("`rope_type` must be a string, found {kind}"))?,
    };
    let number = |key: &str| -> std::result::Result<f64, String> {
        rope.get(key)
            .and_then(Value::as_f64)
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| format!("`{key}` must be a number > 0 for rope_type \"{kind}\""))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear { factor: number("factor")? })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: rope
                .get("original_max_position_embeddings")
                .and_then(Value::as_f64)
                .filter(|x| *x >= 1.0 && x.fract() == 0.0)
                .map(|x| x as usize)
                .ok_or_else(|| {
                    format!("`original_max_position_embeddings` must be an integer ≥ 1 for rope_type \"{kind}\"")
                })?,
        })),
        other => Err(format!("rope_type \"{other}\" is not implemented; pipe implements default, linear and llama3")),
    }
}

/// Whether a parameter is a linear layer's weight, kept `[in, out]` but stored `[out, in]`.
fn is_linear_weight(name: &str) -> bool {
    name.ends_with("_proj.weight") || name == "lm_head.weight"
}

/// The tensors that pin every size in the config (vocabulary, width, depth).
pub fn check_sizes(config: &LlamaConfig, dir: &Path) -> Result<()> {
    let (last, width) = (config.num_hidden_layers - 1, config.hidden_size);
    check_stored(
        dir,
        &[
            (vec!["model.embed_tokens.weight".into()], vec![config.vocab_size, width]),
            (vec![format!("model.layers.{last}.input_layernorm.weight")], vec![width]),
        ],
    )
}

/// Load a model of architecture `config` from HF folder `dir`, its sizes checked against the
/// weights before the model is allocated (a config far larger than its weights would otherwise
/// exhaust memory first).
pub fn load<B: Backend>(config: LlamaConfig, dir: &Path, device: &B::Device) -> Result<Llama<B>> {
    check_sizes(&config, dir)?;
    let files = read_weights(dir)?;
    fill(config.init(device), dir, files)
}

/// `model` with the weights of HF folder `dir`, which holds a model of the same architecture;
/// the model's own settings (precision, dropout) stay.
pub fn load_weights<B: Backend>(model: Llama<B>, dir: &Path) -> Result<Llama<B>> {
    let files = read_weights(dir)?;
    fill(model, dir, files)
}

fn read_weights(dir: &Path) -> Result<Vec<TensorFile>> {
    weight_files(dir)?.iter().map(|path| TensorFile::read(path)).collect()
}

/// The tensor `name` [shape] from whichever of `files` holds it (transposed from HF's layout
/// for a linear weight).
fn take(files: &mut [TensorFile], dir: &Path, name: &str, shape: &[usize]) -> Result<TensorData> {
    let linear = is_linear_weight(name);
    let stored = if linear { vec![shape[1], shape[0]] } else { shape.to_vec() };
    let Some(file) = files.iter_mut().find(|f| f.names().any(|n| n == name)) else {
        return Err(bad_input(format!("{}: tensor `{name}` is missing", dir.display())));
    };
    let data = file.take_named(name, &stored)?;
    Ok(if linear { transposed(data) } else { data })
}

/// Every parameter of `model` from `files`, which must hold no other tensors (a stored copy of
/// a tied LM head is allowed).
fn fill<B: Backend>(model: Llama<B>, dir: &Path, mut files: Vec<TensorFile>) -> Result<Llama<B>> {
    let model = params::load(model, |name, shape| take(&mut files, dir, name, shape))?;
    let tied = model.config.tie_word_embeddings;
    let mut unexpected: Vec<&String> =
        files.iter().flat_map(|f| f.names()).filter(|n| !(tied && *n == "lm_head.weight")).collect();
    if !unexpected.is_empty() {
        unexpected.sort();
        return Err(bad_input(format!(
            "{}: unexpected tensors for this {}-layer {} model: {}",
            dir.display(),
            model.config.num_hidden_layers,
            model.config.variant.model_type(),
            unexpected.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(model)
}

/// The `config.json` transformers' class for `config.variant` reads back as `config`.
fn config_json(config: &LlamaConfig, eos_ids: &[usize]) -> Value {
    let bos_id = config.bos_token_id;
    let mut value = json!({
        "architectures": [config.variant.architecture()],
        "model_type": config.variant.model_type(),
        "hidden_act": "silu",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_dropout": config.attention_dropout,
        "initializer_range": config.initializer_range,
        "bos_token_id": bos_id,
        "eos_token_id": eos_ids_value(eos_ids),
        "torch_dtype": "float32",
    });
    let object = value.as_object_mut().expect("an object");
    match config.variant {
        Variant::Llama => {
            object.insert("attention_bias".into(), json!(config.qkv_bias));
            object.insert("mlp_bias".into(), json!(config.mlp_bias));
        }
        Variant::Qwen2 => {
            object.insert("use_sliding_window".into(), json!(false));
        }
        Variant::Qwen3 => {
            object.insert("attention_bias".into(), json!(config.qkv_bias));
            object.insert("use_sliding_window".into(), json!(false));
        }
    }
    let scaling = match &config.rope_scaling {
        None => Value::Null,
        Some(RopeScaling::Linear { factor }) => json!({"rope_type": "linear", "factor": factor}),
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
            json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position_embeddings,
            })
        }
    };
    object.insert("rope_scaling".into(), scaling);
    value
}

fn eos_ids_value(eos_ids: &[usize]) -> Value {
    match eos_ids {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    }
}

/// Write a HF folder transformers loads: config.json, generation_config.json and
/// model.safetensors (f32, HF names and layouts), each atomically; a model with adapters is
/// written as their folder. `eos_id`, the tokenizer's end-of-text id, joins the config's
/// end-of-sequence ids.
pub fn save<B: Backend>(model: &Llama<B>, eos_id: Option<usize>, dir: &Path) -> Result<()> {
    if let Some(adapters) = &model.adapters {
        return super::lora::save(model, adapters, dir, eos_id);
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_safetensors(&dir.join(WEIGHTS_FILE), hf_tensors(model))?;
    write_config(&model.config, eos_id, dir)
}

/// The weights as a HF checkpoint of the family holds them: f32, HF's names, linear weights
/// `[out, in]`.
pub fn hf_tensors<B: Backend>(model: &Llama<B>) -> Vec<(String, TensorData)> {
    params::tensors(model)
        .into_iter()
        .map(|(name, data)| {
            let data = if is_linear_weight(&name) { transposed(data) } else { data };
            (name, data)
        })
        .collect()
}

/// Write `config.json` and `generation_config.json` for this architecture.
pub fn write_config(config: &LlamaConfig, eos_id: Option<usize>, dir: &Path) -> Result<()> {
    let mut eos_ids = config.eos_token_ids.clone();
    if let Some(id) = eos_id.filter(|id| !eos_ids.contains(id)) {
        eos_ids.insert(0, id);
    }
    let text = serde_json::to_string_pretty(&config_json(config, &eos_ids))?;
    write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())?;
    let generation = json!({"bos_token_id": config.bos_token_id, "eos_token_id": eos_ids_value(&eos_ids)});
    write_atomic(&dir.join(GENERATION_CONFIG_FILE), serde_json::to_string_pretty(&generation)?.as_bytes())
}
