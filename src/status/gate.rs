//! The gate: a small, bounded front end that vets every HTTP connection
//! before tiny_http sees it.
//!
//! Role: the status page's only socket on the network. May touch: that
//! socket, its connections, the private socket of [`super::backend`].
//!
//! Why: tiny_http 0.12 spawns a thread per connection, buffers headers
//! without limit, has no timeouts and stops accepting for good after one
//! `accept()` error (see /work/shared/research/crates.md §2). On a 16 MB
//! machine one client could exhaust memory or threads. So tiny_http listens
//! only on a private socket, and this gate is the only thing on the network:
//!
//! * **One thread** multiplexes every connection that has not yet sent its
//!   whole request with `poll(2)`. An idle connection costs a socket and a
//!   few dozen bytes, never a thread. At most [`MAX_PENDING`] are kept; when
//!   a new one arrives and the set is full the *oldest* is dropped, so a
//!   flood of idle connections can delay a real browser by milliseconds, not
//!   lock it out.
//! * The **allow-list** is checked at `accept`: other peers get a 403 and
//!   nothing else, and are never read from (beyond draining for a clean close).
//! * The **`Host`** of every request must be one of the page's own names
//!   ([`Hosts`]), else 421 and nothing else: the defence against DNS rebinding.
//! * The request head must fit in [`MAX_HEAD`] bytes (else 431), a body in
//!   [`MAX_BODY`] bytes (else 413), and both must arrive within
//!   [`REQUEST_DEADLINE`] (else 408). Chunked request bodies are refused.
//! * `PUT /recipients` (a push of the recipients list, up to 1 MiB) is the
//!   exception: its head is vetted here (also from `[status] push_allow`,
//!   which may send nothing else), and its body is never buffered here: a
//!   worker streams it to a file in the spool ([`super::push`]).
//! * A vetted request is re-written (hop-by-hop headers and any client
//!   `X-Bartleby-*` header removed; `Connection: close`, `X-Bartleby-Peer`
//!   and the per-process `X-Bartleby-Gate` secret added) and queued for one
//!   of [`WORKERS`] threads with 64 KiB stacks, which forward it to tiny_http
//!   and copy the response back under write timeouts and a total deadline.
//!   When all workers are busy, a complete request waits (unread, in the
//!   pending set) up to [`READY_WAIT`] for one, and gets 503 after that.
//! * Errors never stop the accept loop: on EMFILE and the like it drops the
//!   oldest pending connection, sleeps 50 ms and carries on.
//!
//! # Every limit, in one place
//!
//! The constants below this comment are all the bounds of the page's
//! network side; nothing else in `status/` sets one, except where noted:
//!
//! | what | bound | constant |
//! |---|---|---|
//! | connections held (reading, waiting, draining) | 40, oldest dropped | [`MAX_PENDING`] |
//! | complete requests waiting for a worker | 16, then 503 | [`MAX_READY`], [`READY_WAIT`] 10 s |
//! | request head | 8 KiB, then 431 | [`MAX_HEAD`] |
//! | request body (`POST /flush`) | 4 KiB, then 413 | [`MAX_BODY`] |
//! | pushed recipients list (`PUT /recipients`) | 1 MiB, then 413 | [`crate::policy::MAX_LIST_BYTES`]; its time: [`super::push::PUSH_DEADLINE`] |
//! | time to send the request | 5 s, then 408 | [`REQUEST_DEADLINE`] |
//! | one read or write | 5 s | [`IO_TIMEOUT`] |
//! | the page to be rendered | 30 s | [`BACKEND_TIMEOUT`] |
//! | the response to be delivered | 30 s | [`RESPONSE_DEADLINE`] |
//! | draining after an error reply | 2 s, 256 KiB | [`LINGER`], [`LINGER_BYTES`] |
//! | forwarding threads, their stacks | 4 x 64 KiB | [`WORKERS`], [`STACK`] |
//! | requests handed over, not yet taken | 2 | [`QUEUE`] |
//! | free descriptors before reaching tiny_http | 6; none for 1 s after an EMFILE | [`FD_HEADROOM`], [`FD_PRESSURE`], [`ACCEPT_GRACE`] |
//!
//! Behind the gate: tiny_http's own accept thread and pool of 4 threads
//! (stacks from `RUST_MIN_STACK`), restarted by [`super::backend`] if its
//! accept loop dies, and one handler thread ([`super::HANDLER_STACK`]) that
//! answers one request at a time, so one page at most is in memory.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixStream};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{self, Cidr};
use crate::logging::STATUS;

/// Connections the gate holds: still sending their request, waiting for a
/// worker, or being drained after an error. Worst case in memory:
/// `MAX_PENDING * (MAX_HEAD + MAX_BODY)` = 480 KiB; an idle one costs a socket.
pub const MAX_PENDING: usize = 40;
/// Complete requests waiting for a worker; more get 503 at once, so a burst
/// of real requests never pushes the idle-connection eviction onto them.
pub const MAX_READY: usize = 16;
/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body (only `POST /flush` has one: a token).
pub const MAX_BODY: usize = 4 * 1024;
/// Time a client has to send its whole request.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Worker threads forwarding requests to tiny_http.
pub const WORKERS: usize = 4;
/// Vetted requests handed over but not yet taken by a worker (more wait in
/// the gate's pending set, where they cost no thread).
pub const QUEUE: usize = 2;
/// Stack of the gate's own threads (they hold at most a 2 KiB buffer).
pub const STACK: usize = 64 * 1024;
/// A complete request waits at most this long for a free worker (then 503).
const READY_WAIT: Duration = Duration::from_secs(10);
/// Read/write timeout of a single socket operation.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// A response must be delivered within this time, however slow the reader.
const RESPONSE_DEADLINE: Duration = Duration::from_secs(30);
/// Time to wait for the page to be rendered (a big queue on a 486 is slow).
const BACKEND_TIMEOUT: Duration = Duration::from_secs(30);
/// After an error reply, input is read and thrown away this long (at most
/// [`LINGER_BYTES`]) so that closing does not send an RST that would destroy
/// the reply before the client read it (Apache's "lingering close").
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 256 * 1024;

