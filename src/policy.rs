//! Relay policy: which envelope addresses the backup MX accepts.
//!
//! The rule is narrow on purpose: a recipient is `local@domain` with the
//! domain in `relay_domains` (exact, any case), a local part free of the
//! characters relays have historically been tricked with (`@ % !`, quotes,
//! source routes), and, when a recipients list is configured, an address on
//! it. Everything else is refused at RCPT time, so the backup never accepts
//! mail it would have to bounce later (backscatter).
//!
//! smtp-proto unquotes local parts and strips source routes, so the checks
//! here look at the path *as the client wrote it* on the command line.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::config::Config;

/// An SMTP refusal: code, enhanced status, text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub status: &'static str,
    pub text: String,
}

impl Refusal {
    fn new(code: u16, status: &'static str, text: impl Into<String>) -> Refusal {
        Refusal { code, status, text: text.into() }
    }

    /// The reply line without CRLF.
    pub fn line(&self) -> String {
        format!("{} {} {}", self.code, self.status, self.text)
    }
}

/// Extracts the path between `<` and `>` after `FROM:` / `TO:` in a raw
/// command line, exactly as written (quotes and routes kept).
pub fn raw_path(line: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(line).ok()?;
    let colon = s.find(':')?;
    let rest = s[colon + 1..].trim_start();
    let rest = rest.strip_prefix('<')?;
    // The path ends at the first `>` outside a quoted string.
    let mut in_quote = false;
    let mut escaped = false;
    for (i, c) in rest.char_indices() {
        match c {
            '\\' if in_quote && !escaped => {
                escaped = true;
                continue;
            }
            '"' if !escaped => in_quote = !in_quote,
            '>' if !in_quote => return Some(&rest[..i]),
            _ => {}
        }
        escaped = false;
    }
    None
}

/// Reads a `SIZE=` parameter from the raw MAIL line as a 64-bit number, so
/// that a value beyond 32 bits is not mistaken for a small one (smtp-proto
/// wraps it on a 32-bit target). `Err` when SIZE is not a number.
#[allow(clippy::result_unit_err)]
pub fn size_param(line: &[u8]) -> Result<Option<u64>, ()> {
    let s = std::str::from_utf8(line).map_err(|_| ())?;
    let Some(after) = mail_params(s) else {
        return Ok(None);
    };
    for word in after.split_ascii_whitespace() {
        // Compare bytes: slicing the str at 5 would panic inside a
        // multi-byte character ("AUTH=<>SIZEé").
        if word.len() > 5 && word.as_bytes()[..5].eq_ignore_ascii_case(b"SIZE=") {
            let v = &word.as_bytes()[5..];
            if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
                return Err(());
            }
            // All ASCII digits, so this cannot fail. Saturate: any number
            // this large is over every limit.
            let v = std::str::from_utf8(v).map_err(|_| ())?;
            return Ok(Some(v.parse::<u64>().unwrap_or(u64::MAX)));
        }
    }
    Ok(None)
}

/// The parameters of a MAIL line: what follows the reverse path. The path
/// ends at the first `>` outside a quoted string, not the last one on the
/// line (`AUTH=<>` after it must not hide a `SIZE=` before it).
fn mail_params(s: &str) -> Option<&str> {
    let rest = s[s.find(':')? + 1..].trim_start();
    let Some(path) = rest.strip_prefix('<') else {
        // A path without brackets ends at the first space.
        return Some(rest.find(' ').map_or("", |i| &rest[i..]));
    };
    let (mut quoted, mut escaped) = (false, false);
    for (i, b) in path.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            // '>' is ASCII, so i + 1 is a character boundary.
            b'>' if !quoted => return Some(&path[i + 1..]),
            _ => {}
        }
    }
    None
}

fn printable(s: &str) -> bool {
    s.bytes().all(|b| (0x21..0x7f).contains(&b))
}

