//! The server: listeners, the connection cap, the control socket's
//! listener, signals and graceful shutdown; it wires session → spool →
//! scheduler together. What the control socket says is in `control.rs`.
//!
//! May touch: the spool directory's lock and control socket, the listening
//! sockets, and every task it starts (sessions, scheduler, verifier).
//!
//! Everything runs on one current_thread tokio runtime (one core, 16 MB):
//! sessions are tasks, not threads. A semaphore caps concurrent sessions;
//! a client past the cap gets "421" at once instead of a queue it cannot see.

use std::net::SocketAddr;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Semaphore, watch};

use crate::config::{Cidr, Config};
use crate::logging::MASTER;
use crate::clients::Limits;
use crate::policy::Recipients;
use crate::scheduler::Scheduler;
use crate::reply::Reply;
use crate::session::{self, Shared};
use crate::spool::{Committer, Spool};
use crate::stats::Stats;

/// How long running sessions may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Holds the spool lock for the life of the server.
pub struct SpoolLock {
    _file: std::fs::File,
}

/// Takes an exclusive lock on the spool, so two servers never share one.
pub fn lock_spool(spool: &Spool) -> Result<SpoolLock, String> {
    let path = spool.root().join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!("another bartleby is already serving the spool {}", spool.root().display()));
    }
    Ok(SpoolLock { _file: f })
}

/// The hosts allowed to send ETRN: configured, or loopback and the
/// primary's addresses (see [`crate::route::learn_primary_addrs`], which
/// learns them in the background: a DNS server that does not answer never
/// delays the start).
fn etrn_allow(cfg: &Config) -> Vec<Cidr> {
    if !cfg.etrn_allow.is_empty() {
        return cfg.etrn_allow.clone();
    }
    vec![Cidr::parse("127.0.0.1/32").unwrap(), Cidr::parse("::1/128").unwrap()]
}

/// As PID 1 the relay listens before the machine has all its addresses (it
/// never waits on the network): with `[network] address = "dhcp"` the IPv4
/// address comes with the lease or the fallback, an IPv6 one with the
/// router's advertisement (the appliance configures none itself). A listen
/// address of the machine's own (not 0.0.0.0 / [::]) is then bound with
/// IP_FREEBIND and takes connections once the address is there. Elsewhere an
/// address the machine lacks stays an error at start (a typo is said, not
/// listened on in vain).
pub fn freebind(cfg: &Config, addr: &SocketAddr) -> bool {
    std::process::id() == 1 && address_may_come_later(&cfg.network.address, addr)
}

fn address_may_come_later(network_address: &str, addr: &SocketAddr) -> bool {
    addr.is_ipv6() || network_address.trim().eq_ignore_ascii_case("dhcp")
}

