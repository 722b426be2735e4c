//! Logging: Postfix-style lines to stderr, optionally a file, and a small
//! ring of recent lines for the status page.
//!
//! Lines look like Postfix's, with the program/role as the log target and
//! the queue ID first in the message, so `grep 3F2B81C0A12` finds a message's
//! whole life:
//!
//! ```text
//! 2026-11-22T04:15:58.123Z bartleby/smtpd: 6940A9A90F3A2: client=mx.sender.test[192.0.2.1]
//! ```
//!
//! Roles log with `log::info!(target: SMTPD, ...)` etc.; severities other
//! than info say so in the text ("warning: ...") as Postfix does.
//!
//! Every line passes through [`printable`] before it is written anywhere,
//! as every Postfix log line passes through its printable(): text from the
//! envelope (a HELO name, a quoted local part, a primary's reply) cannot put
//! terminal escapes, bells or line breaks into the log.

use std::borrow::Cow;
use std::io::{self, Write};
use std::sync::Mutex;

use log::{Log, Metadata, Record};
use simplelog::{CombinedLogger, ConfigBuilder, LevelFilter, SharedLogger, WriteLogger};

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

type Line = heapless::String<RING_LINE_LEN>;

/// Fixed-size memory for the last lines: no allocation after start, so a
/// log flood cannot grow the process.
static RING: Mutex<heapless::Deque<Line, RING_LINES>> = Mutex::new(heapless::Deque::new());

/// The last log lines, oldest first.
pub fn recent_lines() -> Vec<String> {
    RING.lock().map(|r| r.iter().map(|l| l.as_str().to_string()).collect()).unwrap_or_default()
}

/// A `Write` that cuts the formatted log output into lines for the ring.
struct RingWriter {
    partial: Line,
}

impl Write for RingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for chunk in buf.split_inclusive(|&b| b == b'\n') {
            let (text, ends) = match chunk.strip_suffix(b"\n") {
                Some(t) => (t, true),
                None => (chunk, false),
            };
            for ch in String::from_utf8_lossy(text).chars() {
                let _ = self.partial.push(if ch.is_control() { ' ' } else { ch });
            }
            if ends {
                if let Ok(mut r) = RING.lock() {
                    if r.is_full() {
                        r.pop_front();
                    }
                    let _ = r.push_back(std::mem::take(&mut self.partial));
                }
                self.partial.clear();
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
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

/// The installed logger: masks each line ([`printable`]), then hands it to
/// simplelog's writers (stderr, the ring, the log file).
struct Escaping {
    inner: Box<CombinedLogger>,
}

impl Log for Escaping {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        self.inner.enabled(m)
    }

    fn log(&self, r: &Record<'_>) {
        if !self.inner.enabled(r.metadata()) {
            return;
        }
        let text: Cow<'_, str> = match r.args().as_str() {
            Some(s) => Cow::Borrowed(s),
            None => Cow::Owned(r.args().to_string()),
        };
        let clean = printable(&text);
        self.inner.log(
            &Record::builder()
                .metadata(r.metadata().clone())
                .args(format_args!("{clean}"))
                .module_path(r.module_path())
                .file(r.file())
                .line(r.line())
                .build(),
        );
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Installs the logger. Call once, before the runtime starts.
pub fn init(level: LevelFilter, file: Option<&std::path::Path>) -> Result<(), String> {
    let cfg = ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_time_level(LevelFilter::Error)
        .set_max_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .set_target_level(LevelFilter::Error)
        .set_location_level(LevelFilter::Off)
        .build();
    // simplelog writes each line in ~20 pieces; LineWriter turns them into
    // one write(2) per line (measured: the drain rate tripled).
    let mut loggers: Vec<Box<dyn SharedLogger>> = vec![
        WriteLogger::new(level, cfg.clone(), io::LineWriter::new(io::stderr())),
        WriteLogger::new(level.min(LevelFilter::Info), cfg.clone(), RingWriter { partial: Line::new() }),
    ];
    if let Some(path) = file {
        let f = open_log_file(path).map_err(|e| format!("log file {}: {e}", path.display()))?;
        loggers.push(WriteLogger::new(level, cfg, io::LineWriter::new(f)));
    }
    log::set_boxed_logger(Box::new(Escaping { inner: CombinedLogger::new(loggers) })).map_err(|e| e.to_string())?;
    log::set_max_level(level);
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

    #[test]
    fn ring_keeps_last_lines() {
        let mut w = RingWriter { partial: Line::new() };
        for i in 0..(RING_LINES + 10) {
            writeln!(w, "line {i}").unwrap();
        }
        let lines = recent_lines();
        assert_eq!(lines.len(), RING_LINES);
        assert_eq!(lines.last().unwrap(), &format!("line {}", RING_LINES + 9));
        let long = "x".repeat(1000);
        writeln!(w, "{long}").unwrap();
        assert_eq!(recent_lines().last().unwrap().len(), RING_LINE_LEN);
    }
}
