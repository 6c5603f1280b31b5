//! The dpo stage: preference tuning (`crate::dpo`) from the model as the stages before left it,
//! which is also the frozen reference. The reference's log-probabilities of every pair are
//! computed once, at the stage's start, and kept in the run folder, so a resumed stage reads
//! them rather than recomputing them from a model it no longer has. The stage checkpoints
//! under `<run>/dpo/`, counts its own steps, and leaves its model as `final/`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Result};
use serde::{Deserialize, Serialize};

use super::{train::save_final, StageContext, Trained};
use crate::checkpoint::{self, Progress};
use crate::data::PreferencePair;
use crate::dpo::{reference_logps, Dpo, ScoredPair, ScoredPairs};
use crate::error::bad_input;
use crate::files::write_atomic;
use crate::model::{TrainBackend, TrainableLm};
use crate::selection::TrainingOutcome;
use crate::spec::FinalModel;
use crate::train::{self, TrainContext, TrainStage};

/// In `<run>/dpo/`: the reference model's log-probabilities of every pair.
const REFERENCE_FILE: &str = "reference_logps.json";

/// The reference log-probabilities (chosen, rejected) of the training and validation pairs.
#[derive(Serialize, Deserialize)]
struct Reference {
    train: Vec<[f64; 2]>,
    val: Vec<[f64; 2]>,
}

pub fn run<B: TrainBackend, M: TrainableLm<B>>(ctx: &StageContext<'_, B>, state: Trained<M>) -> Result<Trained<M>> {
    let (Some(dpo), Some(pairs)) = (&ctx.spec.dpo, &ctx.data.preference) else {
        return Err(bad_input("the dpo stage needs a [dpo] section with the preference data's path"));
    };
    let spec = ctx.spec.for_dpo();
    let folder = TrainStage::Dpo.folder(&ctx.run.path);
    std::fs::create_dir_all(&folder).map_err(|e| anyhow!("cannot create {}: {e}", folder.display()))?;
    let pad_id = ctx.data.tok.eos_id;
    // A stage interrupted after a checkpoint goes on from it, its reference as it was.
    let latest = checkpoint::list(&folder).pop();
    let (model, resume, reference) = match latest.map(|dir| checkpoint::progress(&dir).map(|p| (dir, p))).transpose()? {
        Some((dir, progress)) => {
            let reference = read_reference(&folder, pairs.train.len(), pairs.val.len())?;
            tracing::info!(checkpoint = %dir.display(), step = progress.step, "resuming the dpo stage");
            (checkpoint::restore(state.model, &dir)?, Some((dir, progress)), reference)
        }
        None => {
            let total = pairs.train.len() + pairs.val.len();
            tracing::info!(pairs = total, "scoring the pairs with the reference model (the model as the stage begins)");
            let valid = state.model.valid();
            let batch = spec.train.batch_size;
            let bar = indicatif::ProgressBar::new(total as u64).with_prefix("reference");
            let mut done = |n: usize| {
                bar.inc(n as u64);
                ctx.stop.check(&format!(
                    "while scoring the pairs with the reference model, {} of {total} done",
                    bar.position()
                ))
            };
            let reference = Reference {
                train: reference_logps(&valid, &pairs.train, batch, pad_id, ctx.device, &mut done)?,
                val: reference_logps(&valid, &pairs.val, batch, pad_id, ctx.device, &mut done)?,
            };
            bar.finish_and_clear();
            write_atomic(&folder.join(REFERENCE_FILE), serde_json::to_string(&reference)?.as_bytes())?;
            (state.model, None, reference)
        }
    };
    ctx.run.restart_stage("dpo", resume.as_ref().map_or(0, |(_, progress): &(_, Progress)| progress.step))?;
    let scored = |pairs: &[PreferencePair], reference: &[[f64; 2]]| -> Vec<ScoredPair> {
        pairs.iter().zip(reference).map(|(pair, &reference)| ScoredPair { pair: pair.clone(), reference }).collect()
    };
    let train_set = ScoredPairs(Arc::new(scored(&pairs.train, &reference.train)));
    let val = scored(&pairs.val, &reference.val);
    let train_ctx = TrainContext {
        spec: &spec,
        data: ctx.data,
        train: &train_set,
        val: &val,
        stage: TrainStage::Dpo,
        run: Some(ctx.run),
        device: ctx.device,
        stop: ctx.stop,
    };
    let objective = Dpo { beta: dpo.beta, loss: dpo.loss, label_smoothing: dpo.label_smoothing, pad_id };
    let resume = resume.as_ref().map(|(dir, progress)| (dir.as_path(), *progress));
    let (model, summary) = train::train(&train_ctx, model, objective, resume)?;
    let (model, final_step) = match (spec.train.final_model, checkpoint::best(&folder)?) {
        (FinalModel::Best, Some((dir, best))) => {
            tracing::info!(step = best.step, value = format!("{:.4}", best.value), "final/ is the dpo stage's best model");
            (model.with_weights_of(&dir)?, best.step)
        }
        (FinalModel::Best, None) => {
            return Err(anyhow!(
                "train.final = \"best\": the dpo stage kept no best model (it made no evaluation), so final/ cannot be the best one"
            ))
        }
        (FinalModel::Last, _) => (model, summary.steps),
    };
    save_final(&model.valid(), &ctx.data.tok, ctx.run)?;
    tracing::info!(steps = summary.steps, first_loss = summary.first_loss, last_loss = summary.last_loss, "dpo done");
    let outcome = TrainingOutcome {
        selection: summary.selection,
        select_metric: spec.train.select_metric,
        final_model: spec.train.final_model,
        final_step,
        stage: TrainStage::Dpo.tag(),
    };
    Ok(Trained { model, steps: final_step, stage: TrainStage::Dpo, training: Some(outcome) })
}

/// The reference log-probabilities the stage wrote when it began, for `train` and `val` pairs.
fn read_reference(folder: &Path, train: usize, val: usize) -> Result<Reference> {
    let path = folder.join(REFERENCE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
    let reference: Reference = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: not the reference log-probabilities: {e}", path.display()))?;
    if reference.train.len() != train || reference.val.len() != val {
        return Err(anyhow!(
            "{}: holds {} training and {} validation pairs, but the data has {train} and {val}",
            path.display(),
            reference.train.len(),
            reference.val.len()
        ));
    }
    Ok(reference)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resumed stage reads the reference's log-probabilities exactly as they were computed:
    /// these values are among those a JSON parser that is not correctly rounded reads one unit
    /// in the last place off.
    #[test]
    fn the_stored_reference_reads_back_bit_for_bit() {
        let folder = tempfile::tempdir().unwrap();
        let reference = Reference {
            train: vec![[-31.099979400634766, -0.025679588317871094], [-27.330890655517578, -1e-300]],
            val: vec![[-0.1, -123456.789]],
        };
        write_atomic(&folder.path().join(REFERENCE_FILE), serde_json::to_string(&reference).unwrap().as_bytes())
            .unwrap();
        let read = read_reference(folder.path(), 2, 1).unwrap();
        let bits = |r: &Reference| r.train.iter().chain(&r.val).flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&read), bits(&reference));
    }
}
