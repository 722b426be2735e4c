//! The status page's HTTP server: tiny_http (the design card names it) on a
//! private abstract Unix socket that only the gate ([`super::gate`]) connects
//! to, the handler's loop over its requests, restarted when tiny_http's
//! accept loop dies, and the helpers that answer a request.
//!
//! Role: transport only. What a request means is [`super::routes`]'s.
//! May touch: the private socket, the gate's `backend` address.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener};
use std::time::Duration;

use tiny_http::{Header, Request, Response};

use super::gate;
use super::routes::{self, Ctx};
use crate::logging::STATUS;

/// Starts tiny_http on a fresh abstract Unix socket (no file to clean up,
/// nothing on the network) and tells the gate where it is.
pub(super) fn bind_backend(gate: &gate::Gate) -> io::Result<tiny_http::Server> {
    let name = format!("bartleby-status-{}-{}", std::process::id(), &super::csrf::random_hex()[..8]);
    let addr = UnixAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&addr)?;
    let server = tiny_http::Server::from_listener(listener, None).map_err(|e| io::Error::other(e.to_string()))?;
    if let Ok(mut b) = gate.backend.lock() {
        *b = Some(addr);
    }
    Ok(server)
}

/// Answers requests forever, restarting tiny_http if its accept loop dies
/// (tiny_http 0.12 stops accepting for good after one `accept()` error).
pub(super) fn serve(mut server: tiny_http::Server, mut ctx: Ctx) {
    loop {
        match server.recv() {
            Ok(rq) => routes::handle(rq, &mut ctx),
            Err(e) => {
                log::warn!(target: STATUS, "warning: status page: internal server stopped ({e}); restarting it");
                // tiny_http's Drop unwraps the socket's path, and an abstract
                // socket has none: leak the dead server (a few bytes) instead.
                std::mem::forget(server);
                server = loop {
                    std::thread::sleep(Duration::from_secs(1));
                    match bind_backend(&ctx.gate) {
                        Ok(s) => break s,
                        Err(e) => log::warn!(target: STATUS, "warning: status page: {e}"),
                    }
                };
            }
        }
    }
}

pub(super) fn header<'a>(rq: &'a Request, name: &'static str) -> Option<&'a str> {
    rq.headers().iter().find(|h| h.field.equiv(name)).map(|h| h.value.as_str())
}

fn hdr(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("ASCII header")
}

/// Sends a response with the headers every answer carries.
pub(super) fn send(rq: Request, code: u16, ctype: &str, body: Vec<u8>, extra: &[(&str, &str)]) {
    let mut r = Response::from_data(body).with_status_code(code);
    r.add_header(hdr("Content-Type", ctype));
    r.add_header(hdr("Cache-Control", "no-store"));
    r.add_header(hdr("X-Content-Type-Options", "nosniff"));
    for (k, v) in extra {
        r.add_header(hdr(k, v));
    }
    let _ = rq.respond(r);
}

pub(super) fn text(rq: Request, code: u16, msg: &str, extra: &[(&str, &str)]) {
    send(rq, code, "text/plain; charset=utf-8", format!("{msg}\n").into_bytes(), extra);
}
