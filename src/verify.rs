//! Recipient verification against the primary (Postfix's
//! `reject_unverified_recipient` with its persistent cache, Exim's callout).
//!
//! At RCPT, an address is looked up in a [`Cache`] of the primary's earlier
//! answers. On a miss, while the primary is believed up, one prober task asks
//! the primary (one connection, reused: `MAIL FROM:<>`, `RCPT TO`, `RSET`;
//! never DATA; QUIT when idle) through the delivery client's
//! [`Connection`](crate::delivery::Connection), so the same reply parser and
//! the same greeting checks apply (a primary that greets with our own name is
//! us: it counts as down). Sessions wait for the answer at most
//! `verify_timeout`; several sessions asking for one address share one probe.
//!
//! Bounded everywhere: at most `verify_cache_size` entries, of which at most a
//! quarter negative (a dictionary attack fills the negative part and evicts
//! its own oldest entries, never the positives); at most [`MAX_WAITING`]
//! addresses waiting for a probe; at most one background refresh a second.
//!
//! The cache is kept in the spool as [`CACHE_FILE`], written off the runtime
//! (a thread of its own: temporary file, fsync, rename, fsync of the
//! directory) at most every [`SAVE_INTERVAL`] when it changed, and at
//! shutdown: a crash loses at most the last minute of answers.
//!
//! Role: the cache and the prober. May touch: its cache file in the spool,
//! connections to the primary (through the delivery client), the Stats.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, oneshot, watch};

use crate::config::{Config, VerifyUnknown};
use crate::delivery::Connection;
use crate::logging::{MASTER, SMTP};
use crate::stats::Stats;
use crate::util;

/// The cache's file in the spool directory.
pub const CACHE_FILE: &str = "verify.cache";
/// First line of the file.
const HEADER: &str = "# bartleby verify cache 1";
/// Longest address cached (RFC 5321: 64 + 1 + 255, rounded).
const MAX_ADDR: usize = 320;
/// Addresses waiting for a probe; past it a session gets 450 at once.
pub const MAX_WAITING: usize = 64;
/// The cache is written at most this often when it changed.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(60);
/// An idle connection to the primary is closed (QUIT) after this.
const IDLE_QUIT: Duration = Duration::from_secs(5);
/// A background refresh that failed is not tried again for this long.
const REFRESH_RETRY: u32 = 60;

/// One answer of the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    ok: bool,
    /// When the primary said so (unix seconds).
    checked: u32,
    /// When a background refresh was last tried (unix seconds, 0: never).
    tried: u32,
}

/// The primary's answers, bounded: at most `max` entries, at most
/// `max_negative` of them negative. Negatives go first when room is needed.
#[derive(Debug)]
pub struct Cache {
    map: HashMap<Box<str>, Entry>,
    max: usize,
    max_negative: usize,
    negatives: usize,
    positive_ttl: u32,
    negative_ttl: u32,
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

fn now32() -> u32 {
    u32::try_from(util::now()).unwrap_or(u32::MAX)
}

impl Cache {
    pub fn new(max: usize, positive_ttl: Duration, negative_ttl: Duration) -> Cache {
        let max = max.max(4);
        Cache { map: HashMap::new(), max, max_negative: (max / 4).max(1), negatives: 0, positive_ttl: secs(positive_ttl), negative_ttl: secs(negative_ttl) }
    }

    pub fn of(cfg: &Config) -> Cache {
        Cache::new(cfg.verify_cache_size, cfg.verify_positive_ttl, cfg.verify_negative_ttl)
    }

    fn ttl(&self, ok: bool) -> u32 {
        if ok { self.positive_ttl } else { self.negative_ttl }
    }

    fn fresh(&self, e: &Entry, now: u32) -> bool {
        now.saturating_sub(e.checked) < self.ttl(e.ok)
    }

    /// The cached answer for `addr` (lower case), unless it expired.
    pub fn get(&self, addr: &str, now: u32) -> Option<bool> {
        self.map.get(addr).filter(|e| self.fresh(e, now)).map(|e| e.ok)
    }

    /// (positive, negative) entries held, expired ones included.
    pub fn counts(&self) -> (usize, usize) {
        (self.map.len() - self.negatives, self.negatives)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The newest answer's time (0: none).
    pub fn newest(&self) -> u32 {
        self.map.values().map(|e| e.checked).max().unwrap_or(0)
    }

    /// Records the primary's answer for `addr` (lower case), making room as
    /// needed: expired entries first, then the oldest negatives, then (only
    /// for a positive, when no negative is left) the oldest positives. A
    /// negative that would need a positive's room is not kept.
    pub fn insert(&mut self, addr: &str, ok: bool, now: u32) {
        // Nothing the file's lines could not hold (a space, a newline).
        if addr.len() > MAX_ADDR || addr.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return;
        }
        if let Some(e) = self.map.get_mut(addr) {
            if e.ok != ok {
                if ok {
                    self.negatives -= 1;
                } else {
                    self.negatives += 1;
                }
            }
            *e = Entry { ok, checked: now, tried: 0 };
            self.enforce_negative_cap();
            return;
        }
        if !ok && self.negatives >= self.max_negative {
            self.evict(false);
        }
        if self.map.len() >= self.max {
            self.expire(now);
        }
        if self.map.len() >= self.max {
            if self.negatives == 0 && !ok {
                // Full of positives: a "no" is not worth a known user.
                return;
            }
            self.evict(self.negatives == 0);
        }
        self.map.insert(addr.into(), Entry { ok, checked: now, tried: 0 });
        if !ok {
            self.negatives += 1;
        }
    }

