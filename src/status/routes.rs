//! The status page's routes: which request gets which answer, and the
//! handler's state ([`Ctx`]). One request at a time, on the handler thread.
//!
//! Role: dispatch. The page and the JSON are rendered by [`super::render`],
//! the metrics by [`super::metrics`], flushes vetted by [`super::csrf`],
//! pushes taken by [`crate::policy::Recipients::push`]. May touch: the
//! spool (read only, and a pushed list's temporary file), the shared Stats.

use std::io::{BufWriter, Write};
use std::sync::Arc;
use std::time::Instant;

use tiny_http::{Method, Request};

use super::backend::{header, send, text};
use super::render::{self, json};
use super::{csrf, gate, metrics, push, view};
use crate::config::Config;
use crate::logging::STATUS;
use crate::policy::{PushRefused, Recipients};
use crate::spool::Spool;
use crate::stats::Stats;
use crate::util::now;

/// The handler's state.
pub(super) struct Ctx {
    pub(super) cfg: Arc<Config>,
    pub(super) stats: Arc<Stats>,
    pub(super) gate: Arc<gate::Gate>,
    /// The hidden form field that `POST /flush` must return.
    pub(super) token: String,
    pub(super) last_flush: Option<Instant>,
    /// What `PUT /recipients` replaces (none in the status demo).
    pub(super) recipients: Option<Recipients>,
}

pub(super) fn handle(rq: Request, ctx: &mut Ctx) {
    if !header(&rq, "X-Bartleby-Gate").is_some_and(|s| csrf::same(s, &ctx.gate.secret)) {
        return text(rq, 403, "403 Forbidden", &[]);
    }
    let peer = header(&rq, "X-Bartleby-Peer").unwrap_or("?").to_string();
    let (path, query) = match rq.url().split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (rq.url().to_string(), String::new()),
    };
    let get = matches!(rq.method(), Method::Get | Method::Head);
    match path.as_str() {
        "/" if get => {
            let flushed = query.split('&').any(|kv| kv == "flushed=1");
            let body = render::page(&view::page_data(ctx, flushed)).into_bytes();
            send(rq, 200, "text/html; charset=utf-8", body, &[
                (
                    "Content-Security-Policy",
                    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
                ),
                ("Referrer-Policy", "same-origin"),
                ("X-Frame-Options", "DENY"),
            ]);
        }
        "/api/queue" if get => api_queue(rq, ctx),
        "/metrics" if get => {
            let body = metrics::render(ctx).into_bytes();
            send(rq, 200, "text/plain; version=0.0.4; charset=utf-8", body, &[]);
        }
        "/flush" if *rq.method() == Method::Post => csrf::flush(rq, ctx, &peer),
        "/recipients" if *rq.method() == Method::Put => push_list(rq, ctx, &peer, &query),
        "/recipients" => text(rq, 405, "405 Method Not Allowed: push the list with PUT", &[("Allow", "PUT")]),
        "/flush" => text(rq, 405, "405 Method Not Allowed: use the button on the page (POST)", &[("Allow", "POST")]),
        "/" | "/api/queue" | "/metrics" => text(rq, 405, "405 Method Not Allowed", &[("Allow", "GET, HEAD")]),
        _ => text(rq, 404, "404 Not Found", &[]),
    }
}

/// `PUT /recipients`, vetted by the gate (peer, token, length), its body
/// already in a file in the spool that the gate names: parsed, guarded and
/// swapped in by [`Recipients::push`]. Here, one at a time: at most one
/// pushed list is being parsed in memory.
fn push_list(rq: Request, ctx: &mut Ctx, peer: &str, query: &str) {
    let name = header(&rq, "X-Bartleby-Push").unwrap_or("").to_string();
    if !name.starts_with(crate::policy::PUSH_TMP) || name.contains('/') {
        return text(rq, 400, "400 Bad Request: no body", &[]);
    }
    let Some(recipients) = &ctx.recipients else {
        return text(rq, 503, "503 Service Unavailable: no recipients list here", &[]);
    };
    let force = query.split('&').any(|kv| kv == "force=1");
    let tmp = ctx.cfg.spool.join(&name);
    let outcome = recipients.push(&tmp, force, peer, &ctx.stats);
    if outcome.is_err() {
        // Before the answer: once a pusher has it, nothing is left behind.
        push::remove(&tmp);
    }
    let count = |o| ctx.gate.push.count(o);
    match outcome {
        Ok((n, was)) => {
            count(push::Outcome::Accepted);
            text(rq, 200, &format!("200 OK: recipients list replaced: {n} entries (was {was})"), &[]);
        }
        Err(PushRefused::BadList(why)) => {
            count(push::Outcome::BadList);
            log::warn!(target: STATUS, "warning: recipients list pushed by {peer}: {why}; the list in force is kept");
            text(rq, 400, &format!("400 Bad Request: {why}; the list in force is kept"), &[]);
        }
        Err(PushRefused::Shrink(n, was)) => {
            count(push::Outcome::Shrink);
            let msg = format!(
                "409 Conflict: the pushed list has {n} entries, fewer than half of the {was} in force (a list cut short?); the list in force is kept. To take it anyway, push to /recipients?force=1"
            );
            text(rq, 409, &msg, &[]);
        }
        Err(PushRefused::Io(why)) => {
            count(push::Outcome::Failed);
            text(rq, 500, &format!("500 Internal Server Error: {why}; the list in force is kept"), &[]);
        }
    }
}

/// `GET /api/queue`: streamed, so the whole JSON is never in memory. The
/// body ends when the connection closes (valid for HTTP/1.0 and 1.1), which
/// also keeps tiny_http from buffering it for HTTP/1.0 clients.
fn api_queue(rq: Request, ctx: &Ctx) {
    let spool = match Spool::open(&ctx.cfg.spool) {
        Ok(s) => s,
        Err(e) => {
            let mut b = String::from("{\"error\":");
            json(&mut b, &e.to_string());
            b.push_str("}\n");
            return send(rq, 503, "application/json", b.into_bytes(), &[]);
        }
    };
    let head = *rq.method() == Method::Head;
    let routes = ctx.stats.routes.lock().map(|m| m.clone()).unwrap_or_default();
    let mut w = BufWriter::with_capacity(2048, rq.into_writer());
    let r = w
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\r\n")
        .and_then(|_| if head { Ok(()) } else { render::write_queue_json(&mut w, &spool, now(), Stats::get(&ctx.stats.primary_retry_at) as u64, &routes) })
        .and_then(|_| w.flush());
    if let Err(e) = r {
        log::debug!(target: STATUS, "status page: /api/queue: {e}");
    }
}