/// Free descriptors needed before connecting to tiny_http: ours, its
/// accepted socket and clone, and a couple for the handler's spool reads.
const FD_HEADROOM: usize = 6;
/// How long a worker keeps the gate from accepting after connecting to
/// tiny_http (its accept thread does nothing else, so this is ample).
const ACCEPT_GRACE: Duration = Duration::from_millis(200);

/// After an EMFILE, requests are not passed to tiny_http for this long.
const FD_PRESSURE: Duration = Duration::from_secs(1);

/// What the gate shares with the rest of the status page.
pub struct Gate {
    pub allow: Vec<Cidr>,
    /// The `Host` values answered.
    pub hosts: Hosts,
    /// Where tiny_http listens now (replaced if it has to be restarted).
    pub backend: Mutex<Option<UnixAddr>>,
    /// Proves to the handler that a request came through the gate.
    pub secret: String,
    /// When `accept` last failed for want of descriptors (see [`fd_headroom`]).
    pub fd_pressure: Mutex<Option<Instant>>,
    /// Held by a worker from its descriptor check until tiny_http has
    /// accepted its connection; the gate does not accept meanwhile.
    pub fd_lock: Mutex<()>,
    /// `PUT /recipients` (see [`super::push`]).
    pub push: super::push::Push,
}

impl Gate {
    fn under_fd_pressure(&self) -> bool {
        self.fd_pressure.lock().ok().and_then(|t| *t).is_some_and(|t| t.elapsed() < FD_PRESSURE)
    }
}

/// The `Host` values the page answers for: the defence against DNS rebinding.
///
/// A rebinding page on `evil.test` has its name re-pointed at the relay's
/// LAN address, and its scripts then read the relay's answers as their own
/// (same origin): the flush token, the envelopes in `/api/queue`. What the
/// attacker cannot change is the `Host` the browser sends: the name it
/// resolved (a forbidden header for scripts). So the page answers only for
///
/// * the configured `hostname` and the `[status] names` (names or IP
///   addresses), case-insensitively, with or without a trailing dot;
/// * `localhost` and loopback literals (`127.0.0.0/8`, `[::1]`): they reach
///   this socket only through a tunnel or port forward the administrator set
///   up (`ssh -L`, QEMU's `hostfwd` in `qemu/run`), and no attacker's name
///   is involved;
/// * IP literals of the listening address; when that is `0.0.0.0` or `[::]`,
///   of any interface of this machine, read with `getifaddrs` at the time of
///   the request so a DHCP renumbering is followed. An IP literal cannot be
///   rebound, so this is about misdirected requests (a stale bookmark of a
///   neighbour's address), not rebinding.
///
/// The port is not compared: rebinding is in the name, and port forwards
/// (the appliance's :80 seen as `localhost:8080`) change the port.
///
/// A request without `Host` is answered for HTTP/1.0 only (an old text
/// browser, a shell script with `nc`): every browser that runs scripts sends
/// `Host`, so its absence cannot be a rebinding page. HTTP/1.1 without
/// `Host`, or with two, is a 400 (RFC 9112 §3.2).
pub struct Hosts {
    /// Lower case, without a trailing dot.
    names: Vec<String>,
    /// Canonical (IPv4-mapped addresses as IPv4).
    ips: Vec<IpAddr>,
    /// Listening on a wildcard address: any address of this machine.
    any_local: bool,
    /// When a refusal was last logged (unix seconds; 32 bits for the 486).
    warned: AtomicU32,
}

/// A parsed `Host` value (its port dropped).
#[derive(Debug, PartialEq)]
enum HostName {
    Ip(IpAddr),
    Name(String),
}

/// Parses a `Host` value: `uri-host [":" port]` (RFC 9110 §7.2), where the
/// host is a bracketed IPv6 literal, a dotted IPv4 literal or a DNS name
/// (one trailing dot allowed). `None` when it is not well-formed.
fn parse_host(v: &str) -> Option<HostName> {
    let (host, port) = match v.strip_prefix('[') {
        Some(rest) => {
            let (h, after) = rest.split_once(']')?;
            let port = if after.is_empty() { "" } else { after.strip_prefix(':')? };
            (HostName::Ip(IpAddr::V6(h.parse::<Ipv6Addr>().ok()?)), port)
        }
        None => {
            let (h, port) = v.split_once(':').unwrap_or((v, ""));
            let h = h.strip_suffix('.').unwrap_or(h);
            if h.is_empty() || h.len() > 253 {
                return None;
            }
            match h.parse::<Ipv4Addr>() {
                Ok(ip) => (HostName::Ip(IpAddr::V4(ip)), port),
                Err(_) => {
                    let label_ok = |l: &str| !l.is_empty() && l.len() <= 63 && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
                    if !h.split('.').all(label_ok) {
                        return None;
                    }
                    (HostName::Name(h.to_ascii_lowercase()), port)
                }
            }
        }
    };
    // RFC 3986: port = *DIGIT (may be empty).
    let port_ok = port.len() <= 5 && port.bytes().all(|c| c.is_ascii_digit()) && port.parse::<u32>().map_or(port.is_empty(), |p| p <= 65535);
    port_ok.then_some(host)
}