    fn enforce_negative_cap(&mut self) {
        if self.negatives > self.max_negative {
            self.evict(false);
        }
    }

    /// Drops the expired entries.
    pub fn expire(&mut self, now: u32) {
        let (pt, nt) = (self.positive_ttl, self.negative_ttl);
        let mut negatives = 0;
        self.map.retain(|_, e| {
            let keep = now.saturating_sub(e.checked) < if e.ok { pt } else { nt };
            if keep && !e.ok {
                negatives += 1;
            }
            keep
        });
        self.negatives = negatives;
    }

    /// Drops the oldest eighth (at least one) of the negative entries, or of
    /// the positive ones with `positive`. A batch, so that a flood of new
    /// addresses costs one scan per eighth of the cap, not one per address.
    fn evict(&mut self, positive: bool) {
        let mut times: Vec<u32> = self.map.values().filter(|e| e.ok == positive).map(|e| e.checked).collect();
        if times.is_empty() {
            return;
        }
        let n = (times.len() / 8).max(1);
        let (_, &mut cut, _) = times.select_nth_unstable(n - 1);
        // Entries older than `cut`, then as many at `cut` as still needed.
        let older = times.iter().filter(|&&t| t < cut).count();
        let mut at_cut = n - older;
        let mut removed_neg = 0;
        self.map.retain(|_, e| {
            if e.ok != positive {
                return true;
            }
            let go = e.checked < cut
                || (e.checked == cut && at_cut > 0 && {
                    at_cut -= 1;
                    true
                });
            if go && !e.ok {
                removed_neg += 1;
            }
            !go
        });
        self.negatives -= removed_neg;
    }

    /// The positive entry most in need of a refresh: answered at least
    /// `after` seconds ago, not tried in the last minute.
    fn due_refresh(&self, now: u32, after: u32) -> Option<String> {
        self.map
            .iter()
            .filter(|(_, e)| e.ok && now.saturating_sub(e.checked) >= after && self.fresh(e, now) && now.saturating_sub(e.tried) >= REFRESH_RETRY)
            .min_by_key(|(_, e)| e.checked)
            .map(|(k, _)| k.to_string())
    }

    fn mark_tried(&mut self, addr: &str, now: u32) {
        if let Some(e) = self.map.get_mut(addr) {
            e.tried = now;
        }
    }

    /// The file's text: a header, then `+ TIME ADDR` / `- TIME ADDR` lines.
    pub fn serialize(&self, now: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.map.len() * 40);
        out.extend_from_slice(HEADER.as_bytes());
        out.push(b'\n');
        for (k, e) in &self.map {
            if self.fresh(e, now) {
                let _ = writeln!(out, "{} {} {k}", if e.ok { '+' } else { '-' }, e.checked);
            }
        }
        out
    }

    /// Reads a cache file written by [`serialize`](Self::serialize): expired
    /// entries are skipped, and past the bounds the newest are kept. A file
    /// that is not one (a bad line, not a regular file) is an error naming
    /// what is wrong; `Ok(None)` when there is no file.
    pub fn load(&mut self, path: &Path, now: u32) -> Result<Option<usize>, String> {
        // The spool's own opener: no symlink followed, no FIFO waited on,
        // only a regular file.
        let f = match crate::spool::open_regular(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        self.read_from(std::io::BufReader::with_capacity(4096, f), now).map(Some)
    }

    fn read_from<R: BufRead>(&mut self, mut r: R, now: u32) -> Result<usize, String> {
        use std::io::Read;
        let mut line = Vec::with_capacity(MAX_ADDR + 16);
        let mut entries: Vec<(Box<str>, Entry)> = Vec::new();
        let mut n = 0usize;
        loop {
            line.clear();
            let got = (&mut r).take(MAX_ADDR as u64 + 16).read_until(b'\n', &mut line).map_err(|e| e.to_string())?;
            if got == 0 {
                break;
            }
            n += 1;
            let bad = |why: &str| format!("line {n}: {why}");
            let Some(body) = line.strip_suffix(b"\n") else {
                return Err(bad("cut short or too long"));
            };
            let text = std::str::from_utf8(body).map_err(|_| bad("not UTF-8"))?;
            if n == 1 {
                if text != HEADER {
                    return Err(bad("not a Bartleby verify cache (bad first line)"));
                }
                continue;
            }
            let mut parts = text.splitn(3, ' ');
            let ok = match parts.next() {
                Some("+") => true,
                Some("-") => false,
                _ => return Err(bad("expected `+` or `-`")),
            };
            let checked: u32 = parts.next().filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit())).and_then(|t| t.parse().ok()).ok_or_else(|| bad("bad time"))?;
            let addr = parts.next().ok_or_else(|| bad("no address"))?;
            if addr.is_empty() || !addr.contains('@') || addr.bytes().any(|b| b <= b' ' || b == 0x7f || b.is_ascii_uppercase()) {
                return Err(bad("bad address"));
            }
            let e = Entry { ok, checked: checked.min(now), tried: 0 };
            if now.saturating_sub(e.checked) < self.ttl(ok) {
                entries.push((addr.into(), e));
                // A file far larger than the cache (a smaller
                // verify_cache_size than when it was written, or junk that
                // parses): memory stays at twice the bound.
                if entries.len() >= 2 * self.max {
                    entries.sort_by_key(|(_, e)| std::cmp::Reverse(e.checked));
                    entries.truncate(self.max);
                }
            }
        }
        if n == 0 {
            return Err("empty (no header line)".into());
        }
        // Newest last, so that the bounds keep them.
        entries.sort_by_key(|(_, e)| e.checked);
        let count = entries.len();
        for (k, e) in entries {
            self.insert(&k, e.ok, e.checked);
        }
        Ok(count)
    }
}

