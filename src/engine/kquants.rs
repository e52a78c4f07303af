//! The other GGUF block formats used as stored: the legacy 32-value blocks Q4_0, Q5_0 and Q5_1,
//! and the 256-value K-quant super-blocks Q2_K, Q3_K, Q4_K, Q5_K and Q6_K. For each: the block
//! layout, row dequantization (the embedding lookup), and dot kernels against the activation
//! quantization llama.cpp pairs with it (Q8_0 for Q4_0/Q5_0, Q8_1 for Q5_1, Q8_K for the
//! K-quants), a portable scalar reference and AVX2 versions (the K-quant rows also on AVX-512
//! BW, with the same bits).
//!
//! [`super::qmatmul`] owns the matrices, the Q8_0/Q8_1 activations and the parallel dispatch;
//! this module only adds block arithmetic. Within one block or super-block every product is
//! summed exactly in integers and scaled once in f32, as llama.cpp does, so our logits stay
//! within rounding of its own (its summation order across blocks may differ; the fidelity tests
//! state the tolerance).
//!
//! K-quants, uniformly: a super-block of 256 values unpacks to unsigned small integers `u` with
//! one signed scale per 16 values (`sc`), a super-scale `d`, and either a per-16 `min` times
//! `dmin` (Q2_K, Q4_K, Q5_K: `x = d*sc*u - dmin*min`) or a fixed offset (Q3_K: 4, Q6_K: 32:
//! `x = d*sc*(u - off)`). The unsigned `u` go straight into `maddubs`; the min / offset term is
//! the per-16 activation sums (Q8_K's `bsums`) times those coefficients.
//!
//! Must not: allocate per call in a kernel, or use AVX2 without the caller's run-time check.

use super::qmatmul::Format;

/// The matrix types the llama engine multiplies, for error messages.
pub const SUPPORTED: &str = "q4_0, q4_1, q5_0, q5_1, q8_0, q2_K, q3_K, q4_K, q5_K, q6_K used as \
     stored; f32, f16, bf16 quantized to q8_0 at load (requantize other types with llama.cpp's \
     llama-quantize, e.g. to Q4_K_M or Q8_0)";

/// llama.cpp's name for a `ggml_type` number this build cannot read (candle's GGUF parser fails
/// on them before any engine code runs), so the load error can say which type the file holds.
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        16 => "iq2_xxs",
        17 => "iq2_xs",
        18 => "iq3_xxs",
        19 => "iq1_s",
        20 => "iq4_nl",
        21 => "iq3_s",
        22 => "iq2_s",
        23 => "iq4_xs",
        24 => "i8",
        25 => "i16",
        26 => "i32",
        27 => "i64",
        28 => "f64",
        29 => "iq1_m",
        34 => "tq1_0",
        35 => "tq2_0",
        39 => "mxfp4",
        40 => "nvfp4",
        41 => "q1_0",
        42 => "q2_0",
        _ => return None,
    })
}

/// The load error for a GGUF candle's parser refused: names the tensor type when that was the
/// reason ("unknown dtype for tensor 20" -> iq4_nl) and what this build supports.
pub fn explain_parse_error(e: &str) -> String {
    // candle appends a backtrace to the message when RUST_BACKTRACE is set: the first line only.
    let unknown = e
        .lines()
        .next()
        .unwrap_or_default()
        .rsplit_once("unknown dtype for tensor ")
        .and_then(|(_, id)| id.trim().parse::<u32>().ok());
    match unknown {
        Some(id) => format!(
            "the GGUF holds tensors of type {} (ggml type {id}), which this build does not \
             read; supported: {SUPPORTED}",
            ggml_type_name(id).unwrap_or("unknown")
        ),
        None => format!("not a readable GGUF file: {e}"),
    }
}

/// Values per K-quant super-block (and per Q8_K activation block).
pub const QK_K: usize = 256;

/// Activation rows quantized as llama.cpp's Q8_K: per 256 values an f32 scale `d`, 256 i8 and the
/// 16 sums of 16 consecutive quants (`bsums`, for the min / offset terms).
pub struct Q8K {
    qs: Vec<i8>,
    d: Vec<f32>,
    bsums: Vec<i32>,
}

impl Q8K {
    /// Quantizes `x` (rows of `k`, `k` a multiple of 256) as `quantize_row_q8_K_ref`: the scale
    /// is `-127 / v` for `v` the value of largest magnitude (its sign kept), rounded half to even.
    pub fn quantize(x: &[f32]) -> Self {
        let nb = x.len() / QK_K;
        let mut a = Q8K {
            qs: vec![0; nb * QK_K],
            d: vec![0.0; nb],
            bsums: vec![0; nb * 16],
        };
        for (b, xb) in x.chunks_exact(QK_K).enumerate() {
            let (mut amax, mut max) = (0f32, 0f32);
            for &v in xb {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            if amax == 0.0 {
                continue;
            }
            let iscale = -127.0 / max;
            let qb = &mut a.qs[b * QK_K..(b + 1) * QK_K];
            for (q, &v) in qb.iter_mut().zip(xb) {
                *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
            }
            for (s, q16) in a.bsums[b * 16..(b + 1) * 16]
                .iter_mut()
                .zip(qb.chunks_exact(16))
            {
                *s = q16.iter().map(|&q| q as i32).sum();
            }
            a.d[b] = 1.0 / iscale;
        }
        a
    }
}

/// [`Q8K`] rows widened for `vpdpwssd`: each two neighbouring quants as the i16 pair of one i32
/// (the first in the low half), and the 16-value sums paired the same way (each at most 16 · 127
/// in magnitude). Built once per matrix product, for the 16-column prefill kernel.
pub struct Q8KWide {
    qs: Vec<i32>,
    bsums: Vec<i32>,
}

impl Q8K {
    pub fn widen(&self) -> Q8KWide {
        let pair = |a: i32, b: i32| (a as u16 as u32 | ((b as u16 as u32) << 16)) as i32;
        Q8KWide {
            qs: self
                .qs
                .chunks_exact(2)
                .map(|p| pair(p[0] as i32, p[1] as i32))
                .collect(),
            bsums: self
                .bsums
                .chunks_exact(2)
                .map(|p| pair(p[0], p[1]))
                .collect(),
        }
    }
}

/// The quantized activations a kernel reads: Q8_0/Q8_1 blocks of 32 (`qs`, `d`, `s` as
/// [`super::qmatmul::QActs`] holds them) and, when the row length allows, Q8_K.
#[derive(Clone, Copy)]
pub struct Acts<'a> {
    pub k: usize,
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub k8: Option<&'a Q8K>,
}

