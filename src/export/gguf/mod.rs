//! `pipe export --format gguf`: a model as one GGUF file, the format llama.cpp, ollama and LM
//! Studio load, laid out as llama.cpp's own converter (`convert_hf_to_gguf.py`) lays out the same
//! architecture: its hyper-parameters under llama.cpp's keys, its tensors under llama.cpp's
//! names and layouts, the tokenizer, and the chat template.
//!
//! Tensors start from the weights as a HF checkpoint names them, so the mapping reads like the
//! converter's: GPT-2's Conv1D weights are transposed to `[out, in]`; Llama's query and key
//! projections are permuted from HF's rotate-half layout to the interleaved pairs llama.cpp's
//! `llama` architecture rotates (Qwen2 and Qwen3 rotate halves in llama.cpp too, so theirs are
//! kept); Llama 3's rope scaling becomes a `rope_freqs` tensor. Norms, biases and GPT-2's
//! position embeddings stay f32, as the converter keeps them; Q8_0 falls back to f16 for a
//! tensor whose rows are not whole blocks of 32.

pub mod file;
pub mod quant;
mod vocab;

use std::path::Path;

use anyhow::Result;

use self::file::{TensorType, Value};
use crate::data::{PromptLayout, Tok};
use crate::error::bad_input;
use crate::model::llama::{LlamaConfig, RopeScaling, Variant};
use crate::model::params::transposed;
use crate::model::{hf, CausalLm, Gpt2Config, Model, ModelConfig};

/// How the weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Quant {
    F32,
    F16,
    Bf16,
    /// 8-bit blocks of 32 with an f16 scale each (llama.cpp's Q8_0).
    #[value(name = "q8_0")]
    Q8_0,
}

impl Quant {
    pub fn name(self) -> &'static str {
        match self {
            Quant::F32 => "f32",
            Quant::F16 => "f16",
            Quant::Bf16 => "bf16",
            Quant::Q8_0 => "q8_0",
        }
    }

    fn tensor_type(self) -> TensorType {
        match self {
            Quant::F32 => TensorType::F32,
            Quant::F16 => TensorType::F16,
            Quant::Bf16 => TensorType::Bf16,
            Quant::Q8_0 => TensorType::Q8_0,
        }
    }

    /// llama.cpp's `general.file_type` (its `LlamaFileType`).
    fn file_type(self) -> u32 {
        match self {
            Quant::F32 => 0,
            Quant::F16 => 1,
            Quant::Q8_0 => 7,
            Quant::Bf16 => 32,
        }
    }
}

/// Write the model of folder `source` (a HF model directory, or one with LoRA adapters, which
/// are merged) with its tokenizer `tok` as the GGUF file `out`, its weights stored as `quant`. `chat_template` is the one
/// chats are laid out with (see [`chat_template`]); `name` goes in `general.name`. The file is
/// written beside `out` under a hidden name and renamed into place once whole.
pub fn export(
    source: &Path,
    tok: &Tok,
    out: &Path,
    quant: Quant,
    chat_template: Option<&str>,
    name: &str,
) -> Result<()> {
    if out.exists() {
        return Err(bad_input(format!("{}: already exists; choose a new file", out.display())));
    }
    if out.file_name().is_none() {
        return Err(bad_input(format!("--out {}: names no file", out.display())));
    }
    let device = Default::default();
    let model = <Model<burn::backend::Flex> as CausalLm<_>>::load(source, None, &device)?.merged();
    let config = model.config();
    let config_file = source.join(hf::CONFIG_FILE);
    let (mut metadata, bos_id) = match &config {
        ModelConfig::Gpt2(c) => (gpt2_metadata(c), Some(tok.eos_id)),
        ModelConfig::Llama(c) => (llama_metadata(c, &config_file)?, c.bos_token_id.map(|id| id as u32)),
    };
    metadata.splice(
        0..0,
        [
            ("general.architecture".to_string(), Value::String(architecture(&config).into())),
            ("general.type".into(), Value::String("model".into())),
            ("general.name".into(), Value::String(name.into())),
            ("general.file_type".into(), Value::U32(quant.file_type())),
            ("general.quantization_version".into(), Value::U32(2)),
        ],
    );
    metadata.extend(vocab::metadata(
        tok,
        &source.join(hf::TOKENIZER_FILE),
        config.vocab_size(),
        bos_id,
        chat_template,
    )?);
    let tensors = tensors(&model, &config, &config_file, quant)?;
    drop(model);

    let bar = indicatif::ProgressBar::new(tensors.len() as u64);
    let style = indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} tensors ({eta})")
        .expect("a valid template")
        .progress_chars("=> ");
    let bar = bar.with_style(style).with_prefix(format!("gguf {}", quant.name()));
    let tensors = tensors
        .into_iter()
        .map(|t| {
            let PlannedTensor { name, dims, ty, values } = t;
            file::Tensor { name, dims, ty, bytes: Box::new(move || quant::encode(&values, ty)) }
        })
        .collect();
    crate::files::write_atomic_with(out, |writer| file::write(writer, &metadata, tensors, |_| bar.inc(1)))?;
    bar.finish_and_clear();
    Ok(())
}

