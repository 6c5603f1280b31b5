//! HuggingFace GPT-2 directories in and out: `config.json` and `model.safetensors` with HF's
//! tensor names (Conv1D weights stored `[in, out]`, the LM head tied to `wte` and not stored),
//! and model names resolved through the HuggingFace hub cache.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::TensorData;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

use super::family::ModelConfig;
use super::gpt2::{Gpt2, Gpt2Config};
use super::params;
use crate::error::bad_input;
use crate::files::{hash_files, write_atomic};

/// The files a HF GPT-2 directory holds that pipe reads or writes.
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
/// A sharded checkpoint's list of which file holds each tensor.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// What transformers' `GPT2LMHeadModel` puts before the module paths of the GPT-2 body.
const PREFIX: &str = "transformer.";

/// GPT-2's `<|endoftext|>`, its BOS and EOS.
const GPT2_EOS_ID: usize = 50256;

/// `config.json` settings that change GPT-2's arithmetic in ways pipe does not implement, with
/// the one value pipe computes: any other value is refused rather than silently ignored.
/// (docs/fidelity.md, "Loading HuggingFace GPT-2 checkpoints", lists every field of `GPT2Config`.)
fn fixed_settings() -> [(&'static str, serde_json::Value, &'static str); 6] {
    use serde_json::Value::Bool;
    [
        ("scale_attn_weights", Bool(true), "pipe always scales attention scores by 1/sqrt(head_dim)"),
        ("scale_attn_by_inverse_layer_idx", Bool(false), "pipe does not scale attention by the layer index"),
        ("reorder_and_upcast_attn", Bool(false), "pipe does not implement the reordered, upcast attention"),
        ("tie_word_embeddings", Bool(true), "pipe's LM head is tied to the token embedding"),
        ("add_cross_attention", Bool(false), "pipe's GPT-2 has no cross-attention"),
        ("is_encoder_decoder", Bool(false), "pipe's GPT-2 is a decoder only"),
    ]
}

/// GPT-2's architecture from its parsed `config.json` at `path`. Every field of transformers'
/// `GPT2Config` that changes the model's arithmetic is either read and implemented or, when it
/// asks for something pipe does not compute, refused naming the key and the value; fields that
/// do not (generation settings, labels, the summary head of `GPT2DoubleHeadsModel`) are ignored.
pub fn gpt2_config(path: &Path, value: &serde_json::Value) -> Result<Gpt2Config> {
    let refuse = |key: &str, found: &serde_json::Value, why: &str| {
        bad_input(format!("{}: `{key}` = {found}: {why}", path.display()))
    };
    let size = |name: &str| -> Result<usize> {
        match value.get(name) {
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| refuse(name, v, "must be an integer ≥ 1")),
            None => Err(bad_input(format!("{}: field `{name}` is missing", path.display()))),
        }
    };
    // A number in `range` (checked by `ok`), or `default` when the key is absent or null.
    let number = |name: &str, default: f64, ok: fn(f64) -> bool, what: &str| -> Result<f64> {
        match value.get(name) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v.as_f64().filter(|&x| x.is_finite() && ok(x)).ok_or_else(|| refuse(name, v, what)),
        }
    };
    if let Some(act) = value.get("activation_function") {
        if act != "gelu_new" && act != "gelu_pytorch_tanh" {
            return Err(refuse("activation_function", act, "pipe implements GPT-2's tanh GELU (`gelu_new`) only"));
        }
    }
    for (key, wanted, why) in fixed_settings() {
        if let Some(found) = value.get(key) {
            if *found != wanted {
                return Err(refuse(key, found, why));
            }
        }
    }
    let (n_embd, n_head) = (size("n_embd")?, size("n_head")?);
    if n_embd % n_head != 0 {
        return Err(refuse("n_head", &value["n_head"], &format!("does not divide n_embd = {n_embd}")));
    }
    if let Some(inner) = value.get("n_inner").filter(|v| !v.is_null()) {
        if inner.as_u64() != Some(4 * n_embd as u64) {
            return Err(refuse("n_inner", inner, &format!("pipe's MLP is 4·n_embd = {} wide (null)", 4 * n_embd)));
        }
    }
    let probability = |name: &str| number(name, 0.1, |p| (0.0..1.0).contains(&p), "must be a probability in [0, 1)");
    let config = Gpt2Config::new(size("vocab_size")?, size("n_positions")?, n_embd, size("n_layer")?, n_head)
        .with_layer_norm_epsilon(number("layer_norm_epsilon", 1e-5, |e| e > 0.0, "must be a number > 0")?)
        .with_embd_pdrop(probability("embd_pdrop")?)
        .with_resid_pdrop(probability("resid_pdrop")?)
        .with_attn_pdrop(probability("attn_pdrop")?)
        .with_initializer_range(number("initializer_range", 0.02, |r| r >= 0.0, "must be a number ≥ 0")?);
    if config.checked_num_params().is_none() {
        return Err(bad_input(format!(
            "{}: vocab_size = {}, n_positions = {}, n_embd = {n_embd}, n_layer = {}: more parameters than can be counted",
            path.display(),
            config.vocab_size,
            config.n_positions,
            config.n_layer
        )));
    }
    Ok(config)
}

