//! The LAN status page: the queue, the primary, the spool disk and the
//! machine, a "Flush queue now" button, `/api/queue` (JSON) and `/metrics`
//! (Prometheus text format).
//!
//! # Files, one role each
//!
//! * this file: starting the page's threads (and `bartleby check`'s look at
//!   the push token); may touch the listening socket only;
//! * [`gate`]: the only thing on the network; every limit of the page's
//!   network side is listed there, in one place;
//! * `backend`: tiny_http on its private socket, restarted if it dies, and
//!   the helpers that answer a request;
//! * `routes`: which request gets which answer (the handler's state);
//! * `csrf`: the flush form's token, the Origin/Referer check, `POST /flush`;
//! * `view`: what the page and the metrics show, read from Config and Stats;
//! * [`render`]: HTML and JSON; `metrics`: the Prometheus text;
//! * [`push`]: `PUT /recipients` (who may, how the body reaches the disk).
//!
//! # Threads and memory
//!
//! The page never touches the tokio runtime: it reads the spool files itself
//! (`Spool::open` per request, like `mailq`) and the shared [`Stats`]
//! (atomics, and mutexes held only for a copy). Its threads:
//!
//! * the **gate** ([`gate`]): one thread that owns the public socket and
//!   vets every connection with `poll(2)`: allow-list, size caps, deadlines;
//! * [`gate::WORKERS`] **forwarders** with 64 KiB stacks;
//! * **tiny_http** (required by the design card), listening only on a
//!   private abstract Unix socket that only the gate connects to; it adds an
//!   accept thread and a pool of 4 threads (their stack size comes from
//!   `RUST_MIN_STACK`, which `main` should set);
//! * one **handler** thread that answers requests one at a time. Serial on
//!   purpose: at most one page is being rendered, so memory stays bounded.
//!
//! A request that did not come through the gate (no valid `X-Bartleby-Gate`
//! secret) is refused, so the private socket is no way around the allow-list
//! or the gate's `Host` check (DNS rebinding: [`gate::Hosts`]).
//!
//! # Cross-site flushes
//!
//! `POST /flush` needs the per-process random token that the page puts in a
//! hidden field, and when the browser sends `Origin` (or, failing that,
//! `Referer`) it must name the `Host` the request was sent to. Flushes are
//! rate-limited to one per `[status] flush_interval`.
//!
//! # Pushes
//!
//! `PUT /recipients` replaces the recipients list: see [`push`] (who may,
//! how the body reaches the disk) and [`crate::policy::Recipients::push`]
//! (how it is taken). A bearer token, unlike the flush form, needs no CSRF
//! defence: browsers never send one by themselves.

mod backend;
mod csrf;
mod gate;
mod metrics;
mod push;
mod render;
mod routes;
mod view;

use std::io;
use std::net::TcpListener;
use std::sync::{Arc, Mutex, mpsc};

use crate::config::Config;
use crate::logging::STATUS;
use crate::policy::Recipients;
use crate::stats::Stats;

pub use render::{html, json};

/// Stack of the handler thread: rendering and sysinfo need a little more
/// than the gate's threads. Only touched pages become resident.
const HANDLER_STACK: usize = 256 * 1024;

/// Starts the status page on its own threads. Never blocks or touches the
/// tokio runtime. Does nothing when `[status] listen` is not set.
///
/// Errors (the address is in use, the private socket cannot be made) are
/// returned so that `main` can report them; once started, the page keeps
/// going by itself.
pub fn start(cfg: Arc<Config>, stats: Arc<Stats>) -> io::Result<()> {
    start_with(cfg, stats, None)
}

/// [`start`], with the recipients list a push (`PUT /recipients`) replaces.
pub fn start_with(cfg: Arc<Config>, stats: Arc<Stats>, recipients: Option<Recipients>) -> io::Result<()> {
    let Some(addr) = cfg.status.listen else {
        return Ok(());
    };
    // as PID 1 with DHCP the address may come after the page starts
    let listener = if crate::server::freebind(&cfg, &addr) { crate::server::tcp_listen(addr, true)? } else { TcpListener::bind(addr)? };
    let gate = Arc::new(gate::Gate {
        allow: cfg.status.allow.clone(),
        hosts: gate::Hosts::new(&cfg.hostname, &cfg.status.names, addr),
        backend: Mutex::new(None),
        secret: csrf::random_hex(),
        fd_pressure: Mutex::new(None),
        fd_lock: Mutex::new(()),
        push: push::Push::new(cfg.status.push_allow.clone(), cfg.status.push_token_file.clone(), cfg.spool.clone()),
    });
    if gate.push.enabled() {
        match gate.push.token() {
            Ok(_) => log::info!(
                target: STATUS,
                "recipients list push enabled: PUT /recipients from {}",
                cfg.status.push_allow.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(" ")
            ),
            Err(why) => gate.push.warn_token(&why),
        }
    }
    let server = backend::bind_backend(&gate)?;
    let (tx, rx) = mpsc::sync_channel(gate::QUEUE);
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..gate::WORKERS {
        let (rx, g) = (rx.clone(), gate.clone());
        std::thread::Builder::new()
            .name(format!("status-fwd{i}"))
            .stack_size(gate::STACK)
            .spawn(move || gate::worker(rx, g))?;
    }
    let ctx = routes::Ctx { cfg, stats, gate: gate.clone(), token: csrf::random_hex(), last_flush: None, recipients };
    std::thread::Builder::new()
        .name("status-page".into())
        .stack_size(HANDLER_STACK)
        .spawn(move || backend::serve(server, ctx))?;
    std::thread::Builder::new()
        .name("status-gate".into())
        .stack_size(gate::STACK)
        .spawn(move || gate::run(listener, gate, tx))?;
    log::info!(target: STATUS, "status page listening on http://{addr}/");
    Ok(())
}

/// For `bartleby check`: `Ok` when push is off or its token file can be
/// used (`serve` runs either way, with push off and a warning).
pub fn check_push(cfg: &Config) -> Result<bool, String> {
    let p = push::Push::new(cfg.status.push_allow.clone(), cfg.status.push_token_file.clone(), cfg.spool.clone());
    if !p.enabled() {
        return Ok(false);
    }
    p.token().map(|_| true).map_err(|e| format!("{e}: push of the recipients list would be disabled"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        let mut s = String::new();
        html(&mut s, "<a href=\"x\">'&'</a>\u{7}");
        assert_eq!(s, "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt; ");
        let mut s = String::new();
        json(&mut s, "a\"b\\c\nd\u{1}\u{2028}é");
        assert_eq!(s, "\"a\\\"b\\\\c\\nd\\u0001\\u2028é\"");
    }
}
