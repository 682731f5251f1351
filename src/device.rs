//! Devices and the one place that dispatches a kernel call.
//!
//! Today every tensor lives on the CPU and dispatch is by compute dtype: [`with_float!`] turns a
//! runtime [`DType`](crate::DType) into the `T: Float` a generic CPU kernel in
//! [`crate::backend::cpu`] is instantiated with. The CUDA backend (feature `cuda`) adds a device
//! arm here and nowhere else.

/// The device a tensor lives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
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
