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
//! The x86 kernels are written once and compiled for AVX2 and for AVX-512 VNNI (chosen at run
//! time; INT8_KERNEL=avx2 keeps AVX2): both sum the same exact integers in the same float order,
//! so they give the same bits. On AVX-512, decode runs two weight rows per 512-bit vector; every
//! decode kernel prefetches the weights well ahead of the block it reads, since a decode step
//! streams them all from beyond the caches once.
//!
//! Must not: allocate per output element, depend on the thread count or the instruction set for
//! its results (every output is summed in a fixed order), or use an instruction set the CPU lacks
//! (checked at run time; the scalar kernels are the reference the tests compare against).

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

    /// The rows cut into consecutive matrices of `rows[i]` rows each, sharing these bytes (no
    /// copy): a fused projection (Phi-3's `attn_qkv`, `ffn_up`) used as its parts. Each output is
    /// a row's dot product, so the parts compute exactly what the fused matrix would.
    pub fn split_rows(&self, rows: &[usize]) -> Result<Vec<QMatrix>, String> {
        if rows.iter().sum::<usize>() != self.n {
            return Err(format!("cannot cut {} rows into {rows:?}", self.n));
        }
        let rb = self.row_bytes();
        let mut start = self.range.start;
        rows.iter()
            .map(|&n| {
                let m = QMatrix::new(
                    self.format,
                    n,
                    self.k,
                    self.bytes.clone(),
                    start..start + n * rb,
                );
                start += n * rb;
                m
            })
            .collect()
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
    /// `[m, k / 4]` sums of 4 consecutive quants: the offset correction of the 16-column prefill
    /// kernel for formats stored with an offset. Computed on its first use (never in decode).
    runs: std::sync::OnceLock<Vec<i32>>,
    /// The Q8_K rows widened for the 16-column K-quant prefill kernel, on its first use.
    wide: std::sync::OnceLock<kquants::Q8KWide>,
}

impl QActs {
    /// Quantizes `x` (`m` rows of `k`), with the Q8_K rows whenever `k` allows them.
    pub fn quantize(x: &[f32], k: usize) -> Self {
        Self::build(x, k, true)
    }

    /// Quantizes `x` for `mats` only: the Q8_K rows just when one of them is a K-quant (for a
    /// Q4_1 model they were a sixth of the quantization's time in decode, for nothing).
    pub fn quantize_for(x: &[f32], k: usize, mats: &[&QMatrix]) -> Self {
        Self::build(x, k, mats.iter().any(|w| kquants::is_k_quant(w.format)))
    }

