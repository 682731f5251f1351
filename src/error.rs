//! One error type for the whole crate. Every variant names the op, file or tensor involved and
//! what was expected, so a user can act on the message without a debugger.

use std::path::PathBuf;

/// Crate-wide result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor argument has the wrong shape for `op`.
    #[error("{op}: shape mismatch for {arg}: expected {expected}, got {got}")]
    Shape { op: &'static str, arg: &'static str, expected: String, got: String },

    /// A tensor argument has a dtype `op` cannot use here.
    #[error("{op}: dtype mismatch for {arg}: expected {expected}, got {got}")]
    DType { op: &'static str, arg: &'static str, expected: String, got: String },

    /// An index (token id, target, row index) is outside its valid range.
    #[error("{op}: {what} index {index} is out of range (size {size})")]
    OutOfRange { op: &'static str, what: &'static str, index: i64, size: usize },

    /// Any other invalid argument to an op.
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },

    /// Misuse of the autograd engine (backward on a non-scalar, a consumed graph, …).
    #[error("autograd: {0}")]
    Autograd(String),

    /// A loss, gradient or parameter that should be finite is not.
    #[error("{op}: non-finite value in {what}")]
    NonFinite { op: &'static str, what: String },

    /// An I/O error on a named file.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    /// A file whose contents do not match its format.
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },

    /// A failed CUDA driver call or kernel launch (`op` names the kernel and its shapes), or a
    /// device-placement mistake (tensors of one op on different devices).
    #[error("cuda: {op}: {msg}")]
    Cuda { op: String, msg: String },

    /// The device ran out of memory.
    #[error("{op}: out of device memory: asked for {asked} bytes, {free} of {total} bytes free on the device ({held} bytes held by spectune's tensors)")]
    DeviceOom { op: String, asked: usize, free: usize, total: usize, held: usize },
}

impl Error {
    pub fn shape(op: &'static str, arg: &'static str, expected: impl ToString, got: impl ToString) -> Self {
        Error::Shape { op, arg, expected: expected.to_string(), got: got.to_string() }
    }
    pub fn dtype(op: &'static str, arg: &'static str, expected: impl ToString, got: impl ToString) -> Self {
        Error::DType { op, arg, expected: expected.to_string(), got: got.to_string() }
    }
    pub fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Invalid { op, msg: msg.into() }
    }
}

/// `bail!(op, "format", args…)` returns an [`Error::Invalid`] from the current function.
#[macro_export]
macro_rules! bail {
    ($op:expr, $($arg:tt)*) => {
        return Err($crate::Error::Invalid { op: $op, msg: format!($($arg)*) })
    };
}

/// `ensure!(cond, op, "format", args…)` bails unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $op:expr, $($arg:tt)*) => {
        if !$cond {
            $crate::bail!($op, $($arg)*);
        }
    };
}