impl Acts<'_> {
    fn q8k(&self) -> &Q8K {
        self.k8
            .expect("invariant: Q8_K activations exist whenever a K-quant matrix is multiplied")
    }
}

/// Output rows per kernel call, as [`super::qmatmul`]'s.
pub const MR: usize = 16;

#[inline(always)]
fn f16(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Layout facts per format.
pub fn is_k_quant(f: Format) -> bool {
    matches!(
        f,
        Format::Q2K | Format::Q3K | Format::Q4K | Format::Q5K | Format::Q6K
    )
}

// ---------------------------------------------------------------------------------------------
// Legacy 32-value blocks.
//
// Q4_0: {f16 d, 16 B nibbles}, x = d * (q - 8). Q5_0: {f16 d, u32 qh, 16 B nibbles},
// x = d * (q - 16), bit j of qh the fifth bit of value j. Q5_1: {f16 d, f16 m, u32 qh, 16 B},
// x = d * q + m. Low nibbles are values 0..16, high nibbles 16..32, as in Q4_1.

/// Unsigned values of one legacy block (0..16 or 0..32) and the offset subtracted from them.
#[inline(always)]
fn legacy_values(f: Format, blk: &[u8], u: &mut [u8; 32]) -> i32 {
    let (qh, qs, off) = match f {
        Format::Q4_0 => (0u32, &blk[2..18], 8),
        Format::Q5_0 => (
            u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]),
            &blk[6..22],
            16,
        ),
        Format::Q5_1 => (
            u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]),
            &blk[8..24],
            0,
        ),
        _ => unreachable!("legacy_values on {f:?}"),
    };
    for i in 0..16 {
        u[i] = (qs[i] & 0x0F) | (((qh >> i) & 1) << 4) as u8;
        u[i + 16] = (qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4) as u8;
    }
    off
}

// ---------------------------------------------------------------------------------------------
// K-quant super-blocks.
//
// Q2_K (84 B): {16 B scales (4-bit scale | 4-bit min << 4), 64 B 2-bit quants, f16 d, f16 dmin}.
// Q3_K (110 B): {32 B high-bit mask, 64 B 2-bit quants, 12 B 6-bit scales (offset 32), f16 d}.
// Q4_K (144 B): {f16 d, f16 dmin, 12 B 6-bit scales and mins for 8 x 32, 128 B nibbles}.
// Q5_K (176 B): Q4_K's head, 32 B fifth bits, 128 B nibbles.
// Q6_K (210 B): {128 B low nibbles, 64 B high 2-bit pairs, 16 x i8 scales, f16 d}.
// In Q2_K/Q3_K, values n*128 + j*32 + h*16 + l (n < 2, j < 4, h < 2, l < 16) sit in byte
// n*32 + h*16 + l of the quants at bits 2j; Q3_K's high bit is bit n*4 + j of mask byte h*16 + l.
// Q4_K/Q5_K: values j*64 + l and j*64 + 32 + l in the low and high nibble of byte j*32 + l;
// Q5_K's fifth bits at bits 2j and 2j + 1 of qh[l]. Q6_K: per 128 values n, value
// n*128 + c*32 + l from low (c even) or high (c odd) nibble of ql[n*64 + (c & 1)*32 + l] and
// bits 2c of qh[n*32 + l].

/// One super-block, unpacked: `u[i]` unsigned, `sc[s]` per 16 values, and either per-16 `min`
/// coefficients (times `dmin`) or an offset.
struct Super {
    u: [u8; QK_K],
    sc: [i32; 16],
    min: [i32; 16],
    d: f32,
    dmin: f32,
    off: i32,
}

/// Q4_K/Q5_K's 12 bytes: 8 six-bit scales and 8 six-bit mins.
#[inline(always)]
fn scales_k4(q: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        if j < 4 {
            sc[j] = q[j] & 63;
            m[j] = q[j + 4] & 63;
        } else {
            sc[j] = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
            m[j] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        }
    }
    (sc, m)
}

/// Q3_K's 12 bytes: 16 six-bit scales, stored with an offset of 32.
#[inline(always)]
fn scales_q3(s: &[u8]) -> [i32; 16] {
    let mut out = [0i32; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let lo = if i < 8 { s[i] & 0x0F } else { s[i - 8] >> 4 };
        let hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = (lo | (hi << 4)) as i32 - 32;
    }
    out
}

/// Scales, mins and offset of a super-block (everything but the quants).
#[inline(always)]
fn super_head(f: Format, blk: &[u8]) -> ([i32; 16], [i32; 16], f32, f32, i32) {
    let (mut sc, mut min) = ([0i32; 16], [0i32; 16]);
    match f {
        Format::Q2K => {
            for s in 0..16 {
                sc[s] = (blk[s] & 0x0F) as i32;
                min[s] = (blk[s] >> 4) as i32;
            }
            (sc, min, f16(blk, 80), f16(blk, 82), 0)
        }
        Format::Q3K => (scales_q3(&blk[96..108]), min, f16(blk, 108), 0.0, 4),
        Format::Q4K | Format::Q5K => {
            let (s8, m8) = scales_k4(&blk[4..16]);
            for s in 0..16 {
                sc[s] = s8[s / 2] as i32;
                min[s] = m8[s / 2] as i32;
            }
            (sc, min, f16(blk, 0), f16(blk, 2), 0)
        }
        Format::Q6K => {
            for s in 0..16 {
                sc[s] = blk[192 + s] as i8 as i32;
            }
            (sc, min, f16(blk, 208), 0.0, 32)
        }
        _ => unreachable!("super_head on {f:?}"),
    }
}

