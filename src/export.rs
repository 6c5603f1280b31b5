//! `pipe export`: a run's model written for use outside pipe, with its tokenizer.

use std::path::Path;

use anyhow::{Context, Result};

use crate::data::Tok;
use crate::error::bad_input;
use crate::model::{hf, lora, CausalLm, Model};

/// Write the model of folder `source` (a HF model directory, or one with LoRA adapters) for
/// use outside pipe, in `out` (which must not exist or be empty), with its tokenizer: a HF
/// directory of its family; for a model with adapters, the PEFT adapter folder, or with
/// `merge` a HF directory with the adapters folded into the weights.
pub fn export(source: &Path, out: &Path, merge: bool) -> Result<()> {
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(bad_input(format!("{}: already exists and is not empty; choose a new folder", out.display())));
    }
    let device = Default::default();
    let model = <Model<burn::backend::Flex> as CausalLm<_>>::load(source, None, &device)?;
    let tokenizer = source.join(hf::TOKENIZER_FILE);
    let eos_id = Tok::load(&tokenizer)?.eos_id as usize;
    match (model, merge) {
        (Model::Gpt2(model), true) if model.adapters.is_some() => hf::save(&lora::merged(model), Some(eos_id), out)?,
        (Model::Gpt2(model), false) if model.adapters.is_some() => {
            let adapters = model.adapters.clone().expect("matched: the model has adapters");
            lora::save_peft(&model, &adapters, out)?
        }
        (_, true) => {
            return Err(bad_input(format!(
            "{}: --merge folds LoRA adapters into their base model, and this model has none; export it without --merge",
            source.display()
        )))
        }
        (model, false) => model.save(out, Some(eos_id))?,
    }
    std::fs::copy(&tokenizer, out.join(hf::TOKENIZER_FILE))
        .with_context(|| format!("cannot copy {}", tokenizer.display()))?;
    Ok(())
}
