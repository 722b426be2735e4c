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
