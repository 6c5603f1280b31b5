//! Checking a loaded spec's values: each problem is an error naming the field and where its
//! value came from.

use anyhow::Result;

use super::{BackendKind, FinalModel, LoadedSpec, Precision, Source, Stage};
use crate::error::bad_input;

impl LoadedSpec {
    fn invalid(&self, key: &str, problem: impl std::fmt::Display) -> anyhow::Error {
        let source = match self.source(key) {
            Source::Default => format!("{} (default)", self.path.display()),
            other => other.to_string(),
        };
        bad_input(format!("{source}: field `{key}`: {problem}"))
    }

    /// The `dpo` stage and its `[dpo]` section.
    fn validate_dpo(&self) -> Result<()> {
        let s = &self.spec;
        let stages = &s.run.stages;
        let Some(at) = stages.iter().position(|st| *st == Stage::Dpo) else { return Ok(()) };
        let Some(dpo) = &s.dpo else {
            return Err(
                self.invalid("dpo", "the dpo stage needs a [dpo] section naming the preference data (dpo.path)")
            );
        };
        if dpo.path.is_empty() {
            return Err(self.invalid("dpo.path", "is missing: name the preference data (prompt, chosen, rejected)"));
        }
        if stages.iter().position(|st| *st == Stage::Train).is_some_and(|train| train > at) {
            return Err(self.invalid("run.stages", "the dpo stage tunes the trained model: put it after `train`"));
        }
        if !(dpo.beta.is_finite() && dpo.beta > 0.0) {
            return Err(self.invalid("dpo.beta", format!("must be a finite number > 0, got {}", dpo.beta)));
        }
        match dpo.loss {
            super::DpoLoss::Robust if !(0.0..0.5).contains(&dpo.label_smoothing) => {
                return Err(self.invalid(
                    "dpo.label_smoothing",
                    format!("must be in [0, 0.5) for the robust loss, got {}", dpo.label_smoothing),
                ))
            }
            super::DpoLoss::Robust => {}
            _ if dpo.label_smoothing != 0.0 => {
                return Err(self.invalid(
                    "dpo.label_smoothing",
                    "applies to dpo.loss = \"robust\" only (TRL's other losses here do not take it)",
                ))
            }
            _ => {}
        }
        if !(0.0..1.0).contains(&dpo.val_fraction) || dpo.val_fraction.is_nan() {
            return Err(self.invalid("dpo.val_fraction", format!("must be in [0, 1), got {}", dpo.val_fraction)));
        }
        for (key, value) in
            [("dpo.epochs", dpo.epochs), ("dpo.batch_size", dpo.batch_size), ("dpo.grad_accum", dpo.grad_accum)]
        {
            if value == Some(0) {
                return Err(self.invalid(key, "must be at least 1"));
            }
        }
        if dpo.lr.is_some_and(|lr| !(lr.is_finite() && lr > 0.0)) {
            return Err(
                self.invalid("dpo.lr", format!("must be a finite number > 0, got {}", dpo.lr.unwrap_or_default()))
            );
        }
        if dpo.max_length.is_some_and(|max| max < 2) {
            return Err(self.invalid("dpo.max_length", "must be at least 2 tokens"));
        }
        let names = [
            ("dpo.prompt_field", &dpo.prompt_field),
            ("dpo.chosen_field", &dpo.chosen_field),
            ("dpo.rejected_field", &dpo.rejected_field),
        ];
        for (key, name) in names {
            if name.is_empty() || name.chars().any(char::is_control) {
                return Err(self.invalid(key, "must name a field (one line of printable text)"));
            }
        }
        if ![super::SelectMetric::ValLoss, super::SelectMetric::RewardAccuracy].contains(&dpo.select_metric) {
            return Err(self.invalid(
                "dpo.select_metric",
                "the dpo stage selects by its validation pairs: `val_loss` or `reward_accuracy`",
            ));
        }
        let dpo_validates = dpo.val_path.is_some() || dpo.val_fraction > 0.0;
        if !dpo_validates && (s.train.final_model == FinalModel::Best || s.train.early_stopping_patience > 0) {
            return Err(self.invalid(
                "dpo.val_fraction",
                "train.final = \"best\" and early stopping watch the validation pairs: set dpo.val_fraction or dpo.val_path",
            ));
        }
        if s.distributed.is_some() {
            return Err(
                self.invalid("distributed", "the dpo stage trains on one machine (run.devices may name several GPUs)")
            );
        }
        Ok(())
    }

