//! The download buffer, filled by parallel GETs while a thread of its own hashes it.
//!
//! - One mapping at the object's size (pages appear as the GETs write them; nothing is copied
//!   afterwards). The engine reads it in place once every byte has landed.
//! - Writers hold [`Claim`]s: exclusive, disjoint write cursors over byte ranges. The whole buffer
//!   starts as one claim; a claim can only be split, so no two writers ever cover the same byte,
//!   and a byte is written once (a cursor only moves forward; a resumed GET continues at it).
//! - The hasher follows the landed prefix: bytes `[0, prefix)` are written and final. It runs
//!   at `SCHED_IDLE`, so on a box where the server shares the cores (a loopback S3) it takes only
//!   CPU nobody else wants and never slows the download; whatever is left when the last byte
//!   lands is hashed while the engine is built. Against real S3 (60-90 MB/s per connection) a
//!   2 GB/s SHA-256 keeps up, and the digest is ready with the last byte.
//!
//! Must not know about S3 or HTTP: it is bytes, ranges and a digest.

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::hex::hex;

/// The buffer and what is known to have landed in it.
pub struct Landing {
    ptr: NonNull<u8>,
    len: usize,
    /// Bytes `[0, prefix)` are written and never written again.
    prefix: AtomicUsize,
    /// Landed ranges beyond the prefix (start -> end), merged as they touch.
    beyond: Mutex<BTreeMap<usize, usize>>,
    /// Claims alive; when it drops to 0 with the buffer incomplete, the download was given up.
    open_claims: AtomicUsize,
    /// The hashing thread, woken when the prefix grows or the last claim drops.
    follower: OnceLock<Thread>,
}

// SAFETY: the buffer is written only through `Claim`s (disjoint ranges, each owned by one
// writer) and read only where it is final (below `prefix`, or whole once complete); the
// bookkeeping is atomics and a mutex.
unsafe impl Send for Landing {}
unsafe impl Sync for Landing {}

impl Drop for Landing {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: `ptr`/`len` are the mapping made in `new`, unmapped only here; no reader
            // is left (every borrow of the bytes borrows this `Landing`).
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

impl Landing {
    /// A zeroed buffer of `len` bytes and the one claim that covers all of it.
    ///
    /// An anonymous mapping of its own, not the allocator's: its pages are zero and appear as the
    /// GETs first write them, and it goes back to the kernel when dropped. Not `MADV_HUGEPAGE`:
    /// tried, it took the MiniLM fetch from 27 to 16 ms at the median on a loopback moto, but
    /// made it bimodal (3 of 7 cold starts fetched in 50-68 ms; SmolLM2 87-290 ms against a
    /// steady 133-165), and a cold start must be predictable.
    pub fn new(len: usize) -> std::io::Result<(Arc<Landing>, Claim)> {
        let ptr = if len == 0 {
            NonNull::dangling()
        } else {
            // SAFETY: a fresh private anonymous mapping; the result is checked before use.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            NonNull::new(p.cast::<u8>()).expect("mmap succeeded")
        };
        let landing = Arc::new(Landing {
            ptr,
            len,
            prefix: AtomicUsize::new(0),
            beyond: Mutex::new(BTreeMap::new()),
            open_claims: AtomicUsize::new(1),
            follower: OnceLock::new(),
        });
        let claim = Claim {
            landing: landing.clone(),
            cursor: 0,
            end: len,
        };
        Ok((landing, claim))
    }

    /// Bytes landed so far at the front.
    fn prefix(&self) -> usize {
        self.prefix.load(Ordering::Acquire)
    }

    /// Bytes `[from, to)` of the landed prefix.
    fn landed(&self, from: usize, to: usize) -> &[u8] {
        assert!(
            from <= to && to <= self.prefix(),
            "only landed bytes are read"
        );
        // SAFETY: below `prefix` every byte was written (release-published by `publish`,
        // acquired above) and no claim's cursor will ever write there again.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(from), to - from) }
    }

    /// The whole buffer, once every byte has landed.
    fn complete(&self) -> Option<&[u8]> {
        (self.prefix() == self.len).then(|| self.landed(0, self.len))
    }

    /// Records `[start, end)` as landed and moves the prefix over every range that now joins it.
    fn publish(&self, start: usize, end: usize) {
        if start == end {
            return;
        }
        let mut beyond = self.beyond.lock().expect("landing lock");
        let prefix = self.prefix.load(Ordering::Relaxed);
        if start == prefix {
            let mut p = end;
            while let Some(e) = beyond.remove(&p) {
                p = e;
            }
            self.prefix.store(p, Ordering::Release);
            drop(beyond);
            self.wake_follower();
        } else {
            // Extend a range that ends where this one starts (the common case: the next frame
            // of the same GET), else start a new one; then absorb the one that starts at `end`.
            let start = match beyond.range(..start).next_back() {
                Some((&s, &e)) if e == start => s,
                _ => start,
            };
            let end = beyond.remove(&end).unwrap_or(end);
            beyond.insert(start, end);
        }
    }

    fn wake_follower(&self) {
        if let Some(t) = self.follower.get() {
            t.unpark();
        }
    }

