//! The compute pool's size: THREADS if set, else the vCPU share Lambda gives the function's memory,
//! capped by the cgroup CPU quota and the CPUs this process can see. Reads the cgroup files under
//! /sys, which is why it is not part of `config` (configuration is the environment only).
//!
//! Must not: build the pool (`app::configure_threads` does, once per process).

use crate::config::Config;

/// How many compute threads, and how the number was chosen (for the logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSize {
    pub threads: usize,
    pub reason: String,
}

/// The pool size for `config` on this machine.
pub fn pool_size(config: &Config) -> PoolSize {
    let visible = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (threads, reason) = compute_threads(
        config.threads,
        config.lambda_memory_mb,
        cgroup_cpu_quota(),
        visible,
    );
    PoolSize { threads, reason }
}

/// Chooses the compute pool size. Lambda shows every function 2+ CPUs but gives a *share* of a
/// vCPU proportional to memory (1,769 MB = one full vCPU, up to 6 at 10,240 MB); threads beyond
/// that share only contend. So: THREADS if set; otherwise the smallest of the memory-derived share,
/// the cgroup CPU quota and the visible CPUs.
pub fn compute_threads(
    explicit: Option<usize>,
    lambda_memory_mb: Option<u64>,
    cgroup_quota_cpus: Option<f64>,
    visible: usize,
) -> (usize, String) {
    if let Some(n) = explicit {
        return (n, format!("THREADS={n}"));
    }
    let mut n = visible.max(1);
    let mut why = format!("{visible} visible CPUs");
    if let Some(mb) = lambda_memory_mb {
        let share = (mb as f64 / 1769.0).ceil().max(1.0) as usize;
        if share < n {
            n = share;
            why = format!("{mb} MB Lambda memory = {share} vCPU share");
        }
    }
    if let Some(q) = cgroup_quota_cpus {
        let share = q.ceil().max(1.0) as usize;
        if share < n {
            n = share;
            why = format!("cgroup CPU quota {q:.2} CPUs");
        }
    }
    (n, why)
}

/// CPU quota from cgroup v2 `cpu.max` ("max 100000" means unlimited) or v1 cfs files.
fn cgroup_cpu_quota() -> Option<f64> {
    if let Ok(s) = std::fs::read_to_string("/sys/fs/cgroup/cpu.max") {
        let mut it = s.split_whitespace();
        let (q, p) = (it.next()?, it.next()?);
        if q == "max" {
            return None;
        }
        return Some(q.parse::<f64>().ok()? / p.parse::<f64>().ok()?);
    }
    let q: f64 = std::fs::read_to_string("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let p: f64 = std::fs::read_to_string("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (q > 0.0 && p > 0.0).then(|| q / p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_follow_lambda_memory_and_quota_not_visible_cpus() {
        assert_eq!(compute_threads(None, Some(1024), None, 2).0, 1);
        assert_eq!(compute_threads(None, Some(1769), None, 2).0, 1);
        assert_eq!(compute_threads(None, Some(3538), None, 6).0, 2);
        assert_eq!(compute_threads(None, Some(10240), None, 6).0, 6);
        assert_eq!(compute_threads(None, None, Some(0.5), 4).0, 1);
        assert_eq!(compute_threads(None, None, Some(1.5), 4).0, 2);
        assert_eq!(compute_threads(None, None, None, 2).0, 2);
        assert_eq!(compute_threads(Some(4), Some(128), Some(0.1), 1).0, 4);
    }
}