/// A tensor as a safetensors header describes it.
pub struct StoredTensor {
    pub shape: Vec<usize>,
    /// As the header names it: `F32`, `BF16`, `F16`, …
    pub dtype: String,
    /// The file holding it.
    pub file: PathBuf,
}

/// Each tensor of safetensors files, by name, read from their headers alone.
pub fn stored_tensors(files: &[PathBuf]) -> Result<HashMap<String, StoredTensor>> {
    use std::io::Read;
    let mut shapes = HashMap::new();
    for path in files {
        let damaged = |why: String| bad_input(format!("{}: not a valid safetensors file: {why}", path.display()));
        let mut file = crate::files::open_regular(path)?;
        let mut length = [0u8; 8];
        file.read_exact(&mut length).map_err(|e| damaged(e.to_string()))?;
        let length = u64::from_le_bytes(length);
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        if length > size.saturating_sub(8) {
            return Err(damaged(format!("a header of {length} bytes in a file of {size}")));
        }
        let mut header = vec![0u8; length as usize];
        file.read_exact(&mut header).map_err(|e| damaged(e.to_string()))?;
        let header: Value = serde_json::from_slice(&header).map_err(|e| damaged(e.to_string()))?;
        for (name, entry) in header.as_object().ok_or_else(|| damaged("the header is not an object".into()))? {
            if name == "__metadata__" {
                continue;
            }
            let shape = entry
                .get("shape")
                .and_then(Value::as_array)
                .map(|dims| dims.iter().filter_map(Value::as_u64).map(|d| d as usize).collect())
                .ok_or_else(|| damaged(format!("tensor `{name}` has no shape")))?;
            let dtype = entry.get("dtype").and_then(Value::as_str).unwrap_or_default().to_string();
            shapes.insert(name.clone(), StoredTensor { shape, dtype, file: path.clone() });
        }
    }
    Ok(shapes)
}

