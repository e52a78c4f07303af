//! Block-quantized weight matrices (GGUF Q4_1 and Q8_0 here; Q4_0, Q5_0, Q5_1 and the K-quants
//! in [`super::kquants`]; all kept as stored) times f32 activations,
//! the way llama.cpp computes them: each activation row is quantized once to 8-bit blocks of 32
//! (scale `d = max|x| / 127` rounded to f16, plus `s = d * Σq` for Q4_1's offset term), and every
//! dot product runs on int8 (`maddubs` + `madd`: exact i32 sums) with one f32 FMA per block.
//!
//! Why not candle's QMatMul: candle-core 0.11.1 has no SIMD path for Q4_1 (a scalar loop, ~5x
//! slower), and for a 135M model its per-op dispatch costs as much as the arithmetic. Why not
//! repack to Q8_0 for [`super::qgemm`]: twice the weight memory and bytes read per token, and
//! decode is memory-bound. Using llama.cpp's activation quantization (Q8_1 for Q4_1 weights,
//! Q8_0 for Q8_0 weights) also keeps our logits close to the reference we are tested against.
//!
//! Weights are borrowed in place from the model file (like llama.cpp's mmap): no copy at load,
//! so the resident set is the file plus activations.
//!
//! Must not: allocate per output element, depend on the thread count for its results (every
//! output is summed in a fixed order), or use AVX2 on a CPU without it (checked at run time; the
//! scalar kernels are the reference the tests compare against).

use std::ops::Range;
use std::sync::Arc;

use rayon::prelude::*;

use super::kquants;

/// Values per block (both formats).
pub const QK: usize = 32;

/// The model file's bytes, shared by every weight that lives in it.
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Storage formats with a kernel here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `{f16 d, f16 m, 16 bytes of nibbles}` per 32 values: `x = d * q + m`, q in 0..16; low
    /// nibbles are values 0..16 of the block, high nibbles 16..32.
    Q4_1,
    /// `{f16 d, 32 x i8}` per 32 values: `x = d * q`.
    Q8_0,
    // The formats of [`super::kquants`] (layouts there): legacy blocks of 32 values, then
    // K-quant super-blocks of 256.
    Q4_0,
    Q5_0,
    Q5_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl Format {
    pub fn block_bytes(self) -> usize {
        match self {
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
            Format::Q4_0 => 18,
            Format::Q5_0 => 22,
            Format::Q5_1 => 24,
            Format::Q2K => 84,
            Format::Q3K => 110,
            Format::Q4K => 144,
            Format::Q5K => 176,
            Format::Q6K => 210,
        }
    }

    /// Values per block: 32, or 256 for the K-quants.
    pub fn block_values(self) -> usize {
        if kquants::is_k_quant(self) {
            kquants::QK_K
        } else {
            QK
        }
    }

    /// Bytes of one row of `k` values.
    pub fn row_bytes(self, k: usize) -> usize {
        k / self.block_values() * self.block_bytes()
    }

    /// llama.cpp's name for the type (`q4_K`, `q5_0`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Format::Q4_1 => "q4_1",
            Format::Q8_0 => "q8_0",
            Format::Q4_0 => "q4_0",
            Format::Q5_0 => "q5_0",
            Format::Q5_1 => "q5_1",
            Format::Q2K => "q2_K",
            Format::Q3K => "q3_K",
            Format::Q4K => "q4_K",
            Format::Q5K => "q5_K",
            Format::Q6K => "q6_K",
        }
    }
}

/// A `[n, k]` row-major block-quantized matrix, rows contiguous, borrowed from `bytes`.
pub struct QMatrix {
    pub format: Format,
    pub n: usize,
    pub k: usize,
    bytes: SharedBytes,
    range: Range<usize>,
}

impl QMatrix {
    /// `range` of `bytes` holds `n * k / 32` blocks of `format`.
    pub fn new(
        format: Format,
        n: usize,
        k: usize,
        bytes: SharedBytes,
        range: Range<usize>,
    ) -> Result<Self, String> {
        let bv = format.block_values();
        if !k.is_multiple_of(bv) {
            return Err(format!(
                "row length {k} is not a multiple of {bv} ({} blocks)",
                format.name()
            ));
        }
        let need = n * format.row_bytes(k);
        if range.len() != need || range.end > (*bytes).as_ref().len() {
            return Err(format!(
                "[{n}, {k}] {format:?} needs {need} bytes, has {} (file of {})",
                range.len(),
                (*bytes).as_ref().len()
            ));
        }
        Ok(Self {
            format,
            n,
            k,
            bytes,
            range,
        })
    }