/// A listening TCP socket on `addr` (SO_REUSEADDR, as tokio's and std's
/// bind on Unix), with IP_FREEBIND when `freebind` (see [`freebind`]).
/// Blocking, as std's; the backlog is tokio's (1024).
pub fn tcp_listen(addr: SocketAddr, freebind: bool) -> std::io::Result<std::net::TcpListener> {
    use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
    let s = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    s.set_reuseaddr(true)?;
    if freebind {
        let (level, opt) = if addr.is_ipv4() { (libc::IPPROTO_IP, libc::IP_FREEBIND) } else { (libc::IPPROTO_IPV6, libc::IPV6_FREEBIND) };
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, with an int of its size.
        let r = unsafe {
            libc::setsockopt(s.as_raw_fd(), level, opt, &one as *const libc::c_int as *const libc::c_void, std::mem::size_of::<libc::c_int>() as libc::socklen_t)
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    s.bind(addr)?;
    // SAFETY: into_raw_fd hands over the socket's only owner.
    let fd = unsafe { OwnedFd::from_raw_fd(s.into_raw_fd()) };
    // plain listen(2): tokio's TcpSocket::listen needs a runtime, the status page has none
    // SAFETY: listen on a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 1024) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(false)?;
    Ok(l)
}

/// Runs the relay until SIGTERM/SIGINT. Returns an error for problems at
/// start (bad listen address, unusable spool).
pub async fn serve(cfg: Arc<Config>, stats: Arc<Stats>) -> Result<(), String> {
    let (spool, _lock) = open_spool(&cfg)?;
    // Never fails: a list that cannot be used means 451 (try again later),
    // or the last good list kept in the spool, not a server that is down.
    let recipients = Recipients::start(cfg.recipients.as_deref(), &spool.root().join(crate::policy::LAST_GOOD), &stats);
    let listeners = listen(&cfg)?;
    let sock_path = crate::control::socket_path(spool.root());
    let _ = std::fs::remove_file(&sock_path);
    let control = UnixListener::bind(&sock_path).map_err(|e| format!("control socket {}: {e}", sock_path.display()))?;

    let committer = Committer::start(&spool).map_err(|e| format!("spool {}: {e}", spool.root().display()))?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        spool: spool.clone(),
        committer: committer.clone(),
        stats: stats.clone(),
        recipients,
        queued: tx,
        etrn_allow: etrn_allow(&cfg),
        verifier: cfg.verify_recipients.then(|| crate::verify::Verifier::start(cfg.clone(), stats.clone(), &spool)),
        #[cfg(feature = "tls")]
        tls: crate::tls::Server::start(&cfg, stats.clone()),
    });
    #[cfg(feature = "tls")]
    if let Err(e) = crate::tls::Client::get(&cfg) {
        log::error!(target: MASTER, "error: TLS to the primary: {e}; deliveries that need TLS are deferred");
    }
    // The list is reread on its own thread, never on the SMTP runtime.
    shared.recipients.watch(stats.clone()).map_err(|e| format!("recipients list watcher: {e}"))?;
    if cfg.etrn_allow.is_empty() {
        tokio::spawn(crate::route::learn_primary_addrs(cfg.clone()));
    }
    let scheduler = Scheduler::new(cfg.clone(), spool.clone(), stats.clone(), committer, rx);
    let sched_task = tokio::spawn(scheduler.run(shutdown_rx.clone()));
    let verify_task = shared.verifier.clone().map(|v| tokio::spawn(v.run(shutdown_rx.clone())));

    let sem = Arc::new(Semaphore::new(cfg.max_connections));
    for l in listeners {
        tokio::spawn(accept_loop(l, shared.clone(), sem.clone(), shutdown_rx.clone()));
    }
    tokio::spawn(control_loop(control, stats.clone(), shutdown_rx.clone()));
    // The status page lives on its own threads and only reads the spool and
    // the shared counters (and swaps in a pushed recipients list, as the
    // watcher does): it can never stall SMTP.
    crate::status::start_with(cfg.clone(), stats.clone(), Some(shared.recipients.clone())).map_err(|e| format!("status page: {e}"))?;
    log::info!(
        target: MASTER,
        "daemon started -- version {}, listening on {}, primary {}{}",
        env!("CARGO_PKG_VERSION"),
        cfg.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" "),
        cfg.primary_display(),
        crate::init::since_boot()
    );

    until_stop_signal(&shared).await?;
    log::info!(target: MASTER, "terminating on signal");
    let _ = shutdown_tx.send(true);
    // Wait for sessions to finish (everything acknowledged is already durable;
    // this only spares clients a broken connection).
    let all = u32::try_from(cfg.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, sem.acquire_many(all)).await;
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, sched_task).await;
    if let Some(t) = verify_task {
        // Saves the cache (a thread of its own; at most a few seconds).
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, t).await;
    }
    let _ = std::fs::remove_file(&sock_path);
    log::info!(target: MASTER, "stopped");
    Ok(())
}

/// The spool, locked for this server, with what a crash left behind
/// recovered (and said in the log).
fn open_spool(cfg: &Config) -> Result<(Spool, SpoolLock), String> {
    let spool = Spool::create(&cfg.spool).map_err(|e| format!("spool {}: {e}", cfg.spool.display()))?;
    let lock = lock_spool(&spool)?;
    let rec = spool.recover().map_err(|e| format!("spool {}: recovery failed: {e}", cfg.spool.display()))?;
    log::info!(
        target: MASTER,
        "spool {}: {} queued, {} partial removed, {} damaged moved to corrupt/",
        cfg.spool.display(),
        rec.queued,
        rec.removed_incoming,
        rec.corrupt.len()
    );
    Ok((spool, lock))
}

/// A listening socket on each address of `listen`.
fn listen(cfg: &Config) -> Result<Vec<TcpListener>, String> {
    let mut listeners = Vec::new();
    for addr in &cfg.listen {
        let l = tcp_listen(*addr, freebind(cfg, addr))
            .and_then(|l| {
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)
            })
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        listeners.push(l);
    }
    Ok(listeners)
}

/// Serves signals until one says stop: SIGTERM, SIGINT, SIGPWR stop;
/// SIGUSR1 asks for a queue run; SIGHUP rereads the recipients list.
async fn until_stop_signal(shared: &Shared) -> Result<(), String> {
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut usr1 = signal(SignalKind::user_defined1()).map_err(|e| e.to_string())?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    // SIGPWR: a UPS daemon (or the kernel) says power is failing.
    let mut pwr = signal(SignalKind::from_raw(libc::SIGPWR)).map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = pwr.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = usr1.recv() => shared.stats.request_flush(),
            _ = hup.recv() => {
                if shared.recipients.force_reload() {
                    log::info!(target: MASTER, "SIGHUP: rereading the recipients list, even if it drops most entries");
                } else {
                    log::info!(target: MASTER, "SIGHUP: no recipients list is configured; nothing to reload");
                }
            }
        }
    }
}

