//! The scheduler: decides when each queued message is tried again.
//!
//! * A new message is tried at once, unless the primary was found down
//!   less than `minimal_backoff` ago (a dead-host cache, as Postfix's qmgr
//!   keeps): then it waits with the others instead of hammering the primary.
//! * After a failed attempt the delay doubles from `minimal_backoff` up to
//!   `maximal_backoff`.
//! * Every `queue_run_interval`, and on `flush`, ETRN or the page's button,
//!   a full queue run tries every message now, like `sendmail -q`.
//! * A message still undelivered after `max_queue_lifetime` is bounced.
//!
//! All due messages of a run travel over one connection to the primary.
//! The in-memory index holds only a few numbers per message; envelopes are
//! read from the spool when a message is tried.
//!
//! When the spool cannot record an outcome (removing a delivered message or
//! writing its state fails: a read-only, full or failing file system), the
//! scheduler says so, naming the message that will be delivered again after
//! a restart, and starts no new delivery until a probe finds the spool
//! writable again: the duplicates a restart can cause are bounded by the
//! deliveries in flight (`delivery_connections`). Postfix's qmgr, in the
//! same spot, exits with "fatal: ... remove ...: Read-only file system" and
//! is restarted by master later, with the same effect.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::watch;

use crate::bounces::{self, Reason};
use crate::config::Config;
use crate::delivery::{Connection, Outcome, Reply};
use crate::logging::QMGR;
use crate::spool::{Committer, DeliveryState, QueuedMessage, RcptStatus, Spool};
use crate::stats::Stats;
use crate::util::{self, QueueId};

/// What a delivery worker reports back.
enum Attempt {
    /// The last field is answered once the outcome is recorded (or found
    /// unrecordable, which empties the work list first): the worker takes
    /// its next message only then, so a spool that cannot record stops
    /// every worker after the message it has in hand.
    Done(Box<QueuedMessage>, Outcome, String, tokio::sync::oneshot::Sender<()>),
    /// The message left the queue meanwhile.
    Gone(QueueId),
    /// Its queue file could not be read (I/O error, permissions): it is
    /// left alone until a later run instead of being retried at once.
    Unreadable(QueueId, std::io::Error),
}

/// One connection's worth of deliveries: takes due messages from the shared
/// list until it is empty. Opens its own connection unless handed one; a
/// worker that cannot connect leaves the messages to the others.
async fn worker(
    cfg: Arc<Config>,
    spool: Spool,
    queue: Arc<Mutex<VecDeque<QueueId>>>,
    tx: tokio::sync::mpsc::UnboundedSender<Attempt>,
    conn: Option<Connection>,
    shutdown: watch::Receiver<bool>,
) {
    let mut conn = match conn {
        Some(c) => c,
        None => match Connection::open(&cfg).await {
            Ok(c) => c,
            Err(e) => {
                log::info!(target: QMGR, "extra connection to the primary refused: {}", e.reply.text);
                return;
            }
        },
    };
    loop {
        if *shutdown.borrow() {
            break;
        }
        let Some(id) = queue.lock().ok().and_then(|mut q| q.pop_front()) else { break };
        let msg = match spool.read(&id) {
            Ok(m) => m,
            Err(e) => {
                let _ = tx.send(if e.kind() == std::io::ErrorKind::NotFound { Attempt::Gone(id) } else { Attempt::Unreadable(id, e) });
                continue;
            }
        };
        let outcome = conn.deliver(&spool, &msg).await;
        let relay = conn.relay.clone();
        let reusable = outcome.reusable;
        let (recorded, wait_recorded) = tokio::sync::oneshot::channel();
        let _ = tx.send(Attempt::Done(Box::new(msg), outcome, relay, recorded));
        let _ = wait_recorded.await;
        if !reusable {
            // The connection broke, or stopped mid-message: close it without
            // QUIT (in DATA, a QUIT would be message text and its wait for a
            // reply would time out), which makes the primary discard any
            // half-sent message. One new try, else leave the rest to others.
            drop(conn);
            match Connection::open(&cfg).await {
                Ok(c) => conn = c,
                Err(e) => {
                    log::info!(target: QMGR, "lost the primary mid-run: {}", e.reply.text);
                    return;
                }
            }
        }
    }
    conn.quit().await;
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    next: u64,
    size: u64,
}

