//! CPU kernels candle lacks in the shape an encoder needs, as candle custom ops.
//!
//! - [`Attention`]: fused self-attention over a packed `[b*s, 3*h]` q|k|v projection. candle's
//!   batched matmul runs one gemm per (sequence, head) and dispatches each to the thread pool;
//!   with sentence-length sequences (s ~ 20, head dim 32) that is thousands of tiny dispatches per
//!   request, which cost more than the arithmetic. Here each (sequence, head) is one task of plain
//!   loops, and padded key positions are skipped instead of masked.
//! - [`AddLayerNorm`]: the residual add and the LayerNorm after it in one parallel pass.
//! - [`GeluErf`]: exact-form GELU with a polynomial erf the compiler vectorizes (candle's goes
//!   through scalar libm `erff`, ~15% of a BERT forward pass), in place.
//!
//! Pure arithmetic on f32 slices: no I/O, no knowledge of models or requests.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, InplaceOp1, Layout, Result, Shape};
use rayon::prelude::*;

/// The f32 values a custom op reads: contiguous storage only (every caller makes its input
/// contiguous; a strided view would need a copy the op should not hide).
pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op} expects f32")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op} expects a contiguous input")
    };
    Ok(&data[start..end])
}

/// Self-attention of one encoder layer over packed sequences (no padding anywhere).
///
/// Input: `[Σ lens, 3 * heads * head_dim]`, the sequences' tokens one after another (sequence
/// `i` starts at row `Σ lens[..i]`), each row `q | k | v`, each `[heads, head_dim]` (the fused
/// qkv projection's output, no transposes). Output: `[Σ lens, heads * head_dim]`, the per-head
/// contexts side by side (what the output projection expects). A token attends only to the
/// tokens of its own sequence: what HF's additive padding mask achieves, without the pads.
pub struct Attention {
    pub heads: usize,
    pub head_dim: usize,
    /// Length of each packed sequence.
    pub lens: Vec<usize>,
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (nh, d) = (self.heads, self.head_dim);
        let h = nh * d;
        let rows: usize = self.lens.iter().sum();
        let qkv = contiguous_f32(storage, layout, self.name())?;
        if qkv.len() != rows * 3 * h {
            candle_core::bail!("fused-attention: input does not match [Σ lens, 3h]")
        }
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; rows * h];
        // One task per sequence: its rows of `out` are disjoint from every other task's.
        let mut tasks = Vec::with_capacity(self.lens.len());
        let (mut rest, mut start) = (out.as_mut_slice(), 0);
        for &len in &self.lens {
            let (mine, tail) = rest.split_at_mut(len * h);
            tasks.push((start, len, mine));
            rest = tail;
            start += len;
        }
        tasks.into_par_iter().for_each(|(start, len, out_seq)| {
            let row = |t: usize| &qkv[(start + t) * 3 * h..(start + t + 1) * 3 * h];
            // Per head, K and V gathered into contiguous `[len, d]` blocks: the score and
            // context loops then stream through memory instead of striding over q|k|v rows.
            let (mut k, mut v) = (vec![0f32; len * d], vec![0f32; len * d]);
            let mut q = vec![0f32; d];
            let mut scores = vec![0f32; len];
            for head in 0..nh {
                let (qo, ko, vo) = (head * d, h + head * d, 2 * h + head * d);
                for j in 0..len {
                    k[j * d..(j + 1) * d].copy_from_slice(&row(j)[ko..ko + d]);
                    v[j * d..(j + 1) * d].copy_from_slice(&row(j)[vo..vo + d]);
                }
                for t in 0..len {
                    for (qq, &x) in q.iter_mut().zip(&row(t)[qo..qo + d]) {
                        *qq = x * scale;
                    }
                    for (sc, kj) in scores.iter_mut().zip(k.chunks_exact(d)) {
                        *sc = dot(&q, kj);
                    }
                    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                    for sc in scores.iter_mut() {
                        *sc = exp_nonpositive(*sc - max);
                    }
                    let inv = 1.0 / sum(&scores);
                    let o = &mut out_seq[t * h + head * d..t * h + head * d + d];
                    for (&p, vj) in scores.iter().zip(v.chunks_exact(d)) {
                        let w = p * inv;
                        for (oo, &vv) in o.iter_mut().zip(vj) {
                            *oo = w.mul_add(vv, *oo);
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((rows, h))))
    }
}

/// `Σ a·b` in 8 independent lanes (see [`sum`]); also the norms' sum of squares.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut acc = [0f32; 8];
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ a` in 8 independent lanes: the compiler keeps f32 sums in order, so a plain iterator sum
/// stays scalar; lanes make it one vector add per 8 values.
#[inline(always)]
pub(crate) fn sum(a: &[f32]) -> f32 {
    let c = a.chunks_exact(8);
    let tail: f32 = c.remainder().iter().sum();
    let mut acc = [0f32; 8];
    for x in c {
        for l in 0..8 {
            acc[l] += x[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `e^x` for `x <= 0` (softmax after subtracting the maximum), relative error below 1e-6, no
/// libm call, so a loop over it vectorizes: `2^n · e^r` with `n` the nearest integer to
/// `x·log2 e`, `r = x - n·ln 2` (ln 2 split in two so `n·ln 2` is exact in f32, as Cody and
/// Waite do) and `e^r`, `|r| <= ln 2 / 2`, from its degree-6 Taylor polynomial (last term
/// 1.2e-7). Below -87 it answers e^-87 (the exponent stays a normal f32's), nothing beside the
/// maximum's weight of 1.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer (ties even).
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375: 9 significant bits, so n · LN2_HI is exact.
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = 1.388_888_9e-3_f32;
    p = p.mul_add(r, 8.333_333e-3);
    p = p.mul_add(r, 4.166_666_8e-2);
    p = p.mul_add(r, 0.166_666_67);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    f32::from_bits(((n as i32 + 127) << 23) as u32) * p
}

/// `LayerNorm(a + b)` over the last dimension, in one pass over memory: BERT's residual
/// connection and the norm after it (and the embeddings' sum and norm), which as separate candle
/// ops cost a single-threaded add, a fresh tensor and a second read.
pub struct AddLayerNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f32,
}

impl CustomOp2 for AddLayerNorm {
    fn name(&self) -> &'static str {
        "add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = contiguous_f32(s1, l1, self.name())?;
        let b = contiguous_f32(s2, l2, self.name())?;
        let h = self.weight.len();
        if a.len() != b.len() || h == 0 || !a.len().is_multiple_of(h) || self.bias.len() != h {
            candle_core::bail!("add-layer-norm: inputs do not match [rows, {h}]")
        }
        let mut out = vec![0f32; a.len()];
        out.par_chunks_mut(NORM_ROWS * h)
            .zip(a.par_chunks(NORM_ROWS * h).zip(b.par_chunks(NORM_ROWS * h)))
            .for_each(|(o, (a, b))| {
                for (o, (a, b)) in o
                    .chunks_exact_mut(h)
                    .zip(a.chunks_exact(h).zip(b.chunks_exact(h)))
                {
                    for (o, (a, b)) in o.iter_mut().zip(a.iter().zip(b)) {
                        *o = a + b;
                    }
                    let mean = sum(o) / h as f32;
                    for v in o.iter_mut() {
                        *v -= mean;
                    }
                    let var = dot(o, o) / h as f32;
                    let r = 1.0 / (var + self.eps).sqrt();
                    for ((v, w), bb) in o.iter_mut().zip(&self.weight).zip(&self.bias) {
                        *v = (*v * r).mul_add(*w, *bb);
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Values per GELU task: a 32-row batch of a 1536-wide layer is about 12 of them, and a short
/// input's few rows stay on one thread, where a split costs more than it saves.
pub const GELU_CHUNK: usize = 64 * 1024;

/// Rows per layer-norm task (as [`GELU_CHUNK`]).
pub const NORM_ROWS: usize = 32;

/// GELU, `x * (1 + erf(x / sqrt 2)) / 2`, the form BERT was trained with.
pub struct GeluErf;

/// In place on the up-projection's fresh output: no second `[tokens, intermediate]` buffer to
/// allocate, zero and write (the memsets were 6% of a 'mixed' batch's profile).
impl InplaceOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf-fast"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("{} expects f32", InplaceOp1::name(self))
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{} expects a contiguous input", InplaceOp1::name(self))
        };
        data[start..end].par_chunks_mut(GELU_CHUNK).for_each(|x| {
            for x in x.iter_mut() {
                *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
            }
        });
        Ok(())
    }
}

/// erf as a rational function of x (Eigen's `generic_fast_erf_float`, the one TensorFlow uses):
/// max error a few ulp on [-4, 4], exactly +-1 beyond at f32 precision. No branches or libm
/// calls, so a loop over it vectorizes.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p.mul_add(x2, 2.770_681_4e-8);
    p = p.mul_add(x2, -2.101_024e-6);
    p = p.mul_add(x2, -5.692_506_4e-5);
    p = p.mul_add(x2, -7.349_906e-4);
    p = p.mul_add(x2, -2.954_600_2e-3);
    p = p.mul_add(x2, -1.609_603_3e-2);
    p *= x;
    let mut q = -1.456_607_2e-5_f32;
    q = q.mul_add(x2, -2.133_740_6e-4);
    q = q.mul_add(x2, -1.682_827e-3);
    q = q.mul_add(x2, -7.373_329_3e-3);
    q = q.mul_add(x2, -1.426_474e-2);
    p / q
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn erf_matches_libm_closely() {
        let mut worst = 0f64;
        for i in -3_000..=3_000 {
            let x = i as f32 / 1000.0;
            let e = (erf(x) as f64 - libm_erf(x as f64)).abs();
            worst = worst.max(e);
        }
        assert!(worst < 1e-6, "max abs error {worst}");
        // Beyond 3, erf is within erfc(3) = 2.2e-5 of +-1 (and odd).
        for i in 3_001..=8_000 {
            let y = erf(i as f32 / 1000.0);
            assert!(
                (1.0 - y as f64).abs() <= 2.21e-5,
                "x = {}",
                i as f32 / 1000.0
            );
            assert_eq!(erf(-(i as f32) / 1000.0), -y, "odd");
        }
    }

    #[test]
    fn exp_nonpositive_matches_libm() {
        let mut worst = 0f64;
        for i in 0..=90_000 {
            let x = -(i as f32) / 1000.0;
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            if x >= -87.0 {
                worst = worst.max((got - want).abs() / want);
            } else {
                assert!(got <= 1.7e-38, "x = {x}: {got}");
            }
        }
        assert!(worst < 1e-6, "max relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1e30) <= 1.7e-38);
    }

    #[test]
    fn lane_sums_match_sequential_sums_on_odd_lengths() {
        for len in [0, 1, 7, 8, 9, 31, 32, 33, 100] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let d: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let s: f64 = a.iter().map(|x| *x as f64).sum();
            assert!((dot(&a, &b) as f64 - d).abs() < 1e-5, "dot len {len}");
            assert!((sum(&a) as f64 - s).abs() < 1e-5, "sum len {len}");
        }
    }

    /// The fused op against candle's add and layer norm, on a row count that is not a multiple
    /// of the op's chunk.
    #[test]
    fn add_layer_norm_equals_candle() {
        let (rows, h) = (37, 24);
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 2.0, (rows, h), &dev).unwrap();
        let b = Tensor::randn(1f32, 1.0, (rows, h), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, h, &dev).unwrap();
        let bias = Tensor::randn(0f32, 0.1, h, &dev).unwrap();
        let op = AddLayerNorm {
            weight: w.to_vec1().unwrap(),
            bias: bias.to_vec1().unwrap(),
            eps: 1e-12,
        };
        let got = a
            .apply_op2_no_bwd(&b, &op)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let want = candle_nn::ops::layer_norm(&(a + b).unwrap(), &w, &bias, 1e-12)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-4, "{g} vs {w}");
        }
    }

    /// erf via its series / continued fraction in f64, as an independent reference.
    fn libm_erf(x: f64) -> f64 {
        // Abramowitz-Stegun 7.1.5 series: exact to ~1e-12 in f64 for |x| <= 3.
        let mut sum = 0.0;
        let mut term = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 || n < 5.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 400.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    /// The fused op on packed sequences against each sequence's attention written with
    /// candle's ops, one sequence at a time.
    #[test]
    fn fused_attention_equals_per_sequence_reference() {
        let (nh, d) = (2, 4);
        let h = nh * d;
        let lens = vec![5, 2, 3, 1];
        let rows: usize = lens.iter().sum();
        let dev = Device::Cpu;
        let qkv = Tensor::randn(0f32, 1.0, (rows, 3 * h), &dev).unwrap();
        let fused = qkv
            .apply_op1_no_bwd(&Attention {
                heads: nh,
                head_dim: d,
                lens: lens.clone(),
            })
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mut start = 0;
        for &s in &lens {
            let x = qkv
                .narrow(0, start, s)
                .unwrap()
                .reshape((s, 3, nh, d))
                .unwrap();
            let part = |i| {
                x.narrow(1, i, 1)
                    .unwrap()
                    .squeeze(1)
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let (q, k, v) = (part(0), part(1), part(2));
            let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
            let p = candle_nn::ops::softmax_last_dim(&scores).unwrap();
            let reference = p
                .matmul(&v)
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .reshape((s, h))
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for t in 0..s {
                for c in 0..h {
                    let got = fused[start + t][c];
                    assert!(
                        (got - reference[t][c]).abs() < 1e-5,
                        "row {} col {c}",
                        start + t
                    );
                }
            }
            start += s;
        }
    }
}
