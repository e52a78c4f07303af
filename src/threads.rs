//! The compute pool's size: THREADS if set, else the vCPU share Lambda gives the function's memory,
//! capped by the cgroup CPU quota and the CPUs this process may run on. Reads /proc/self/cgroup
//! and the cgroup files under /sys, which is why it is not part of `config` (configuration is the
//! environment only).
//!
//! A fractional share is rounded up: 3,008 MB (1.7 vCPU) and 2,048 MB (1.16 vCPU) get 2 threads.
//! Measured (docs/performance.md, "Threads at a fractional vCPU"): a second thread costs at most a
//! few percent more CPU per request than one, so under a quota above one CPU it turns the CPU time
//! a single thread would leave unused into speed; a request that ends within one quota period runs
//! on both CPUs before any throttling. The CPUs "this process may run on" are the affinity mask,
//! not `std::thread::available_parallelism`, which also divides a cgroup quota and rounds it
//! *down* (1.7 -> 1): that made the rule floor wherever the quota was visible and ceil elsewhere.
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
    let visible = affinity_cpus()
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
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

/// The CPUs in this process's affinity mask (what it may run on, whatever the cgroup quota).
fn affinity_cpus() -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity writes at most its
        // size, and CPU_COUNT only reads it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
                let n = libc::CPU_COUNT(&set);
                return (n > 0).then_some(n as usize);
            }
        }
    }
    None
}

/// The files holding this process's CPU quota, from /proc/self/cgroup's text: cgroup v2
/// (`0::/path` -> `/sys/fs/cgroup/path/cpu.max`) first, else v1's `cpu` controller
/// (`N:cpu,cpuacct:/path` -> `/sys/fs/cgroup/cpu/path/cpu.cfs_quota_us`); the root's files last.
fn quota_files(proc_self_cgroup: &str) -> Vec<String> {
    let mut files = Vec::new();
    for line in proc_self_cgroup.lines() {
        let mut it = line.splitn(3, ':');
        let (_, controllers, path) = match (it.next(), it.next(), it.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c.trim_end_matches('/')),
            _ => continue,
        };
        if controllers.is_empty() {
            files.push(format!("/sys/fs/cgroup{path}/cpu.max"));
        } else if controllers.split(',').any(|c| c == "cpu") {
            files.push(format!("/sys/fs/cgroup/cpu{path}/cpu.cfs_quota_us"));
            files.push(format!(
                "/sys/fs/cgroup/{controllers}{path}/cpu.cfs_quota_us"
            ));
        }
    }
    files.push("/sys/fs/cgroup/cpu.max".into());
    files.push("/sys/fs/cgroup/cpu/cpu.cfs_quota_us".into());
    files
}

/// CPUs a quota file grants: cgroup v2 `cpu.max` ("max 100000" means unlimited) or v1's
/// `cpu.cfs_quota_us` beside its `cpu.cfs_period_us` (-1: unlimited). `None`: no limit there.
fn quota_in(file: &str) -> Option<f64> {
    if file.ends_with("cpu.max") {
        let s = std::fs::read_to_string(file).ok()?;
        let mut it = s.split_whitespace();
        let (q, p) = (it.next()?, it.next()?);
        if q == "max" {
            return None;
        }
        return Some(q.parse::<f64>().ok()? / p.parse::<f64>().ok()?);
    }
    let read = |f: &str| -> Option<f64> { std::fs::read_to_string(f).ok()?.trim().parse().ok() };
    let q = read(file)?;
    let p = read(&file.replace("cfs_quota_us", "cfs_period_us"))?;
    (q > 0.0 && p > 0.0).then(|| q / p)
}

/// This process's CPU quota in CPUs, if its cgroup has one.
fn cgroup_cpu_quota() -> Option<f64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    quota_files(&own)
        .iter()
        .filter(|f| std::path::Path::new(f).exists())
        .find_map(|f| quota_in(f))
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

    /// A fractional share rounds up (docs/performance.md measures why), from the memory and
    /// from a quota alike.
    #[test]
    fn a_fractional_vcpu_share_rounds_up() {
        assert_eq!(compute_threads(None, Some(1770), None, 8).0, 2);
        assert_eq!(compute_threads(None, Some(2048), None, 8).0, 2);
        assert_eq!(compute_threads(None, Some(3008), None, 8).0, 2);
        assert_eq!(compute_threads(None, Some(5307), None, 8).0, 3);
        assert_eq!(compute_threads(None, Some(5308), None, 8).0, 4);
        assert_eq!(compute_threads(None, Some(3008), Some(1.7), 8).0, 2);
        assert_eq!(compute_threads(None, None, Some(1.16), 8).0, 2);
    }

    #[test]
    fn the_quota_is_read_from_this_process_cgroup_first() {
        let v2 = quota_files("0::/lambda/env-1\n");
        assert_eq!(v2[0], "/sys/fs/cgroup/lambda/env-1/cpu.max");
        let v1 = quota_files("5:cpuacct:/x\n4:cpu,cpuacct:/bench/3008\n2:memory:/bench/3008\n");
        assert_eq!(v1[0], "/sys/fs/cgroup/cpu/bench/3008/cpu.cfs_quota_us");
        assert_eq!(
            v1[1],
            "/sys/fs/cgroup/cpu,cpuacct/bench/3008/cpu.cfs_quota_us"
        );
        assert!(!v1.iter().any(|f| f.contains("/x/")), "{v1:?}");
        // The root's files come last, whatever the process's cgroup.
        for files in [v2, v1, quota_files("")] {
            assert_eq!(
                files[files.len() - 2..],
                [
                    "/sys/fs/cgroup/cpu.max",
                    "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"
                ]
            );
        }
    }
}