async fn accept_loop(l: TcpListener, shared: Arc<Shared>, sem: Arc<Semaphore>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = l.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (stream, peer): (_, SocketAddr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: keep accepting once the pressure is gone.
                log::warn!(target: MASTER, "warning: accept: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // The per-client cap first (as Postfix's anvil check, before the
        // greeting): one address must never hold every slot, and the last
        // slots are kept for clients without a session (see clients.rs).
        let limits = Limits::of(&shared.cfg);
        let client = match shared.stats.clients.connect(peer.ip(), &limits, crate::util::now(), sem.available_permits()) {
            Ok(key) => ClientSlot { shared: shared.clone(), key, limits },
            Err(r) => {
                turn_away(stream, client_refused(&shared, peer, r, &limits));
                continue;
            }
        };
        match sem.clone().try_acquire_owned() {
            Ok(permit) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    shared.stats.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    session::run(stream, peer, shared.clone()).await;
                    shared.stats.connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    drop(client);
                    drop(permit);
                });
            }
            Err(_) => {
                drop(client);
                turn_away(stream, server_full(&shared, peer));
            }
        }
    }
}

/// A client over its per-client connection limit: counted, logged at most
/// once a minute per client (a flood would fill the console), and its 421.
fn client_refused(shared: &Shared, peer: SocketAddr, r: crate::clients::Refused, limits: &Limits) -> Reply {
    let ip = peer.ip().to_canonical();
    crate::stats::Stats::inc(&shared.stats.client_refusals_connections);
    if let crate::clients::Warn::Log { earlier } = r.warn {
        crate::clients::log_unlogged(crate::clients::ClientKey::of(ip), earlier);
        let why = if r.reserve {
            format!(" (the last {} of max_connections are kept for clients without a session)", limits.reserve)
        } else {
            String::new()
        };
        log::warn!(target: MASTER, "warning: Connection concurrency limit exceeded: {} from unknown[{ip}] for service smtp{why}", r.n);
    }
    Reply::new(421, "4.7.0", format!("{} Error: too many connections from {ip}", shared.cfg.hostname))
}

/// Every session slot taken (max_connections): logged at most once a
/// minute (a flood from many addresses would otherwise write one line per
/// connection), and the 421.
fn server_full(shared: &Shared, peer: SocketAddr) -> Reply {
    static WARN: crate::util::LogLimiter = crate::util::LogLimiter::new();
    if let Some(n) = WARN.allow(crate::util::now()) {
        log::warn!(
            target: MASTER,
            "warning: too many connections (max_connections {}): refusing unknown[{}]{}",
            shared.cfg.max_connections,
            peer.ip().to_canonical(),
            crate::util::LogLimiter::unlogged(n)
        );
    }
    Reply::new(421, "4.7.0", format!("{} Error: too many connections; try again later", shared.cfg.hostname))
}

/// Says `reply` to a client that gets no session, in a task of its own
/// (at most 5 s: a client that does not read cannot hold it), then closes.
fn turn_away(mut stream: tokio::net::TcpStream, reply: Reply) {
    let mut msg = Vec::with_capacity(96);
    reply.write(&mut msg);
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&msg)).await;
    });
}

/// A session's place in the per-client table, given back when dropped (also
/// when the task is dropped at shutdown).
struct ClientSlot {
    shared: Arc<Shared>,
    key: Option<crate::clients::ClientKey>,
    limits: Limits,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Some(k) = self.key {
            self.shared.stats.clients.disconnect(k, &self.limits);
        }
    }
}

/// The control socket's listener: each connection is answered by
/// [`crate::control::handle`] in a task of its own.
async fn control_loop(l: UnixListener, stats: Arc<Stats>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let conn = tokio::select! {
            c = l.accept() => c,
            _ = shutdown.changed() => return,
        };
        let Ok((stream, _)) = conn else { continue };
        let stats = stats.clone();
        tokio::spawn(async move { crate::control::handle(stream, &stats).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 192.0.2.1 (TEST-NET-1, RFC 5737) is on no interface of the test
    /// machine: like the address a DHCP lease brings a few seconds after the
    /// relay started listening.
    #[test]
    fn listen_on_an_address_not_yet_configured() {
        let a: SocketAddr = "192.0.2.1:0".parse().unwrap();
        let e = tcp_listen(a, false).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrNotAvailable, "{e}");
        let l = tcp_listen(a, true).unwrap();
        assert_eq!(l.local_addr().unwrap().ip(), a.ip());
        // an address that is there works either way, and accepts
        for fb in [false, true] {
            let l = tcp_listen("127.0.0.1:0".parse().unwrap(), fb).unwrap();
            let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, _) = l.accept().unwrap();
            assert_eq!(s.peer_addr().unwrap(), c.local_addr().unwrap());
        }
        // which addresses PID 1 binds so (the pid is checked apart)
        assert!(address_may_come_later("dhcp", &a));
        assert!(address_may_come_later(" DHCP ", &a));
        assert!(!address_may_come_later("192.168.1.20/24", &a));
        assert!(address_may_come_later("192.168.1.20/24", &"[2001:db8::5]:25".parse().unwrap()));
        let six: SocketAddr = "[2001:db8::1]:0".parse().unwrap();
        if let Ok(l) = tcp_listen(six, true) {
            assert_eq!(l.local_addr().unwrap().ip(), six.ip());
        }
    }
}
