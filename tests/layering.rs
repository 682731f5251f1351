//! The layering of docs/ARCHITECTURE.md ("Layers") as a test: every `crate::` path (and, inside
//! src/peft/, every `super::` path) in src/**/*.rs may only point to a module of the same layer
//! or a lower one. A failure names the file, the line and the edge. `#[cfg(test)]` modules at the
//! end of a file, comments and doc links are not dependencies and are skipped. The command line
//! (src/main.rs, src/cli/) sits on top: it is part of the binary, never declared by src/lib.rs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Module (path under src/ without `.rs`; a folder covers its files) → layer. The longest
/// matching prefix wins. Keep in step with docs/ARCHITECTURE.md.
const LAYERS: &[(&str, usize)] = &[
    // 0 base
    ("error", 0),
    ("shape", 0),
    ("memory", 0),
    // 1 kernels: storage dtypes, host/device buffers, the CPU and CUDA kernels
    ("dtype", 1),
    ("storage", 1),
    ("backend", 1),
    ("device", 1),
    // 2 engine core: tensors, the tape, profiling, the gradient checker and RNG
    ("tensor", 2),
    ("autograd", 2),
    ("profile", 2),
    ("gradcheck", 2),
    // 3 ops (each op with its backward), the optimizer, SVD
    ("ops", 3),
    ("optim", 3),
    ("svd", 3),
    // 4 file formats and tokenizers (name → tensor; no model knowledge, see KNOWN)
    ("io", 4),
    ("tokenizer", 4),
    // 5 building blocks of the model families, and the adapter methods: the LinearAdapter trait,
    //   the registry, one file per method
    ("nn", 5),
    ("peft", 5),
    // 6 models
    ("model", 6),
    // 7 application: adapter folders, export/merge/fuse, training, evaluation, bench, spectrum,
    //   downloads
    ("peft/io", 7),
    ("peft/export", 7),
    ("peft/fuse", 7),
    ("train", 7),
    ("bench", 7),
    ("spectrum", 7),
    ("fetch", 7),
];

/// Imports that point up today, (from module, to module), each with its reason. Remove an entry
/// when the edge is gone (the test fails on entries that no longer occur, so the list stays true).
const KNOWN: &[(&str, &str)] = &[];

/// Re-exports at the crate root (`crate::DType`) → their module.
const ROOT_ITEMS: &[(&str, &str)] = &[
    ("DType", "dtype"),
    ("Float", "dtype"),
    ("Error", "error"),
    ("Result", "error"),
    ("bail", "error"),
    ("ensure", "error"),
    ("Shape", "shape"),
    ("Tensor", "tensor"),
    ("TensorId", "tensor"),
    ("backward", "autograd"),
    ("checkpoint", "autograd"),
    ("no_grad", "autograd"),
    ("GradStore", "autograd"),
    ("clip_grad_norm", "optim"),
    ("AdamW", "optim"),
    ("AdamWConfig", "optim"),
    ("LrSchedule", "optim"),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().filter(|(p, _)| module == *p || module.starts_with(&format!("{p}/"))).max_by_key(|(p, _)| p.len()).map(|&(_, l)| l)
}

/// The module a path names: `peft::io::x` → "peft/io" (a file or folder of src/), else "peft".
fn module_of_path(segs: &[&str]) -> Option<String> {
    let first = *segs.first()?;
    if let Some((_, m)) = ROOT_ITEMS.iter().find(|(n, _)| *n == first) {
        return Some(m.to_string());
    }
    if let Some(second) = segs.get(1) {
        let two = format!("{first}/{second}");
        if src().join(format!("{two}.rs")).exists() || src().join(&two).is_dir() {
            return Some(two);
        }
    }
    Some(first.to_string())
}

/// Source without comments (line structure kept) and without a trailing `#[cfg(test)]` module.
fn code_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    for line in text.lines() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let mut s = String::new();
        let mut rest = line;
        loop {
            if in_block {
                match rest.find("*/") {
                    Some(i) => {
                        rest = &rest[i + 2..];
                        in_block = false;
                    }
                    None => break,
                }
            } else {
                let (lc, bc) = (rest.find("//"), rest.find("/*"));
                match (lc, bc) {
                    (Some(l), Some(b)) if b < l => {
                        s.push_str(&rest[..b]);
                        rest = &rest[b + 2..];
                        in_block = true;
                    }
                    (Some(l), _) => {
                        s.push_str(&rest[..l]);
                        break;
                    }
                    (None, Some(b)) => {
                        s.push_str(&rest[..b]);
                        rest = &rest[b + 2..];
                        in_block = true;
                    }
                    (None, None) => {
                        s.push_str(rest);
                        break;
                    }
                }
            }
        }
        out.push(s);
    }
    out
}