    fn data(&self) -> &[u8] {
        &(*self.bytes).as_ref()[self.range.clone()]
    }

    fn row_bytes(&self) -> usize {
        self.format.row_bytes(self.k)
    }

    /// Dequantizes row `j` into `out` (`k` values): the embedding lookup.
    pub fn row_f32(&self, j: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        let row = &self.data()[j * rb..(j + 1) * rb];
        if !matches!(self.format, Format::Q4_1 | Format::Q8_0) {
            return kquants::dequant_row(self.format, row, out);
        }
        let bb = self.format.block_bytes();
        for (blk, o) in row.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
            let d = f16(blk, 0);
            match self.format {
                Format::Q4_1 => {
                    let m = f16(blk, 2);
                    for i in 0..16 {
                        o[i] = d * (blk[4 + i] & 0x0F) as f32 + m;
                        o[i + 16] = d * (blk[4 + i] >> 4) as f32 + m;
                    }
                }
                Format::Q8_0 => {
                    for (o, &q) in o.iter_mut().zip(&blk[2..]) {
                        *o = d * q as i8 as f32;
                    }
                }
                _ => unreachable!("handled by kquants"),
            }
        }
    }
}

#[inline(always)]
fn f16(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Activation rows quantized to 8-bit blocks of 32: llama.cpp's Q8_1 (which, without `s`, is its
/// Q8_0), scales rounded through f16 exactly as llama.cpp stores them.
pub struct QActs {
    pub m: usize,
    pub k: usize,
    qs: Vec<i8>,
    /// `[m, k / 32]` block scales `d`.
    d: Vec<f32>,
    /// `[m, k / 32]` `d * Σq` per block (Q4_1's offset term).
    s: Vec<f32>,
    /// The same rows as llama.cpp's Q8_K (for K-quant weights), when `k` is a multiple of 256.
    k8: Option<kquants::Q8K>,
}

impl QActs {
    /// Quantizes `x` (`m` rows of `k`).
    pub fn quantize(x: &[f32], k: usize) -> Self {
        let m = x.len() / k;
        let nb = m * k / QK;
        let mut a = QActs {
            m,
            k,
            qs: vec![0; m * k],
            d: vec![0.0; nb],
            s: vec![0.0; nb],
            k8: k
                .is_multiple_of(kquants::QK_K)
                .then(|| kquants::Q8K::quantize(x)),
        };
        for (((xb, qb), d), s) in x
            .chunks_exact(QK)
            .zip(a.qs.chunks_exact_mut(QK))
            .zip(a.d.iter_mut())
            .zip(a.s.iter_mut())
        {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let dd = amax / 127.0;
            let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in qb.iter_mut().zip(xb) {
                // llama.cpp's AVX2 path rounds half to even (_mm256_round_ps, nearest).
                let r = (v * id).round_ties_even() as i8;
                *q = r;
                sum += r as i32;
            }
            *d = half::f16::from_f32(dd).to_f32();
            *s = half::f16::from_f32(dd * sum as f32).to_f32();
        }
        a
    }

    /// The borrowed view [`super::kquants`]' kernels take.
    pub(super) fn view(&self) -> kquants::Acts<'_> {
        kquants::Acts {
            k: self.k,
            qs: &self.qs,
            d: &self.d,
            s: &self.s,
            k8: self.k8.as_ref(),
        }
    }
}

/// Input rows per kernel call: each weight block decoded is reused across this many rows.
const MR: usize = 4;