impl Hosts {
    /// `names` as checked by the config (lower case, IP addresses canonical).
    pub fn new(hostname: &str, names: &[String], listen: SocketAddr) -> Hosts {
        let mut h = Hosts { names: vec![hostname.to_ascii_lowercase(), "localhost".into()], ips: Vec::new(), any_local: false, warned: AtomicU32::new(0) };
        for n in names {
            match n.parse::<IpAddr>() {
                Ok(ip) => h.ips.push(ip.to_canonical()),
                Err(_) => h.names.push(n.to_ascii_lowercase()),
            }
        }
        let ip = listen.ip().to_canonical();
        if ip.is_unspecified() {
            h.any_local = true;
        } else {
            h.ips.push(ip);
        }
        h
    }

    fn ip_ok(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_loopback() || self.ips.contains(&ip) || (self.any_local && !ip.is_unspecified() && is_local_address(ip))
    }

    /// Vets the `Host` fields of a request: `Ok`, or the status to refuse it with.
    fn check(&self, hosts: &[&str], http10: bool, peer: IpAddr) -> Result<(), (u16, &'static str)> {
        let value = match hosts {
            [] if http10 => return Ok(()),
            [v] => *v,
            _ => return Err((400, "Bad Request")),
        };
        let ok = match parse_host(value).ok_or((400, "Bad Request"))? {
            HostName::Ip(ip) => self.ip_ok(ip),
            HostName::Name(n) => self.names.contains(&n),
        };
        if ok {
            return Ok(());
        }
        // Well-formed, so printable ASCII: safe to log as it is.
        let now = crate::util::now() as u32;
        if now.wrapping_sub(self.warned.load(Ordering::Relaxed)) >= 60 {
            self.warned.store(now, Ordering::Relaxed);
            log::warn!(
                target: STATUS,
                "warning: status page: refused a request from {} for Host \"{value}\": not the hostname, a [status] names entry or an address of this machine (DNS rebinding?); more in the next minute are not logged",
                peer.to_canonical()
            );
        } else {
            log::debug!(target: STATUS, "status page: refused Host \"{value}\" from {}", peer.to_canonical());
        }
        Err((421, "Misdirected Request"))
    }
}

/// True when `ip` is an address of one of this machine's interfaces.
fn is_local_address(ip: IpAddr) -> bool {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs stores a list it allocated in `list`; freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return false;
    }
    let mut found = false;
    let mut p = list;
    while !p.is_null() && !found {
        // SAFETY: `p` is a node of the list, valid until freeifaddrs.
        let ifa = unsafe { &*p };
        let sa = ifa.ifa_addr;
        if !sa.is_null() {
            // SAFETY: `sa` points to a socket address whose family says which
            // struct it is; sockaddr_in and sockaddr_in6 are read only then.
            let addr = unsafe {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => Some(IpAddr::V4(Ipv4Addr::from(u32::from_be((*sa.cast::<libc::sockaddr_in>()).sin_addr.s_addr)))),
                    libc::AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from((*sa.cast::<libc::sockaddr_in6>()).sin6_addr.s6_addr))),
                    _ => None,
                }
            };
            found = addr == Some(ip);
        }
        p = ifa.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// True when `n` more descriptors can be opened now (by dup'ing `fd` and
/// closing the copies).
///
/// Why: tiny_http's accept thread clones every accepted stream with
/// `try_clone().unwrap()` (util/refined_tcp_stream.rs), so an EMFILE at that
/// moment is a panic, and with `panic = "abort"` the whole relay dies. The
/// gate is the only thing that connects to tiny_http, so it checks first.
/// Descriptors are process-wide, so this narrows the window, it cannot close
/// it. The gate's own use is bounded (about [`MAX_PENDING`] + 3 x [`WORKERS`]),
/// and it does not accept while a worker holds [`Gate::fd_lock`]; what remains
/// is the SMTP side opening descriptors in that window of a few milliseconds.
fn fd_headroom(fd: std::os::unix::io::RawFd, n: usize) -> bool {
    let mut dups = [-1; 8];
    let mut ok = true;
    for d in dups.iter_mut().take(n) {
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own; copies are closed below.
        *d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if *d < 0 {
            ok = false;
            break;
        }
    }
    for d in dups.into_iter().filter(|d| *d >= 0) {
        // SAFETY: `d` is a descriptor this function just created.
        unsafe { libc::close(d) };
    }
    ok
}

/// A vetted request on its way to a worker.
pub struct Job {
    stream: TcpStream,
    request: Vec<u8>,
    /// A push: the length of the head in `request` (the rest is the start
    /// of the body), and of the whole body.
    push: Option<(usize, usize)>,
}

enum Phase {
    /// Reading the request; `need` is its full length once the head is parsed.
    Reading { need: Option<usize> },
    /// The request is complete and waits for a free worker (not polled for input).
    Ready,
    /// An error reply was sent; draining input until EOF or the deadline.
    Linger { discarded: usize },
}

