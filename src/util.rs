//! Small helpers shared by several roles: clock, dates (the one calendar:
//! no date crate, no time zone database), numbers with decimals without
//! float formatting, queue IDs, reading an admin's small files.
//!
//! Role: pure helpers. May touch: the clock, files it is asked to read.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01
/// (Howard Hinnant's civil_from_days; no time zone database on a floppy).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = (z - era * 146_097) as u64;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe as i64 + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];

/// RFC 5322 date, always UTC: `Sun, 22 Nov 2026 04:15:58 +0000`.
pub fn rfc5322_date(t: u64) -> String {
    let days = (t / 86400) as i64;
    let (y, m, d) = civil_from_days(days);
    let s = t % 86400;
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        s / 3600,
        (s / 60) % 60,
        s % 60
    )
}

/// The `mailq` date column: `Sun Nov 22 04:15:58`.
pub fn mailq_date(t: u64) -> String {
    let days = (t / 86400) as i64;
    let (_, m, d) = civil_from_days(days);
    let s = t % 86400;
    format!("{} {} {:2} {:02}:{:02}:{:02}", DAYS[(days % 7) as usize], MONTHS[(m - 1) as usize], d, s / 3600, (s / 60) % 60, s % 60)
}

/// ISO 8601 / RFC 3339 in UTC: `2026-11-22T04:15:58Z`.
pub fn iso_date(t: u64) -> String {
    let (y, m, d) = civil_from_days((t / 86400) as i64);
    let s = t % 86400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, (s / 60) % 60, s % 60)
}

/// `x` with `places` decimals (at most 9), exactly as `format!("{x:.places$}")`
/// writes a non-negative finite number (correctly rounded from its binary
/// value, ties to even), from integer arithmetic alone: float formatting
/// (core's flt2dec) is several KB of code the i486 binary need not carry.
/// Negative numbers and NaN give 0; the result saturates at
/// u64::MAX / 10^places (numbers beyond ~1.8e19 / 10^places).
pub fn decimal(x: f64, places: u32) -> String {
    if x.is_nan() || x <= 0.0 {
        return fraction(0, 0, places);
    }
    // x = m x 2^e exactly
    let bits = x.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i32;
    let frac = u128::from(bits & ((1u64 << 52) - 1));
    let (m, e) = if biased == 0 { (frac, -1074) } else { (frac | (1 << 52), biased - 1075) };
    match e {
        // 2^64 and above (and infinity): saturated below
        12.. => fraction(u128::from(u64::MAX), 0, places),
        0.. => fraction(m << e, 0, places),
        // far under one half of the last place (m x 10^9 < 2^83)
        ..-100 => fraction(0, 0, places),
        _ => fraction(m, e.unsigned_abs(), places),
    }
}

/// `num / 2^shift` with `places` decimals (at most 9), rounded to the
/// nearest, ties to even (as float formatting rounds). Shifts and 64-bit
/// divisions only (a 128-bit division is a large routine on the i486).
/// `num` below 2^90, `shift` at most 127; the rounded value, scaled by
/// 10^places, saturates at u64::MAX.
pub fn fraction(num: u128, shift: u32, places: u32) -> String {
    let places = places.min(9);
    let scale = 10u64.pow(places);
    let n = num * u128::from(scale);
    let shift = shift.min(127);
    let q = n >> shift;
    let q = if shift == 0 {
        q
    } else {
        let r = n - (q << shift);
        let half = 1u128 << (shift - 1);
        if r > half || (r == half && q & 1 == 1) { q + 1 } else { q }
    };
    let q = u64::try_from(q).unwrap_or(u64::MAX);
    let int = q / scale;
    if places == 0 {
        return int.to_string();
    }
    format!("{int}.{:0w$}", q % scale, w = places as usize)
}

/// A short human duration: `45s`, `12m`, `3h07m`, `2d04h`.
pub fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, (s / 60) % 60),
        s => format!("{}d{:02}h", s / 86400, (s / 3600) % 24),
    }
}

/// What a file system object is, for messages: "a FIFO", "a directory".
pub fn file_kind(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() || ft.is_block_device() {
        "a device"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "of unknown type"
    }
}

/// Reads a whole small file that an administrator or another program
/// provides (the configuration, the recipients list): only a regular file
/// (a symlink to one is followed), opened with O_NONBLOCK so that a FIFO or
/// a device at the path can never stall the caller, and at most `max`
/// bytes (checked before and while reading: the file may grow meanwhile).
/// Returns the bytes and the metadata of the file read. Errors say what is
/// wrong; the caller names the file.
pub fn read_small_file(path: &std::path::Path, max: u64) -> std::io::Result<(Vec<u8>, std::fs::Metadata)> {
    use std::io::{Error, ErrorKind, Read};
    let (f, meta) = open_regular(path)?;
    let too_large = |n: u64| Error::new(ErrorKind::InvalidData, format!("too large: {n} bytes, larger than {max} bytes"));
    if meta.len() > max {
        return Err(too_large(meta.len()));
    }
    let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    f.take(max.saturating_add(1)).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(too_large(buf.len() as u64));
    }
    Ok((buf, meta))
}

