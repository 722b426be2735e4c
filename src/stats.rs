//! State shared between the SMTP runtime and the status page thread.
//!
//! Counters are 32-bit atomics on purpose: the 486 has no 64-bit atomic
//! instructions (no CMPXCHG8B), and a counter that wraps after four billion
//! messages is fine for a backup MX. Anything richer sits behind a `Mutex`
//! held only for a copy, so the status thread can never stall SMTP.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Bytes of the primary's last error kept for the page.
pub const LAST_ERROR_MAX: usize = 300;

/// What the relay knows about the primary, from its own delivery attempts.
#[derive(Debug, Clone, Default)]
pub struct PrimaryState {
    /// `None` until the first attempt.
    pub up: Option<bool>,
    pub last_success: Option<u64>,
    pub last_attempt: Option<u64>,
    pub last_error: String,
    /// When the current outage began (first failure after a success).
    pub down_since: Option<u64>,
}

/// Counters and state read by the status page and `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    pub received: AtomicU32,
    pub delivered: AtomicU32,
    pub deferred: AtomicU32,
    pub bounced: AtomicU32,
    pub rejected: AtomicU32,
    /// SMTP sessions open now.
    pub connections: AtomicU32,
    /// Messages and bytes in the queue now (kept by the scheduler).
    pub queue_messages: AtomicU32,
    pub queue_kib: AtomicU32,
    pub started: AtomicU32,
    /// False on a rescue CD/floppy without a disk: the spool is in RAM.
    pub persistent_spool: AtomicBool,
    pub primary: Mutex<PrimaryState>,
    /// A sentence for the page and the console when the spool is not persistent.
    pub spool_note: Mutex<String>,
    /// Wakes the scheduler for a full queue run now (`flush`, ETRN, the
    /// page's button). `Notify` may be signalled from any thread.
    pub flush: tokio::sync::Notify,
    pub flush_requests: AtomicU32,
}

impl Stats {
    pub fn new() -> Stats {
        let s = Stats::default();
        s.started.store(crate::util::now() as u32, Ordering::Relaxed);
        s.persistent_spool.store(true, Ordering::Relaxed);
        s
    }

    pub fn inc(counter: &AtomicU32) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU32) -> u32 {
        counter.load(Ordering::Relaxed)
    }

    /// Asks the scheduler for a queue run now, like `sendmail -q`.
    pub fn request_flush(&self) {
        Self::inc(&self.flush_requests);
        self.flush.notify_one();
    }

    /// A copy of the primary's state.
    pub fn primary(&self) -> PrimaryState {
        self.primary.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Records the outcome of a connection attempt to the primary.
    pub fn primary_result(&self, ok: bool, error: &str) {
        let now = crate::util::now();
        if let Ok(mut p) = self.primary.lock() {
            p.last_attempt = Some(now);
            if ok {
                p.up = Some(true);
                p.last_success = Some(now);
                p.down_since = None;
                p.last_error.clear();
            } else {
                if p.up != Some(false) {
                    p.down_since = Some(now);
                }
                p.up = Some(false);
                p.last_error.clear();
                // The text is the primary's: cut on a character, never
                // inside one (a panic here is PID 1 dying on every retry).
                p.last_error.push_str(&error[..error.floor_char_boundary(LAST_ERROR_MAX)]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_error_is_cut_on_a_character() {
        let s = Stats::new();
        // A 3-byte character at bytes 299..302: a byte cut at 300 panicked.
        let error = format!("{}{}", "x".repeat(LAST_ERROR_MAX - 1), "\u{20ac}".repeat(10));
        s.primary_result(false, &error);
        let p = s.primary();
        assert_eq!(p.last_error, "x".repeat(LAST_ERROR_MAX - 1));
        assert_eq!(p.up, Some(false));
        s.primary_result(false, "short \u{e9}");
        assert_eq!(s.primary().last_error, "short \u{e9}");
        s.primary_result(true, "");
        assert_eq!(s.primary().up, Some(true));
        assert!(s.primary().last_error.is_empty());
    }
}
