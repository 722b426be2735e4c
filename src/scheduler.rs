//! The scheduler: decides when each queued message is tried again. Role:
//! the queue's index and the only writer of delivery outcomes (states,
//! removals, bounces queued through [`bounces`]); delivers through a
//! [`Courier`] and its [`workers`], never over a socket of its own.
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
//! With `primary = "mx"`, due messages are grouped by destination (the
//! addresses their recipient domain's MX records give, see
//! [`route`](crate::route)), as Postfix's per-nexthop queues: each group
//! has its own connections and its own dead-host cache; a message with
//! recipients in several destinations goes in the group of its first one,
//! and its worker delivers to the others over connections of their own, so
//! that one attempt records every recipient's outcome.
//! The in-memory index holds only a few numbers per message; envelopes are
//! read from the spool when a message is tried.
//!
//! Recording outcomes when the spool cannot be written. An outcome is
//! recorded by removing the queue file (every recipient done: an unlink,
//! which needs no space, even on a full ext4 or tmpfs) or by writing the
//! delivery state (some recipients done: needs space; only a retry time:
//! harmless to lose, the message is just tried sooner). So:
//!
//! * a removal fails (read-only, failing disk, EPERM): the scheduler says
//!   so, naming the message that will be delivered again after a restart,
//!   and starts no new delivery (*suspended*) until the write probe passes
//!   in `queue/`: the duplicates a restart can cause are bounded by the
//!   deliveries in flight (`delivery_connections`). Postfix's qmgr, in the
//!   same spot, exits with "fatal: ... remove ...: Read-only file system"
//!   and is restarted by master later, with the same effect;
//! * a state write fails for lack of space (ENOSPC, EDQUOT), or the probe
//!   passes in `queue/` but not in `state/`, or fails in `queue/` for lack
//!   of space: *removals only*. Only messages with one recipient left are
//!   delivered: their outcome is a removal (or a retry time), so they drain
//!   a full spool and free its space. A message with more recipients left
//!   waits ("held"): delivered in part, it would need a state write, and a
//!   restart before that is written would deliver to those recipients
//!   again. Duplicates thus stay bounded by the deliveries in flight when
//!   the failure was seen, and the spool still drains;
//! * a state write after a partial delivery fails for another reason
//!   (read-only, EIO, EPERM): suspended, as for a removal, until the probe
//!   tells more;
//! * only a retry time cannot be written: kept in memory (lost in a
//!   restart, it only means an earlier try); no delivery stops for it, the
//!   probe it asks for decides;
//! * a probe (create, write, sync, remove a file; sync the directory, in
//!   `free/`, `queue/` and `state/`) runs on a blocking thread with a
//!   timeout, driven beside the scheduler's loop (never behind it), so
//!   neither a queue run nor a hanging disk delays it or stalls the SMTP
//!   sessions: at once after a write failure (at
//!   most one a second), then every 10 s while it fails. When it passes,
//!   the outcomes not yet recorded are written, held messages and any flush
//!   asked for meanwhile run, and MAIL is accepted again.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::watch;

use crate::bounces::{self, Reason};
use crate::config::Config;
use crate::courier::{Courier, Smtp};
use crate::delivery::{Outcome, Reply, Verdict};
use crate::route::{self, Route};
use crate::workers::{self, Attempt, Dest, Pool, Routes, WorkList, route_of};
use crate::logging::{self, QMGR};
use crate::spool::{Committer, DeliveryState, QueuedMessage, RcptStatus, Spool};
use crate::stats::Stats;
use crate::util::{self, QueueId};

/// One destination's share of a queue run: its key, its label (the
/// domain, "" with a fixed primary), its route or why there is none, and
/// its messages.
type Group = (String, String, Result<Route, Reply>, VecDeque<QueueId>);

#[derive(Debug, Clone, Copy)]
struct Entry {
    next: u64,
    size: u64,
}

/// When a NOTIFY=DELAY recipient is warned if `delay_warning_time` is 0
/// (Postfix's usual setting of it: 4h).
const DEFAULT_DELAY_WARNING: u64 = 4 * 3600;

/// Whether a recipient with NOTIFY bits `mask` (0: no NOTIFY) of a message
/// `age` seconds old is due a delay warning, `dwt` being
/// delay_warning_time: without NOTIFY after it if set; with DELAY after it,
/// or [`DEFAULT_DELAY_WARNING`] when unset; never otherwise.
fn delay_warning_due(mask: u8, age: u64, dwt: u64) -> bool {
    let after = if mask == 0 && dwt > 0 {
        dwt
    } else if mask & crate::dsn::DELAY != 0 {
        if dwt > 0 { dwt } else { DEFAULT_DELAY_WARNING }
    } else {
        return false;
    };
    age >= after
}

/// With MX routing, DNS time a queue run spends before it stops looking up
/// domains other than `relay_domains` (bounce and notice recipients);
/// their messages wait [`LATER`] seconds without a try.
const FOREIGN_LOOKUPS: Duration = Duration::from_secs(10);
const LATER: u64 = 60;

/// How often a spool that could not be written is probed.
const PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// At least this long between two probes, however many writes fail.
const PROBE_GAP: Duration = Duration::from_secs(1);
/// A probe that takes longer counts as failed (a disk whose fsync hangs):
/// it keeps its blocking thread, and no other probe starts before it ends.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// How far the spool can record delivery outcomes (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Recording {
    Ok,
    /// Removals work, delivery states cannot be written (why): only
    /// messages with one recipient left are delivered.
    RemovalsOnly(String),
    /// Removals fail (why): no delivery starts.
    Suspended(String),
}

/// What a write probe found, for each of [`crate::spool::PROBED`]: the
/// error's kind and text where it failed.
#[derive(Debug, Default)]
struct Probe {
    dirs: [Option<(io::ErrorKind, String)>; 3],
    /// `Stats::spool_failures` when it began: it vouches for the spool only
    /// if no write failed since.
    failures: u32,
}

/// No space (ENOSPC) or no quota (EDQUOT): the file system works, it is
/// full. An unlink still works then.
fn is_full(kind: io::ErrorKind) -> bool {
    matches!(kind, io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
}

/// What a probe's results for `queue/` and `state/` make of the spool's
/// recording (`None`: no change). Only a probe that passed in `queue/`, and
/// began after the latest failure (`fresh`), lifts a suspension; a full
/// `queue/` means removals only, unless removals were seen to fail.
fn verdict(suspended: bool, queue: Option<(io::ErrorKind, String)>, state: Option<(io::ErrorKind, String)>, fresh: bool) -> Option<Recording> {
    match (queue, state) {
        (None, None) if fresh => Some(Recording::Ok),
        (None, Some((_, why))) if fresh || !suspended => Some(Recording::RemovalsOnly(why)),
        (None, _) => None,
        (Some((kind, why)), _) if is_full(kind) => (!suspended).then_some(Recording::RemovalsOnly(why)),
        (Some((_, why)), _) => Some(Recording::Suspended(why)),
    }
}

/// The write probe's task: probes the spool when a write failed (at once,
/// at most one every [`PROBE_GAP`]) and every [`PROBE_INTERVAL`] while
/// `Stats::spool_unwritable` is set; clears it when every directory passes
/// and no write failed meanwhile; tells the scheduler every result. Polled
/// beside the scheduler's loop (`tokio::join!`), never behind it, so a
/// queue run in progress (which can last long against a silent primary)
/// never delays it; the probe itself runs on a blocking thread, so a
/// hanging disk never stalls the runtime.
async fn prober(spool: Spool, stats: Arc<Stats>, tx: watch::Sender<Probe>, mut shutdown: watch::Receiver<bool>) {
    let mut hung: Option<tokio::task::JoinHandle<[io::Result<()>; 3]>> = None;
    let mut last: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = stats.spool_probe.notified() => {}
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            break;
        }
        if !stats.spool_unwritable.load(Ordering::SeqCst) {
            continue;
        }
        if let Some(t) = last {
            tokio::select! {
                _ = tokio::time::sleep_until(t + PROBE_GAP) => {}
                _ = shutdown.changed() => break,
            }
        }
        last = Some(tokio::time::Instant::now());
        let failures = stats.spool_failures.load(Ordering::SeqCst);
        let dirs = probe_off_runtime(&spool, &mut hung).await;
        if dirs.iter().all(Option::is_none) && stats.spool_failures.load(Ordering::SeqCst) == failures {
            stats.spool_unwritable.store(false, Ordering::SeqCst);
        } else if let Some((_, e)) = dirs.iter().flatten().next() {
            log::debug!(target: QMGR, "spool {} not writable yet: {e}", spool.root().display());
        }
        tx.send_replace(Probe { dirs, failures });
    }
}