struct Conn {
    stream: TcpStream,
    peer: IpAddr,
    deadline: Instant,
    buf: Vec<u8>,
    phase: Phase,
    /// The peer is in `[status] allow` (else it is only in `push_allow`,
    /// and may send nothing but a push).
    page_ok: bool,
    /// See [`Job::push`].
    push: Option<(usize, usize)>,
}

enum Step {
    Keep,
    Close,
}

/// Writes a complete small response. The socket's send buffer is empty at
/// this point, so one non-blocking write takes it whole.
fn reply(stream: &mut TcpStream, code: u16, reason: &str, extra: &str) {
    let hint = match code {
        421 => "This status page answers only for its own names: its IP address, its hostname, or a name in [status] names.\n",
        _ => "",
    };
    reply_text(stream, code, reason, extra, hint);
}

/// [`reply`] with a text of our own after the status line in the body.
fn reply_text(stream: &mut TcpStream, code: u16, reason: &str, extra: &str, hint: &str) {
    let hint = if hint.is_empty() || hint.ends_with('\n') { hint.to_string() } else { format!("{hint}\n") };
    let body_len = reason.len() + 5 + hint.len();
    let msg = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {body_len}\r\nCache-Control: no-store\r\nConnection: close\r\n{extra}\r\n{code} {reason}\n{hint}"
    );
    let _ = stream.write(msg.as_bytes());
}

impl Conn {
    /// Sends an error reply and switches to draining.
    fn fail(&mut self, code: u16, reason: &str, extra: &str) {
        reply(&mut self.stream, code, reason, extra);
        self.linger();
    }

    /// [`Conn::fail`] for a push refused by the gate, counted.
    fn refuse_push(&mut self, gate: &Gate, (o, r): (super::push::Outcome, super::push::Refusal)) {
        gate.push.count(o);
        reply_text(&mut self.stream, r.code, r.reason, r.extra, &r.text);
        self.linger();
    }

    fn linger(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
        self.buf = Vec::new();
        self.phase = Phase::Linger { discarded: 0 };
        self.deadline = Instant::now() + LINGER;
    }

