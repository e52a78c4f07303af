//! What a request costs on this execution environment, measured on the requests it has served:
//! time per prompt token (prefill), per generated token (decode) and per embedded token.
//!
//! Used to decide before starting whether work can finish in the time left (SQS jobs must not
//! start what the invocation deadline would cut off, and the first prefill chunk must not start
//! past the deadline). Estimates only: a moving average that follows the latest requests (a warm
//! environment is faster than a cold one). Must not hold locks or allocate on the hot path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// One figure: nanoseconds per unit, 0 until the first measurement.
#[derive(Debug, Default)]
struct Rate(AtomicU64);

impl Rate {
    fn get(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    /// Folds in one measurement of `units` taking `took`: half the old figure, half the new one,
    /// so one slow outlier (a cold cache) is forgotten within a few requests. Measurements over
    /// very few units (timer noise dominates) are ignored.
    fn observe(&self, took: Duration, units: usize) {
        if units < 4 {
            return;
        }
        let ns = (took.as_nanos() / units as u128).clamp(1, u64::MAX as u128) as u64;
        let old = self.0.load(Ordering::Relaxed);
        let new = if old == 0 { ns } else { old / 2 + ns / 2 };
        self.0.store(new.max(1), Ordering::Relaxed);
    }
}

/// Measured rates of this environment's engine.
#[derive(Debug, Default)]
pub struct CostModel {
    prefill: Rate,
    decode: Rate,
    embed: Rate,
}

/// Estimates are inflated by this factor before deciding that work fits: a job that would end a
/// little past the deadline is lost work, one started a little later is not.
pub const SAFETY: f64 = 1.25;

impl CostModel {
    pub fn observe_prefill(&self, took: Duration, tokens: usize) {
        self.prefill.observe(took, tokens);
    }

    pub fn observe_decode(&self, took: Duration, tokens: usize) {
        self.decode.observe(took, tokens);
    }

    pub fn observe_embed(&self, took: Duration, tokens: usize) {
        self.embed.observe(took, tokens);
    }

    /// Time per prompt token, if measured.
    pub fn prefill_per_token(&self) -> Option<Duration> {
        self.prefill.get()
    }

    /// Worst-case time of a generation (`prompt` tokens, up to `max_new` generated), with the
    /// safety factor; `None` before anything was measured. Decode falls back to the prefill rate
    /// x 8 (one token through the whole model, without the batch's reuse of each weight).
    pub fn generation(&self, prompt: usize, max_new: usize) -> Option<Duration> {
        let p = self.prefill.get()?;
        let d = self.decode.get().unwrap_or(p * 8);
        Some((p * prompt as u32 + d * max_new as u32).mul_f64(SAFETY))
    }

    /// Time of embedding `tokens` tokens, with the safety factor; `None` before anything was
    /// measured.
    pub fn embeddings(&self, tokens: usize) -> Option<Duration> {
        Some((self.embed.get()? * tokens as u32).mul_f64(SAFETY))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_follow_measurements_and_scale_estimates() {
        let c = CostModel::default();
        assert_eq!(c.generation(10, 10), None);
        assert_eq!(c.embeddings(10), None);
        c.observe_prefill(Duration::from_millis(100), 100); // 1 ms / token
        c.observe_decode(Duration::from_millis(200), 20); // 10 ms / token
        c.observe_embed(Duration::from_millis(50), 100); // 0.5 ms / token
        assert_eq!(c.prefill_per_token(), Some(Duration::from_millis(1)));
        // (100 x 1 ms + 10 x 10 ms) x 1.25
        assert_eq!(c.generation(100, 10), Some(Duration::from_millis(250)));
        assert_eq!(c.embeddings(200), Some(Duration::from_millis(125)));
        // A slower run moves the figure halfway.
        c.observe_prefill(Duration::from_millis(300), 100);
        assert_eq!(c.prefill_per_token(), Some(Duration::from_millis(2)));
        // Too few units to mean anything: ignored.
        c.observe_prefill(Duration::from_secs(1), 1);
        assert_eq!(c.prefill_per_token(), Some(Duration::from_millis(2)));
    }
}
