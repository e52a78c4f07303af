//! Int8 GEMM for q8_0 weights: `y[m, n] = x[m, k] · W[n, k]^T + bias`, `x` f32, `W` q8_0.
//!
//! Why: candle's f32 gemm on dequantized weights reads 4 bytes per weight, and its quantized
//! matmul re-reads each weight row for every input row through a per-element `vec_dot`. Here the
//! weights stay 8-bit (4x less memory traffic than f32), each input row is quantized once to
//! q8_0-style blocks, and the dot products run on int8 (`maddubs` + `madd`: 32 multiply-adds per
//! instruction pair, i32 accumulation, exact). Each weight block loaded is reused across 4 input
//! rows (AVX2; 8 rows x 16 columns per `vpdpbusd` group with AVX-512 VNNI; one 16 x 16 int8 tile
//! product per block with AMX), and the per-block scale `d_w * d_x` is applied once per block and
//! row in f32. INT8_KERNEL=amx-bf16 swaps in bf16 weights for AMX-BF16 (see [`Kernel::AmxBf16`]).
//!
//! Accuracy: the weights are used exactly as stored; the only extra error is the 8-bit
//! quantization of the activations (per 32 values, `scale = max|x| / 127`), the same scheme
//! llama.cpp's q8_0 x q8_0 matmul uses.
//!
//! Must not: allocate per output element, touch tensors other than the one input, depend on the
//! thread count for its results (every output element is summed in a fixed order), or use AVX2
//! on a CPU without it (the SIMD path is chosen at run time; [`gemm_scalar`] is the reference).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use rayon::prelude::*;

/// Values per q8_0 block.
pub const BLOCK: usize = 32;
/// Bytes per q8_0 block in GGUF: f16 scale + 32 x i8.
const BLOCK_BYTES: usize = 34;
/// Input rows per tile: each weight block load serves this many rows.
const MR: usize = 4;

/// Columns per VNNI weight group: one 512-bit register of i32 lanes.
const NV: usize = 16;
/// Input rows per VNNI tile: each weight load serves 8 rows (AVX-512 has 32 vector registers).
const MRV: usize = 8;
/// Input rows per VNNI task: its tiles take turns on each column group's weights while they are
/// in L1, so the weights are streamed once per this many rows instead of once per MRV.
const VNNI_ROWS: usize = 8 * MRV;

/// The kernels, in the order a cap ([`cap_kernel`], INT8_KERNEL) admits them: a matrix uses the
/// last one admitted that the CPU runs and that fits its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Kernel {
    /// AVX2 where present, else the scalar reference.
    Avx2,
    /// AVX-512 VNNI.
    Vnni,
    /// AMX-INT8 on the VNNI layout: the default where the CPU and Linux grant the tile unit.
    Amx,
    /// AMX-BF16 on weights rounded to bf16 at load: only when asked for (INT8_KERNEL=amx-bf16).
    /// Faster than AMX-INT8 on large batches (no per-block epilogue), slower on one short input
    /// (twice the weight bytes), and twice the weights' memory.
    AmxBf16,
}

/// A q8_0 matrix `[n, k]` repacked for the kernel, plus the layer's bias.
pub struct Q8Linear {
    n: usize,
    k: usize,
    /// `[n]`.
    bias: Vec<f32>,
    packed: Packed,
}

/// The weight layout, chosen once at load for the kernel this CPU runs.
enum Packed {
    /// Row-major: the AVX2 kernel and the scalar reference.
    Rows {
        /// `[n, k]` signed quants.
        qs: Vec<i8>,
        /// `[n, k / 32]` block scales, f16 widened to f32 once at load.
        ds: Vec<f32>,
    },
    /// Interleaved for AVX-512 VNNI (`vpdpbusd`, 512-bit form), used when the CPU has it (Zen 4,
    /// Ice Lake, Cascade Lake, Sapphire Rapids: most x86 Lambda hosts). Per group of 16 columns
    /// and per block, 8 runs of `[column][4 quants]`: one load gives 4 consecutive quants of 16
    /// columns, and one `vpdpbusd` against 4 broadcast activation bytes (an embedded-broadcast
    /// memory operand) adds 64 products into 16 column lanes, already reduced. `vpdpbusd` multiplies
    /// unsigned by signed bytes, so the weights are stored offset (`q + 128`, exact) and
    /// `128 · Σ x` per row and block, computed while quantizing, undoes the offset exactly.
    Vnni {
        /// `[n / 16][k / 32][8 runs][16 columns][4]` quants + 128 (as stored with `amx`).
        w: Vec<u8>,
        /// `[n / 16][k / 32][16 columns]` block scales.
        ds: Vec<f32>,
        /// Run on the AMX tile unit (`tdpbssd`) instead of `vpdpbusd`. The same layout with the
        /// quants as stored (no offset: `tdpbssd` multiplies signed by signed bytes), the same
        /// integer dot products and the same float epilogue, so the same bits out.
        amx: bool,
    },
    /// bf16 for the AMX tile unit (Sapphire Rapids and newer), used where INT8_KERNEL=amx-bf16
    /// asks for it, the CPU has it and the kernel grants the tile state. Each q8_0 weight `q · d` is rounded to bf16 once at load
    /// (8 significant bits: `q` has 7, so only `d`'s low bits are lost) and the activations are
    /// rounded to bf16 per call instead of quantized to 8 bits per block: no per-block scales,
    /// so one `tdpbf16ps` sums a whole 32-value chunk for 16 x 16 outputs in f32, and the
    /// activation error is below the int8 kernels' (2^-9 relative against up to 1/254 of the
    /// block's largest value). Per group of 16 columns and per 32 values of `k`: the B tile,
    /// 16 rows of `[column][2 values]`.
    Amx {
        /// `[n / 16][k / 32][16 pairs][16 columns][2]` bf16 bits.
        w: Vec<u16>,
    },
}

impl Q8Linear {
    /// From raw GGUF q8_0 bytes (`n * k / 32` blocks of {f16 d, 32 x i8}) and an f32 bias, in
    /// the layout of the fastest kernel this CPU has.
    pub fn from_q8_0(raw: &[u8], n: usize, k: usize, bias: Vec<f32>) -> Result<Self> {
        Self::from_q8_0_with(raw, n, k, bias, cap())
    }