    /// The head of a push (`end` bytes in `buf`): vetted (Host, who, token,
    /// length), then Ready with only what came with the head; a worker
    /// streams the body to disk (super::push). False when refused.
    fn push_head(&mut self, end: usize, gate: &Gate) -> bool {
        use super::push::{Outcome, Refusal};
        let max = crate::policy::MAX_LIST_BYTES as usize;
        let (fwd, body_len, expect) = match rewrite_with(&self.buf[..end], self.peer, &gate.secret, &gate.hosts, max, true) {
            Ok(r) => r,
            Err((501, _)) => {
                let text = "send Content-Length (curl -T FILE does; a chunked body, as from a pipe, is not taken)".into();
                self.refuse_push(gate, (Outcome::LengthRequired, Refusal { code: 411, reason: "Length Required", extra: "", text }));
                return false;
            }
            Err((413, reason)) => {
                let text = format!("a recipients list is at most {max} bytes");
                self.refuse_push(gate, (Outcome::TooLarge, Refusal { code: 413, reason, extra: "", text }));
                return false;
            }
            Err((code, reason)) => {
                self.fail(code, reason, "");
                return false;
            }
        };
        if let Err(refusal) = gate.push.vet(&self.buf[..end], self.peer) {
            self.refuse_push(gate, refusal);
            return false;
        }
        let head_len = fwd.len();
        let have = (self.buf.len() - end).min(body_len);
        let mut req = fwd;
        req.extend_from_slice(&self.buf[end..end + have]);
        self.buf = req;
        self.push = Some((head_len, body_len));
        if expect && have < body_len {
            let _ = self.stream.write(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        self.phase = Phase::Ready;
        self.deadline = Instant::now() + READY_WAIT;
        true
    }

    /// Reads what is available. Never blocks: the socket is non-blocking.
    fn step(&mut self, chunk: &mut [u8], gate: &Gate) -> Step {
        loop {
            let n = match self.stream.read(chunk) {
                Ok(0) => return Step::Close,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Keep,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Step::Close,
            };
            let need = match &mut self.phase {
                Phase::Linger { discarded } => {
                    *discarded += n;
                    if *discarded > LINGER_BYTES {
                        return Step::Close;
                    }
                    continue;
                }
                Phase::Reading { need } => *need,
                Phase::Ready => return Step::Keep,
            };
            let cap = need.unwrap_or(MAX_HEAD + MAX_BODY);
            let take = n.min(cap.saturating_sub(self.buf.len()));
            let old = self.buf.len();
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(1024);
            }
            self.buf.extend_from_slice(&chunk[..take]);
            if need.is_none() {
                let from = old.saturating_sub(2);
                let limit = self.buf.len().min(MAX_HEAD);
                match head_end(&self.buf[..limit], from) {
                    None if self.buf.len() >= MAX_HEAD => {
                        self.fail(431, "Request Header Fields Too Large", "");
                        continue;
                    }
                    None => continue,
                    Some(end) if super::push::is_push(&self.buf[..end]) => {
                        if self.push_head(end, gate) {
                            return Step::Keep;
                        }
                        continue;
                    }
                    Some(_) if !self.page_ok => {
                        // In push_allow only: nothing else (not even the page).
                        self.fail(403, "Forbidden", "");
                        continue;
                    }
                    Some(end) => match rewrite_with(&self.buf[..end], self.peer, &gate.secret, &gate.hosts, MAX_BODY, false) {
                        Err((code, reason)) => {
                            self.fail(code, reason, "");
                            continue;
                        }
                        Ok((mut fwd, body_len, expect)) => {
                            let head_len = fwd.len();
                            let have = (self.buf.len() - end).min(body_len);
                            fwd.extend_from_slice(&self.buf[end..end + have]);
                            self.buf = fwd;
                            self.phase = Phase::Reading { need: Some(head_len + body_len) };
                            if expect && have < body_len {
                                let _ = self.stream.write(b"HTTP/1.1 100 Continue\r\n\r\n");
                            }
                        }
                    },
                }
            }
            if let Phase::Reading { need: Some(need) } = self.phase
                && self.buf.len() >= need
            {
                self.buf.truncate(need);
                self.phase = Phase::Ready;
                self.deadline = Instant::now() + READY_WAIT;
                return Step::Keep;
            }
        }
    }
}

/// Index just past the blank line ending a request head, searching from `from`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some(i + 2);
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

/// Headers the gate never forwards: hop-by-hop ones (the gate speaks one
/// request per connection) and `Expect` (the gate already has the body).
const DROP: [&str; 8] = ["connection", "keep-alive", "proxy-connection", "upgrade", "te", "trailer", "expect", "content-length"];

/// Validates a request head (its `Host` against `hosts`) and re-writes it
/// for tiny_http. Returns the new head, the body length and whether the
/// client expects `100 Continue`.
#[cfg(test)]
pub fn rewrite(head: &[u8], peer: IpAddr, secret: &str, hosts: &Hosts) -> Result<(Vec<u8>, usize, bool), (u16, &'static str)> {
    rewrite_with(head, peer, secret, hosts, MAX_BODY, false)
}

/// [`rewrite`] with a body of at most `max_body` bytes. For a `push`, the
/// head is made for a request without a body (the worker streams it to a
/// file and names that instead), and the token is not forwarded.
fn rewrite_with(head: &[u8], peer: IpAddr, secret: &str, hosts: &Hosts, max_body: usize, push: bool) -> Result<(Vec<u8>, usize, bool), (u16, &'static str)> {
    let text = std::str::from_utf8(head).map_err(|_| (400, "Bad Request"))?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) => (m, t, v),
        _ => return Err((400, "Bad Request")),
    };
    if !is_token(method) || !target.starts_with('/') || target.bytes().any(|c| c <= b' ' || c == 0x7f) {
        return Err((400, "Bad Request"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err((505, "HTTP Version Not Supported"));
    }
    let mut out = Vec::with_capacity(head.len() + 160);
    out.extend_from_slice(request_line.as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut length: Option<usize> = None;
    let mut expect = false;
    let mut host: heapless::Vec<&str, 2> = heapless::Vec::new();
    for line in lines {
        if line.is_empty() {
            continue; // only the final blank line(s)
        }
        if line.starts_with([' ', '\t']) {
            return Err((400, "Bad Request")); // obsolete line folding (RFC 9112 §5.2)
        }
        let (name, value) = line.split_once(':').ok_or((400, "Bad Request"))?;
        if !is_token(name) {
            return Err((400, "Bad Request"));
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = if !value.is_empty() && value.bytes().all(|c| c.is_ascii_digit()) {
                value.parse().unwrap_or(usize::MAX)
            } else {
                return Err((400, "Bad Request"));
            };
            if length.is_some_and(|l| l != n) {
                return Err((400, "Bad Request"));
            }
            if n > max_body {
                return Err((413, "Content Too Large"));
            }
            length = Some(n);
        }
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err((501, "Not Implemented"));
        }
        if name.eq_ignore_ascii_case("expect") && value.eq_ignore_ascii_case("100-continue") {
            expect = true;
        }
        if name.eq_ignore_ascii_case("host") && host.push(value).is_err() {
            return Err((400, "Bad Request")); // a third Host; two are refused below
        }
        if DROP.iter().any(|d| name.eq_ignore_ascii_case(d))
            || name.get(..11).is_some_and(|p| p.eq_ignore_ascii_case("x-bartleby-"))
            || (push && name.eq_ignore_ascii_case("authorization"))
        {
            continue;
        }
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // After the head is complete and before any body is read: a refused
    // request never reaches the handler, whatever its path or method.
    hosts.check(&host, version == "HTTP/1.0", peer)?;
    let length = length.unwrap_or(0);
    let peer = peer.to_canonical();
    let fixed = format!("Content-Length: {}\r\n", if push { 0 } else { length });
    let fixed = format!("{fixed}Connection: close\r\nX-Bartleby-Peer: {peer}\r\nX-Bartleby-Gate: {secret}\r\n\r\n");
    out.extend_from_slice(fixed.as_bytes());
    Ok((out, length, expect))
}

/// The accept-and-read loop. Runs forever on its own thread.
pub fn run(listener: TcpListener, gate: Arc<Gate>, jobs: SyncSender<Job>) {
    if let Err(e) = listener.set_nonblocking(true) {
        log::error!(target: STATUS, "status page: {e}");
        return;
    }
    let mut conns: Vec<Conn> = Vec::with_capacity(MAX_PENDING);
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(MAX_PENDING + 1);
    let mut chunk = [0u8; 2048];
    let mut last_warning: Option<Instant> = None;
    loop {
        let now = Instant::now();
        conns.retain_mut(|c| {
            if c.deadline > now {
                return true;
            }
            match c.phase {
                Phase::Reading { .. } => reply(&mut c.stream, 408, "Request Timeout", ""),
                Phase::Ready => reply(&mut c.stream, 503, "Service Unavailable", "Retry-After: 5\r\n"),
                Phase::Linger { .. } => {}
            }
            false
        });
        // Hand complete requests to the workers, oldest first, while they take them.
        let mut i = 0;
        while i < conns.len() {
            if !matches!(conns[i].phase, Phase::Ready) {
                i += 1;
                continue;
            }
            let Conn { stream, buf, peer, deadline, page_ok, push, .. } = conns.remove(i);
            match jobs.try_send(Job { stream, request: buf, push }) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                Err(TrySendError::Full(j)) => {
                    conns.insert(i, Conn { stream: j.stream, peer, deadline, buf: j.request, phase: Phase::Ready, page_ok, push });
                    break;
                }
            }
        }
        let mut ready = 0;
        for c in conns.iter_mut().filter(|c| matches!(c.phase, Phase::Ready)) {
            ready += 1;
            if ready > MAX_READY {
                c.fail(503, "Service Unavailable", "Retry-After: 2\r\n");
            }
        }
        let waiting = ready > 0;
        // A worker is connecting to tiny_http: leave new connections in the backlog.
        let paused = gate.fd_lock.try_lock().is_err();
        fds.clear();
        let events = if paused { 0 } else { libc::POLLIN };
        fds.push(libc::pollfd { fd: listener.as_raw_fd(), events, revents: 0 });
        for c in &conns {
            // A ready request is not read from; poll still reports errors and hang-ups.
            let events = if matches!(c.phase, Phase::Ready) { 0 } else { libc::POLLIN };
            fds.push(libc::pollfd { fd: c.stream.as_raw_fd(), events, revents: 0 });
        }
        let mut timeout = conns
            .iter()
            .map(|c| c.deadline.saturating_duration_since(now).as_millis() as i32 + 1)
            .min()
            .unwrap_or(-1);
        if waiting || paused {
            // Workers do not signal when they free up; look again soon.
            timeout = if timeout < 0 { 20 } else { timeout.min(20) };
        }
        // SAFETY: `fds` is a valid, initialised array of `fds.len()` pollfd structs.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if rc < 0 {
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                std::thread::sleep(Duration::from_millis(50));
            }
            continue;
        }
        // Pending connections first, from the back so removals keep indices valid.
        for i in (0..conns.len()).rev() {
            let re = fds[i + 1].revents;
            if re == 0 {
                continue;
            }
            let close = if matches!(conns[i].phase, Phase::Ready) {
                re & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
            } else {
                matches!(conns[i].step(&mut chunk, &gate), Step::Close)
            };
            if close {
                drop(conns.remove(i));
            }
        }
        if fds[0].revents == 0 {
            continue;
        }
        let Ok(_accepting) = gate.fd_lock.try_lock() else {
            continue;
        };
        for _ in 0..64 {
            match listener.accept() {
                Ok((mut stream, addr)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if conns.len() >= MAX_PENDING && !evict_oldest(&mut conns) {
                        reply(&mut stream, 503, "Service Unavailable", "Retry-After: 5\r\n");
                        continue;
                    }
                    let peer = addr.ip();
                    let page_ok = config::allowed(&gate.allow, peer);
                    let mut c = Conn {
                        stream,
                        peer,
                        deadline: Instant::now() + REQUEST_DEADLINE,
                        buf: Vec::new(),
                        phase: Phase::Reading { need: None },
                        page_ok,
                        push: None,
                    };
                    if !page_ok && !gate.push.may_push(peer) {
                        log::debug!(target: STATUS, "status page: refused {peer} (not in [status] allow)");
                        c.fail(403, "Forbidden", "");
                    } else if let Step::Close = c.step(&mut chunk, &gate) {
                        // Read at once: a request already waiting becomes
                        // Ready, and Ready connections are never evicted.
                        continue;
                    }
                    conns.push(c);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => {}
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM: free a descriptor, back off, go on.
                    if let Ok(mut p) = gate.fd_pressure.lock() {
                        *p = Some(Instant::now());
                    }
                    if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        log::warn!(target: STATUS, "warning: status page: accept: {e}");
                        last_warning = Some(Instant::now());
                    }
                    evict_oldest(&mut conns);
                    std::thread::sleep(Duration::from_millis(50));
                    break;
                }
            }
        }
    }
}

