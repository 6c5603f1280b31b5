//! `pipe export`: a run's model written for use outside pipe, with its tokenizer: a HF folder
//! in the dtype asked for, which appears whole or not at all, or one GGUF file ([`gguf`]).

pub mod gguf;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use safetensors::{Dtype as Stored, SafeTensors};

use crate::data::Tok;
use crate::error::bad_input;
use crate::files::Staged;
use crate::model::{hf, lora, CausalLm, Model};

/// The dtype exported weights are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    /// As config.json's `torch_dtype` names it.
    pub fn torch_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::Bf16 => "bfloat16",
            Dtype::F16 => "float16",
        }
    }

    /// The dtype a checkpoint's floating-point weights are stored in (the most common one, by
    /// tensor count), read from the safetensors headers only.
    pub fn of_checkpoint(dir: &Path) -> Result<Self> {
        let files = hf::weight_files(dir)?;
        let mut counts = [0usize; 3];
        for tensor in hf::stored_tensors(&files)?.into_values() {
            match tensor.dtype.as_str() {
                "F32" => counts[0] += 1,
                "BF16" => counts[1] += 1,
                "F16" => counts[2] += 1,
                _ => {}
            }
        }
        let most = (0..3).max_by_key(|&i| (counts[i], std::cmp::Reverse(i))).expect("three dtypes");
        Ok([Dtype::F32, Dtype::Bf16, Dtype::F16][most])
    }
}

/// Write the model of folder `source` (a HF model directory, or one with LoRA adapters) for
/// use outside pipe, in `out` (which must not exist or be empty), with its tokenizer: a HF
/// directory of its family; for a model with adapters, the PEFT adapter folder, or with
/// `merge` a HF directory with the adapters folded into the weights. Weights are stored as
/// `dtype` (rounded to nearest, ties to even). Everything is written into a hidden sibling of
/// `out` that is renamed into place at the end, so an export that fails or is killed leaves no
/// `out` that looks complete.
pub fn export(source: &Path, out: &Path, merge: bool, dtype: Dtype) -> Result<()> {
    if !crate::files::absent_or_empty(out) {
        return Err(bad_input(format!("{}: already exists and is not empty; choose a new folder", out.display())));
    }
    let name = out.file_name().ok_or_else(|| bad_input(format!("--out {}: names no folder", out.display())))?;
    let staged =
        Staged::new(out, out.with_file_name(format!(".{}.partial-{}", name.to_string_lossy(), std::process::id())))?;
    write(source, staged.path(), merge, dtype)?;
    // `out` is absent or empty, as checked above: the commit replaces it.
    staged.commit().map(|_| ())
}

fn write(source: &Path, out: &Path, merge: bool, dtype: Dtype) -> Result<()> {
    let device = Default::default();
    let model = <Model<burn::backend::Flex> as CausalLm<_>>::load(source, None, &device)?;
    let tok = Tok::load(&source.join(hf::TOKENIZER_FILE))?;
    let eos_id = Some(tok.eos_id as usize);
    match (model.adapters().cloned(), merge) {
        (None, true) => {
            return Err(bad_input(format!(
            "{}: --merge folds LoRA adapters into their base model, and this model has none; export it without --merge",
            source.display()
        )))
        }
        (None, false) => model.save(out, eos_id)?,
        (Some(adapters), false) => match &model {
            Model::Gpt2(m) => lora::save_peft(m, &adapters, out)?,
            Model::Llama(m) => lora::save_peft(m, &adapters, out)?,
        },
        (Some(_), true) => model.merged().save(out, eos_id)?,
    }
    if let Some(half) = Half::of(dtype) {
        store_as(out, half)?;
    }
    // With its tokenizer_config.json (EOS, chat template) and end-of-sequence ids.
    tok.save(&out.join(hf::TOKENIZER_FILE))
}

/// A 16-bit dtype weights are narrowed to.
#[derive(Clone, Copy)]
enum Half {
    Bf16,
    F16,
}

impl Half {
    /// None for f32, which pipe's models are stored in already.
    fn of(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => None,
            Dtype::Bf16 => Some(Self::Bf16),
            Dtype::F16 => Some(Self::F16),
        }
    }

    fn stored(self) -> Stored {
        match self {
            Self::Bf16 => Stored::BF16,
            Self::F16 => Stored::F16,
        }
    }

    fn dtype(self) -> Dtype {
        match self {
            Self::Bf16 => Dtype::Bf16,
            Self::F16 => Dtype::F16,
        }
    }

    /// Little-endian f32 bytes as this dtype's little-endian bytes, each value rounded to
    /// nearest (ties to even).
    fn narrow(self, f32_bytes: &[u8]) -> Vec<u8> {
        let values = f32_bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        match self {
            Self::Bf16 => values.flat_map(|v| half::bf16::from_f32(v).to_le_bytes()).collect(),
            Self::F16 => values.flat_map(|v| half::f16::from_f32(v).to_le_bytes()).collect(),
        }
    }
}

/// Rewrite every safetensors file in `dir` with its f32 tensors stored as `half`, and say so
/// in its config.json's `torch_dtype`, where it has one.
fn store_as(dir: &Path, half: Half) -> Result<()> {
    let entries: Vec<PathBuf> =
        std::fs::read_dir(dir)?.map(|entry| entry.map(|e| e.path())).collect::<std::io::Result<_>>()?;
    let files = entries.into_iter().filter(|p| p.extension().is_some_and(|e| e == "safetensors"));
    for path in files {
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read back {}", path.display()))?;
        let tensors =
            SafeTensors::deserialize(&bytes).with_context(|| format!("cannot read back {}", path.display()))?;
        let (_, header) = SafeTensors::read_metadata(&bytes)?;
        let converted: Vec<(String, Stored, Vec<usize>, Vec<u8>)> = tensors
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let (stored, data) = match view.dtype() {
                    Stored::F32 => (half.stored(), half.narrow(view.data())),
                    other => (other, view.data().to_vec()),
                };
                (name, stored, view.shape().to_vec(), data)
            })
            .collect();
        let views = converted
            .iter()
            .map(|(name, stored, shape, data)| {
                let view = safetensors::tensor::TensorView::new(*stored, shape.clone(), data)?;
                Ok((name.as_str(), view))
            })
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
        let serialized = safetensors::serialize(views, header.metadata().clone())?;
        crate::files::write_atomic(&path, &serialized)?;
    }
    let config_path = dir.join("config.json");
    if config_path.is_file() {
        let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path)?)?;
        config["torch_dtype"] = half.dtype().torch_name().into();
        crate::files::write_atomic(&config_path, serde_json::to_string_pretty(&config)?.as_bytes())?;
    }
    Ok(())
}