/// `outs[i] = acts · mats[i]^T` (`[m, n_i]` row-major each), all matrices in one parallel
/// dispatch (q|k|v or gate|up share one quantized input; for a 135M model, fewer dispatches is
/// most of the win in decode).
pub fn matmul_many(mats: &[&QMatrix], acts: &QActs, outs: &mut [&mut [f32]]) {
    let m = acts.m;
    let simd = use_avx2();
    let threads = rayon::current_num_threads().max(1);
    let total_rows: usize = mats.iter().map(|w| w.n).sum();
    // ~8 tasks per thread: enough to balance, few enough that dispatch stays cheap.
    let rows_per_task = (total_rows / (threads * 8)).clamp(8, 512);
    // Each task owns a contiguous run of weight rows and writes a disjoint slice: of the output
    // itself for decode (m = 1), else of a transposed `[n, m]` buffer copied back afterwards.
    let mut tbufs: Vec<Vec<f32>> = if m == 1 {
        Vec::new()
    } else {
        mats.iter().map(|w| vec![0f32; w.n * m]).collect()
    };
    let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::new();
    if m == 1 {
        for (i, out) in outs.iter_mut().enumerate() {
            for (c, chunk) in out.chunks_mut(rows_per_task).enumerate() {
                tasks.push((i, c * rows_per_task, chunk));
            }
        }
    } else {
        for (i, buf) in tbufs.iter_mut().enumerate() {
            for (c, chunk) in buf.chunks_mut(rows_per_task * m).enumerate() {
                tasks.push((i, c * rows_per_task, chunk));
            }
        }
    }
    tasks.into_par_iter().for_each(|(i, j0, out)| {
        let w = mats[i];
        let rows = out.len() / m;
        let rb = w.row_bytes();
        let data = w.data();
        let row_at = |j: usize| &data[(j0 + j) * rb..(j0 + j + 1) * rb];
        #[cfg(target_arch = "x86_64")]
        if m == 1 && simd {
            // Decode: weight rows in pairs (see avx2::q4_1_pair); an odd last row goes alone.
            let mut jj = 0;
            while jj + 1 < rows {
                // SAFETY: `simd` means AVX2/FMA/F16C were detected; rows hold `k` values and
                // `acts` has one row of `k`.
                let r = unsafe {
                    match w.format {
                        Format::Q4_1 => avx2::q4_1_pair(row_at(jj), row_at(jj + 1), acts),
                        Format::Q8_0 => avx2::q8_0_pair(row_at(jj), row_at(jj + 1), acts),
                        f => kquants::avx2::pair(f, row_at(jj), row_at(jj + 1), &acts.view()),
                    }
                };
                out[jj] = r[0];
                out[jj + 1] = r[1];
                jj += 2;
            }
            if jj < rows {
                let mut res = [0f32; MR];
                dot_rows(w.format, simd, row_at(jj), acts, 0, 1, &mut res);
                out[jj] = res[0];
            }
            return;
        }
        for jj in 0..rows {
            let row = row_at(jj);
            let o = &mut out[jj * m..(jj + 1) * m];
            let mut r = 0;
            while r < m {
                let nr = (m - r).min(MR);
                let mut res = [0f32; MR];
                dot_rows(w.format, simd, row, acts, r, nr, &mut res);
                for (o, v) in o[r..r + nr].iter_mut().zip(res) {
                    *o = v;
                }
                r += nr;
            }
        }
    });
    if m > 1 {
        for ((w, t), out) in mats.iter().zip(&tbufs).zip(outs.iter_mut()) {
            for j in 0..w.n {
                for r in 0..m {
                    out[r * w.n + j] = t[j * m + r];
                }
            }
        }
    }
}

/// One weight row times activation rows `r0..r0 + nr` into `res[..nr]`.
fn dot_rows(
    format: Format,
    simd: bool,
    row: &[u8],
    a: &QActs,
    r0: usize,
    nr: usize,
    res: &mut [f32; MR],
) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when `use_avx2` saw AVX2, FMA and F16C; `row` holds one
        // weight row of `a.k` values and rows `r0..r0 + nr` of `a` exist (callers loop below m).
        unsafe {
            match format {
                Format::Q4_1 => avx2::q4_1_rows(row, a, r0, nr, res),
                Format::Q8_0 => avx2::q8_0_rows(row, a, r0, nr, res),
                f => kquants::avx2::dot_rows(f, row, &a.view(), r0, nr, res),
            }
        }
        return;
    }
    let _ = simd;
    dot_rows_scalar(format, row, a, r0, nr, res);
}

/// Portable reference kernel.
fn dot_rows_scalar(
    format: Format,
    row: &[u8],
    a: &QActs,
    r0: usize,
    nr: usize,
    res: &mut [f32; MR],
) {
    if !matches!(format, Format::Q4_1 | Format::Q8_0) {
        return kquants::dot_rows_scalar(format, row, &a.view(), r0, nr, res);
    }
    let kb = a.k / QK;
    let bb = format.block_bytes();
    for (r, out) in res.iter_mut().enumerate().take(nr) {
        let xr = r0 + r;
        let mut acc = 0f32;
        for (b, blk) in row.chunks_exact(bb).enumerate() {
            let xq = &a.qs[(xr * kb + b) * QK..(xr * kb + b + 1) * QK];
            let (dx, sx) = (a.d[xr * kb + b], a.s[xr * kb + b]);
            let dw = f16(blk, 0);
            match format {
                Format::Q4_1 => {
                    let mw = f16(blk, 2);
                    let mut dot = 0i32;
                    for i in 0..16 {
                        dot += (blk[4 + i] & 0x0F) as i32 * xq[i] as i32;
                        dot += (blk[4 + i] >> 4) as i32 * xq[i + 16] as i32;
                    }
                    acc += dw * dx * dot as f32 + mw * sx;
                }
                Format::Q8_0 => {
                    let dot: i32 = blk[2..]
                        .iter()
                        .zip(xq)
                        .map(|(&w, &x)| w as i8 as i32 * x as i32)
                        .sum();
                    acc += dw * dx * dot as f32;
                }
                _ => unreachable!("handled by kquants"),
            }
        }
        *out = acc;
    }
}

