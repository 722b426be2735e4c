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
use crate::delivery::{Connection, Outcome, Reply};
use crate::route::{self, Hop, Route};
use crate::logging::{self, QMGR};
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
    /// Its queue file or delivery state could not be read (I/O error,
    /// permissions): it is left alone until a later run instead of being
    /// retried at once.
    Unreadable(QueueId, std::io::Error),
    /// Not tried: more than one recipient left while the spool can record
    /// only removals (see [`Recording::RemovalsOnly`]).
    Held(QueueId),
    /// A destination answered (its key).
    Reached(String),
    /// A destination could not be reached: its messages wait.
    Unreached(String, Reply),
}

/// The messages of one destination still to deliver in a queue run.
type WorkList = Arc<Mutex<VecDeque<QueueId>>>;

/// The routes of a queue run with MX routing, by recipient domain: the
/// destination's key and route, or why there is none.
/// (A vector searched in order: a handful of domains, smaller code than a map.)
type Routes = Vec<(String, Result<(String, Route), Reply>)>;

fn route_of<'a>(routes: &'a Routes, domain: &str) -> Option<&'a Result<(String, Route), Reply>> {
    routes.iter().find(|(d, _)| d == domain).map(|(_, r)| r)
}

/// What a group's workers deliver to.
struct Dest {
    key: String,
    /// The domain, for "mail for X loops back to myself" ("" with a fixed
    /// primary: the host's name).
    label: String,
    hops: Vec<Hop>,
    /// With MX routing: every domain's route, for recipients of other
    /// destinations in the same message.
    routes: Option<Arc<Routes>>,
    /// Other destinations found unreachable during this run (key, reply):
    /// their recipients in later messages get the reply at once instead of
    /// another wait of connect_timeout per message.
    unreachable: Mutex<Vec<(String, Reply)>>,
}

/// Opens a destination's first connection, then starts its workers (up to
/// `delivery_connections`), or reports it unreachable.
#[allow(clippy::too_many_arguments)]
async fn group(
    cfg: Arc<Config>,
    spool: Spool,
    dest: Arc<Dest>,
    queue: Arc<Mutex<VecDeque<QueueId>>>,
    tx: tokio::sync::mpsc::UnboundedSender<Attempt>,
    shutdown: watch::Receiver<bool>,
    single_only: Arc<AtomicBool>,
) {
    let first = match Connection::open_to(&cfg, &dest.hops, &dest.label).await {
        Ok(c) => {
            let _ = tx.send(Attempt::Reached(dest.key.clone()));
            c
        }
        Err(e) => {
            if let Some(routes) = &dest.routes {
                // With MX routing, a message in this group may have
                // recipients of other destinations: this one down must not
                // hold them up (Postfix's qmgr keeps a queue per
                // destination). Those messages are tried now, this
                // destination's recipients deferred with its reply; the
                // rest wait as before.
                let ids: Vec<QueueId> = queue.lock().map(|mut q| q.drain(..).collect()).unwrap_or_default();
                let mut wait = VecDeque::new();
                for id in ids {
                    let msg = match spool.read(&id) {
                        Ok(m) if !(*shutdown.borrow() || single_only.load(Ordering::SeqCst) && m.pending().nth(1).is_some()) => m,
                        _ => {
                            wait.push_back(id);
                            continue;
                        }
                    };
                    let elsewhere = msg.pending().any(|r| matches!(route_of(routes, &route::domain_of(&r.addr)), Some(Ok((k, _))) if *k != dest.key));
                    if !elsewhere {
                        wait.push_back(id);
                        continue;
                    }
                    let outcome = deliver_routed(&cfg, Err(&e.reply), &spool, &msg, &dest, routes).await;
                    let (recorded, wait_recorded) = tokio::sync::oneshot::channel();
                    let _ = tx.send(Attempt::Done(Box::new(msg), outcome, "none".into(), recorded));
                    let _ = wait_recorded.await;
                }
                if let Ok(mut q) = queue.lock() {
                    q.extend(wait);
                }
            }
            let _ = tx.send(Attempt::Unreached(dest.key.clone(), e.reply));
            return;
        }
    };
    let n = queue.lock().map_or(1, |q| q.len());
    let workers = cfg.delivery_connections.clamp(1, n.max(1));
    let mut first = Some(first);
    for _ in 0..workers {
        tokio::spawn(worker(cfg.clone(), spool.clone(), queue.clone(), tx.clone(), first.take(), dest.clone(), shutdown.clone(), single_only.clone()));
    }
}

