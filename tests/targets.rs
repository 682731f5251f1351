//! Module selection against PEFT's own decisions: tests/data/targets/cases.json, written by
//! make_targets.py beside it from stock PEFT (`check_target_module_exists` on single keys, and
//! `get_peft_model` on tiny transformers models for `all-linear`). Every config is read through
//! `TargetSpec::from_peft_config`, as an adapter_config.json would be, and must select exactly the
//! keys PEFT selected — or be refused where PEFT refused it.

use std::path::PathBuf;

use serde_json::Value;
use spectune::peft::targets::TargetSpec;

fn cases() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/targets/cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array().expect("a list").iter().map(|s| s.as_str().expect("a string")).collect()
}

#[test]
fn every_key_case_selects_what_peft_selects_or_is_refused() {
    let all = cases();
    let keys = strings(&all["keys"]);
    let key_cases = all["key_cases"].as_array().unwrap();
    assert!(key_cases.len() >= 30, "cases.json has only {} key cases", key_cases.len());
    let (mut checked, mut refused, mut failures) = (0, 0, Vec::new());
    for case in key_cases {
        let config = case["config"].as_object().unwrap();
        let spec = TargetSpec::from_peft_config(config);
        match (case.get("error"), spec) {
            (Some(peft_error), Ok(s)) => failures.push(format!("{config:?}: PEFT refuses it ({peft_error}), spectune accepted {s}")),
            (Some(_), Err(_)) => refused += 1,
            (None, Err(e)) => failures.push(format!("{config:?}: refused ({e}), PEFT accepts it")),
            (None, Ok(spec)) => {
                let want = strings(&case["selected"]);
                let m = spec.matcher().unwrap();
                for k in &keys {
                    checked += 1;
                    if m.selects(k) != want.contains(k) {
                        failures.push(format!("{config:?}: `{k}` selected by PEFT: {}, by spectune: {}", want.contains(k), m.selects(k)));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} disagreements with PEFT:\n{}", failures.len(), failures.join("\n"));
    assert!(checked >= 30 * keys.len() && refused >= 5, "checked {checked} decisions, {refused} refusals");
}

#[test]
fn every_model_case_adapts_the_linears_peft_adapts() {
    let all = cases();
    let mut failures = Vec::new();
    let model_cases = all["model_cases"].as_array().unwrap();
    assert!(model_cases.len() >= 18);
    for case in model_cases {
        let (model, config) = (case["model"].as_str().unwrap(), case["config"].as_object().unwrap());
        let (linears, adapted) = (strings(&case["linears"]), strings(&case["adapted"]));
        let spec = TargetSpec::from_peft_config(config).unwrap_or_else(|e| panic!("{model} {config:?}: {e}"));
        let mut got = spec.select(linears.iter().copied()).unwrap_or_else(|e| panic!("{model} {config:?}: {e}"));
        let mut want = adapted.clone();
        got.sort_unstable();
        want.sort_unstable();
        if got != want {
            failures.push(format!("{model} {config:?}: spectune {got:?}, PEFT {want:?}"));
        }
        // The spec survives a trip through adapter_config.json's keys.
        assert_eq!(TargetSpec::from_peft_config(spec.to_peft_json().as_object().unwrap()).unwrap(), spec);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