    /// As [`Q8Linear::from_q8_0`], with the fastest kernel allowed capped at `best` (tests and the
    /// bench run each; the CPU must still have it, else the next one down is used).
    pub fn from_q8_0_with(
        raw: &[u8],
        n: usize,
        k: usize,
        bias: Vec<f32>,
        best: Kernel,
    ) -> Result<Self> {
        if !k.is_multiple_of(BLOCK) || raw.len() != n * k / BLOCK * BLOCK_BYTES || bias.len() != n {
            candle_core::bail!("q8_0 matrix [{n}, {k}] does not match its bytes or bias")
        }
        let kb = k / BLOCK;
        let block = |c: usize, b: usize| &raw[(c * kb + b) * BLOCK_BYTES..][..BLOCK_BYTES];
        let packed = if best >= Kernel::AmxBf16 && amx::usable() && n.is_multiple_of(amx::NC) {
            // Written in tile order (sequential stores, no zero-fill first): per 16-column group
            // and block, pair row `r` holds each column's values `2r` and `2r + 1`.
            let mut w = Vec::with_capacity(n * k);
            let mut d = [0f32; amx::NT];
            for cg in 0..n / amx::NT {
                for b in 0..kb {
                    let cols: [&[u8]; amx::NT] =
                        std::array::from_fn(|j| block(cg * amx::NT + j, b));
                    for (dj, blk) in d.iter_mut().zip(&cols) {
                        *dj = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                    }
                    for r in 0..BLOCK / 2 {
                        for (blk, &dj) in cols.iter().zip(&d) {
                            w.push(bf16_bits((blk[2 + 2 * r] as i8) as f32 * dj));
                            w.push(bf16_bits((blk[3 + 2 * r] as i8) as f32 * dj));
                        }
                    }
                }
            }
            Packed::Amx { w }
        } else if best >= Kernel::Vnni && use_vnni() && n.is_multiple_of(NV) {
            let amx = best >= Kernel::Amx && amx::usable();
            // `vpdpbusd` takes unsigned weights (offset by 128); `tdpbssd` takes them as stored.
            let flip = if amx { 0 } else { 0x80 };
            let mut w = Vec::with_capacity(n * k);
            let mut ds = Vec::with_capacity(n * kb);
            for cg in 0..n / NV {
                for b in 0..kb {
                    for g in 0..BLOCK / 4 {
                        for j in 0..NV {
                            let q = &block(cg * NV + j, b)[2 + g * 4..2 + g * 4 + 4];
                            w.extend(q.iter().map(|&v| v ^ flip));
                        }
                    }
                    for j in 0..NV {
                        let blk = block(cg * NV + j, b);
                        ds.push(half::f16::from_le_bytes([blk[0], blk[1]]).to_f32());
                    }
                }
            }
            Packed::Vnni { w, ds, amx }
        } else {
            let mut qs = Vec::with_capacity(n * k);
            let mut ds = Vec::with_capacity(n * kb);
            for b in raw.chunks_exact(BLOCK_BYTES) {
                ds.push(half::f16::from_le_bytes([b[0], b[1]]).to_f32());
                qs.extend(b[2..].iter().map(|&q| q as i8));
            }
            Packed::Rows { qs, ds }
        };
        Ok(Self { n, k, bias, packed })
    }