/// Closes the oldest connection that is still sending (or being drained):
/// under a flood of idle connections that is the flood, not the browser
/// that connected a moment ago. Complete requests are never evicted.
fn evict_oldest(conns: &mut Vec<Conn>) -> bool {
    match conns.iter().position(|c| !matches!(c.phase, Phase::Ready)) {
        Some(i) => {
            drop(conns.remove(i));
            true
        }
        None => false,
    }
}

/// A worker: forwards vetted requests to tiny_http, copies responses back.
pub fn worker(jobs: Arc<Mutex<Receiver<Job>>>, gate: Arc<Gate>) {
    let mut buf = [0u8; 2048];
    loop {
        let job = match jobs.lock() {
            Ok(rx) => match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
            Err(_) => return,
        };
        forward(job, &gate, &mut buf);
    }
}

fn forward(job: Job, gate: &Gate, buf: &mut [u8]) {
    let Job { mut stream, request, push } = job;
    if stream.set_nonblocking(false).is_err() {
        return;
    }
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let Some((head_len, body_len)) = push else {
        return relay(stream, request, gate, buf);
    };
    // A push: the body goes to a file first; the handler gets its name.
    let name = match gate.push.receive(&mut stream, &request[head_len..], body_len, buf) {
        Ok(name) => name,
        Err((o, r)) => {
            gate.push.count(o);
            reply_text(&mut stream, r.code, r.reason, r.extra, &r.text);
            return drain(&mut stream, buf);
        }
    };
    let line = request.iter().position(|&c| c == b'\n').map_or(0, |i| i + 1);
    let mut head = Vec::with_capacity(head_len + 64);
    head.extend_from_slice(&request[..line]);
    head.extend_from_slice(format!("X-Bartleby-Push: {name}\r\n").as_bytes());
    head.extend_from_slice(&request[line..head_len]);
    drop(request);
    relay(stream, head, gate, buf);
    // Renamed into place when taken; otherwise it goes now.
    super::push::remove(&gate.push.dir.join(name));
}