    fn build(x: &[f32], k: usize, with_k8: bool) -> Self {
        let m = x.len() / k;
        let nb = m * k / QK;
        let mut a = QActs {
            m,
            k,
            qs: vec![0; m * k],
            d: vec![0.0; nb],
            s: vec![0.0; nb],
            k8: (with_k8 && k.is_multiple_of(kquants::QK_K)).then(|| kquants::Q8K::quantize(x)),
            runs: std::sync::OnceLock::new(),
            wide: std::sync::OnceLock::new(),
        };
        #[cfg(target_arch = "x86_64")]
        let simd = use_avx2();
        for (((xb, qb), d), s) in x
            .chunks_exact(QK)
            .zip(a.qs.chunks_exact_mut(QK))
            .zip(a.d.iter_mut())
            .zip(a.s.iter_mut())
        {
            #[cfg(target_arch = "x86_64")]
            let (amax, sum) = if simd {
                // SAFETY: AVX2 is present (use_avx2); both blocks hold QK values.
                unsafe { super::qgemm::quantize_block_q8_1_avx2(xb, qb) }
            } else {
                quantize_block_scalar(xb, qb)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let (amax, sum) = quantize_block_scalar(xb, qb);
            let dd = amax / 127.0;
            *d = half::f16::from_f32(dd).to_f32();
            *s = half::f16::from_f32(dd * sum as f32).to_f32();
        }
        a
    }

    /// Sums of each 4 consecutive quants (`[m, k / 4]`).
    fn run_sums(&self) -> &[i32] {
        self.runs.get_or_init(|| {
            self.qs
                .chunks_exact(4)
                .map(|q| q.iter().map(|&v| v as i32).sum())
                .collect()
        })
    }

    /// The Q8_K rows widened ([`kquants::Q8KWide`]).
    fn k_wide(&self) -> &kquants::Q8KWide {
        self.wide.get_or_init(|| {
            self.k8
                .as_ref()
                .expect("invariant: Q8_K activations exist whenever a K-quant matrix is multiplied")
                .widen()
        })
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

/// One block of 32 as llama.cpp's `quantize_row_q8_1` does it: `x * (127 / max|x|)` rounded
/// half to even (its AVX2 path's `_mm256_round_ps`). Returns `(max|x|, Σq)`; the reference for
/// the AVX2 version in `qgemm`.
fn quantize_block_scalar(xb: &[f32], qb: &mut [i8]) -> (f32, i32) {
    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
    let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qb.iter_mut().zip(xb) {
        let r = (v * id).round_ties_even() as i8;
        *q = r;
        sum += r as i32;
    }
    (amax, sum)
}

/// Input rows per kernel call: each weight block decoded is reused across this many rows.
const MR: usize = 16;

/// The instruction sets the kernels here can use, decided once per call from the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Simd {
    Scalar,
    /// AVX2 + FMA + F16C: `maddubs` + `madd` for the int8 products.
    Avx2,
    /// AVX-512 VNNI (on 256-bit vectors): `vpdpbusd` does those two in one instruction. Both
    /// give the same exact i32 sums, so the results are bit-identical to AVX2's.
    Vnni,
}

fn simd() -> Simd {
    if !use_avx2() {
        Simd::Scalar
    } else if super::qgemm::use_vnni() {
        Simd::Vnni
    } else {
        Simd::Avx2
    }
}

/// Weight rows (output columns) per call of the 16-column prefill kernel: one zmm of i32 lanes.
const GROUP: usize = 16;
/// Activation rows from which prefill uses it: below, unpacking a group's nibbles costs more than
/// the per-row kernel loses.
const MIN_GROUP_ROWS: usize = 8;

/// Weight rows per decode kernel call: two independent FMA chains overlap (one alone waits on
/// its accumulator every block), or the two halves of one 512-bit vector.
const DECODE_ROWS: usize = 2;

/// `outs[i] = acts · mats[i]^T` (`[m, n_i]` row-major each), all matrices in one parallel
/// dispatch (q|k|v or gate|up share one quantized input; for a 135M model, fewer dispatches is
/// most of the win in decode).
pub fn matmul_many(mats: &[&QMatrix], acts: &QActs, outs: &mut [&mut [f32]]) {
    matmul_with(simd(), mats, acts, outs)
}

fn matmul_with(simd: Simd, mats: &[&QMatrix], acts: &QActs, outs: &mut [&mut [f32]]) {
    let m = acts.m;
    let threads = rayon::current_num_threads().max(1);
    let total_rows: usize = mats.iter().map(|w| w.n).sum();
    // ~8 tasks per thread: enough to balance, few enough that dispatch stays cheap.
    let mut rows_per_task = (total_rows / (threads * 8)).clamp(8, 512);
    if m > 1 {
        // Whole groups of 16 weight rows for the 16-column prefill kernel.
        rows_per_task = rows_per_task.next_multiple_of(GROUP);
    }
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
    if m == 1
        && simd == Simd::Vnni
        && mats
            .iter()
            .any(|w| matches!(w.format, Format::Q8_0 | Format::Q4_0 | Format::Q5_0))
    {
        // Once, before the tasks share it (the 512-bit decode kernel's offset term).
        acts.run_sums();
    }
    if m >= MIN_GROUP_ROWS
        && simd == Simd::Vnni
        && mats.iter().any(|w| kquants::is_k_quant(w.format))
    {
        // Likewise for the 16-column K-quant kernel's widened activations.
        acts.k_wide();
    }
    tasks.into_par_iter().for_each(|(i, j0, out)| {
        let w = mats[i];
        let rows = out.len() / m;
        let rb = w.row_bytes();
        let data = &w.data()[j0 * rb..(j0 + rows) * rb];
        if m == 1 && simd != Simd::Scalar {
            let whole = rows / DECODE_ROWS * DECODE_ROWS;
            // SAFETY: `simd` came from `simd()`, which saw the features each kernel enables;
            // `data` holds `whole` (then `rows - whole`) rows of `k` values; `acts` has one row.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                match (simd, w.format) {
                    (Simd::Vnni, f) if x86::groups16(f) => {
                        x86::decode_pairs_512(f, data, rb, acts, &mut out[..whole])
                    }
                    (Simd::Vnni, f) if kquants::is_k_quant(f) => {
                        let v = acts.view();
                        for (j, o) in out[..whole].iter_mut().enumerate() {
                            let mut r = [0f32; kquants::MR];
                            let row = &data[j * rb..(j + 1) * rb];
                            kquants::avx2::k_rows_512(f, row, &v, 0, 1, &mut r);
                            *o = r[0];
                        }
                    }
                    (_, Format::Q4_1) => {
                        x86::q4_1_decode_avx2::<DECODE_ROWS>(data, rb, acts, &mut out[..whole])
                    }
                    (_, Format::Q8_0) => {
                        x86::q8_0_decode_avx2::<DECODE_ROWS>(data, rb, acts, &mut out[..whole])
                    }
                    (_, f) => {
                        let v = acts.view();
                        for (g, o) in out[..whole].chunks_exact_mut(2).enumerate() {
                            let row = |j: usize| &data[j * rb..(j + 1) * rb];
                            let r = kquants::avx2::pair(f, row(2 * g), row(2 * g + 1), &v);
                            o.copy_from_slice(&r);
                        }
                    }
                }
            }
            for jj in whole..rows {
                let mut res = [0f32; MR];
                dot_rows(
                    w.format,
                    simd,
                    &data[jj * rb..(jj + 1) * rb],
                    acts,
                    0,
                    1,
                    &mut res,
                );
                out[jj] = res[0];
            }
            return;
        }
        // Prefill on AVX-512 VNNI: rows 16 at a time through the 16-column kernels.
        let mut first = 0;
        #[cfg(target_arch = "x86_64")]
        if simd == Simd::Vnni && m >= MIN_GROUP_ROWS {
            let k_quant = kquants::is_k_quant(w.format);
            if x86::groups16(w.format) || k_quant {
                first = rows / GROUP * GROUP;
            }
            for (g, o) in out[..first * m].chunks_exact_mut(GROUP * m).enumerate() {
                let group = &data[g * GROUP * rb..];
                // SAFETY: `simd` came from `simd()`, which saw AVX-512 F/BW/VNNI; `data` holds
                // `rows` whole rows of `rb` bytes, so group `g`'s 16 rows exist; `o` is their
                // `[16, m]` slice of the transposed buffer; a K-quant's activations have Q8_K
                // rows, widened above.
                unsafe {
                    if k_quant {
                        let v = acts.view();
                        kquants::avx2::group16_k(w.format, group, rb, &v, acts.k_wide(), o)
                    } else {
                        x86::group16_vnni(w.format, group, rb, acts, o)
                    }
                };
            }
        }
        for jj in first..rows {
            let row = &data[jj * rb..(jj + 1) * rb];
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
    simd: Simd,
    row: &[u8],
    a: &QActs,
    r0: usize,
    nr: usize,
    res: &mut [f32; MR],
) {
    // SAFETY: `simd` came from `simd()`, which saw the features each kernel enables; `row`
    // holds one weight row of `a.k` values and rows `r0..r0 + nr` of `a` exist (callers loop
    // below m).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match (simd, format) {
            (Simd::Scalar, _) => {}
            (Simd::Vnni, Format::Q4_1) => return x86::q4_1_rows_vnni(row, a, r0, nr, res),
            (Simd::Vnni, Format::Q8_0) => return x86::q8_0_rows_vnni(row, a, r0, nr, res),
            (Simd::Avx2, Format::Q4_1) => return x86::q4_1_rows_avx2(row, a, r0, nr, res),
            (Simd::Avx2, Format::Q8_0) => return x86::q8_0_rows_avx2(row, a, r0, nr, res),
            (Simd::Vnni, f) if kquants::is_k_quant(f) => {
                return in_kquant_chunks(nr, res, |r, n, part| {
                    kquants::avx2::k_rows_512(f, row, &a.view(), r0 + r, n, part)
                })
            }
            (_, f) => {
                return in_kquant_chunks(nr, res, |r, n, part| {
                    kquants::avx2::dot_rows(f, row, &a.view(), r0 + r, n, part)
                })
            }
        }
    }
    let _ = simd;
    dot_rows_scalar(format, row, a, r0, nr, res);
}

/// Runs a [`kquants`] kernel (which takes at most [`kquants::MR`] rows per call) over rows
/// `0..nr`: `f(first, count, results)`.
fn in_kquant_chunks(
    nr: usize,
    res: &mut [f32; MR],
    mut f: impl FnMut(usize, usize, &mut [f32; kquants::MR]),
) {
    let mut r = 0;
    while r < nr {
        let n = (nr - r).min(kquants::MR);
        let mut part = [0f32; kquants::MR];
        f(r, n, &mut part);
        res[r..r + n].copy_from_slice(&part[..n]);
        r += n;
    }
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
        return in_kquant_chunks(nr, res, |r, n, part| {
            kquants::dot_rows_scalar(format, row, &a.view(), r0 + r, n, part)
        });
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

/// The x86 kernels. Each is written once, generic over how four adjacent u8 x i8 products are
/// summed into an i32 lane ([`Us8`]), and compiled twice: for AVX2 and for AVX-512 VNNI.
#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::{Format, QActs, MR, QK};
    use std::arch::x86_64::*;

    /// Sums of four adjacent `u8 x i8` products per i32 lane, exact (no i16 saturation can
    /// happen here: |products| <= 15 * 127 for Q4_1, 127 * 127 for Q8_0 with the sign trick).
    trait Us8 {
        unsafe fn dot(w: __m256i, y: __m256i) -> __m256i;
    }

    struct Maddubs;
    impl Us8 for Maddubs {
        #[inline(always)]
        unsafe fn dot(w: __m256i, y: __m256i) -> __m256i {
            _mm256_madd_epi16(_mm256_maddubs_epi16(w, y), _mm256_set1_epi16(1))
        }
    }

    struct Dpbusd;
    impl Us8 for Dpbusd {
        #[inline(always)]
        unsafe fn dot(w: __m256i, y: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, y)
        }
    }