/// Delivers `msg` with MX routing: its recipients of `dest` over `conn`,
/// those of other destinations over a connection each (closed after), and
/// those without a route get its reason. One outcome for every recipient.
/// `conn` is `Err` when `dest` could not be reached: its recipients get
/// that reply, the others are still tried.
async fn deliver_routed(cfg: &Config, conn: Result<&mut Connection, &Reply>, spool: &Spool, msg: &QueuedMessage, dest: &Dest, routes: &Routes) -> Outcome {
    let mut mine = Vec::new();
    let mut others: Vec<(String, String, Vec<String>)> = Vec::new();
    let mut failed = Vec::new();
    for r in msg.pending() {
        let d = route::domain_of(&r.addr);
        match route_of(routes, &d) {
            Some(Ok((key, _))) if *key == dest.key => mine.push(r.addr.clone()),
            Some(Ok((key, _))) => match others.iter_mut().find(|(k, _, _)| k == key) {
                Some((_, _, list)) => list.push(r.addr.clone()),
                None => others.push((key.clone(), d, vec![r.addr.clone()])),
            },
            Some(Err(reply)) => failed.push((r.addr.clone(), reply.clone())),
            None => failed.push((r.addr.clone(), Reply::local(451, format!("4.4.3 no route looked up for {d} in this queue run")))),
        }
    }
    let none = Duration::ZERO;
    let mut out = match conn {
        _ if mine.is_empty() => Outcome { rcpts: Vec::new(), reusable: true, setup: none, xfer: none, dsn: true },
        Ok(conn) => conn.deliver_to(spool, msg, mine).await,
        Err(reply) => Outcome { rcpts: mine.into_iter().map(|a| (a, reply.clone())).collect(), reusable: false, setup: none, xfer: none, dsn: true },
    };
    for (key, domain, list) in others {
        let Some(Ok((_, rt))) = route_of(routes, &domain) else { continue };
        let known_down = dest.unreachable.lock().ok().and_then(|u| u.iter().find(|(k, _)| *k == key).map(|(_, r)| r.clone()));
        if let Some(reply) = known_down {
            out.rcpts.extend(list.into_iter().map(|a| (a, reply.clone())));
            continue;
        }
        match Connection::open_to(cfg, &rt.hops, &domain).await {
            Ok(mut c) => {
                let o = c.deliver_to(spool, msg, list).await;
                if o.reusable {
                    c.quit().await;
                }
                out.rcpts.extend(o.rcpts);
                out.setup += o.setup;
                out.xfer += o.xfer;
                // One host without DSN: "relayed" notices for the message's
                // NOTIFY=SUCCESS recipients (at worst one more than asked,
                // never one missing).
                out.dsn &= o.dsn;
            }
            Err(e) => {
                if let Ok(mut u) = dest.unreachable.lock() {
                    u.push((key, e.reply.clone()));
                }
                out.rcpts.extend(list.into_iter().map(|a| (a, e.reply.clone())));
            }
        }
    }
    out.rcpts.extend(failed);
    out
}

