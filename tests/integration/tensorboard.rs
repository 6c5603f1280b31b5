//! TensorBoard event files, read back as TensorBoard reads them: the TFRecord framing and its
//! checksums, the tags and steps of every scalar, the samples as text, and the spec as
//! hyperparameters.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common;
use crate::common::{pipe, stderr};
use pipe::tensorboard::{self, proto::Event, HPARAMS_END_TAG, HPARAMS_START_TAG};
use prost::Message;

fn spec() -> String {
    common::spec(
        r#"
[run]
name = "tb"

[data]
val_fraction = 0.2
prompt_template = "{prompt}\n"

[train]
epochs = 2
batch_size = 4
eval_every = 3

[generate]
prompts = ["What is the capital of Kenya?", "Name a colour"]
max_new_tokens = 5
"#,
    )
}

fn completed_run(dir: &Path) -> PathBuf {
    let data = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sft.jsonl")).unwrap();
    std::fs::write(dir.join("train.jsonl"), data.lines().take(40).collect::<Vec<_>>().join("\n")).unwrap();
    std::fs::write(dir.join("spec.toml"), spec()).unwrap();
    let out = pipe(dir, &["run", "spec.toml"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::read_dir(dir.join("runs/tb")).unwrap().next().unwrap().unwrap().path()
}

/// Each tag's (step, value) pairs, in file order.
fn scalars(events: &[Event]) -> BTreeMap<String, Vec<(i64, f32)>> {
    let mut out: BTreeMap<String, Vec<(i64, f32)>> = BTreeMap::new();
    for event in events {
        for value in event.summary.iter().flat_map(|s| &s.value) {
            if let Some(v) = value.simple_value {
                out.entry(value.tag.clone()).or_default().push((event.step, v));
            }
        }
    }
    out
}

fn metric_steps(run: &Path, field: &str) -> Vec<(i64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|m| m.get(field).is_some() && m.get("eval").is_none())
        .map(|m| (m["step"].as_i64().unwrap(), m[field].as_f64().unwrap()))
        .collect()
}

#[test]
fn a_run_writes_scalars_samples_and_hparams_that_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let run = completed_run(dir.path());
    let path = tensorboard::find(&run).expect("an event file in the run folder");
    assert!(path.file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents."));
    let events = tensorboard::read(&path).unwrap();
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"), "the version record comes first");

    let scalars = scalars(&events);
    // Every step record, with the loss of metrics.jsonl (to f32), at the same step.
    let losses = metric_steps(&run, "loss");
    let logged: Vec<(i64, f64)> = scalars["train/loss"].iter().map(|&(s, v)| (s, v as f64)).collect();
    assert_eq!(logged.len(), losses.len());
    for ((s1, v1), (s2, v2)) in logged.iter().zip(&losses) {
        assert_eq!(s1, s2);
        assert!((v1 - v2).abs() <= 1e-6 * v2.abs(), "{v1} {v2}");
    }
    for tag in ["train/lr", "train/grad_norm", "train/tokens_per_s"] {
        assert_eq!(scalars[tag].len(), losses.len(), "{tag}");
    }
    let val: Vec<i64> = scalars["val/loss"].iter().map(|&(s, _)| s).collect();
    assert_eq!(val, metric_steps(&run, "val_loss").iter().map(|&(s, _)| s).collect::<Vec<_>>());
    // Every 3 steps and at each epoch's end (8 steps an epoch), once each.
    assert_eq!(val, [3, 6, 8, 9, 12, 15, 16]);
    assert_eq!(scalars["val/ppl"].len(), val.len());
    let last_step = losses.last().unwrap().0;
    assert_eq!(scalars["eval/val_loss"], vec![(last_step, scalars["val/loss"].last().unwrap().1)]);

    // The samples as text, one tag each, at the final step.
    let texts: Vec<(String, i64, String)> = events
        .iter()
        .flat_map(|e| e.summary.iter().flat_map(|s| &s.value).map(move |v| (e.step, v)))
        .filter(|(_, v)| {
            v.metadata.as_ref().and_then(|m| m.plugin_data.as_ref()).is_some_and(|p| p.plugin_name == "text")
        })
        .map(|(step, v)| {
            let tensor = v.tensor.as_ref().unwrap();
            assert_eq!(tensor.dtype, 7, "DT_STRING");
            (v.tag.clone(), step, String::from_utf8(tensor.string_val[0].clone()).unwrap())
        })
        .collect();
    assert_eq!(texts.len(), 2);
    assert_eq!((texts[0].0.as_str(), texts[0].1), ("samples/0", last_step));
    assert!(texts[0].2.contains("What is the capital of Kenya?"), "{}", texts[0].2);

    // The resolved spec as hyperparameters, and how the run ended.
    let plugin_content = |tag: &str| -> Vec<pipe::tensorboard::proto::HParamsPluginData> {
        events
            .iter()
            .flat_map(|e| e.summary.iter().flat_map(|s| &s.value))
            .filter(|v| v.tag == tag)
            .map(|v| {
                let data = v.metadata.as_ref().unwrap().plugin_data.as_ref().unwrap();
                assert_eq!(data.plugin_name, "hparams");
                Message::decode(&data.content[..]).unwrap()
            })
            .collect()
    };
    let start = plugin_content(HPARAMS_START_TAG);
    assert_eq!(start.len(), 1);
    let hparams = &start[0].session_start_info.as_ref().unwrap().hparams;
    assert_eq!(hparams["train.epochs"].number_value, Some(2.0));
    assert_eq!(hparams["optimizer.lr"].number_value, Some(1e-4));
    assert_eq!(hparams["run.name"].string_value.as_deref(), Some("tb"));
    assert_eq!(hparams["train.group_by_length"].bool_value, Some(false));
    let end = plugin_content(HPARAMS_END_TAG);
    assert_eq!(end.len(), 1);
    assert_eq!(end[0].session_end_info.as_ref().unwrap().status, 1, "STATUS_SUCCESS");
}

#[test]
fn a_damaged_record_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let run = completed_run(dir.path());
    let path = tensorboard::find(&run).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let error = tensorboard::read(&path).unwrap_err();
    assert!(format!("{error:#}").contains(path.to_str().unwrap()), "{error:#}");
}