fn unpack_super(f: Format, blk: &[u8]) -> Super {
    let (sc, min, d, dmin, off) = super_head(f, blk);
    let mut u = [0u8; QK_K];
    match f {
        Format::Q2K | Format::Q3K => {
            let qs = if f == Format::Q2K {
                &blk[16..80]
            } else {
                &blk[32..96]
            };
            for n in 0..2 {
                for j in 0..4 {
                    for l in 0..32 {
                        let mut v = (qs[n * 32 + l] >> (2 * j)) & 3;
                        if f == Format::Q3K {
                            v |= ((blk[l] >> (n * 4 + j)) & 1) << 2;
                        }
                        u[n * 128 + j * 32 + l] = v;
                    }
                }
            }
        }
        Format::Q4K | Format::Q5K => {
            let (qh, qs) = if f == Format::Q4K {
                (None, &blk[16..144])
            } else {
                (Some(&blk[16..48]), &blk[48..176])
            };
            for j in 0..4 {
                for l in 0..32 {
                    let b = qs[j * 32 + l];
                    let (mut lo, mut hi) = (b & 0x0F, b >> 4);
                    if let Some(qh) = qh {
                        lo |= ((qh[l] >> (2 * j)) & 1) << 4;
                        hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
                    }
                    u[j * 64 + l] = lo;
                    u[j * 64 + 32 + l] = hi;
                }
            }
        }
        Format::Q6K => {
            let (ql, qh) = (&blk[0..128], &blk[128..192]);
            for n in 0..2 {
                for c in 0..4 {
                    for l in 0..32 {
                        let b = ql[n * 64 + (c & 1) * 32 + l];
                        let lo = if c < 2 { b & 0x0F } else { b >> 4 };
                        let hi = (qh[n * 32 + l] >> (2 * c)) & 3;
                        u[n * 128 + c * 32 + l] = lo | (hi << 4);
                    }
                }
            }
        }
        _ => unreachable!("unpack_super on {f:?}"),
    }
    Super {
        u,
        sc,
        min,
        d,
        dmin,
        off,
    }
}

/// Dequantizes one row (`out.len()` values) of `format` from `row`.
pub fn dequant_row(format: Format, row: &[u8], out: &mut [f32]) {
    let bb = format.block_bytes();
    if is_k_quant(format) {
        for (blk, o) in row.chunks_exact(bb).zip(out.chunks_exact_mut(QK_K)) {
            let s = unpack_super(format, blk);
            for (i, o) in o.iter_mut().enumerate() {
                let ds = s.d * s.sc[i / 16] as f32;
                *o = if s.off != 0 {
                    ds * (s.u[i] as i32 - s.off) as f32
                } else {
                    ds * s.u[i] as f32 - s.dmin * s.min[i / 16] as f32
                };
            }
        }
        return;
    }
    let mut u = [0u8; 32];
    for (blk, o) in row.chunks_exact(bb).zip(out.chunks_exact_mut(32)) {
        let off = legacy_values(format, blk, &mut u);
        let d = f16(blk, 0);
        let m = if format == Format::Q5_1 {
            f16(blk, 2)
        } else {
            0.0
        };
        for (o, &q) in o.iter_mut().zip(&u) {
            *o = d * (q as i32 - off) as f32 + m;
        }
    }
}

/// Portable reference: one weight row times activation rows `r0..r0 + nr`.
pub fn dot_rows_scalar(
    format: Format,
    row: &[u8],
    a: &Acts,
    r0: usize,
    nr: usize,
    res: &mut [f32; MR],
) {
    let bb = format.block_bytes();
    if is_k_quant(format) {
        let y = a.q8k();
        let kb = a.k / QK_K;
        let mut acc = [0f32; MR];
        let mut accm = [0f32; MR];
        for (b, blk) in row.chunks_exact(bb).enumerate() {
            let s = unpack_super(format, blk);
            for r in 0..nr {
                let yi = (r0 + r) * kb + b;
                let q8 = &y.qs[yi * QK_K..(yi + 1) * QK_K];
                let bs = &y.bsums[yi * 16..(yi + 1) * 16];
                let mut sumi = 0i32;
                let mut corr = 0i32;
                for g in 0..16 {
                    let p: i32 = s.u[g * 16..(g + 1) * 16]
                        .iter()
                        .zip(&q8[g * 16..(g + 1) * 16])
                        .map(|(&u, &q)| u as i32 * q as i32)
                        .sum();
                    sumi += s.sc[g] * p;
                    corr += if s.off != 0 {
                        s.off * s.sc[g] * bs[g]
                    } else {
                        s.min[g] * bs[g]
                    };
                }
                let yd = y.d[yi];
                if s.off != 0 {
                    acc[r] += s.d * yd * (sumi - corr) as f32;
                } else {
                    acc[r] += s.d * yd * sumi as f32;
                    accm[r] -= s.dmin * yd * corr as f32;
                }
            }
        }
        for r in 0..nr {
            res[r] = acc[r] + accm[r];
        }
        return;
    }
    let kb = a.k / 32;
    let mut u = [0u8; 32];
    let mut acc = [0f32; MR];
    for (b, blk) in row.chunks_exact(bb).enumerate() {
        let off = legacy_values(format, blk, &mut u);
        let dw = f16(blk, 0);
        for (r, acc) in acc.iter_mut().enumerate().take(nr) {
            let xi = (r0 + r) * kb + b;
            let dot: i32 = u
                .iter()
                .zip(&a.qs[xi * 32..(xi + 1) * 32])
                .map(|(&u, &q)| (u as i32 - off) * q as i32)
                .sum();
            *acc += dw * a.d[xi] * dot as f32;
            if format == Format::Q5_1 {
                *acc += f16(blk, 2) * a.s[xi];
            }
        }
    }
    res[..nr].copy_from_slice(&acc[..nr]);
}