/// Sends a vetted request to tiny_http and copies the response back.
fn relay(mut stream: TcpStream, request: Vec<u8>, gate: &Gate, buf: &mut [u8]) {
    // No new descriptors for the gate until tiny_http has accepted (and
    // cloned) this connection: see fd_headroom.
    let mut guard = Some(gate.fd_lock.lock().unwrap_or_else(|e| e.into_inner()));
    if gate.under_fd_pressure() || !fd_headroom(stream.as_raw_fd(), FD_HEADROOM) {
        return reply(&mut stream, 503, "Service Unavailable", "Retry-After: 5\r\n");
    }
    let addr = gate.backend.lock().ok().and_then(|a| a.clone());
    let mut backend = match addr.and_then(|a| UnixStream::connect_addr(&a).ok()) {
        Some(b) => b,
        None => return reply(&mut stream, 503, "Service Unavailable", "Retry-After: 2\r\n"),
    };
    let _ = backend.set_read_timeout(Some(ACCEPT_GRACE));
    let _ = backend.set_write_timeout(Some(IO_TIMEOUT));
    if backend.write_all(&request).is_err() {
        return reply(&mut stream, 502, "Bad Gateway", "");
    }
    drop(request);
    let start = Instant::now();
    let mut first = true;
    loop {
        let n = match backend.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if guard.is_some() && matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                // tiny_http has had time to accept; let the gate go on.
                guard = None;
                let _ = backend.set_read_timeout(Some(BACKEND_TIMEOUT));
                continue;
            }
            Err(_) => {
                if first {
                    reply(&mut stream, 504, "Gateway Timeout", "");
                }
                return;
            }
        };
        if guard.take().is_some() {
            let _ = backend.set_read_timeout(Some(BACKEND_TIMEOUT));
        }
        let data = &buf[..n];
        let ok = if first {
            first = false;
            // tiny_http refuses to set `Connection` itself; the gate closes
            // after every response, so it says so after the status line.
            match data.iter().position(|&c| c == b'\n') {
                Some(i) => {
                    stream.write_all(&data[..=i]).is_ok()
                        && stream.write_all(b"Connection: close\r\n").is_ok()
                        && stream.write_all(&data[i + 1..]).is_ok()
                }
                None => stream.write_all(data).is_ok(),
            }
        } else {
            stream.write_all(data).is_ok()
        };
        if !ok || start.elapsed() > RESPONSE_DEADLINE {
            return;
        }
    }
    drain(&mut stream, buf);
}

