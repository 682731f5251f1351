//! Element types. `f32` and `f64` are compute types (every CPU kernel is generic over [`Float`],
//! so gradient checks run the same code in f64). `bf16` and `f16` are storage types for frozen
//! weights: they are converted to the compute type per use, a tile at a time. The GGML block
//! quantizations (Q8_0 … IQ4_XS) are storage types too: blocks of 32 or 256 weights, decoded by
//! [`DType::dequantize_block`] exactly as llama.cpp's reference dequantization does (the same f32
//! operations in the same order, so the results are equal bit for bit).

use std::fmt;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

use half::{bf16, f16};

/// Elements per GGML super-block (K-quants, IQ4_XS).
pub const QK_K: usize = 256;

/// IQ4_NL / IQ4_XS: the 16 values a nibble indexes.
const IQ4_VALUES: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// f16 bits as f32: exact, inlined (the scales of every quantized block go through it).
/// Infinities and NaNs (corrupted blocks) take `half`'s conversion.
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = (h >> 10) & 0x1f;
    let man = (h & 0x3ff) as u32;
    match exp {
        // Zero and subnormals: man·2⁻²⁴, exact in f32.
        0 => f32::from_bits((man as f32 * (1.0 / 16_777_216.0)).to_bits() | sign),
        31 => f16_special(h),
        _ => f32::from_bits(sign | (exp as u32 + 112) << 23 | man << 13),
    }
}

/// Infinity or NaN (a corrupted block's scale), out of the decoders' hot path.
#[cold]
#[inline(never)]
fn f16_special(h: u16) -> f32 {
    f16::from_bits(h).to_f32()
}

