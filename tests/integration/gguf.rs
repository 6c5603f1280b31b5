//! `pipe export --format gguf` against llama.cpp, without llama.cpp: for each test fixture
//! family and each quant, the file pipe writes now must be the one llama.cpp was checked on
//! (`tests/fixtures/gguf/*.json`, from `scripts/make_gguf_reference.py`: there pipe's tensors were
//! byte-identical to llama.cpp's own converter's and llama.cpp loaded the file), read back by
//! pipe's reader — metadata, tensor names, types, dimensions and bytes (SHA-256) — and pipe's
//! model must agree with what llama.cpp computed from it: the same tokens for the texts,
//! next-token log-probabilities within the quant's tolerance (relative to the largest), and
//! for f32 and f16 the same greedy continuation.

use std::path::Path;

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use pipe::data::Tok;
use pipe::export::gguf::file::{self, Value};
use pipe::generate::{Generator, Sampling};
use pipe::model::{CausalLm, Model};
use sha2::{Digest, Sha256};

use crate::common::{pipe, repo, stderr};

const FAMILIES: [&str; 4] = ["gpt2", "llama", "qwen2", "qwen3"];

/// The largest next-token log-probability difference to llama.cpp allowed, as a fraction of
/// the largest log-probability: f32 as the issue asks; the others a little above what was
/// measured (docs/gguf.md).
fn tolerance(quant: &str) -> f64 {
    match quant {
        "f32" => 1e-3,
        "f16" => 1e-3,
        "bf16" => 5e-3,
        "q8_0" => 2e-2,
        other => panic!("no tolerance for {other}"),
    }
}