/// Checks a reverse path (MAIL FROM). Returns the sender to store: the path
/// as written minus any source route; empty for `<>`.
pub fn check_sender(raw: &str) -> Result<String, Refusal> {
    if raw.is_empty() {
        return Ok(String::new());
    }
    // RFC 5321 4.1.2: a source route may be given and must be ignored.
    let path = match raw.strip_prefix('@') {
        Some(_) => match raw.find(':') {
            Some(i) => &raw[i + 1..],
            None => return Err(Refusal::new(501, "5.1.7", "Bad sender address syntax")),
        },
        None => raw,
    };
    if path.len() > 256 || !path.is_ascii() {
        return Err(Refusal::new(553, "5.1.7", "Bad sender address syntax"));
    }
    let at = match path.rfind('@') {
        Some(i) if i > 0 && i + 1 < path.len() => i,
        _ => return Err(Refusal::new(553, "5.1.7", "Sender address must be user@domain")),
    };
    let (local, domain) = (&path[..at], &path[at + 1..]);
    let quoted = local.starts_with('"') && local.ends_with('"') && local.len() >= 2;
    if !quoted && !printable(local) {
        return Err(Refusal::new(553, "5.1.7", "Bad sender address syntax"));
    }
    if local.contains(['\r', '\n', '\0']) || !valid_domain_part(domain) {
        return Err(Refusal::new(553, "5.1.7", "Bad sender address syntax"));
    }
    Ok(path.to_string())
}

fn valid_domain_part(d: &str) -> bool {
    if d.starts_with('[') && d.ends_with(']') {
        return d.len() > 2 && printable(d);
    }
    !d.is_empty()
        && d.len() <= 255
        && d.split('.').all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'))
}

/// Checks a forward path (RCPT TO) against the relay rules. `parsed` is the
/// address smtp-proto returned; `raw` is the path as written. Returns the
/// recipient to store, lower-cased domain.
pub fn check_recipient(cfg: &Config, raw: &str, parsed: &str, list: &RecipientList) -> Result<String, Refusal> {
    let denied = || Refusal::new(550, "5.7.1", format!("<{raw}>: Relay access denied"));
    if raw.is_empty() {
        return Err(Refusal::new(501, "5.1.3", "Bad recipient address syntax"));
    }
    if raw.starts_with('@') || raw.contains('"') || raw.contains('\\') {
        // Source routes and quoted local parts: classic relay tricks.
        return Err(denied());
    }
    if !raw.is_ascii() {
        return Err(Refusal::new(553, "5.6.7", "Non-ASCII addresses need SMTPUTF8, which is not offered"));
    }
    if !printable(raw) || raw.len() > 256 {
        return Err(Refusal::new(501, "5.1.3", "Bad recipient address syntax"));
    }
    // <postmaster> without a domain (RFC 5321 4.5.1): the primary's postmaster.
    let addr: String = if raw.eq_ignore_ascii_case("postmaster") {
        format!("postmaster@{}", cfg.relay_domains[0])
    } else {
        raw.to_string()
    };
    if !raw.eq_ignore_ascii_case("postmaster") && !parsed.eq_ignore_ascii_case(raw) {
        // The parser saw something other than what was written: refuse.
        return Err(denied());
    }
    let at = match addr.find('@') {
        Some(i) => i,
        None => return Err(denied()),
    };
    let (local, domain) = (&addr[..at], &addr[at + 1..]);
    if local.is_empty() || local.len() > 64 {
        return Err(Refusal::new(501, "5.1.3", "Bad recipient address syntax"));
    }
    if domain.contains(['@', '%', '!']) || local.contains(['%', '!']) {
        return Err(denied());
    }
    let domain = domain.trim_end_matches('.');
    if !cfg.is_relay_domain(domain) {
        return Err(denied());
    }
    let addr = format!("{local}@{}", domain.to_ascii_lowercase());
    if !list.accepts(&addr) {
        return Err(Refusal::new(
            550,
            "5.1.1",
            format!("<{addr}>: Recipient address rejected: User unknown in relay recipient table"),
        ));
    }
    Ok(addr)
}

