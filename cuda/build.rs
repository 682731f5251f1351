//! Build script (Cargo.toml: `build = "cuda/build.rs"`).
//!
//! The default build compiles no CUDA code and needs no toolkit. The `cuda` feature (issue 5)
//! will compile each `cuda/*.cu` to PTX here with nvcc.
fn main() {
    println!("cargo:rerun-if-changed=cuda/build.rs");
}