#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    //! AVX2 versions of the kernels above (the same integer sums; f32 partial sums per lane).

    use super::{is_k_quant, Acts, Format, MR, QK_K};
    use crate::engine::qmatmul::x86::{f16_at, hsum, prefetch_ahead, store_columns};
    use std::arch::x86_64::*;

    /// 32 bytes, byte i = 0x10 where bit i of the u32 at `p` is set, else 0.
    #[inline(always)]
    unsafe fn bits_to_0x10(p: *const u8) -> __m256i {
        let x = _mm256_set1_epi32((p as *const u32).read_unaligned() as i32);
        // Byte i takes source byte i / 8, then tests its bit i % 8.
        let pick = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let sel = _mm256_and_si256(_mm256_shuffle_epi8(x, pick), bit);
        _mm256_and_si256(_mm256_cmpeq_epi8(sel, bit), _mm256_set1_epi8(0x10))
    }

    /// The 32 nibbles of a legacy block (values 0..16 low, 16..32 high), as bytes, and where its
    /// fifth bits are (Q5_0, Q5_1).
    #[inline(always)]
    unsafe fn legacy_nibbles(f: Format, blk: *const u8) -> (__m256i, Option<*const u8>) {
        let (qs, qh) = match f {
            Format::Q4_0 => (blk.add(2), None),
            Format::Q5_0 => (blk.add(6), Some(blk.add(2))),
            _ => (blk.add(8), Some(blk.add(4))),
        };
        let t = _mm_loadu_si128(qs as *const __m128i);
        let u = _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(t, 4), t),
            _mm256_set1_epi8(0x0F),
        );
        (u, qh)
    }

    /// The 32 unsigned values of a legacy block (nibbles | fifth bit), as bytes.
    ///
    /// # Safety
    /// AVX2; `blk` points at one whole block of `f` (Q4_0, Q5_0 or Q5_1).
    #[inline(always)]
    pub(in crate::engine) unsafe fn legacy_u(f: Format, blk: *const u8) -> __m256i {
        match legacy_nibbles(f, blk) {
            (u, Some(h)) => _mm256_or_si256(u, bits_to_0x10(h)),
            (u, None) => u,
        }
    }

    /// Signed block values (`u - off`) against signed activations: the sign trick, as for Q8_0.
    #[inline(always)]
    unsafe fn dot_signed(w: __m256i, y: __m256i) -> __m256i {
        _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w)),
            _mm256_set1_epi16(1),
        )
    }

    /// One legacy block (Q4_0, Q5_0, Q5_1) times one 32-value activation block: the i32 lanes.
    #[inline(always)]
    unsafe fn legacy_dot(f: Format, u: __m256i, y: __m256i) -> __m256i {
        match f {
            Format::Q4_0 => dot_signed(_mm256_sub_epi8(u, _mm256_set1_epi8(8)), y),
            Format::Q5_0 => dot_signed(_mm256_sub_epi8(u, _mm256_set1_epi8(16)), y),
            _ => _mm256_madd_epi16(_mm256_maddubs_epi16(u, y), _mm256_set1_epi16(1)),
        }
    }

    /// Legacy weight row x activation rows `r0..r0 + nr`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `row` is `a.k / 32` blocks of `f`; rows `r0..r0 + nr` exist in `a`.
    #[inline(never)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn legacy_rows(
        f: Format,
        row: &[u8],
        a: &Acts,
        r0: usize,
        nr: usize,
        res: &mut [f32; MR],
    ) {
        let kb = a.k / 32;
        let bb = f.block_bytes();
        let mut acc = [_mm256_setzero_ps(); MR];
        let mut summ = [0f32; MR];
        let wp = row.as_ptr();
        let xq = a.qs.as_ptr();
        for b in 0..kb {
            let blk = wp.add(b * bb);
            let dw = f16_at(blk);
            let u = legacy_u(f, blk);
            for r in 0..nr {
                let xi = (r0 + r) * kb + b;
                let y = _mm256_loadu_si256(xq.add(xi * 32) as *const __m256i);
                let p = legacy_dot(f, u, y);
                let d = _mm256_set1_ps(dw * *a.d.get_unchecked(xi));
                acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[r]);
                if f == Format::Q5_1 {
                    summ[r] += f16_at(blk.add(2)) * *a.s.get_unchecked(xi);
                }
            }
        }
        for r in 0..nr {
            res[r] = hsum(acc[r]) + summ[r];
        }
    }

    /// Decode: two legacy weight rows times the one activation row (two FMA chains in flight).
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `w0`, `w1` are `a.k / 32` blocks of `f`; `a` has one row.
    #[inline(never)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn legacy_pair(f: Format, w0: &[u8], w1: &[u8], a: &Acts) -> [f32; 2] {
        let kb = a.k / 32;
        let bb = f.block_bytes();
        let (p0, p1) = (w0.as_ptr(), w1.as_ptr());
        let xq = a.qs.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut summ = [0f32; 2];
        for b in 0..kb {
            let y = _mm256_loadu_si256(xq.add(b * 32) as *const __m256i);
            let dx = *a.d.get_unchecked(b);
            for (i, p) in [p0, p1].into_iter().enumerate() {
                let blk = p.add(b * bb);
                prefetch_ahead(blk);
                let prod = legacy_dot(f, legacy_u(f, blk), y);
                let d = _mm256_set1_ps(f16_at(blk) * dx);
                acc[i] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(prod), acc[i]);
                if f == Format::Q5_1 {
                    summ[i] += f16_at(blk.add(2)) * *a.s.get_unchecked(b);
                }
            }
        }
        [hsum(acc[0]) + summ[0], hsum(acc[1]) + summ[1]]
    }

    /// A super-block unpacked into registers: eight vectors of 32 unsigned values (values
    /// v*32..v*32 + 32) and, per vector, its two per-16 scales as i16 lanes.
    struct Unpacked {
        u: [__m256i; 8],
        sc: [__m256i; 8],
    }

    /// Unpacks the quants of super-block `blk` of `f`; `sc` are its 16 per-16 scales.
    #[inline(always)]
    unsafe fn unpack(f: Format, blk: *const u8, sc: &[i32; 16]) -> Unpacked {
        let zero = _mm256_setzero_si256();
        let mut u = [zero; 8];
        let m3 = _mm256_set1_epi8(3);
        let m4 = _mm256_set1_epi8(0x0F);
        let one = _mm256_set1_epi8(1);
        match f {
            Format::Q2K | Format::Q3K => {
                let qs = if f == Format::Q2K {
                    blk.add(16)
                } else {
                    blk.add(32)
                };
                let hm = _mm256_loadu_si256(blk as *const __m256i);
                for n in 0..2 {
                    let q = _mm256_loadu_si256(qs.add(n * 32) as *const __m256i);
                    for j in 0..4 {
                        let sh = _mm_cvtsi32_si128(2 * j as i32);
                        let mut v = _mm256_and_si256(_mm256_srl_epi16(q, sh), m3);
                        if f == Format::Q3K {
                            let hs = _mm_cvtsi32_si128((n * 4 + j) as i32);
                            let h = _mm256_and_si256(_mm256_srl_epi16(hm, hs), one);
                            v = _mm256_or_si256(v, _mm256_slli_epi16(h, 2));
                        }
                        u[n * 4 + j] = v;
                    }
                }
            }
            Format::Q4K | Format::Q5K => {
                let qs = if f == Format::Q4K {
                    blk.add(16)
                } else {
                    blk.add(48)
                };
                let qh = _mm256_loadu_si256(blk.add(16) as *const __m256i);
                for j in 0..4 {
                    let q = _mm256_loadu_si256(qs.add(j * 32) as *const __m256i);
                    let mut lo = _mm256_and_si256(q, m4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                    if f == Format::Q5K {
                        let s0 = _mm_cvtsi32_si128(2 * j as i32);
                        let s1 = _mm_cvtsi32_si128(2 * j as i32 + 1);
                        let h0 = _mm256_and_si256(_mm256_srl_epi16(qh, s0), one);
                        let h1 = _mm256_and_si256(_mm256_srl_epi16(qh, s1), one);
                        lo = _mm256_or_si256(lo, _mm256_slli_epi16(h0, 4));
                        hi = _mm256_or_si256(hi, _mm256_slli_epi16(h1, 4));
                    }
                    u[2 * j] = lo;
                    u[2 * j + 1] = hi;
                }
            }
            _ => {
                // Q6K
                for n in 0..2 {
                    let l0 = _mm256_loadu_si256(blk.add(n * 64) as *const __m256i);
                    let l1 = _mm256_loadu_si256(blk.add(n * 64 + 32) as *const __m256i);
                    let h = _mm256_loadu_si256(blk.add(128 + n * 32) as *const __m256i);
                    for c in 0..4 {
                        let l = if c & 1 == 0 { l0 } else { l1 };
                        let lo = if c < 2 {
                            _mm256_and_si256(l, m4)
                        } else {
                            _mm256_and_si256(_mm256_srli_epi16(l, 4), m4)
                        };
                        let hs = _mm_cvtsi32_si128(2 * c as i32);
                        let hi = _mm256_and_si256(_mm256_srl_epi16(h, hs), m3);
                        u[n * 4 + c] = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
                    }
                }
            }
        }
        let mut scv = [zero; 8];
        for (v, s) in scv.iter_mut().enumerate() {
            *s = _mm256_set_m128i(
                _mm_set1_epi16(sc[2 * v + 1] as i16),
                _mm_set1_epi16(sc[2 * v] as i16),
            );
        }
        Unpacked { u, sc: scv }
    }

    /// K-quant weight row x Q8_K activation rows `r0..r0 + nr`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `row` is `a.k / 256` super-blocks of `f`; rows `r0..r0 + nr` exist in
    /// `a`'s Q8_K activations.
    #[inline(never)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn k_rows(f: Format, row: &[u8], a: &Acts, r0: usize, nr: usize, res: &mut [f32; MR]) {
        k_rows_with::<false>(f, row, a, r0, nr, res)
    }

    /// [`k_rows`] on AVX-512 BW: the eight 32-value vectors of a super-block paired into four
    /// 512-bit ones, and the min / offset term (16 products of the per-16 coefficients and
    /// `bsums`) in one vector multiply and a reduction instead of 16 scalar ones. The i32 sums are
    /// exact in any order and the float steps are [`k_rows`]' own: the same bits.
    ///
    /// # Safety
    /// As [`k_rows`], and the CPU has AVX-512 F, VL and BW.
    #[inline(never)]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw")]
    pub unsafe fn k_rows_512(
        f: Format,
        row: &[u8],
        a: &Acts,
        r0: usize,
        nr: usize,
        res: &mut [f32; MR],
    ) {
        k_rows_with::<true>(f, row, a, r0, nr, res)
    }

    #[inline(always)]
    unsafe fn k_rows_with<const WIDE: bool>(
        f: Format,
        row: &[u8],
        a: &Acts,
        r0: usize,
        nr: usize,
        res: &mut [f32; MR],
    ) {
        let y = a.q8k();
        let kb = a.k / QK_K;
        let bb = f.block_bytes();
        let mut acc = [_mm256_setzero_ps(); MR];
        let mut accm = [0f32; MR];
        for b in 0..kb {
            let blk = &row[b * bb..(b + 1) * bb];
            if nr == 1 {
                // Decode: one row read once (prefill reuses each block across the rows).
                for line in (0..bb).step_by(64) {
                    prefetch_ahead(blk.as_ptr().add(line));
                }
            }
            let (sc, min, d, dmin, off) = super::super_head(f, blk);
            let w = unpack(f, blk.as_ptr(), &sc);
            // The 512-bit forms: vectors 2i and 2i + 1 side by side, and the coefficients of the
            // min / offset term (unused by the 256-bit form).
            let pair = |v: &[__m256i; 8], i: usize| {
                _mm512_inserti64x4(_mm512_castsi256_si512(v[2 * i]), v[2 * i + 1], 1)
            };
            let (u, scv, coef) = if WIDE {
                let coef = if off != 0 { sc.as_ptr() } else { min.as_ptr() };
                (
                    [pair(&w.u, 0), pair(&w.u, 1), pair(&w.u, 2), pair(&w.u, 3)],
                    [
                        pair(&w.sc, 0),
                        pair(&w.sc, 1),
                        pair(&w.sc, 2),
                        pair(&w.sc, 3),
                    ],
                    _mm512_loadu_si512(coef as *const _),
                )
            } else {
                // Never read; zeroed memory, not an AVX-512 instruction, on this path.
                let z: __m512i = std::mem::zeroed();
                ([z; 4], [z; 4], z)
            };
            for r in 0..nr {
                let yi = (r0 + r) * kb + b;
                let q8 = y.qs.as_ptr().add(yi * QK_K);
                let bs = y.bsums.get_unchecked(yi * 16..(yi + 1) * 16);
                let (mut sumi, corr) = if WIDE {
                    let mut sum = _mm512_setzero_si512();
                    for i in 0..4 {
                        let yv = _mm512_loadu_si512(q8.add(i * 64) as *const _);
                        let p = _mm512_madd_epi16(_mm512_maddubs_epi16(u[i], yv), scv[i]);
                        sum = _mm512_add_epi32(sum, p);
                    }
                    let sumi = _mm256_add_epi32(
                        _mm512_castsi512_si256(sum),
                        _mm512_extracti64x4_epi64(sum, 1),
                    );
                    let bsv = _mm512_loadu_si512(bs.as_ptr() as *const _);
                    (sumi, _mm512_reduce_add_epi32(_mm512_mullo_epi32(coef, bsv)))
                } else {
                    let mut sumi = _mm256_setzero_si256();
                    for v in 0..8 {
                        let yv = _mm256_loadu_si256(q8.add(v * 32) as *const __m256i);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w.u[v], yv), w.sc[v]);
                        sumi = _mm256_add_epi32(sumi, p);
                    }
                    let c = if off != 0 { &sc } else { &min };
                    (sumi, (0..16).map(|g| c[g] * bs[g]).sum::<i32>())
                };
                let yd = *y.d.get_unchecked(yi);
                if off != 0 {
                    let corr = corr * off;
                    sumi = _mm256_sub_epi32(sumi, _mm256_setr_epi32(corr, 0, 0, 0, 0, 0, 0, 0));
                } else {
                    accm[r] -= dmin * yd * corr as f32;
                }
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * yd), _mm256_cvtepi32_ps(sumi), acc[r]);
            }
        }
        for r in 0..nr {
            res[r] = hsum(acc[r]) + accm[r];
        }
    }

    /// `acc += vpdpwssd(w, the i32 at p broadcast)`, in assembly: through the intrinsic, LLVM
    /// (tuning for Haswell) splits it into `vpmaddwd` + `vpaddd` plus a separate broadcast, three
    /// instructions where one with an embedded broadcast does.
    macro_rules! dpwssd_bcst {
        ($acc:expr, $w:expr, $p:expr) => {
            std::arch::asm!(
                "vpdpwssd {acc}, {w}, dword ptr [{p}]{{1to16}}",
                acc = inout(zmm_reg) $acc,
                w = in(zmm_reg) $w,
                p = in(reg) $p,
                options(pure, readonly, nostack, preserves_flags),
            )
        };
    }

    /// Prefill on AVX-512 VNNI: 16 K-quant weight rows (output columns) times all `m` activation
    /// rows, into `out` (`[16][m]`, the transposed buffer's rows).
    ///
    /// Each super-block of the 16 rows is unpacked once, its quants multiplied by their 16-value
    /// scale (`u · sc` fits an i16: at most 63 · 127), and laid out as i16 pairs of the 16 columns
    /// side by side, so that one `vpdpwssd` against a broadcast pair of activation quants adds 32
    /// products into the 16 column lanes. The integers are [`k_rows`]' own: its lane `j` holds, per
    /// 32-value vector `v`, `sc · Σ u·y` over values `4j..4j + 3` of `v`; here accumulator `j`
    /// gathers the same products (exact in i32, in any order), the offset term comes off lane 0,
    /// and the float steps (`d·y_d` times the lane, fused into that lane's accumulator; the lanes
    /// summed in `hsum`'s order; `dmin·y_d·Σ min·bsum` subtracted) are the same operations per
    /// column: the same bits as the per-row kernel.
    ///
    /// # Safety
    /// AVX-512 F/BW/VNNI, AVX2, FMA, F16C; `f` is a K-quant; `w` holds 16 rows of `rb` bytes
    /// (`a.k / 256` super-blocks each); `wide` is `a`'s Q8_K widened; `out` holds `16 · m`
    /// values for the `m` rows of `a`.
    #[inline(never)]
    #[allow(clippy::needless_range_loop)] // rows and lanes index several arrays each
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    pub unsafe fn group16_k(
        f: Format,
        w: &[u8],
        rb: usize,
        a: &Acts,
        wide: &super::Q8KWide,
        out: &mut [f32],
    ) {
        const RT: usize = 3;
        let y = a.q8k();
        let kb = a.k / QK_K;
        let m = out.len() / 16;
        let bb = f.block_bytes();
        debug_assert!(w.len() >= 16 * rb && m > 0 && y.d.len() == m * kb);
        // Per super-block: 128 runs of [16 columns] i16 pairs (vector v, pair q = 2j + p), then
        // 8 runs of the min / offset coefficients' pairs; and [16 columns] d, dmin.
        const RUNS: usize = 8 * 16 + 8;
        let mut wq = vec![0u32; kb * RUNS * 16];
        let mut dw = vec![0f32; kb * 16];
        let mut dm = vec![0f32; kb * 16];
        let mut off = 0;
        let mut pairs = [0u32; 16];
        // Super-block by super-block, so that the 16 columns' stores fill one super-block's runs
        // (8.7 KB) while they are in L1: column by column, every store missed it.
        for b in 0..kb {
            for c in 0..16 {
                let blk = &w[c * rb + b * bb..c * rb + (b + 1) * bb];
                let (sc, min, d, dmin, o) = super::super_head(f, blk);
                off = o;
                dw[b * 16 + c] = d;
                dm[b * 16 + c] = dmin;
                let u = unpack(f, blk.as_ptr(), &sc).u;
                let base = b * RUNS * 16;
                for (v, uv) in u.iter().enumerate() {
                    for h in 0..2 {
                        let half = if h == 0 {
                            _mm256_castsi256_si128(*uv)
                        } else {
                            _mm256_extracti128_si256(*uv, 1)
                        };
                        let scaled = _mm256_mullo_epi16(
                            _mm256_cvtepu8_epi16(half),
                            _mm256_set1_epi16(sc[2 * v + h] as i16),
                        );
                        _mm256_storeu_si256(pairs.as_mut_ptr().add(8 * h) as *mut __m256i, scaled);
                    }
                    for (q, &pq) in pairs.iter().enumerate() {
                        *wq.get_unchecked_mut(base + (v * 16 + q) * 16 + c) = pq;
                    }
                }
                let coef = if o != 0 { &sc } else { &min };
                for q in 0..8 {
                    let pq = (coef[2 * q] as u16 as u32) | ((coef[2 * q + 1] as u16 as u32) << 16);
                    *wq.get_unchecked_mut(base + (128 + q) * 16 + c) = pq;
                }
            }
        }
        let has_min = off == 0;
        let (yq, ybs) = (wide.qs.as_ptr(), wide.bsums.as_ptr());
        for r0 in (0..m).step_by(RT) {
            let nr = (m - r0).min(RT);
            // Rows past `m` repeat the last one; their results are not written.
            let row = |r: usize| (r0 + r).min(m - 1);
            let mut accf = [[_mm512_setzero_ps(); 8]; RT];
            let mut accm = [_mm512_setzero_ps(); RT];
            for b in 0..kb {
                let wb = wq.as_ptr().add(b * RUNS * 16);
                let dv = _mm512_loadu_ps(dw.as_ptr().add(b * 16));
                let mut dyd = [_mm512_setzero_ps(); RT];
                let mut corr = [_mm512_setzero_si512(); RT];
                for r in 0..RT {
                    let yi = row(r) * kb + b;
                    let yd = *y.d.get_unchecked(yi);
                    dyd[r] = _mm512_mul_ps(dv, _mm512_set1_ps(yd));
                    for q in 0..8 {
                        let cv = _mm512_loadu_si512(wb.add((128 + q) * 16) as *const _);
                        dpwssd_bcst!(corr[r], cv, ybs.add(yi * 8 + q));
                    }
                    if has_min {
                        // Not fused, as the per-row kernel does it.
                        let t = _mm512_mul_ps(
                            _mm512_loadu_ps(dm.as_ptr().add(b * 16)),
                            _mm512_set1_ps(yd),
                        );
                        let t = _mm512_mul_ps(t, _mm512_cvtepi32_ps(corr[r]));
                        accm[r] = _mm512_sub_ps(accm[r], t);
                    }
                }
                // Each row's widened quants of this super-block, as i32 pairs.
                let yp: [*const i32; RT] = std::array::from_fn(|r| yq.add((row(r) * kb + b) * 128));
                for j in 0..8 {
                    // Two accumulators per row (even and odd pairs): independent chains, so
                    // that `vpdpwssd`'s latency overlaps; their sum is the same i32.
                    let (mut a0, mut a1) =
                        ([_mm512_setzero_si512(); RT], [_mm512_setzero_si512(); RT]);
                    for v in 0..8 {
                        let q = v * 16 + 2 * j;
                        let w0 = _mm512_loadu_si512(wb.add(q * 16) as *const _);
                        let w1 = _mm512_loadu_si512(wb.add((q + 1) * 16) as *const _);
                        for r in 0..RT {
                            dpwssd_bcst!(a0[r], w0, yp[r].add(q));
                            dpwssd_bcst!(a1[r], w1, yp[r].add(q + 1));
                        }
                    }
                    let mut acc: [__m512i; RT] =
                        std::array::from_fn(|r| _mm512_add_epi32(a0[r], a1[r]));
                    for r in 0..RT {
                        if j == 0 && !has_min {
                            acc[r] = _mm512_sub_epi32(
                                acc[r],
                                _mm512_mullo_epi32(corr[r], _mm512_set1_epi32(off)),
                            );
                        }
                        accf[r][j] =
                            _mm512_fmadd_ps(dyd[r], _mm512_cvtepi32_ps(acc[r]), accf[r][j]);
                    }
                }
            }
            for r in 0..nr {
                // The per-row kernel adds its (zero or minimum) term always; so does this.
                store_columns(&accf[r], Some(accm[r]), out, m, r0 + r);
            }
        }
    }

    /// Any format of this module: weight row x activation rows `r0..r0 + nr`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `row` holds one row of `a.k` values of `f`; rows `r0..r0 + nr` exist
    /// in `a` (and in its Q8_K activations for a K-quant).
    pub unsafe fn dot_rows(
        f: Format,
        row: &[u8],
        a: &Acts,
        r0: usize,
        nr: usize,
        res: &mut [f32; MR],
    ) {
        if is_k_quant(f) {
            k_rows(f, row, a, r0, nr, res)
        } else {
            legacy_rows(f, row, a, r0, nr, res)
        }
    }

    /// Decode: two weight rows of `f` times `a`'s one row.
    ///
    /// # Safety
    /// As [`dot_rows`], with `a` holding one row.
    pub unsafe fn pair(f: Format, w0: &[u8], w1: &[u8], a: &Acts) -> [f32; 2] {
        if is_k_quant(f) {
            let (mut r0, mut r1) = ([0f32; MR], [0f32; MR]);
            k_rows(f, w0, a, 0, 1, &mut r0);
            k_rows(f, w1, a, 0, 1, &mut r1);
            [r0[0], r1[0]]
        } else {
            legacy_pair(f, w0, w1, a)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::qmatmul::{matmul_many, QActs, QMatrix};
    use std::sync::Arc;

    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    /// Random bytes with every f16 scale of the format set to a sane small value.
    /// `n` activation values in [-1, 1], in steps of 1/1000.
    fn random_values(n: usize, r: &mut impl FnMut() -> u64) -> Vec<f32> {
        (0..n).map(|_| (r() % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    fn random_matrix(f: Format, n: usize, k: usize, r: &mut impl FnMut() -> u64) -> Vec<u8> {
        let per = if is_k_quant(f) { QK_K } else { 32 };
        let bb = f.block_bytes();
        let scale_at: &[usize] = match f {
            Format::Q4_0 | Format::Q5_0 => &[0],
            Format::Q5_1 => &[0, 2],
            Format::Q2K => &[80, 82],
            Format::Q3K => &[108],
            Format::Q4K | Format::Q5K => &[0, 2],
            Format::Q6K => &[208],
            _ => unreachable!(),
        };
        let mut out = Vec::with_capacity(n * k / per * bb);
        for _ in 0..n * k / per {
            let mut blk: Vec<u8> = (0..bb).map(|_| r() as u8).collect();
            for &at in scale_at {
                let v = 0.001 + (r() % 1000) as f32 * 2e-5;
                blk[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
            }
            out.extend(blk);
        }
        out
    }

    const ALL: [Format; 8] = [
        Format::Q4_0,
        Format::Q5_0,
        Format::Q5_1,
        Format::Q2K,
        Format::Q3K,
        Format::Q4K,
        Format::Q5K,
        Format::Q6K,
    ];

    #[test]
    fn q8k_round_trips_within_half_a_step() {
        let mut r = rng(11);
        let x = random_values(512, &mut r);
        let q = Q8K::quantize(&x);
        for b in 0..2 {
            let d = q.d[b];
            assert!(d != 0.0);
            for i in 0..QK_K {
                let back = d * q.qs[b * QK_K + i] as f32;
                assert!((back - x[b * QK_K + i]).abs() <= d.abs() * 0.5 + 1e-6);
            }
            for g in 0..16 {
                let s: i32 = q.qs[b * QK_K + g * 16..][..16]
                    .iter()
                    .map(|&v| v as i32)
                    .sum();
                assert_eq!(s, q.bsums[b * 16 + g]);
            }
        }
    }

    /// Every format through the real dispatch (`matmul_many`, SIMD where the CPU has it) against
    /// this module's scalar reference and against the dequantized f32 product; odd row counts
    /// (a pair kernel's lone last row) and several activation rows (`MR` tails).
    #[test]
    fn kernels_match_the_scalar_reference_and_the_dequantized_product() {
        let mut r = rng(5);
        for f in ALL {
            let (n, k) = (11, 512);
            let bytes = random_matrix(f, n, k, &mut r);
            let len = bytes.len();
            let w = QMatrix::new(f, n, k, Arc::new(bytes.clone()), 0..len).unwrap();
            let rb = f.row_bytes(k);
            for m in [1, 2, 5] {
                let x = random_values(m * k, &mut r);
                let qa = QActs::quantize(&x, k);
                let a = qa.view();
                let mut y = vec![0f32; m * n];
                matmul_many(&[&w], &qa, &mut [&mut y]);
                let mut wrow = vec![0f32; k];
                for j in 0..n {
                    let row = &bytes[j * rb..(j + 1) * rb];
                    dequant_row(f, row, &mut wrow);
                    let mut wrow2 = vec![0f32; k];
                    w.row_f32(j, &mut wrow2);
                    assert_eq!(wrow, wrow2);
                    for i in 0..m {
                        let mut res = [0f32; MR];
                        dot_rows_scalar(f, row, &a, i, 1, &mut res);
                        let got = y[i * n + j];
                        let wabs: f32 = wrow.iter().map(|v| v.abs()).sum();
                        assert!(
                            (got - res[0]).abs() <= 1e-5 * wabs,
                            "{f:?} m={m} row {j}: {got} vs scalar {}",
                            res[0]
                        );
                        let exact: f32 = wrow
                            .iter()
                            .zip(&x[i * k..(i + 1) * k])
                            .map(|(a, b)| a * b)
                            .sum();
                        // Only activation quantization differs: at most half a step (1/127 of
                        // the block's largest |x| <= 1) per value.
                        assert!(
                            (got - exact).abs() <= wabs / 254.0 + 1e-3,
                            "{f:?} m={m} row {j}: {got} vs exact {exact}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn avx2_kernels_match_the_scalar_reference_on_every_row_count() {
        #[cfg(target_arch = "x86_64")]
        {
            if !(std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c"))
            {
                eprintln!("skipped: no AVX2/FMA/F16C on this CPU");
                return;
            }
            let mut r = rng(9);
            for f in ALL {
                let k = 768;
                let bytes = random_matrix(f, 2, k, &mut r);
                let rb = f.row_bytes(k);
                let x = random_values(MR * k, &mut r);
                let qa = QActs::quantize(&x, k);
                let a = qa.view();
                for nr in 1..=MR {
                    let (mut s, mut v) = ([0f32; MR], [0f32; MR]);
                    dot_rows_scalar(f, &bytes[..rb], &a, 0, nr, &mut s);
                    // SAFETY: features checked above; the row and `nr` activation rows exist.
                    unsafe { avx2::dot_rows(f, &bytes[..rb], &a, 0, nr, &mut v) };
                    for i in 0..nr {
                        assert!(
                            (s[i] - v[i]).abs() <= 1e-4 * (1.0 + s[i].abs()),
                            "{f:?} nr={nr}: {} vs {}",
                            v[i],
                            s[i]
                        );
                    }
                }
                if is_k_quant(f)
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                {
                    for (r0, nr) in (1..=MR).map(|n| (0, n)).chain([(3, 5), (MR - 1, 1)]) {
                        let (mut v, mut w) = ([0f32; MR], [0f32; MR]);
                        // SAFETY: features checked above; rows r0..r0 + nr exist.
                        unsafe {
                            avx2::dot_rows(f, &bytes[rb..], &a, r0, nr, &mut v);
                            avx2::k_rows_512(f, &bytes[rb..], &a, r0, nr, &mut w);
                        }
                        assert_eq!(v, w, "{f:?} r0={r0} nr={nr}: AVX-512 differs from AVX2");
                    }
                }
                let one = QActs::quantize(&x[..k], k);
                let a1 = one.view();
                // SAFETY: as above, one activation row.
                let p = unsafe { avx2::pair(f, &bytes[..rb], &bytes[rb..], &a1) };
                for (i, got) in p.into_iter().enumerate() {
                    let mut s = [0f32; MR];
                    dot_rows_scalar(f, &bytes[i * rb..(i + 1) * rb], &a1, 0, 1, &mut s);
                    assert!(
                        (got - s[0]).abs() <= 1e-4 * (1.0 + s[0].abs()),
                        "{f:?} pair"
                    );
                }
            }
        }
    }

    /// The 16-column prefill kernel gives the per-row kernel's bits for every K-quant, on row
    /// counts that leave a partial tile (1, 2, 4, 17 rows; tiles of 3) and one to three
    /// super-blocks per row.
    #[test]
    fn the_16_column_k_quant_kernel_gives_the_per_row_kernels_bits() {
        #[cfg(target_arch = "x86_64")]
        {
            if !crate::engine::qgemm::use_vnni() {
                eprintln!("skipped: no AVX-512 VNNI on this CPU (or INT8_KERNEL below vnni)");
                return;
            }
            let mut r = rng(17);
            for f in ALL.into_iter().filter(|&f| is_k_quant(f)) {
                for (m, k) in [(1, 256), (2, 512), (4, 768), (17, 512)] {
                    let bytes = random_matrix(f, 16, k, &mut r);
                    let rb = f.row_bytes(k);
                    let x = random_values(m * k, &mut r);
                    let qa = QActs::quantize(&x, k);
                    let a = qa.view();
                    let wide = a.q8k().widen();
                    let mut got = vec![0f32; 16 * m];
                    // SAFETY: AVX-512 F/BW/VNNI checked (use_vnni); 16 rows of `rb` bytes; `m`
                    // activation rows with their Q8_K rows.
                    unsafe { avx2::group16_k(f, &bytes, rb, &a, &wide, &mut got) };
                    for c in 0..16 {
                        let row = &bytes[c * rb..(c + 1) * rb];
                        for r0 in 0..m {
                            let mut want = [0f32; MR];
                            // SAFETY: as above; row `r0` exists.
                            unsafe { avx2::k_rows_512(f, row, &a, r0, 1, &mut want) };
                            assert_eq!(
                                got[c * m + r0].to_bits(),
                                want[0].to_bits(),
                                "{f:?} m={m} k={k} column {c} row {r0}: {} vs {}",
                                got[c * m + r0],
                                want[0]
                            );
                        }
                    }
                }
            }
        }
    }
}