    /// Which kernel this matrix runs on (for logs and the bench).
    pub fn kernel_name(&self) -> &'static str {
        match (&self.packed, use_avx2()) {
            (Packed::Amx { .. }, _) => "amx-bf16",
            (Packed::Vnni { amx: true, .. }, _) => "amx-int8",
            (Packed::Vnni { .. }, _) => "avx512-vnni",
            (Packed::Rows { .. }, true) => "avx2",
            (Packed::Rows { .. }, false) => "scalar",
        }
    }

    pub fn out_dim(&self) -> usize {
        self.n
    }

    /// `x`: `[m, k]` row-major -> `[m, n]` (with bias), on the rayon pool.
    pub fn forward_slice(&self, x: &[f32]) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let m = x.len() / k;
        let mut y = vec![0f32; m * n];
        // Columns a task's range is a multiple of: what one kernel call produces.
        let (mr, group) = match self.packed {
            Packed::Rows { .. } => (MR, 2),
            Packed::Vnni { .. } => (VNNI_ROWS, NV),
            Packed::Amx { .. } => (amx::MR, amx::NC),
        };
        let tiles = m.div_ceil(mr);
        let threads = rayon::current_num_threads();
        let simd = use_avx2();
        if self.serial_at(m) || threads == 1 {
            // Too little work to share: the second thread's start and the two halves' meeting
            // cost more than they save.
            for (y, x) in y.chunks_mut(mr * n).zip(x.chunks(mr * k)) {
                self.tile_rows(x, y, 0..n, simd);
            }
            return y;
        }
        if tiles >= threads || n < 2 * group {
            // One task per tile of `mr` rows (all columns); rayon splits the tiles over the pool.
            y.par_chunks_mut(mr * n)
                .zip(x.par_chunks(mr * k))
                .for_each(|(y, x)| self.tile_rows(x, y, 0..n, simd));
            return y;
        }
        // Fewer row tiles than threads (one short sentence is one tile): each tile's columns are
        // cut into ranges as well, so every thread gets work and reads only its part of the
        // weights. Each task writes a `[rows, range]` block, copied into place after.
        let parts = threads.div_ceil(tiles).min(n / group);
        let span = (n / group).div_ceil(parts) * group;
        let tasks: Vec<(usize, std::ops::Range<usize>)> = (0..tiles)
            .flat_map(|t| (0..n).step_by(span).map(move |c| (t, c..(c + span).min(n))))
            .collect();
        let blocks: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|(t, cols)| {
                let xs = &x[t * mr * k..((t + 1) * mr).min(m) * k];
                let mut out = vec![0f32; xs.len() / k * cols.len()];
                self.tile_rows(xs, &mut out, cols.clone(), simd);
                out
            })
            .collect();
        for ((t, cols), block) in tasks.iter().zip(&blocks) {
            for (r, row) in block.chunks_exact(cols.len()).enumerate() {
                let at = (t * mr + r) * n + cols.start;
                y[at..at + cols.len()].copy_from_slice(row);
            }
        }
        y
    }

    /// Whether `m` input rows run on the calling thread (too little work to split).
    pub fn serial_at(&self, m: usize) -> bool {
        m * self.n * self.k < self.min_parallel_macs()
    }

    /// The smallest product `m * n * k` worth splitting over the pool: about 50 µs of one
    /// thread's work on the kernel the layout runs (`bench embeddings`' one-sentence figure with
    /// THREADS=1 and 2 is how it was chosen).
    fn min_parallel_macs(&self) -> usize {
        match self.packed {
            Packed::Amx { .. } => 12 << 20,
            Packed::Vnni { .. } => 12 << 20,
            Packed::Rows { .. } => 2 << 20,
        }
    }

    /// One task's rows of `x` (up to MR, [`VNNI_ROWS`] or `amx::MR` by layout) times the columns
    /// `cols` -> `y`, `[rows, cols.len()]` row-major.
    /// `cols` starts and ends on a multiple of the kernel's column group (or at `n`).
    fn tile_rows(&self, x: &[f32], y: &mut [f32], cols: std::ops::Range<usize>, simd: bool) {
        match &self.packed {
            Packed::Rows { qs, ds } => self.tile_rows_avx2(qs, ds, x, y, cols, simd),
            Packed::Vnni { w, ds, amx } => self.tile_rows_vnni(w, ds, *amx, x, y, cols),
            Packed::Amx { w } => self.tile_rows_amx(w, x, y, cols),
        }
    }

    /// The AMX path: up to 32 rows rounded to bf16, then 32 columns (2 x 2 tiles) at a time.
    fn tile_rows_amx(&self, w: &[u16], x: &[f32], y: &mut [f32], cols: std::ops::Range<usize>) {
        let k = self.k;
        let rows = x.len() / k;
        // One activation buffer per thread, reused: no allocation per tile (the process has one
        // malloc arena, which the pool's threads share).
        thread_local! {
            static A: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        A.with_borrow_mut(|a| self.amx_rows(w, x, y, cols, a, rows));
    }

    fn amx_rows(
        &self,
        w: &[u16],
        x: &[f32],
        y: &mut [f32],
        cols: std::ops::Range<usize>,
        a: &mut Vec<u16>,
        rows: usize,
    ) {
        let (k, ys) = (self.k, cols.len());
        // Padding rows are 0: their outputs are computed and dropped.
        a.clear();
        a.resize(amx::MR * k, 0);
        for (a, &v) in a.iter_mut().zip(x) {
            *a = bf16_bits(v);
        }
        let mut c = [0f32; amx::MR * amx::NC];
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: Packed::Amx is only built when `amx::usable` configured and ran the tile
            // unit on this CPU; `a` holds MR rows of `k` values and `w` the whole matrix.
            unsafe { amx::configure() };
            for cp in cols.start / amx::NC..cols.end / amx::NC {
                unsafe { amx::tile(a, w, k, cp, &mut c) };
                for r in 0..rows {
                    let at = r * ys + cp * amx::NC - cols.start;
                    let dst = &mut y[at..at + amx::NC];
                    let src = &c[r * amx::NC..(r + 1) * amx::NC];
                    for ((d, v), b) in dst.iter_mut().zip(src).zip(&self.bias[cp * amx::NC..]) {
                        *d = v + b;
                    }
                }
            }
            unsafe { amx::release() };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (w, rows, ys, &mut c);
    }

    /// The VNNI path: quantize the rows (up to [`VNNI_ROWS`]) once, then per group of 16 columns
    /// every MRV-row tile in turn, so the group's weights (`k` bytes per column) are read from
    /// memory once and from L1 for the tiles after the first.
    fn tile_rows_vnni(
        &self,
        w: &[u8],
        ds: &[f32],
        amx: bool,
        x: &[f32],
        y: &mut [f32],
        cols: std::ops::Range<usize>,
    ) {
        let (k, ys) = (self.k, cols.len());
        let kb = k / BLOCK;
        let rows = x.len() / k;
        // Row tiles: MRV rows for `vpdpbusd`, 16 for an AMX A tile.
        let mt = if amx { amx::MI } else { MRV };
        let tiles = rows.div_ceil(mt);
        // Padding rows stay 0 with scale 0: they contribute nothing.
        let mut xq = vec![0i8; tiles * mt * k];
        let mut xd = vec![0f32; tiles * mt * kb];
        // The offset correction (`vpdpbusd` only).
        let mut xc = vec![0i32; if amx { 0 } else { tiles * mt * kb }];
        for r in 0..rows {
            let q = &mut xq[r * k..(r + 1) * k];
            quantize_row(&x[r * k..(r + 1) * k], q, |b, d| xd[r * kb + b] = d);
            if amx {
                continue;
            }
            for (b, qb) in q.chunks_exact(BLOCK).enumerate() {
                xc[r * kb + b] = 128 * qb.iter().map(|&v| v as i32).sum::<i32>();
            }
        }
        #[cfg(target_arch = "x86_64")]
        if amx {
            // SAFETY: `amx` is only set when `amx::usable` ran the tile unit on this CPU.
            unsafe { amx::configure_i8() };
        }
        for cg in cols.start / NV..cols.end / NV {
            let wg = &w[cg * kb * NV * BLOCK..(cg + 1) * kb * NV * BLOCK];
            let dg = &ds[cg * kb * NV..(cg + 1) * kb * NV];
            let bias = &self.bias[cg * NV..(cg + 1) * NV];
            for t in 0..tiles {
                let valid = (rows - t * mt).min(mt);
                let yt = &mut y[t * mt * ys + cg * NV - cols.start..];
                // SAFETY: Packed::Vnni is only built when `use_vnni` saw the features (and with
                // `amx` when the tile unit ran); the slices hold one column group's `kb` blocks,
                // `mt` rows of `k` quants / `kb` scales from row `t * mt` on, 16 biases, and
                // `valid` output rows `ys` apart.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    let (q, d) = (&xq[t * mt * k..], &xd[t * mt * kb..]);
                    let out = Out {
                        y: yt,
                        stride: ys,
                        rows: valid,
                        bias,
                    };
                    if amx {
                        amx::tile_i8(q, d, wg, dg, k, out);
                    } else {
                        vnni::tile(q, d, &xc[t * mt * kb..], wg, dg, k, out);
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (&wg, &dg, &xq, &xc, bias, yt, valid, ys);
            }
        }
        #[cfg(target_arch = "x86_64")]
        if amx {
            // SAFETY: as for configure_i8.
            unsafe { amx::release() };
        }
    }

    /// The AVX2 (or scalar) path on the row-major layout.
    fn tile_rows_avx2(
        &self,
        qs: &[i8],
        ds: &[f32],
        x: &[f32],
        y: &mut [f32],
        cols: std::ops::Range<usize>,
        simd: bool,
    ) {
        let (k, ys) = (self.k, cols.len());
        let kb = k / BLOCK;
        let rows = x.len() / k;
        // Quantized tile, padded with zero rows (scale 0) to MR.
        let mut xq = vec![0i8; MR * k];
        // Scales interleaved per block: [block][row], what the SIMD kernel broadcasts.
        let mut xd = vec![0f32; kb * MR];
        for r in 0..rows {
            quantize_row(
                &x[r * k..(r + 1) * k],
                &mut xq[r * k..(r + 1) * k],
                |b, d| xd[b * MR + r] = d,
            );
        }
        let mut out = [[0f32; MR]; 2];
        let mut j = cols.start;
        while j < cols.end {
            let nr = (cols.end - j).min(2);
            let wq = &qs[j * k..(j + nr) * k];
            let wd = &ds[j * kb..(j + nr) * kb];
            dispatch(simd, nr, &xq, &xd, wq, wd, k, &mut out);
            for (c, o) in out.iter().take(nr).enumerate() {
                for r in 0..rows {
                    y[r * ys + j + c - cols.start] = o[r] + self.bias[j + c];
                }
            }
            j += nr;
        }
    }
}

/// Where a 512-bit kernel writes one tile: `rows` rows of 16 outputs, `stride` apart, each plus
/// the 16 biases (the same single f32 add per output as the other kernels' callers do).
struct Out<'a> {
    y: &'a mut [f32],
    stride: usize,
    rows: usize,
    bias: &'a [f32],
}

