//! Build script (Cargo.toml: `build = "cuda/build.rs"`).
//!
//! The default build compiles no CUDA code and needs no toolkit. With the `cuda` feature each
//! `cuda/*.cu` is compiled to PTX with nvcc into OUT_DIR, where `src/backend/cuda` embeds it
//! (`include_str!`); the driver JIT-compiles the PTX for the GPU it finds at load time.
//!
//! Environment: `SPECTUNE_CUDA_ARCH` picks the virtual architecture (default `compute_80`: the
//! bf16 tensor-core `mma.sync` needs sm_80+, so Ampere and newer); `NVCC` overrides the compiler
//! (default: `nvcc` on PATH, then `$CUDA_PATH/bin/nvcc`).
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=cuda/build.rs");
    println!("cargo:rerun-if-env-changed=SPECTUNE_CUDA_ARCH");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let arch = std::env::var("SPECTUNE_CUDA_ARCH").unwrap_or_else(|_| "compute_80".into());
    let nvcc = std::env::var("NVCC").ok().or_else(|| std::env::var("CUDA_PATH").ok().map(|p| format!("{p}/bin/nvcc")).filter(|p| PathBuf::from(p).exists()));
    let nvcc = nvcc.unwrap_or_else(|| "nvcc".into());
    println!("cargo:rerun-if-changed=cuda/common.cuh");
    let mut sources: Vec<PathBuf> = std::fs::read_dir("cuda")
        .expect("cuda/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    for src in sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let stem = src.file_stem().and_then(|s| s.to_str()).expect("ASCII file names in cuda/");
        let ptx = out.join(format!("{stem}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++14", "-lineinfo", &format!("-arch={arch}"), "-o"])
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("feature `cuda`: cannot run `{nvcc}` ({e}); install the toolkit with cuda/install-toolkit.sh or set NVCC"));
        if !status.success() {
            panic!("feature `cuda`: nvcc failed on {} ({status})", src.display());
        }
    }
}
