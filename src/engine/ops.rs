//! CPU kernels candle lacks in the shape an encoder needs, as candle `CustomOp1`s.
//!
//! - [`Attention`]: fused self-attention over a packed `[b*s, 3*h]` q|k|v projection. candle's
//!   batched matmul runs one gemm per (sequence, head) and dispatches each to the thread pool;
//!   with sentence-length sequences (s ~ 20, head dim 32) that is thousands of tiny dispatches per
//!   request, which cost more than the arithmetic. Here each (sequence, head) is one task of plain
//!   loops, and padded key positions are skipped instead of masked.
//! - [`GeluErf`]: exact-form GELU with a polynomial erf the compiler vectorizes (candle's goes
//!   through scalar libm `erff`, ~15% of a BERT forward pass).
//!
//! Pure arithmetic on f32 slices: no I/O, no knowledge of models or requests.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
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

/// Self-attention of one encoder layer.
///
/// Input: `[b * s, 3 * heads * head_dim]`, row `i*s + t` holding token `t` of sequence `i` as
/// `q | k | v`, each `[heads, head_dim]` (the fused qkv projection's output, no transposes).
/// Output: `[b * s, heads * head_dim]`, the per-head contexts side by side (what the output
/// projection expects). Rows of padded positions (`t >= lens[i]`) are zero.
pub struct Attention {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Real (unpadded) length of each sequence.
    pub lens: Vec<usize>,
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, s, nh, d) = (self.batch, self.seq, self.heads, self.head_dim);
        let h = nh * d;
        let qkv = contiguous_f32(storage, layout, self.name())?;
        if qkv.len() != b * s * 3 * h || self.lens.len() != b {
            candle_core::bail!("fused-attention: input does not match [b*s, 3h]")
        }
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; b * s * h];
        // One task per sequence: its rows of `out` are disjoint from every other task's.
        out.par_chunks_mut(s * h)
            .enumerate()
            .for_each(|(i, out_seq)| {
                let len = self.lens[i];
                let row = |t: usize| &qkv[(i * s + t) * 3 * h..(i * s + t + 1) * 3 * h];
                let mut scores = vec![0f32; len];
                for head in 0..nh {
                    let (qo, ko, vo) = (head * d, h + head * d, 2 * h + head * d);
                    for t in 0..len {
                        let q = &row(t)[qo..qo + d];
                        let mut max = f32::NEG_INFINITY;
                        for (j, sc) in scores.iter_mut().enumerate() {
                            let k = &row(j)[ko..ko + d];
                            let dot: f32 = q.iter().zip(k).map(|(a, b)| a * b).sum();
                            *sc = dot * scale;
                            max = max.max(*sc);
                        }
                        let mut sum = 0f32;
                        for sc in scores.iter_mut() {
                            *sc = (*sc - max).exp();
                            sum += *sc;
                        }
                        let inv = 1.0 / sum;
                        let o = &mut out_seq[t * h + head * d..t * h + head * d + d];
                        for (j, p) in scores.iter().enumerate() {
                            let v = &row(j)[vo..vo + d];
                            let w = p * inv;
                            for (oo, vv) in o.iter_mut().zip(v) {
                                *oo += w * vv;
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b * s, h))))
    }
}

/// GELU, `x * (1 + erf(x / sqrt 2)) / 2`, the form BERT was trained with.
pub struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf-fast"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout, self.name())?;
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(16 * 1024)
            .zip(src.par_chunks(16 * 1024))
            .for_each(|(o, x)| {
                for (o, &x) in o.iter_mut().zip(x) {
                    *o = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
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

    /// The fused op against the same attention written with candle's ops and an additive mask.
    #[test]
    fn fused_attention_equals_masked_reference() {
        let (b, s, nh, d) = (3, 5, 2, 4);
        let h = nh * d;
        let lens = vec![5, 2, 3];
        let dev = Device::Cpu;
        let qkv = Tensor::randn(0f32, 1.0, (b * s, 3 * h), &dev).unwrap();
        let fused = qkv
            .apply_op1_no_bwd(&Attention {
                batch: b,
                seq: s,
                heads: nh,
                head_dim: d,
                lens: lens.clone(),
            })
            .unwrap();

        let x = qkv.reshape((b, s, 3, nh, d)).unwrap();
        let part = |i| {
            x.narrow(2, i, 1)
                .unwrap()
                .squeeze(2)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (part(0), part(1), part(2));
        let mut mask = vec![0f32; b * s];
        for (i, &l) in lens.iter().enumerate() {
            for t in l..s {
                mask[i * s + t] = -1e30;
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, 1, s), &dev).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt())
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let p = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let reference = p
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b * s, h))
            .unwrap();
        let f = fused.to_vec2::<f32>().unwrap();
        let r = reference.to_vec2::<f32>().unwrap();
        for (i, &l) in lens.iter().enumerate() {
            for t in 0..s {
                for c in 0..h {
                    let got = f[i * s + t][c];
                    if t < l {
                        assert!((got - r[i * s + t][c]).abs() < 1e-5, "seq {i} tok {t}");
                    } else {
                        assert_eq!(got, 0.0, "padded rows stay zero");
                    }
                }
            }
        }
    }
}