impl Out<'_> {
    fn fits(&self, max_rows: usize) -> bool {
        self.bias.len() >= 16
            && (1..=max_rows).contains(&self.rows)
            && self.y.len() >= (self.rows - 1) * self.stride + 16
    }

    /// # Safety
    /// AVX-512F; `self.fits(acc.len())`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(self, acc: &[std::arch::x86_64::__m512]) {
        use std::arch::x86_64::*;
        let b = _mm512_loadu_ps(self.bias.as_ptr());
        for (r, a) in acc.iter().take(self.rows).enumerate() {
            _mm512_storeu_ps(
                self.y.as_mut_ptr().add(r * self.stride),
                _mm512_add_ps(*a, b),
            );
        }
    }
}

/// Runs the 4 x `nr` tile kernel, SIMD or scalar.
#[allow(clippy::too_many_arguments)]
fn dispatch(
    simd: bool,
    nr: usize,
    xq: &[i8],
    xd: &[f32],
    wq: &[i8],
    wd: &[f32],
    k: usize,
    out: &mut [[f32; MR]; 2],
) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when `use_avx2` saw AVX2 and FMA on this CPU; the slices
        // hold MR (x) and `nr` (w) rows of `k` quants and `k / 32` scales, as the kernel reads.
        unsafe {
            if nr == 2 {
                avx2::tile::<2>(xq, xd, wq, wd, k, out);
            } else {
                avx2::tile::<1>(xq, xd, wq, wd, k, out);
            }
        }
        return;
    }
    let _ = simd;
    tile_scalar(nr, xq, xd, wq, wd, k, out);
}

/// Whether the AVX2 kernel may run on this CPU.
fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The last kernel new matrices may use (INT8_KERNEL, set by app.rs; avx2 and vnni are for
/// comparisons). Matrices loaded before a change keep their layout.
static CAP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(Kernel::Amx as u8);

/// Caps the kernels of matrices loaded from now on (and, below [`Kernel::Vnni`], the generator's
/// VNNI dot products).
pub fn cap_kernel(k: Kernel) {
    CAP.store(k as u8, std::sync::atomic::Ordering::Relaxed);
}

fn cap() -> Kernel {
    match CAP.load(std::sync::atomic::Ordering::Relaxed) {
        0 => Kernel::Avx2,
        1 => Kernel::Vnni,
        2 => Kernel::Amx,
        _ => Kernel::AmxBf16,
    }
}

/// Whether the AVX-512 VNNI kernel may run on this CPU (decided at run time: the binary is built
/// for Haswell, and Lambda does not promise AVX-512; where it is there, it is 2x faster).
pub(crate) fn use_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use_avx2()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && cap() >= Kernel::Vnni
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// q8_0-quantizes one row: per 32 values `d = max|x| / 127`, `q = round(x / d)`; reports each
/// block's scale through `scale(block, d)`. Runs [`quantize_row_avx2`] where the CPU has AVX2: the
/// same values, bit for bit (a forward pass quantizes every GEMM input, and the scalar `max` and
/// `round` cost as much as a short sentence's attention).
fn quantize_row(x: &[f32], q: &mut [i8], mut scale: impl FnMut(usize, f32)) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        for (b, (xb, qb)) in x
            .chunks_exact(BLOCK)
            .zip(q.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            // SAFETY: AVX2 is present (checked above); both blocks hold BLOCK values.
            scale(b, unsafe { quantize_block_avx2(xb, qb) });
        }
        return;
    }
    quantize_row_scalar(x, q, scale)
}

/// The reference for [`quantize_row`].
fn quantize_row_scalar(x: &[f32], q: &mut [i8], mut scale: impl FnMut(usize, f32)) {
    for (b, (xb, qb)) in x
        .chunks_exact(BLOCK)
        .zip(q.chunks_exact_mut(BLOCK))
        .enumerate()
    {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (qv, &v) in qb.iter_mut().zip(xb) {
            *qv = (v * id).round_ties_even() as i8;
        }
        scale(b, d);
    }
}

/// One block of [`quantize_row_scalar`]. Returns `d`.
///
/// # Safety
/// The CPU must have AVX2; `x` and `q` hold BLOCK values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block_avx2(x: &[f32], q: &mut [i8]) -> f32 {
    let (amax, _) = quantize_block_by(x, q, |amax| {
        let d = amax / 127.0;
        if d > 0.0 {
            1.0 / d
        } else {
            0.0
        }
    });
    amax / 127.0
}

/// One block the way llama.cpp's AVX2 `quantize_row_q8_1` does it (the generation kernels'
/// activations, [`super::qmatmul::QActs`]): `x * (127 / max|x|)` rounded to nearest even.
/// Returns `(max|x|, Σq)`.
///
/// # Safety
/// The CPU must have AVX2; `x` and `q` hold BLOCK values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_block_q8_1_avx2(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    let (amax, sums) = quantize_block_by(x, q, |amax| if amax > 0.0 { 127.0 / amax } else { 0.0 });
    let s = _mm_add_epi32(
        _mm256_castsi256_si128(sums),
        _mm256_extracti128_si256(sums, 1),
    );
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    (amax, _mm_cvtsi128_si32(s))
}