/// Runs [`Spool::probe`] on a blocking thread, waiting at most
/// [`PROBE_TIMEOUT`]. A probe that has not returned is kept in `hung` and
/// counts as failed until it does: at most one probe thread at a time.
async fn probe_off_runtime(spool: &Spool, hung: &mut Option<tokio::task::JoinHandle<[io::Result<()>; 3]>>) -> [Option<(io::ErrorKind, String)>; 3] {
    let failed = |why: String| std::array::from_fn(|_| Some((io::ErrorKind::TimedOut, why.clone())));
    if hung.as_ref().is_some_and(|h| !h.is_finished()) {
        return failed(format!("spool {}: the last write probe has not returned yet", spool.root().display()));
    }
    *hung = None;
    let sp = spool.clone();
    let mut h = tokio::task::spawn_blocking(move || sp.probe());
    match tokio::time::timeout(PROBE_TIMEOUT, &mut h).await {
        Ok(Ok(res)) => res.map(|r| r.err().map(|e| (e.kind(), e.to_string()))),
        Ok(Err(e)) => failed(format!("spool {}: write probe failed: {e}", spool.root().display())),
        Err(_) => {
            *hung = Some(h);
            failed(format!("spool {}: write probe took more than {}s", spool.root().display(), PROBE_TIMEOUT.as_secs()))
        }
    }
}

/// A delivery outcome the spool could not record yet. The message is out of
/// `entries` meanwhile: never delivered again within this server's life.
enum Unrecorded {
    /// Every recipient is done: the queue file must go.
    Remove,
    /// Some recipients are done: this state must be on disk before the
    /// message may be tried again (the size is for its index entry).
    State(DeliveryState, u64),
}

/// The queue manager, delivering through courier `C` (SMTP in the relay; a
/// fake primary in the tests).
pub struct Scheduler<C = Smtp> {
    cfg: Arc<Config>,
    courier: C,
    spool: Spool,
    stats: Arc<Stats>,
    committer: Committer,
    rx: UnboundedReceiver<(QueueId, u64)>,
    entries: BTreeMap<QueueId, Entry>,
    /// The dead-host cache, by destination key ("" for a fixed primary):
    /// taken as down until then (unix seconds), and why.
    dead: Vec<(String, u64, Reply)>,
    last_full_run: u64,
    /// What the spool can record now.
    recording: Recording,
    /// Outcomes still to record, retried when the spool is writable again.
    /// Bounded: at the first failure, deliveries stop (or those that could
    /// leave such an outcome do), so each failure adds at most the
    /// deliveries then in flight.
    unrecorded: BTreeMap<QueueId, Unrecorded>,
    /// The work list of the queue run in progress and whether it is a full
    /// run, so that a failure to record can stop it.
    current: Option<(Vec<WorkList>, bool)>,
    /// Messages with more than one recipient left, held back while the
    /// spool records only removals (empty otherwise).
    held: BTreeSet<QueueId>,
    /// Workers deliver only messages with one recipient left (set unless
    /// the spool records everything).
    single_only: Arc<AtomicBool>,
    /// A full queue run is owed: a flush asked for while deliveries were
    /// suspended, a full run the suspension cut short, or messages held
    /// back; it runs as soon as the spool allows.
    owed_run: bool,
    /// The write probe's results (see [`prober`]), and its sender until
    /// the prober starts.
    probes: watch::Receiver<Probe>,
    probe_tx: Option<watch::Sender<Probe>>,
}

/// The delay before attempt `attempts + 1`.
pub fn backoff(cfg: &Config, attempts: u32) -> Duration {
    let min = cfg.minimal_backoff.as_secs().max(1);
    let shift = attempts.saturating_sub(1).min(30);
    Duration::from_secs(min.saturating_mul(1u64 << shift).min(cfg.maximal_backoff.as_secs().max(min)))
}

impl Scheduler<Smtp> {
    pub fn new(cfg: Arc<Config>, spool: Spool, stats: Arc<Stats>, committer: Committer, rx: UnboundedReceiver<(QueueId, u64)>) -> Scheduler {
        Scheduler::with_courier(cfg, spool, stats, committer, rx, Smtp)
    }
}

impl<C: Courier> Scheduler<C> {
    pub fn with_courier(cfg: Arc<Config>, spool: Spool, stats: Arc<Stats>, committer: Committer, rx: UnboundedReceiver<(QueueId, u64)>, courier: C) -> Scheduler<C> {
        let (probe_tx, probes) = watch::channel(Probe::default());
        Scheduler {
            cfg,
            courier,
            spool,
            stats,
            committer,
            rx,
            entries: BTreeMap::new(),
            dead: Vec::new(),
            last_full_run: util::now(),
            recording: Recording::Ok,
            unrecorded: BTreeMap::new(),
            current: None,
            held: BTreeSet::new(),
            single_only: Arc::new(AtomicBool::new(false)),
            owed_run: false,
            probes,
            probe_tx: Some(probe_tx),
        }
    }

    fn suspended(&self) -> bool {
        matches!(self.recording, Recording::Suspended(_))
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
        let now = util::now();
        let retry = self.dead.iter().map(|(_, t, _)| *t).filter(|t| *t > now).max().unwrap_or(0);
        self.stats.primary_retry_at.store(retry.min(u32::MAX as u64) as u32, Relaxed);
    }

