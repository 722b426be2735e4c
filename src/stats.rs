//! State shared between the SMTP runtime and the status page thread.
//!
//! Counters are 32-bit atomics on purpose: the 486 has no 64-bit atomic
//! instructions (no CMPXCHG8B), and a counter that wraps after four billion
//! messages is fine for a backup MX. Anything richer sits behind a `Mutex`
//! held only for a copy, so the status thread can never stall SMTP.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Bytes of the primary's last error kept for the page.
pub const LAST_ERROR_MAX: usize = 300;

/// Most domains whose route the page shows.
pub const MAX_ROUTES: usize = 32;

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
    /// False when the spool directory is on tmpfs/ramfs: a fact from
    /// statfs(2), kept current by [`Stats::check_spool`].
    pub persistent_spool: AtomicBool,
    pub primary: Mutex<PrimaryState>,
    /// With `primary = "mx"`: where each recipient domain routes now, as
    /// the last queue run found it (the hosts in order, or why none), and
    /// whether that is a warning (a loop to myself, no MX, a DNS failure).
    /// At most [`MAX_ROUTES`] domains.
    pub routes: Mutex<Vec<(String, String, bool)>>,
    /// The dead-host cache (unix seconds, 0: none): new mail is not tried
    /// before then, the primary having been found down. Kept by the scheduler.
    pub primary_retry_at: AtomicU32,
    /// A sentence for the page and the console when the spool is not persistent.
    pub spool_note: Mutex<String>,
    /// Problems found at start that an administrator must act on, in plain
    /// words (a spool disk expected but missing, limits cut to fit a small
    /// spool, a spool too small for any message): at the top of the page,
    /// counted in `/metrics` (`bartleby_alerts`).
    pub alerts: Mutex<Vec<String>>,
    /// Wakes the scheduler for a full queue run now (`flush`, ETRN, the
    /// page's button). `Notify` may be signalled from any thread.
    pub flush: tokio::sync::Notify,
    pub flush_requests: AtomicU32,
    /// Refusals by the per-client limits (see [`crate::clients`]).
    pub client_refusals_connections: AtomicU32,
    pub client_refusals_queue_share: AtomicU32,
    pub client_refusals_rate: AtomicU32,
    /// Sessions, queued messages and MAIL rates per client.
    pub clients: crate::clients::Clients,
    /// Entries of the recipients list in force.
    pub recipients_entries: AtomicU32,
    /// Why the recipients list in force is not the file's current content
    /// (the last reload was refused and the previous list kept); empty when
    /// the file and the list agree.
    pub recipients_kept: Mutex<String>,
    /// STARTTLS: the certificate in force and the last reload's warning.
    pub tls: Mutex<crate::tls::TlsState>,
    /// Where the recipients list in force came from: a
    /// [`crate::policy::Source`] as a number (0: no list).
    pub recipients_source: AtomicU32,
    /// When the list in force was taken from its source: the file's
    /// modification time, or the time of the push (unix seconds; 0: never).
    pub recipients_updated: AtomicU32,
    /// A recipients list is configured but none can be used (the file is
    /// bad and no last good list was kept): every recipient gets 451 4.3.0;
    /// `recipients_kept` says why.
    pub recipients_unusable: AtomicBool,
    /// A write to the spool failed (a session's message, a delivery
    /// result): MAIL gets 452 until the write probe passes in every spool
    /// directory (kept by the scheduler's prober and the scheduler).
    pub spool_unwritable: AtomicBool,
    /// The spool can record removals but not delivery states (a full file
    /// system, an unwritable `state/`): only messages with one recipient
    /// left are delivered (kept by the scheduler, for the page).
    pub spool_removals_only: AtomicBool,
    /// Spool write failures reported so far (wraps): a probe that began
    /// before the latest one cannot vouch for the spool.
    pub spool_failures: AtomicU32,
    /// Delivered messages whose outcome is not recorded yet: they would be
    /// delivered again if the server restarted now.
    pub spool_unrecorded: AtomicU32,
    /// Wakes the scheduler to probe the spool after a session failed to
    /// store a message (see [`Stats::spool_write_failed`]).
    pub spool_probe: tokio::sync::Notify,
    /// Recipient verification (see [`crate::verify`]): cache entries now,
    /// lookups answered from the cache and not, probes sent to the primary
    /// and those it answered (2xx, 4xx or 5xx to RCPT).
    pub verify_positive: AtomicU32,
    pub verify_negative: AtomicU32,
    pub verify_hits: AtomicU32,
    pub verify_misses: AtomicU32,
    pub verify_probes: AtomicU32,
    pub verify_answered: AtomicU32,
    /// When the primary last answered a probe with a yes or a no (unix
    /// seconds, 0: never; at start, the newest entry of the saved cache).
    pub verify_last_refresh: AtomicU32,
}

