//! The delivery worker pool of a queue run: per destination, one first
//! connection, then up to `delivery_connections` workers that take due
//! messages from a shared list and hand them to the primary through a
//! [`Courier`]. Role: delivering only. Workers never write the spool:
//! every outcome goes back to the scheduler as an [`Attempt`] and is
//! recorded there (a single writer of the queue state); they only read
//! queue files.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;

use crate::config::Config;
use crate::courier::{Carrier, Courier};
use crate::delivery::{Outcome, Reply};
use crate::logging::QMGR;
use crate::route::{self, Hop, Route};
use crate::spool::{QueuedMessage, Spool};
use crate::util::QueueId;

/// What a delivery worker reports back.
pub enum Attempt {
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
    /// only removals (the scheduler's `Recording::RemovalsOnly`).
    Held(QueueId),
    /// A destination answered (its key).
    Reached(String),
    /// A destination could not be reached: its messages wait.
    Unreached(String, Reply),
}

/// The messages of one destination still to deliver in a queue run.
pub type WorkList = Arc<Mutex<VecDeque<QueueId>>>;

/// The routes of a queue run with MX routing, by recipient domain: the
/// destination's key and route, or why there is none.
/// (A vector searched in order: a handful of domains, smaller code than a map.)
pub type Routes = Vec<(String, Result<(String, Route), Reply>)>;

pub fn route_of<'a>(routes: &'a Routes, domain: &str) -> Option<&'a Result<(String, Route), Reply>> {
    routes.iter().find(|(d, _)| d == domain).map(|(_, r)| r)
}

/// What a group's workers deliver to.
pub struct Dest {
    pub key: String,
    /// The domain, for "mail for X loops back to myself" ("" with a fixed
    /// primary: the host's name).
    pub label: String,
    pub hops: Vec<Hop>,
    /// With MX routing: every domain's route, for recipients of other
    /// destinations in the same message.
    pub routes: Option<Arc<Routes>>,
    /// Other destinations found unreachable during this run (key, reply):
    /// their recipients in later messages get the reply at once instead of
    /// another wait of connect_timeout per message.
    pub unreachable: Mutex<Vec<(String, Reply)>>,
}

/// What every worker of a queue run shares.
pub struct Pool<C> {
    pub cfg: Arc<Config>,
    pub spool: Spool,
    pub courier: C,
    pub tx: UnboundedSender<Attempt>,
    pub shutdown: watch::Receiver<bool>,
    /// Deliver only messages with one recipient left (the spool cannot
    /// record a partial delivery now).
    pub single_only: Arc<AtomicBool>,
}

impl<C> Pool<C> {
    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Hands `outcome` to the scheduler and waits until it is recorded.
    async fn report(&self, msg: QueuedMessage, outcome: Outcome, relay: String) {
        let (recorded, wait_recorded) = tokio::sync::oneshot::channel();
        let _ = self.tx.send(Attempt::Done(Box::new(msg), outcome, relay, recorded));
        let _ = wait_recorded.await;
    }
}

fn drain(queue: &WorkList) -> Vec<QueueId> {
    queue.lock().map(|mut q| q.drain(..).collect()).unwrap_or_default()
}

/// Opens a destination's first connection, then starts its workers (up to
/// `delivery_connections`), or reports it unreachable.
pub async fn group<C: Courier>(pool: Arc<Pool<C>>, dest: Arc<Dest>, queue: WorkList) {
    let first = match pool.courier.open(&pool.cfg, &dest.hops, &dest.label).await {
        Ok(c) => {
            let _ = pool.tx.send(Attempt::Reached(dest.key.clone()));
            c
        }
        Err(e) => {
            if let Some(routes) = &dest.routes {
                deliver_elsewhere(&pool, &dest, routes, &queue, &e.reply).await;
            }
            let _ = pool.tx.send(Attempt::Unreached(dest.key.clone(), e.reply));
            return;
        }
    };
    let n = queue.lock().map_or(1, |q| q.len());
    let workers = pool.cfg.delivery_connections.clamp(1, n.max(1));
    let mut first = Some(first);
    for _ in 0..workers {
        tokio::spawn(worker(pool.clone(), queue.clone(), first.take(), dest.clone()));
    }
}