    fn add(&mut self, id: QueueId, size: u64) {
        let now = util::now();
        // With MX routing the destination is known once the message is
        // read: a queue run puts it off if its destination is down.
        let dead_until = self.dead.iter().find(|(k, _, _)| k.is_empty()).map_or(0, |(_, t, _)| *t);
        let next = if now < dead_until { dead_until } else { now };
        self.entries.insert(id, Entry { next, size });
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(mut self, shutdown: watch::Receiver<bool>) {
        self.load();
        // The prober runs beside the scheduler's own loop (polled in the
        // same task, but never waiting for it: a queue run in progress does
        // not hold it up). Both end at shutdown.
        match self.probe_tx.take() {
            Some(tx) => {
                let probe = prober(self.spool.clone(), self.stats.clone(), tx, shutdown.clone());
                tokio::join!(self.schedule(shutdown), probe);
            }
            None => self.schedule(shutdown).await,
        }
        log::info!(target: QMGR, "scheduler stopped");
    }

    async fn schedule(&mut self, mut shutdown: watch::Receiver<bool>) {
        let stats = self.stats.clone();
        loop {
            if *shutdown.borrow() {
                break;
            }
            if self.owed_run && !self.suspended() {
                self.owed_run = false;
                log::info!(target: QMGR, "queue run (owed: asked for, or held back, while the spool could not record delivery results)");
                self.run_queue(true, &shutdown).await;
                continue;
            }
            let now = util::now();
            let interval = self.cfg.queue_run_interval.as_secs();
            let full_at = self.last_full_run + interval;
            let due_at = self.entries.iter().filter(|(id, _)| !self.held.contains(*id)).map(|(_, e)| e.next).min().unwrap_or(u64::MAX).min(full_at);
            let wait = Duration::from_secs(due_at.saturating_sub(now)).min(self.cfg.queue_run_interval);
            // Suspended: due messages wait for the probe's verdict.
            let may_run = !self.suspended();
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
                    if let Recording::Suspended(why) = &self.recording {
                        log::warn!(
                            target: QMGR,
                            "warning: queue run requested (flush): deferred until the spool can record delivery results again ({why})"
                        );
                        self.owed_run = true;
                    } else {
                        log::info!(target: QMGR, "queue run requested (flush)");
                        self.run_queue(true, &shutdown).await;
                    }
                }
                _ = tokio::time::sleep(wait), if may_run => {
                    let full = util::now() >= full_at;
                    self.run_queue(full, &shutdown).await;
                }
                changed = self.probes.changed() => {
                    if changed.is_ok() {
                        self.on_probe();
                    }
                }
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Tries every due message (all of them when `full`), over up to
    /// `delivery_connections` connections to the primary. The workers only
    /// deliver; every outcome comes back here to be recorded, so the queue
    /// state has a single writer.
    async fn run_queue(&mut self, full: bool, shutdown: &watch::Receiver<bool>) {
        let Some(due) = self.due(full) else { return };
        let (groups, routes) = self.plan(due).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let pool = Arc::new(Pool { cfg: self.cfg.clone(), spool: self.spool.clone(), courier: self.courier.clone(), tx, shutdown: shutdown.clone(), single_only: self.single_only.clone() });
        // Known at once to `suspend`, which empties the work lists.
        self.current = Some((Vec::new(), full));
        let queues = self.start_groups(groups, routes.map(Arc::new), full, pool).await;
        loop {
            // The probe's verdicts count during the run too: a spool found
            // unable to record stops it, or restricts it to single messages.
            let r = tokio::select! {
                r = rx.recv() => r,
                changed = self.probes.changed() => {
                    if changed.is_ok() {
                        self.on_probe();
                    }
                    continue;
                }
            };
            let Some(r) = r else { break };
            self.on_attempt(r, &queues).await;
        }
        self.current = None;
        self.defer_left(queues, shutdown).await;
        self.publish();
    }

    /// The messages a run tries (all of them when `full`, else those due),
    /// None when there are none or deliveries are suspended. Records the
    /// outcomes left over first, if the spool can; a full run forgets the
    /// dead-host cache.
    fn due(&mut self, full: bool) -> Option<VecDeque<QueueId>> {
        if !self.unrecorded.is_empty() && self.recording == Recording::Ok {
            self.record_pending(false);
        }
        if self.suspended() {
            self.owed_run |= full;
            return None;
        }
        let now = util::now();
        if full {
            self.last_full_run = now;
            self.dead.clear();
            self.publish();
        }
        let due: VecDeque<QueueId> = self
            .entries
            .iter()
            .filter(|(id, e)| (full || e.next <= now) && !self.held.contains(*id))
            .map(|(id, _)| id.clone())
            .collect();
        (!due.is_empty()).then_some(due)
    }

    /// Starts a worker group for each destination of the run, except those
    /// the dead-host cache says are down (not before a full run) or whose
    /// name does not resolve (their messages are deferred here). Returns
    /// each started group's work list, by destination key.
    async fn start_groups(&mut self, groups: Vec<Group>, routes: Option<Arc<Routes>>, full: bool, pool: Arc<Pool<C>>) -> Vec<(String, WorkList)> {
        let now = util::now();
        let mut queues: Vec<(String, WorkList)> = Vec::new();
        for (key, label, route, ids) in groups {
            if self.suspended() {
                break;
            }
            let route = match route {
                Ok(r) => r,
                Err(reply) => {
                    // A fixed primary whose name does not resolve.
                    self.primary_down(&key, &reply);
                    self.defer_all(ids, &reply).await;
                    continue;
                }
            };
            if !full && let Some((_, until, _)) = self.dead.iter().find(|(k, t, _)| *k == key && *t > now) {
                // The dead-host cache: not tried before then.
                let until = *until;
                for id in ids {
                    if let Some(e) = self.entries.get_mut(&id) {
                        e.next = e.next.max(until);
                    }
                }
                continue;
            }
            let queue = Arc::new(Mutex::new(ids));
            queues.push((key.clone(), queue.clone()));
            if let Some((qs, _)) = &mut self.current {
                qs.push(queue.clone());
            }
            let dest = Arc::new(Dest { key, label, hops: route.hops, routes: routes.clone(), unreachable: Mutex::new(Vec::new()) });
            tokio::spawn(workers::group(pool.clone(), dest, queue));
        }
        queues
    }

    /// Acts on one report of the run's workers.
    async fn on_attempt(&mut self, a: Attempt, queues: &[(String, WorkList)]) {
        match a {
            Attempt::Done(msg, outcome, relay, recorded) => {
                self.apply(&msg, outcome, &relay).await;
                let _ = recorded.send(());
            }
            Attempt::Gone(id) => {
                self.entries.remove(&id);
            }
            Attempt::Unreadable(id, e) => self.unreadable(id, &e),
            Attempt::Held(id) => {
                if self.entries.contains_key(&id) && self.held.insert(id.clone()) {
                    log::info!(
                        target: QMGR,
                        "{id}: held: more than one recipient left, and the spool cannot record a partial delivery now; tried once it can"
                    );
                }
            }
            Attempt::Reached(key) => {
                self.stats.primary_result(true, "");
                self.dead.retain(|(k, _, _)| *k != key);
            }
            Attempt::Unreached(key, reply) => {
                self.primary_down(&key, &reply);
                let Some((_, q)) = queues.iter().find(|(k, _)| *k == key) else { return };
                let ids: Vec<QueueId> = q.lock().map(|mut q| q.drain(..).collect()).unwrap_or_default();
                self.defer_all(ids, &reply).await;
                self.publish();
            }
        }
    }

    /// Messages no worker could take (every connection failed): they wait,
    /// deferred with their destination's reply.
    async fn defer_left(&mut self, queues: Vec<(String, WorkList)>, shutdown: &watch::Receiver<bool>) {
        for (key, queue) in queues {
            let left: Vec<QueueId> = queue.lock().map(|mut q| q.drain(..).collect()).unwrap_or_default();
            if left.is_empty() || *shutdown.borrow() || self.suspended() {
                continue;
            }
            let reply = self.dead.iter().find(|(k, _, _)| *k == key).map(|(_, _, r)| r.clone()).unwrap_or_else(|| Reply::local(421, "4.4.2 lost connection with the primary"));
            self.defer_all(left, &reply).await;
        }
    }

    /// Records a failed attempt with `reply` for each of `ids`, until the
    /// spool is found unable to record.
    async fn defer_all(&mut self, ids: impl IntoIterator<Item = QueueId>, reply: &Reply) {
        for id in ids {
            if self.suspended() {
                break;
            }
            self.defer_unreached(&id, reply).await;
        }
    }

    /// Splits the due messages by destination: with a fixed primary, one
    /// group (key ""); with MX routing, by the route of their recipients'
    /// domains (looked up once per run; the DNS answers are cached for
    /// their TTL). A message whose every domain has no route is deferred
    /// here with the reason. Groups: (key, label, route, messages).
    async fn plan(&mut self, due: VecDeque<QueueId>) -> (Vec<Group>, Option<Routes>) {
        if !self.cfg.primary_list.is_empty() {
            let route = route::hosts_for(&self.cfg, "").await;
            return (vec![(String::new(), String::new(), route, due)], None);
        }
        let mut routes: Routes = Vec::new();
        let mut groups: Vec<Group> = Vec::new();
        let started = tokio::time::Instant::now();
        for (n, id) in due.into_iter().enumerate() {
            if self.suspended() {
                break;
            }
            if n % 16 == 15 {
                // Reading many queue files: let the SMTP sessions run.
                tokio::task::yield_now().await;
            }
            let Some(msg) = self.read_queued(&id) else { continue };
            let Some(first) = self.look_up_routes(&msg, &mut routes, started).await else {
                // Bounces and notices to other domains whose DNS is slow
                // must not hold up the relay domains' mail run after run
                // (groups start only once every route is known, and failed
                // lookups are not cached): not tried in this run.
                if let Some(e) = self.entries.get_mut(&id) {
                    e.next = e.next.max(util::now().saturating_add(LATER));
                }
                continue;
            };
            match first {
                Some((key, d)) => match groups.iter_mut().find(|(k, _, _, _)| *k == key) {
                    Some((_, _, _, ids)) => ids.push_back(id),
                    None => {
                        let rt = route_of(&routes, &d).and_then(|r| r.as_ref().ok()).map(|(_, rt)| rt.clone());
                        if let Some(rt) = rt {
                            groups.push((key, d, Ok(rt), VecDeque::from([id])));
                        }
                    }
                },
                None => self.defer_unrouted(&msg, &routes).await,
            }
        }
        (groups, Some(routes))
    }

    /// Reads a queued message; one that left the queue leaves the index,
    /// one that cannot be read waits (see [`unreadable`](Self::unreadable)).
    fn read_queued(&mut self, id: &QueueId) -> Option<QueuedMessage> {
        match self.spool.read(id) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.entries.remove(id);
                None
            }
            Err(e) => {
                self.unreadable(id.clone(), &e);
                None
            }
        }
    }

