//! The LAN status page: the queue, the primary, the spool disk and the
//! machine, a "Flush queue now" button, `/api/queue` (JSON) and `/metrics`
//! (Prometheus text format).
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

mod gate;
mod push;
mod render;

use std::io::{self, BufWriter, Read, Write};
use std::net::TcpListener;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use tiny_http::{Header, Method, Request, Response};

use crate::config::Config;
use crate::policy::{PushRefused, Recipients, Source};
use crate::logging::{self, STATUS};
use crate::spool::{self, Spool};
use crate::stats::Stats;
use crate::util::now;

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
        secret: random_hex(),
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
    let server = bind_backend(&gate)?;
    let (tx, rx) = mpsc::sync_channel(gate::QUEUE);
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..gate::WORKERS {
        let (rx, g) = (rx.clone(), gate.clone());
        std::thread::Builder::new()
            .name(format!("status-fwd{i}"))
            .stack_size(gate::STACK)
            .spawn(move || gate::worker(rx, g))?;
    }
    let ctx = Ctx { cfg, stats, gate: gate.clone(), token: random_hex(), last_flush: None, recipients };
    std::thread::Builder::new()
        .name("status-page".into())
        .stack_size(HANDLER_STACK)
        .spawn(move || serve(server, ctx))?;
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

/// Starts tiny_http on a fresh abstract Unix socket (no file to clean up,
/// nothing on the network) and tells the gate where it is.
fn bind_backend(gate: &gate::Gate) -> io::Result<tiny_http::Server> {
    let name = format!("bartleby-status-{}-{}", std::process::id(), &random_hex()[..8]);
    let addr = UnixAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&addr)?;
    let server = tiny_http::Server::from_listener(listener, None).map_err(|e| io::Error::other(e.to_string()))?;
    if let Ok(mut b) = gate.backend.lock() {
        *b = Some(addr);
    }
    Ok(server)
}