    /// Starts the thread that hashes the buffer as it lands. Call before the first write: a
    /// write wakes the thread registered by then.
    pub fn follow_with_sha256(self: &Arc<Self>) -> PendingDigest {
        let landing = self.clone();
        let handle = std::thread::Builder::new()
            .name("model-sha256".into())
            .spawn(move || {
                lower_priority();
                let mut hasher = Sha256::new();
                let mut hashed = 0;
                loop {
                    let p = landing.prefix();
                    if p > hashed {
                        hasher.update(landing.landed(hashed, p));
                        hashed = p;
                        continue;
                    }
                    if hashed == landing.len {
                        return Some((hex(&hasher.finalize()), Instant::now()));
                    }
                    if landing.open_claims.load(Ordering::Acquire) == 0 && landing.prefix() == p {
                        return None; // every writer gave up
                    }
                    // The timeout only guards against a write made before this thread was
                    // registered below; every later write or dropped claim unparks it.
                    std::thread::park_timeout(std::time::Duration::from_millis(20));
                }
            })
            .expect("spawning the hashing thread");
        self.follower
            .set(handle.thread().clone())
            .expect("one follower per landing");
        PendingDigest(handle)
    }
}

/// Runs the calling thread at `SCHED_IDLE`: it gets a core only when nothing else wants it.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain syscall on the calling thread (pid 0); failure leaves the priority as
        // it was, which is only slower.
        let _ = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    }
}

/// The SHA-256 of a [`Landing`], being computed.
pub struct PendingDigest(JoinHandle<Option<(String, Instant)>>);

impl PendingDigest {
    /// Whether the digest is known (waiting would not block).
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }

    /// The lowercase hex digest and when it was ready; `None` if the download was given up
    /// before every byte landed.
    pub fn wait(self) -> Option<(String, Instant)> {
        self.0.join().expect("the hashing thread does not panic")
    }
}

/// The exclusive right to write bytes `[cursor, end)` of a [`Landing`], front to back.
pub struct Claim {
    landing: Arc<Landing>,
    cursor: usize,
    end: usize,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.landing.open_claims.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.landing.wake_follower();
        }
    }
}

impl Claim {
    /// Absolute offset of the next byte this claim writes.
    pub fn cursor(&self) -> usize {
        self.cursor
    }

    /// Absolute offset one past this claim's last byte.
    pub fn end(&self) -> usize {
        self.end
    }

    /// Bytes left to write.
    pub fn remaining(&self) -> usize {
        self.end - self.cursor
    }

    /// Writes `bytes` at the cursor and moves it on. Panics past the claim's end: callers cut
    /// what a server sends to what they asked for.
    pub fn write(&mut self, bytes: &[u8]) {
        assert!(bytes.len() <= self.remaining(), "write within the claim");
        // SAFETY: `[cursor, cursor + len)` lies in this claim, which no other claim overlaps
        // (claims are only made by `Landing::new` and `split_off`), and is above the cursor,
        // so no reader sees it until `publish` below.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.landing.ptr.as_ptr().add(self.cursor),
                bytes.len(),
            );
        }
        let start = self.cursor;
        self.cursor += bytes.len();
        self.landing.publish(start, self.cursor);
    }

    /// Gives `[at, end)` to a new claim; this one keeps `[cursor, at)`.
    pub fn split_off(&mut self, at: usize) -> Claim {
        assert!(
            self.cursor <= at && at <= self.end,
            "split inside the unwritten part"
        );
        self.landing.open_claims.fetch_add(1, Ordering::AcqRel);
        let tail = Claim {
            landing: self.landing.clone(),
            cursor: at,
            end: self.end,
        };
        self.end = at;
        tail
    }
}

/// A finished download: every byte landed; read-only from here on.
pub struct Landed(Arc<Landing>);

impl Landed {
    /// `None` while some bytes are still missing.
    pub fn new(landing: Arc<Landing>) -> Option<Landed> {
        landing.complete()?;
        Some(Landed(landing))
    }
}

impl std::ops::Deref for Landed {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.complete().expect("checked in Landed::new")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn claims_land_out_of_order_and_the_digest_follows() {
        let data = pattern(10_000);
        let (landing, mut all) = Landing::new(data.len()).unwrap();
        let digest = landing.follow_with_sha256();
        // Three writers: [0, 3000), [3000, 7000), [7000, 10000); the back ones land first,
        // in frames, so the prefix only moves when the front fills.
        let mut mid = all.split_off(3000);
        let mut back = mid.split_off(7000);
        for f in data[7000..].chunks(700) {
            back.write(f);
        }
        assert_eq!(landing.prefix(), 0);
        for f in data[3000..7000].chunks(999) {
            mid.write(f);
        }
        assert_eq!(landing.prefix(), 0);
        assert!(landing.complete().is_none());
        all.write(&data[..1234]);
        assert_eq!(landing.prefix(), 1234);
        all.write(&data[1234..3000]);
        assert_eq!(landing.prefix(), 10_000);
        drop((all, mid, back));
        let landed = Landed::new(landing).expect("complete");
        assert!(landed[..] == data[..]);
        let (sha, _) = digest.wait().expect("a digest");
        assert_eq!(sha, super::super::sha256_hex(&data));
    }

    #[test]
    fn abandoned_download_stops_the_hasher_without_a_digest() {
        let (landing, mut all) = Landing::new(100).unwrap();
        let digest = landing.follow_with_sha256();
        all.write(&[1; 40]);
        let tail = all.split_off(60);
        drop(tail);
        drop(all);
        assert!(digest.wait().is_none());
        assert!(Landed::new(landing).is_none());
    }

    #[test]
    #[should_panic(expected = "write within the claim")]
    fn a_claim_cannot_write_past_its_end() {
        let (_landing, mut all) = Landing::new(10).unwrap();
        let _tail = all.split_off(5);
        all.write(&[0; 6]);
    }

    #[test]
    fn empty_object_is_complete_at_once() {
        let (landing, all) = Landing::new(0).unwrap();
        let digest = landing.follow_with_sha256();
        drop(all);
        assert_eq!(
            digest.wait().expect("a digest").0,
            super::super::sha256_hex(b"")
        );
        assert_eq!(Landed::new(landing).expect("complete").len(), 0);
    }
}
