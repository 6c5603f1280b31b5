//! Response metrics against their references: exact match and token F1 as the SQuAD v1.1
//! evaluation script computes them, ROUGE-L as Google's rouge-score does
//! (tests/fixtures/response_metrics.json, made by scripts/make_response_metrics_reference.py).

use pipe::data::Sequence;
use pipe::response_metrics::{prompt_and_reference, ResponseScores};

#[test]
fn scores_match_squad_and_rouge_score() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/response_metrics.json");
    let cases: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let (p, r) = (case["prediction"].as_str().unwrap(), case["reference"].as_str().unwrap());
        let ours = ResponseScores::of(p, r);
        for (name, value) in [("exact_match", ours.exact_match), ("token_f1", ours.token_f1), ("rouge_l", ours.rouge_l)]
        {
            let reference = case[name].as_f64().unwrap();
            assert!((value - reference).abs() < 1e-12, "{name} of {p:?} vs {r:?}: {value} != {reference}");
        }
    }
}

#[test]
fn the_prompt_is_what_comes_before_the_last_trained_span() {
    // Two turns: user 1-2, assistant 3-4 + EOS (9), user 5, assistant 6 + EOS.
    let ids = vec![1, 2, 3, 4, 9, 5, 6, 9];
    let trained = vec![false, false, true, true, true, false, true, true];
    let sequence = Sequence::new(ids, trained);
    let (prompt, reference) = prompt_and_reference(&sequence, 9).unwrap();
    assert_eq!(prompt, [1, 2, 3, 4, 9, 5]);
    assert_eq!(reference, [6]);
    assert!(prompt_and_reference(&Sequence::all_trained(vec![1, 2, 3]), 9).is_none(), "plain text has no prompt");
}