/// A block of 32 in four 8-lane registers: `max|x|` by `vmaxps` on the values with their sign
/// cleared, `x * inv(max|x|)` rounded to nearest even by `vcvtps2dq` (the default rounding
/// mode), packed to i8 with saturation (|q| <= 127, so it never saturates). Returns `max|x|` and
/// the quants' sums in 8 i32 lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn quantize_block_by(
    x: &[f32],
    q: &mut [i8],
    inv: impl FnOnce(f32) -> f32,
) -> (f32, std::arch::x86_64::__m256i) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() >= BLOCK && q.len() >= BLOCK);
    let p = x.as_ptr();
    let v = [
        _mm256_loadu_ps(p),
        _mm256_loadu_ps(p.add(8)),
        _mm256_loadu_ps(p.add(16)),
        _mm256_loadu_ps(p.add(24)),
    ];
    let sign = _mm256_set1_ps(-0.0);
    let m = _mm256_max_ps(
        _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
        _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])),
    );
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    let amax = _mm_cvtss_f32(m);
    let id = _mm256_set1_ps(inv(amax));
    let i = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, id)));
    // packs interleave 128-bit lanes: [0a 1a 0b 1b] then [lo hi] per lane; the permute puts the
    // 32 bytes back in order.
    let w01 = _mm256_packs_epi32(i[0], i[1]);
    let w23 = _mm256_packs_epi32(i[2], i[3]);
    let b = _mm256_packs_epi16(w01, w23);
    let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, b);
    let sums = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    (amax, sums)
}

/// f32 -> bf16 bits, rounded to nearest even (activations and weights are finite).
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let u = v.to_bits();
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// Portable reference of the tile kernel: `out[c][r] = Σ_blocks (Σ xq·wq) · d_x · d_w`.
fn tile_scalar(
    nr: usize,
    xq: &[i8],
    xd: &[f32],
    wq: &[i8],
    wd: &[f32],
    k: usize,
    out: &mut [[f32; MR]; 2],
) {
    let kb = k / BLOCK;
    for (c, o) in out.iter_mut().take(nr).enumerate() {
        for (r, o) in o.iter_mut().enumerate() {
            let mut acc = 0f32;
            for b in 0..kb {
                let xs = &xq[r * k + b * BLOCK..r * k + (b + 1) * BLOCK];
                let ws = &wq[c * k + b * BLOCK..c * k + (b + 1) * BLOCK];
                let dot: i32 = xs.iter().zip(ws).map(|(&a, &w)| a as i32 * w as i32).sum();
                acc += dot as f32 * (xd[b * MR + r] * wd[c * kb + b]);
            }
            *o = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BLOCK, MR};
    use std::arch::x86_64::*;

    /// 4 x rows times `NR` weight rows over `k`, into `out[c][r]`.
    ///
    /// Per 32-value block and weight row: `|w|` once, then per x row `sign(x, w)` so that
    /// `maddubs(|w|, sign(x, w))` (u8 x i8 -> i16 pairs; at most 2 * 127 * 128, no saturation)
    /// gives `w * x`, `madd` with ones widens to i32, and two `hadd`s fold the 4 rows into one
    /// vector whose lane `r` (and `r + 4`) holds row `r`: one convert and one FMA per 4 rows.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA. `xq` holds `MR * k` quants, `xd` `k / 32 * MR` scales,
    /// `wq` `NR * k` quants and `wd` `NR * k / 32` scales; `k` is a multiple of 32.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<const NR: usize>(
        xq: &[i8],
        xd: &[f32],
        wq: &[i8],
        wd: &[f32],
        k: usize,
        out: &mut [[f32; MR]; 2],
    ) {
        let kb = k / BLOCK;
        debug_assert!(xq.len() >= MR * k && xd.len() >= kb * MR);
        debug_assert!(wq.len() >= NR * k && wd.len() >= NR * kb);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); NR];
        let xp = xq.as_ptr();
        let wp = wq.as_ptr();
        for b in 0..kb {
            let o = b * BLOCK;
            // SAFETY (all loads): `o + 32 <= k`, rows are `k` apart, lengths checked above.
            let x0 = _mm256_loadu_si256(xp.add(o) as *const __m256i);
            let x1 = _mm256_loadu_si256(xp.add(k + o) as *const __m256i);
            let x2 = _mm256_loadu_si256(xp.add(2 * k + o) as *const __m256i);
            let x3 = _mm256_loadu_si256(xp.add(3 * k + o) as *const __m256i);
            let dx = _mm256_broadcast_ps(&*(xd.as_ptr().add(b * MR) as *const __m128));
            for (c, a) in acc.iter_mut().enumerate() {
                let w = _mm256_loadu_si256(wp.add(c * k + o) as *const __m256i);
                let aw = _mm256_sign_epi8(w, w);
                let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x0, w)), ones);
                let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x1, w)), ones);
                let p2 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x2, w)), ones);
                let p3 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x3, w)), ones);
                // [p0 lo, p1 lo, p2 lo, p3 lo | p0 hi, p1 hi, p2 hi, p3 hi] (4-lane partial sums).
                let h = _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));
                let s = _mm256_mul_ps(dx, _mm256_set1_ps(*wd.get_unchecked(c * kb + b)));
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), s, *a);
            }
        }
        for (a, o) in acc.iter().zip(out.iter_mut()) {
            let lo = _mm256_castps256_ps128(*a);
            let hi = _mm256_extractf128_ps(*a, 1);
            _mm_storeu_ps(o.as_mut_ptr(), _mm_add_ps(lo, hi));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Out, BLOCK, MRV, NV};
    use std::arch::x86_64::*;

    /// MRV rows times one group of 16 columns over `k`, plus the bias, into `out`.
    ///
    /// Per block: 8 runs of 4 quants; per run one weight load (16 columns x 4 bytes, one zmm)
    /// serves the MRV rows, each adding `u8(w) · i8(x)` over 4 bytes into its 16 column lanes
    /// with one `vpdpbusd` whose activation operand is a broadcast load (i32 accumulation:
    /// exact, no saturation). Then per row: subtract the offset correction, convert, one FMA with
    /// `d_w · d_x`. 512-bit registers do twice the multiply-adds of 256-bit ones per instruction
    /// and halve that per-block epilogue per column; registers: 16 integer accumulators, 8 float
    /// ones, 2 weight runs.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA, AVX-512F/VNNI. `xq` holds `MRV * k` quants, `xd` and `xc`
    /// `MRV * k/32` values (`[row][block]`), `w` `k/32 * 512` quants, `ds` `k/32 * 16` scales;
    /// `out` fits MRV rows.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vnni")]
    pub unsafe fn tile(
        xq: &[i8],
        xd: &[f32],
        xc: &[i32],
        w: &[u8],
        ds: &[f32],
        k: usize,
        out: Out,
    ) {
        let kb = k / BLOCK;
        debug_assert!(xq.len() >= MRV * k && xd.len() >= MRV * kb && xc.len() >= MRV * kb);
        debug_assert!(w.len() >= kb * NV * BLOCK && ds.len() >= kb * NV);
        debug_assert!(out.fits(MRV));
        let mut accf = [_mm512_setzero_ps(); MRV];
        let xp = xq.as_ptr();
        for b in 0..kb {
            // Two accumulator sets (even and odd runs): `vpdpbusd` has a latency of ~5 cycles,
            // so MRV chains alone could leave the units idle.
            let mut acc0 = [_mm512_setzero_si512(); MRV];
            let mut acc1 = [_mm512_setzero_si512(); MRV];
            let wb = w.as_ptr().add(b * NV * BLOCK);
            for g in (0..BLOCK / 4).step_by(2) {
                // SAFETY (all loads): within the lengths checked above.
                let w0 = _mm512_loadu_si512(wb.add(g * NV * 4) as *const _);
                let w1 = _mm512_loadu_si512(wb.add((g + 1) * NV * 4) as *const _);
                for r in 0..MRV {
                    let xr = xp.add(r * k + b * BLOCK + g * 4);
                    let x0 = _mm512_set1_epi32(std::ptr::read_unaligned(xr as *const i32));
                    let x1 = _mm512_set1_epi32(std::ptr::read_unaligned(xr.add(4) as *const i32));
                    acc0[r] = _mm512_dpbusd_epi32(acc0[r], w0, x0);
                    acc1[r] = _mm512_dpbusd_epi32(acc1[r], w1, x1);
                }
            }
            let dw = _mm512_loadu_ps(ds.as_ptr().add(b * NV));
            for r in 0..MRV {
                let i = r * kb + b;
                let dot = _mm512_sub_epi32(
                    _mm512_add_epi32(acc0[r], acc1[r]),
                    _mm512_set1_epi32(*xc.get_unchecked(i)),
                );
                let s = _mm512_mul_ps(dw, _mm512_set1_ps(*xd.get_unchecked(i)));
                accf[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, accf[r]);
            }
        }
        out.store(&accf);
    }
}