/// Whether the AVX-512 build of the block decoders can run here (asked once).
#[cfg(target_arch = "x86_64")]
fn simd512() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    })
}

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
    /// Blocks of 32: f16 d, u32 of 5th bits, 16 bytes of nibbles; x = d·(q − 16), q 5 bits.
    Q5_0,
    /// Blocks of 32: f16 d, f16 m, u32 of 5th bits, 16 bytes of nibbles; x = d·q + m.
    Q5_1,
    /// Super-blocks of 256: 16 bytes of 4-bit scale/min pairs, 64 bytes of 2-bit q, f16 d,
    /// f16 dmin; x = (d·sc)·q − dmin·m per group of 16.
    Q2K,
    /// Super-blocks of 256: 32 bytes of high bits, 64 bytes of 2-bit low q, 12 bytes of packed
    /// 6-bit scales, f16 d; x = (d·(sc − 32))·(q − 4·(1 − hbit)) per group of 16.
    Q3K,
    /// Super-blocks of 256: f16 d, f16 dmin, 12 bytes of packed 6-bit scales/mins, 128 bytes of
    /// nibbles; x = (d·sc)·q − dmin·m per group of 32.
    Q4K,
    /// As Q4K with a 5th bit per weight (32 bytes before the nibbles); q < 32.
    Q5K,
    /// Super-blocks of 256: 128 bytes of low nibbles, 64 bytes of 2 high bits, 16 × i8 scales,
    /// f16 d; x = (d·sc)·(q − 32) per group of 16.
    Q6K,
    /// Blocks of 32: f16 d + 16 bytes of nibbles indexing a fixed non-linear table; x = d·kv(q).
    IQ4NL,
    /// Super-blocks of 256: f16 d, u16 high scale bits, 4 bytes of low scale nibbles, 128 bytes
    /// of nibbles; x = (d·(sc − 32))·kv(q) per group of 32.
    IQ4XS,
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
            DType::Q4_0 | DType::IQ4NL => 18,
            DType::Q4_1 => 20,
            DType::Q5_0 => 22,
            DType::Q5_1 => 24,
            DType::Q2K => 84,
            DType::Q3K => 110,
            DType::Q4K => 144,
            DType::Q5K => 176,
            DType::Q6K => 210,
            DType::IQ4XS => 136,
        }
    }
    /// Elements per storage block: 1 for unquantized dtypes, 32 for the GGML block
    /// quantizations, 256 for the super-block ones (K-quants, IQ4_XS).
    pub fn block_size(self) -> usize {
        match self {
            DType::F32 | DType::F64 | DType::BF16 | DType::F16 => 1,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::IQ4NL => 32,
            DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K | DType::IQ4XS => QK_K,
        }
    }
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
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
            DType::Q5_0 => "q5_0",
            DType::Q5_1 => "q5_1",
            DType::Q2K => "q2_k",
            DType::Q3K => "q3_k",
            DType::Q4K => "q4_k",
            DType::Q5K => "q5_k",
            DType::Q6K => "q6_k",
            DType::IQ4NL => "iq4_nl",
            DType::IQ4XS => "iq4_xs",
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
            _ => unreachable!("quantized dtypes decode whole blocks (dequantize_block)"),
        }
    }

    /// Dequantizes one block (`self.size()` bytes) of a GGML quantized dtype into
    /// `self.block_size()` f32 values, with llama.cpp's reference arithmetic: every product and
    /// difference is one f32 operation in the order written below (no fused multiply-add), so
    /// the values equal llama.cpp's (and the `gguf` Python package's) bit for bit.
    ///
    /// Nibble layout of the 32-blocks (Q4_*, Q5_*, IQ4_NL): byte j holds element j in its low
    /// nibble and element j + 16 in its high nibble. The super-block layouts are spelled out
    /// in each arm. The caller passes `blk.len() == self.size()` and
    /// `out.len() == self.block_size()`.
    pub fn dequantize_block(self, blk: &[u8], out: &mut [f32]) {
        self.dequantize_blocks(blk, out)
    }

    /// [`DType::dequantize_block`] over consecutive blocks: `blk` holds
    /// `out.len() / self.block_size()` whole blocks. On x86_64 CPUs with AVX-512 the same code
    /// is compiled for them (wider vectors; the arithmetic and so the values are unchanged).
    pub fn dequantize_blocks(self, blk: &[u8], out: &mut [f32]) {
        debug_assert_eq!(blk.len() / self.size(), out.len() / self.block_size());
        #[cfg(target_arch = "x86_64")]
        if simd512() {
            // SAFETY: the CPU has the features the function is compiled for (checked above).
            return unsafe { self.dequantize_blocks_avx512(blk, out) };
        }
        self.dequantize_blocks_each(blk, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
    unsafe fn dequantize_blocks_avx512(self, blk: &[u8], out: &mut [f32]) {
        self.dequantize_blocks_each(blk, out)
    }

    /// One loop per type, so that each block's code is inlined with its type known.
    #[inline(always)]
    fn dequantize_blocks_each(self, blk: &[u8], out: &mut [f32]) {
        macro_rules! each {
            ($($t:path),*) => {
                match self {
                    $($t => {
                        for (b, o) in blk.chunks_exact($t.size()).zip(out.chunks_exact_mut($t.block_size())) {
                            $t.dequantize_one(b, o)
                        }
                    })*
                    _ => unreachable!("dequantize_blocks on an unquantized dtype"),
                }
            };
        }
        each!(
            DType::Q8_0,
            DType::Q4_0,
            DType::Q4_1,
            DType::Q5_0,
            DType::Q5_1,
            DType::Q2K,
            DType::Q3K,
            DType::Q4K,
            DType::Q5K,
            DType::Q6K,
            DType::IQ4NL,
            DType::IQ4XS
        )
    }

    #[inline(always)]
    fn dequantize_one(self, blk: &[u8], out: &mut [f32]) {
        debug_assert_eq!((blk.len(), out.len()), (self.size(), self.block_size()));
        macro_rules! h {
            ($i:expr) => {
                f16_to_f32(u16::from_le_bytes([blk[$i], blk[$i + 1]]))
            };
        }
        match self {
            DType::Q8_0 => {
                let d = h!(0);
                for (o, &q) in out.iter_mut().zip(&blk[2..34]) {
                    *o = (q as i8) as f32 * d;
                }
            }
            DType::Q4_0 => {
                let d = h!(0);
                for (j, &byte) in blk[2..18].iter().enumerate() {
                    out[j] = d * ((byte & 0x0f) as i32 - 8) as f32;
                    out[j + 16] = d * ((byte >> 4) as i32 - 8) as f32;
                }
            }
            DType::Q4_1 => {
                let (d, m) = (h!(0), h!(2));
                for (j, &byte) in blk[4..20].iter().enumerate() {
                    out[j] = d * (byte & 0x0f) as f32 + m;
                    out[j + 16] = d * (byte >> 4) as f32 + m;
                }
            }
            DType::Q5_0 => {
                // [d][qh: u32, bit j = 5th bit of element j][16 bytes of nibbles].
                let d = h!(0);
                let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                let (lo_out, hi_out) = out.split_at_mut(16);
                for (j, (&byte, (lo, hi))) in blk[6..22].iter().zip(lo_out.iter_mut().zip(hi_out.iter_mut())).enumerate() {
                    let ql = (byte & 0x0f) as u32 | ((qh >> j) & 1) << 4;
                    let qu = (byte >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
                    *lo = d * (ql as i32 - 16) as f32;
                    *hi = d * (qu as i32 - 16) as f32;
                }
            }
            DType::Q5_1 => {
                // [d][m][qh: u32][16 bytes of nibbles], as Q5_0 with x = d·q + m.
                let (d, m) = (h!(0), h!(2));
                let qh = u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]);
                let (lo_out, hi_out) = out.split_at_mut(16);
                for (j, (&byte, (lo, hi))) in blk[8..24].iter().zip(lo_out.iter_mut().zip(hi_out.iter_mut())).enumerate() {
                    let ql = (byte & 0x0f) as u32 | ((qh >> j) & 1) << 4;
                    let qu = (byte >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
                    *lo = d * ql as f32 + m;
                    *hi = d * qu as f32 + m;
                }
            }
            DType::IQ4NL => {
                let d = h!(0);
                for (j, &byte) in blk[2..18].iter().enumerate() {
                    out[j] = d * IQ4_VALUES[(byte & 0x0f) as usize] as f32;
                    out[j + 16] = d * IQ4_VALUES[(byte >> 4) as usize] as f32;
                }
            }
            DType::Q2K => {
                // [scales 16: low nibble sc, high nibble m][qs 64][d][dmin]. Element
                // e = 128c + 32j + l (c < 2, j < 4, l < 32) is bits 2j..2j+2 of qs[32c + l];
                // group e / 16 = 8c + 2j + l / 16 uses scales[e / 16].
                let (d, dmin) = (h!(80), h!(82));
                let (mut dl, mut ml) = ([0f32; 16], [0f32; 16]);
                for (g, &sc) in blk[..16].iter().enumerate() {
                    dl[g] = d * (sc & 0x0f) as f32;
                    ml[g] = dmin * (sc >> 4) as f32;
                }
                for c in 0..2 {
                    let qs = &blk[16 + 32 * c..48 + 32 * c];
                    for j in 0..4 {
                        for half in 0..2 {
                            let g = 8 * c + 2 * j + half;
                            let (dl, ml) = (dl[g], ml[g]);
                            let y = &mut out[16 * g..16 * g + 16];
                            for (o, &q) in y.iter_mut().zip(&qs[16 * half..16 * half + 16]) {
                                *o = dl * ((q >> (2 * j)) & 3) as f32 - ml;
                            }
                        }
                    }
                }
            }
            DType::Q3K => {
                // [hmask 32][qs 64][scales 12][d]. Scale s < 16 (group of 16): low 4 bits are
                // nibble s / 8 of scales[s % 8], high 2 bits are bits 2(s / 4).. of
                // scales[8 + s % 4]; value − 32. Element e = 128c + 32j + l has low bits
                // 2j..2j+2 of qs[32c + l] and high bit e / 32 of hmask[l]; a clear high bit
                // subtracts 4.
                let d = h!(108);
                let sc = &blk[96..108];
                let mut dl = [0f32; 16];
                for (s, v) in dl.iter_mut().enumerate() {
                    let lo = (sc[s % 8] >> (4 * (s / 8))) & 0x0f;
                    let hi = (sc[8 + s % 4] >> (2 * (s / 4))) & 3;
                    *v = d * ((lo | hi << 4) as i8 - 32) as f32;
                }
                let hmask = &blk[..32];
                for c in 0..2 {
                    let qs = &blk[32 + 32 * c..64 + 32 * c];
                    for j in 0..4 {
                        let hb = 4 * c + j; // e / 32
                        for half in 0..2 {
                            let g = 8 * c + 2 * j + half;
                            let dl = dl[g];
                            let y = &mut out[16 * g..16 * g + 16];
                            let r = 16 * half..16 * half + 16;
                            for ((o, &q), &m) in y.iter_mut().zip(&qs[r.clone()]).zip(&hmask[r]) {
                                let lo = ((q >> (2 * j)) & 3) as i8;
                                let hbit = (m >> hb) & 1;
                                *o = dl * (lo - (((hbit ^ 1) << 2) as i8)) as f32;
                            }
                        }
                    }
                }
            }
            DType::Q4K | DType::Q5K => {
                // [d][dmin][scales 12][qh 32 (Q5K)][qs 128]. Group g < 8 of 32: element
                // 32g + l is nibble g % 2 of qs[32(g / 2) + l] (+ 16 × bit g of qh[l] for Q5K).
                let (d, dmin) = (h!(0), h!(2));
                let (sc, mn) = k_scale_min(&blk[4..16]);
                let (qh, qs) = if self == DType::Q5K { (Some(&blk[16..48]), &blk[48..176]) } else { (None, &blk[16..144]) };
                for g in 0..8 {
                    let dl = d * sc[g] as f32;
                    let ml = dmin * mn[g] as f32;
                    for l in 0..32 {
                        let mut q = (qs[32 * (g / 2) + l] >> (4 * (g % 2))) & 0x0f;
                        if let Some(qh) = qh {
                            q |= ((qh[l] >> g) & 1) << 4;
                        }
                        out[32 * g + l] = dl * q as f32 - ml;
                    }
                }
            }
            DType::Q6K => {
                // [ql 128][qh 64][scales 16 × i8][d]. Element e = 128c + r (c < 2, r < 128):
                // low nibble r / 64 of ql[64c + r % 64], high 2 bits at 2(r / 32) of
                // qh[32c + r % 32]; group e / 16 uses scales[e / 16]; q − 32. Below, for
                // l < 32, the four elements r = l, l + 32, l + 64, l + 96 share qh[32c + l].
                let d = h!(208);
                let mut dl = [0f32; 16];
                for (g, &sc) in blk[192..208].iter().enumerate() {
                    dl[g] = d * (sc as i8) as f32;
                }
                for c in 0..2 {
                    let ql = &blk[64 * c..64 * c + 64];
                    let qh = &blk[128 + 32 * c..160 + 32 * c];
                    let y = &mut out[128 * c..128 * c + 128];
                    for l in 0..32 {
                        let (a, b, hb) = (ql[l], ql[l + 32], qh[l]);
                        let g = 8 * c + l / 16;
                        let q1 = ((a & 0x0f) | (hb & 3) << 4) as i8 - 32;
                        let q2 = ((b & 0x0f) | ((hb >> 2) & 3) << 4) as i8 - 32;
                        let q3 = ((a >> 4) | ((hb >> 4) & 3) << 4) as i8 - 32;
                        let q4 = ((b >> 4) | ((hb >> 6) & 3) << 4) as i8 - 32;
                        y[l] = dl[g] * q1 as f32;
                        y[l + 32] = dl[g + 2] * q2 as f32;
                        y[l + 64] = dl[g + 4] * q3 as f32;
                        y[l + 96] = dl[g + 6] * q4 as f32;
                    }
                }
            }
            DType::IQ4XS => {
                // [d][scales_h: u16, bits 2g..2g+2 for group g][scales_l 4: nibble g % 2 of
                // byte g / 2][qs 128]. Group g < 8 of 32: element 32g + 16k + l is nibble k of
                // qs[16g + l]; scale − 32.
                let d = h!(0);
                let sh = u16::from_le_bytes([blk[2], blk[3]]);
                for g in 0..8 {
                    let lo = (blk[4 + g / 2] >> (4 * (g % 2))) & 0x0f;
                    let hi = ((sh >> (2 * g)) & 3) as u8;
                    let dl = d * ((lo | hi << 4) as i8 - 32) as f32;
                    for (l, &byte) in blk[8 + 16 * g..24 + 16 * g].iter().enumerate() {
                        out[32 * g + l] = dl * IQ4_VALUES[(byte & 0x0f) as usize] as f32;
                        out[32 * g + 16 + l] = dl * IQ4_VALUES[(byte >> 4) as usize] as f32;
                    }
                }
            }
            DType::F32 | DType::F64 | DType::BF16 | DType::F16 => unreachable!("dequantize_one on an unquantized dtype"),
        }
    }

    /// Byte offsets (within a block) of the f16 scales of a quantized dtype: d, and dmin/m
    /// where the type has one. A non-finite scale makes the whole block non-finite: that is
    /// what a corrupted block looks like (llama.cpp's own tensor validation checks the same).
    pub fn scale_offsets(self) -> &'static [usize] {
        match self {
            DType::Q8_0 | DType::Q4_0 | DType::Q5_0 | DType::IQ4NL | DType::IQ4XS => &[0],
            DType::Q4_1 | DType::Q5_1 | DType::Q4K | DType::Q5K => &[0, 2],
            DType::Q2K => &[80, 82],
            DType::Q3K => &[108],
            DType::Q6K => &[208],
            DType::F32 | DType::F64 | DType::BF16 | DType::F16 => &[],
        }
    }

    /// Checks every block of `bytes` (whole blocks of this quantized dtype): the index and
    /// value of the first block whose f16 scale is NaN or infinite, if any.
    pub fn find_bad_block(self, bytes: &[u8]) -> Option<(usize, usize, f32)> {
        let offs = self.scale_offsets();
        bytes.chunks_exact(self.size()).enumerate().find_map(|(b, blk)| {
            offs.iter().find_map(|&o| {
                let x = f16::from_bits(u16::from_le_bytes([blk[o], blk[o + 1]]));
                (!x.is_finite()).then(|| (b, o, x.to_f32()))
            })
        })
    }
}

/// The 6-bit scales and mins of a Q4_K/Q5_K super-block, packed in 12 bytes: for g < 4,
/// sc[g] = low 6 bits of byte g and m[g] = low 6 bits of byte g + 4; for g ≥ 4, the low 4
/// bits come from byte g + 4 (sc: low nibble, m: high nibble) and the high 2 bits from the
/// top bits of bytes g − 4 (sc) and g (m).
fn k_scale_min(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for g in 0..4 {
        sc[g] = s[g] & 0x3f;
        m[g] = s[g + 4] & 0x3f;
        sc[g + 4] = (s[g + 8] & 0x0f) | ((s[g] >> 2) & 0x30);
        m[g + 4] = (s[g + 8] >> 4) | ((s[g + 4] >> 2) & 0x30);
    }
    (sc, m)
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
    fn from_f32(x: f32) -> Self;
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
            fn from_f32(x: f32) -> Self {
                x as $t
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
