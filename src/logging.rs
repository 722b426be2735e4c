//! Logging: Postfix-style lines to stderr, optionally a file and a syslog
//! server on the LAN (UDP), and a small ring of recent lines for the status
//! page.
//!
//! Lines are written as syslogd writes Postfix's (and as Postfix's own
//! `maillog_file` does), so that pflogsumm and other tools read them:
//!
//! ```text
//! Dec  2 17:19:43 backup bartleby/smtpd[1]: 6940A9A90F3A2: client=mx.sender.test[192.0.2.1]
//! ```
//!
//! a BSD timestamp in local time (UTC on the appliance), the first label of
//! `hostname` (as syslogd writes the host), the program/role and the pid,
//! then the text, queue ID first, so `grep 6940A9A90F3A2` finds a message's
//! whole life. `log_format = "iso"` writes an RFC 3339 timestamp in UTC
//! instead (`2026-12-02T17:19:43.120Z backup bartleby/smtpd[1]: ...`, as
//! rsyslog's high-precision file format; pflogsumm reads it too).
//!
//! Roles log with `log::info!(target: SMTPD, ...)` etc.; severities other
//! than info say so in the text ("warning: ...") as Postfix does.
//!
//! With `log_host`, every line also goes as one RFC 3164 datagram
//! (`<22>Dec  2 17:19:43 backup bartleby/smtpd[1]: ...`, facility mail) to
//! a syslog server over UDP, from a non-blocking socket: a datagram that
//! cannot be sent at once is dropped and counted (never retried, never
//! waited for), so a dead or slow log host never holds up the relay.
//!
//! Every line passes through [`printable`] before it is written anywhere,
//! as every Postfix log line passes through its printable(): text from the
//! envelope (a HELO name, a quoted local part, a primary's reply) cannot put
//! terminal escapes, bells or line breaks into the log.
//!
//! Role: the `log` crate's logger. The line is formatted here (dates by
//! [`crate::util`]); simplelog's writers, each behind a buffer, put it on
//! stderr and in the log file. May touch: stderr, the log file, the UDP
//! socket to `log_host`, the ring.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{Level, LevelFilter, Log, Metadata, Record};
use simplelog::{CombinedLogger, ConfigBuilder, SharedLogger, WriteLogger};

pub const SMTPD: &str = "bartleby/smtpd";
pub const QMGR: &str = "bartleby/qmgr";
pub const SMTP: &str = "bartleby/smtp";
pub const BOUNCE: &str = "bartleby/bounce";
pub const MASTER: &str = "bartleby/master";
pub const STATUS: &str = "bartleby/status";
pub const INIT: &str = "bartleby/init";

/// How many recent lines the status page shows.
pub const RING_LINES: usize = 64;
/// Longest line kept in the ring (longer ones are cut).
pub const RING_LINE_LEN: usize = 240;
/// Longest datagram sent to `log_host` (RFC 5426 asks receivers to take
/// 2048 bytes; longer lines are cut on a character boundary).
pub const MAX_DATAGRAM: usize = 2048;
/// Bytes of lines held for each destination (stderr, the log file) on the
/// relay's own thread before they are written out together.
const LOG_BUF: usize = 4096;
/// Longest a line waits in that buffer while the relay's thread is busy
/// (it is written at once when the thread goes idle; see [`flush`]).
const LOG_DELAY: Duration = Duration::from_millis(5);

thread_local! {
    /// Lines logged on this thread may wait in the buffer: set on the
    /// runtime's thread only ([`buffer_on_this_thread`]).
    static BUFFERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Lets lines logged on the calling thread wait in the buffer (several
/// lines then go out in one write(2)). For the runtime's thread, whose
/// runtime calls [`flush`] each time before it waits for events
/// (`on_thread_park`), so that a line is never held while the relay idles.
pub fn buffer_on_this_thread() {
    BUFFERED.with(|b| b.set(true));
}

/// Writes out the lines held in the buffer.
pub fn flush() {
    log::logger().flush();
}

/// The syslog facility: mail (2), as Postfix's default syslog_facility.
const FACILITY_MAIL: u8 = 2;

/// The timestamp of each line (`log_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `Dec  2 17:19:43`, local time: what syslogd writes (the default).
    Syslog,
    /// `2026-12-02T17:19:43.120Z`, UTC.
    Iso,
}

/// What [`init`] sets up.
pub struct Options<'a> {
    pub level: LevelFilter,
    pub file: Option<&'a std::path::Path>,
    pub format: Format,
    /// The configured `hostname`; its first label goes into each line.
    pub hostname: &'a str,
    /// A syslog server to send every line to (UDP, RFC 3164).
    pub log_host: Option<SocketAddr>,
}