    /// Looks up the routes of `msg`'s recipient domains not in `routes` yet.
    /// Returns the destination of its first routable recipient (key,
    /// domain; None: no recipient has a route), or None when the lookups
    /// must wait: [`FOREIGN_LOOKUPS`] passed since `started` and a domain
    /// is not a relay domain.
    async fn look_up_routes(&self, msg: &QueuedMessage, routes: &mut Routes, started: tokio::time::Instant) -> Option<Option<(String, String)>> {
        let mut first: Option<(String, String)> = None;
        for r in msg.pending() {
            let d = route::domain_of(&r.addr);
            if route_of(routes, &d).is_none() {
                if started.elapsed() >= FOREIGN_LOOKUPS && !self.cfg.is_relay_domain(&d) {
                    return None;
                }
                let res = route::hosts_for(&self.cfg, &d).await;
                self.stats.set_route(&d, &res);
                routes.push((d.clone(), res.map(|rt| (rt.key(), rt))));
            }
            if first.is_none()
                && let Some(Ok((key, _))) = route_of(routes, &d)
            {
                first = Some((key.clone(), d));
            }
        }
        Some(first)
    }

    /// No destination for any recipient of `msg`: each deferred with its
    /// domain's reason (a DNS failure, a loop to myself).
    async fn defer_unrouted(&mut self, msg: &QueuedMessage, routes: &Routes) {
        let rcpts = msg
            .pending()
            .map(|r| {
                let d = route::domain_of(&r.addr);
                let reply = match route_of(routes, &d) {
                    Some(Err(reply)) => reply.clone(),
                    _ => Reply::local(451, format!("4.4.3 no route for {d}")),
                };
                (r.addr.clone(), reply)
            })
            .collect();
        self.apply(msg, Outcome::unsent(rcpts, true), "none").await;
    }

    /// Records a failed attempt for a message the primary could not be reached for.
    async fn defer_unreached(&mut self, id: &QueueId, reply: &Reply) {
        if let Some(msg) = self.read_queued(id) {
            let rcpts = msg.pending().map(|r| (r.addr.clone(), reply.clone())).collect();
            self.apply(&msg, Outcome::unsent(rcpts, false), "none").await;
        }
    }

    /// A queue file that exists but cannot be read: logged, and not tried
    /// again before `minimal_backoff` has passed. Left due, it would make the
    /// scheduler loop at once into another run that fails the same way.
    fn unreadable(&mut self, id: QueueId, e: &std::io::Error) {
        log::error!(
            target: QMGR,
            "error: {id}: cannot read queue file or delivery state: {e}; next try in {}s",
            self.cfg.minimal_backoff.as_secs().max(1)
        );
        let next = util::now().saturating_add(self.cfg.minimal_backoff.as_secs().max(1));
        self.entries.entry(id).or_insert(Entry { next, size: 0 }).next = next;
    }

    /// A removal failed, or the probe failed in `queue/` for another reason
    /// than a full file system: the queue run in progress starts no further
    /// delivery (those in flight finish; their outcomes may not be recorded
    /// either: at most `delivery_connections - 1` more), and none starts
    /// until the probe passes in `queue/` again. MAIL gets 452 meanwhile.
    fn suspend(&mut self, why: String) {
        if let Some((qs, full)) = &self.current {
            for q in qs {
                if let Ok(mut q) = q.lock() {
                    // A full run cut short is owed; the due messages of
                    // another run stay due.
                    self.owed_run |= *full && !q.is_empty();
                    q.clear();
                }
            }
        }
        self.single_only.store(true, Ordering::SeqCst);
        self.stats.spool_removals_only.store(false, Ordering::Relaxed);
        if !self.suspended() {
            log::warn!(
                target: QMGR,
                "warning: spool {} cannot record delivery results ({why}): no new deliveries until it is writable again (checked every {}s)",
                self.spool.root().display(),
                PROBE_INTERVAL.as_secs()
            );
            self.stats.spool_write_failed();
        }
        self.recording = Recording::Suspended(why);
    }

    /// Removals work but delivery states cannot be written (a state write
    /// failed for lack of space, or the probe failed in `state/`, or in
    /// `queue/` for lack of space): only messages with one recipient left
    /// are delivered, the others are held until the spool records
    /// everything again. From a suspension, only on a probe that passed in
    /// `queue/`.
    fn removals_only(&mut self, why: String) {
        match self.recording {
            Recording::Ok => {
                log::warn!(
                    target: QMGR,
                    "warning: spool {} cannot record delivery states ({why}): only messages with one recipient left are delivered (a removal records their outcome, and frees space); the others wait until it can (checked every {}s)",
                    self.spool.root().display(),
                    PROBE_INTERVAL.as_secs()
                );
                self.stats.spool_write_failed();
            }
            Recording::Suspended(_) => {
                log::info!(
                    target: QMGR,
                    "spool {} can record removals again, not yet delivery states ({why}): messages with one recipient left are delivered",
                    self.spool.root().display()
                );
                self.recording = Recording::RemovalsOnly(why.clone());
                self.record_pending(true);
            }
            Recording::RemovalsOnly(_) => {}
        }
        self.single_only.store(true, Ordering::SeqCst);
        self.stats.spool_removals_only.store(true, Ordering::Relaxed);
        self.recording = Recording::RemovalsOnly(why);
    }

    /// The probe passed in `queue/` and `state/`, and no write failed since
    /// it began: the outcomes not yet recorded are written, and deliveries
    /// resume; held messages and a flush asked for meanwhile are owed a run.
    fn resume(&mut self) {
        if self.recording == Recording::Ok {
            return;
        }
        log::info!(target: QMGR, "spool {} is writable again: deliveries resume", self.spool.root().display());
        self.recording = Recording::Ok;
        self.single_only.store(false, Ordering::SeqCst);
        self.stats.spool_removals_only.store(false, Ordering::Relaxed);
        if !self.held.is_empty() {
            self.held.clear();
            self.owed_run = true;
        }
        self.record_pending(false);
    }

    /// Acts on the write probe's latest result.
    fn on_probe(&mut self) {
        let (dirs, failures) = {
            let p = self.probes.borrow_and_update();
            (p.dirs.clone(), p.failures)
        };
        // A result from before the latest failure cannot lift anything.
        let fresh = failures == self.stats.spool_failures.load(Ordering::SeqCst);
        let [_free, queue, state] = dirs;
        match verdict(self.suspended(), queue, state, fresh) {
            Some(Recording::Ok) => self.resume(),
            Some(Recording::RemovalsOnly(why)) => self.removals_only(why),
            Some(Recording::Suspended(why)) => self.suspend(why),
            None => {}
        }
    }

    /// Records the outcomes that could not be recorded before (only the
    /// removals, if `removals_only`). A failure now (right after a
    /// successful probe: a problem of that one file) is logged and kept for
    /// the next run; the message stays out of the queue runs until its
    /// outcome is on disk. Blocking file I/O on the runtime (an unlink, a
    /// state write and its fsync), as recording every outcome is; it runs
    /// right after the probe found the spool writable.
    fn record_pending(&mut self, removals_only: bool) {
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
                Unrecorded::State(state, size) if removals_only => {
                    self.unrecorded.insert(id, Unrecorded::State(state, size));
                }
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
        self.publish();
    }