fn reference(family: &str, quant: &str) -> serde_json::Value {
    let path = repo().join(format!("tests/fixtures/gguf/{family}-{quant}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn export(source: &Path, quant: &str, out: &Path) {
    let output = pipe(
        &repo(),
        &[
            "export",
            &source.display().to_string(),
            "--format",
            "gguf",
            "--quant",
            quant,
            "--out",
            &out.display().to_string(),
        ],
        &[],
    );
    assert!(output.status.success(), "{}", stderr(&output));
}

/// A metadata value as the reference records it: long arrays by length and the SHA-256 of
/// their compact JSON.
fn summary(value: &Value) -> serde_json::Value {
    fn json(value: &Value) -> serde_json::Value {
        match value {
            Value::U8(v) => (*v).into(),
            Value::I8(v) => (*v).into(),
            Value::U16(v) => (*v).into(),
            Value::I16(v) => (*v).into(),
            Value::U32(v) => (*v).into(),
            Value::I32(v) => (*v).into(),
            Value::F32(v) => f64::from(*v).into(),
            Value::Bool(v) => (*v).into(),
            Value::String(v) => v.clone().into(),
            Value::Array(items) => items.iter().map(json).collect(),
            Value::U64(v) => (*v).into(),
            Value::I64(v) => (*v).into(),
            Value::F64(v) => (*v).into(),
        }
    }
    match value {
        Value::Array(items) if items.len() > 16 => {
            let text = serde_json::to_string(&json(value)).unwrap();
            serde_json::json!({"len": items.len(), "sha256": hex(&Sha256::digest(text.as_bytes()))})
        }
        other => json(other),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn assert_file_is_the_reference(bytes: &[u8], r: &serde_json::Value, what: &str) {
    let read = file::read(bytes).unwrap();
    let want = r["metadata"].as_object().unwrap();
    let mut keys: Vec<&String> = read.metadata.iter().map(|(k, _)| k).collect();
    keys.sort();
    let mut want_keys: Vec<&String> = want.keys().collect();
    want_keys.sort();
    assert_eq!(keys, want_keys, "{what}: metadata keys");
    for (key, value) in &read.metadata {
        let (got, want) = (summary(value), &want[key]);
        match (got.as_f64(), want.as_f64()) {
            (Some(g), Some(w)) if !got.is_u64() => {
                assert!((g - w).abs() <= 1e-12 * w.abs(), "{what}: {key} {g} != {w}")
            }
            _ => assert_eq!(&got, want, "{what}: {key}"),
        }
    }
    let tensors = r["tensors"].as_array().unwrap();
    assert_eq!(read.tensors.len(), tensors.len(), "{what}: tensor count");
    for (got, want) in read.tensors.iter().zip(tensors) {
        assert_eq!(got.name, want["name"].as_str().unwrap(), "{what}: tensor order");
        assert_eq!(got.ty.name(), want["type"].as_str().unwrap(), "{what}: {}", got.name);
        let dims: Vec<u64> = want["dims"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
        assert_eq!(got.dims, dims, "{what}: {} dims", got.name);
        let sha = hex(&Sha256::digest(&bytes[got.start..got.start + got.len]));
        assert_eq!(sha, want["sha256"].as_str().unwrap(), "{what}: {} bytes", got.name);
    }
}

/// pipe's next-token log-probabilities after each position of `ids`: [position][vocab].
fn log_probs(model: &Model<Flex>, ids: &[u32]) -> Vec<Vec<f64>> {
    let mut cache = model.new_cache();
    ids.iter()
        .map(|&id| {
            let token =
                Tensor::<Flex, 2, Int>::from_data(TensorData::new(vec![id as i32], [1, 1]), &Default::default());
            let logits: Vec<f32> = model.next_logits(token, &mut cache).into_data().to_vec().unwrap();
            let max = logits.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
            logits.iter().map(|&v| v as f64 - max - sum.ln()).collect()
        })
        .collect()
}

fn u32s(value: &serde_json::Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

#[test]
fn gguf_files_are_what_llama_cpp_was_checked_on_and_agree_with_it() {
    let out = tempfile::tempdir().unwrap();
    for family in FAMILIES {
        let source = repo().join(format!("tests/fixtures/tiny-{family}"));
        let model = <Model<Flex> as CausalLm<Flex>>::load(&source, None, &Default::default()).unwrap();
        let tok = Tok::load(&source.join("tokenizer.json")).unwrap();
        for quant in ["f32", "f16", "bf16", "q8_0"] {
            let what = format!("{family} {quant}");
            let r = reference(family, quant);
            let path = out.path().join(format!("{family}-{quant}.gguf"));
            export(&source, quant, &path);
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(bytes.len() as u64, r["bytes"].as_u64().unwrap(), "{what}: file size");
            assert_file_is_the_reference(&bytes, &r, &what);

            let llama = &r["llama_cpp"];
            for (text, want) in r["texts"].as_array().unwrap().iter().zip(llama["tokenized"].as_array().unwrap()) {
                assert_eq!(tok.encode(text.as_str().unwrap()).unwrap(), u32s(want), "{what}: tokens of {text}");
            }
            let keep = u32s(&r["keep"]);
            let mut worst: f64 = 0.0;
            for (case, ids) in r["ids"].as_array().unwrap().iter().enumerate() {
                let ids = u32s(ids);
                let ours = log_probs(&model, &ids);
                let theirs = llama["logprobs"][case].as_array().unwrap();
                let largest = ours.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs()));
                for (position, row) in theirs.iter().enumerate() {
                    for (k, want) in row.as_array().unwrap().iter().enumerate() {
                        let got = ours[position][keep[k] as usize];
                        worst = worst.max((got - want.as_f64().unwrap()).abs() / largest);
                    }
                }
                if quant == "f32" || quant == "f16" {
                    let want = u32s(&llama["greedy"][case]);
                    let mut generator = Generator::new(&model, &Default::default(), 0);
                    let got = generator.generate(&ids, want.len(), Sampling::GREEDY, &[], |_| true);
                    assert_eq!(got, want, "{what}: greedy continuation of case {case}");
                }
            }
            eprintln!("{what}: largest log-probability difference to llama.cpp {worst:.2e} of the largest");
            assert!(worst <= tolerance(quant), "{what}: log-probabilities {worst:.2e} of the largest from llama.cpp's");
        }
    }
}

#[test]
fn a_model_gguf_cannot_express_is_refused_naming_why() {
    let dir = tempfile::tempdir().unwrap();
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &str); 2] = [
        ("whitespace", |t| t["pre_tokenizer"] = serde_json::json!({"type": "Whitespace"}), "pre-tokenizer"),
        ("byte-fallback", |t| t["model"]["byte_fallback"] = true.into(), "SentencePiece-style BPE"),
    ];
    for (name, edit, says) in cases {
        let model = dir.path().join(name);
        std::fs::create_dir(&model).unwrap();
        let source = repo().join("tests/fixtures/tiny-llama");
        for entry in std::fs::read_dir(&source).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
        }
        let mut tokenizer: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(model.join("tokenizer.json")).unwrap()).unwrap();
        edit(&mut tokenizer);
        std::fs::write(model.join("tokenizer.json"), tokenizer.to_string()).unwrap();
        let out_file = dir.path().join(format!("{name}.gguf"));
        let output = pipe(
            dir.path(),
            &["export", &model.display().to_string(), "--format", "gguf", "--out", &out_file.display().to_string()],
            &[],
        );
        assert_eq!(output.status.code(), Some(2), "{name}: {}", stderr(&output));
        assert!(
            stderr(&output).contains("cannot write this model as GGUF") && stderr(&output).contains(says),
            "{}",
            stderr(&output)
        );
        assert!(!out_file.exists(), "{name}: a refused export leaves no file");
    }
}
