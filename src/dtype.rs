//! Element types. `f32` and `f64` are compute types (every CPU kernel is generic over [`Float`],
//! so gradient checks run the same code in f64). `bf16` and `f16` are storage types for frozen
//! weights: they are converted to the compute type per use, a tile at a time.

use std::fmt;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

use half::{bf16, f16};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    BF16,
    F16,
    /// GGML block quantization: blocks of 32 weights, f16 scale d + 32 × i8; x = d·q.
    Q8_0,
    /// Blocks of 32: f16 d + 16 bytes of nibbles; x = d·(q − 8).
    Q4_0,
    /// Blocks of 32: f16 d, f16 m + 16 bytes of nibbles; x = d·q + m.
    Q4_1,
}

impl DType {
    /// Bytes per element of an unquantized dtype; for block-quantized dtypes, bytes per block
    /// (see [`DType::block_size`]).
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::BF16 | DType::F16 => 2,
            DType::Q8_0 => 34,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
        }
    }
    /// Elements per storage block (1 for unquantized dtypes, 32 for the GGML quantizations).
    pub fn block_size(self) -> usize {
        if self.is_quantized() {
            32
        } else {
            1
        }
    }
    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Q8_0 | DType::Q4_0 | DType::Q4_1)
    }
    /// Bytes that `numel` elements occupy, or None if `numel` is not a whole number of blocks
    /// (or overflows).
    pub fn storage_bytes(self, numel: usize) -> Option<usize> {
        if numel % self.block_size() != 0 {
            return None;
        }
        (numel / self.block_size()).checked_mul(self.size())
    }
    /// Compute dtypes can hold activations and gradients; storage-only dtypes cannot.
    pub fn is_compute(self) -> bool {
        matches!(self, DType::F32 | DType::F64)
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
        }
    }
    /// Decodes element `i` of a little-endian byte buffer of an unquantized dtype as f64.
    /// The caller guarantees `bytes.len() >= (i + 1) * self.size()`.
    #[inline]
    pub(crate) fn decode_le(self, bytes: &[u8], i: usize) -> f64 {
        let s = self.size();
        let b = &bytes[i * s..(i + 1) * s];
        match self {
            DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            DType::F64 => f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            DType::BF16 => bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64(),
            DType::F16 => f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64(),
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => unreachable!("quantized dtypes decode whole blocks (dequantize_block)"),
        }
    }

    /// Dequantizes one block (`self.size()` bytes) of a GGML quantized dtype into 32 values.
    /// Nibble layout (Q4_*): byte j holds element j in its low nibble and element j + 16 in its
    /// high nibble.
    pub(crate) fn dequantize_block<T: Float>(self, blk: &[u8], out: &mut [T; 32]) {
        let h = |i: usize| f16::from_bits(u16::from_le_bytes([blk[i], blk[i + 1]])).to_f32();
        match self {
            DType::Q8_0 => {
                let d = h(0);
                for (o, &q) in out.iter_mut().zip(&blk[2..34]) {
                    *o = T::from_f64((d * (q as i8) as f32) as f64);
                }
            }
            DType::Q4_0 => {
                let d = h(0);
                for (j, &byte) in blk[2..18].iter().enumerate() {
                    out[j] = T::from_f64((d * ((byte & 0x0f) as i32 - 8) as f32) as f64);
                    out[j + 16] = T::from_f64((d * ((byte >> 4) as i32 - 8) as f32) as f64);
                }
            }
            DType::Q4_1 => {
                let (d, m) = (h(0), h(2));
                for (j, &byte) in blk[4..20].iter().enumerate() {
                    out[j] = T::from_f64((d * (byte & 0x0f) as f32 + m) as f64);
                    out[j + 16] = T::from_f64((d * (byte >> 4) as f32 + m) as f64);
                }
            }
            _ => unreachable!("dequantize_block on an unquantized dtype"),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A compute element type: f32 or f64. Kernels are written once against this trait.
pub trait Float:
    Copy
    + Send
    + Sync
    + 'static
    + PartialOrd
    + fmt::Debug
    + fmt::Display
    + Default
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
    + crate::backend::vmath::VecMath
{
    const DTYPE: DType;
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn from_bf16(x: bf16) -> Self;
    fn from_f16(x: f16) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    fn max(self, o: Self) -> Self;
    fn is_finite(self) -> bool;
    /// C[m×n] = alpha·A[m×k]·B[k×n] + beta·C with arbitrary element strides (matrixmultiply).
    /// With beta = 0, C is not read.
    ///
    /// # Safety
    /// The pointers and strides must describe valid, non-aliasing (for C) memory regions.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

macro_rules! impl_float {
    ($t:ty, $dt:expr, $gemm:path) => {
        impl Float for $t {
            const DTYPE: DType = $dt;
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn from_bf16(x: bf16) -> Self {
                x.to_f32() as $t
            }
            #[inline]
            fn from_f16(x: f16) -> Self {
                x.to_f32() as $t
            }
            #[inline]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline]
            fn max(self, o: Self) -> Self {
                <$t>::max(self, o)
            }
            #[inline]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            #[inline]
            unsafe fn gemm_raw(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: *const Self,
                rsa: isize,
                csa: isize,
                b: *const Self,
                rsb: isize,
                csb: isize,
                beta: Self,
                c: *mut Self,
                rsc: isize,
                csc: isize,
            ) {
                $gemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
            }
        }
    };
}

impl_float!(f32, DType::F32, matrixmultiply::sgemm);
impl_float!(f64, DType::F64, matrixmultiply::dgemm);
