//! `pipe export`: a run's model written for use outside pipe, with its tokenizer.

use std::path::Path;

use anyhow::Result;

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
        (Some(_), true) => {
            let merged = match model {
                Model::Gpt2(m) => Model::Gpt2(lora::merged(m)),
                Model::Llama(m) => Model::Llama(lora::merged(m)),
            };
            merged.save(out, eos_id)?
        }
    }
    // With its tokenizer_config.json (EOS, chat template) and end-of-sequence ids.
    tok.save(&out.join(hf::TOKENIZER_FILE))
}