/// The chat template to write: a run's Jinja chat template where its chat data had one, else
/// the run's prompt layout written as a template (so a chat laid out by llama.cpp or ollama
/// reads as training saw it), else the model's own (`tokenizer_config.json`).
pub fn chat_template(jinja: Option<String>, layout: Option<&PromptLayout>, tok: &Tok) -> Option<String> {
    if jinja.is_some() {
        return jinja;
    }
    match layout {
        Some(layout) => {
            let (before, after) = layout.template.split_once("{prompt}").unwrap_or((&layout.template, ""));
            let end = layout.end.clone().unwrap_or_else(|| tok.eos_token());
            let literal = |text: &str| serde_json::to_string(text).expect("a string serialises");
            Some(format!(
                "{{%- for message in messages -%}}\
                 {{%- if message['role'] == 'user' -%}}{{{{ {} + message['content'] + {} }}}}\
                 {{%- elif message['role'] == 'assistant' -%}}{{{{ message['content'] + {} }}}}\
                 {{%- endif -%}}{{%- endfor -%}}",
                literal(before),
                literal(after),
                literal(&end)
            ))
        }
        None => tok.chat_template().map(str::to_string),
    }
}

/// llama.cpp's architecture name.
fn architecture(config: &ModelConfig) -> &'static str {
    match config {
        ModelConfig::Gpt2(_) => "gpt2",
        ModelConfig::Llama(c) => match c.variant {
            Variant::Llama => "llama",
            Variant::Qwen2 => "qwen2",
            Variant::Qwen3 => "qwen3",
        },
    }
}

fn gpt2_metadata(c: &Gpt2Config) -> Vec<(String, Value)> {
    let key = |k: &str| format!("gpt2.{k}");
    vec![
        (key("block_count"), Value::U32(c.n_layer as u32)),
        (key("context_length"), Value::U32(c.n_positions as u32)),
        (key("embedding_length"), Value::U32(c.n_embd as u32)),
        (key("feed_forward_length"), Value::U32(4 * c.n_embd as u32)),
        (key("attention.head_count"), Value::U32(c.n_head as u32)),
        (key("attention.layer_norm_epsilon"), Value::F32(c.layer_norm_epsilon as f32)),
    ]
}