/// The optional list of valid recipients, one per line (`user@domain`, or
/// `@domain` for any address of a domain; `#` comments). Reloaded when the
/// file changes, so the primary's copy can be synced in without a restart.
#[derive(Debug, Default)]
pub struct RecipientList {
    path: Option<PathBuf>,
    /// Lower-cased, sorted.
    entries: Vec<String>,
    mtime: Option<SystemTime>,
    checked: u64,
}

impl RecipientList {
    /// Loads the list; an unreadable list is an error at start (a typo here
    /// must not silently accept every address).
    pub fn load(path: Option<&Path>) -> Result<RecipientList, String> {
        let mut l = RecipientList { path: path.map(Path::to_path_buf), ..Default::default() };
        if path.is_some() {
            l.reload()?;
        }
        Ok(l)
    }

    fn reload(&mut self) -> Result<(), String> {
        let Some(path) = &self.path else { return Ok(()) };
        let meta = std::fs::metadata(path).map_err(|e| format!("recipients list {}: {e}", path.display()))?;
        let text = std::fs::read_to_string(path).map_err(|e| format!("recipients list {}: {e}", path.display()))?;
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            // Postfix map style "user@domain   OK" is accepted too.
            let addr = line.split_ascii_whitespace().next().unwrap_or("");
            if !addr.contains('@') || addr.contains(['"', '%', '!']) {
                return Err(format!("recipients list {}:{}: `{addr}` is not user@domain or @domain", path.display(), n + 1));
            }
            entries.push(addr.to_ascii_lowercase());
        }
        entries.sort();
        entries.dedup();
        self.entries = entries;
        self.mtime = meta.modified().ok();
        Ok(())
    }

    /// Rereads the file if it changed (checked at most every 10 seconds).
    /// A failed reload keeps the old list and logs why.
    pub fn refresh(&mut self, now: u64) {
        if self.path.is_none() || now < self.checked + 10 {
            return;
        }
        self.checked = now;
        let mtime = self.path.as_ref().and_then(|p| std::fs::metadata(p).ok()).and_then(|m| m.modified().ok());
        if mtime != self.mtime {
            match self.reload() {
                Ok(()) => log::info!(target: crate::logging::SMTPD, "recipients list reloaded: {} entries", self.entries.len()),
                Err(e) => log::warn!(target: crate::logging::SMTPD, "warning: {e}; keeping the previous list"),
            }
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.path.is_some()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True when the address (domain already lower-case) may receive mail.
    pub fn accepts(&self, addr: &str) -> bool {
        if self.path.is_none() {
            return true;
        }
        let lower = addr.to_ascii_lowercase();
        if self.entries.binary_search(&lower).is_ok() {
            return true;
        }
        match lower.rfind('@') {
            Some(i) => self.entries.binary_search_by(|e| e.as_str().cmp(&lower[i..])).is_ok(),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::parse(
            "hostname = \"backup.example.org\"\nrelay_domains = [\"example.org\"]\nprimary = \"127.0.0.1:2526\"\n",
            Path::new("t"),
        )
        .unwrap()
    }

    fn rcpt(raw: &str) -> Result<String, Refusal> {
        check_recipient(&cfg(), raw, raw, &RecipientList::default())
    }

    #[test]
    fn raw_paths() {
        assert_eq!(raw_path(b"RCPT TO:<bob@example.org>"), Some("bob@example.org"));
        assert_eq!(raw_path(b"MAIL FROM: <> SIZE=10"), Some(""));
        assert_eq!(raw_path(b"RCPT TO:<\"a>b\"@example.org>"), Some("\"a>b\"@example.org"));
        assert_eq!(raw_path(b"RCPT TO:bob@example.org"), None);
    }

    #[test]
    fn relay_tricks_refused() {
        assert_eq!(rcpt("bob@example.org").unwrap(), "bob@example.org");
        assert_eq!(rcpt("Bob@EXAMPLE.ORG").unwrap(), "Bob@example.org");
        for bad in [
            "bob@evil.test",
            "bob%evil.test@example.org",
            "evil.test!bob@example.org",
            "\"bob@evil.test\"@example.org",
            "@example.org:bob@evil.test",
            "bob@evil.test@example.org",
            "bob@example.org.evil.test",
            "bob@sub.example.org",
            "bob",
        ] {
            let e = rcpt(bad).unwrap_err();
            assert_eq!((e.code, e.status), (550, "5.7.1"), "{bad}: {e:?}");
        }
        assert_eq!(rcpt("").unwrap_err().code, 501);
        assert_eq!(rcpt("Postmaster").unwrap(), "postmaster@example.org");
        // What smtp-proto returns for a quoted local part differs from the raw path.
        let e = check_recipient(&cfg(), "x@example.org", "y@example.org", &RecipientList::default()).unwrap_err();
        assert_eq!(e.code, 550);
    }

    #[test]
    fn senders() {
        assert_eq!(check_sender("").unwrap(), "");
        assert_eq!(check_sender("alice@sender.test").unwrap(), "alice@sender.test");
        assert_eq!(check_sender("@relay.test:alice@sender.test").unwrap(), "alice@sender.test");
        assert_eq!(check_sender("\"alice smith\"@sender.test").unwrap(), "\"alice smith\"@sender.test");
        assert!(check_sender("alice").is_err());
        assert!(check_sender("alice@").is_err());
        assert!(check_sender("al ice@sender.test").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(size_param(b"MAIL FROM:<a@b.c> SIZE=1000"), Ok(Some(1000)));
        assert_eq!(size_param(b"MAIL FROM:<a@b.c> size=50000000000"), Ok(Some(50_000_000_000)));
        assert_eq!(size_param(b"MAIL FROM:<a@b.c> SIZE=99999999999999999999999"), Ok(Some(u64::MAX)));
        assert_eq!(size_param(b"MAIL FROM:<a@b.c> BODY=8BITMIME"), Ok(None));
        assert_eq!(size_param(b"MAIL FROM:<a@b.c> SIZE=12x"), Err(()));
        // A multi-byte character across byte 5 of a word once panicked.
        assert_eq!(size_param("MAIL FROM:<a@b.c> AUTH=<>SIZE\u{e9}".as_bytes()), Ok(None));
        assert_eq!(size_param("MAIL FROM:<a@b.c> SIZ\u{e9}=1".as_bytes()), Ok(None));
        assert_eq!(size_param("MAIL FROM:<a@b.c> SIZE=1\u{e9}".as_bytes()), Err(()));
        // The path ends at its own '>', not at the last one on the line.
        assert_eq!(size_param(b"MAIL FROM:<a@b.c> SIZE=999999999999 AUTH=<>"), Ok(Some(999_999_999_999)));
        assert_eq!(size_param(b"MAIL FROM:<\"x>y\"@b.c> SIZE=5"), Ok(Some(5)));
        assert_eq!(size_param(b"MAIL FROM:<> SIZE=7"), Ok(Some(7)));
        assert_eq!(size_param(b"MAIL FROM:a@b.c SIZE=8"), Ok(Some(8)));
    }

    #[test]
    fn recipient_list() {
        let p = std::env::temp_dir().join(format!("bartleby-rcpts-{}", std::process::id()));
        std::fs::write(&p, "# valid users\nbob@example.org\nCarol@Example.org OK\n@lists.example.org\n").unwrap();
        let l = RecipientList::load(Some(&p)).unwrap();
        assert!(l.accepts("bob@example.org"));
        assert!(l.accepts("carol@example.org"));
        assert!(l.accepts("anyone@lists.example.org"));
        assert!(!l.accepts("mallory@example.org"));
        let e = check_recipient(&cfg(), "mallory@example.org", "mallory@example.org", &l).unwrap_err();
        assert_eq!((e.code, e.status), (550, "5.1.1"));
        std::fs::write(&p, "bob@example.org\nnot-an-address\n").unwrap();
        assert!(RecipientList::load(Some(&p)).unwrap_err().contains(":2:"));
        std::fs::remove_file(&p).unwrap();
    }
}
