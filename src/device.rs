//! Devices and the one place that dispatches a kernel call.
//!
//! [`Device`] names where a tensor's storage lives; [`crate::backend::kernels`] maps it to that
//! device's kernels (the one place that decides CPU or CUDA). `with_float!` turns a runtime
//! [`DType`](crate::DType) into the `T: Float` a generic CPU kernel is instantiated with.

use crate::error::{Error, Result};

/// The device a tensor lives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// The CUDA device (needs the `cuda` feature and a GPU of compute capability ≥ 8.0).
    Cuda,
}

impl Device {
    /// Parses `cpu` or `cuda`.
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda),
            other => Err(Error::invalid("device", format!("unknown device `{other}` (expected cpu or cuda)"))),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
}

/// `with_float!(dtype, "op", |T| { body })` runs `body` with `T` bound to f32 or f64 and returns
/// a dtype error naming `op` for any other dtype. `body` must evaluate to a `Result`.
macro_rules! with_float {
    ($dtype:expr, $op:expr, |$T:ident| $body:block) => {
        match $dtype {
            $crate::dtype::DType::F32 => {
                #[allow(dead_code)]
                type $T = f32;
                #[allow(unused_imports)]
                use $crate::dtype::Float as _;
                $body
            }
            $crate::dtype::DType::F64 => {
                #[allow(dead_code)]
                type $T = f64;
                #[allow(unused_imports)]
                use $crate::dtype::Float as _;
                $body
            }
            other => Err($crate::error::Error::dtype($op, "input", "f32 or f64", other)),
        }
    };
}
pub(crate) use with_float;