    /// The f16 at `p` (unaligned) as f32, through F16C.
    #[inline(always)]
    pub(in crate::engine) unsafe fn f16_at(p: *const u8) -> f32 {
        let bits = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// The sum of the eight lanes of `v`.
    #[inline(always)]
    pub(in crate::engine) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// How far ahead of the block it reads a decode kernel asks for the weights, in bytes. A
    /// decode step streams every weight once, from beyond the caches, through short rows (360
    /// bytes for a Q4_1 row of 576): the hardware prefetcher alone left the kernels waiting on
    /// memory (docs/performance.md has the measured gain and the distances tried).
    pub(in crate::engine) const PREFETCH_AHEAD: usize = 3072;

    /// Prefetches the cache line [`PREFETCH_AHEAD`] bytes past `p` (a hint: never faults,
    /// whatever lies there).
    #[inline(always)]
    pub(in crate::engine) unsafe fn prefetch_ahead(p: *const u8) {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_AHEAD) as *const i8);
    }

    /// The 32 values of a Q4_1 block's nibbles, low nibbles (values 0..16) then high.
    #[inline(always)]
    unsafe fn nibbles(blk: *const u8) -> __m256i {
        let tmp = _mm_loadu_si128(blk.add(4) as *const __m128i);
        _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp),
            _mm256_set1_epi8(0x0F),
        )
    }

    /// Q4_1 weight row x Q8_1 activation rows (llama.cpp's `ggml_vec_dot_q4_1_q8_1`, with the
    /// unpacked nibbles reused across up to [`MR`] rows).
    #[inline(always)]
    unsafe fn q4_1_rows<P: Us8>(row: &[u8], a: &QActs, r0: usize, nr: usize, res: &mut [f32; MR]) {
        let kb = a.k / QK;
        let mut acc = [_mm256_setzero_ps(); MR];
        let mut summ = [0f32; MR];
        let wp = row.as_ptr();
        let xq = a.qs.as_ptr();
        for b in 0..kb {
            let blk = wp.add(b * 20);
            let dw = f16_at(blk);
            let mw = f16_at(blk.add(2));
            let bx = nibbles(blk);
            for r in 0..nr {
                let xi = (r0 + r) * kb + b;
                let y = _mm256_loadu_si256(xq.add(xi * QK) as *const __m256i);
                let p = P::dot(bx, y);
                let d = _mm256_set1_ps(dw * *a.d.get_unchecked(xi));
                acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[r]);
                summ[r] += mw * *a.s.get_unchecked(xi);
            }
        }
        for r in 0..nr {
            res[r] = hsum(acc[r]) + summ[r];
        }
    }

    /// Q8_0 weight row x Q8_0 activation rows (`ggml_vec_dot_q8_0_q8_0`): `|w| x sign(y, w)`.
    #[inline(always)]
    unsafe fn q8_0_rows<P: Us8>(row: &[u8], a: &QActs, r0: usize, nr: usize, res: &mut [f32; MR]) {
        let kb = a.k / QK;
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
                let p = P::dot(aw, _mm256_sign_epi8(y, w));
                let d = _mm256_set1_ps(dw * *a.d.get_unchecked(xi));
                *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), *acc);
            }
        }
        for r in 0..nr {
            res[r] = hsum(acc[r]);
        }
    }

    /// Decode (one activation row): `R` Q4_1 weight rows at a time (rows `rb` bytes apart in
    /// `w`), so that their FMA chains overlap; `out.len()` is a multiple of `R`. Each row keeps
    /// llama.cpp's summation order, block by block.
    #[inline(always)]
    unsafe fn q4_1_decode<P: Us8, const R: usize>(w: &[u8], rb: usize, a: &QActs, out: &mut [f32]) {
        let kb = a.k / QK;
        let xq = a.qs.as_ptr();
        for (g, o) in out.chunks_exact_mut(R).enumerate() {
            let p0 = w.as_ptr().add(g * R * rb);
            let mut acc = [_mm256_setzero_ps(); R];
            let mut summ = [0f32; R];
            for b in 0..kb {
                let y = _mm256_loadu_si256(xq.add(b * QK) as *const __m256i);
                let (dx, sx) = (*a.d.get_unchecked(b), *a.s.get_unchecked(b));
                for i in 0..R {
                    let blk = p0.add(i * rb + b * 20);
                    prefetch_ahead(blk);
                    let prod = P::dot(nibbles(blk), y);
                    let d = _mm256_set1_ps(f16_at(blk) * dx);
                    acc[i] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(prod), acc[i]);
                    summ[i] += f16_at(blk.add(2)) * sx;
                }
            }
            for i in 0..R {
                o[i] = hsum(acc[i]) + summ[i];
            }
        }
    }

    /// Decode: `R` Q8_0 weight rows at a time (see [`q4_1_decode`]).
    #[inline(always)]
    unsafe fn q8_0_decode<P: Us8, const R: usize>(w: &[u8], rb: usize, a: &QActs, out: &mut [f32]) {
        let kb = a.k / QK;
        let xq = a.qs.as_ptr();
        for (g, o) in out.chunks_exact_mut(R).enumerate() {
            let p0 = w.as_ptr().add(g * R * rb);
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..kb {
                let y = _mm256_loadu_si256(xq.add(b * QK) as *const __m256i);
                let dx = *a.d.get_unchecked(b);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let blk = p0.add(i * rb + b * 34);
                    prefetch_ahead(blk);
                    let wv = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                    let prod = P::dot(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(y, wv));
                    let d = _mm256_set1_ps(f16_at(blk) * dx);
                    *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(prod), *acc);
                }
            }
            for (o, acc) in o.iter_mut().zip(acc) {
                *o = hsum(acc);
            }
        }
    }

    // The entry points: one per kernel and instruction set. Not inlined: a call per weight row
    // (or group of rows) is noise next to its blocks, and profiles then show the kernels by name.
    //
    // # Safety (all)
    // The CPU has the features named in `target_feature`; rows hold `a.k / 32` blocks of their
    // format; rows `r0..r0 + nr` exist in `a` (one row for the decode kernels).

    #[inline(never)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_1_rows_avx2(row: &[u8], a: &QActs, r0: usize, nr: usize, res: &mut [f32; MR]) {
        q4_1_rows::<Maddubs>(row, a, r0, nr, res)
    }

    #[inline(never)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8_0_rows_avx2(row: &[u8], a: &QActs, r0: usize, nr: usize, res: &mut [f32; MR]) {
        q8_0_rows::<Maddubs>(row, a, r0, nr, res)
    }

    #[inline(never)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_1_decode_avx2<const R: usize>(
        w: &[u8],
        rb: usize,
        a: &QActs,
        out: &mut [f32],
    ) {
        q4_1_decode::<Maddubs, R>(w, rb, a, out)
    }

    #[inline(never)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8_0_decode_avx2<const R: usize>(
        w: &[u8],
        rb: usize,
        a: &QActs,
        out: &mut [f32],
    ) {
        q8_0_decode::<Maddubs, R>(w, rb, a, out)
    }

    #[inline(never)]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn q4_1_rows_vnni(row: &[u8], a: &QActs, r0: usize, nr: usize, res: &mut [f32; MR]) {
        q4_1_rows::<Dpbusd>(row, a, r0, nr, res)
    }

    #[inline(never)]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn q8_0_rows_vnni(row: &[u8], a: &QActs, r0: usize, nr: usize, res: &mut [f32; MR]) {
        q8_0_rows::<Dpbusd>(row, a, r0, nr, res)
    }

    /// Whether [`group16_vnni`] takes the format: the 32-value block formats.
    pub fn groups16(f: Format) -> bool {
        matches!(
            f,
            Format::Q4_1 | Format::Q8_0 | Format::Q4_0 | Format::Q5_0 | Format::Q5_1
        )
    }

    /// Prefill: 16 weight rows (output columns) of a 32-value block format times all `a.m`
    /// activation rows, into `out` (`[16][m]`, the transposed buffer's rows).
    ///
    /// The group's values are unpacked once, as unsigned bytes `u = q + off` (Q8_0: `q + 128`;
    /// Q4_0: the nibble, `off` 8; Q5_0: nibble | fifth bit, `off` 16; Q4_1, Q5_1: `off` 0), into
    /// runs of `[16 columns][4 values]` (values `4g..4g + 3` of every column side by side), so
    /// that one `vpdpbusd` against 4 broadcast activation bytes adds 64 products into the 16
    /// column lanes, started at `-off · Σ x` of those 4 activations: exact, the same i32 as the
    /// signed products. The float sums are llama.cpp's (`ggml_vec_dot_*_q8_0/1`) and the per-row
    /// kernels', operation for operation, so the results are the same bits: per run of 4
    /// values a float lane `+= d_w·d_x · Σ4`, over the blocks; the 8 lanes summed in `hsum`'s
    /// order; plus `Σ m_w·s_x` (multiply, then add) for the formats with a minimum. Why not sum
    /// each block's 32 products in i32 first (fewer instructions, as accurate): that mere
    /// reordering moved SmolLM2's logits past fidelity_smollm2's bound against llama.cpp
    /// (docs/performance.md has the figures).
    ///
    /// # Safety
    /// AVX-512 F/VNNI; `f` passes [`groups16`]; `w` holds 16 rows of `rb` bytes (blocks of `f`,
    /// `a.k` values); `out` holds `16 * a.m` values.
    #[inline(never)]
    #[allow(clippy::needless_range_loop)] // rows and runs index two arrays each
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn group16_vnni(f: Format, w: &[u8], rb: usize, a: &QActs, out: &mut [f32]) {
        const RT: usize = 3;
        let (m, k) = (a.m, a.k);
        let kb = k / QK;
        debug_assert!(w.len() >= 16 * rb && out.len() >= 16 * m && m > 0);
        // [block][run][column] u32 (4 unsigned values each), and [block][column] d and m.
        let mut wq = vec![0u32; kb * 8 * 16];
        let mut dw = vec![0f32; kb * 16];
        let mut mw = vec![0f32; kb * 16];
        let (off, has_min) = match f {
            Format::Q8_0 => (128, false),
            Format::Q4_0 => (8, false),
            Format::Q5_0 => (16, false),
            _ => (0, true),
        };
        let bb = f.block_bytes();
        let mut runs = [0u32; 8];
        for c in 0..16 {
            for b in 0..kb {
                let blk = w.as_ptr().add(c * rb + b * bb);
                dw[b * 16 + c] = f16_at(blk);
                let u = match f {
                    Format::Q4_1 => {
                        mw[b * 16 + c] = f16_at(blk.add(2));
                        nibbles(blk)
                    }
                    Format::Q8_0 => _mm256_xor_si256(
                        _mm256_loadu_si256(blk.add(2) as *const __m256i),
                        _mm256_set1_epi8(-128),
                    ),
                    _ => {
                        if f == Format::Q5_1 {
                            mw[b * 16 + c] = f16_at(blk.add(2));
                        }
                        super::kquants::avx2::legacy_u(f, blk)
                    }
                };
                _mm256_storeu_si256(runs.as_mut_ptr() as *mut __m256i, u);
                for (g, &v) in runs.iter().enumerate() {
                    *wq.get_unchecked_mut((b * 8 + g) * 16 + c) = v;
                }
            }
        }
        let sums: &[i32] = if off == 0 { &[] } else { a.run_sums() };
        for r0 in (0..m).step_by(RT) {
            let nr = (m - r0).min(RT);
            // Rows past `m` repeat the last one; their results are not written.
            let row = |r: usize| (r0 + r).min(m - 1);
            // Per row and run, a float accumulator over the blocks: llama.cpp's 8 lanes.
            let mut accf = [[_mm512_setzero_ps(); 8]; RT];
            let mut summ = [_mm512_setzero_ps(); RT];
            for b in 0..kb {
                let dv = _mm512_loadu_ps(dw.as_ptr().add(b * 16));
                let mv = _mm512_loadu_ps(mw.as_ptr().add(b * 16));
                let mut d = [_mm512_setzero_ps(); RT];
                for r in 0..RT {
                    let i = row(r) * kb + b;
                    d[r] = _mm512_mul_ps(dv, _mm512_set1_ps(*a.d.get_unchecked(i)));
                    if has_min {
                        // Not fused, as the per-row kernels (and llama.cpp's scalar sum) do it.
                        let ms = _mm512_mul_ps(mv, _mm512_set1_ps(*a.s.get_unchecked(i)));
                        summ[r] = _mm512_add_ps(summ[r], ms);
                    }
                }
                for g in 0..8 {
                    let wv = _mm512_loadu_si512(wq.as_ptr().add((b * 8 + g) * 16) as *const _);
                    for r in 0..RT {
                        let xr = a.qs.as_ptr().add(row(r) * k + b * QK + g * 4);
                        let x = _mm512_set1_epi32((xr as *const i32).read_unaligned());
                        let start = if off == 0 {
                            _mm512_setzero_si512()
                        } else {
                            let run = (row(r) * k + b * QK) / 4 + g;
                            _mm512_set1_epi32(-off * *sums.get_unchecked(run))
                        };
                        let p = _mm512_dpbusd_epi32(start, wv, x);
                        accf[r][g] = _mm512_fmadd_ps(d[r], _mm512_cvtepi32_ps(p), accf[r][g]);
                    }
                }
            }
            for (r, (l, sm)) in accf.iter().zip(&summ).enumerate().take(nr) {
                store_columns(l, has_min.then_some(*sm), out, m, r0 + r);
            }
        }
    }

    /// The end of a 16-column prefill kernel for one activation row `r`: each column's eight
    /// lane accumulators `l` summed in `hsum`'s order, ((0+4) + (2+6)) + ((1+5) + (3+7)), plus
    /// `extra` (the minimum term) where given, as the per-row kernels end; column `c` goes to
    /// `out[c * m + r]`.
    ///
    /// # Safety
    /// AVX-512 F (the caller's); `out` holds `16 * m` values and `r < m`.
    #[inline(always)]
    pub(in crate::engine) unsafe fn store_columns(
        l: &[__m512; 8],
        extra: Option<__m512>,
        out: &mut [f32],
        m: usize,
        r: usize,
    ) {
        let h = _mm512_add_ps(
            _mm512_add_ps(_mm512_add_ps(l[0], l[4]), _mm512_add_ps(l[2], l[6])),
            _mm512_add_ps(_mm512_add_ps(l[1], l[5]), _mm512_add_ps(l[3], l[7])),
        );
        let h = extra.map_or(h, |e| _mm512_add_ps(h, e));
        let mut res = [0f32; 16];
        _mm512_storeu_ps(res.as_mut_ptr(), h);
        for (c, v) in res.iter().enumerate() {
            *out.get_unchecked_mut(c * m + r) = *v;
        }
    }

    /// Decode on AVX-512: two weight rows of a 32-value block format per 512-bit vector (row 0
    /// in the low 256 bits, row 1 in the high), against the one activation row broadcast to both
    /// halves. Each half runs what the 256-bit kernels run for its row, lane for lane: the same
    /// i32 sums of 4 products (`vpdpbusd` on unsigned `u = q + off`, started at `-off · Σ4 y`),
    /// the same `d_w·d_x` products, the same FMA per block, the same `hsum` and `Σ m_w·s_x`, so
    /// the same bits; half the vector instructions per block, and the two rows' scales converted
    /// in one instruction instead of four scalar ones. `out.len()` is even.
    ///
    /// # Safety
    /// AVX-512 F/VL/BW/VNNI, AVX2, FMA, F16C; `f` passes [`groups16`]; `w` holds `out.len()`
    /// rows of `rb` bytes (blocks of `f`, `a.k` values); `a` has one row.
    #[inline(never)]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub unsafe fn decode_pairs_512(f: Format, w: &[u8], rb: usize, a: &QActs, out: &mut [f32]) {
        // One loop per format, its layout constant (no branch per block).
        match f {
            Format::Q4_1 => pairs_512(Format::Q4_1, w, rb, a, out),
            Format::Q8_0 => pairs_512(Format::Q8_0, w, rb, a, out),
            Format::Q4_0 => pairs_512(Format::Q4_0, w, rb, a, out),
            Format::Q5_0 => pairs_512(Format::Q5_0, w, rb, a, out),
            _ => pairs_512(Format::Q5_1, w, rb, a, out),
        }
    }

    #[inline(always)]
    unsafe fn pairs_512(f: Format, w: &[u8], rb: usize, a: &QActs, out: &mut [f32]) {
        let kb = a.k / QK;
        let bb = f.block_bytes();
        debug_assert!(out.len().is_multiple_of(2) && w.len() >= out.len() * rb && a.m == 1);
        // The shift that multiplies a run sum by the format's offset (0: none).
        let (shift, has_min) = match f {
            Format::Q8_0 => (7, false),
            Format::Q4_0 => (3, false),
            Format::Q5_0 => (4, false),
            _ => (0, true),
        };
        let runs: &[i32] = if shift == 0 { &[] } else { a.run_sums() };
        let xq = a.qs.as_ptr();
        let low = _mm512_set1_epi8(0x0F);
        let top = _mm512_set1_epi8(-128);
        let fifth = _mm512_set1_epi8(0x10);
        // Lanes 0..8 take the first row's block scale, 8..16 the second's ([d0, m0, d1, m1]).
        let pick_d = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
        for (g, o) in out.chunks_exact_mut(2).enumerate() {
            let p0 = w.as_ptr().add(2 * g * rb);
            let p1 = p0.add(rb);
            let mut acc = _mm512_setzero_ps();
            let mut summ = _mm_setzero_ps();
            for b in 0..kb {
                let (b0, b1) = (p0.add(b * bb), p1.add(b * bb));
                prefetch_ahead(b0);
                prefetch_ahead(b1);
                let y = _mm512_broadcast_i64x4(_mm256_loadu_si256(xq.add(b * QK) as *const _));
                let u = if f == Format::Q8_0 {
                    let lo = _mm512_castsi256_si512(_mm256_loadu_si256(b0.add(2) as *const _));
                    let both = _mm512_inserti64x4(lo, _mm256_loadu_si256(b1.add(2) as *const _), 1);
                    _mm512_xor_si512(both, top)
                } else {
                    let qs = match f {
                        Format::Q4_0 => 2,
                        Format::Q4_1 => 4,
                        Format::Q5_0 => 6,
                        _ => 8,
                    };
                    let t = _mm256_set_m128i(
                        _mm_loadu_si128(b1.add(qs) as *const _),
                        _mm_loadu_si128(b0.add(qs) as *const _),
                    );
                    let t = _mm512_castsi256_si512(t);
                    // [row 0's 16 bytes twice, row 1's twice]; the second copy of each shifted
                    // to its high nibbles: values 0..16 then 16..32 of each row, as `y` holds them.
                    let z = _mm512_shuffle_i64x2(t, t, 0b01_01_00_00);
                    let z = _mm512_and_si512(_mm512_mask_srli_epi16(z, 0xFF00_FF00, z, 4), low);
                    if matches!(f, Format::Q5_0 | Format::Q5_1) {
                        let h = |p: *const u8| (p.add(qs - 4) as *const u32).read_unaligned();
                        let bits = (h(b1) as u64) << 32 | h(b0) as u64;
                        _mm512_or_si512(z, _mm512_maskz_mov_epi8(bits, fifth))
                    } else {
                        z
                    }
                };
                let start = if shift == 0 {
                    _mm512_setzero_si512()
                } else {
                    let r = _mm256_loadu_si256(runs.as_ptr().add(b * 8) as *const _);
                    let r = _mm512_broadcast_i64x4(r);
                    _mm512_sub_epi32(
                        _mm512_setzero_si512(),
                        _mm512_sll_epi32(r, _mm_cvtsi32_si128(shift)),
                    )
                };
                let p = _mm512_dpbusd_epi32(start, u, y);
                // [d0, m0, d1, m1] of the two blocks (f16), times [d_x, s_x, d_x, s_x].
                let h = |p: *const u8| (p as *const i32).read_unaligned();
                let dm = _mm_cvtph_ps(_mm_setr_epi32(h(b0), h(b1), 0, 0));
                let (dx, sx) = (*a.d.get_unchecked(b), *a.s.get_unchecked(b));
                let dm = _mm_mul_ps(dm, _mm_setr_ps(dx, sx, dx, sx));
                if has_min {
                    summ = _mm_add_ps(summ, dm);
                }
                let d = _mm512_permutexvar_ps(pick_d, _mm512_castps128_ps512(dm));
                acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(p), acc);
            }
            let mut sm = [0f32; 4];
            _mm_storeu_ps(sm.as_mut_ptr(), summ);
            let lo = hsum(_mm512_castps512_ps256(acc));
            let hi = hsum(_mm256_castpd_ps(_mm512_extractf64x4_pd(
                _mm512_castps_pd(acc),
                1,
            )));
            if has_min {
                o[0] = lo + sm[1];
                o[1] = hi + sm[3];
            } else {
                o[0] = lo;
                o[1] = hi;
            }
        }
    }
}
#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// xorshift64 values in [-1, 1] (the engine's kernel tests share it).
    pub(crate) fn rng(seed: u64) -> impl FnMut() -> f32 {
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
                // Legacy blocks: {d, [m], [qh], nibbles}; any bytes after the scales are valid.
                Format::Q4_0 | Format::Q5_0 | Format::Q5_1 => {
                    if format == Format::Q5_1 {
                        out.extend(half::f16::from_f32(r() * 0.3).to_le_bytes());
                    }
                    let rest = format.block_bytes() - if format == Format::Q5_1 { 4 } else { 2 };
                    out.extend((0..rest).map(|_| ((r() + 1.0) * 127.0) as u8));
                }
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
            // 19 and 40: the 16-column prefill kernel on whole groups, plus a partial row tile.
            for m in [1, 3, 6, 19, 40] {
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

    /// Every instruction set this CPU has gives the same bits as AVX2 (the integer sums are
    /// exact, the float operations the same in the same order), and the scalar reference within
    /// rounding; decode shapes with tails (row counts not a multiple of the rows per call), and
    /// prefill shapes (m = 19: VNNI's 16-column Q4_1 kernel on whole groups, the per-row kernel
    /// on the rest, a partial row tile).
    #[test]
    fn every_instruction_set_agrees() {
        let mut r = rng(11);
        let levels: Vec<Simd> = [Simd::Avx2, Simd::Vnni]
            .into_iter()
            .filter(|&l| match l {
                Simd::Avx2 => use_avx2(),
                _ => use_avx2() && crate::engine::qgemm::use_vnni(),
            })
            .collect();
        let formats = [
            Format::Q4_1,
            Format::Q8_0,
            Format::Q4_0,
            Format::Q5_0,
            Format::Q5_1,
        ];
        for format in formats {
            for (n, k) in [(1, 32), (7, 64), (45, 160)] {
                let bytes = random_matrix(format, n, k, &mut r);
                let len = bytes.len();
                let w = QMatrix::new(format, n, k, Arc::new(bytes), 0..len).unwrap();
                for m in [1, 5, 19] {
                    let x: Vec<f32> = (0..m * k).map(|_| r()).collect();
                    let a = QActs::quantize(&x, k);
                    let run = |l: Simd| {
                        let mut y = vec![0f32; m * n];
                        matmul_with(l, &[&w], &a, &mut [&mut y]);
                        y
                    };
                    let scalar = run(Simd::Scalar);
                    let mut first: Option<Vec<f32>> = None;
                    for &l in &levels {
                        let y = run(l);
                        for (g, s) in y.iter().zip(&scalar) {
                            assert!((g - s).abs() <= 1e-4 * (1.0 + s.abs()), "{l:?} {g} vs {s}");
                        }
                        match &first {
                            Some(f) => assert_eq!(
                                f, &y,
                                "{l:?} differs from AVX2 ({format:?} {n}x{k} m={m})"
                            ),
                            None => first = Some(y),
                        }
                    }
                }
            }
        }
    }

    /// Not a test: decode-shaped throughput of each instruction set on SmolLM2-135M's block
    /// matrices (too large for the caches, as in a real decode).
    /// `cargo test --release --lib qmatmul::tests::decode_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn decode_speed() {
        let mut r = rng(5);
        let k = 576;
        let shapes = [
            (576usize, 576usize),
            (192, 576),
            (192, 576),
            (576, 576),
            (1536, 576),
            (1536, 576),
            (576, 1536),
        ];
        let mats: Vec<QMatrix> = (0..30)
            .flat_map(|_| shapes)
            .map(|(n, k)| {
                let b = random_matrix(Format::Q4_1, n, k, &mut r);
                let l = b.len();
                QMatrix::new(Format::Q4_1, n, k, Arc::new(b), 0..l).unwrap()
            })
            .collect();
        let x: Vec<f32> = (0..1536).map(|_| r()).collect();
        let a576 = QActs::quantize(&x[..k], k);
        let a1536 = QActs::quantize(&x, 1536);
        let mut best = [f64::MAX; 2];
        for _round in 0..8 {
            for (li, l) in [Simd::Avx2, Simd::Vnni].into_iter().enumerate() {
                if l == Simd::Vnni && !crate::engine::qgemm::use_vnni() {
                    continue;
                }
                let t = std::time::Instant::now();
                let reps = 5;
                for _ in 0..reps {
                    for w in &mats {
                        let a = if w.k == k { &a576 } else { &a1536 };
                        let mut y = vec![0f32; w.n];
                        matmul_with(l, &[w], a, &mut [&mut y]);
                    }
                }
                best[li] = best[li].min(t.elapsed().as_secs_f64() * 1e3 / reps as f64);
            }
        }
        println!(
            "decode 30 layers: avx2 {:.2} ms, vnni {:.2} ms (min of 8)",
            best[0], best[1]
        );
        // Prefill: 116 rows at once, on the first 4 layers.
        let m = 116;
        let x: Vec<f32> = (0..m * 1536).map(|_| r()).collect();
        let p576 = QActs::quantize(&x[..m * k], k);
        let p1536 = QActs::quantize(&x, 1536);
        let mut bestp = [f64::MAX; 2];
        for _round in 0..5 {
            for (li, l) in [Simd::Avx2, Simd::Vnni].into_iter().enumerate() {
                if l == Simd::Vnni && !crate::engine::qgemm::use_vnni() {
                    continue;
                }
                let t = std::time::Instant::now();
                for w in &mats[..28] {
                    let a = if w.k == k { &p576 } else { &p1536 };
                    let mut y = vec![0f32; w.n * m];
                    matmul_with(l, &[w], a, &mut [&mut y]);
                }
                bestp[li] = bestp[li].min(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        println!(
            "prefill 116 x 4 layers: avx2 {:.2} ms, vnni {:.2} ms (min of 5)",
            bestp[0], bestp[1]
        );
    }

    /// The AVX2 activation quantizer gives the scalar reference's quants, scales and sums, bit
    /// for bit: exact halves (where rounding modes differ), zero blocks, tiny and large values.
    #[test]
    fn activation_quantization_simd_equals_scalar() {
        let mut r = rng(0x9e37_79b9_7f4a_7c15);
        for k in [32usize, 576, 1536] {
            for scale in [0.0f32, 1e-7, 1.0, 413.0] {
                let mut x: Vec<f32> = (0..3 * k).map(|_| r() * scale).collect();
                // Every third block: max|x| = 127, so the scale is exactly 1 and the other
                // values, n + 0.5, sit where half-to-even and half-away-from-zero differ.
                for xb in x.chunks_exact_mut(QK).step_by(3) {
                    xb[0] = 127.0;
                    for (j, v) in xb.iter_mut().enumerate().skip(1) {
                        *v = j as f32 * 2.0 - 31.5;
                    }
                }
                x[..QK].iter_mut().for_each(|v| *v = 0.0);
                let a = QActs::quantize(&x, k);
                for (b, xb) in x.chunks_exact(QK).enumerate() {
                    let mut q = [0i8; QK];
                    let (amax, sum) = quantize_block_scalar(xb, &mut q);
                    assert_eq!(&a.qs[b * QK..(b + 1) * QK], &q, "k {k} block {b}");
                    let dd = amax / 127.0;
                    assert_eq!(a.d[b].to_bits(), half::f16::from_f32(dd).to_f32().to_bits());
                    let sd = half::f16::from_f32(dd * sum as f32).to_f32();
                    assert_eq!(a.s[b].to_bits(), sd.to_bits(), "k {k} block {b}");
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
