//! `config.json` fields: those that change GPT-2's arithmetic are implemented (the model still
//! matches transformers) or refused naming the key and the value; none is silently ignored.

use crate::common::{batch_loss, fixture_dir, reference, sequences_of};
use burn::backend::Flex;
use pipe::error::is_bad_input;
use pipe::model::{hf, Gpt2};
use serde_json::{json, Value};

/// The fixture with `edit` applied to its config.json.
fn with_config(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture_dir().join(file), dir.path().join(file)).unwrap();
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("config.json")).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

fn load(dir: &tempfile::TempDir) -> anyhow::Result<Gpt2<Flex>> {
    hf::load::<Flex>(dir.path(), None, &Default::default()).map(|(_, model)| model)
}

#[test]
fn settings_pipe_does_not_compute_are_refused_naming_key_and_value() {
    let refused: [(&str, Value); 14] = [
        ("scale_attn_weights", json!(false)),
        ("scale_attn_by_inverse_layer_idx", json!(true)),
        ("reorder_and_upcast_attn", json!(true)),
        ("tie_word_embeddings", json!(false)),
        ("add_cross_attention", json!(true)),
        ("is_encoder_decoder", json!(true)),
        ("n_inner", json!(100)),
        ("n_head", json!(5)),
        ("activation_function", json!("relu")),
        ("model_type", json!("gpt_neo")),
        ("resid_pdrop", json!(1.5)),
        ("attn_pdrop", json!("0.1")),
        ("layer_norm_epsilon", json!(-1.0)),
        ("n_layer", json!(0)),
    ];
    for (key, value) in refused {
        let dir = with_config(|c| {
            c.insert(key.to_string(), value.clone());
        });
        let error = load(&dir).expect_err(key);
        let message = format!("{error:#}");
        assert!(is_bad_input(&error), "{key}: {message}");
        assert!(message.contains(&format!("`{key}` = {value}")) && message.contains("config.json"), "{key}: {message}");
    }
}

#[test]
fn settings_that_keep_gpt2s_arithmetic_load_to_the_same_model() {
    let want = reference()["batch_loss"].as_f64().unwrap();
    let edits: [(&str, Value); 7] = [
        ("n_inner", json!(128)),
        ("activation_function", json!("gelu_pytorch_tanh")),
        ("n_ctx", json!(64)),
        ("use_cache", json!(false)),
        ("summary_type", json!("last")),
        ("pad_token_id", json!(50256)),
        ("dtype", json!("bfloat16")),
    ];
    for (key, value) in edits {
        let dir = with_config(|c| {
            c.insert(key.to_string(), value.clone());
        });
        let model = load(&dir).unwrap_or_else(|e| panic!("{key} = {value}: {e:#}"));
        let loss = batch_loss(&model, &sequences_of(&reference()));
        assert!((loss - want).abs() < 1e-4, "{key} = {value}: loss {loss}, transformers {want}");
    }
}

#[test]
fn the_three_dropouts_are_read_apart_and_written_back() {
    let dir = with_config(|c| {
        c.insert("embd_pdrop".into(), json!(0.05));
        c.insert("resid_pdrop".into(), json!(0.1));
        c.insert("attn_pdrop".into(), json!(0.2));
    });
    let model = load(&dir).unwrap();
    assert_eq!(model.dropout.prob, 0.05);
    assert!(model.h.iter().all(|b| b.dropout.prob == 0.1 && b.attn.attn_pdrop == 0.2));
    let out = tempfile::tempdir().unwrap();
    hf::save(&model, None, out.path()).unwrap();
    let config = hf::read_config(out.path()).unwrap();
    assert_eq!((config.embd_pdrop, config.resid_pdrop, config.attn_pdrop), (0.05, 0.1, 0.2));
    let absent = with_config(|c| {
        for key in ["embd_pdrop", "resid_pdrop", "attn_pdrop"] {
            c.remove(key);
        }
    });
    let config = hf::read_config(absent.path()).unwrap();
    assert_eq!((config.embd_pdrop, config.resid_pdrop, config.attn_pdrop), (0.1, 0.1, 0.1), "transformers' defaults");
    let overridden = hf::load::<Flex>(dir.path(), Some(0.0), &Default::default()).unwrap().1;
    assert!(
        overridden.dropout.prob == 0.0 && overridden.h.iter().all(|b| b.attn.attn_pdrop == 0.0),
        "model.dropout sets all three"
    );
}