/// How often a spool that could not record an outcome is probed.
const PROBE_INTERVAL: Duration = Duration::from_secs(10);

/// A delivery outcome the spool could not record yet. The message is out of
/// `entries` meanwhile: never delivered again within this server's life.
enum Unrecorded {
    /// Every recipient is done: the queue file must go.
    Remove,
    /// Some recipients are done: this state must be on disk before the
    /// message may be tried again (the size is for its index entry).
    State(DeliveryState, u64),
}

pub struct Scheduler {
    cfg: Arc<Config>,
    spool: Spool,
    stats: Arc<Stats>,
    committer: Committer,
    rx: UnboundedReceiver<(QueueId, u64)>,
    entries: BTreeMap<QueueId, Entry>,
    /// The primary is taken as down until then (unix seconds).
    dead_until: u64,
    /// Why the primary could not be reached on the last try.
    down_reply: Option<Reply>,
    last_full_run: u64,
    /// Set (with the error) when the spool could not record an outcome:
    /// no delivery starts until [`Scheduler::writable`] clears it.
    broken: Option<String>,
    /// Outcomes still to record, retried when the spool is writable again.
    /// Bounded: deliveries stop at the first failure, so each failure adds
    /// at most the deliveries then in flight.
    unrecorded: BTreeMap<QueueId, Unrecorded>,
    /// The work list of the queue run in progress, so that a failure to
    /// record can stop it.
    current: Option<Arc<Mutex<VecDeque<QueueId>>>>,
}

/// The delay before attempt `attempts + 1`.
pub fn backoff(cfg: &Config, attempts: u32) -> Duration {
    let min = cfg.minimal_backoff.as_secs().max(1);
    let shift = attempts.saturating_sub(1).min(30);
    Duration::from_secs(min.saturating_mul(1u64 << shift).min(cfg.maximal_backoff.as_secs().max(min)))
}

impl Scheduler {
    pub fn new(cfg: Arc<Config>, spool: Spool, stats: Arc<Stats>, committer: Committer, rx: UnboundedReceiver<(QueueId, u64)>) -> Scheduler {
        Scheduler {
            cfg,
            spool,
            stats,
            committer,
            rx,
            entries: BTreeMap::new(),
            dead_until: 0,
            down_reply: None,
            last_full_run: util::now(),
            broken: None,
            unrecorded: BTreeMap::new(),
            current: None,
        }
    }

    /// Indexes what is already in the spool (after a restart).
    fn load(&mut self) {
        let ids = match self.spool.ids() {
            Ok(ids) => ids,
            Err(e) => {
                log::error!(target: QMGR, "error: cannot read the queue: {e}");
                return;
            }
        };
        for id in ids {
            match self.spool.read(&id) {
                Ok(m) => {
                    // Per-client queue shares survive a restart. This runs
                    // before any session is polled (first task spawned).
                    self.stats.clients.queued_at_start(&m.env.client, util::now());
                    self.entries.insert(id, Entry { next: m.state.next_attempt, size: m.size });
                }
                // Indexed all the same, so later runs try it again.
                Err(e) => self.unreadable(id, &e),
            }
        }
        self.publish();
        if !self.entries.is_empty() {
            log::info!(target: QMGR, "{} messages in the queue at start", self.entries.len());
        }
    }

    /// Updates the queue figures the status page reads.
    fn publish(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.stats.queue_messages.store(self.entries.len() as u32, Relaxed);
        let kib: u64 = self.entries.values().map(|e| e.size).sum::<u64>() / 1024;
        self.stats.queue_kib.store(kib.min(u32::MAX as u64) as u32, Relaxed);
        self.stats.primary_retry_at.store(self.dead_until.min(u32::MAX as u64) as u32, Relaxed);
    }