fn llama_metadata(c: &LlamaConfig, config_file: &Path) -> Result<Vec<(String, Value)>> {
    let arch = architecture(&ModelConfig::Llama(c.clone()));
    match c.variant {
        Variant::Qwen3 if c.qkv_bias || c.o_bias || c.mlp_bias => {
            return Err(refused(
                config_file,
                "llama.cpp's qwen3 architecture has no attention or MLP biases (attention_bias = true)",
            ))
        }
        Variant::Qwen2 if c.o_bias || c.mlp_bias => {
            return Err(refused(config_file, "llama.cpp's qwen2 architecture has no output-projection or MLP biases"))
        }
        Variant::Qwen2 | Variant::Qwen3 if matches!(c.rope_scaling, Some(RopeScaling::Llama3 { .. })) => {
            return Err(refused(config_file, "llama.cpp reads Llama 3's rope scaling for its llama architecture only"))
        }
        _ => {}
    }
    let key = |k: &str| format!("{arch}.{k}");
    let mut out = vec![
        (key("block_count"), Value::U32(c.num_hidden_layers as u32)),
        (key("context_length"), Value::U32(c.max_position_embeddings as u32)),
        (key("embedding_length"), Value::U32(c.hidden_size as u32)),
        (key("feed_forward_length"), Value::U32(c.intermediate_size as u32)),
        (key("attention.head_count"), Value::U32(c.num_attention_heads as u32)),
        (key("attention.head_count_kv"), Value::U32(c.num_key_value_heads as u32)),
        (key("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(c.rms_norm_eps as f32)),
        (key("attention.key_length"), Value::U32(c.head_dim as u32)),
        (key("attention.value_length"), Value::U32(c.head_dim as u32)),
    ];
    if let Some(RopeScaling::Linear { factor }) = c.rope_scaling {
        out.push((key("rope.scaling.type"), Value::String("linear".into())));
        out.push((key("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    if c.variant == Variant::Llama {
        out.push((key("vocab_size"), Value::U32(c.vocab_size as u32)));
        out.push((key("rope.dimension_count"), Value::U32(c.head_dim as u32)));
    }
    Ok(out)
}

/// A tensor as it will be written: f32 values in llama.cpp's layout, the type to store them as.
struct PlannedTensor {
    name: String,
    dims: Vec<u64>,
    ty: TensorType,
    values: Vec<f32>,
}

fn tensors(
    model: &Model<burn::backend::Flex>,
    config: &ModelConfig,
    config_file: &Path,
    quant: Quant,
) -> Result<Vec<PlannedTensor>> {
    let mut out = Vec::new();
    if let ModelConfig::Llama(c) = config {
        if let Some(factors) = llama3_rope_factors(c) {
            let dims = vec![factors.len() as u64];
            out.push(PlannedTensor { name: "rope_freqs.weight".into(), dims, ty: TensorType::F32, values: factors });
        }
    }
    for (hf_name, mut data) in model.hf_tensors() {
        let name = match config {
            ModelConfig::Gpt2(_) => gpt2_name(&hf_name),
            ModelConfig::Llama(_) => llama_name(&hf_name),
        };
        let name = name.ok_or_else(|| refused(config_file, &format!("no GGUF name for {hf_name}")))?;
        // HF's GPT-2 Conv1D keeps [in, out]; llama.cpp multiplies by [out, in].
        let conv1d = matches!(config, ModelConfig::Gpt2(_)) && data.shape.len() == 2 && !name.contains("embd");
        if conv1d {
            data = transposed(data);
        }
        let mut shape = data.shape.to_vec();
        let mut values: Vec<f32> = data.to_vec().map_err(|e| anyhow::anyhow!("{hf_name}: {e:?}"))?;
        if let ModelConfig::Llama(c) = config {
            let heads = match () {
                _ if c.variant != Variant::Llama => None,
                _ if hf_name.contains(".q_proj.") => Some(c.num_attention_heads),
                _ if hf_name.contains(".k_proj.") => Some(c.num_key_value_heads),
                _ => None,
            };
            if let Some(heads) = heads {
                values = interleaved_rotary(&values, heads, shape[0], shape.get(1).copied().unwrap_or(1));
            }
        }
        shape.reverse(); // ggml lists the fastest-varying dimension first
        let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        let kept_f32 = dims.len() < 2
            || name.ends_with("_norm.weight")
            || !name.ends_with(".weight")
            || name == "position_embd.weight";
        let ty = match quant.tensor_type() {
            _ if kept_f32 => TensorType::F32,
            TensorType::Q8_0 if !dims[0].is_multiple_of(TensorType::Q8_0_BLOCK as u64) => TensorType::F16,
            ty => ty,
        };
        out.push(PlannedTensor { name, dims, ty, values });
    }
    Ok(out)
}

/// llama.cpp's name for a HF GPT-2 tensor.
fn gpt2_name(hf_name: &str) -> Option<String> {
    let name = hf_name.strip_prefix("transformer.").unwrap_or(hf_name);
    let (module, suffix) = name.rsplit_once('.')?;
    let mapped = match module {
        "wte" => "token_embd".to_string(),
        "wpe" => "position_embd".to_string(),
        "ln_f" => "output_norm".to_string(),
        _ => {
            let rest = module.strip_prefix("h.")?;
            let (layer, part) = rest.split_once('.')?;
            let part = match part {
                "ln_1" => "attn_norm",
                "attn.c_attn" => "attn_qkv",
                "attn.c_proj" => "attn_output",
                "ln_2" => "ffn_norm",
                "mlp.c_fc" => "ffn_up",
                "mlp.c_proj" => "ffn_down",
                _ => return None,
            };
            format!("blk.{layer}.{part}")
        }
    };
    Some(format!("{mapped}.{suffix}"))
}

/// llama.cpp's name for a HF Llama, Qwen2 or Qwen3 tensor.
fn llama_name(hf_name: &str) -> Option<String> {
    let (module, suffix) = hf_name.rsplit_once('.')?;
    let mapped = match module {
        "model.embed_tokens" => "token_embd".to_string(),
        "model.norm" => "output_norm".to_string(),
        "lm_head" => "output".to_string(),
        _ => {
            let rest = module.strip_prefix("model.layers.")?;
            let (layer, part) = rest.split_once('.')?;
            let part = match part {
                "input_layernorm" => "attn_norm",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "self_attn.q_norm" => "attn_q_norm",
                "self_attn.k_norm" => "attn_k_norm",
                "post_attention_layernorm" => "ffn_norm",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                _ => return None,
            };
            format!("blk.{layer}.{part}")
        }
    };
    Some(format!("{mapped}.{suffix}"))
}

/// A query or key projection's output rows (weight [heads·head_dim, in], or bias [heads·head_dim])
/// reordered per head from HF's halves (the first half of a head's dimensions rotates with the
/// second) to llama.cpp's adjacent pairs: row (h, j, i) of [heads, 2, head_dim/2] becomes row
/// (h, i, j) of [heads, head_dim/2, 2], as the converter's `permute` does.
fn interleaved_rotary(values: &[f32], heads: usize, rows: usize, cols: usize) -> Vec<f32> {
    let half = rows / heads / 2;
    let mut out = vec![0.0; values.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let from = (h * 2 + j) * half + i;
                let to = (h * half + i) * 2 + j;
                out[to * cols..(to + 1) * cols].copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// Llama 3's rope scaling as llama.cpp applies it: a factor dividing each rotary frequency
/// (the `rope_freqs` tensor), [head_dim / 2].
fn llama3_rope_factors(c: &LlamaConfig) -> Option<Vec<f32>> {
    let Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) =
        c.rope_scaling
    else {
        return None;
    };
    let dim = c.head_dim;
    let (factor, low, high) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32);
    let old_context = original_max_position_embeddings as f32;
    let (low_wavelen, high_wavelen) = (old_context / low, old_context / high);
    // In f32 throughout, as the converter computes them.
    let factors = (0..dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0 / (c.rope_theta as f32).powf(i as f32 / dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old_context / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect();
    Some(factors)
}

fn refused(file: &Path, why: &str) -> anyhow::Error {
    bad_input(format!("{}: cannot write this model as GGUF: {why}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_rows_are_interleaved_per_head() {
        // Two heads of head_dim 4, one column: per head [a0 a1 b0 b1] → [a0 b0 a1 b1].
        let values: Vec<f32> = (0..8).map(|v| v as f32).collect();
        assert_eq!(interleaved_rotary(&values, 2, 8, 1), [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    }

    #[test]
    fn names_follow_llama_cpp() {
        assert_eq!(gpt2_name("transformer.h.3.attn.c_attn.bias").as_deref(), Some("blk.3.attn_qkv.bias"));
        assert_eq!(gpt2_name("transformer.wpe.weight").as_deref(), Some("position_embd.weight"));
        assert_eq!(llama_name("model.layers.0.self_attn.k_norm.weight").as_deref(), Some("blk.0.attn_k_norm.weight"));
        assert_eq!(llama_name("lm_head.weight").as_deref(), Some("output.weight"));
        assert_eq!(llama_name("model.layers.0.mlp.experts.weight"), None);
    }
}