/// The AMX tile unit: int8 `tdpbssd` per q8_0 block (the default), or bf16 `tdpbf16ps` on
/// 16 x 16 f32 accumulators (INT8_KERNEL=amx-bf16).
///
/// Tiles are used only inside [`tile`], between [`configure`] and [`release`] on the same
/// thread, so no other code ever sees tile state. Tile registers: 0-3 the 2 x 2 accumulators
/// (32 rows x 32 columns), 4-5 the activation rows, 6-7 the weight columns.
mod amx {
    /// Rows per call (two A tiles).
    pub const MR: usize = 32;
    /// Columns per call (two B tiles).
    pub const NC: usize = 32;
    /// Columns per B tile.
    pub const NT: usize = 16;

    /// Whether AMX (INT8 and BF16) may run: the CPU has it (and AVX-512 VNNI, for the other layers), Linux
    /// granted this
    /// process the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`: without it the first
    /// tile instruction faults), and one tile multiply in a forked child gave the right answer
    /// (a hypervisor that reports AMX but faults on it kills only the child). Decided once.
    pub fn usable() -> bool {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        super::use_vnni() && *OK.get_or_init(probe)
    }

    #[cfg(target_arch = "x86_64")]
    fn probe() -> bool {
        // CPUID.(EAX=7, ECX=0):EDX bit 24 AMX-TILE, bit 22 AMX-BF16, bit 25 AMX-INT8 (std's feature detection of
        // AMX is not stable yet). Whether the OS enables the state is what arch_prctl answers.
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        if edx & (1 << 24) == 0 || edx & (1 << 22) == 0 || edx & (1 << 25) == 0 {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain syscall with integer arguments.
        if unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        } != 0
        {
            tracing::debug!("AMX present but the kernel refused the tile state: int8 VNNI kernel");
            return false;
        }
        // SAFETY: the child runs only the tile multiply and `_exit` (async-signal-safe); the
        // parent only waits for it.
        unsafe {
            match libc::fork() {
                0 => {
                    let ones = [0x3f80u16; 16 * 32];
                    let mut c = [0f32; MR * NC];
                    configure();
                    tile(
                        &[ones, ones].concat(),
                        &[ones, ones].concat(),
                        32,
                        0,
                        &mut c,
                    );
                    release();
                    let bf16_ok = c.iter().all(|&v| v == 32.0);
                    // The int8 tile: 16 rows of 32 twos times 16 columns of 32 threes, scales
                    // 1 and 0.5, bias 1: 32 · 6 · 0.5 + 1 = 97 in each of the 16 x 16 outputs.
                    let mut y = [0f32; MI * 16];
                    configure_i8();
                    tile_i8(
                        &[2i8; MI * 32],
                        &[1.0; MI],
                        &[3u8; 512],
                        &[0.5; 16],
                        32,
                        super::Out {
                            y: &mut y,
                            stride: 16,
                            rows: MI,
                            bias: &[1.0; 16],
                        },
                    );
                    release();
                    let int8_ok = y.iter().all(|&v| v == 97.0);
                    libc::_exit(if bf16_ok && int8_ok { 0 } else { 1 })
                }
                -1 => false,
                child => {
                    let mut status = 0;
                    libc::waitpid(child, &mut status, 0) == child
                        && libc::WIFEXITED(status)
                        && libc::WEXITSTATUS(status) == 0
                }
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn probe() -> bool {
        false
    }

    /// A tile configuration (`ldtilecfg`'s 64-byte operand).
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    /// Palette 1 with tiles `0..shapes.len()` of `(rows, bytes per row)`.
    const fn palette(shapes: &[(u8, u8)]) -> Config {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < shapes.len() {
            c[16 + 2 * t] = shapes[t].1;
            c[48 + t] = shapes[t].0;
            t += 1;
        }
        Config(c)
    }

    /// The bf16 kernel's: all 8 tiles 16 rows x 64 bytes.
    const CONFIG: Config = palette(&[(16, 64); 8]);

    /// Loads `c` on this thread.
    ///
    /// # Safety
    /// [`usable`] must have returned true.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load(c: &Config) {
        std::arch::asm!("ldtilecfg [{0}]", in(reg) c.0.as_ptr(), options(nostack));
    }

    /// Loads the bf16 kernel's tile configuration on this thread.
    ///
    /// # Safety
    /// [`usable`] must have returned true.
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn configure() {
        load(&CONFIG)
    }

    /// Releases the tile state of this thread.
    ///
    /// # Safety
    /// [`usable`] must have returned true.
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn release() {
        std::arch::asm!("tilerelease", options(nostack, nomem));
    }

    /// Rows per int8 A tile.
    pub const MI: usize = 16;

    /// The int8 kernel's palette: tiles 0-1 the i32 results (16 x 16), 2 the activations (16
    /// rows x one 32-byte block), 3 the weights (8 rows of 16 columns x 4 bytes).
    const CONFIG_I8: Config = palette(&[(16, 64), (16, 64), (16, 32), (8, 64)]);

    /// Loads the int8 kernel's tile configuration on this thread.
    ///
    /// # Safety
    /// [`usable`] must have returned true.
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn configure_i8() {
        load(&CONFIG_I8)
    }

    /// 16 rows times one group of 16 columns over `k`, plus the bias, into `out`, on the VNNI
    /// layout (quants not offset): per block one `tdpbssd` (16 x 16 x 32 signed products, i32),
    /// stored, then per row the VNNI kernel's epilogue without its offset correction (convert,
    /// FMA with `d_w · d_x`): the same integers and float operations, so the same bits. The
    /// per-block store and epilogue, not the tile multiply, bound its speed: the tile unit runs
    /// the products of 4 blocks ahead of the epilogue that reads them.
    ///
    /// # Safety
    /// [`configure_i8`] ran on this thread; `xq` holds `16 * k` quants, `xd` `16 * k/32` scales
    /// (`[row][block]`), `w` `k/32 * 512` quants, `ds` `k/32 * 16` scales; `out` fits 16 rows.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub unsafe fn tile_i8(xq: &[i8], xd: &[f32], w: &[u8], ds: &[f32], k: usize, out: super::Out) {
        use std::arch::x86_64::*;
        let kb = k / super::BLOCK;
        debug_assert!(xq.len() >= MI * k && xd.len() >= MI * kb);
        debug_assert!(w.len() >= kb * 512 && ds.len() >= kb * 16);
        debug_assert!(out.fits(MI));
        // Results of CH blocks, twice: the tile unit fills one half while the epilogue reads
        // the other, so neither waits on the other's latency.
        const CH: usize = 4;
        #[repr(C, align(64))]
        struct Buf([[[i32; 16]; MI]; 2 * CH]);
        let mut buf = std::mem::MaybeUninit::<Buf>::uninit();
        let bp = buf.as_mut_ptr() as *mut [[i32; 16]; MI];
        let issue = |chunk: usize| {
            for b in chunk * CH..((chunk + 1) * CH).min(kb) {
                let c = bp.add((chunk % 2) * CH + b % CH);
                std::arch::asm!(
                    "tileloadd tmm2, [{a} + {sa}*1]",
                    "tileloadd tmm3, [{w} + {sw}*1]",
                    "tilezero tmm0",
                    "tdpbssd tmm0, tmm2, tmm3",
                    "tilestored [{c} + {sw}*1], tmm0",
                    a = in(reg) xq.as_ptr().add(b * super::BLOCK),
                    sa = in(reg) k,
                    w = in(reg) w.as_ptr().add(b * 512),
                    sw = in(reg) 64usize,
                    c = in(reg) c,
                    options(nostack)
                );
            }
        };
        let mut accf = [_mm512_setzero_ps(); MI];
        let chunks = kb.div_ceil(CH);
        issue(0);
        for chunk in 0..chunks {
            if chunk + 1 < chunks {
                issue(chunk + 1);
            }
            for b in chunk * CH..((chunk + 1) * CH).min(kb) {
                let c = &*bp.add((chunk % 2) * CH + b % CH);
                let dw = _mm512_loadu_ps(ds.as_ptr().add(b * 16));
                for (r, acc) in accf.iter_mut().enumerate() {
                    let i = r * kb + b;
                    let dot = _mm512_load_si512(c[r].as_ptr() as *const _);
                    let s = _mm512_mul_ps(dw, _mm512_set1_ps(*xd.get_unchecked(i)));
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, *acc);
                }
            }
        }
        out.store(&accf);
    }

