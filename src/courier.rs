//! The seam between the scheduler and the delivery client: "something that
//! opens a connection to a destination and hands it messages, returning
//! each recipient's outcome". Role: an interface only (no I/O of its own);
//! it may touch nothing but what it is given.
//!
//! The scheduler and its workers ([`workers`](crate::workers)) see only
//! these two traits, so their decisions (backoff, expiry, bounces, the
//! dead-host cache, recording outcomes) are tested in Rust against a fake
//! primary (`scheduler.rs`'s tests) instead of only end to end. In the
//! relay they are implemented by [`Smtp`] over [`Connection`]. As
//! chasquid's queue delivers through its `courier.Courier`.
//!
//! Generic, not `dyn`: one implementation in the binary, so no boxed
//! futures and no vtables (the methods return `impl Future + Send`, which
//! the workers need to be spawned).

use std::future::Future;

use crate::config::Config;
use crate::delivery::{ConnectError, Connection, Outcome};
use crate::route::Hop;
use crate::spool::{QueuedMessage, Spool};

/// Opens connections to a destination.
pub trait Courier: Clone + Send + Sync + 'static {
    type Conn: Carrier;

    /// Connects to the first of `hops` that answers and greets it;
    /// `nexthop` names the destination in a loop error (the domain; the
    /// host when empty). Err: why none could be used (always temporary).
    fn open(&self, cfg: &Config, hops: &[Hop], nexthop: &str) -> impl Future<Output = Result<Self::Conn, ConnectError>> + Send;
}

/// An open connection that carries messages.
pub trait Carrier: Send + 'static {
    /// `host[ip]:port` for the logs.
    fn relay(&self) -> &str;

    /// Sends `msg` to `rcpts` (some or all of its pending recipients): one
    /// final reply per recipient, and whether the connection may be used
    /// again. A recipient counts as delivered only if its reply is 2xx.
    fn deliver_to(&mut self, spool: &Spool, msg: &QueuedMessage, rcpts: Vec<String>) -> impl Future<Output = Outcome> + Send;

    /// Ends the session politely.
    fn quit(self) -> impl Future<Output = ()> + Send;
}

/// SMTP to the primary (or the MX hosts): the relay's courier.
#[derive(Clone, Copy, Debug, Default)]
pub struct Smtp;

impl Courier for Smtp {
    type Conn = Connection;

    fn open(&self, cfg: &Config, hops: &[Hop], nexthop: &str) -> impl Future<Output = Result<Connection, ConnectError>> + Send {
        Connection::open_to(cfg, hops, nexthop)
    }
}

impl Carrier for Connection {
    fn relay(&self) -> &str {
        &self.relay
    }

    fn deliver_to(&mut self, spool: &Spool, msg: &QueuedMessage, rcpts: Vec<String>) -> impl Future<Output = Outcome> + Send {
        Connection::deliver_to(self, spool, msg, rcpts)
    }

    fn quit(self) -> impl Future<Output = ()> + Send {
        Connection::quit(self)
    }
}

/// A fake primary for the scheduler's and the workers' tests: answers
/// each recipient as told (250 by default), refuses connections as told,
/// and records what it was asked.
#[cfg(test)]
pub mod fake {
    use super::*;
    use crate::delivery::Reply;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    pub type Hook = Box<dyn FnMut(&Spool, &QueuedMessage) + Send>;

    /// What the fake primary does, and what it saw.
    #[derive(Default)]
    pub struct Script {
        /// Connections refused with this reply while set.
        pub down: Option<Reply>,
        /// Connections to these destinations (the `nexthop` given to open)
        /// refused with the reply.
        pub down_at: Vec<(String, Reply)>,
        /// The `nexthop` of each connection asked for, in order.
        pub opened: Vec<String>,
        /// Replies by recipient (a 250 for anyone not listed).
        pub answers: Vec<(String, Reply)>,
        pub opens: usize,
        /// (message ID, recipients) of each delivery, in order.
        pub sent: Vec<(String, Vec<String>)>,
        /// Run during each delivery (a hostile side effect).
        pub during: Option<Hook>,
    }

    #[derive(Clone, Default)]
    pub struct Fake(pub Arc<Mutex<Script>>);

    pub struct FakeConn(Arc<Mutex<Script>>);

    impl Courier for Fake {
        type Conn = FakeConn;
        fn open(&self, _: &Config, _: &[Hop], nexthop: &str) -> impl Future<Output = Result<FakeConn, ConnectError>> + Send {
            let mut s = self.0.lock().unwrap();
            s.opens += 1;
            s.opened.push(nexthop.to_string());
            let down = s.down.clone().or_else(|| s.down_at.iter().find(|(h, _)| h == nexthop).map(|(_, r)| r.clone()));
            let r = match down {
                Some(reply) => Err(ConnectError { reply }),
                None => Ok(FakeConn(self.0.clone())),
            };
            async move { r }
        }
    }

    impl Carrier for FakeConn {
        fn relay(&self) -> &str {
            "fake.example.org[192.0.2.25]:25"
        }
        fn deliver_to(&mut self, spool: &Spool, msg: &QueuedMessage, rcpts: Vec<String>) -> impl Future<Output = Outcome> + Send {
            let mut s = self.0.lock().unwrap();
            s.sent.push((msg.env.id.to_string(), rcpts.clone()));
            if let Some(f) = &mut s.during {
                f(spool, msg);
            }
            let ok = Reply::local(250, "2.0.0 Ok: queued as X");
            let rcpts = rcpts.into_iter().map(|a| {
                let r = s.answers.iter().find(|(b, _)| *b == a).map_or(ok.clone(), |(_, r)| r.clone());
                (a, r)
            });
            let o = Outcome { rcpts: rcpts.collect(), reusable: true, setup: Duration::ZERO, xfer: Duration::ZERO, dsn: true };
            async move { o }
        }
        async fn quit(self) {}
    }
}
