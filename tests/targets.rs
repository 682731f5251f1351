//! Module selection against PEFT's own decisions: tests/data/targets/cases.json, written by
//! make_targets.py beside it from stock PEFT (`check_target_module_exists` on single keys, and
//! `get_peft_model` on tiny transformers models for `all-linear`). Every config is read through
//! `TargetSpec::from_peft_config`, as an adapter_config.json would be, and must select exactly the
//! keys PEFT selected — or be refused where PEFT refused it. The adapter_config.json files PEFT
//! wrote for the family fixtures are read the same way and must select the modules their adapter
//! files hold.

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

/// The adapter_config.json files PEFT wrote for the family fixtures (tests/data/families/*/lora,
/// `all-linear` expanded by PEFT into full module paths) select exactly the modules that carry
/// lora_A/lora_B tensors in their adapter_model.safetensors, out of the checkpoint's linears.
#[test]
fn peft_written_adapter_configs_select_the_modules_they_hold() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/families");
    let mut families = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        let lora = dir.join("lora");
        if !lora.is_dir() {
            continue;
        }
        families += 1;
        let read = |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let config: Value = serde_json::from_slice(&read(lora.join("adapter_config.json"))).unwrap();
        let spec = TargetSpec::from_peft_config(config.as_object().unwrap()).unwrap_or_else(|e| panic!("{}: {e}", lora.display()));
        let weights = read(dir.join("model.safetensors"));
        let weights = safetensors::SafeTensors::deserialize(&weights).unwrap();
        // The checkpoint's linears: 2-D `<path>.weight` tensors other than the embedding and head.
        let mut linears: Vec<String> = weights
            .tensors()
            .into_iter()
            .filter(|(k, v)| v.shape().len() == 2 && !k.contains("embed_tokens") && !k.starts_with("lm_head"))
            .filter_map(|(k, _)| k.strip_suffix(".weight").map(str::to_string))
            .collect();
        linears.sort();
        let adapter = read(lora.join("adapter_model.safetensors"));
        let adapter = safetensors::SafeTensors::deserialize(&adapter).unwrap();
        let mut held: Vec<String> = adapter
            .names()
            .into_iter()
            .filter_map(|k| k.strip_suffix(".lora_A.weight").and_then(|m| m.strip_prefix("base_model.model.")).map(str::to_string))
            .collect();
        held.sort();
        let got = spec.select(linears.iter().map(String::as_str)).unwrap();
        assert_eq!(got, held, "{}", lora.display());
    }
    assert_eq!(families, 9, "family fixtures with a lora/ folder");
}