type Line = heapless::String<RING_LINE_LEN>;

/// Fixed-size memory for the last lines: no allocation after start, so a
/// log flood cannot grow the process.
static RING: Mutex<heapless::Deque<Line, RING_LINES>> = Mutex::new(heapless::Deque::new());

/// Datagrams to `log_host` that could not be sent (socket buffer full,
/// network down, port unreachable) and were dropped.
static DROPPED: AtomicUsize = AtomicUsize::new(0);

/// The last log lines, oldest first.
pub fn recent_lines() -> Vec<String> {
    RING.lock().map(|r| r.iter().map(|l| l.as_str().to_string()).collect()).unwrap_or_default()
}

/// Datagrams to `log_host` dropped since start (`bartleby_log_host_dropped_total`).
pub fn log_host_dropped() -> usize {
    DROPPED.load(Ordering::Relaxed)
}

/// Keeps a line (already printable, without its line end) in the ring, cut
/// to [`RING_LINE_LEN`] bytes on a character boundary.
fn ring_push(text: &str) {
    let mut line = Line::new();
    for ch in text.chars() {
        if line.push(if ch.is_control() { ' ' } else { ch }).is_err() {
            break;
        }
    }
    if let Ok(mut r) = RING.lock() {
        if r.is_full() {
            r.pop_front();
        }
        let _ = r.push_back(line);
    }
}

/// Masks what must not reach a log as it is, with '?', as Postfix's
/// printable(text, '?') does for every log line: ASCII control characters
/// (NUL..US, DEL: ESC, BEL, CR, LF, TAB...) and invalid UTF-8 (which shows up
/// here as U+FFFD after a lossy conversion). Valid UTF-8 stays, as in Postfix
/// with smtputf8_enable = yes. Beyond Postfix, the C1 controls
/// (U+0080..U+009F, which some terminals obey: U+009B is CSI), the Unicode
/// line separators and the bidirectional overrides (which make a line read
/// differently from what it holds) are masked too.
pub fn printable(s: &str) -> Cow<'_, str> {
    let masked = |c: char| {
        c.is_control() || matches!(c, '\u{FFFD}' | '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
    };
    // Fast path: printable ASCII, by far the common case.
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) || !s.chars().any(masked) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(s.chars().map(|c| if masked(c) { '?' } else { c }).collect())
}

const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/// `Dec  2 17:19:43` in local time, as syslogd writes it (the month's day
/// padded with a space). Without a usable local time (no zone information,
/// as on the appliance), UTC.
fn bsd_stamp(out: &mut String, secs: u64) {
    let (mon, day, h, m, s) = local_time(secs).unwrap_or_else(|| {
        let (_, mon, day) = crate::util::civil_from_days((secs / 86400) as i64);
        let t = secs % 86400;
        (mon - 1, day, (t / 3600) as u32, (t / 60 % 60) as u32, (t % 60) as u32)
    });
    let _ = write!(out, "{} {day:>2} {h:02}:{m:02}:{s:02}", MONTHS[mon as usize % 12]);
}

/// (month 0-11, day, hour, minute, second) in the local time zone.
fn local_time(secs: u64) -> Option<(u32, u32, u32, u32, u32)> {
    let t = libc::time_t::try_from(secs).ok()?;
    // SAFETY: localtime_r writes into the tm we pass and reads only t.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return None;
        }
        tm
    };
    let n = |v: libc::c_int| u32::try_from(v).ok();
    Some((n(tm.tm_mon)?, n(tm.tm_mday)?, n(tm.tm_hour)?, n(tm.tm_min)?, n(tm.tm_sec)?))
}