/// Every module path that follows `prefix` in `line`, with `{a, b::c}` groups expanded (first
/// two segments of each).
fn paths_after(line: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let seg = |s: &str| -> Vec<String> {
            s.split("::")
                .take(2)
                .map(|x| x.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>())
                .filter(|x| !x.is_empty())
                .collect()
        };
        if let Some(group) = rest.strip_prefix('{') {
            // One level of braces: `crate::{a, b::{c, d}}` → a, b (the first segment suffices
            // unless it names a folder, whose next segment sits inside the inner braces).
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let p = seg(item.trim().trim_start_matches('{'));
                if !p.is_empty() {
                    found.push(p);
                }
            }
        } else {
            let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(rest.len());
            let p = seg(&rest[..end]);
            match rest[end..].strip_prefix('{') {
                // `crate::peft::{io::x, LoraConfig}` → peft::io, peft::LoraConfig.
                Some(group) if p.len() == 1 => {
                    let close = group.find('}').unwrap_or(group.len());
                    for item in group[..close].split(',') {
                        let q = seg(item.trim());
                        if let Some(first) = q.first() {
                            found.push(vec![p[0].clone(), first.clone()]);
                        }
                    }
                }
                _ if !p.is_empty() => found.push(p),
                _ => {}
            }
        }
    }
    found
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn imports_point_down_the_layers() {
    let root = src();
    let mut files = Vec::new();
    rs_files(&root, &mut files);
    files.sort();
    let mut bad = Vec::new();
    let mut unknown = Vec::new();
    let mut seen_known: BTreeSet<(String, String)> = BTreeSet::new();
    for f in &files {
        let rel = f.strip_prefix(&root).unwrap().to_string_lossy().trim_end_matches(".rs").to_string();
        // The crate root declares the modules; the CLI is the binary on top.
        if rel == "lib" || rel == "main" || rel.starts_with("cli/") {
            continue;
        }
        let from = rel.trim_end_matches("/mod").to_string();
        let Some(from_layer) = layer_of(&from) else {
            unknown.push(format!("src/{rel}.rs is in no layer: add its module to LAYERS (and to docs/ARCHITECTURE.md)"));
            continue;
        };
        let text = std::fs::read_to_string(f).unwrap();
        // `super::x` inside src/peft/ reaches the sibling file x (peft's files span two layers).
        let parent = from.rsplit_once('/').map(|(p, _)| p.to_string());
        for (ln, line) in code_lines(&text).iter().enumerate() {
            let mut targets: Vec<String> =
                paths_after(line, "crate::").iter().filter_map(|p| module_of_path(&p.iter().map(String::as_str).collect::<Vec<_>>())).collect();
            if parent.as_deref() == Some("peft") && !rel.ends_with("/mod") {
                for p in paths_after(line, "super::") {
                    let name = &p[0];
                    targets.push(if src().join(format!("peft/{name}.rs")).exists() { format!("peft/{name}") } else { "peft".to_string() });
                }
            }
            targets.sort();
            targets.dedup();
            for to in targets {
                let Some(to_layer) = layer_of(&to) else {
                    unknown.push(format!("src/{rel}.rs:{}: `{to}` is in no layer", ln + 1));
                    continue;
                };
                if to_layer <= from_layer {
                    continue;
                }
                if let Some((kf, kt)) =
                    KNOWN.iter().find(|(kf, kt)| (from == *kf || from.starts_with(&format!("{kf}/"))) && (to == *kt || to.starts_with(&format!("{kt}/"))))
                {
                    seen_known.insert((kf.to_string(), kt.to_string()));
                    continue;
                }
                bad.push(format!("src/{rel}.rs:{}: {from} (layer {from_layer}) imports {to} (layer {to_layer}), which is above it", ln + 1));
            }
        }
    }
    assert!(unknown.is_empty(), "modules missing from the layer table:\n{}", unknown.join("\n"));
    assert!(bad.is_empty(), "{} imports point up the layers (docs/ARCHITECTURE.md, Layers):\n{}", bad.len(), bad.join("\n"));
    let stale: Vec<String> = KNOWN.iter().filter(|(f, t)| !seen_known.contains(&(f.to_string(), t.to_string()))).map(|(f, t)| format!("{f} → {t}")).collect();
    assert!(stale.is_empty(), "KNOWN lists edges that no longer occur (remove them): {}", stale.join(", "));
}

#[test]
fn the_cli_is_not_part_of_the_library() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    assert!(!code_lines(&lib).iter().any(|l| l.contains("mod cli")), "src/lib.rs must not declare the CLI");
    for f in ["train/config.rs", "bench.rs"] {
        let text = std::fs::read_to_string(src().join(f)).unwrap();
        assert!(!code_lines(&text).iter().any(|l| l.contains("clap")), "src/{f}: library types do not derive clap (the CLI's flag structs convert into them)");
    }
}

#[test]
fn the_checker_sees_imports() {
    // The parser itself: grouped, nested and root-level paths, comments skipped.
    let l = code_lines(
        "use crate::{model::Decoder, peft::io::save}; // crate::train\n/* crate::bench */ let x = crate::DType::F32;\nuse crate::peft::{fuse::f, Method};",
    );
    let p: Vec<Vec<String>> = l.iter().flat_map(|x| paths_after(x, "crate::")).collect();
    let v = |a: &str, b: &str| vec![a.to_string(), b.to_string()];
    assert_eq!(p, vec![v("model", "Decoder"), v("peft", "io"), v("DType", "F32"), v("peft", "fuse"), v("peft", "Method")]);
    assert_eq!(module_of_path(&["peft", "io", "save"]).as_deref(), Some("peft/io"));
    assert_eq!(module_of_path(&["peft", "LoraConfig"]).as_deref(), Some("peft"));
    assert_eq!(module_of_path(&["DType"]).as_deref(), Some("dtype"));
    assert_eq!(layer_of("peft/io"), Some(7));
    assert_eq!(layer_of("peft/lora"), Some(5));
    assert_eq!(layer_of("backend/cuda/ops"), Some(1));
    assert!(layer_of("model") > layer_of("peft"));
}