    fn note_unrecorded(&self) {
        let n = u32::try_from(self.unrecorded.len()).unwrap_or(u32::MAX);
        self.stats.spool_unrecorded.store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// A destination could not be reached: new mail for it waits
    /// `minimal_backoff` (the dead-host cache).
    fn primary_down(&mut self, key: &str, reply: &Reply) {
        log::warn!(target: QMGR, "warning: primary unreachable: {}", reply.text);
        self.stats.primary_result(false, &reply.text);
        let until = util::now().saturating_add(self.cfg.minimal_backoff.as_secs());
        // Bounded: one entry per destination of the due messages; a full
        // run forgets them all.
        self.dead.retain(|(k, _, _)| k != key);
        self.dead.push((key.to_string(), until, reply.clone()));
    }

    /// Queues and commits a notification to the sender of `msg` for the
    /// recipients of `list` whose NOTIFY asks for `reason` (a bounce, a
    /// delay warning, a "relayed" notice), logged as Postfix's bounce
    /// daemon does. True when it is durable or none is due (the sender is
    /// `<>`, or no recipient wants one: NOTIFY=NEVER, a list without it).
    async fn notify(&mut self, msg: &QueuedMessage, list: &[(String, Reply)], reason: Reason, now: u64) -> bool {
        let id = &msg.env.id;
        let wanted: Vec<(String, Reply)> = list.iter().filter(|(r, _)| msg.env.dsn_of(r).wants(reason.notify())).cloned().collect();
        if wanted.is_empty() {
            if reason.notify() == crate::dsn::FAILURE {
                // Postfix's bounce daemon skips them silently; one line
                // here says why no notification follows.
                let who: Vec<String> = list.iter().map(|(r, _)| format!("<{r}>")).collect();
                log::info!(target: crate::logging::BOUNCE, "{id}: no sender non-delivery notification: NOTIFY without FAILURE for {}", who.join(", "));
            }
            return true;
        }
        let ticket = self.committer.ticket();
        let bounce = bounces::queue_bounce(&self.cfg, &self.spool, &{ let mut m = msg.clone(); m.state.last_attempt = now; m }, &wanted, reason);
        let what = reason.log_name();
        match bounce {
            Ok(Some(bid)) => match self.committer.commit(ticket).await {
                Ok(()) => {
                    log::info!(target: crate::logging::BOUNCE, "{id}: sender {what} notification: {bid}");
                    let size = self.spool.read(&bid).map(|m| m.size).unwrap_or(0);
                    // As Postfix's qmgr for the bounce it queued: the
                    // size of what is then delivered.
                    log::info!(target: QMGR, "{bid}: from=<>, size={size}, nrcpt=1 (queue active)");
                    self.add(bid, size);
                    true
                }
                Err(e) => {
                    log::error!(target: crate::logging::BOUNCE, "error: {id}: cannot make {what} notification durable: {e}");
                    let _ = self.spool.remove(&bid);
                    false
                }
            },
            Ok(None) => {
                if reason.notify() == crate::dsn::FAILURE {
                    log::info!(target: crate::logging::BOUNCE, "{id}: bounce of a bounce (null sender): discarded");
                }
                true
            }
            Err(e) => {
                log::error!(target: crate::logging::BOUNCE, "error: {id}: cannot write {what} notification: {e}");
                false
            }
        }
    }

    /// Records the outcome of one attempt: sent recipients are done, 5xx
    /// ones bounce, 4xx ones wait; an expired message bounces whatever is left.
    async fn apply(&mut self, msg: &QueuedMessage, outcome: Outcome, relay: &str) {
        let now = util::now();
        self.note_attempt(msg);
        let mut state = msg.state.clone();
        state.attempts += 1;
        state.last_attempt = now;
        state.errors.clear();
        let dsn = outcome.dsn;
        let mut s = sort_outcomes(msg, outcome, relay, &mut state);
        let lifetime = self.cfg.max_queue_lifetime.as_secs();
        let mut expired = Vec::new();
        if !s.deferred.is_empty() && now.saturating_sub(msg.env.arrival) >= lifetime {
            // As Postfix's qmgr: one line for the message (its recipients
            // were logged deferred above; the bounce names them).
            log::info!(target: QMGR, "{}: from=<{}>, status=expired, returned to sender", msg.env.id, msg.env.sender);
            expired = std::mem::take(&mut s.deferred);
        }
        // Bounces first, durably, and only then mark the recipients done:
        // a crash in between bounces twice at worst, never loses the notice.
        let rejected = std::mem::take(&mut s.rejected);
        for (list, reason) in [(rejected, Reason::Rejected), (expired, Reason::Expired)] {
            self.bounce(msg, list, reason, now, &mut s, &mut state).await;
        }
        // NOTIFY=SUCCESS to a primary that does not offer DSN: Postfix's
        // "relayed" notice. The delivery stands even if it cannot be sent.
        if !dsn && !s.relayed.is_empty() {
            self.notify(msg, &s.relayed, Reason::Relayed, now).await;
        }
        let warned_now = self.warn_delayed(msg, &s.deferred, &mut state, now).await;
        // The attempt's lines are out before its outcome is on disk: who
        // sees the state (or the removal) finds them in the log.
        logging::flush();
        if msg.env.recipients.iter().all(|r| state.done.iter().any(|(d, _, _)| d == r)) {
            self.finished(msg, &state);
            return;
        }
        self.defer(msg, state, &s.deferred, s.newly_done || warned_now, s.newly_done);
    }

    /// What an attempt begins with: a damaged delivery state is moved
    /// aside, and a message tried before is logged as entering the active
    /// queue again.
    fn note_attempt(&mut self, msg: &QueuedMessage) {
        let id = &msg.env.id;
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
        if msg.state.attempts > 0 {
            // As Postfix's qmgr each time a deferred message enters the
            // active queue (smtpd logged it for the first attempt): after a
            // restart or a log rotation, tools still know its sender and size.
            log::info!(
                target: QMGR,
                "{id}: from=<{}>, size={}, nrcpt={} (queue active)",
                msg.env.sender,
                msg.size,
                msg.env.recipients.len()
            );
        }
    }

    /// Queues the bounce for `list` (refused or expired recipients), then
    /// marks them bounced in `state`; if the bounce cannot be made durable
    /// they stay deferred (tried again, bounced later).
    async fn bounce(&mut self, msg: &QueuedMessage, list: Vec<(String, Reply)>, reason: Reason, now: u64, s: &mut Sorted, state: &mut DeliveryState) {
        if list.is_empty() {
            return;
        }
        let ok = self.notify(msg, &list, reason, now).await;
        if ok {
            Stats::inc(&self.stats.bounced);
        }
        for (rcpt, reply) in list {
            if ok {
                state.done.push((rcpt, RcptStatus::Bounced, reply.text));
                s.newly_done = true;
            } else {
                s.deferred.push((rcpt, reply));
            }
        }
    }

    /// One delay warning per message, recorded in its state (durably: a
    /// restart does not send it again). True when one was sent now.
    async fn warn_delayed(&mut self, msg: &QueuedMessage, deferred: &[(String, Reply)], state: &mut DeliveryState, now: u64) -> bool {
        if state.warned || deferred.is_empty() {
            return false;
        }
        let age = now.saturating_sub(msg.env.arrival);
        let dwt = self.cfg.delay_warning_time.as_secs();
        let due: Vec<(String, Reply)> = deferred.iter().filter(|(r, _)| delay_warning_due(msg.env.dsn_of(r).mask(), age, dwt)).cloned().collect();
        if !due.is_empty() && self.notify(msg, &due, Reason::Delayed, now).await {
            state.warned = true;
            return true;
        }
        false
    }

    /// Every recipient of `msg` is done: out of the index whatever happens
    /// (never tried again in this server's life, even if its removal cannot
    /// be recorded), and its queue file removed.
    fn finished(&mut self, msg: &QueuedMessage, state: &DeliveryState) {
        let id = &msg.env.id;
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
                self.suspend(e.to_string());
            }
        }
        if state.done.iter().any(|(_, s, _)| *s == RcptStatus::Sent) {
            Stats::inc(&self.stats.delivered);
        }
        self.publish();
    }

    /// Recipients are left: the next try after the backoff, recorded in the
    /// delivery state. `must` (something new is done, or a warning was
    /// sent) says the state must reach the disk; `newly_done`, that a
    /// recipient was delivered or bounced in this attempt (then a state that
    /// cannot be written keeps the message out of the runs).
    fn defer(&mut self, msg: &QueuedMessage, mut state: DeliveryState, deferred: &[(String, Reply)], must: bool, newly_done: bool) {
        let id = &msg.env.id;
        Stats::inc(&self.stats.deferred);
        let wait = backoff(&self.cfg, state.attempts).as_secs();
        state.next_attempt = state.last_attempt.saturating_add(wait);
        if let Some((_, r)) = deferred.first() {
            state.last_error = r.text.clone();
        }
        state.errors = deferred.iter().map(|(a, r)| (a.clone(), r.text.clone())).collect();
        if !must && self.recording != Recording::Ok {
            // Only a retry time, and the spool cannot write states now (a
            // full disk): kept in memory, not tried (it would fail, once per
            // message and run). Lost in a restart, it only means an earlier try.
            if let Some(en) = self.entries.get_mut(id) {
                en.next = state.next_attempt;
            }
            return;
        }
        match self.spool.write_state(id, &state, must) {
            Ok(()) => {
                if let Some(e) = self.entries.get_mut(id) {
                    e.next = state.next_attempt;
                }
            }
            Err(e) => self.state_unwritten(msg, state, e, newly_done),
        }
    }

    /// A delivery state could not be written (see the module doc).
    fn state_unwritten(&mut self, msg: &QueuedMessage, state: DeliveryState, e: io::Error, newly_done: bool) {
        let id = &msg.env.id;
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
            // Only the retry time is lost (the message is tried sooner
            // after a restart, no duplicate): keep it in memory, and
            // stop no delivery for it.
            log::error!(target: QMGR, "error: {id}: cannot write delivery state: {e}; its next try time is kept in memory");
            if let Some(en) = self.entries.get_mut(id) {
                en.next = state.next_attempt;
            }
        }
        if is_full(e.kind()) {
            // A full file system still unlinks: deliveries recorded by a
            // removal go on (and free space); the others wait.
            self.removals_only(e.to_string());
        } else if newly_done {
            // Read-only, failing, EPERM: removals may fail as well.
            // Suspended until the probe tells (it relaxes this to
            // removals only if queue/ passes, e.g. only state/ is
            // unwritable), so duplicates stay bounded by the deliveries
            // in flight now.
            self.suspend(e.to_string());
        } else {
            // Only a retry time: no reason to stop anything; the probe
            // this asks for decides whether deliveries must stop.
            self.stats.spool_write_failed();
        }
    }
}