/// `2026-12-02T17:19:43.120Z`.
fn iso_stamp(out: &mut String, secs: u64, millis: u32) {
    let (y, mon, d) = crate::util::civil_from_days((secs / 86400) as i64);
    let t = secs % 86400;
    let _ = write!(out, "{y:04}-{mon:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z", t / 3600, t / 60 % 60, t % 60);
}

/// The syslog severity of a level (RFC 5424 numbers).
fn severity(l: Level) -> u8 {
    match l {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// The installed logger: masks each line ([`printable`]), formats it once
/// and hands it to simplelog's writers (stderr, the log file), the ring and
/// the log host. simplelog has no option for syslog's `HOST TAG[PID]:`
/// prefix, so the line is formatted here and simplelog is configured to
/// write the message alone.
struct Logger {
    level: LevelFilter,
    format: Format,
    /// The host field: the first label of `hostname`.
    host: String,
    pid: u32,
    writers: Box<CombinedLogger>,
    udp: Option<(UdpSocket, SocketAddr)>,
    /// When the oldest line not yet written out was logged.
    held_since: Mutex<Option<Instant>>,
}

impl Logger {
    /// Appends the line without its line end, `STAMP HOST TAG[PID]: TEXT`,
    /// with the stamp of `format`.
    fn write_line(&self, out: &mut String, format: Format, r: &Record<'_>, text: &str, now: std::time::Duration) {
        let tag = if r.target().starts_with("bartleby") { r.target() } else { "bartleby" };
        match format {
            Format::Syslog => bsd_stamp(out, now.as_secs()),
            Format::Iso => iso_stamp(out, now.as_secs(), now.subsec_millis()),
        }
        let _ = write!(out, " {} {tag}[{}]: {text}", self.host, self.pid);
    }

    /// One RFC 3164 datagram, `<PRI>` and the syslog-style line (the log's
    /// own `line` when that is its format), sent without waiting: dropped
    /// and counted if the socket cannot take it now.
    fn send(&self, r: &Record<'_>, line: &str, text: &str, now: std::time::Duration) {
        let Some((sock, to)) = &self.udp else { return };
        let mut d = String::with_capacity(64 + text.len());
        let _ = write!(d, "<{}>", FACILITY_MAIL * 8 + severity(r.level()));
        match self.format {
            Format::Syslog => d.push_str(line),
            Format::Iso => self.write_line(&mut d, Format::Syslog, r, text, now),
        }
        let mut end = d.len().min(MAX_DATAGRAM);
        while !d.is_char_boundary(end) {
            end -= 1;
        }
        if sock.send_to(&d.as_bytes()[..end], to).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let text: Cow<'_, str> = match r.args().as_str() {
            Some(s) => Cow::Borrowed(s),
            None => Cow::Owned(r.args().to_string()),
        };
        let clean = printable(&text);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let mut line = String::with_capacity(64 + clean.len());
        self.write_line(&mut line, self.format, r, &clean, now);
        if r.level() <= Level::Info {
            ring_push(&line);
        }
        self.send(r, &line, &clean, now);
        self.writers.log(&Record::builder().metadata(r.metadata().clone()).args(format_args!("{line}")).build());
        // Written out now: a warning or an error (never delayed behind
        // whatever comes next), a line from any other thread (the status
        // page's, a blocking task's: no runtime flushes for them), or once
        // the oldest held line is LOG_DELAY old. Else it waits for the
        // runtime to go idle ([`flush`]) or the buffer to fill.
        let Ok(mut held) = self.held_since.lock() else {
            self.writers.flush();
            return;
        };
        let now = Instant::now();
        let hold = r.level() > Level::Warn && BUFFERED.with(|b| b.get()) && held.is_none_or(|t| now.duration_since(t) < LOG_DELAY);
        if hold {
            held.get_or_insert(now);
        } else {
            *held = None;
            self.writers.flush();
        }
    }

    fn flush(&self) {
        // Nothing held: nothing to write (called each time the runtime idles).
        if let Ok(mut held) = self.held_since.lock()
            && held.take().is_none()
        {
            return;
        }
        self.writers.flush();
    }
}

/// A delay in seconds as Postfix logs it (its format_tv with two
/// significant digits and at most two decimals): `0`, `0.02`, `0.27`,
/// `1.2`, `37`, `412`.
pub fn delay(secs: f64) -> String {
    let secs = if secs.is_finite() { secs.max(0.0) } else { 0.0 };
    let text = if secs >= 10.0 {
        return format!("{}", secs.round() as u64);
    } else if secs >= 1.0 {
        crate::util::decimal((secs * 10.0).round() / 10.0, 1)
    } else {
        crate::util::decimal((secs * 100.0).round() / 100.0, 2)
    };
    let t = text.trim_end_matches('0').trim_end_matches('.');
    if t.is_empty() { "0".to_string() } else { t.to_string() }
}

/// The host field of each line: the first label of `hostname`, as syslogd
/// writes a host's name; `bartleby` without one.
pub fn host_field(hostname: &str) -> &str {
    match hostname.split('.').next() {
        Some(h) if !h.is_empty() => h,
        _ => "bartleby",
    }
}

/// Opens the socket for `log_host`: unbound (any port), non-blocking, of
/// the address family of the log host. Nothing is sent yet.
fn log_socket(to: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = if to.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let s = UdpSocket::bind(any)?;
    s.set_nonblocking(true)?;
    if to.is_ipv4() {
        // A broadcast log_host (192.168.1.255): refused with EACCES without it.
        s.set_broadcast(true)?;
    }
    Ok(s)
}

/// Installs the logger. Call once, before the runtime starts.
pub fn init(o: &Options<'_>) -> Result<(), String> {
    // simplelog writes only the message: the line is formatted by Logger.
    let cfg = ConfigBuilder::new()
        .set_time_level(LevelFilter::Off)
        .set_max_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .set_target_level(LevelFilter::Off)
        .set_location_level(LevelFilter::Off)
        .build();
    // simplelog writes a line in pieces; the buffer makes whole lines go
    // out (one write(2) per line was measured to triple the drain rate over
    // unbuffered writes), so lines from the page's threads and the relay
    // never interleave, and several lines of the relay's thread go out in
    // one write(2) (see Logger::log for when).
    let mut writers: Vec<Box<dyn SharedLogger>> = vec![WriteLogger::new(o.level, cfg.clone(), io::BufWriter::with_capacity(LOG_BUF, io::stderr()))];
    if let Some(path) = o.file {
        let f = open_log_file(path).map_err(|e| format!("log file {}: {e}", path.display()))?;
        writers.push(WriteLogger::new(o.level, cfg, io::BufWriter::with_capacity(LOG_BUF, f)));
    }
    // A socket that cannot be opened (IPv6 turned off, no descriptors)
    // stops nothing: the log goes to the other places, with a warning.
    let mut udp_error = None;
    let udp = match o.log_host.map(|to| (log_socket(to), to)) {
        Some((Ok(s), to)) => Some((s, to)),
        Some((Err(e), to)) => {
            udp_error = Some(format!("warning: log_host {to}: cannot open a UDP socket: {e}; the log is not sent there"));
            None
        }
        None => None,
    };
    // The local time zone, read once before the first line (localtime_r
    // alone need not read it).
    unsafe extern "C" {
        fn tzset();
    }
    // SAFETY: tzset takes no argument; it reads TZ and the zone file.
    unsafe { tzset() };
    let logger = Logger { level: o.level, format: o.format, host: host_field(o.hostname).to_string(), pid: std::process::id(), writers: CombinedLogger::new(writers), udp, held_since: Mutex::new(None) };
    log::set_boxed_logger(Box::new(logger)).map_err(|e| e.to_string())?;
    log::set_max_level(o.level);
    if let Some(w) = udp_error {
        log::warn!(target: MASTER, "{w}");
    }
    Ok(())
}

/// Opens the log file for appending. Never blocks (a FIFO at the path would
/// hold `serve` before it listens) and takes only a regular file or a
/// character device (`/dev/console`, `/dev/ttyS0`): a FIFO, a socket or a
/// directory is refused with what it is.
fn open_log_file(path: &std::path::Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let check = |t: std::fs::FileType| {
        if t.is_file() || t.is_char_device() {
            return Ok(());
        }
        let what = crate::util::file_kind(t);
        Err(io::Error::other(format!("{what}; the log file must be a regular file or a terminal")))
    };
    // Looked at before opening (opening a FIFO without a reader fails with a
    // misleading ENXIO) and again after (the path may have changed meanwhile).
    if let Ok(m) = std::fs::metadata(path) {
        check(m.file_type())?;
    }
    let f = std::fs::OpenOptions::new().create(true).append(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    check(f.metadata()?.file_type())?;
    // Appends to a regular file never block; a terminal may, briefly, as stderr does.
    // SAFETY: fcntl on a descriptor we own, clearing O_NONBLOCK.
    unsafe {
        use std::os::unix::io::AsRawFd;
        let fd = f.as_raw_fd();
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_masks_like_postfix() {
        assert!(matches!(printable("to=<bob@example.org>, relay=none"), Cow::Borrowed(_)));
        assert_eq!(printable("\u{1b}[31mred\u{7}"), "?[31mred?");
        assert_eq!(printable("a\rb\nc\td\u{0}e\u{7f}f"), "a?b?c?d?e?f");
        // Valid UTF-8 is kept; C1 controls, U+FFFD (bad bytes), line
        // separators and bidi overrides are not.
        assert!(matches!(printable("café ✓"), Cow::Borrowed(_)));
        assert_eq!(printable("caf\u{e9}\u{9b}2J"), "caf\u{e9}?2J");
        assert_eq!(printable(&String::from_utf8_lossy(b"bad\xff\xfe!")), "bad??!");
        assert_eq!(printable("x\u{2028}y\u{202e}z\u{2066}"), "x?y?z?");
    }

    #[test]
    fn delays_as_postfix_writes_them() {
        for (v, t) in [(0.0, "0"), (0.001, "0"), (0.02, "0.02"), (0.273, "0.27"), (0.999, "1"), (1.24, "1.2"), (9.96, "10"), (37.4, "37"), (412.0, "412"), (-1.0, "0"), (f64::NAN, "0")] {
            assert_eq!(delay(v), t, "{v}");
        }
    }

    #[test]
    fn stamps_and_host() {
        let mut s = String::new();
        iso_stamp(&mut s, 1_796_000_000, 7);
        assert_eq!(s, "2026-11-30T00:53:20.007Z");
        // Syslog's stamp: "Mmm dd hh:mm:ss" with the day padded by a space.
        let mut b = String::new();
        bsd_stamp(&mut b, 1_796_000_000);
        assert_eq!(b.len(), 15, "{b}");
        assert!(MONTHS.contains(&&b[..3]) && b.as_bytes()[3] == b' ' && b.as_bytes()[6] == b' ', "{b}");
        assert_eq!(host_field("backup.example.org"), "backup");
        assert_eq!(host_field("backup"), "backup");
        assert_eq!(host_field(""), "bartleby");
    }

    #[test]
    fn log_file_fifo_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("bartleby-logfifo-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let fifo = dir.join("log");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_log_file(&fifo).unwrap_err().to_string();
        assert!(e.contains("a FIFO"), "{e}");
        assert!(open_log_file(&dir).is_err());
        let file = dir.join("ok.log");
        assert!(open_log_file(&file).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `log_host = "192.168.1.255"` (the LAN's broadcast address, a common
    /// way to reach a syslog server whose address is not known): Linux
    /// refuses every datagram to a broadcast address with EACCES unless
    /// SO_BROADCAST is set, so every line was dropped (only the dropped
    /// counter said so). Checked in a network namespace with a veth on
    /// 10.9.9.1/24: sendto 10.9.9.255 gives EACCES without the option, is
    /// sent with it.
    #[test]
    fn log_socket_may_send_to_a_broadcast_address() {
        let s = log_socket("10.9.9.255:514".parse().unwrap()).unwrap();
        assert!(s.broadcast().unwrap());
        assert!(log_socket("[::1]:514".parse().unwrap()).is_ok());
    }

    #[test]
    fn ring_keeps_last_lines() {
        for i in 0..(RING_LINES + 10) {
            ring_push(&format!("line {i}"));
        }
        let lines = recent_lines();
        assert_eq!(lines.len(), RING_LINES);
        assert_eq!(lines.last().unwrap(), &format!("line {}", RING_LINES + 9));
        let long = "x".repeat(1000);
        ring_push(&long);
        assert_eq!(recent_lines().last().unwrap().len(), RING_LINE_LEN);
    }
}