    /// `c[32][32] = a[32 rows][k] · W[cp * 32 .. cp * 32 + 32 columns]^T`, f32.
    ///
    /// # Safety
    /// [`configure`] ran on this thread; `a` holds `32 * k` bf16 values (row-major), `w` at least
    /// `(cp + 1) * 32 * k` in the [`super::Packed::Amx`] layout; `k` is a multiple of 32.
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn tile(a: &[u16], w: &[u16], k: usize, cp: usize, c: &mut [f32; MR * NC]) {
        let kb = k / super::BLOCK;
        debug_assert!(a.len() >= MR * k && w.len() >= (cp + 1) * NC * k);
        let a_stride = 2 * k;
        let a0 = a.as_ptr();
        let a1 = a0.add(16 * k);
        // One B tile (16 columns x 32 values) is 512 bf16.
        let w0 = w.as_ptr().add(2 * cp * kb * 512);
        let w1 = w0.add(kb * 512);
        std::arch::asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for b in 0..kb {
            std::arch::asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm6, [{w0} + {sw}*1]",
                "tileloadd tmm7, [{w1} + {sw}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0.add(b * 32),
                a1 = in(reg) a1.add(b * 32),
                w0 = in(reg) w0.add(b * 512),
                w1 = in(reg) w1.add(b * 512),
                sa = in(reg) a_stride,
                sw = in(reg) 64usize,
                options(nostack, readonly)
            );
        }
        let cp0 = c.as_mut_ptr();
        std::arch::asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) cp0,
            c1 = in(reg) cp0.add(16),
            c2 = in(reg) cp0.add(16 * NC),
            c3 = in(reg) cp0.add(16 * NC + 16),
            s = in(reg) 4 * NC,
            options(nostack)
        );
    }
}

/// `x [m, k] -> x W^T + b [m, n]` as a candle op on contiguous f32 input.
impl CustomOp1 for Q8Linear {
    fn name(&self) -> &'static str {
        "q8_0-int8-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::ops::contiguous_f32(storage, layout, self.name())?;
        let dims = layout.shape().dims();
        if dims.last() != Some(&self.k) {
            candle_core::bail!("int8 linear: input {dims:?}, weight in-dim {}", self.k)
        }
        let mut out = dims.to_vec();
        *out.last_mut().expect("non-empty dims") = self.n;
        Ok((CpuStorage::F32(self.forward_slice(x)), Shape::from(out)))
    }
}