/// `dest` is down, with MX routing: a message in its group may have
/// recipients of other destinations, and this one down must not hold them
/// up (Postfix's qmgr keeps a queue per destination). Those messages are
/// tried now, this destination's recipients deferred with its reply; the
/// rest are put back to wait as before.
async fn deliver_elsewhere<C: Courier>(pool: &Pool<C>, dest: &Dest, routes: &Routes, queue: &WorkList, down: &Reply) {
    let mut wait = VecDeque::new();
    for id in drain(queue) {
        let msg = match pool.spool.read(&id) {
            Ok(m) if !(pool.stopping() || pool.single_only.load(Ordering::SeqCst) && m.pending().nth(1).is_some()) => m,
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
        let outcome = deliver_routed::<C>(pool, Err(down), &msg, dest, routes).await;
        pool.report(msg, outcome, "none".into()).await;
    }
    if let Ok(mut q) = queue.lock() {
        q.extend(wait);
    }
}

/// Delivers `msg` with MX routing: its recipients of `dest` over `conn`,
/// those of other destinations over a connection each (closed after), and
/// those without a route get its reason. One outcome for every recipient.
/// `conn` is `Err` when `dest` could not be reached: its recipients get
/// that reply, the others are still tried.
async fn deliver_routed<C: Courier>(pool: &Pool<C>, conn: Result<&mut C::Conn, &Reply>, msg: &QueuedMessage, dest: &Dest, routes: &Routes) -> Outcome {
    let (mine, others, failed) = split_by_route(msg, &dest.key, routes);
    let none = Duration::ZERO;
    let mut out = match conn {
        _ if mine.is_empty() => Outcome { rcpts: Vec::new(), reusable: true, setup: none, xfer: none, dsn: true },
        Ok(conn) => conn.deliver_to(&pool.spool, msg, mine).await,
        Err(reply) => Outcome::unsent(mine.into_iter().map(|a| (a, reply.clone())).collect(), true),
    };
    for (key, domain, list) in others {
        let Some(Ok((_, rt))) = route_of(routes, &domain) else { continue };
        let known_down = dest.unreachable.lock().ok().and_then(|u| u.iter().find(|(k, _)| *k == key).map(|(_, r)| r.clone()));
        if let Some(reply) = known_down {
            out.rcpts.extend(list.into_iter().map(|a| (a, reply.clone())));
            continue;
        }
        match pool.courier.open(&pool.cfg, &rt.hops, &domain).await {
            Ok(mut c) => {
                let o = c.deliver_to(&pool.spool, msg, list).await;
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

/// A message's pending recipients by route: those of destination `key`,
/// those of other destinations (key, domain, recipients), and those
/// without a route (with the reason).
#[allow(clippy::type_complexity)]
fn split_by_route(msg: &QueuedMessage, key: &str, routes: &Routes) -> (Vec<String>, Vec<(String, String, Vec<String>)>, Vec<(String, Reply)>) {
    let mut mine = Vec::new();
    let mut others: Vec<(String, String, Vec<String>)> = Vec::new();
    let mut failed = Vec::new();
    for r in msg.pending() {
        let d = route::domain_of(&r.addr);
        match route_of(routes, &d) {
            Some(Ok((k, _))) if k == key => mine.push(r.addr.clone()),
            Some(Ok((k, _))) => match others.iter_mut().find(|(o, _, _)| o == k) {
                Some((_, _, list)) => list.push(r.addr.clone()),
                None => others.push((k.clone(), d, vec![r.addr.clone()])),
            },
            Some(Err(reply)) => failed.push((r.addr.clone(), reply.clone())),
            None => failed.push((r.addr.clone(), Reply::local(451, format!("4.4.3 no route looked up for {d} in this queue run")))),
        }
    }
    (mine, others, failed)
}

/// The next message a worker may deliver, or None when the list is done
/// (or the server stops). Messages that left the queue, cannot be read, or
/// must be held are reported on the way.
fn next_message<C>(pool: &Pool<C>, queue: &WorkList) -> Option<QueuedMessage> {
    loop {
        if pool.stopping() {
            return None;
        }
        let id = queue.lock().ok().and_then(|mut q| q.pop_front())?;
        let msg = match pool.spool.read(&id) {
            Ok(m) => m,
            Err(e) => {
                let _ = pool.tx.send(if e.kind() == std::io::ErrorKind::NotFound { Attempt::Gone(id) } else { Attempt::Unreadable(id, e) });
                continue;
            }
        };
        if pool.single_only.load(Ordering::SeqCst) && msg.pending().nth(1).is_some() {
            let _ = pool.tx.send(Attempt::Held(id));
            continue;
        }
        return Some(msg);
    }
}

/// One connection's worth of deliveries: takes due messages from the shared
/// list until it is empty. Opens its own connection unless handed one; a
/// worker that cannot connect leaves the messages to the others.
async fn worker<C: Courier>(pool: Arc<Pool<C>>, queue: WorkList, conn: Option<C::Conn>, dest: Arc<Dest>) {
    let mut conn = match conn {
        Some(c) => c,
        None => match pool.courier.open(&pool.cfg, &dest.hops, &dest.label).await {
            Ok(c) => c,
            Err(e) => {
                log::info!(target: QMGR, "extra connection to the primary refused: {}", e.reply.text);
                return;
            }
        },
    };
    while let Some(msg) = next_message(&pool, &queue) {
        let outcome = match &dest.routes {
            Some(routes) => deliver_routed::<C>(&pool, Ok(&mut conn), &msg, &dest, routes).await,
            None => {
                let pending = msg.pending().map(|r| r.addr.clone()).collect();
                conn.deliver_to(&pool.spool, &msg, pending).await
            }
        };
        let reusable = outcome.reusable;
        pool.report(msg, outcome, conn.relay().to_string()).await;
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
            if pool.stopping() || queue.lock().map_or(true, |q| q.is_empty()) {
                return;
            }
            match pool.courier.open(&pool.cfg, &dest.hops, &dest.label).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::courier::fake::Fake;
    use crate::spool::Envelope;

    fn reply(code: u16, text: &str) -> Reply {
        Reply::local(code, text)
    }

    type Setup = (Arc<Pool<Fake>>, Fake, Vec<QueuedMessage>, Routes, tokio::sync::mpsc::UnboundedReceiver<Attempt>, watch::Sender<bool>);

    /// A spool with a message to each recipient list, a pool over the
    /// fake, and the routes of a run with MX routing: example.org (the
    /// group's own destination), other.example and third.example (other
    /// destinations), broken.example (no route, with its reason).
    fn setup(tag: &str, messages: &[&[&str]]) -> Setup {
        let root = std::env::temp_dir().join(format!("bartleby-workers-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let spool = Spool::create(&root).unwrap();
        let cfg = Config::parse("hostname = \"backup.example.org\"\nrelay_domains = [\"example.org\"]\nprimary = \"mx\"\n", std::path::Path::new("t")).unwrap();
        let mut msgs = Vec::new();
        for rcpts in messages {
            let env = Envelope { id: crate::util::new_queue_id(), arrival: 1, sender: "alice@sender.test".into(), recipients: rcpts.iter().map(|r| r.to_string()).collect(), ..Default::default() };
            let mut w = spool.begin(&env).unwrap();
            w.write(b"Subject: t\r\n\r\nbody\r\n").unwrap();
            w.finish().unwrap();
            msgs.push(spool.read(&env.id).unwrap());
        }
        let fake = Fake::default();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (stop, shutdown) = watch::channel(false);
        let pool = Arc::new(Pool { cfg: Arc::new(cfg), spool, courier: fake.clone(), tx, shutdown, single_only: Arc::new(AtomicBool::new(false)) });
        let route = |k: &str| Ok((k.to_string(), Route { hops: Vec::new(), note: None }));
        let routes: Routes = vec![
            ("example.org".into(), route("A")),
            ("other.example".into(), route("B")),
            ("third.example".into(), route("C")),
            ("broken.example".into(), Err(reply(451, "4.4.3 Host or domain name not found. Name service error for name=broken.example type=MX"))),
        ];
        (pool, fake, msgs, routes, rx, stop)
    }

    fn dest(routes: &Routes) -> Dest {
        Dest { key: "A".into(), label: "example.org".into(), hops: Vec::new(), routes: Some(Arc::new(routes.clone())), unreachable: Mutex::new(Vec::new()) }
    }

    fn codes(o: &Outcome) -> Vec<(&str, u16)> {
        o.rcpts.iter().map(|(a, r)| (a.as_str(), r.code)).collect()
    }

    /// With MX routing, one message gets one outcome for every recipient:
    /// the group's own over its connection, other destinations over a
    /// connection each, one that is down with its reply (and not asked
    /// again for the next message: another connect_timeout each), and a
    /// domain without a route with its reason, never silently dropped.
    #[test]
    fn every_recipient_of_a_routed_message_gets_an_outcome() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let all: &[&str] = &["bob@example.org", "carl@other.example", "dora@third.example", "eve@broken.example", "fay@unlooked.example"];
            let (pool, fake, msgs, routes, _rx, _stop) = setup("routed", &[all, &["dan@third.example", "gus@example.org"]]);
            let down = reply(421, "4.4.1 connect to third.example: Connection refused");
            fake.0.lock().unwrap().down_at.push(("third.example".into(), down.clone()));
            let d = dest(&routes);
            let mut conn = pool.courier.open(&pool.cfg, &[], "example.org").await.unwrap();
            let o = deliver_routed::<Fake>(&pool, Ok(&mut conn), &msgs[0], &d, &routes).await;
            assert_eq!(
                codes(&o),
                vec![("bob@example.org", 250), ("carl@other.example", 250), ("dora@third.example", 421), ("eve@broken.example", 451), ("fay@unlooked.example", 451)]
            );
            assert!(o.rcpts[4].1.text.contains("no route looked up for unlooked.example"), "{o:?}");
            let o = deliver_routed::<Fake>(&pool, Ok(&mut conn), &msgs[1], &d, &routes).await;
            assert_eq!(codes(&o), vec![("gus@example.org", 250), ("dan@third.example", 421)]);
            assert_eq!(o.rcpts[1].1, down);
            assert_eq!(fake.0.lock().unwrap().opened, vec!["example.org", "other.example", "third.example"], "a destination found down was asked again");
            let _ = std::fs::remove_dir_all(pool.spool.root());
        });
    }

    /// The group's destination is down, with MX routing: a message with
    /// recipients elsewhere is delivered to them now (its own recipients
    /// deferred with the reply), one with none elsewhere stays in the work
    /// list for the scheduler to defer; then the group reports the
    /// destination unreached. Postfix: a queue per destination.
    #[test]
    fn a_destination_down_does_not_hold_up_the_others() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (pool, fake, msgs, routes, mut rx, _stop) = setup("down", &[&["bob@example.org", "carl@other.example"], &["gus@example.org"]]);
            let down = reply(421, "4.4.1 connect to example.org: Connection refused");
            fake.0.lock().unwrap().down_at.push(("example.org".into(), down.clone()));
            let queue: WorkList = Arc::new(Mutex::new(msgs.iter().map(|m| m.env.id.clone()).collect()));
            let g = tokio::spawn(group(pool.clone(), Arc::new(dest(&routes)), queue.clone()));
            let mut seen = Vec::new();
            while let Some(a) = rx.recv().await {
                match a {
                    Attempt::Done(m, o, relay, recorded) => {
                        assert_eq!(m.env.id, msgs[0].env.id);
                        assert_eq!(relay, "none");
                        assert_eq!(codes(&o), vec![("bob@example.org", 421), ("carl@other.example", 250)]);
                        let _ = recorded.send(());
                        seen.push("done");
                    }
                    Attempt::Unreached(key, r) => {
                        assert_eq!((key.as_str(), r), ("A", down.clone()));
                        seen.push("unreached");
                        break;
                    }
                    _ => panic!("unexpected report"),
                }
            }
            g.await.unwrap();
            assert_eq!(seen, vec!["done", "unreached"]);
            let left: Vec<QueueId> = queue.lock().unwrap().iter().cloned().collect();
            assert_eq!(left, vec![msgs[1].env.id.clone()]);
            let _ = std::fs::remove_dir_all(pool.spool.root());
        });
    }
}