/// Writes `data` to `path` atomically (see [`crate::spool::replace_file`]).
/// Blocking: call it off the runtime.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    crate::spool::replace_file(path, &path.with_extension("cache.tmp"), |w| w.write_all(data))
}

/// What the primary said to one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// 2xx to RCPT.
    Yes,
    /// 5xx to RCPT: the primary's reply.
    No(String),
    /// 4xx to RCPT: the primary's reply.
    TempFail(String),
    /// No answer: cannot connect, a refused session, a protocol error, a
    /// timeout, ourselves. The primary counts as down for a while.
    Unreachable(String),
}

/// What a probe's outcome means: a 2xx is a yes, a permanent "no such
/// user" a no, any other reply no verdict for now, no reply at all an
/// unreachable primary.
fn classify(result: Result<crate::delivery::Reply, String>) -> Answer {
    match result {
        Ok(r) if r.is_ok() => Answer::Yes,
        Ok(r) if r.is_permanent() && no_such_user(&r) => Answer::No(r.text),
        Ok(r) => Answer::TempFail(r.text),
        Err(why) => Answer::Unreachable(why),
    }
}

/// True when a 5xx to the probe's RCPT says the mailbox does not exist:
/// an enhanced code 5.1.x (but 5.1.7 and 5.1.8, the sender's: Postfix's
/// smtpd_delay_reject answers a refused `MAIL FROM:<>` at RCPT), or 550,
/// 551, 553 without one. Any other 5xx (5.7.x policy, such as a primary
/// refusing the backup itself; 5.2.x mailbox full; 5.5.x protocol) says
/// nothing about the address: not cached, the sender tries again.
fn no_such_user(r: &crate::delivery::Reply) -> bool {
    match r.enhanced() {
        Some(e) => e.starts_with("5.1.") && !matches!(e, "5.1.7" | "5.1.8"),
        None => matches!(r.code, 550 | 551 | 553),
    }
}

/// What a session does with an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// 550 5.1.1: the primary said no (now, or earlier: `cached`).
    Reject { said: String, cached: bool },
    /// 450 4.1.1: the primary said "try later", or verification is busy.
    Defer(String),
    /// Nothing is known and the primary cannot be asked now: the caller
    /// applies `verify_unknown` (or the recipients list).
    Unknown(String),
}

/// Addresses waiting for the prober, each with the sessions waiting for it.
type Waiters = Vec<oneshot::Sender<Answer>>;

struct State {
    cache: Cache,
    queue: VecDeque<(Box<str>, Waiters)>,
    /// The address being probed now, with its waiters.
    inflight: Option<(Box<str>, Waiters)>,
    /// The primary is taken as down until then (unix seconds), from a
    /// failed probe at `down_at`.
    down_until: u64,
    down_at: u64,
    /// Changes since the last save.
    dirty: u32,
}

/// The verification service shared by all sessions.
pub struct Verifier {
    cfg: Arc<Config>,
    /// `cfg` with connect and reply timeouts cut to `verify_timeout`.
    probe_cfg: Config,
    stats: Arc<Stats>,
    state: Mutex<State>,
    wake: Notify,
    path: PathBuf,
    saving: Arc<AtomicBool>,
}