impl Stats {
    /// Notes the route a queue run found for `domain` (see `routes`);
    /// a new warning is logged once.
    pub fn set_route(&self, domain: &str, res: &Result<crate::route::Route, crate::delivery::Reply>) {
        let (text, warn) = match res {
            Ok(r) => (r.describe(), r.note.is_some()),
            Err(e) => (e.text.clone(), true),
        };
        let Ok(mut m) = self.routes.lock() else { return };
        if m.iter().any(|(d, t, _)| d == domain && *t == text) {
            return;
        }
        if warn {
            log::warn!(target: crate::logging::QMGR, "warning: mail for {domain}: {text}");
        }
        m.retain(|(d, _, _)| d != domain);
        if m.len() >= MAX_ROUTES {
            m.remove(0);
        }
        let at = m.iter().position(|(d, _, _)| d.as_str() > domain).unwrap_or(m.len());
        m.insert(at, (domain.to_string(), text, warn));
    }

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

    /// A write to the spool failed (a session could not store a message,
    /// or the scheduler a delivery result): MAIL gets 452 from now on, until
    /// the scheduler's write probe, which this wakes (at most one a second,
    /// off the runtime, also during a queue run), finds the spool writable
    /// (at once, if the failure was one file's own). Without this, a
    /// read-only or failed file system that statvfs does not show (ext4's
    /// emergency read-only, EIO) would get every client a 250 to MAIL and a
    /// 451 after its DATA.
    pub fn spool_write_failed(&self) {
        self.spool_failures.fetch_add(1, Ordering::SeqCst);
        self.spool_unwritable.store(true, Ordering::SeqCst);
        self.spool_probe.notify_one();
    }

    /// A copy of the primary's state.
    pub fn primary(&self) -> PrimaryState {
        self.primary.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Checks where the spool really is (statfs(2), see [`spool_in_ram`]),
    /// records it and returns true when it survives power loss. Cheap: the
    /// status page calls it at every render. A spool in RAM with no reason
    /// given yet (init gives one on the appliance) gets a sentence naming
    /// the file system.
    pub fn check_spool(&self, spool: &Path) -> bool {
        let Ok(ram) = spool_in_ram(spool) else {
            return self.persistent_spool.load(Ordering::Relaxed);
        };
        self.persistent_spool.store(ram.is_none(), Ordering::Relaxed);
        if let (Some(fs), Ok(mut note)) = (ram, self.spool_note.lock())
            && note.is_empty()
        {
            *note = format!("The spool {} is on {fs} (RAM): queued mail is lost on power failure or reboot.", spool.display());
        }
        ram.is_none()
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

/// The file system type holding `path` when it keeps its data in RAM only
/// (`Some("tmpfs")`, `Some("ramfs")`; the initramfs's rootfs is one of the
/// two), `None` when it is anything else (a disk). A path that does not
/// exist yet is judged by its nearest existing parent: where it will be made.
pub fn spool_in_ram(path: &Path) -> std::io::Result<Option<&'static str>> {
    use std::os::unix::ffi::OsStrExt;
    const TMPFS_MAGIC: u32 = 0x0102_1994;
    const RAMFS_MAGIC: u32 = 0x8584_58f6;
    let mut p = path;
    while !p.exists()
        && let Some(parent) = p.parent()
    {
        p = parent;
    }
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: a zeroed statfs is a valid out-parameter; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // f_type is i64 on x86_64 glibc, u32 on i486 musl: the magic numbers are 32-bit
    #[allow(clippy::unnecessary_cast)]
    Ok(match st.f_type as u32 {
        TMPFS_MAGIC => Some("tmpfs"),
        RAMFS_MAGIC => Some("ramfs"),
        _ => None,
    })
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