/// An attempt's recipients by what happens to them next.
#[derive(Default)]
struct Sorted {
    /// Refused with a 5xx: bounced.
    rejected: Vec<(String, Reply)>,
    /// Anything else that is not a 2xx: tried again.
    deferred: Vec<(String, Reply)>,
    /// Delivered, with NOTIFY=SUCCESS (a "relayed" notice may be due).
    relayed: Vec<(String, Reply)>,
    /// A recipient's fate was decided in this attempt.
    newly_done: bool,
}

/// Logs each recipient's result as Postfix's smtp(8) does and sorts them:
/// only a 2xx marks a recipient sent (in `state`), only a 5xx bounces it,
/// anything else (4xx, or a code no reply may carry) waits.
fn sort_outcomes(msg: &QueuedMessage, outcome: Outcome, relay: &str, state: &mut DeliveryState) -> Sorted {
    let id = &msg.env.id;
    let (delay, delays) = delays(msg, &outcome);
    let mut s = Sorted::default();
    for (rcpt, reply) in outcome.rcpts {
        let verdict = reply.verdict();
        let status = match verdict {
            Verdict::Sent => "sent",
            Verdict::Bounce => "bounced",
            Verdict::Defer => "deferred",
        };
        // Fields and order as Postfix's smtp(8), which pflogsumm parses.
        log::info!(
            target: crate::logging::SMTP,
            "{id}: to=<{rcpt}>, relay={relay}, delay={delay}, delays={delays}, dsn={}, status={status} ({})",
            reply.dsn(),
            reply.text
        );
        match verdict {
            Verdict::Sent => {
                if msg.env.dsn_of(&rcpt).mask() & crate::dsn::SUCCESS != 0 {
                    s.relayed.push((rcpt.clone(), reply.clone()));
                }
                state.done.push((rcpt, RcptStatus::Sent, reply.text));
                s.newly_done = true;
            }
            Verdict::Bounce => s.rejected.push((rcpt, reply)),
            Verdict::Defer => s.deferred.push((rcpt, reply)),
        }
    }
    s
}