/// Opens a file for reading only if it is a regular file (a symlink to one
/// is followed), without blocking on a FIFO or a device at the path (see
/// [`read_small_file`]). Returns the file and its metadata.
pub fn open_regular(path: &std::path::Path) -> std::io::Result<(std::fs::File, std::fs::Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        let what = format!("not a regular file ({})", file_kind(meta.file_type()));
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, what));
    }
    Ok((f, meta))
}

/// At most one log line a minute for one kind of warning, and a count of
/// those not logged (for warnings a flood could repeat at every connection
/// or command: on the appliance the log is the serial console).
#[derive(Debug, Default)]
pub struct LogLimiter {
    /// When a line was last logged (unix seconds, 32 bits; 0: never).
    last: AtomicU32,
    unlogged: AtomicU32,
}

impl LogLimiter {
    pub const fn new() -> LogLimiter {
        LogLimiter { last: AtomicU32::new(0), unlogged: AtomicU32::new(0) }
    }

    /// `Some(n)`: log the warning now; `n` earlier ones were not logged.
    /// `None`: do not log it (it is counted).
    pub fn allow(&self, now: u64) -> Option<u32> {
        let now = (now as u32).max(1);
        let last = self.last.load(Ordering::Relaxed);
        if (last == 0 || now.wrapping_sub(last) >= 60)
            && self.last.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            return Some(self.unlogged.swap(0, Ordering::Relaxed));
        }
        self.unlogged.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// The end of a line for `n` unlogged warnings ("" for none).
    pub fn unlogged(n: u32) -> String {
        if n == 0 { String::new() } else { format!(" ({n} more since the last such line were not logged)") }
    }
}

/// A queue ID: uppercase hex, 13 characters, like Postfix's short IDs.
pub type QueueId = heapless::String<16>;

static ID_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A new queue ID. The time part orders IDs by arrival; the counter part
/// starts from the clock's microseconds so that a restart within the same
/// second does not reuse IDs. The spool still creates files exclusively.
pub fn new_queue_id() -> QueueId {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut c = ID_COUNTER.load(Ordering::Relaxed);
    if c == 0 {
        let _ = ID_COUNTER.compare_exchange(0, d.subsec_micros() | 1, Ordering::Relaxed, Ordering::Relaxed);
    }
    c = ID_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut id = QueueId::new();
    use std::fmt::Write;
    let _ = write!(id, "{:08X}{:05X}", d.as_secs() as u32, c & 0xF_FFFF);
    id
}

/// True for a string shaped like a queue ID (defends file names built from input).
pub fn valid_queue_id(s: &str) -> bool {
    (6..=16).contains(&s.len()) && s.bytes().all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(1_795_320_958), "Sun, 22 Nov 2026 04:15:58 +0000");
        assert_eq!(iso_date(1_795_320_958), "2026-11-22T04:15:58Z");
        assert_eq!(mailq_date(1_795_320_958), "Sun Nov 22 04:15:58");
        assert_eq!(human_duration(3 * 3600 + 7 * 60), "3h07m");
    }

    /// `decimal` must write what `format!("{:.N}")` writes, byte for byte:
    /// ties (0.125, 2.5), values just under a tie (0.15 is 0.1499...),
    /// carries (9.96 -> 10.0), tiny and huge numbers, f32 values.
    #[test]
    fn decimal_is_float_formatting_without_floats() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut xs = vec![0.0, 0.125, 0.375, 2.5, 0.5, 1.5, 0.25, 0.15, 0.05, 9.95, 9.96, 1.05, 0.045, 999.999, 1e-9, 5e-324, 1.0e15, 4503599627370495.5, 9007199254740993.0, 0.1 + 0.2];
        for _ in 0..20_000 {
            let r = next();
            xs.push((r >> 11) as f64 / (1u64 << (r % 53)) as f64);
            xs.push(f64::from(f32::from_bits((r as u32) & 0x7f7f_ffff)).min(1e15));
            xs.push((r % 100_000) as f64 / 100.0);
            xs.push((r % 100_000) as f64 / 86400.0);
        }
        for x in xs {
            for p in 0..=3u32 {
                assert_eq!(decimal(x, p), format!("{x:.*}", p as usize), "{x:e} with {p} places");
            }
        }
        assert_eq!(decimal(-1.0, 2), "0.00");
        assert_eq!(decimal(f64::NAN, 1), "0.0");
        assert_eq!(decimal(1.25f32.into(), 1), "1.2");
        assert_eq!(decimal(f64::INFINITY, 0), u64::MAX.to_string());
        assert_eq!(fraction(1280, 10, 1), "1.2");
        assert_eq!(fraction(1, 3, 3), "0.125");
        assert_eq!(fraction(3, 1, 0), "2");
        assert_eq!(fraction(5, 1, 0), "2");
        assert_eq!(fraction(5, 0, 1), "5.0");
    }

    #[test]
    fn ids_unique_and_valid() {
        let a = new_queue_id();
        let b = new_queue_id();
        assert_ne!(a, b);
        assert!(valid_queue_id(&a), "{a}");
        assert!(!valid_queue_id("../etc"));

    }
}