    fn add(&mut self, id: QueueId, size: u64) {
        let now = util::now();
        let next = if now < self.dead_until { self.dead_until } else { now };
        self.entries.insert(id, Entry { next, size });
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        self.load();
        let stats = self.stats.clone();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let now = util::now();
            let interval = self.cfg.queue_run_interval.as_secs();
            let full_at = self.last_full_run + interval;
            let due_at = self.entries.values().map(|e| e.next).min().unwrap_or(u64::MAX).min(full_at);
            let mut wait = Duration::from_secs(due_at.saturating_sub(now)).min(self.cfg.queue_run_interval);
            if self.broken.is_some() {
                // Due messages wait for the spool, not in a loop of failed probes.
                wait = PROBE_INTERVAL;
            }
            tokio::select! {
                id = self.rx.recv() => {
                    let Some((id, size)) = id else { break };
                    self.add(id, size);
                    while let Ok((id, size)) = self.rx.try_recv() {
                        self.add(id, size);
                    }
                    self.publish();
                }
                _ = stats.flush.notified() => {
                    log::info!(target: QMGR, "queue run requested (flush)");
                    if self.writable() {
                        self.run_queue(true, &shutdown).await;
                    } else {
                        log::warn!(
                            target: QMGR,
                            "warning: queue run skipped: the spool still cannot record delivery results ({})",
                            self.broken.as_deref().unwrap_or("")
                        );
                    }
                }
                _ = tokio::time::sleep(wait) => {
                    if self.writable() {
                        let full = util::now() >= full_at;
                        self.run_queue(full, &shutdown).await;
                    }
                }
                _ = stats.spool_probe.notified() => {
                    // A session could not store a message: is the spool at
                    // fault (read-only, failing), or was it that one file?
                    if self.broken.is_none() {
                        match self.spool.probe_writable() {
                            Ok(()) => stats.spool_unwritable.store(false, std::sync::atomic::Ordering::Relaxed),
                            Err(e) => self.suspend(&e),
                        }
                    }
                }
                _ = shutdown.changed() => {}
            }
        }
        log::info!(target: QMGR, "scheduler stopped");
    }

    /// Tries every due message (all of them when `full`), over up to
    /// `delivery_connections` connections to the primary. The workers only
    /// deliver; every outcome comes back here to be recorded, so the queue
    /// state has a single writer.
    async fn run_queue(&mut self, full: bool, shutdown: &watch::Receiver<bool>) {
        if !self.unrecorded.is_empty() {
            self.record_pending();
        }
        if self.broken.is_some() {
            return;
        }
        let now = util::now();
        if full {
            self.last_full_run = now;
            self.dead_until = 0;
            self.publish();
        }
        let due: VecDeque<QueueId> = self.entries.iter().filter(|(_, e)| full || e.next <= now).map(|(id, _)| id.clone()).collect();
        if due.is_empty() {
            return;
        }
        let first = match Connection::open(&self.cfg).await {
            Ok(c) => {
                self.stats.primary_result(true, "");
                self.down_reply = None;
                c
            }
            Err(e) => {
                self.primary_down(&e.reply);
                for id in due {
                    if self.broken.is_some() {
                        break;
                    }
                    self.defer_unreached(&id, &e.reply).await;
                }
                self.publish();
                return;
            }
        };
        let workers = self.cfg.delivery_connections.clamp(1, due.len());
        let queue = Arc::new(Mutex::new(due));
        self.current = Some(queue.clone());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut first = Some(first);
        for _ in 0..workers {
            tokio::spawn(worker(
                self.cfg.clone(),
                self.spool.clone(),
                queue.clone(),
                tx.clone(),
                first.take(),
                shutdown.clone(),
            ));
        }
        drop(tx);
        while let Some(r) = rx.recv().await {
            match r {
                Attempt::Done(msg, outcome, relay, recorded) => {
                    self.apply(&msg, outcome, &relay).await;
                    let _ = recorded.send(());
                }
                Attempt::Gone(id) => {
                    self.entries.remove(&id);
                }
                Attempt::Unreadable(id, e) => self.unreadable(id, &e),
            }
        }
        self.current = None;
        // Messages no worker could take (every connection failed): they wait.
        let left: Vec<QueueId> = queue.lock().map(|mut q| q.drain(..).collect()).unwrap_or_default();
        if !left.is_empty() && !*shutdown.borrow() && self.broken.is_none() {
            let reply = self.down_reply.clone().unwrap_or_else(|| Reply::local(421, "4.4.2 lost connection with the primary"));
            for id in left {
                if self.broken.is_some() {
                    break;
                }
                self.defer_unreached(&id, &reply).await;
            }
        }
        self.publish();
    }

    /// Records a failed attempt for a message the primary could not be reached for.
    async fn defer_unreached(&mut self, id: &QueueId, reply: &Reply) {
        match self.spool.read(id) {
            Ok(msg) => {
                let rcpts = msg.pending().map(|r| (r.addr.clone(), reply.clone())).collect();
                self.apply(&msg, Outcome { rcpts, reusable: false }, "none").await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.entries.remove(id);
            }
            Err(e) => self.unreadable(id.clone(), &e),
        }
    }

    /// A queue file that exists but cannot be read: logged, and not tried
    /// again before `minimal_backoff` has passed. Left due, it would make the
    /// scheduler loop at once into another run that fails the same way.
    fn unreadable(&mut self, id: QueueId, e: &std::io::Error) {
        log::error!(target: QMGR, "error: {id}: cannot read queue file: {e}; next try in {}s", self.cfg.minimal_backoff.as_secs().max(1));
        let next = util::now().saturating_add(self.cfg.minimal_backoff.as_secs().max(1));
        self.entries.entry(id).or_insert(Entry { next, size: 0 }).next = next;
    }

    /// The spool could not record something: the queue run in progress
    /// starts no further delivery (those in flight finish; their outcomes
    /// may not be recorded either: at most `delivery_connections - 1` more),
    /// and none starts until [`Scheduler::writable`] finds the spool
    /// writable again. MAIL gets 452 meanwhile.
    fn suspend(&mut self, e: &std::io::Error) {
        if let Some(q) = &self.current
            && let Ok(mut q) = q.lock()
        {
            q.clear();
        }
        if self.broken.is_none() {
            log::warn!(
                target: QMGR,
                "warning: spool {} cannot record delivery results ({e}): no new deliveries until it is writable again (checked every {}s)",
                self.spool.root().display(),
                PROBE_INTERVAL.as_secs()
            );
            self.stats.spool_unwritable.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.broken = Some(e.to_string());
    }

    /// True when deliveries may start: at once if nothing failed, else
    /// when a probe (create, sync, remove a file in `state/` and `queue/`)
    /// finds the spool writable again.
    fn writable(&mut self) -> bool {
        if self.broken.is_none() {
            return true;
        }
        if let Err(e) = self.spool.probe_writable() {
            log::debug!(target: QMGR, "spool still not writable: {e}");
            self.broken = Some(e.to_string());
            return false;
        }
        log::info!(target: QMGR, "spool {} is writable again: deliveries resume", self.spool.root().display());
        self.broken = None;
        self.stats.spool_unwritable.store(false, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Records the outcomes that could not be recorded before. A failure
    /// now (right after a successful probe: a problem of that one file) is
    /// logged and kept for the next run; the message stays out of the queue
    /// runs until its outcome is on disk.
    fn record_pending(&mut self) {
        for (id, u) in std::mem::take(&mut self.unrecorded) {
            match u {
                Unrecorded::Remove => match self.spool.remove(&id) {
                    Ok(()) => log::info!(target: QMGR, "{id}: removed (recorded late: the spool is writable again)"),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => log::info!(target: QMGR, "{id}: removed"),
                    Err(e) => {
                        log::error!(target: QMGR, "error: {id}: still cannot remove queue file: {e}; it will be delivered again after a restart");
                        self.unrecorded.insert(id, Unrecorded::Remove);
                    }
                },
                Unrecorded::State(state, size) => match self.spool.write_state(&id, &state, true) {
                    Ok(()) => {
                        log::info!(target: QMGR, "{id}: delivery state recorded (late: the spool is writable again)");
                        self.entries.insert(id, Entry { next: state.next_attempt, size });
                    }
                    Err(e) => {
                        log::error!(target: QMGR, "error: {id}: still cannot record delivery state: {e}");
                        self.unrecorded.insert(id, Unrecorded::State(state, size));
                    }
                },
            }
        }
        self.note_unrecorded();
    }

    fn note_unrecorded(&self) {
        let n = u32::try_from(self.unrecorded.len()).unwrap_or(u32::MAX);
        self.stats.spool_unrecorded.store(n, std::sync::atomic::Ordering::Relaxed);
    }

    fn primary_down(&mut self, reply: &Reply) {
        log::warn!(target: QMGR, "warning: primary unreachable: {}", reply.text);
        self.stats.primary_result(false, &reply.text);
        self.dead_until = util::now().saturating_add(self.cfg.minimal_backoff.as_secs());
        self.down_reply = Some(reply.clone());
    }

    /// Records the outcome of one attempt: sent recipients are done, 5xx
    /// ones bounce, 4xx ones wait; an expired message bounces whatever is left.
    async fn apply(&mut self, msg: &QueuedMessage, outcome: Outcome, relay: &str) {
        let now = util::now();
        let id = &msg.env.id;
        let delay = now.saturating_sub(msg.env.arrival);
        if let Some(err) = &msg.state_error {
            // The state was taken as lost (every recipient pending): keep the
            // bad file for the admin, out of the way of the new one.
            match self.spool.quarantine_state(id) {
                Ok(to) => log::warn!(
                    target: QMGR,
                    "warning: {id}: delivery state unusable ({err}); moved to {}; recipients not recorded as done were tried again",
                    to.display()
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::error!(target: QMGR, "error: {id}: delivery state unusable ({err}); cannot move it to corrupt/: {e}"),
            }
        }
        let mut state = msg.state.clone();
        state.attempts += 1;
        state.last_attempt = now;
        state.errors.clear();
        let mut rejected: Vec<(String, Reply)> = Vec::new();
        let mut deferred: Vec<(String, Reply)> = Vec::new();
        let mut newly_done = false;
        for (rcpt, reply) in outcome.rcpts {
            let status = if reply.is_ok() {
                "sent"
            } else if reply.is_permanent() {
                "bounced"
            } else {
                "deferred"
            };
            log::info!(
                target: crate::logging::SMTP,
                "{id}: to=<{rcpt}>, relay={relay}, delay={delay}, tries={}, status={status} ({})",
                state.attempts,
                reply.text
            );
            if reply.is_ok() {
                state.done.push((rcpt, RcptStatus::Sent, reply.text));
                newly_done = true;
            } else if reply.is_permanent() {
                rejected.push((rcpt, reply));
            } else {
                deferred.push((rcpt, reply));
            }
        }
        let lifetime = self.cfg.max_queue_lifetime.as_secs();
        let expired = !deferred.is_empty() && now.saturating_sub(msg.env.arrival) >= lifetime;
        let mut expired_list = Vec::new();
        if expired {
            for (rcpt, reply) in &deferred {
                log::info!(
                    target: QMGR,
                    "{id}: to=<{rcpt}>, relay={relay}, delay={delay}, status=expired, returned to sender ({})",
                    reply.text
                );
            }
            expired_list = std::mem::take(&mut deferred);
        }
        // Bounces first, durably, and only then mark the recipients done:
        // a crash in between bounces twice at worst, never loses the notice.
        for (list, reason) in [(&rejected, Reason::Rejected), (&expired_list, Reason::Expired)] {
            if list.is_empty() {
                continue;
            }
            let ticket = self.committer.ticket();
            let bounce = bounces::queue_bounce(&self.cfg, &self.spool, &{ let mut m = msg.clone(); m.state.last_attempt = now; m }, list, reason);
            let ok = match bounce {
                Ok(Some(bid)) => match self.committer.commit(ticket).await {
                    Ok(()) => {
                        log::info!(target: crate::logging::BOUNCE, "{id}: sender non-delivery notification: {bid}");
                        Stats::inc(&self.stats.bounced);
                        let size = self.spool.read(&bid).map(|m| m.size).unwrap_or(0);
                        self.add(bid, size);
                        true
                    }
                    Err(e) => {
                        log::error!(target: crate::logging::BOUNCE, "error: {id}: cannot make bounce durable: {e}");
                        let _ = self.spool.remove(&bid);
                        false
                    }
                },
                Ok(None) => {
                    log::info!(target: crate::logging::BOUNCE, "{id}: bounce of a bounce (null sender): discarded");
                    Stats::inc(&self.stats.bounced);
                    true
                }
                Err(e) => {
                    log::error!(target: crate::logging::BOUNCE, "error: {id}: cannot write bounce: {e}");
                    false
                }
            };
            for (rcpt, reply) in list {
                if ok {
                    state.done.push((rcpt.clone(), RcptStatus::Bounced, reply.text.clone()));
                    newly_done = true;
                } else {
                    deferred.push((rcpt.clone(), reply.clone()));
                }
            }
        }
        let pending_left = msg.env.recipients.iter().any(|r| !state.done.iter().any(|(d, _, _)| d == r));
        if !pending_left {
            // Out of the index whatever happens below: a message whose every
            // recipient is done is never tried again in this server's life,
            // even if its removal cannot be recorded.
            self.entries.remove(id);
            self.stats.clients.left_queue(&msg.env.client, &crate::clients::Limits::of(&self.cfg));
            match self.spool.remove(id) {
                Ok(()) => log::info!(target: QMGR, "{id}: removed"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => log::info!(target: QMGR, "{id}: removed"),
                Err(e) => {
                    log::error!(
                        target: QMGR,
                        "error: {id}: cannot remove queue file: {e}; the message was delivered but stays in the queue: it will be delivered again after a restart, unless the spool is writable again before"
                    );
                    self.unrecorded.insert(id.clone(), Unrecorded::Remove);
                    self.note_unrecorded();
                    self.suspend(&e);
                }
            }
            if state.done.iter().any(|(_, s, _)| *s == RcptStatus::Sent) {
                Stats::inc(&self.stats.delivered);
            }
            self.publish();
            return;
        }
        Stats::inc(&self.stats.deferred);
        let wait = backoff(&self.cfg, state.attempts).as_secs();
        state.next_attempt = now.saturating_add(wait);
        if let Some((_, r)) = deferred.first() {
            state.last_error = r.text.clone();
        }
        state.errors = deferred.iter().map(|(a, r)| (a.clone(), r.text.clone())).collect();
        if let Err(e) = self.spool.write_state(id, &state, newly_done) {
            if newly_done {
                log::error!(
                    target: QMGR,
                    "error: {id}: cannot record delivery state: {e}; the recipients delivered to in this attempt will get the message again after a restart, unless the spool is writable again before"
                );
                // Not tried again before its state is on disk: a retry now
                // would read the old state and deliver to them twice.
                self.entries.remove(id);
                self.unrecorded.insert(id.clone(), Unrecorded::State(state, msg.size));
                self.note_unrecorded();
                self.publish();
            } else {
                // Only the retry time is lost; keep it in memory.
                log::error!(target: QMGR, "error: {id}: cannot write delivery state: {e}");
                if let Some(en) = self.entries.get_mut(id) {
                    en.next = state.next_attempt;
                }
            }
            self.suspend(&e);
            return;
        }
        if let Some(e) = self.entries.get_mut(id) {
            e.next = state.next_attempt;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let cfg = Config::parse(
            "hostname = \"b.example.org\"\nrelay_domains = [\"example.org\"]\nprimary = \"127.0.0.1:2526\"\nminimal_backoff = \"5m\"\nmaximal_backoff = \"1h\"\n",
            std::path::Path::new("t"),
        )
        .unwrap();
        let secs: Vec<u64> = (1..=6).map(|a| backoff(&cfg, a).as_secs()).collect();
        assert_eq!(secs, vec![300, 600, 1200, 2400, 3600, 3600]);
        assert_eq!(backoff(&cfg, 1000).as_secs(), 3600);
    }
}