impl Verifier {
    /// Loads the cache from the spool. A damaged file never stops the start:
    /// it is reported with its path, moved to `corrupt/` and ignored.
    pub fn start(cfg: Arc<Config>, stats: Arc<Stats>, spool: &crate::spool::Spool) -> Arc<Verifier> {
        let path = spool.root().join(CACHE_FILE);
        let mut cache = Cache::of(&cfg);
        match cache.load(&path, now32()) {
            Ok(None) => {}
            Ok(Some(n)) => log::info!(target: MASTER, "verify cache {}: {n} entries loaded", path.display()),
            Err(why) => match spool.quarantine(&path, CACHE_FILE) {
                Ok(to) => log::warn!(target: MASTER, "warning: verify cache {}: {why}; ignored, moved to {}", path.display(), to.display()),
                Err(e) => log::warn!(target: MASTER, "warning: verify cache {}: {why}; ignored (cannot move it to corrupt/: {e})", path.display()),
            },
        }
        let _ = std::fs::remove_file(path.with_extension("cache.tmp"));
        stats.verify_last_refresh.store(cache.newest(), Ordering::Relaxed);
        let mut probe_cfg = (*cfg).clone();
        probe_cfg.connect_timeout = cfg.verify_timeout;
        probe_cfg.delivery_timeout = cfg.verify_timeout;
        let v = Verifier {
            cfg,
            probe_cfg,
            stats,
            state: Mutex::new(State { cache, queue: VecDeque::new(), inflight: None, down_until: 0, down_at: 0, dirty: 0 }),
            wake: Notify::new(),
            path,
            saving: Arc::new(AtomicBool::new(false)),
        };
        v.publish();
        Arc::new(v)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere (which aborts anyway).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Copies the cache's figures to the stats.
    fn publish(&self) {
        let (p, n) = self.lock().cache.counts();
        self.stats.verify_positive.store(p as u32, Ordering::Relaxed);
        self.stats.verify_negative.store(n as u32, Ordering::Relaxed);
    }

    /// True while the primary is believed up: neither the scheduler's
    /// dead-host cache nor a failed probe says otherwise.
    fn primary_up(&self, st: &State) -> bool {
        let now = util::now();
        if now < u64::from(Stats::get(&self.stats.primary_retry_at)) {
            return false;
        }
        // A failed probe holds for minimal_backoff, unless the scheduler
        // has delivered since.
        now >= st.down_until || self.stats.primary().last_success.is_some_and(|t| t >= st.down_at)
    }

    /// Looks `addr` (domain lower case) up, asking the primary on a miss.
    /// Never waits longer than `verify_timeout`.
    pub async fn verify(&self, addr: &str) -> Verdict {
        let key = addr.to_ascii_lowercase();
        let rx = {
            let mut st = self.lock();
            match st.cache.get(&key, now32()) {
                Some(true) => {
                    Stats::inc(&self.stats.verify_hits);
                    return Verdict::Accept;
                }
                Some(false) => {
                    Stats::inc(&self.stats.verify_hits);
                    return Verdict::Reject { said: "User unknown".into(), cached: true };
                }
                None => Stats::inc(&self.stats.verify_misses),
            }
            if !self.primary_up(&st) {
                return Verdict::Unknown("primary unreachable".into());
            }
            let (tx, rx) = oneshot::channel();
            let st = &mut *st;
            if let Some((_, w)) = st.inflight.as_mut().filter(|(k, _)| **k == *key) {
                w.push(tx);
            } else if let Some((_, w)) = st.queue.iter_mut().find(|(k, _)| **k == *key) {
                w.push(tx);
            } else if st.queue.len() >= MAX_WAITING {
                return Verdict::Defer("address verification in progress".into());
            } else {
                st.queue.push_back((key.into(), vec![tx]));
                self.wake.notify_one();
            }
            rx
        };
        match tokio::time::timeout(self.cfg.verify_timeout, rx).await {
            Ok(Ok(Answer::Yes)) => Verdict::Accept,
            Ok(Ok(Answer::No(said))) => Verdict::Reject { said, cached: false },
            Ok(Ok(Answer::TempFail(said))) => Verdict::Defer(said),
            Ok(Ok(Answer::Unreachable(why))) => Verdict::Unknown(why),
            Ok(Err(_)) => Verdict::Unknown("address verification stopped".into()),
            // No answer yet, but nothing says the primary is down (a failed
            // probe answers Unreachable): the sender tries again later, as
            // Postfix's "Address verification in progress". Not
            // verify_unknown: whoever keeps the prober busy would get mail
            // for unknown users accepted.
            Err(_) => Verdict::Defer(format!("Address verification in progress (no answer from the primary within verify_timeout, {}s)", self.cfg.verify_timeout.as_secs())),
        }
    }

    /// The prober: one task, one connection to the primary at a time.
    /// Each round: wait for a request (a second at most), answer the
    /// requests, refresh one positive entry when due, close an idle
    /// connection, save the cache when due.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        // The connection, with the route it goes to (`primary = "mx"`:
        // each recipient domain's MX hosts; else the primary, key "").
        let mut conn: Option<(String, Connection)> = None;
        let mut idle_since = tokio::time::Instant::now();
        let mut last_save = tokio::time::Instant::now();
        let mut last_refresh_probe = 0u64;
        loop {
            // Also seen here: a probe cut short by the shutdown has marked
            // the change seen already.
            if *shutdown.borrow() {
                break;
            }
            // Requests left from the last round (see below): no wait.
            if self.lock().queue.is_empty() {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => break,
                }
            }
            self.answer_requests(&mut conn, &mut shutdown, &mut idle_since, &mut last_save).await;
            // Background refresh of positives, at most one a second, only
            // while the primary is up.
            let now = util::now();
            if now != last_refresh_probe
                && let Some(addr) = self.refresh_due(now)
            {
                last_refresh_probe = now;
                log::info!(target: SMTP, "verify: refreshing <{addr}>");
                tokio::select! {
                    _ = self.probe(&mut conn, &addr) => {}
                    _ = shutdown.changed() => break,
                }
                idle_since = tokio::time::Instant::now();
            }
            if conn.is_some() && idle_since.elapsed() >= IDLE_QUIT
                && let Some((_, c)) = conn.take()
            {
                let _ = tokio::time::timeout(self.cfg.verify_timeout, c.quit()).await;
            }
            self.save_if_due(&mut last_save);
        }
        self.shut_down(conn).await;
    }

    /// Answers the queued requests, for a second at most: under a load that
    /// never lets the queue run empty, the refresh after it still has its
    /// turn. Stops early at a shutdown.
    async fn answer_requests(
        &self,
        conn: &mut Option<(String, Connection)>,
        shutdown: &mut watch::Receiver<bool>,
        idle_since: &mut tokio::time::Instant,
        last_save: &mut tokio::time::Instant,
    ) {
        let round = util::now();
        while util::now() == round {
            let Some(addr) = self.next_request() else { break };
            let up = self.primary_up(&self.lock());
            let answer = if up {
                tokio::select! {
                    a = self.probe(conn, &addr) => a,
                    _ = shutdown.changed() => Answer::Unreachable("shutting down".into()),
                }
            } else {
                Answer::Unreachable("primary unreachable".into())
            };
            *idle_since = tokio::time::Instant::now();
            let waiters = self.lock().inflight.take().map(|(_, w)| w).unwrap_or_default();
            for w in waiters {
                let _ = w.send(answer.clone());
            }
            if *shutdown.borrow() {
                break;
            }
            // Also here: under a load that never lets the queue run
            // empty, the save after the round would never come.
            self.save_if_due(last_save);
        }
    }

    /// The oldest request, now in flight (its waiters answered when done).
    fn next_request(&self) -> Option<String> {
        let mut st = self.lock();
        let (k, w) = st.queue.pop_front()?;
        let addr = k.to_string();
        st.inflight = Some((k, w));
        Some(addr)
    }

    /// A positive entry due for a background refresh, marked as tried;
    /// none while the primary is down.
    fn refresh_due(&self, now: u64) -> Option<String> {
        let mut st = self.lock();
        // A quarter of the TTL (Postfix: 7 d of 31 d), and at most
        // half of `[status] recipients_max_age`, so a primary that is
        // up keeps the cache from being flagged stale on the page.
        let mut after = self.cfg.verify_positive_ttl / 4;
        let max_age = self.cfg.status.recipients_max_age;
        if !max_age.is_zero() {
            after = after.min(max_age / 2);
        }
        let after = u32::try_from(after.as_secs()).unwrap_or(u32::MAX);
        let due = if self.primary_up(&st) { st.cache.due_refresh(now as u32, after) } else { None };
        if let Some(a) = &due {
            st.cache.mark_tried(a, now as u32);
        }
        due
    }

    /// At shutdown: answers the waiting sessions, closes, saves.
    async fn shut_down(&self, mut conn: Option<(String, Connection)>) {
        {
            let mut st = self.lock();
            let q: Vec<_> = st.queue.drain(..).collect();
            for (_, w) in q {
                for tx in w {
                    let _ = tx.send(Answer::Unreachable("shutting down".into()));
                }
            }
        }
        if let Some((_, c)) = conn.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), c.quit()).await;
        }
        // A periodic save still running finishes first (both would use the
        // same temporary file).
        for _ in 0..50 {
            if !self.saving.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if self.lock().dirty > 0
            && let Some(done) = self.save(true)
        {
            let _ = tokio::time::timeout(Duration::from_secs(5), done).await;
        }
    }

    /// Saves when the cache changed and a minute has passed since the last
    /// save, or 1,000 answers came in.
    fn save_if_due(&self, last_save: &mut tokio::time::Instant) {
        let dirty = self.lock().dirty;
        if dirty > 0 && (last_save.elapsed() >= SAVE_INTERVAL || dirty >= 1000) && self.save(false).is_some() {
            *last_save = tokio::time::Instant::now();
        }
    }

    /// Writes the cache on a thread of its own (never on the runtime).
    /// `None` when a save is running already or the thread cannot start.
    fn save(&self, forced: bool) -> Option<oneshot::Receiver<()>> {
        if self.saving.swap(true, Ordering::AcqRel) && !forced {
            return None;
        }
        let data = {
            let mut st = self.lock();
            st.dirty = 0;
            st.cache.serialize(now32())
        };
        let (tx, rx) = oneshot::channel();
        let path = self.path.clone();
        let saving = self.saving.clone();
        let spawned = std::thread::Builder::new().name("verify-save".into()).stack_size(64 * 1024).spawn(move || {
            if let Err(e) = write_atomic(&path, &data) {
                static WARN: util::LogLimiter = util::LogLimiter::new();
                if let Some(n) = WARN.allow(util::now()) {
                    log::warn!(target: MASTER, "warning: verify cache {}: cannot save: {e}{}", path.display(), util::LogLimiter::unlogged(n));
                }
            }
            saving.store(false, Ordering::Release);
            let _ = tx.send(());
        });
        if spawned.is_err() {
            self.saving.store(false, Ordering::Release);
            self.lock().dirty = 1;
            return None;
        }
        Some(rx)
    }

    /// Asks the primary about `addr` and records the answer. Bounded by
    /// `verify_timeout` for the connection and once more for the probe.
    async fn probe(&self, conn: &mut Option<(String, Connection)>, addr: &str) -> Answer {
        let answer = classify(self.ask(conn, addr).await);
        self.record(addr, &answer);
        self.publish();
        answer
    }

    /// The primary's reply to RCPT TO:<addr>, or why there is none. Uses
    /// the connection kept from earlier when it goes to the same route,
    /// with one more try on a new one if that was closed meanwhile.
    async fn ask(&self, conn: &mut Option<(String, Connection)>, addr: &str) -> Result<crate::delivery::Reply, String> {
        let limit = self.cfg.verify_timeout;
        let mut fresh = false;
        // With `primary = "mx"` the address is asked where its mail would go:
        // the MX hosts of its domain, as delivery routes it.
        let domain = if self.cfg.primary_list.is_empty() { crate::route::domain_of(addr) } else { String::new() };
        loop {
            if conn.as_ref().is_some_and(|(key, _)| *key != domain) {
                *conn = None;
            }
            if conn.is_none() {
                fresh = true;
                let open = async {
                    let route = crate::route::hosts_for(&self.probe_cfg, &domain).await.map_err(|reply| crate::delivery::ConnectError { reply })?;
                    Connection::open_to(&self.probe_cfg, &route.hops, &domain).await
                };
                match tokio::time::timeout(limit, open).await {
                    Ok(Ok(c)) => *conn = Some((domain.clone(), c)),
                    Ok(Err(e)) => break Err(e.reply.text),
                    Err(_) => break Err(format!("connect to {}: timed out after verify_timeout", self.cfg.primary)),
                }
            }
            let Some((_, c)) = conn.as_mut() else { continue };
            Stats::inc(&self.stats.verify_probes);
            match tokio::time::timeout(limit, c.probe(addr)).await {
                Ok(Ok((reply, reusable))) => {
                    if !reusable {
                        *conn = None;
                    }
                    break Ok(reply);
                }
                Ok(Err(r)) => {
                    *conn = None;
                    // A connection kept from earlier may have been closed by
                    // the primary meanwhile: one more try on a new one.
                    if !fresh {
                        continue;
                    }
                    break Err(r.text);
                }
                Err(_) => {
                    *conn = None;
                    break Err(format!("conversation with {} timed out after verify_timeout", self.cfg.primary));
                }
            }
        }
    }

    /// Keeps an answer: a yes or no in the cache (and the page's figures),
    /// no answer at all as the primary down until `minimal_backoff` has
    /// passed; and logs it.
    fn record(&self, addr: &str, answer: &Answer) {
        let now = now32();
        {
            let mut st = self.lock();
            match answer {
                Answer::Yes | Answer::No(_) => {
                    st.cache.insert(addr, *answer == Answer::Yes, now);
                    st.dirty += 1;
                    Stats::inc(&self.stats.verify_answered);
                    self.stats.verify_last_refresh.store(now, Ordering::Relaxed);
                }
                Answer::TempFail(_) => Stats::inc(&self.stats.verify_answered),
                Answer::Unreachable(why) => {
                    st.down_at = util::now();
                    st.down_until = st.down_at.saturating_add(self.cfg.minimal_backoff.as_secs());
                    static WARN: util::LogLimiter = util::LogLimiter::new();
                    if let Some(n) = WARN.allow(util::now()) {
                        log::warn!(target: SMTP, "warning: verify: cannot ask the primary about <{addr}>: {why}{}", util::LogLimiter::unlogged(n));
                    }
                }
            }
        }
        match answer {
            Answer::Yes => log::info!(target: SMTP, "verify: <{addr}>: status=deliverable"),
            // Debug only: the session's reject line says it already, and a
            // dictionary attack would double the console's lines.
            Answer::No(r) => log::debug!(target: SMTP, "verify: <{addr}>: status=undeliverable ({r})"),
            Answer::TempFail(r) => log::info!(target: SMTP, "verify: <{addr}>: status=deferred ({r})"),
            _ => {}
        }
    }

    /// What to answer when nothing is known and the primary cannot be
    /// asked: `verify_unknown`.
    pub fn unknown_accepts(&self) -> bool {
        self.cfg.verify_unknown == VerifyUnknown::Accept
    }

    /// Positive, negative entries, for tests and the page.
    pub fn counts(&self) -> (usize, usize) {
        self.lock().cache.counts()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86400);

    /// Only a permanent "no such user" is a no (what gets 550 from the
    /// cache for weeks): a 5xx about anything else (a policy block, a bad
    /// sender, 5.1.7/5.1.8 about the probe's sender) or a 4xx is no verdict,
    /// and no reply at all is an unreachable primary.
    #[test]
    fn classify_outcomes() {
        let r = |code: u16, text: &str| Ok(crate::delivery::Reply { code, text: format!("{code} {text}") });
        assert_eq!(classify(r(250, "2.1.5 Ok")), Answer::Yes);
        assert_eq!(classify(r(550, "5.1.1 <x@y>: User unknown")), Answer::No("550 5.1.1 <x@y>: User unknown".into()));
        assert_eq!(classify(r(550, "User unknown")), Answer::No("550 User unknown".into()));
        assert!(matches!(classify(r(554, "5.7.1 Relay access denied")), Answer::TempFail(_)));
        assert!(matches!(classify(r(550, "5.1.8 Bad sender address")), Answer::TempFail(_)));
        assert!(matches!(classify(r(550, "5.1.7 Bad sender mailbox")), Answer::TempFail(_)));
        assert!(matches!(classify(r(450, "4.1.1 try later")), Answer::TempFail(_)));
        assert!(matches!(classify(r(554, "no")), Answer::TempFail(_)));
        assert_eq!(classify(Err("connect: refused".into())), Answer::Unreachable("connect: refused".into()));
    }

    #[test]
    fn ttl_expires_entries() {
        let mut c = Cache::new(100, Duration::from_secs(100), Duration::from_secs(10));
        c.insert("a@x", true, 1000);
        c.insert("b@x", false, 1000);
        assert_eq!(c.get("a@x", 1099), Some(true));
        assert_eq!(c.get("a@x", 1100), None);
        assert_eq!(c.get("b@x", 1009), Some(false));
        assert_eq!(c.get("b@x", 1010), None);
        assert_eq!(c.get("c@x", 1000), None);
        c.expire(1050);
        assert_eq!(c.counts(), (1, 0));
        // An answer that changes moves between the two kinds.
        c.insert("a@x", false, 1060);
        assert_eq!(c.counts(), (0, 1));
        assert_eq!(c.get("a@x", 1061), Some(false));
    }

    #[test]
    fn dictionary_attack_keeps_the_bounds_and_the_positives() {
        let mut c = Cache::new(2000, 31 * DAY, 3 * DAY);
        for i in 0..1000 {
            c.insert(&format!("user{i}@example.org"), true, 1000 + i);
        }
        for i in 0..100_000u32 {
            c.insert(&format!("random{i}@example.org"), false, 5000 + i / 10);
            assert!(c.len() <= 2000);
            assert!(c.counts().1 <= 500, "{:?}", c.counts());
        }
        assert_eq!(c.counts().0, 1000, "no positive was evicted by negatives");
        // The newest negatives are kept, the oldest went first.
        assert_eq!(c.get("random99999@example.org", 20000), Some(false));
        assert_eq!(c.get("random0@example.org", 20000), None);
        // Positives past the bound: negatives go first, then old positives.
        for i in 0..5000 {
            c.insert(&format!("new{i}@example.org"), true, 30000 + i);
            assert!(c.len() <= 2000);
        }
        assert_eq!(c.counts().1, 0);
        assert_eq!(c.get("new4999@example.org", 40000), Some(true));
        assert_eq!(c.get("user0@example.org", 40000), None);
    }

    #[test]
    fn a_negative_never_evicts_a_positive() {
        // A site with at least verify_cache_size users: the cache is all
        // positives, no negative to make room with. One unknown address
        // must not push out known users (an eighth of them were dropped):
        // the cache is what answers for them while the primary is down.
        let mut c = Cache::new(2000, 31 * DAY, 3 * DAY);
        for i in 0..2000 {
            c.insert(&format!("user{i}@example.org"), true, 1000 + i);
        }
        assert_eq!(c.counts(), (2000, 0));
        for i in 0..10 {
            c.insert(&format!("random{i}@example.org"), false, 5000 + i);
            assert_eq!(c.counts().0, 2000, "after {} unknown addresses", i + 1);
            assert!(c.len() <= 2000);
        }
        assert_eq!(c.get("user0@example.org", 6000), Some(true));
    }

    #[test]
    fn expired_entries_go_before_live_ones() {
        let mut c = Cache::new(8, Duration::from_secs(100), Duration::from_secs(100));
        for i in 0..8 {
            c.insert(&format!("p{i}@x"), true, if i == 3 { 1 } else { 1000 });
        }
        c.insert("new@x", true, 1050);
        assert_eq!(c.get("p3@x", 1050), None);
        for i in [0, 1, 2, 4, 5, 6, 7] {
            assert_eq!(c.get(&format!("p{i}@x"), 1050), Some(true), "p{i}");
        }
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = std::env::temp_dir().join(format!("bartleby-verify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(CACHE_FILE);
        let mut c = Cache::new(100, 31 * DAY, 3 * DAY);
        c.insert("bob@example.org", true, 1_000_000);
        c.insert("nobody@example.org", false, 1_000_000);
        c.insert("old@example.org", false, 1);
        write_atomic(&path, &c.serialize(1_000_010)).unwrap();
        let mut d = Cache::new(100, 31 * DAY, 3 * DAY);
        assert_eq!(d.load(&path, 1_000_010), Ok(Some(2)));
        assert_eq!(d.get("bob@example.org", 1_000_010), Some(true));
        assert_eq!(d.get("nobody@example.org", 1_000_010), Some(false));
        assert_eq!(d.get("old@example.org", 1_000_010), None);
        assert_eq!(d.newest(), 1_000_000);
        // A smaller bound keeps the newest.
        let mut e = Cache::new(4, 31 * DAY, 3 * DAY);
        assert_eq!(e.load(&path, 1_000_010), Ok(Some(2)));
        // A file of many times the bound: the newest entries are kept.
        let mut text = String::from(HEADER);
        text.push('\n');
        for i in 0..1000u32 {
            text.push_str(&format!("+ {} u{i}@example.org\n", 1_000_000 + i));
        }
        std::fs::write(&path, text).unwrap();
        let mut f = Cache::new(10, 31 * DAY, 3 * DAY);
        assert!(f.load(&path, 1_001_000).unwrap().unwrap() <= 20);
        assert_eq!(f.len(), 10);
        assert_eq!(f.get("u999@example.org", 1_001_000), Some(true));
        assert_eq!(f.get("u989@example.org", 1_001_000), None);
        // No file: nothing, no error.
        assert_eq!(Cache::new(10, DAY, DAY).load(&dir.join("none"), 5), Ok(None));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn what_is_saved_loads_again() {
        // Whatever insert takes, load must take back: one entry the loader
        // refuses throws the whole cache away at the next start (moved to
        // corrupt/), a cold cache in the next outage. With SMTPUTF8 (issue
        // 11) a local part may be UTF-8; to_ascii_lowercase keeps it as is.
        let dir = std::env::temp_dir().join(format!("bartleby-verify-utf8-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(CACHE_FILE);
        let mut c = Cache::new(100, 31 * DAY, 3 * DAY);
        c.insert("jörg@example.org", true, 1_000_000);
        c.insert("bob@example.org", true, 1_000_000);
        // Never a second line out of one address.
        c.insert("x@example.org\n- 1000000 bob@example.org", true, 1_000_001);
        c.insert("y@example.org - 1000000 z@example.org", true, 1_000_001);
        write_atomic(&path, &c.serialize(1_000_010)).unwrap();
        let mut d = Cache::new(100, 31 * DAY, 3 * DAY);
        assert_eq!(d.load(&path, 1_000_010), Ok(Some(2)));
        assert_eq!(d.get("jörg@example.org", 1_000_010), Some(true));
        assert_eq!(d.get("bob@example.org", 1_000_010), Some(true));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn damaged_files_are_errors() {
        let dir = std::env::temp_dir().join(format!("bartleby-verify-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(CACHE_FILE);
        let cases: [&[u8]; 8] = [
            b"garbage\n",
            b"",
            b"# bartleby verify cache 1\n+ 12 bob@example.org",
            b"# bartleby verify cache 1\n* 12 bob@example.org\n",
            b"# bartleby verify cache 1\n+ x bob@example.org\n",
            b"# bartleby verify cache 1\n+ 12 bob\n",
            b"# bartleby verify cache 1\n+ 12 b\xffb@example.org\n",
            b"# bartleby verify cache 1\n+ 99999999999 bob@example.org\n",
        ];
        for case in cases {
            std::fs::write(&p, case).unwrap();
            let r = Cache::new(10, DAY, DAY).load(&p, 100);
            assert!(r.is_err(), "{:?} -> {r:?}", String::from_utf8_lossy(case));
        }
        let long = format!("# bartleby verify cache 1\n+ 12 {}@example.org\n", "a".repeat(5000));
        std::fs::write(&p, long).unwrap();
        assert!(Cache::new(10, DAY, DAY).load(&p, 100).unwrap_err().contains("line 2"));
        std::fs::remove_file(&p).unwrap();
        std::fs::create_dir(&p).unwrap();
        assert!(Cache::new(10, DAY, DAY).load(&p, 100).unwrap_err().contains("directory"));
        std::fs::remove_dir(&p).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &p).unwrap();
        assert!(Cache::new(10, DAY, DAY).load(&p, 100).unwrap_err().contains("symbolic link"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refresh_picks_the_oldest_positive_once_a_minute() {
        let mut c = Cache::new(10, Duration::from_secs(400), Duration::from_secs(400));
        c.insert("a@x", true, 100);
        c.insert("b@x", true, 50);
        c.insert("n@x", false, 10);
        assert_eq!(c.due_refresh(120, 100), None);
        assert_eq!(c.due_refresh(160, 100).as_deref(), Some("b@x"));
        c.mark_tried("b@x", 160);
        assert_eq!(c.due_refresh(161, 100), None);
        assert_eq!(c.due_refresh(200, 100).as_deref(), Some("a@x"));
        c.mark_tried("a@x", 200);
        assert_eq!(c.due_refresh(201, 100), None);
        assert_eq!(c.due_refresh(221, 100).as_deref(), Some("b@x"));
        // An answer resets the refresh: due again only `after` later.
        c.insert("b@x", true, 221);
        assert_eq!(c.due_refresh(300, 100).as_deref(), Some("a@x"));
        c.insert("a@x", true, 300);
        assert_eq!(c.due_refresh(310, 100), None);
    }
}

#[cfg(test)]
mod property {
    use super::*;
    #[test]
    fn cache_counts_and_bounds_hold_under_random_operations() {
        let mut seed = 12345u64;
        let mut rnd = move |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for round in 0..50 {
            let max = 4 + rnd(40) as usize;
            let mut c = Cache::new(max, Duration::from_secs(1 + rnd(200)), Duration::from_secs(1 + rnd(200)));
            let mut now = 1000u32;
            for _ in 0..5000 {
                now += rnd(5) as u32;
                match rnd(10) {
                    0 => c.expire(now),
                    1 => { let _ = c.due_refresh(now, rnd(100) as u32); }
                    _ => c.insert(&format!("a{}@x", rnd(60)), rnd(3) == 0, now.saturating_sub(rnd(300) as u32)),
                }
                let neg = c.map.values().filter(|e| !e.ok).count();
                assert_eq!(c.negatives, neg, "round {round}");
                assert!(c.len() <= c.max, "round {round}");
                assert!(c.negatives <= c.max_negative, "round {round} {} > {}", c.negatives, c.max_negative);
            }
        }
    }
}