/// One connection's worth of deliveries: takes due messages from the shared
/// list until it is empty. Opens its own connection unless handed one; a
/// worker that cannot connect leaves the messages to the others.
#[allow(clippy::too_many_arguments)]
async fn worker(
    cfg: Arc<Config>,
    spool: Spool,
    queue: Arc<Mutex<VecDeque<QueueId>>>,
    tx: tokio::sync::mpsc::UnboundedSender<Attempt>,
    conn: Option<Connection>,
    dest: Arc<Dest>,
    shutdown: watch::Receiver<bool>,
    single_only: Arc<AtomicBool>,
) {
    let mut conn = match conn {
        Some(c) => c,
        None => match Connection::open_to(&cfg, &dest.hops, &dest.label).await {
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
        if single_only.load(Ordering::SeqCst) && msg.pending().nth(1).is_some() {
            let _ = tx.send(Attempt::Held(id));
            continue;
        }
        let outcome = match &dest.routes {
            Some(routes) => deliver_routed(&cfg, Ok(&mut conn), &spool, &msg, &dest, routes).await,
            None => conn.deliver(&spool, &msg).await,
        };
        let relay = conn.relay.clone();
        let reusable = outcome.reusable;
        let (recorded, wait_recorded) = tokio::sync::oneshot::channel();
        let _ = tx.send(Attempt::Done(Box::new(msg), outcome, relay, recorded));
        let _ = wait_recorded.await;
        if !reusable {
            // The connection broke, or stopped mid-message: close it without
            // QUIT (in DATA, a QUIT would be message text and its wait for a
            // reply would time out), which makes the primary discard any
            // half-sent message. One new try, else leave the rest to others;
            // none when nothing is left (the list is done, or was emptied
            // because the spool cannot record) or the server stops: against
            // a hostile primary a new connection can cost connect_timeout +
            // 2 x delivery_timeout, all that time holding up the run.
            drop(conn);
            if *shutdown.borrow() || queue.lock().map_or(true, |q| q.is_empty()) {
                return;
            }
            match Connection::open_to(&cfg, &dest.hops, &dest.label).await {
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

pub struct Scheduler {
    cfg: Arc<Config>,
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

impl Scheduler {
    pub fn new(cfg: Arc<Config>, spool: Spool, stats: Arc<Stats>, committer: Committer, rx: UnboundedReceiver<(QueueId, u64)>) -> Scheduler {
        let (probe_tx, probes) = watch::channel(Probe::default());
        Scheduler {
            cfg,
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
        if !self.unrecorded.is_empty() && self.recording == Recording::Ok {
            self.record_pending(false);
        }
        if self.suspended() {
            self.owed_run |= full;
            return;
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
        if due.is_empty() {
            return;
        }
        let (groups, routes) = self.plan(due).await;
        let routes = routes.map(Arc::new);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut queues: Vec<(String, WorkList)> = Vec::new();
        // Known at once to `suspend`, which empties the work lists.
        self.current = Some((Vec::new(), full));
        for (key, label, route, ids) in groups {
            if self.suspended() {
                break;
            }
            let route = match route {
                Ok(r) => r,
                Err(reply) => {
                    // A fixed primary whose name does not resolve.
                    self.primary_down(&key, &reply);
                    for id in ids {
                        if self.suspended() {
                            break;
                        }
                        self.defer_unreached(&id, &reply).await;
                    }
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
            tokio::spawn(group(self.cfg.clone(), self.spool.clone(), dest, queue, tx.clone(), shutdown.clone(), self.single_only.clone()));
        }
        drop(tx);
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
            match r {
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
                    let Some((_, q)) = queues.iter().find(|(k, _)| *k == key) else { continue };
                    let ids: Vec<QueueId> = q.lock().map(|mut q| q.drain(..).collect()).unwrap_or_default();
                    for id in ids {
                        if self.suspended() {
                            break;
                        }
                        self.defer_unreached(&id, &reply).await;
                    }
                    self.publish();
                }
            }
        }
        self.current = None;
        // Messages no worker could take (every connection failed): they wait.
        for (key, queue) in queues {
            let left: Vec<QueueId> = queue.lock().map(|mut q| q.drain(..).collect()).unwrap_or_default();
            if left.is_empty() || *shutdown.borrow() || self.suspended() {
                continue;
            }
            let reply = self.dead.iter().find(|(k, _, _)| *k == key).map(|(_, _, r)| r.clone()).unwrap_or_else(|| Reply::local(421, "4.4.2 lost connection with the primary"));
            for id in left {
                if self.suspended() {
                    break;
                }
                self.defer_unreached(&id, &reply).await;
            }
        }
        self.publish();
    }

    /// Splits the due messages by destination: with a fixed primary, one
    /// group (key ""); with MX routing, by the route of their recipients'
    /// domains (looked up once per run; the DNS answers are cached for
    /// their TTL). A message whose every domain has no route is deferred
    /// here with the reason. Groups: (key, label, route, messages).
    #[allow(clippy::type_complexity)]
    async fn plan(&mut self, due: VecDeque<QueueId>) -> (Vec<(String, String, Result<Route, Reply>, VecDeque<QueueId>)>, Option<Routes>) {
        if !self.cfg.primary_list.is_empty() {
            let route = route::hosts_for(&self.cfg, "").await;
            return (vec![(String::new(), String::new(), route, due)], None);
        }
        let mut routes: Routes = Vec::new();
        let mut groups: Vec<(String, String, Result<Route, Reply>, VecDeque<QueueId>)> = Vec::new();
        let started = tokio::time::Instant::now();
        for (n, id) in due.into_iter().enumerate() {
            if self.suspended() {
                break;
            }
            if n % 16 == 15 {
                // Reading many queue files: let the SMTP sessions run.
                tokio::task::yield_now().await;
            }
            let msg = match self.spool.read(&id) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.entries.remove(&id);
                    continue;
                }
                Err(e) => {
                    self.unreadable(id, &e);
                    continue;
                }
            };
            let mut first: Option<(String, String)> = None;
            let mut later = false;
            for r in msg.pending() {
                let d = route::domain_of(&r.addr);
                if route_of(&routes, &d).is_none() {
                    if started.elapsed() >= FOREIGN_LOOKUPS && !self.cfg.is_relay_domain(&d) {
                        later = true;
                        break;
                    }
                    let res = route::hosts_for(&self.cfg, &d).await;
                    self.stats.set_route(&d, &res);
                    routes.push((d.clone(), res.map(|rt| (rt.key(), rt))));
                }
                if first.is_none()
                    && let Some(Ok((key, _))) = route_of(&routes, &d)
                {
                    first = Some((key.clone(), d));
                }
            }
            if later {
                // Bounces and notices to other domains whose DNS is slow
                // must not hold up the relay domains' mail run after run
                // (groups start only once every route is known, and failed
                // lookups are not cached): not tried in this run.
                if let Some(e) = self.entries.get_mut(&id) {
                    e.next = e.next.max(util::now().saturating_add(LATER));
                }
                continue;
            }
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
                None => {
                    // No destination for any recipient: each deferred with
                    // its domain's reason (a DNS failure, a loop to myself).
                    let rcpts = msg
                        .pending()
                        .map(|r| {
                            let d = route::domain_of(&r.addr);
                            let reply = match route_of(&routes, &d) {
                                Some(Err(reply)) => reply.clone(),
                                _ => Reply::local(451, format!("4.4.3 no route for {d}")),
                            };
                            (r.addr.clone(), reply)
                        })
                        .collect();
                    let none = Duration::ZERO;
                    self.apply(&msg, Outcome { rcpts, reusable: false, setup: none, xfer: none, dsn: true }, "none").await;
                }
            }
        }
        (groups, Some(routes))
    }

    /// Records a failed attempt for a message the primary could not be reached for.
    async fn defer_unreached(&mut self, id: &QueueId, reply: &Reply) {
        match self.spool.read(id) {
            Ok(msg) => {
                let rcpts = msg.pending().map(|r| (r.addr.clone(), reply.clone())).collect();
                let none = std::time::Duration::ZERO;
                self.apply(&msg, Outcome { rcpts, reusable: false, setup: none, xfer: none, dsn: false }, "none").await;
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
        let id = &msg.env.id;
        // Postfix's delay= and delays=a/b/c/d: a (before the queue
        // manager) is 0, the message goes to the scheduler as it is
        // acknowledged; b is the time in the queue; c and d as measured.
        // The arrival time is kept to the second.
        let (c, d) = (outcome.setup.as_secs_f64(), outcome.xfer.as_secs_f64());
        let now_f = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(now as f64, |t| t.as_secs_f64());
        let delay = (now_f - msg.env.arrival as f64).max(c + d);
        let delays = format!("0/{}/{}/{}", logging::delay(delay - c - d), logging::delay(c), logging::delay(d));
        let delay = logging::delay(delay);
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
        let mut state = msg.state.clone();
        state.attempts += 1;
        state.last_attempt = now;
        state.errors.clear();
        let mut rejected: Vec<(String, Reply)> = Vec::new();
        let mut deferred: Vec<(String, Reply)> = Vec::new();
        let mut newly_done = false;
        let mut relayed: Vec<(String, Reply)> = Vec::new();
        for (rcpt, reply) in outcome.rcpts {
            let status = if reply.is_ok() {
                "sent"
            } else if reply.is_permanent() {
                "bounced"
            } else {
                "deferred"
            };
            // Fields and order as Postfix's smtp(8), which pflogsumm parses.
            log::info!(
                target: crate::logging::SMTP,
                "{id}: to=<{rcpt}>, relay={relay}, delay={delay}, delays={delays}, dsn={}, status={status} ({})",
                reply.dsn(),
                reply.text
            );
            if reply.is_ok() {
                if msg.env.dsn_of(&rcpt).mask() & crate::dsn::SUCCESS != 0 {
                    relayed.push((rcpt.clone(), reply.clone()));
                }
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
            // As Postfix's qmgr: one line for the message (its recipients
            // were logged deferred above; the bounce names them).
            log::info!(target: QMGR, "{id}: from=<{}>, status=expired, returned to sender", msg.env.sender);
            expired_list = std::mem::take(&mut deferred);
        }
        // Bounces first, durably, and only then mark the recipients done:
        // a crash in between bounces twice at worst, never loses the notice.
        for (list, reason) in [(&rejected, Reason::Rejected), (&expired_list, Reason::Expired)] {
            if list.is_empty() {
                continue;
            }
            let ok = self.notify(msg, list, reason, now).await;
            if ok {
                Stats::inc(&self.stats.bounced);
            }
            for (rcpt, reply) in list {
                if ok {
                    state.done.push((rcpt.clone(), RcptStatus::Bounced, reply.text.clone()));
                    newly_done = true;
                } else {
                    deferred.push((rcpt.clone(), reply.clone()));
                }
            }
        }
        // NOTIFY=SUCCESS to a primary that does not offer DSN: Postfix's
        // "relayed" notice. The delivery stands even if it cannot be sent.
        if !outcome.dsn && !relayed.is_empty() {
            self.notify(msg, &relayed, Reason::Relayed, now).await;
        }
        // One delay warning per message, recorded in its state (durably:
        // a restart does not send it again).
        let mut warned_now = false;
        if !state.warned && !deferred.is_empty() {
            let age = now.saturating_sub(msg.env.arrival);
            let dwt = self.cfg.delay_warning_time.as_secs();
            let due: Vec<(String, Reply)> = deferred
                .iter()
                .filter(|(r, _)| delay_warning_due(msg.env.dsn_of(r).mask(), age, dwt))
                .cloned()
                .collect();
            if !due.is_empty() && self.notify(msg, &due, Reason::Delayed, now).await {
                state.warned = true;
                warned_now = true;
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
                    self.suspend(e.to_string());
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
        if !newly_done && !warned_now && self.recording != Recording::Ok {
            // Only a retry time, and the spool cannot write states now (a
            // full disk): kept in memory, not tried (it would fail, once per
            // message and run). Lost in a restart, it only means an earlier try.
            if let Some(en) = self.entries.get_mut(id) {
                en.next = state.next_attempt;
            }
            return;
        }
        if let Err(e) = self.spool.write_state(id, &state, newly_done || warned_now) {
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
}