/// Single-threaded reference: the scalar kernel over every tile (`w` in the row layout).
#[cfg(test)]
fn gemm_scalar(w: &Q8Linear, x: &[f32]) -> Vec<f32> {
    assert!(matches!(w.packed, Packed::Rows { .. }));
    let m = x.len() / w.k;
    let mut y = vec![0f32; m * w.n];
    for (y, x) in y.chunks_mut(MR * w.n).zip(x.chunks(MR * w.k)) {
        w.tile_rows(x, y, 0..w.n, false);
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift: deterministic data without a dev-dependency.
    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    /// Random q8_0 bytes `[n, k]` and their dequantized f32 values.
    fn q8_matrix(n: usize, k: usize, r: &mut impl FnMut() -> f32) -> (Vec<u8>, Vec<f32>) {
        let mut raw = Vec::new();
        let mut deq = Vec::new();
        for _ in 0..n * k / BLOCK {
            let d = 0.001 + 0.01 * r().abs();
            let dh = half::f16::from_f32(d);
            raw.extend_from_slice(&dh.to_le_bytes());
            for _ in 0..BLOCK {
                let q = (r() * 127.0).round() as i8;
                raw.push(q as u8);
                deq.push(q as f32 * dh.to_f32());
            }
        }
        (raw, deq)
    }

    #[test]
    fn quantize_row_simd_equals_scalar() {
        let mut r = rng(0x51ed_270b_a0f3_c4d1);
        for k in [32usize, 64, 384, 1536] {
            for scale in [0.0f32, 1e-6, 1.0, 37.5] {
                let mut x: Vec<f32> = (0..k).map(|_| r() * scale).collect();
                // Exact halves after scaling, where round-to-even and round-half-away differ.
                if scale == 1.0 {
                    x[0] = 1.0;
                    x[1] = 0.5 / 127.0;
                    x[2] = -2.5 / 127.0;
                }
                let (mut qa, mut qb) = (vec![0i8; k], vec![0i8; k]);
                let (mut da, mut db) = (vec![0f32; k / BLOCK], vec![0f32; k / BLOCK]);
                quantize_row(&x, &mut qa, |b, d| da[b] = d);
                quantize_row_scalar(&x, &mut qb, |b, d| db[b] = d);
                assert_eq!(qa, qb, "k{k} scale {scale}");
                assert_eq!(da, db, "k{k} scale {scale}");
            }
        }
    }

    #[test]
    fn int8_gemm_matches_f32_reference_and_scalar() {
        let mut r = rng(0x9e3779b97f4a7c15);
        let cases = [
            (1, 7, 64),
            (3, 33, 384),
            (13, 5, 96),
            (37, 131, 1536),
            (5, 24, 64),
            (37, 136, 1536),
            (70, 64, 96),
            (1, 32, 32),
            (33, 160, 384),
            (131, 48, 64),
            (37, 144, 1536),
        ];
        let kernels = [Kernel::Avx2, Kernel::Vnni, Kernel::Amx, Kernel::AmxBf16];
        for (&(m, n, k), best) in cases.iter().flat_map(|c| kernels.map(|kn| (c, kn))) {
            let (raw, wf) = q8_matrix(n, k, &mut r);
            let bias: Vec<f32> = (0..n).map(|_| r()).collect();
            let x: Vec<f32> = (0..m * k).map(|_| r() * 3.0).collect();
            let lin = Q8Linear::from_q8_0_with(&raw, n, k, bias.clone(), best).unwrap();
            let expected = match best {
                Kernel::AmxBf16 if amx::usable() && n % amx::NC == 0 => "amx-bf16",
                Kernel::Amx | Kernel::AmxBf16 if amx::usable() && n % NV == 0 => "amx-int8",
                _ if best >= Kernel::Vnni && use_vnni() && n % NV == 0 => "avx512-vnni",
                _ if use_avx2() => "avx2",
                _ => "scalar",
            };
            assert_eq!(lin.kernel_name(), expected, "m{m} n{n} k{k} {best:?}");
            let y = lin.forward_slice(&x);
            let rows = Q8Linear::from_q8_0_with(&raw, n, k, bias.clone(), Kernel::Avx2).unwrap();
            let ys = gemm_scalar(&rows, &x);
            assert_eq!(y.len(), m * n);
            let (mut err2, mut ref2) = (0f64, 0f64);
            for i in 0..m {
                let xi = &x[i * k..(i + 1) * k];
                for j in 0..n {
                    let wj = &wf[j * k..(j + 1) * k];
                    let exact: f64 = xi.iter().zip(wj).map(|(a, b)| *a as f64 * *b as f64).sum();
                    // Activation quantization: per element |e| <= d_x / 2 = max|x_b| / 254, so
                    // by Cauchy-Schwarz |Σ e·w| <= sqrt(32) / 254 · |x|·|w|.
                    let nx: f64 = xi.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
                    let nw: f64 = wj.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
                    let got = (y[i * n + j] - bias[j]) as f64;
                    assert!(
                        (got - exact).abs() <= nx * nw * 32f64.sqrt() / 254.0 + 1e-4,
                        "m{m} n{n} k{k} [{i},{j}]: {got} vs {exact}"
                    );
                    err2 += (got - exact).powi(2);
                    ref2 += exact.powi(2);
                    // The int8 kernels sum the same quantized products as the scalar reference.
                    let sc = ys[i * n + j];
                    let tol = 1e-5 * (1.0 + (nx * nw) as f32);
                    assert!(
                        expected == "amx-bf16" || (y[i * n + j] - sc).abs() <= tol,
                        "simd {} vs scalar {sc}",
                        y[i * n + j]
                    );
                }
            }
            let rel = (err2 / ref2).sqrt();
            assert!(rel < 1e-2, "m{m} n{n} k{k}: relative error {rel}");
            if expected == "amx-int8" {
                // The tile unit sums the same integers and runs the same float epilogue.
                let v = Q8Linear::from_q8_0_with(&raw, n, k, bias.clone(), Kernel::Vnni).unwrap();
                let yv = v.forward_slice(&x);
                let same = y.iter().zip(&yv).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "m{m} n{n} k{k}: amx-int8 differs from avx512-vnni");
            }
        }
    }
}