/// 128 random bits as hex, from the kernel ([`crate::sys::random_bytes`];
/// std's `RandomState`, itself seeded from the kernel, if it gives none).
fn random_hex() -> String {
    let mut b = [0u8; 16];
    if !crate::sys::random_bytes(&mut b) {
        use std::hash::{BuildHasher, RandomState};
        let t = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
        b[..8].copy_from_slice(&RandomState::new().hash_one((t, std::process::id())).to_le_bytes());
        b[8..].copy_from_slice(&RandomState::new().hash_one((t, 1u8)).to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Equality that does not stop at the first difference (for secrets).
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The handler's state.
struct Ctx {
    cfg: Arc<Config>,
    stats: Arc<Stats>,
    gate: Arc<gate::Gate>,
    /// The hidden form field that `POST /flush` must return.
    token: String,
    last_flush: Option<Instant>,
    /// What `PUT /recipients` replaces (none in the status demo).
    recipients: Option<Recipients>,
}

/// Answers requests forever, restarting tiny_http if its accept loop dies
/// (tiny_http 0.12 stops accepting for good after one `accept()` error).
fn serve(mut server: tiny_http::Server, mut ctx: Ctx) {
    loop {
        match server.recv() {
            Ok(rq) => handle(rq, &mut ctx),
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

fn header<'a>(rq: &'a Request, name: &'static str) -> Option<&'a str> {
    rq.headers().iter().find(|h| h.field.equiv(name)).map(|h| h.value.as_str())
}

fn hdr(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("ASCII header")
}

/// Sends a response with the headers every answer carries.
fn send(rq: Request, code: u16, ctype: &str, body: Vec<u8>, extra: &[(&str, &str)]) {
    let mut r = Response::from_data(body).with_status_code(code);
    r.add_header(hdr("Content-Type", ctype));
    r.add_header(hdr("Cache-Control", "no-store"));
    r.add_header(hdr("X-Content-Type-Options", "nosniff"));
    for (k, v) in extra {
        r.add_header(hdr(k, v));
    }
    let _ = rq.respond(r);
}

fn text(rq: Request, code: u16, msg: &str, extra: &[(&str, &str)]) {
    send(rq, code, "text/plain; charset=utf-8", format!("{msg}\n").into_bytes(), extra);
}

fn handle(rq: Request, ctx: &mut Ctx) {
    if !header(&rq, "X-Bartleby-Gate").is_some_and(|s| same(s, &ctx.gate.secret)) {
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
            let body = render::page(&page_data(ctx, flushed)).into_bytes();
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
            let body = metrics(ctx).into_bytes();
            send(rq, 200, "text/plain; version=0.0.4; charset=utf-8", body, &[]);
        }
        "/flush" if *rq.method() == Method::Post => flush(rq, ctx, &peer),
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

/// True when `url` (an Origin or Referer value) is `http(s)://host` or below it.
fn same_origin(url: &str, host: &str) -> bool {
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(r) => {
            let authority = r.split(['/', '?', '#']).next().unwrap_or("");
            authority.eq_ignore_ascii_case(host)
        }
        None => false,
    }
}

fn flush(mut rq: Request, ctx: &mut Ctx, peer: &str) {
    let mut body = Vec::with_capacity(128);
    let _ = rq.as_reader().take(gate::MAX_BODY as u64).read_to_end(&mut body);
    let body = String::from_utf8_lossy(&body);
    let token_ok = body
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .any(|(k, v)| k == "token" && same(v.trim(), &ctx.token));
    let host = header(&rq, "Host").unwrap_or("");
    // The token proves the form came from our page; Origin/Referer, when the
    // browser sends them, must agree (belt and braces against CSRF).
    let origin_ok = match (header(&rq, "Origin"), header(&rq, "Referer")) {
        (Some(o), _) => !host.is_empty() && same_origin(o, host),
        (None, Some(r)) => !host.is_empty() && same_origin(r, host),
        (None, None) => true,
    };
    if !token_ok || !origin_ok {
        log::warn!(target: STATUS, "warning: status page: refused a cross-site or stale flush from {peer}");
        return text(rq, 403, "403 Forbidden: this flush did not come from the status page (reload the page and try again)", &[]);
    }
    let interval = ctx.cfg.status.flush_interval;
    if let Some(t) = ctx.last_flush {
        let since = t.elapsed();
        if since < interval {
            let wait = (interval - since).as_secs_f64().ceil().max(1.0) as u64;
            let msg = format!("429 Too Many Requests: the queue was flushed moments ago; try again in {wait} s");
            return text(rq, 429, &msg, &[("Retry-After", &wait.to_string())]);
        }
    }
    ctx.last_flush = Some(Instant::now());
    ctx.stats.request_flush();
    log::info!(target: STATUS, "flush requested from the status page by {peer}");
    send(rq, 303, "text/plain; charset=utf-8", b"303 See Other: /?flushed=1\n".to_vec(), &[("Location", "/?flushed=1")]);
}

/// Whether the recipients file can be seen.
fn recipients_list(cfg: &Config) -> render::RecipientsList {
    let Some(p) = &cfg.recipients else {
        return render::RecipientsList::NotConfigured;
    };
    match std::fs::metadata(p) {
        Ok(_) => render::RecipientsList::Present,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => render::RecipientsList::Missing("no such file".into()),
        Err(e) => render::RecipientsList::Missing(e.to_string()),
    }
}

/// Where the list in force came from, when, and whether that is too long
/// ago (`[status] recipients_max_age`; 0: never stale).
fn freshness(ctx: &Ctx, now: u64) -> render::Freshness {
    let st = &ctx.stats;
    let source = Source::of(st.recipients_source.load(Ordering::Relaxed));
    let updated = u64::from(Stats::get(&st.recipients_updated));
    let max_age = ctx.cfg.status.recipients_max_age.as_secs();
    let path = match source {
        Source::Push => ctx.cfg.spool.join(crate::policy::PUSHED),
        Source::LastGood => ctx.cfg.spool.join(crate::policy::LAST_GOOD),
        _ => ctx.cfg.recipients.clone().unwrap_or_else(|| ctx.cfg.spool.join(crate::policy::PUSHED)),
    };
    let stale = source != Source::None && max_age > 0 && updated > 0 && now.saturating_sub(updated) > max_age;
    render::Freshness { source, updated, stale, path: path.display().to_string(), push: ctx.gate.push.enabled() }
}

fn page_data<'a>(ctx: &'a Ctx, flushed: bool) -> render::PageData<'a> {
    let cfg = &ctx.cfg;
    let st = &ctx.stats;
    let get = |c: &std::sync::atomic::AtomicU32| Stats::get(c);
    render::PageData {
        hostname: &cfg.hostname,
        primary_name: &cfg.primary,
        spool_path: cfg.spool.to_str().unwrap_or("?"),
        now: now(),
        started: st.started.load(Ordering::Relaxed) as u64,
        queue: render::QueueView::read(Spool::open(&cfg.spool), render::MAX_ROWS),
        disk: spool::disk_space(&cfg.spool).map_err(|e| e.to_string()),
        system: render::SystemView::read(),
        primary: st.primary(),
        primary_retry_at: get(&st.primary_retry_at) as u64,
        routes: st.routes.lock().map(|m| m.clone()).unwrap_or_default(),
        counters: [
            ("Received", get(&st.received)),
            ("Delivered", get(&st.delivered)),
            ("Deferred", get(&st.deferred)),
            ("Bounced", get(&st.bounced)),
            ("Rejected", get(&st.rejected)),
            ("SMTP sessions now", get(&st.connections)),
            ("Flush requests", get(&st.flush_requests)),
        ],
        persistent_spool: st.check_spool(&cfg.spool),
        spool_note: st.spool_note.lock().map(|s| s.clone()).unwrap_or_default(),
        spool_unwritable: st.spool_unwritable.load(Ordering::Relaxed),
        spool_removals_only: st.spool_removals_only.load(Ordering::Relaxed),
        recipients_path: cfg.recipients.as_ref().map(|p| p.display().to_string()),
        recipients: recipients_list(cfg),
        recipients_max_age: cfg.status.recipients_max_age,
        freshness: freshness(ctx, now()),
        log: logging::recent_lines(),
        token: &ctx.token,
        flushed,
        flush_interval: cfg.status.flush_interval,
        recipients_entries: get(&st.recipients_entries),
        recipients_kept: st.recipients_kept.lock().map(|s| s.clone()).unwrap_or_default(),
        recipients_unusable: st.recipients_unusable.load(Ordering::Relaxed),
        client_limits: crate::clients::Limits::of(cfg),
        client_limited: st.clients.limited(now()),
        verify: cfg.verify_recipients.then(|| verify_view(cfg, st, now())),
        tls: st.tls.lock().map(|t| t.clone()).unwrap_or_default(),
        tls_built: cfg!(feature = "tls"),
        alerts: st.alerts.lock().map(|a| a.clone()).unwrap_or_default(),
    }
}

fn verify_view(cfg: &Config, st: &Stats, now: u64) -> render::VerifyView {
    let last_refresh = u64::from(Stats::get(&st.verify_last_refresh));
    let max_age = cfg.status.recipients_max_age.as_secs();
    render::VerifyView {
        stale: max_age > 0 && last_refresh > 0 && now.saturating_sub(last_refresh) > max_age,
        positive: Stats::get(&st.verify_positive),
        negative: Stats::get(&st.verify_negative),
        hits: Stats::get(&st.verify_hits),
        misses: Stats::get(&st.verify_misses),
        probes: Stats::get(&st.verify_probes),
        answered: Stats::get(&st.verify_answered),
        last_refresh,
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

/// `GET /metrics`. Queue figures come from the spool (authoritative, right
/// even just after a restart), counters from [`Stats`].
fn metrics(ctx: &Ctx) -> String {
    use render::metric;
    use std::fmt::Write as _;
    let st = &ctx.stats;
    let cfg = &ctx.cfg;
    let q = render::QueueView::read(Spool::open(&cfg.spool), 0);
    let t = now();
    let mut o = String::with_capacity(3072);
    metric(&mut o, "bartleby_spool_readable", "gauge", "1 if the spool could be listed.", u8::from(q.error.is_none()));
    {
        let alerts = st.alerts.lock().map(|a| a.clone()).unwrap_or_default();
        metric(&mut o, "bartleby_alerts", "gauge", "Problems found at start that need the administrator (each one below as bartleby_alert).", alerts.len());
        if !alerts.is_empty() {
            o.push_str("# HELP bartleby_alert A problem found at start, in plain words.\n# TYPE bartleby_alert gauge\n");
            for a in &alerts {
                let esc = a.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                let _ = writeln!(o, "bartleby_alert{{message=\"{esc}\"}} 1");
            }
        }
        // the machine's own clock (also under an emulator's instruction
        // counting, where the host's clock says nothing about the guest's speed)
        if let Some(up) = std::fs::read_to_string("/proc/uptime").ok().and_then(|u| u.split_whitespace().next().and_then(|x| x.parse::<f64>().ok())) {
            metric(&mut o, "bartleby_machine_uptime_seconds", "gauge", "Seconds since the machine booted (/proc/uptime, 10 ms steps).", crate::util::decimal(up, 2));
        }
        let sys = render::SystemView::read();
        if sys.mem_total > 0 {
            metric(&mut o, "bartleby_memory_available_bytes", "gauge", "MemAvailable of the machine.", sys.mem_available);
            metric(
                &mut o,
                "bartleby_memory_short",
                "gauge",
                "1 if the machine has less than 512 kB available: the relay may refuse mail or be stopped by the kernel.",
                u8::from(sys.mem_available < crate::init::MEM_SHORT_KB * 1024),
            );
        }
    }
    metric(&mut o, "bartleby_queue_messages", "gauge", "Messages in the queue.", q.count);
    metric(&mut o, "bartleby_queue_bytes", "gauge", "Bytes of message data in the queue.", q.bytes);
    metric(
        &mut o,
        "bartleby_oldest_message_age_seconds",
        "gauge",
        "Age of the oldest queued message (0 when the queue is empty).",
        q.oldest.map_or(0, |a| t.saturating_sub(a)),
    );
    let counters = [
        ("bartleby_received_total", "Messages accepted since start.", &st.received),
        ("bartleby_delivered_total", "Messages delivered to the primary since start.", &st.delivered),
        ("bartleby_deferred_total", "Delivery attempts deferred since start.", &st.deferred),
        ("bartleby_bounced_total", "Messages bounced since start.", &st.bounced),
        ("bartleby_rejected_total", "SMTP transactions rejected since start.", &st.rejected),
        ("bartleby_flush_requests_total", "Queue flushes requested since start.", &st.flush_requests),
    ];
    for (name, help, c) in counters {
        metric(&mut o, name, "counter", help, Stats::get(c));
    }
    metric(&mut o, "bartleby_connections", "gauge", "SMTP sessions open now.", Stats::get(&st.connections));
    let tls = st.tls.lock().map(|t| t.clone()).unwrap_or_default();
    if let Some(i) = &tls.info {
        metric(&mut o, "bartleby_tls_certificate_expiry_seconds", "gauge", "notAfter of the STARTTLS certificate in force (unix time).", i.not_after);
    }
    if tls.configured {
        metric(
            &mut o,
            "bartleby_tls_certificate_reload_failed",
            "gauge",
            "1 if the certificate and key files on disk were refused (the pair in force is older, or none).",
            u8::from(!tls.warning.is_empty()),
        );
    }
    o.push_str("# HELP bartleby_client_limit_refusals_total Refusals by a per-client limit since start.\n# TYPE bartleby_client_limit_refusals_total counter\n");
    for (label, c) in [
        ("connections", &st.client_refusals_connections),
        ("queue_share", &st.client_refusals_queue_share),
        ("rate", &st.client_refusals_rate),
    ] {
        let _ = writeln!(o, "bartleby_client_limit_refusals_total{{limit=\"{label}\"}} {}", Stats::get(c));
    }
    if cfg.log_host.is_some() {
        metric(
            &mut o,
            "bartleby_log_host_dropped_total",
            "counter",
            "Log lines not sent to log_host (the socket could not take them at once) since start.",
            logging::log_host_dropped(),
        );
    }
    metric(&mut o, "bartleby_clients_tracked", "gauge", "Clients in the per-client limits table.", st.clients.tracked());
    if let Ok(d) = spool::disk_space(&cfg.spool) {
        metric(&mut o, "bartleby_spool_free_bytes", "gauge", "Space available on the spool file system.", d.avail);
        metric(&mut o, "bartleby_spool_size_bytes", "gauge", "Size of the spool file system.", d.total);
        if d.files > 0 {
            metric(&mut o, "bartleby_spool_free_inodes", "gauge", "Inodes available on the spool file system.", d.favail);
        }
    }
    metric(
        &mut o,
        "bartleby_spool_unrecorded_messages",
        "gauge",
        "Delivered messages the spool could not record yet (delivered again after a restart now).",
        Stats::get(&st.spool_unrecorded),
    );
    metric(
        &mut o,
        "bartleby_spool_recording",
        "gauge",
        "0 while a spool write failed and the write probe has not passed (MAIL gets 452; deliveries suspended or, on a full spool, only messages with one recipient left).",
        u8::from(!st.spool_unwritable.load(Ordering::Relaxed)),
    );
    // Unknown before the first attempt: NaN, so "== 0" alerts do not fire.
    let up = match st.primary().up {
        Some(true) => "1",
        Some(false) => "0",
        None => "NaN",
    };
    metric(&mut o, "bartleby_primary_up", "gauge", "1 if the last connection to the primary succeeded.", up);
    metric(
        &mut o,
        "bartleby_persistent_spool",
        "gauge",
        "1 if the spool is on persistent storage.",
        u8::from(st.check_spool(&cfg.spool)),
    );
    let fr = freshness(ctx, t);
    if cfg.recipients.is_some() || fr.source != Source::None || fr.push {
        metric(&mut o, "bartleby_recipients_entries", "gauge", "Entries of the recipients list in force.", Stats::get(&st.recipients_entries));
        let unusable = st.recipients_unusable.load(Ordering::Relaxed);
        let kept = !unusable && st.recipients_kept.lock().map(|s| !s.is_empty()).unwrap_or(false);
        metric(&mut o, "bartleby_recipients_list_kept", "gauge", "1 if the last reload of the recipients list was refused and the previous list kept.", u8::from(kept));
        metric(
            &mut o,
            "bartleby_recipients_list_usable",
            "gauge",
            "0 if no recipients list can be used: every recipient gets 451 4.3.0.",
            u8::from(!unusable),
        );
        o.push_str("# HELP bartleby_recipients_source 1 for where the recipients list in force came from.\n# TYPE bartleby_recipients_source gauge\n");
        for s in [Source::File, Source::Push, Source::LastGood] {
            let _ = writeln!(o, "bartleby_recipients_source{{source=\"{}\"}} {}", s.label(), u8::from(fr.source == s));
        }
        if fr.updated > 0 {
            metric(
                &mut o,
                "bartleby_recipients_last_update_timestamp_seconds",
                "gauge",
                "When the recipients list in force was taken from its source (file modification time, or the push).",
                fr.updated,
            );
            metric(&mut o, "bartleby_recipients_list_age_seconds", "gauge", "Age of the recipients list in force.", t.saturating_sub(fr.updated));
        }
        metric(
            &mut o,
            "bartleby_recipients_stale",
            "gauge",
            "1 if the recipients list was not refreshed within [status] recipients_max_age.",
            u8::from(fr.stale),
        );
    }
    if fr.push {
        o.push_str("# HELP bartleby_recipients_pushes_total Pushes of the recipients list (PUT /recipients) since start, by result.\n# TYPE bartleby_recipients_pushes_total counter\n");
        for r in push::Outcome::ALL {
            let _ = writeln!(o, "bartleby_recipients_pushes_total{{result=\"{}\"}} {}", r.label(), ctx.gate.push.counted(r));
        }
    }
    if cfg.verify_recipients {
        let v = verify_view(cfg, st, t);
        o.push_str("# HELP bartleby_verify_cache_entries Entries of the recipient verification cache.\n# TYPE bartleby_verify_cache_entries gauge\n");
        let _ = writeln!(o, "bartleby_verify_cache_entries{{kind=\"positive\"}} {}", v.positive);
        let _ = writeln!(o, "bartleby_verify_cache_entries{{kind=\"negative\"}} {}", v.negative);
        metric(&mut o, "bartleby_verify_cache_hits_total", "counter", "Recipient lookups answered from the verification cache.", v.hits);
        metric(&mut o, "bartleby_verify_cache_misses_total", "counter", "Recipient lookups not in the verification cache.", v.misses);
        metric(&mut o, "bartleby_verify_probes_total", "counter", "Verification probes sent to the primary (RCPT TO).", v.probes);
        metric(&mut o, "bartleby_verify_probes_answered_total", "counter", "Verification probes the primary answered (2xx, 4xx or 5xx).", v.answered);
        metric(&mut o, "bartleby_verify_last_refresh_timestamp_seconds", "gauge", "When the primary last answered a probe with yes or no (0: never).", v.last_refresh);
        metric(&mut o, "bartleby_verify_stale", "gauge", "1 if the primary has not refreshed the verification cache within [status] recipients_max_age.", u8::from(v.stale));
    }
    let started = st.started.load(Ordering::Relaxed) as u64;
    metric(&mut o, "bartleby_uptime_seconds", "gauge", "Seconds since the relay started.", t.saturating_sub(started));
    o
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

    #[test]
    fn origins() {
        assert!(same_origin("http://192.168.1.5:8080", "192.168.1.5:8080"));
        assert!(same_origin("http://relay.lan/?x", "RELAY.lan"));
        assert!(!same_origin("http://relay.lan.evil.test/", "relay.lan"));
        assert!(!same_origin("null", "relay.lan"));
        assert!(!same_origin("http://relay.lan:81", "relay.lan"));
    }

    #[test]
    fn random_tokens_differ() {
        let (a, b) = (random_hex(), random_hex());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(same(&a, &a) && !same(&a, &b));
    }
}