/// Half-closes and drains briefly so the response is not cut by an RST.
fn drain(stream: &mut TcpStream, buf: &mut [u8]) {
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    for _ in 0..8 {
        match stream.read(buf) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_head_end() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody", 0), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n", 0), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n", 0), None);
    }

    fn hosts() -> Hosts {
        Hosts::new("Backup.example.org", &["status.lan".into(), "192.168.1.20".into(), "2001:db8::7".into()], "127.0.0.1:8080".parse().unwrap())
    }

    #[test]
    fn rewrites_and_strips() {
        let ip: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let (out, len, expect) = rewrite(
            b"POST /flush HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nX-Bartleby-Peer: 10.0.0.1\r\nx-bartleby-gate: guess\r\nContent-Length: 3\r\n\r\n",
            ip,
            "s3cret",
            &Hosts::new("a", &[], "0.0.0.0:80".parse().unwrap()),
        )
        .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(len, 3);
        assert!(!expect);
        assert_eq!(
            out,
            "POST /flush HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: close\r\nX-Bartleby-Peer: 192.0.2.7\r\nX-Bartleby-Gate: s3cret\r\n\r\n"
        );
    }

    #[test]
    fn refuses_bad_heads() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let bad = |h: &[u8]| rewrite(h, ip, "s", &hosts()).unwrap_err().0;
        assert_eq!(bad(b"GET http://x/ HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(bad(b"GET / HTTP/2.0\r\n\r\n"), 505);
        assert_eq!(bad(b"GET /  HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(bad(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), 501);
        assert_eq!(bad(b"POST / HTTP/1.1\r\nContent-Length: 99999\r\n\r\n"), 413);
        assert_eq!(bad(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"), 400);
        assert_eq!(bad(b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n"), 400);
        assert_eq!(bad(b"GET / HTTP/1.1\r\nno colon\r\n\r\n"), 400);
        // Host: missing in HTTP/1.1, doubled, foreign (DNS rebinding).
        assert_eq!(bad(b"GET / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(bad(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nhost: 127.0.0.1\r\n\r\n"), 400);
        assert_eq!(bad(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nHost: c\r\n\r\n"), 400);
        assert_eq!(bad(b"GET /metrics HTTP/1.1\r\nHost: evil.test\r\n\r\n"), 421);
        assert_eq!(bad(b"POST /flush HTTP/1.0\r\nHost: evil.test:8080\r\nContent-Length: 5\r\n\r\n"), 421);
        let ok = |h: &[u8]| rewrite(h, ip, "s", &hosts()).is_ok();
        assert!(ok(b"GET / HTTP/1.0\r\n\r\n"), "HTTP/1.0 without Host");
        assert!(ok(b"GET / HTTP/1.1\r\nhOST:  status.lan:80 \r\n\r\n"));
    }

    #[test]
    fn parses_host_values() {
        use HostName::{Ip, Name};
        let ip = |s: &str| Some(Ip(s.parse().unwrap()));
        assert_eq!(parse_host("Example.ORG."), Some(Name("example.org".into())));
        assert_eq!(parse_host("example.org:8080"), Some(Name("example.org".into())));
        assert_eq!(parse_host("example.org:"), Some(Name("example.org".into())));
        assert_eq!(parse_host("127.0.0.1.:80"), ip("127.0.0.1"));
        assert_eq!(parse_host("[::1]:80"), ip("::1"));
        assert_eq!(parse_host("[::1]:"), ip("::1"));
        assert_eq!(parse_host("[2001:DB8::1]"), ip("2001:db8::1"));
        for bad in ["", ".", ":80", "::1", "[::1", "[::1]80", "[v1.x]", "[fe80::1%25lo]", "a b", "a@b", "a/b", "a%2eb",
                    "a..b", "a:80:80", "a:65536", "a:-1", "a:8o", "[127.0.0.1]", "é.test"] {
            assert!(parse_host(bad).is_none(), "{bad:?}: {:?}", parse_host(bad));
        }
    }

    #[test]
    fn host_names_and_addresses() {
        let h = hosts();
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let ok = |v: &str| h.check(&[v], false, peer).is_ok();
        for v in ["backup.example.org", "BACKUP.EXAMPLE.ORG.:80", "status.lan", "localhost:8080", "127.0.0.1:8080",
                  "127.0.0.2", "[::1]", "[::ffff:127.0.0.1]", "192.168.1.20", "[::ffff:192.168.1.20]:80", "[2001:db8::7]"] {
            assert!(ok(v), "{v} refused");
        }
        for v in ["evil.test", "backup.example.org.evil.test", "evil.test.", "status.lan.evil.test", "localhost.evil.test",
                  "192.168.1.21", "0.0.0.0", "[::]", "[2001:db8::8]", "example.org"] {
            assert_eq!(h.check(&[v], false, peer), Err((421, "Misdirected Request")), "{v}");
        }
        assert_eq!(h.check(&[], false, peer), Err((400, "Bad Request")));
        assert_eq!(h.check(&[], true, peer), Ok(()));
        assert_eq!(h.check(&["x y"], true, peer), Err((400, "Bad Request")));
    }

    #[test]
    fn wildcard_listen_takes_this_machines_addresses() {
        // Every host has 127.0.0.1 (on lo): getifaddrs must list it, read
        // through the AF_INET branch.
        assert!(is_local_address("127.0.0.1".parse().unwrap()));
        assert!(!is_local_address("203.0.113.254".parse().unwrap()));
        assert!(!is_local_address("2001:db8::fe".parse().unwrap()));
        // This machine's addresses as the kernel lists them apart from
        // getifaddrs: IPv6 from /proc/net/if_inet6 (::1 wherever IPv6 is on),
        // IPv4 from the source address of a UDP "connection" (none without
        // a route).
        let mut mine: Vec<IpAddr> = std::fs::read_to_string("/proc/net/if_inet6")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| u128::from_str_radix(l.split_whitespace().next()?, 16).ok())
            .map(|v| IpAddr::V6(Ipv6Addr::from(v)))
            .collect();
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        mine.extend(s.connect("192.0.2.1:9").ok().and_then(|_| s.local_addr().ok()).map(|a| a.ip()));
        for ip in &mine {
            assert!(is_local_address(*ip), "{ip} not found by getifaddrs");
        }
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let any = Hosts::new("b.example.org", &[], "0.0.0.0:80".parse().unwrap());
        let only = Hosts::new("b.example.org", &[], "203.0.113.253:80".parse().unwrap());
        // Loopback literals are always this machine; a listen address is
        // its own; any other address only for a wildcard listener, and only
        // when it is local.
        assert_eq!(any.check(&["127.0.0.1:80"], false, peer), Ok(()));
        assert_eq!(only.check(&["127.0.0.1"], false, peer), Ok(()));
        assert_eq!(only.check(&["203.0.113.253"], false, peer), Ok(()));
        assert_eq!(any.check(&["203.0.113.254"], false, peer), Err((421, "Misdirected Request")));
        assert_eq!(only.check(&["203.0.113.254"], false, peer), Err((421, "Misdirected Request")));
        assert_eq!(any.check(&["[2001:db8::fe]"], false, peer), Err((421, "Misdirected Request")));
        for ip in mine.iter().filter(|ip| !ip.is_loopback()) {
            let lit = match ip {
                IpAddr::V4(v4) => format!("{v4}:80"),
                IpAddr::V6(v6) => format!("[{v6}]:80"),
            };
            assert_eq!(any.check(&[&lit], false, peer), Ok(()), "{lit}");
            assert_eq!(only.check(&[&lit], false, peer), Err((421, "Misdirected Request")), "{lit}");
        }
    }
}
