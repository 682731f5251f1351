//! RoPE scaling variants against transformers: every inverse frequency and the attention factor
//! of each case in tests/data/rope/reference.json (written by reference.py with transformers'
//! own `modeling_rope_utils`, which computes in f32 — hence the 1e-6 relative tolerance), plus
//! the errors a bad config gets.

use serde_json::Value;
use spectune::nn::RopeScaling;

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/rope/reference.json")).expect("reference.json");
    let v: Value = serde_json::from_str(&text).expect("valid JSON");
    v["cases"].as_array().expect("cases").clone()
}

#[test]
fn every_variant_matches_transformers() {
    let cases = cases();
    assert!(cases.len() >= 9, "the reference lost cases");
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let params = c["rope_parameters"].as_object().unwrap();
        let max_pos = c["max_position_embeddings"].as_f64();
        let s = RopeScaling::from_params(params, max_pos).unwrap_or_else(|e| panic!("{name}: {e}"));
        let dim = c["rotary_dim"].as_u64().unwrap() as usize;
        let theta = params["rope_theta"].as_f64().unwrap();
        let got = s.inv_freq(dim, theta, c["seq_len"].as_u64().unwrap() as usize).unwrap();
        let want: Vec<f64> = c["inv_freq"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(got.len(), want.len(), "{name}: table length");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-6 * w.abs(), "{name}: inv_freq[{i}] = {g}, transformers {w}");
        }
        let (ga, wa) = (s.attention_factor(max_pos), c["attention_factor"].as_f64().unwrap());
        assert!((ga - wa).abs() <= 1e-9 * wa, "{name}: attention factor {ga}, transformers {wa}");
    }
}

#[test]
fn llama3_changes_only_the_long_wavelengths() {
    // The check has teeth: the scaled table differs from the plain one exactly where it should.
    let c = cases().into_iter().find(|c| c["name"] == "llama3").unwrap();
    let s = RopeScaling::from_params(c["rope_parameters"].as_object().unwrap(), None).unwrap();
    let plain = RopeScaling::None.inv_freq(64, 500000.0, 0).unwrap();
    let scaled = s.inv_freq(64, 500000.0, 0).unwrap();
    assert_eq!(plain[0], scaled[0], "the highest frequency is kept");
    assert!((scaled[31] - plain[31] / 32.0).abs() < 1e-18, "the lowest is divided by the factor");
}

#[test]
fn bad_configs_are_errors_naming_the_key() {
    let obj = |s: &str| serde_json::from_str::<Value>(s).unwrap().as_object().unwrap().clone();
    let err = |s: &str| RopeScaling::from_params(&obj(s), None).unwrap_err().to_string();
    let e = err(r#"{"rope_type": "dynamic", "factor": 2.0}"#);
    assert!(e.contains("dynamic") && e.contains("llama3") && e.contains("longrope"), "{e}");
    assert!(err(r#"{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}"#).contains("original_max_position_embeddings"));
    assert!(err(r#"{"rope_type": "linear", "factor": -2.0}"#).contains("factor"));
    assert!(err(r#"{"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1, "original_max_position_embeddings": 8192}"#)
        .contains("high_freq_factor"));
    assert!(
        err(r#"{"rope_type": "longrope", "short_factor": [1, "x"], "long_factor": [1], "original_max_position_embeddings": 4096}"#).contains("short_factor")
    );
    let lr = RopeScaling::from_params(
        &obj(r#"{"rope_type": "longrope", "short_factor": [1, 1], "long_factor": [1, 1], "original_max_position_embeddings": 4096}"#),
        None,
    )
    .unwrap();
    assert!(lr.inv_freq(8, 10000.0, 10).unwrap_err().to_string().contains("expected 4"));
    assert!(RopeScaling::None.inv_freq(7, 10000.0, 0).is_err());
    // The older spelling `type` is read too.
    assert_eq!(RopeScaling::from_params(&obj(r#"{"type": "linear", "factor": 2.0}"#), None).unwrap(), RopeScaling::Linear { factor: 2.0 });
}