/// Check that the tensors which pin a config's sizes are stored with those sizes; `expected`:
/// (names the tensor may be stored under, its shape).
pub(crate) fn check_stored(dir: &Path, expected: &[(Vec<String>, Vec<usize>)]) -> Result<()> {
    let files = weight_files(dir)?;
    let shapes = stored_tensors(&files)?;
    for (names, shape) in expected {
        let found = names.iter().find_map(|name| shapes.get(name));
        match found {
            None => {
                let place = if files.len() == 1 { files[0].display().to_string() } else { dir.display().to_string() };
                return Err(bad_input(format!("{place}: tensor `{}` is missing", names[0])));
            }
            Some(StoredTensor { shape: found, file, .. }) if found != shape => {
                return Err(bad_input(format!(
                    "{}: tensor `{}` has shape {found:?}, the config expects {shape:?}",
                    file.display(),
                    names[0]
                )))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The GPT-2 tensors that pin every size in its config (vocabulary, context, width, depth).
pub(crate) fn check_sizes(config: &Gpt2Config, dir: &Path) -> Result<()> {
    let named = |name: String| vec![name.clone(), format!("{PREFIX}{name}")];
    let (d, last) = (config.n_embd, config.n_layer - 1);
    check_stored(
        dir,
        &[
            (named("wte.weight".into()), vec![config.vocab_size, d]),
            (named("wpe.weight".into()), vec![config.n_positions, d]),
            (named(format!("h.{last}.ln_1.weight")), vec![d]),
        ],
    )
}

/// The tensors of one safetensors file, as f32, by name.
pub(crate) struct TensorFile {
    path: PathBuf,
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl TensorFile {
    pub(crate) fn read(path: &Path) -> Result<Self> {
        let bytes = fs::read(path).map_err(|e| bad_input(format!("{}: cannot read weights: {e}", path.display())))?;
        let file = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad_input(format!("{}: not a valid safetensors file: {e}", path.display())))?;
        let mut tensors = HashMap::new();
        for (name, view) in file.tensors() {
            let data = view.data();
            let values: Vec<f32> = match view.dtype() {
                Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
                Dtype::F16 => data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
                Dtype::BF16 => data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
                other => {
                    return Err(bad_input(format!(
                        "{}: tensor `{name}` has dtype {other:?}; pipe reads F32, F16 and BF16",
                        path.display()
                    )))
                }
            };
            tensors.insert(name, (view.shape().to_vec(), values));
        }
        Ok(Self { path: path.to_path_buf(), tensors })
    }

    /// Check a tensor's shape by its HF name (without the `transformer.` prefix).
    fn expect(&self, name: &str, shape: &[usize]) -> Result<()> {
        let (found, _) = self
            .tensors
            .get(name)
            .or_else(|| self.tensors.get(&format!("{PREFIX}{name}")))
            .ok_or_else(|| bad_input(format!("{}: tensor `{name}` is missing", self.path.display())))?;
        if found != shape {
            return Err(bad_input(format!(
                "{}: tensor `{name}` has shape {found:?}, the config expects {shape:?}",
                self.path.display()
            )));
        }
        Ok(())
    }

    /// Take a tensor by its exact name, checking its shape.
    pub(crate) fn take_named(&mut self, name: &str, shape: &[usize]) -> Result<TensorData> {
        let missing = || bad_input(format!("{}: tensor `{name}` is missing", self.path.display()));
        let (found, values) = self.tensors.remove(name).ok_or_else(missing)?;
        if found != shape {
            return Err(bad_input(format!(
                "{}: tensor `{name}` has shape {found:?}, the model expects {shape:?}",
                self.path.display()
            )));
        }
        Ok(TensorData::new(values, shape))
    }

    /// The names of the tensors not taken yet.
    pub(crate) fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Take a tensor by its HF name (without the `transformer.` prefix), checking its shape.
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<TensorData> {
        self.expect(name, shape)?;
        let (_, values) = self
            .tensors
            .remove(name)
            .or_else(|| self.tensors.remove(&format!("{PREFIX}{name}")))
            .ok_or_else(|| bad_input(format!("{}: tensor `{name}` is missing", self.path.display())))?;
        Ok(TensorData::new(values, shape))
    }
}

/// The architecture of the GPT-2 in HF folder `dir`; a model of another family is refused.
pub fn read_config(dir: &Path) -> Result<Gpt2Config> {
    match super::family::read_config(dir)? {
        ModelConfig::Gpt2(config) => Ok(config),
        other => Err(bad_input(format!(
            "{}: a {} model, where a GPT-2 is needed",
            dir.join(CONFIG_FILE).display(),
            other.family()
        ))),
    }
}

/// Load a GPT-2 from HF folder `dir`, `dropout` replacing its dropout probabilities.
pub fn load<B: Backend>(dir: &Path, dropout: Option<f64>, device: &B::Device) -> Result<(Gpt2Config, Gpt2<B>)> {
    let config = read_config(dir)?;
    let config = match dropout {
        Some(p) => config.with_dropout(p),
        None => config,
    };
    Ok((config.clone(), load_with(config, dir, device)?))
}

/// Load a GPT-2 of architecture `config` from a HF directory (`model.safetensors`). Each parameter is
/// read under its module path as the HF name (see `params`); names may carry the
/// `transformer.` prefix or not; attention-mask buffers and a stored tied LM head are ignored;
/// a missing, unexpected or wrongly shaped tensor is an error that names it.
pub fn load_with<B: Backend>(config: Gpt2Config, dir: &Path, device: &B::Device) -> Result<Gpt2<B>> {
    // The tensors that pin every size in the config are checked before the model is
    // allocated: a config far larger than its weights would otherwise exhaust memory first.
    check_sizes(&config, dir)?;
    fill(config.init::<B>(device), TensorFile::read(&dir.join(WEIGHTS_FILE))?)
}

/// `model` with the weights of the HF directory `dir`, which holds a model of the same
/// architecture; the model's own settings (precision, dropout) stay.
pub fn load_weights<B: Backend>(model: Gpt2<B>, dir: &Path) -> Result<Gpt2<B>> {
    fill(model, TensorFile::read(&dir.join(WEIGHTS_FILE))?)
}

/// Every parameter of `model` from `file`, which must hold no other tensors.
fn fill<B: Backend>(model: Gpt2<B>, mut file: TensorFile) -> Result<Gpt2<B>> {
    let n_layer = model.config.n_layer;
    let model = params::load(model, |name, shape| file.take(name, shape))?;
    let mut unexpected: Vec<&String> = file
        .tensors
        .keys()
        .filter(|name| {
            let name = name.strip_prefix(PREFIX).unwrap_or(name);
            !(name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") || name == "lm_head.weight")
        })
        .collect();
    if !unexpected.is_empty() {
        unexpected.sort();
        return Err(bad_input(format!(
            "{}: unexpected tensors for a {n_layer}-layer GPT-2: {}",
            file.path.display(),
            unexpected.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(model)
}

/// The `config.json` transformers' `GPT2LMHeadModel.from_pretrained` expects.
fn config_json(config: &Gpt2Config, eos_id: usize) -> serde_json::Value {
    json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": null,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "resid_pdrop": config.resid_pdrop,
        "embd_pdrop": config.embd_pdrop,
        "attn_pdrop": config.attn_pdrop,
        "initializer_range": config.initializer_range,
        "scale_attn_weights": true,
        "tie_word_embeddings": true,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    })
}

/// Write a HF GPT-2 directory: config.json, generation_config.json and model.safetensors
/// (f32, HF names). Each file is written atomically; the tokenizer is the caller's to copy.
pub fn save<B: Backend>(model: &Gpt2<B>, eos_id: Option<usize>, dir: &Path) -> Result<()> {
    debug_assert!(model.adapters.is_none(), "a model with adapters is saved by lora::save");
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_safetensors(&dir.join(WEIGHTS_FILE), hf_tensors(model))?;
    write_config(&model.config, eos_id, dir)
}

/// The weights as a HF GPT-2 checkpoint holds them: f32, HF's names, Conv1D's `[in, out]`
/// layout (pipe's own).
pub fn hf_tensors<B: Backend>(model: &Gpt2<B>) -> Vec<(String, TensorData)> {
    params::tensors(model).into_iter().map(|(name, data)| (format!("{PREFIX}{name}"), data)).collect()
}

/// Write `tensors` (f32) as a safetensors file, atomically.
pub(crate) fn write_safetensors(path: &Path, tensors: Vec<(String, TensorData)>) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .into_iter()
        .map(|(name, data)| {
            let shape = data.shape.to_vec();
            let values = data.to_vec::<f32>().expect("model parameters are f32");
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, bytes, shape)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, bytes, shape)| {
            let view =
                safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes).expect("shape matches data");
            (name.clone(), view)
        })
        .collect::<Vec<_>>();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let serialized = safetensors::serialize(views, Some(metadata)).context("cannot serialize the weights")?;
    write_atomic(path, &serialized)
}

/// Write `config.json` and `generation_config.json` for this architecture.
pub(crate) fn write_config(config: &Gpt2Config, eos_id: Option<usize>, dir: &Path) -> Result<()> {
    let eos_id = eos_id.unwrap_or(GPT2_EOS_ID);
    let config_text = serde_json::to_string_pretty(&config_json(config, eos_id))?;
    write_atomic(&dir.join(CONFIG_FILE), config_text.as_bytes())?;
    let generation = json!({"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id});
    write_atomic(&dir.join(GENERATION_CONFIG_FILE), serde_json::to_string_pretty(&generation)?.as_bytes())?;
    Ok(())
}

/// Where a model named by hub id lives: the HuggingFace cache (`HF_HUB_CACHE`, else
/// `HF_HOME/hub`, else `~/.cache/huggingface/hub`), downloaded into it when online.
pub fn resolve_hub_model(repo_id: &str) -> Result<PathBuf> {
    let cache = match std::env::var_os("HF_HUB_CACHE") {
        Some(path) => hf_hub::Cache::new(PathBuf::from(path)),
        None => hf_hub::Cache::from_env(),
    };
    let cached = cache.model(repo_id.to_string());
    // A checkpoint is one weights file or an index and its shards.
    let in_cache = || -> Option<PathBuf> {
        let dir = cached.get(CONFIG_FILE)?.parent()?.to_path_buf();
        cached.get(TOKENIZER_FILE)?;
        if cached.get(WEIGHTS_FILE).is_none() {
            cached.get(INDEX_FILE)?;
            let shards = weight_files(&dir).ok()?;
            shards.iter().all(|shard| shard.is_file()).then_some(())?;
        }
        Some(dir)
    };
    if let Some(dir) = in_cache() {
        tracing::info!(repo_id, path = %dir.display(), "model found in the HuggingFace cache");
        return Ok(dir);
    }
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let download = || -> std::result::Result<PathBuf, String> {
        if offline {
            return Err("HF_HUB_OFFLINE is set".into());
        }
        let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone()).build().map_err(|e| e.to_string())?;
        let repo = api.model(repo_id.to_string());
        let config = repo.get(CONFIG_FILE).map_err(|e| e.to_string())?;
        let dir = config.parent().map(Path::to_path_buf).ok_or("the cache has no folder")?;
        repo.get(TOKENIZER_FILE).map_err(|e| e.to_string())?;
        if repo.get(WEIGHTS_FILE).is_err() {
            repo.get(INDEX_FILE).map_err(|e| e.to_string())?;
            for shard in weight_files(&dir).map_err(|e| e.to_string())? {
                let name = shard.file_name().and_then(|n| n.to_str()).ok_or("a shard without a name")?;
                repo.get(name).map_err(|e| e.to_string())?;
            }
        }
        Ok(dir)
    };
    download().map_err(|why| {
        bad_input(format!(
            "model `{repo_id}` is not in the HuggingFace cache at {} and could not be downloaded ({why}). \
             Download it where there is network (`huggingface-cli download {repo_id}`) and copy the cache \
             folder here (HF_HOME or HF_HUB_CACHE point pipe at it), or set model.path to a local directory \
             holding {CONFIG_FILE}, {WEIGHTS_FILE} and {TOKENIZER_FILE}",
            cache.path().display()
        ))
    })
}

/// The files whose contents are a HF model folder's weights and architecture.
pub fn model_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = vec![dir.join(CONFIG_FILE)];
    if dir.join(INDEX_FILE).is_file() {
        files.push(dir.join(INDEX_FILE));
    }
    files.extend(weight_files(dir)?);
    Ok(files)
}

/// The SHA-256 of HF model folder `dir`, as a run records its base model.
pub fn sha256(dir: &Path) -> Result<String> {
    hash_files(&model_files(dir)?)
}

/// The safetensors files of a model folder: the one `model.safetensors`, or the shards an
/// index lists.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    if !index.is_file() {
        return Ok(vec![dir.join(WEIGHTS_FILE)]);
    }
    let text = fs::read_to_string(&index).map_err(|e| bad_input(format!("{}: cannot read: {e}", index.display())))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| bad_input(format!("{}: not valid JSON: {e}", index.display())))?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| bad_input(format!("{}: no `weight_map` object", index.display())))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .filter(|f| !f.contains('/') && !f.contains('\\') && f.ends_with(".safetensors"))
            .ok_or_else(|| {
                bad_input(format!(
                    "{}: `weight_map.{name}` = {file}: not a .safetensors file of the folder",
                    index.display()
                ))
            })?;
        let path = dir.join(file);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}
