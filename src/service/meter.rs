//! What one call did, counted for the entry point's per-request metrics: the route, the status,
//! tokens in and out, engine time, deadline stops, and for SQS batches the jobs and their queue
//! wait. The service and the worker only count; writing a metrics record (CloudWatch EMF, in
//! `crate::metrics`) is the entry point's business, and nothing here knows about Lambda.
//!
//! The counts travel in a tokio task-local ([`scope`]) rather than through every signature: a call
//! passes through an event adapter, the service's router, the worker and the per-API functions,
//! and only the leaves have something to count. Outside a scope (the CLI, `serve`, most tests)
//! [`record`] does nothing. A streamed generation finishes on the blocking pool after the call
//! has returned: it takes the meter with it ([`current`]), and the entry point writes its record
//! when the last holder lets go (see [`Meter::new`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The counts of one call (one Lambda invoke: a request, or a whole SQS batch).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallStats {
    /// The route template answered (`/v1/embeddings`, `/v1/models/{model}`, ...); `None` when
    /// nothing matched (a 404/405 before routing).
    pub route: Option<&'static str>,
    /// The HTTP status of the answer (the first one recorded wins: a batch's jobs do not
    /// overwrite each other's).
    pub status: Option<u16>,
    /// Tokens read: the embedded inputs' tokens, or the prompt's.
    pub input_tokens: u64,
    /// Tokens generated.
    pub output_tokens: u64,
    /// Time in the engine (forward passes), for tokens per second.
    pub engine: Duration,
    /// Work the deadline stopped: a generation cut short (finish_reason "length" because of the
    /// deadline, not max_tokens), an embedding request or a job refused for lack of time.
    pub deadline_stops: u64,
    /// SQS batches: messages received, jobs whose result is a failure, jobs handed back.
    pub jobs: u64,
    pub jobs_failed: u64,
    pub jobs_retried: u64,
    /// SQS batches: per message, how long it waited in the queue (sent -> this invocation).
    pub queue_wait: Vec<Duration>,
}

/// What a meter does with its final counts.
type OnDone = Box<dyn FnOnce(CallStats) + Send>;

/// Shared counts of one call. `on_done` runs once, with the final counts, when the last holder
/// drops it: right after a buffered answer, or after a stream's last event.
pub struct Meter {
    stats: Mutex<CallStats>,
    on_done: Mutex<Option<OnDone>>,
}

impl Meter {
    /// A meter that hands its counts to `on_done` when it is dropped.
    pub fn new(on_done: impl FnOnce(CallStats) + Send + 'static) -> Arc<Meter> {
        Arc::new(Meter {
            stats: Mutex::new(CallStats::default()),
            on_done: Mutex::new(Some(Box::new(on_done))),
        })
    }

    /// Changes the counts.
    pub fn update(&self, f: impl FnOnce(&mut CallStats)) {
        // A panic while counting cannot leave the counts unusable for the record.
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
    }

    /// The counts so far.
    pub fn snapshot(&self) -> CallStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        let done = self
            .on_done
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(done) = done {
            let stats = std::mem::take(self.stats.get_mut().unwrap_or_else(|e| e.into_inner()));
            done(stats);
        }
    }
}

tokio::task_local! {
    static CURRENT: Arc<Meter>;
}

/// Runs `f` with `meter` as the current meter: what the service and the worker count while it
/// runs lands there.
pub async fn scope<F: std::future::Future>(meter: Arc<Meter>, f: F) -> F::Output {
    CURRENT.scope(meter, f).await
}

/// The current meter, for work that outlives the call (a stream on the blocking pool).
pub fn current() -> Option<Arc<Meter>> {
    CURRENT.try_with(Arc::clone).ok()
}

/// Counts into the current meter; nothing outside a [`scope`].
pub fn record(f: impl FnOnce(&mut CallStats)) {
    let _ = CURRENT.try_with(|m| m.update(f));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_reach_on_done_once_the_last_holder_drops() {
        let (tx, rx) = std::sync::mpsc::channel();
        let meter = Meter::new(move |s| tx.send(s).unwrap());
        let held = scope(meter.clone(), async {
            record(|s| s.input_tokens += 3);
            current()
        })
        .await
        .expect("inside the scope");
        drop(meter);
        assert!(rx.try_recv().is_err(), "a holder is left: not done yet");
        held.update(|s| s.output_tokens = 5);
        drop(held);
        let s = rx.try_recv().expect("done after the last drop");
        assert_eq!((s.input_tokens, s.output_tokens), (3, 5));
        record(|s| s.input_tokens += 1); // outside any scope: nothing, no panic
        assert!(current().is_none());
    }
}