    pub(super) fn validate(&self) -> Result<()> {
        let s = &self.spec;
        let positive_f = |key: &str, v: f64| -> Result<()> {
            if !v.is_finite() || v <= 0.0 {
                return Err(self.invalid(key, format!("must be a finite number > 0, got {v}")));
            }
            Ok(())
        };
        let non_negative_f = |key: &str, v: f64| -> Result<()> {
            if !v.is_finite() || v < 0.0 {
                return Err(self.invalid(key, format!("must be a finite number ≥ 0, got {v}")));
            }
            Ok(())
        };
        let positive = |key: &str, v: usize| -> Result<()> {
            if v == 0 {
                return Err(self.invalid(key, "must be at least 1"));
            }
            Ok(())
        };
        let probability = |key: &str, v: f64| -> Result<()> {
            if !(0.0..1.0).contains(&v) {
                return Err(self.invalid(key, format!("must be in [0, 1), got {v}")));
            }
            Ok(())
        };
        if s.run.name.is_empty() {
            return Err(self.invalid("run.name", "is missing: name the run (runs land in <runs_dir>/<name>/<run-id>/)"));
        }
        let reads_data = s.run.stages.iter().any(|stage| matches!(stage, Stage::Train | Stage::Eval));
        if s.data.path.is_empty() && (reads_data || s.tokenizer.train_vocab_size.is_some()) {
            return Err(self.invalid("data.path", "is missing: name the training data file"));
        }
        let names = [
            ("run.name", &s.run.name),
            ("data.prompt_field", &s.data.prompt_field),
            ("data.response_field", &s.data.response_field),
            ("data.instruction_field", &s.data.instruction_field),
            ("data.input_field", &s.data.input_field),
            ("data.output_field", &s.data.output_field),
            ("data.messages_field", &s.data.messages_field),
            ("data.text_field", &s.data.text_field),
        ];
        for (key, name) in names {
            if let Some(c) = name.chars().find(|c| c.is_control()) {
                return Err(self.invalid(
                    key,
                    format!("holds a control character (U+{:04X}); a name is one line of printable text", c as u32),
                ));
            }
        }
        if s.run.name.contains(['/', '\\', '@']) || s.run.name.starts_with('.') {
            return Err(self.invalid(
                "run.name",
                format!("`{}` cannot be a folder name (no /, \\, @ or leading dot)", s.run.name),
            ));
        }
        if s.run.stages.is_empty() {
            return Err(self.invalid("run.stages", "name at least one stage: train, dpo, eval, generate"));
        }
        if let Some(twice) =
            s.run.stages.iter().enumerate().find_map(|(i, st)| s.run.stages[..i].contains(st).then_some(st))
        {
            return Err(self.invalid("run.stages", format!("names `{}` twice", format!("{twice:?}").to_lowercase())));
        }
        self.validate_dpo()?;
        if s.run.stages.contains(&Stage::Generate) && s.generate.prompts.is_empty() {
            return Err(self.invalid("generate.prompts", "the generate stage needs at least one prompt"));
        }
        if s.train.batch_size.checked_mul(s.train.grad_accum).is_none() {
            return Err(self.invalid("train.grad_accum", "times train.batch_size is too large a step"));
        }
        if s.data.max_record_bytes == 0 {
            return Err(self.invalid("data.max_record_bytes", "must be at least 1"));
        }
        if s.data.max_template_steps == 0 {
            return Err(self.invalid("data.max_template_steps", "must be at least 1"));
        }
        for (field, split) in [("data.split", Some(&s.data.split)), ("data.val_split", s.data.val_split.as_ref())] {
            if split.is_some_and(|split| split.is_empty() || split.contains(['/', '\\']) || split.starts_with('.')) {
                return Err(self.invalid(field, "must name a split (train, test, validation, …)"));
            }
        }
        if !(0.0..1.0).contains(&s.data.val_fraction) || s.data.val_fraction.is_nan() {
            return Err(self.invalid("data.val_fraction", format!("must be in [0, 1), got {}", s.data.val_fraction)));
        }
        let chat = &s.data.chat_template;
        let jinja = ["chatml", "hf"].contains(&chat.as_str()) || chat.ends_with(".jinja");
        if chat != "simple" && !jinja && !(chat.contains("{role}") && chat.contains("{content}")) {
            return Err(self.invalid(
                "data.chat_template",
                "must be `simple`, `chatml`, `hf` (the model's tokenizer_config.json), a path to a `.jinja` file, or a format string with `{role}` and `{content}`",
            ));
        }
        if !s.data.prompt_template.contains("{prompt}") {
            return Err(self.invalid("data.prompt_template", "must contain `{prompt}`, where the prompt goes"));
        }
        positive_f("optimizer.lr", s.optimizer.lr)?;
        probability("optimizer.betas", s.optimizer.betas[0])?;
        probability("optimizer.betas", s.optimizer.betas[1])?;
        positive_f("optimizer.eps", s.optimizer.eps)?;
        non_negative_f("optimizer.weight_decay", s.optimizer.weight_decay)?;
        non_negative_f("optimizer.grad_clip", s.optimizer.grad_clip)?;
        if !(0.0..=1.0).contains(&s.optimizer.min_lr_ratio) {
            return Err(
                self.invalid("optimizer.min_lr_ratio", format!("must be in [0, 1], got {}", s.optimizer.min_lr_ratio))
            );
        }
        positive("train.epochs", s.train.epochs)?;
        positive("train.batch_size", s.train.batch_size)?;
        positive("train.grad_accum", s.train.grad_accum)?;
        positive("train.log_every", s.train.log_every)?;
        positive("train.keep_checkpoints", s.train.keep_checkpoints)?;
        positive("generate.max_new_tokens", s.generate.max_new_tokens)?;
        positive("eval.max_new_tokens", s.eval.max_new_tokens)?;
        if let Some(max) = s.train.max_length {
            if max < 2 {
                return Err(self.invalid("train.max_length", "must be at least 2 tokens"));
            }
        }
        non_negative_f("generate.temperature", s.generate.temperature)?;
        non_negative_f("train.early_stopping_min_delta", s.train.early_stopping_min_delta)?;
        let has_validation = s.data.val_fraction > 0.0 || s.data.has_val_files();
        if s.train.final_model == FinalModel::Best && !has_validation {
            return Err(self.invalid(
                "train.final",
                "`best` is chosen on the validation set: set data.val_fraction, data.val_path or data.val_split",
            ));
        }
        if s.train.select_metric == super::SelectMetric::RewardAccuracy {
            return Err(self.invalid(
                "train.select_metric",
                "reward_accuracy measures preference pairs: it is dpo.select_metric's, not the train stage's",
            ));
        }
        if s.train.select_metric.scores_answers() && s.eval.responses == 0 {
            return Err(self.invalid(
                "train.select_metric",
                "selecting by the answers' scores needs eval.responses: how many held-out prompts to answer",
            ));
        }
        if s.train.early_stopping_patience > 0 && !has_validation {
            return Err(self.invalid(
                "train.early_stopping_patience",
                "early stopping watches the validation set: set data.val_fraction, data.val_path or data.val_split",
            ));
        }
        if !(s.generate.top_p > 0.0 && s.generate.top_p <= 1.0) {
            return Err(self.invalid("generate.top_p", format!("must be in (0, 1], got {}", s.generate.top_p)));
        }
        let m = &s.model;
        let arch = [m.layers, m.heads, m.embd, m.context, m.kv_heads, m.inner];
        let new_model = arch.iter().any(Option::is_some) || m.family.is_some();
        let sources = m.path.is_some() as usize + m.hub.is_some() as usize + new_model as usize;
        if sources != 1 {
            return Err(self.invalid(
                "model",
                "give exactly one of: `path` (a HF model directory), `hub` (a hub id), or `layers`, `heads`, `embd` and `context` (a new model, with `family`)",
            ));
        }
        let family = m.family.unwrap_or_default();
        if family == super::NewModelFamily::Gpt2 {
            for (key, v) in [("model.kv_heads", m.kv_heads), ("model.inner", m.inner)] {
                if v.is_some() {
                    return Err(self.invalid(key, "is a Llama setting; GPT-2's heads each have their keys and values, and its MLP is 4·embd wide (set model.family = \"llama\")"));
                }
            }
        }
        if m.path.is_none() && m.hub.is_none() {
            for (key, v) in [
                ("model.layers", m.layers),
                ("model.heads", m.heads),
                ("model.embd", m.embd),
                ("model.context", m.context),
            ] {
                match v {
                    None => return Err(self.invalid(key, "is needed to initialise a new model")),
                    Some(v) => positive(key, v)?,
                }
            }
            if !m.embd.unwrap().is_multiple_of(m.heads.unwrap()) {
                return Err(self.invalid(
                    "model.embd",
                    format!("{} is not divisible by model.heads = {}", m.embd.unwrap(), m.heads.unwrap()),
                ));
            }
            let heads = m.heads.unwrap();
            if let Some(kv_heads) = m.kv_heads {
                positive("model.kv_heads", kv_heads)?;
                if !heads.is_multiple_of(kv_heads) {
                    return Err(
                        self.invalid("model.kv_heads", format!("{kv_heads} does not divide model.heads = {heads}"))
                    );
                }
            }
            if let Some(inner) = m.inner {
                positive("model.inner", inner)?;
            }
            if family == super::NewModelFamily::Llama && !(m.embd.unwrap() / heads).is_multiple_of(2) {
                return Err(self.invalid(
                    "model.heads",
                    format!(
                        "model.embd / model.heads = {} must be even for rotary embeddings",
                        m.embd.unwrap() / heads
                    ),
                ));
            }
            // The vocabulary is not known yet (the tokenizer may be trained); count it as GPT-2's.
            if m.new_model_config(50257).is_some_and(|c| c.checked_num_params().is_none()) {
                return Err(self.invalid(
                    "model.embd",
                    "with model.layers and model.context: more parameters than can be counted",
                ));
            }
        }
        if let Some(p) = m.dropout {
            probability("model.dropout", p)?;
        }
        let t = &s.tokenizer;
        if t.path.is_some() && t.train_vocab_size.is_some() {
            return Err(self.invalid("tokenizer", "give `path` or `train_vocab_size`, not both"));
        }
        if t.path.is_none() && t.train_vocab_size.is_none() && m.path.is_none() && m.hub.is_none() {
            return Err(self.invalid("tokenizer", "a new model needs `tokenizer.path` or `tokenizer.train_vocab_size`"));
        }
        if let Some(v) = t.train_vocab_size {
            if v < 257 {
                return Err(self.invalid(
                    "tokenizer.train_vocab_size",
                    format!("must be at least 257 (256 bytes + EOS), got {v}"),
                ));
            }
            // The BPE trainer reserves memory for every entry asked before it learns any.
            const MOST: usize = 1 << 20;
            if v > MOST {
                return Err(self.invalid(
                    "tokenizer.train_vocab_size",
                    format!("must be at most {MOST} (the trainer reserves memory for every entry asked), got {v}"),
                ));
            }
        }
        if s.train.packing && s.data.kind == super::DataKind::Text {
            return Err(self.invalid(
                "train.packing",
                "plain-text documents are already cut into full max_length blocks; packing is for pair, alpaca and chat examples",
            ));
        }
        if s.train.packing && s.train.group_by_length {
            return Err(self.invalid(
                "train.packing",
                "and train.group_by_length both remove padding; choose one (packing leaves none)",
            ));
        }
        if let Some(lora) = &s.lora {
            positive("lora.rank", lora.rank)?;
            positive_f("lora.alpha", lora.alpha)?;
            probability("lora.dropout", lora.dropout)?;
            crate::model::lora::Target::check_names(&lora.targets).map_err(|why| self.invalid("lora.targets", why))?;
            if m.path.is_none() && m.hub.is_none() {
                return Err(self.invalid(
                    "lora",
                    "adapters train on a pretrained base model: set model.path or model.hub (a new model trains all its weights)",
                ));
            }
        }
        if let Some(twice) =
            s.run.devices.iter().enumerate().find_map(|(i, d)| s.run.devices[..i].contains(d).then_some(d))
        {
            return Err(self.invalid("run.devices", format!("names device {twice} twice (one peer per device)")));
        }
        if let Some(&large) = s.run.devices.iter().find(|&&d| d > u16::MAX as usize) {
            return Err(self.invalid("run.devices", format!("device {large} is not a device index")));
        }
        if let Some(d) = &s.distributed {
            positive("distributed.nodes", d.nodes)?;
            if d.rank >= d.nodes {
                return Err(self.invalid(
                    "distributed.rank",
                    format!("is {}, but ranks run 0..{} for {} nodes", d.rank, d.nodes, d.nodes),
                ));
            }
            positive_f("distributed.timeout_s", d.timeout_s)?;
            let Ok(bind) = d.bind.parse::<std::net::IpAddr>() else {
                return Err(self.invalid(
                    "distributed.bind",
                    format!("`{}` is not an IP address to listen on (127.0.0.1, 0.0.0.0, 10.0.0.2, …)", d.bind),
                ));
            };
            if d.nodes > 1 {
                let port = d.orchestrator.rsplit_once(':').and_then(|(host, port)| (!host.is_empty()).then_some(port));
                if port.and_then(|p| p.parse::<u16>().ok()).is_none_or(|p| p == 0) {
                    return Err(self.invalid(
                        "distributed.orchestrator",
                        format!("`{}` is not host:port (where `pipe orchestrator --port P` listens)", d.orchestrator),
                    ));
                }
                if d.host.is_empty() || d.host.contains(['/', ' ']) {
                    return Err(self.invalid("distributed.host", format!("`{}` is not a host name or address", d.host)));
                }
                if d.port == 0 {
                    return Err(self.invalid(
                        "distributed.port",
                        "is missing: the port this node serves its share of each all-reduce on",
                    ));
                }
                let host_is_loopback =
                    d.host == "localhost" || d.host.parse::<std::net::IpAddr>().is_ok_and(|h| h.is_loopback());
                if bind.is_loopback() && !host_is_loopback {
                    return Err(self.invalid(
                        "distributed.bind",
                        format!(
                            "is {bind}, a loopback address (the default), so other nodes cannot reach this one at distributed.host = `{}`; \
                             set distributed.bind to the address to listen on (`0.0.0.0` for every interface, on a private network: the collective is not authenticated)",
                            d.host
                        ),
                    ));
                }
            }
        }
        let compiled = match s.run.backend {
            BackendKind::Cpu => true,
            BackendKind::Cuda => cfg!(feature = "cuda"),
            BackendKind::Wgpu => cfg!(feature = "wgpu"),
        };
        if s.generate.precision == Precision::Bf16 && s.run.backend != BackendKind::Cpu {
            return Err(self.invalid(
                "generate.precision",
                "\"bf16\" decodes with bf16 weights on the CPU; it needs run.backend = \"cpu\" (or set it to \"f32\")",
            ));
        }
        if !compiled {
            let name = s.run.backend.name();
            return Err(self.invalid(
                "run.backend",
                format!("`{name}` is not compiled into this pipe; rebuild with `--features {name}`"),
            ));
        }
        Ok(())
    }
}