/// Whether the AVX2 kernels may run on this CPU.
fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{QActs, MR, QK};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn f16_at(p: *const u8) -> f32 {
        let bits = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Q4_1 weight row x Q8_1 activation rows (llama.cpp's `ggml_vec_dot_q4_1_q8_1`, with the
    /// unpacked nibbles reused across up to 4 rows).
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `row` is `a.k / 32` Q4_1 blocks; rows `r0..r0 + nr` exist in `a`.
    // Not inlined: a call per weight row is noise next to its 18+ blocks, and profiles then show
    // the kernels by name.
    #[inline(never)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_1_rows(row: &[u8], a: &QActs, r0: usize, nr: usize, res: &mut [f32; MR]) {
        let kb = a.k / QK;
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); MR];
        let mut summ = [0f32; MR];
        let wp = row.as_ptr();
        let xq = a.qs.as_ptr();
        for b in 0..kb {
            let blk = wp.add(b * 20);
            let dw = f16_at(blk);
            let mw = f16_at(blk.add(2));
            let tmp = _mm_loadu_si128(blk.add(4) as *const __m128i);
            let bx = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp), mask);
            for r in 0..nr {
                let xi = (r0 + r) * kb + b;
                let y = _mm256_loadu_si256(xq.add(xi * QK) as *const __m256i);
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(bx, y), ones);
                let d = _mm256_set1_ps(dw * *a.d.get_unchecked(xi));
                acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[r]);
                summ[r] += mw * *a.s.get_unchecked(xi);
            }
        }
        for r in 0..nr {
            res[r] = hsum(acc[r]) + summ[r];
        }
    }

    /// Decode (one activation row): two Q4_1 weight rows at once, so that the two FMA chains
    /// overlap (one chain alone waits ~4 cycles per block on its accumulator). Each row keeps
    /// llama.cpp's summation order, block by block.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `w0`, `w1` are `a.k / 32` Q4_1 blocks; `a` has one row.
    #[inline(never)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_1_pair(w0: &[u8], w1: &[u8], a: &QActs) -> [f32; 2] {
        let kb = a.k / QK;
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let (p0, p1) = (w0.as_ptr(), w1.as_ptr());
        let xq = a.qs.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut summ = [0f32; 2];
        for b in 0..kb {
            let y = _mm256_loadu_si256(xq.add(b * QK) as *const __m256i);
            let (dx, sx) = (*a.d.get_unchecked(b), *a.s.get_unchecked(b));
            for (i, p) in [p0, p1].into_iter().enumerate() {
                let blk = p.add(b * 20);
                let tmp = _mm_loadu_si128(blk.add(4) as *const __m128i);
                let bx = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp), mask);
                let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(bx, y), ones);
                let d = _mm256_set1_ps(f16_at(blk) * dx);
                acc[i] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(prod), acc[i]);
                summ[i] += f16_at(blk.add(2)) * sx;
            }
        }
        [hsum(acc[0]) + summ[0], hsum(acc[1]) + summ[1]]
    }

    /// Decode: two Q8_0 weight rows at once (see [`q4_1_pair`]).
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `w0`, `w1` are `a.k / 32` Q8_0 blocks; `a` has one row.
    #[inline(never)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8_0_pair(w0: &[u8], w1: &[u8], a: &QActs) -> [f32; 2] {
        let kb = a.k / QK;
        let ones = _mm256_set1_epi16(1);
        let (p0, p1) = (w0.as_ptr(), w1.as_ptr());
        let xq = a.qs.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 2];
        for b in 0..kb {
            let y = _mm256_loadu_si256(xq.add(b * QK) as *const __m256i);
            let dx = *a.d.get_unchecked(b);
            for (i, p) in [p0, p1].into_iter().enumerate() {
                let blk = p.add(b * 34);
                let w = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                let prod = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w)),
                    ones,
                );
                let d = _mm256_set1_ps(f16_at(blk) * dx);
                acc[i] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(prod), acc[i]);
            }
        }
        [hsum(acc[0]), hsum(acc[1])]
    }

    /// Q8_0 weight row x Q8_0 activation rows (`ggml_vec_dot_q8_0_q8_0`).
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `row` is `a.k / 32` Q8_0 blocks; rows `r0..r0 + nr` exist in `a`.
    #[inline(never)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8_0_rows(row: &[u8], a: &QActs, r0: usize, nr: usize, res: &mut [f32; MR]) {
        let kb = a.k / QK;
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); MR];
        let wp = row.as_ptr();
        let xq = a.qs.as_ptr();
        for b in 0..kb {
            let blk = wp.add(b * 34);
            let dw = f16_at(blk);
            let w = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            let aw = _mm256_sign_epi8(w, w);
            for (r, acc) in acc.iter_mut().enumerate().take(nr) {
                let xi = (r0 + r) * kb + b;
                let y = _mm256_loadu_si256(xq.add(xi * QK) as *const __m256i);
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(y, w)), ones);
                let d = _mm256_set1_ps(dw * *a.d.get_unchecked(xi));
                *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), *acc);
            }
        }
        for r in 0..nr {
            res[r] = hsum(acc[r]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 20001) as f32 / 10000.0 - 1.0
        }
    }

    /// Random blocks of `format` with sane f16 scales.
    fn random_matrix(format: Format, n: usize, k: usize, r: &mut impl FnMut() -> f32) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..n * k / QK {
            out.extend(half::f16::from_f32(0.01 + r().abs() * 0.05).to_le_bytes());
            match format {
                Format::Q4_1 => {
                    out.extend(half::f16::from_f32(r() * 0.3).to_le_bytes());
                    out.extend((0..16).map(|_| ((r() + 1.0) * 127.0) as u8));
                }
                Format::Q8_0 => out.extend((0..32).map(|_| (r() * 127.0) as i8 as u8)),
                _ => unreachable!("kquants has its own tests"),
            }
        }
        out
    }

    #[test]
    fn simd_kernels_match_the_scalar_reference_and_the_dequantized_product() {
        let mut r = rng(7);
        for format in [Format::Q4_1, Format::Q8_0] {
            let (n, k) = (37, 96);
            let bytes = random_matrix(format, n, k, &mut r);
            let len = bytes.len();
            let w = QMatrix::new(format, n, k, Arc::new(bytes), 0..len).unwrap();
            for m in [1, 3, 6] {
                let x: Vec<f32> = (0..m * k).map(|_| r()).collect();
                let a = QActs::quantize(&x, k);
                let mut y = vec![0f32; m * n];
                matmul_many(&[&w], &a, &mut [&mut y]);
                let mut wrow = vec![0f32; k];
                for j in 0..n {
                    w.row_f32(j, &mut wrow);
                    for i in 0..m {
                        let mut res = [0f32; MR];
                        dot_rows_scalar(
                            format,
                            &w.data()[j * w.row_bytes()..][..w.row_bytes()],
                            &a,
                            i,
                            1,
                            &mut res,
                        );
                        let got = y[i * n + j];
                        assert!(
                            (got - res[0]).abs() <= 1e-4 * (1.0 + res[0].abs()),
                            "{format:?} {got} vs {}",
                            res[0]
                        );
                        // Against the exact f32 product: only activation quantization differs.
                        let exact: f32 = wrow
                            .iter()
                            .zip(&x[i * k..(i + 1) * k])
                            .map(|(a, b)| a * b)
                            .sum();
                        let scale: f32 = wrow.iter().map(|v| v.abs()).sum::<f32>() / 127.0;
                        assert!(
                            (got - exact).abs() <= scale + 1e-3,
                            "{format:?} m={m} {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn several_matrices_share_one_dispatch() {
        let mut r = rng(3);
        let k = 64;
        let b1 = random_matrix(Format::Q4_1, 300, k, &mut r);
        let b2 = random_matrix(Format::Q8_0, 5, k, &mut r);
        let (l1, l2) = (b1.len(), b2.len());
        let w1 = QMatrix::new(Format::Q4_1, 300, k, Arc::new(b1), 0..l1).unwrap();
        let w2 = QMatrix::new(Format::Q8_0, 5, k, Arc::new(b2), 0..l2).unwrap();
        let x: Vec<f32> = (0..2 * k).map(|_| r()).collect();
        let a = QActs::quantize(&x, k);
        let (mut y1, mut y2) = (vec![0f32; 600], vec![0f32; 10]);
        matmul_many(&[&w1, &w2], &a, &mut [&mut y1, &mut y2]);
        let (mut z1, mut z2) = (vec![0f32; 600], vec![0f32; 10]);
        matmul_many(&[&w1], &a, &mut [&mut z1]);
        matmul_many(&[&w2], &a, &mut [&mut z2]);
        assert_eq!((y1, y2), (z1, z2));
    }
}