/// Postfix's delay= and delays=a/b/c/d: a (before the queue manager) is 0,
/// the message goes to the scheduler as it is acknowledged; b is the time
/// in the queue; c and d as measured. The arrival time is kept to the
/// second.
fn delays(msg: &QueuedMessage, outcome: &Outcome) -> (String, String) {
    let now = util::now();
    let (c, d) = (outcome.setup.as_secs_f64(), outcome.xfer.as_secs_f64());
    let now_f = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(now as f64, |t| t.as_secs_f64());
    let delay = (now_f - msg.env.arrival as f64).max(c + d);
    let delays = format!("0/{}/{}/{}", logging::delay(delay - c - d), logging::delay(c), logging::delay(d));
    (logging::delay(delay), delays)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_warnings_follow_notify() {
        use crate::dsn::{DELAY, FAILURE, NEVER, SUCCESS};
        // delay_warning_time off (Postfix's default): only NOTIFY=DELAY, after 4h.
        assert!(!delay_warning_due(0, 100 * 86400, 0));
        assert!(!delay_warning_due(DELAY, 4 * 3600 - 1, 0));
        assert!(delay_warning_due(DELAY | FAILURE, 4 * 3600, 0));
        // Set: no NOTIFY and NOTIFY with DELAY after it.
        assert!(delay_warning_due(0, 60, 60) && !delay_warning_due(0, 59, 60));
        assert!(delay_warning_due(DELAY, 60, 60));
        // Never without DELAY in the list.
        for m in [NEVER, SUCCESS, FAILURE, SUCCESS | FAILURE] {
            assert!(!delay_warning_due(m, 100 * 86400, 60));
            assert!(!delay_warning_due(m, 100 * 86400, 0));
        }
    }

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

    /// The probe's decision table: a full spool drains (removals only), a
    /// suspension is lifted only by a fresh probe that passed in queue/.
    #[test]
    fn probe_verdicts() {
        use io::ErrorKind::{PermissionDenied, ReadOnlyFilesystem, StorageFull};
        let e = |k| Some((k, "why".to_string()));
        let only = Some(Recording::RemovalsOnly("why".into()));
        let susp = Some(Recording::Suspended("why".into()));
        for suspended in [false, true] {
            assert_eq!(verdict(suspended, None, None, true), Some(Recording::Ok));
            assert_eq!(verdict(suspended, None, None, false), None, "a stale pass lifts nothing");
            assert_eq!(verdict(suspended, e(ReadOnlyFilesystem), None, true), susp);
            assert_eq!(verdict(suspended, e(ReadOnlyFilesystem), e(ReadOnlyFilesystem), false), susp);
            // Only state/ fails: removals proven to work.
            assert_eq!(verdict(suspended, None, e(PermissionDenied), true), only);
        }
        // Full: removals only, but a removal that failed keeps its suspension.
        assert_eq!(verdict(false, e(StorageFull), e(StorageFull), true), only);
        assert_eq!(verdict(true, e(StorageFull), e(StorageFull), true), None);
        assert_eq!(verdict(false, e(io::ErrorKind::QuotaExceeded), None, false), only);
        // A stale probe that passed in queue/ does not lift a suspension.
        assert_eq!(verdict(true, None, e(PermissionDenied), false), None);
        assert_eq!(verdict(false, None, e(PermissionDenied), false), only);
        // ENOSPC and EDQUOT are "full"; EROFS and EIO are not.
        assert!(is_full(io::Error::from_raw_os_error(libc::ENOSPC).kind()));
        assert!(is_full(io::Error::from_raw_os_error(libc::EDQUOT).kind()));
        assert!(!is_full(io::Error::from_raw_os_error(libc::EROFS).kind()));
        assert!(!is_full(io::Error::from_raw_os_error(libc::EIO).kind()));
    }

    // ---- the scheduler against a fake primary (the courier seam) ---------

    use crate::courier::fake::Fake;
    use crate::spool::Envelope;
    use std::future::Future;

    struct H {
        s: Scheduler<Fake>,
        fake: Fake,
        spool: Spool,
        shutdown: watch::Receiver<bool>,
        _stop: watch::Sender<bool>,
        _queued: tokio::sync::mpsc::UnboundedSender<(QueueId, u64)>,
    }

    /// A scheduler over a fresh spool, a fixed primary and the fake
    /// courier (inside a runtime: the committer is a task).
    fn harness(tag: &str, extra: &str) -> H {
        let root = std::env::temp_dir().join(format!("bartleby-sched-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let spool = Spool::create(&root).unwrap();
        let cfg = Config::parse(
            &format!(
                "hostname = \"backup.example.org\"\nspool = \"{}\"\nrelay_domains = [\"example.org\"]\nprimary = \"127.0.0.1:2526\"\nminimal_backoff = \"60s\"\nmaximal_backoff = \"150s\"\n{extra}",
                root.display()
            ),
            std::path::Path::new("t"),
        )
        .unwrap();
        let committer = Committer::start(&spool).unwrap();
        let (queued, rx) = tokio::sync::mpsc::unbounded_channel();
        let (stop, shutdown) = watch::channel(false);
        let fake = Fake::default();
        let s = Scheduler::with_courier(Arc::new(cfg), spool.clone(), Arc::new(Stats::new()), committer, rx, fake.clone());
        H { s, fake, spool, shutdown, _stop: stop, _queued: queued }
    }

    impl H {
        /// Queues a message from `sender` to `rcpts` that arrived at `arrival`.
        fn queue(&mut self, sender: &str, rcpts: &[&str], arrival: u64, ret: &str) -> QueueId {
            let id = util::new_queue_id();
            let env = Envelope {
                id: id.clone(),
                arrival,
                sender: sender.into(),
                recipients: rcpts.iter().map(|r| r.to_string()).collect(),
                ret: ret.into(),
                ..Default::default()
            };
            let mut w = self.spool.begin(&env).unwrap();
            w.write(b"Subject: t\r\n\r\nbody\r\n").unwrap();
            w.finish().unwrap();
            let size = self.spool.read(&id).unwrap().size;
            self.s.add(id.clone(), size);
            id
        }

        fn answer(&self, rcpt: &str, code: u16, text: &str) {
            self.fake.0.lock().unwrap().answers.push((rcpt.into(), Reply { code, text: text.into() }));
        }

        async fn run(&mut self, full: bool) {
            let shutdown = self.shutdown.clone();
            self.s.run_queue(full, &shutdown).await;
        }

        /// Every message in the queue but `id`s: the notifications.
        fn others(&self, ids: &[&QueueId]) -> Vec<QueuedMessage> {
            let all = self.spool.ids().unwrap();
            all.iter().filter(|i| !ids.contains(i)).map(|i| self.spool.read(i).unwrap()).collect()
        }

        fn text(&self, id: &QueueId) -> String {
            let (mut rd, _) = self.spool.open_data(id).unwrap();
            let mut t = String::new();
            std::io::Read::read_to_string(&mut rd, &mut t).unwrap();
            t
        }

        fn gone(&self, id: &QueueId) -> bool {
            self.spool.read(id).is_err_and(|e| e.kind() == io::ErrorKind::NotFound) && !self.s.entries.contains_key(id)
        }

        /// Makes every message due, as if time had passed.
        fn age(&mut self) {
            for e in self.s.entries.values_mut() {
                e.next = 0;
            }
        }

        fn cleanup(self) {
            let _ = std::fs::remove_dir_all(self.spool.root());
        }
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    }

    /// Hostile: a courier that hands back codes no reply to the end of
    /// data may carry. Only a 2xx marks a recipient sent; only a 5xx
    /// bounces. Before: a 600 counted as permanent and bounced.
    #[test]
    fn only_a_2xx_marks_a_recipient_sent_and_only_a_5xx_bounces() {
        block_on(async {
            let mut h = harness("codes", "");
            let rcpts = ["bob@example.org", "carol@example.org", "dave@example.org", "erin@example.org", "fred@example.org"];
            let id = h.queue("alice@sender.test", &rcpts, util::now(), "");
            h.answer("carol@example.org", 354, "354 go ahead");
            h.answer("dave@example.org", 199, "199 wait");
            h.answer("erin@example.org", 600, "600 no such class");
            h.answer("fred@example.org", 450, "450 5.1.1 a 4xx with a 5.x.x text");
            h.run(false).await;
            let st = h.spool.read(&id).unwrap().state;
            assert_eq!(st.done, vec![("bob@example.org".to_string(), RcptStatus::Sent, "250 2.0.0 Ok: queued as X".to_string())]);
            let waiting: Vec<&str> = st.errors.iter().map(|(a, _)| a.as_str()).collect();
            assert_eq!(waiting, rcpts[1..].to_vec());
            assert!(h.others(&[&id]).is_empty(), "a notification was queued");
            h.cleanup();
        });
    }

    /// A 4xx keeps the message; each failed try doubles the wait from
    /// minimal_backoff up to maximal_backoff (Postfix's qmgr: the same
    /// doubling between minimal_backoff_time and maximal_backoff_time).
    #[test]
    fn a_4xx_keeps_the_message_and_backs_off() {
        block_on(async {
            let mut h = harness("backoff", "");
            let id = h.queue("alice@sender.test", &["bob@example.org"], util::now(), "");
            h.answer("bob@example.org", 451, "451 4.3.0 try later");
            let mut waits = Vec::new();
            for _ in 0..4 {
                h.age();
                h.run(false).await;
                let st = h.spool.read(&id).unwrap().state;
                assert!(st.done.is_empty());
                assert_eq!(st.errors, vec![("bob@example.org".to_string(), "451 4.3.0 try later".to_string())]);
                assert_eq!(st.last_error, "451 4.3.0 try later");
                assert_eq!(h.s.entries[&id].next, st.next_attempt, "the index and the state disagree");
                waits.push(st.next_attempt - st.last_attempt);
            }
            assert_eq!(waits, vec![60, 120, 150, 150]);
            assert_eq!(h.spool.read(&id).unwrap().state.attempts, 4);
            // Not due: a normal run leaves it alone.
            h.run(false).await;
            assert_eq!(h.fake.0.lock().unwrap().sent.len(), 4);
            assert!(h.others(&[&id]).is_empty());
            h.cleanup();
        });
    }

    /// A 5xx bounces the recipient once: the notification is queued (to
    /// the sender, from <>), the recipient marked bounced, and the message
    /// leaves the queue when nothing is left; later runs deliver the other
    /// recipient and the bounce, never a second bounce.
    #[test]
    fn a_5xx_bounces_once() {
        block_on(async {
            let mut h = harness("bounce", "");
            let id = h.queue("alice@sender.test", &["bob@example.org", "carol@example.org"], util::now(), "");
            h.answer("bob@example.org", 550, "550 5.1.1 <bob@example.org>: no such user");
            h.answer("carol@example.org", 451, "451 4.2.0 later");
            h.run(false).await;
            let st = h.spool.read(&id).unwrap().state;
            assert_eq!(st.done, vec![("bob@example.org".to_string(), RcptStatus::Bounced, "550 5.1.1 <bob@example.org>: no such user".to_string())]);
            let b = h.others(&[&id]);
            assert_eq!(b.len(), 1, "one bounce");
            let bid = b[0].env.id.clone();
            assert_eq!((b[0].env.sender.as_str(), b[0].env.recipients.clone()), ("", vec!["alice@sender.test".to_string()]));
            assert!(h.text(&bid).contains("<bob@example.org>: 550 5.1.1"), "{}", h.text(&bid));
            assert!(h.s.entries.contains_key(&bid), "the bounce is not scheduled");
            // carol is now accepted; the primary still refuses bob.
            h.fake.0.lock().unwrap().answers.retain(|(a, _)| a != "carol@example.org");
            h.age();
            h.run(false).await;
            assert!(h.gone(&id) && h.gone(&bid), "{:?}", h.spool.ids());
            let sent = h.fake.0.lock().unwrap().sent.clone();
            let again: Vec<&Vec<String>> = sent.iter().filter(|(m, _)| *m == id.to_string()).map(|(_, r)| r).collect();
            assert_eq!(again, vec![&vec!["bob@example.org".to_string(), "carol@example.org".to_string()], &vec!["carol@example.org".to_string()]]);
            assert!(h.spool.ids().unwrap().is_empty(), "a second bounce");
            assert_eq!(h.s.stats.bounced.load(Ordering::Relaxed), 1);
            h.cleanup();
        });
    }

    /// Hostile: the bounce cannot be written (RET=FULL of a queue file cut
    /// short while it was being delivered). The refused recipient must not
    /// be marked done, nor the message removed, before its bounce is
    /// queued: it stays deferred, and bounces on a later try.
    #[test]
    fn a_message_goes_only_after_its_bounce_is_queued() {
        block_on(async {
            let mut h = harness("nobounce", "");
            let id = h.queue("alice@sender.test", &["bob@example.org"], util::now(), "FULL");
            h.answer("bob@example.org", 550, "550 5.7.1 refused");
            let path = h.spool.root().join("queue").join(id.to_string());
            let whole = std::fs::read(&path).unwrap();
            let cut = path.clone();
            h.fake.0.lock().unwrap().during = Some(Box::new(move |_, _| {
                let f = std::fs::OpenOptions::new().write(true).open(&cut).unwrap();
                f.set_len(f.metadata().unwrap().len() - 4).unwrap();
            }));
            h.run(false).await;
            assert!(h.s.entries.contains_key(&id) && path.exists(), "removed before its bounce was queued");
            std::fs::write(&path, &whole).unwrap();
            let st = h.spool.read(&id).unwrap().state;
            assert!(st.done.is_empty(), "marked done without a bounce: {:?}", st.done);
            assert_eq!(st.errors, vec![("bob@example.org".to_string(), "550 5.7.1 refused".to_string())]);
            assert!(h.s.entries.contains_key(&id));
            assert!(h.others(&[&id]).is_empty(), "half a bounce in the queue");
            h.fake.0.lock().unwrap().during = None;
            h.age();
            h.run(false).await;
            assert!(h.gone(&id));
            assert_eq!(h.others(&[]).len(), 1, "one bounce");
            h.cleanup();
        });
    }

    /// max_queue_lifetime: a message still deferred after it bounces what
    /// is left ("delivery time expired"), whether the primary answered 4xx
    /// or could not be reached; a younger one, or one dated in the future
    /// (a clock set back), waits. Postfix: maximal_queue_lifetime, then
    /// "status=expired, returned to sender".
    #[test]
    fn expiry_bounces_what_is_left() {
        block_on(async {
            let mut h = harness("expiry", "max_queue_lifetime = \"1h\"\n");
            let now = util::now();
            let old = h.queue("alice@sender.test", &["bob@example.org", "carol@example.org"], now - 3601, "");
            let young = h.queue("alice@sender.test", &["bob@example.org"], now - 3500, "");
            let future = h.queue("alice@sender.test", &["bob@example.org"], now + 86400, "");
            h.answer("bob@example.org", 451, "451 4.3.0 later");
            h.run(false).await;
            // carol was delivered; bob expired.
            assert!(h.gone(&old));
            let b = h.others(&[&young, &future]);
            assert_eq!(b.len(), 1);
            let t = h.text(&b[0].env.id);
            assert!(t.contains("(delivery time expired)") && t.contains("Status: 4.4.7") && t.contains("Final-Recipient: rfc822; bob@example.org"), "{t}");
            assert!(!t.contains("carol"), "{t}");
            for id in [&young, &future] {
                assert_eq!(h.spool.read(id).unwrap().state.attempts, 1);
            }
            // The primary down: the expired message bounces all the same.
            let old2 = h.queue("alice@sender.test", &["bob@example.org"], now - 7200, "");
            h.fake.0.lock().unwrap().down = Some(Reply::local(421, "4.4.1 connect to fake: Connection refused"));
            h.run(true).await;
            assert!(h.gone(&old2));
            assert_eq!(h.others(&[&young, &future]).len(), 2);
            assert!(!h.gone(&young) && !h.gone(&future));
            h.cleanup();
        });
    }

    /// The dead-host cache: once the primary is found down, new mail and
    /// due messages wait minimal_backoff instead of a connection each;
    /// after it, or at a full run, the primary is tried again.
    #[test]
    fn the_dead_host_cache_skips_a_host_then_tries_it_again() {
        block_on(async {
            let mut h = harness("dead", "delivery_connections = 1\n");
            let down = Reply::local(421, "4.4.1 connect to fake: Connection refused");
            h.fake.0.lock().unwrap().down = Some(down.clone());
            let m1 = h.queue("alice@sender.test", &["bob@example.org"], util::now(), "");
            h.run(false).await;
            assert_eq!(h.fake.0.lock().unwrap().opens, 1);
            assert_eq!(h.spool.read(&m1).unwrap().state.last_error, down.text);
            let until = h.s.dead.iter().find(|(k, _, _)| k.is_empty()).map(|(_, t, _)| *t).expect("not in the cache");
            assert!(until >= util::now() + 59);
            // It is back, but the cache does not know: new mail waits.
            h.fake.0.lock().unwrap().down = None;
            let m2 = h.queue("alice@sender.test", &["carol@example.org"], util::now(), "");
            assert_eq!(h.s.entries[&m2].next, until);
            h.run(false).await;
            // Due all the same (a restart, say): still not tried.
            h.age();
            h.run(false).await;
            assert_eq!(h.fake.0.lock().unwrap().opens, 1, "the dead host was tried");
            assert!(h.s.entries.values().all(|e| e.next >= until));
            // Its time has passed: tried again, and delivered.
            for d in &mut h.s.dead {
                d.1 = util::now() - 1;
            }
            h.age();
            h.run(false).await;
            assert_eq!(h.fake.0.lock().unwrap().opens, 2);
            assert!(h.gone(&m1) && h.gone(&m2));
            assert!(h.s.dead.is_empty(), "a reached host stays in the cache");
            // A full run (flush) tries a host the cache holds down.
            h.fake.0.lock().unwrap().down = Some(down.clone());
            let m3 = h.queue("alice@sender.test", &["bob@example.org"], util::now(), "");
            h.run(false).await;
            h.fake.0.lock().unwrap().down = None;
            h.run(true).await;
            assert_eq!(h.fake.0.lock().unwrap().opens, 4);
            assert!(h.gone(&m3));
            h.cleanup();
        });
    }

    /// delay_warning_time: one warning per message, recorded in its state
    /// so that neither a later try nor a restart sends another (Postfix:
    /// delay_warning_time, one "delayed mail" notice per message).
    #[test]
    fn one_delay_warning_per_message() {
        block_on(async {
            let mut h = harness("warn", "delay_warning_time = \"1h\"\n");
            let id = h.queue("alice@sender.test", &["bob@example.org"], util::now() - 3700, "");
            h.answer("bob@example.org", 451, "451 4.3.0 later");
            h.run(false).await;
            let first = h.others(&[&id]);
            assert_eq!(first.len(), 1);
            assert!(h.text(&first[0].env.id).contains("Subject: Delayed Mail (still being retried)"));
            for _ in 0..2 {
                h.age();
                h.run(false).await;
            }
            let st = h.spool.read(&id).unwrap().state;
            assert!(st.warned && st.done.is_empty());
            // Each warning is queued, then delivered by a later run.
            let mut notes: Vec<String> = h.fake.0.lock().unwrap().sent.iter().map(|(m, _)| m.clone()).filter(|m| *m != id.to_string()).collect();
            notes.extend(h.others(&[&id]).iter().map(|m| m.env.id.to_string()));
            notes.dedup();
            assert_eq!(notes.len(), 1, "one warning, not one per try: {notes:?}");
            h.cleanup();
        });
    }

    /// The spool can record only removals (a full disk): a message with
    /// more than one recipient left is held, not delivered (a partial
    /// delivery could not be recorded, and a restart would deliver again);
    /// one with a single recipient is delivered and removed.
    #[test]
    fn removals_only_holds_messages_with_more_than_one_recipient() {
        block_on(async {
            let mut h = harness("held", "");
            let two = h.queue("alice@sender.test", &["bob@example.org", "carol@example.org"], util::now(), "");
            let one = h.queue("alice@sender.test", &["dave@example.org"], util::now(), "");
            h.s.removals_only("No space left on device".into());
            h.run(false).await;
            assert!(h.gone(&one));
            assert!(h.s.held.contains(&two));
            let sent = h.fake.0.lock().unwrap().sent.clone();
            assert_eq!(sent, vec![(one.to_string(), vec!["dave@example.org".to_string()])]);
            assert_eq!(h.spool.read(&two).unwrap().state.attempts, 0, "a held message counted as tried");
            h.cleanup();
        });
    }
}
