//! Which fields a spec leaves unused, and why: those of another data kind, `val_fraction`
//! beside `val_path`, the settings of a stage the spec does not run. `pipe check` shows them
//! apart from the fields that apply.

use super::{DataFormat, DataKind, Schedule, Spec, Stage};

/// Fields that do nothing in `spec`, as groups of dotted keys with the reason.
pub fn unused(spec: &Spec) -> Vec<(Vec<&'static str>, String)> {
    let data = &spec.data;
    let mut out = Vec::new();
    let kind = |k: DataKind| toml::Value::try_from(k).map(|v| v.to_string()).unwrap_or_default();
    let mut other_kind = |of: DataKind, keys: Vec<&'static str>| {
        if data.kind != of {
            out.push((keys, format!("for data.kind = {}; this spec's is {}", kind(of), kind(data.kind))));
        }
    };
    other_kind(DataKind::Pair, vec!["data.prompt_field", "data.response_field", "data.prompt_template"]);
    other_kind(DataKind::Alpaca, vec!["data.instruction_field", "data.input_field", "data.output_field"]);
    other_kind(DataKind::Chat, vec!["data.messages_field", "data.chat_template"]);
    other_kind(DataKind::Text, vec!["data.text_field", "data.documents"]);
    if data.kind == DataKind::Text {
        let extension = data.path.first().and_then(|p| p.extension()).and_then(|e| e.to_str()).unwrap_or_default();
        let plain_text = match data.format {
            DataFormat::Text => Some(true),
            DataFormat::Auto if extension == "txt" => Some(true),
            DataFormat::Auto if ["json", "jsonl", "csv", "parquet", "arrow"].contains(&extension) => Some(false),
            DataFormat::Auto => None,
            _ => Some(false),
        };
        match plain_text {
            Some(true) => out.push((vec!["data.text_field"], "a plain-text file has no fields".into())),
            Some(false) => out.push((vec!["data.documents"], "for plain-text files; this one has records".into())),
            None => {}
        }
        out.push((vec!["train.loss_on"], "documents are trained on whole".into()));
    }
    if data.has_val_files() {
        out.push((vec!["data.val_fraction"], "data.val_path or data.val_split holds the validation set".into()));
    }
    let runs = |stage: Stage| spec.run.stages.contains(&stage);
    if !runs(Stage::Train) && !runs(Stage::Dpo) {
        out.push((vec!["optimizer.*", "train.*"], "run.stages has no train stage".into()));
    } else {
        if spec.optimizer.schedule == Schedule::Constant {
            out.push((vec!["optimizer.min_lr_ratio"], "for optimizer.schedule = \"cosine\"".into()));
        }
        let validates = data.has_val_files() || data.val_fraction > 0.0;
        if !validates {
            let keys = vec!["train.eval_every", "train.select_metric", "train.early_stopping_patience"];
            out.push((keys, "there is no validation data (data.val_path, data.val_split, data.val_fraction)".into()));
        }
        if !validates || spec.train.early_stopping_patience == 0 {
            out.push((vec!["train.early_stopping_min_delta"], "early stopping is off".into()));
        }
    }
    let answers_select = runs(Stage::Train) && spec.train.select_metric.scores_answers();
    if !runs(Stage::Eval) && !answers_select {
        out.push((vec!["eval.*"], "run.stages has no eval stage, and no answers select the model".into()));
    }
    if !runs(Stage::Generate) {
        out.push((vec!["generate.*"], "run.stages has no generate stage".into()));
    }
    if !runs(Stage::Dpo) && spec.dpo.is_some() {
        out.push((vec!["dpo.*"], "run.stages has no dpo stage".into()));
    }
    out
}

/// Whether `key` is one of `keys` (`section.*` takes the whole section).
pub fn covers(keys: &[&str], key: &str) -> bool {
    keys.iter().any(|k| match k.strip_suffix('*') {
        Some(section) => key.starts_with(section),
        None => *k == key,
    })
}
