//! Decoding with bf16 weights (`--precision bf16` for generate, score and chat): against
//! transformers' f32 reference on the tiny fixture and against pipe's own f32 model.
//! Tolerances: per-token NLL within 0.01 absolute and each text's loss within 0.1% of
//! transformers' (the weights carry 8 significant bits; docs/fidelity.md's table has the
//! measured differences); the same greedy continuation; feeding a prompt at once or one token
//! at a time gives bit-identical logits.

use crate::common::{fed_at_once_or_token_by_token_alike, fixture_dir, floats, ids, pipe, reference, stdout};
use burn::backend::Flex;
use pipe::generate::{Decode, Generator, OnDevice, Sampling};
use pipe::model::{hf, CausalLm, Gpt2};

fn model() -> Gpt2<Flex> {
    hf::load::<Flex>(&fixture_dir(), None, &Default::default()).unwrap().1
}

#[test]
fn bf16_nll_is_within_bf16_resolution_of_transformers() {
    let r = reference();
    let decoder = model().bf16_decoder();
    let f32_model = model();
    let on_device = OnDevice::<Flex, _> { model: &f32_model, device: Default::default() };
    for (i, encoded) in r["encoded"].as_array().unwrap().iter().enumerate() {
        let x = ids(encoded);
        let (got, exact) = (decoder.token_nll(&x), on_device.token_nll(&x));
        let want = floats(&r["nll"][i]);
        assert_eq!(got.len(), want.len());
        for (j, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((*g as f64 - w).abs() < 0.01, "text {i} token {j}: bf16 NLL {g}, transformers {w}");
        }
        let mean = got.iter().map(|&v| v as f64).sum::<f64>() / got.len() as f64;
        let loss = r["loss"][i].as_f64().unwrap();
        assert!((mean - loss).abs() < 0.001 * loss, "text {i}: bf16 loss {mean}, transformers {loss}");
        assert!(got != exact, "text {i}: bf16 NLL equal to f32's: the weights were not rounded");
    }
}

#[test]
fn feeding_a_prompt_at_once_or_token_by_token_gives_the_same_logits() {
    let prompt = ids(&reference()["encoded"][1]);
    fed_at_once_or_token_by_token_alike(&model().bf16_decoder(), &prompt, "GPT-2");
}

/// Greedy continuation of the fixture's prompt with bf16 weights: the same ids as transformers'
/// f32 model (20 tokens, through the cache).
#[test]
fn bf16_greedy_continuation_follows_transformers() {
    let g = &reference()["greedy"];
    let (prompt, want) = (ids(&g["prompt_ids"]), ids(&g["new_ids"]));
    let decoder = model().bf16_decoder();
    let got = Generator::with(&decoder, 0).generate(&prompt, want.len(), Sampling::GREEDY, &[], |_| true);
    assert_eq!(got, want);
}

#[test]
fn generate_and_score_take_precision_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = fixture_dir();
    let g = &reference()["greedy"];
    let args = |precision: &str| {
        let max = g["max_new_tokens"].to_string();
        let prompt = g["prompt"].as_str().unwrap().to_string();
        let fixture = fixture.to_str().unwrap().to_string();
        let args = [
            "generate",
            &fixture,
            "--prompt",
            &prompt,
            "--greedy",
            "--max-new-tokens",
            &max,
            "--json",
            "--precision",
            precision,
        ];
        let out = pipe(dir.path(), &args, &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let record: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        ids(&record["new_ids"])
    };
    assert_eq!(args("bf16"), ids(&g["new_ids"]));

    let text = reference()["texts"][0].as_str().unwrap().to_string();
    let score = |precision: &str| {
        let fixture = fixture.to_str().unwrap();
        let out = pipe(dir.path(), &["score", fixture, "--json", "--text", &text, "--precision", precision], &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let record: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        record["overall"]["loss"].as_f64().unwrap()
    };
    let (f32_loss, bf16_loss) = (score("f32"), score("bf16"));
    assert!((f32_loss - reference()["loss"][0].as_f64().unwrap()).abs() < 1e-4);
    assert!(
        (bf16_loss - f32_loss).abs() < 0.01 * f32_loss && bf16_loss != f32_loss,
        "bf16 {bf16_loss}, f32 {f32_loss}"
    );

    let out = pipe(dir.path(), &["score", fixture.to_str().unwrap(), "--text", "hi", "--precision", "f16"], &[]);
    assert_eq!(out.status.code(), Some(2), "an unknown precision is a usage error");
}
