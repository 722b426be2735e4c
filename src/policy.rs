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
//!
//! Role: the relay rules at MAIL and RCPT and the recipients list. Touches
//! the list file (read), `recipients.last` and `recipients.push` in the
//! spool directory (written atomically), and the list's figures in Stats.

use std::path::{Path, PathBuf};

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

/// The one quote-aware scanner of envelope paths: where the path that
/// `s` starts (just after its `<`) ends, the index of the first `>`
/// outside a quoted string (`"a>b"@x`, a `\` in quotes escaping the next
/// byte). `None` when none does. Bytes: `>`, `"` and `\` are ASCII and
/// never inside a UTF-8 sequence. Used by [`raw_path`], [`mail_params`] and
/// the DSN parameters ([`crate::dsn`]).
pub fn path_end(s: &[u8]) -> Option<usize> {
    let (mut quoted, mut escaped) = (false, false);
    for (i, &b) in s.iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// Extracts the path between `<` and `>` after `FROM:` / `TO:` in a raw
/// command line, exactly as written (quotes and routes kept).
pub fn raw_path(line: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(line).ok()?;
    let colon = s.find(':')?;
    let rest = s[colon + 1..].trim_start();
    let rest = rest.strip_prefix('<')?;
    // '>' is ASCII: the cut is on a character boundary.
    path_end(rest.as_bytes()).map(|i| &rest[..i])
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
    // '>' is ASCII, so i + 1 is a character boundary.
    path_end(path.as_bytes()).map(|i| &path[i + 1..])
}

fn printable(s: &str) -> bool {
    s.bytes().all(|b| (0x21..0x7f).contains(&b))
}

/// Printable ASCII or visible UTF-8 (RFC 6531 allows UTF-8 where atext is):
/// no control (C1 included), space or invisible formatting character.
fn printable_utf8(s: &str) -> bool {
    s.chars().all(|c| if c.is_ascii() { (0x21..0x7f).contains(&(c as u32)) } else { crate::punycode::visible(c) })
}

/// Longest address, in bytes: a path of 256 octets with its brackets (RFC
/// 5321 4.5.3.1.3). Counted in bytes, UTF-8 or not.
const MAX_ADDRESS: usize = 254;

/// The refusal of a non-ASCII address in a transaction without SMTPUTF8,
/// in Postfix's words (strict_smtputf8 = yes).
fn needs_smtputf8() -> Refusal {
    Refusal::new(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")
}

/// An address as a recipients-list key: local part lower-cased (all of
/// [`lower`](crate::punycode::lower)'s case pairs for a non-ASCII one), domain in ASCII form
/// (A-labels). `None` when the domain cannot be converted. `@domain`
/// (empty local part) gives `@` and the domain.
fn list_key(addr: &str) -> Option<String> {
    if addr.is_ascii() {
        return Some(addr.to_ascii_lowercase());
    }
    let (local, domain) = addr.rsplit_once('@')?;
    let local = if local.is_ascii() { local.to_ascii_lowercase() } else { crate::punycode::lowercase(local) };
    Some(format!("{local}@{}", crate::punycode::to_ascii(domain.trim_end_matches('.'))?))
}

/// Checks a reverse path (MAIL FROM). Returns the sender to store: the path
/// as written minus any source route; empty for `<>`.
pub fn check_sender(raw: &str, smtputf8: bool) -> Result<String, Refusal> {
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
    if !path.is_ascii() && !smtputf8 {
        return Err(needs_smtputf8());
    }
    if path.len() > MAX_ADDRESS {
        return Err(Refusal::new(553, "5.1.7", "Bad sender address syntax"));
    }
    let at = match path.rfind('@') {
        Some(i) if i > 0 && i + 1 < path.len() => i,
        _ => return Err(Refusal::new(553, "5.1.7", "Sender address must be user@domain")),
    };
    // '@' is ASCII: both sides are on character boundaries.
    let (local, domain) = (&path[..at], &path[at + 1..]);
    let quoted = local.starts_with('"') && local.ends_with('"') && local.len() >= 2;
    if !quoted && !printable_utf8(local) || quoted && local.chars().any(|c| !c.is_ascii() && !crate::punycode::visible(c)) {
        return Err(Refusal::new(553, "5.1.7", "Bad sender address syntax"));
    }
    if local.contains(['\r', '\n', '\0']) || !valid_domain_part(domain) {
        return Err(Refusal::new(553, "5.1.7", "Bad sender address syntax"));
    }
    Ok(path.to_string())
}

/// The domain of a sender: an address literal (`[...]`, printable), or a
/// domain name by the configuration's one check
/// ([`crate::config::valid_domain`]; U-labels in their A-label form).
fn valid_domain_part(d: &str) -> bool {
    if d.starts_with('[') && d.ends_with(']') {
        return d.len() > 2 && printable(d);
    }
    if !d.is_ascii() {
        return crate::punycode::to_ascii(d).is_some_and(|a| crate::config::valid_domain(&a));
    }
    crate::config::valid_domain(d)
}

/// Checks a forward path (RCPT TO) against the relay rules. `parsed` is the
/// address smtp-proto returned; `raw` is the path as written. Returns the
/// recipient to store, lower-cased domain.
pub fn check_recipient(cfg: &Config, raw: &str, parsed: &str, list: &RecipientList, smtputf8: bool) -> Result<String, Refusal> {
    let addr = check_address(cfg, raw, parsed, smtputf8)?;
    match list.listed(&addr).refusal(&addr) {
        Some(r) => Err(r),
        None => Ok(addr),
    }
}

/// What the recipients list says of an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listed {
    /// No list is configured.
    NoList,
    Yes,
    No,
    /// A list is configured but none can be used.
    Unusable,
}

impl Listed {
    /// What the list alone answers: nothing when it accepts (or there is
    /// none), else its refusal.
    pub fn refusal(self, addr: &str) -> Option<Refusal> {
        match self {
            Listed::NoList | Listed::Yes => None,
            Listed::No => Some(unknown_in_list(addr)),
            Listed::Unusable => Some(lookup_failed(addr)),
        }
    }
}

/// A list is configured but none can be used (see Recipients::start):
/// what Postfix answers when a relay_recipient_maps lookup fails
/// (smtpd_check.c, reject_dict_retry). The sender tries again later.
pub fn lookup_failed(addr: &str) -> Refusal {
    Refusal::new(451, "4.3.0", format!("<{addr}>: Temporary lookup failure"))
}

pub fn unknown_in_list(addr: &str) -> Refusal {
    Refusal::new(550, "5.1.1", format!("<{addr}>: Recipient address rejected: User unknown in relay recipient table"))
}

/// The primary said no to a verification probe (Postfix's words for
/// reject_unverified_recipient, with unverified_recipient_reject_code 550).
pub fn unverified_reject(addr: &str, said: &str) -> Refusal {
    Refusal::new(550, "5.1.1", format!("<{addr}>: Recipient address rejected: undeliverable address: {said}"))
}

/// No verdict can be had now: the sender tries again later (Postfix's
/// unverified_recipient_defer_code 450 with 4.1.1).
pub fn unverified_defer(addr: &str, why: &str) -> Refusal {
    Refusal::new(450, "4.1.1", format!("<{addr}>: Recipient address rejected: unverified address: {why}"))
}

/// The relay and syntax checks of [`check_recipient`], without the list.
pub fn check_address(cfg: &Config, raw: &str, parsed: &str, smtputf8: bool) -> Result<String, Refusal> {
    let denied = || Refusal::new(550, "5.7.1", format!("<{raw}>: Relay access denied"));
    if raw.is_empty() {
        return Err(Refusal::new(501, "5.1.3", "Bad recipient address syntax"));
    }
    if raw.starts_with('@') || raw.contains('"') || raw.contains('\\') {
        // Source routes and quoted local parts: classic relay tricks.
        return Err(denied());
    }
    if !raw.is_ascii() && !smtputf8 {
        return Err(needs_smtputf8());
    }
    if !printable_utf8(raw) || raw.len() > MAX_ADDRESS {
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
    // U-labels and A-labels alike (compared in ASCII form).
    if !cfg.is_relay_domain(domain) {
        return Err(denied());
    }
    // Stored (and delivered) as written, lower-cased: the very domain that
    // was checked (to_ascii lower-cases the same way).
    let domain = if domain.is_ascii() { domain.to_ascii_lowercase() } else { crate::punycode::lowercase(domain) };
    Ok(format!("{local}@{domain}"))
}

/// Largest recipients list read. A bigger file is not used (see
/// [`Recipients::start`] and [`Recipients::watch`]): the list is held in
/// memory, and 1 MiB is some 40,000 addresses (`@domain` lines cover whole
/// domains).
pub const MAX_LIST_BYTES: u64 = 1024 * 1024;
/// How often the watcher looks at the list file.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// What identifies one version of the list file: a copy in progress changes
/// its size or times, a replacement (`mv`) its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileId {
    fn of(m: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId { dev: m.dev(), ino: m.ino(), size: m.size(), mtime: (m.mtime(), m.mtime_nsec()), ctime: (m.ctime(), m.ctime_nsec()) }
    }
}

/// The optional list of valid recipients, one per line (`user@domain`, or
/// `@domain` for any address of a domain; `#` comments). A snapshot: the
/// watcher ([`Recipients::watch`]) reads a new one off the SMTP runtime when
/// the file changes, and swaps it in whole.
///
/// Compact on purpose: the file's text (lower-cased) and the sorted
/// positions of its addresses, about the file's size plus 8 bytes an entry.
#[derive(Debug, Default)]
pub struct RecipientList {
    path: Option<PathBuf>,
    text: String,
    /// (start, length) of each address in `text`, sorted by address, unique.
    entries: Vec<(u32, u32)>,
    /// The version of the file this list was read from.
    id: Option<FileId>,
    /// A list is configured, but none could be used: every lookup fails
    /// (451 4.3.0) until the watcher takes a good version.
    failed: bool,
}

/// The spool's copy of the last list taken, in the spool directory (see
/// [`Recipients::start`]).
pub const LAST_GOOD: &str = "recipients.last";
/// The list last pushed with `PUT /recipients` (see [`Recipients::push`]),
/// as it was sent, in the spool directory beside [`LAST_GOOD`].
pub const PUSHED: &str = "recipients.push";
/// A push's body on its way in, in the spool directory: `PUSH_TMP` and a
/// number. Left over by a crash, removed at start.
pub const PUSH_TMP: &str = "recipients.push.tmp.";

/// Where the recipients list in force came from, for the page and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// No list: every address in the relay domains.
    None = 0,
    /// The `recipients` file.
    File = 1,
    /// A push (`PUT /recipients`, kept as [`PUSHED`]).
    Push = 2,
    /// The last good list ([`LAST_GOOD`]): the file or push cannot be used.
    LastGood = 3,
}

impl Source {
    pub fn of(n: u32) -> Source {
        match n {
            1 => Source::File,
            2 => Source::Push,
            3 => Source::LastGood,
            _ => Source::None,
        }
    }

    /// The `source` label of `bartleby_recipients_source`.
    pub fn label(self) -> &'static str {
        match self {
            Source::None => "none",
            Source::File => "file",
            Source::Push => "push",
            Source::LastGood => "last_good",
        }
    }
}

/// Why a push was not taken (see [`Recipients::push`]).
#[derive(Debug, PartialEq, Eq)]
pub enum PushRefused {
    /// The body is not a list (a bad line, not UTF-8, no entries): 400.
    BadList(String),
    /// It holds fewer than half the entries in force (new, in force): 409.
    Shrink(usize, usize),
    /// The spool could not keep it: 500.
    Io(String),
}

impl RecipientList {
    /// Loads the list, for `bartleby check`: a list that cannot be used
    /// (unreadable, a bad line, no entries) is an error. `serve` does not
    /// stop for one: see [`Recipients::start`].
    pub fn load(path: Option<&Path>) -> Result<RecipientList, String> {
        match path {
            None => Ok(RecipientList::default()),
            Some(p) => RecipientList::read(p),
        }
    }

    /// Configured at `path`, but no list can be used.
    fn unusable(path: &Path) -> RecipientList {
        RecipientList { path: Some(path.to_path_buf()), failed: true, ..RecipientList::default() }
    }

    /// Reads the file: a regular file (or a symlink to one), opened without
    /// blocking (a FIFO or a device at the path must never stall anything),
    /// at most [`MAX_LIST_BYTES`]. A list without entries is an error too:
    /// with `recipients` configured it would refuse every address (a file
    /// cut to 0 bytes by a copy in progress or a power failure looks just
    /// like that); to refuse all mail for a domain, remove it from
    /// `relay_domains`.
    fn read(path: &Path) -> Result<RecipientList, String> {
        let err = |e: String| format!("recipients list {}: {e}", path.display());
        let (buf, meta) = crate::util::read_small_file(path, MAX_LIST_BYTES).map_err(|e| err(e.to_string()))?;
        let mut text = String::from_utf8(buf).map_err(|_| err("not UTF-8 text".into()))?;
        text.make_ascii_lowercase();
        let mut entries = Vec::new();
        let (mut extra, mut moved) = (String::new(), Vec::new());
        let mut pos = 0usize;
        for (n, line) in text.split_inclusive('\n').enumerate() {
            let start = pos;
            pos += line.len();
            let body = line.split('#').next().unwrap_or("");
            // Postfix map style "user@domain   OK" is accepted too.
            let Some(addr) = body.split_ascii_whitespace().next() else { continue };
            if !addr.contains('@') || addr.contains(['"', '%', '!']) {
                return Err(format!("recipients list {}:{}: `{addr}` is not user@domain or @domain", path.display(), n + 1));
            }
            // UTF-8 entries are kept as lookup keys (see list_key), after
            // the text; one that cannot be converted stays as written (and
            // matches nothing).
            if !addr.is_ascii()
                && let Some(k) = list_key(addr)
            {
                moved.push(entries.len());
                entries.push((extra.len() as u32, k.len() as u32));
                extra.push_str(&k);
                continue;
            }
            // addr is a subslice of line: its offset in the text.
            let at = start + (addr.as_ptr() as usize - line.as_ptr() as usize);
            entries.push((at as u32, addr.len() as u32));
        }
        let base = text.len() as u32;
        text.push_str(&extra);
        for i in moved {
            entries[i].0 += base;
        }
        if entries.is_empty() {
            return Err(err(
                "no entries (an empty list would refuse every address: a copy cut short? To refuse all mail for a domain, remove it from relay_domains)"
                    .into(),
            ));
        }
        let key = |&(s, l): &(u32, u32)| &text[s as usize..(s + l) as usize];
        entries.sort_by(|a, b| key(a).cmp(key(b)));
        entries.dedup_by(|a, b| key(a) == key(b));
        entries.shrink_to_fit();
        Ok(RecipientList { path: Some(path.to_path_buf()), entries, id: Some(FileId::of(&meta)), text, failed: false })
    }

    /// The modification time of the file this list was read from.
    fn modified(&self) -> Option<std::time::SystemTime> {
        let (s, ns) = self.id?.mtime;
        let d = std::time::Duration::new(u64::try_from(s).ok()?, u32::try_from(ns).unwrap_or(0));
        std::time::SystemTime::UNIX_EPOCH.checked_add(d)
    }

    /// The addresses, sorted, without duplicates.
    fn addresses(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|&(s, l)| &self.text[s as usize..(s + l) as usize])
    }

    /// Writes the list to `last` (see [`LAST_GOOD`]) unless it holds the
    /// same list already: one address a line, sorted, so that its line count
    /// is its entry count. Atomic: a temporary file, fsync, rename, fsync of
    /// the directory. Returns false when nothing had to be written.
    fn save(&self, last: &Path) -> std::io::Result<bool> {
        use std::io::Write;
        if same_lines(last, self.addresses()) {
            return Ok(false);
        }
        crate::spool::replace_file(last, &last.with_extension("last.tmp"), |w| {
            for a in self.addresses() {
                w.write_all(a.as_bytes())?;
                w.write_all(b"\n")?;
            }
            Ok(())
        })?;
        Ok(true)
    }

    pub fn is_enabled(&self) -> bool {
        self.path.is_some()
    }

    /// False when a list is configured but none can be used: lookups fail.
    pub fn is_usable(&self) -> bool {
        !self.failed
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn find(&self, key: &str) -> bool {
        self.entries.binary_search_by(|&(s, l)| self.text[s as usize..(s + l) as usize].cmp(key)).is_ok()
    }

    /// What the list says of the address (domain already lower-case).
    pub fn listed(&self, addr: &str) -> Listed {
        if !self.is_enabled() {
            Listed::NoList
        } else if !self.is_usable() {
            Listed::Unusable
        } else if self.accepts(addr) {
            Listed::Yes
        } else {
            Listed::No
        }
    }

    /// True when the address (domain already lower-case) may receive mail.
    pub fn accepts(&self, addr: &str) -> bool {
        if self.path.is_none() {
            return true;
        }
        let lower = list_key(addr).unwrap_or_else(|| addr.to_ascii_lowercase());
        if self.find(&lower) {
            return true;
        }
        match lower.rfind('@') {
            Some(i) => self.find(&lower[i..]),
            None => false,
        }
    }
}

/// True when the file at `path` holds exactly `lines`, each ended by a line
/// feed (compared a few KiB at a time: no second copy of a list in memory).
fn same_lines<'a>(path: &Path, lines: impl Iterator<Item = &'a str>) -> bool {
    use std::io::BufRead;
    let Ok((f, _)) = crate::util::open_regular(path) else { return false };
    let mut r = std::io::BufReader::with_capacity(4096, f);
    for line in lines {
        for mut part in [line.as_bytes(), b"\n"] {
            while !part.is_empty() {
                let buf = match r.fill_buf() {
                    Ok(b) if !b.is_empty() => b,
                    _ => return false,
                };
                let n = buf.len().min(part.len());
                if buf[..n] != part[..n] {
                    return false;
                }
                r.consume(n);
                part = &part[n..];
            }
        }
    }
    r.fill_buf().is_ok_and(|b| b.is_empty())
}

/// Lines in the file at `path` (entries of a [`LAST_GOOD`] file), counted a
/// few KiB at a time; `None` when it cannot be read or is too large to be a
/// list.
fn count_lines(path: &Path) -> Option<usize> {
    use std::io::Read;
    let (f, meta) = crate::util::open_regular(path).ok()?;
    if meta.len() > MAX_LIST_BYTES {
        return None;
    }
    let mut f = f.take(MAX_LIST_BYTES);
    let (mut buf, mut n) = ([0u8; 4096], 0usize);
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Some(n),
            Ok(k) => n += buf[..k].iter().filter(|&&b| b == b'\n').count(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// The recipients list the sessions use: a snapshot behind a lock held only
/// to clone an `Arc`, so a session never waits for the disk. The watcher
/// thread swaps in a new list when the file changes; the status page's
/// handler when a list is pushed ([`Recipients::push`]).
///
/// The file and the push: **the newer wins**. A push is taken when it
/// arrives; a version of the file is taken when its modification time is
/// later than the push in force (an edit after the push), and then the
/// pushed copy is removed from the spool; at start the same rule picks one.
/// SIGHUP takes the file whatever its age. The guards are the same for both
/// (never an empty list; not fewer than half the entries in force unless
/// forced: SIGHUP, `?force=1`).
#[derive(Debug, Clone)]
pub struct Recipients {
    inner: std::sync::Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    current: std::sync::Mutex<std::sync::Arc<RecipientList>>,
    /// A forced reload (SIGHUP) is due.
    force: std::sync::atomic::AtomicBool,
    /// The watcher thread, to wake it (unpark) for a forced reload.
    watcher: std::sync::OnceLock<std::thread::Thread>,
    /// Where the last good list is kept ([`LAST_GOOD`] in the spool).
    last: Option<PathBuf>,
    /// The version of the file refused at start, so that the watcher does
    /// not read it again (and warn again) until it changes.
    refused_at_start: std::sync::Mutex<Option<Result<FileId, String>>>,
    /// The configured `recipients` file.
    file: Option<PathBuf>,
    /// When the list in force was pushed; `None` when it was not.
    pushed: std::sync::Mutex<Option<std::time::SystemTime>>,
    /// Held while a new list is read and swapped in: the watcher and a push
    /// never interleave (the newer-wins rule is decided under it).
    update: std::sync::Mutex<()>,
}

/// What the watcher saw at the path: a version of the file, or why not.
fn seen(path: &Path) -> Result<FileId, String> {
    std::fs::metadata(path).map(|m| FileId::of(&m)).map_err(|e| e.to_string())
}

fn unix(t: std::time::SystemTime) -> u32 {
    t.duration_since(std::time::SystemTime::UNIX_EPOCH).map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

/// Tells the page and `/metrics` about the list in force.
fn publish(stats: &crate::stats::Stats, list: &RecipientList, source: Source, updated: Option<std::time::SystemTime>) {
    use std::sync::atomic::Ordering::Relaxed;
    let source = if list.is_enabled() { source } else { Source::None };
    stats.recipients_entries.store(u32::try_from(list.len()).unwrap_or(u32::MAX), Relaxed);
    stats.recipients_unusable.store(!list.is_usable(), Relaxed);
    stats.recipients_source.store(source as u32, Relaxed);
    stats.recipients_updated.store(updated.map_or(0, unix), Relaxed);
}

/// Removes what pushes cut short by a crash left in `dir` (see [`PUSH_TMP`]).
fn remove_push_temps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if e.file_name().to_str().is_some_and(|n| n.starts_with(PUSH_TMP)) {
            let p = e.path();
            match std::fs::remove_file(&p) {
                Ok(()) => log::info!(target: crate::logging::MASTER, "removed {} (a push cut short)", p.display()),
                Err(err) => log::warn!(target: crate::logging::MASTER, "warning: cannot remove {}: {err}", p.display()),
            }
        }
    }
}

/// The pushed list kept in the spool: `Ok(None)` when there is none.
fn read_pushed(p: &Path) -> Result<Option<RecipientList>, String> {
    match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        _ => RecipientList::read(p).map(Some),
    }
}

impl Recipients {
    pub fn new(list: RecipientList) -> Recipients {
        Recipients::with_last(list, None, None, None)
    }

    fn with_last(list: RecipientList, last: Option<PathBuf>, refused: Option<Result<FileId, String>>, file: Option<PathBuf>) -> Recipients {
        let current = std::sync::Mutex::new(std::sync::Arc::new(list));
        let force = std::sync::atomic::AtomicBool::new(false);
        let refused_at_start = std::sync::Mutex::new(refused);
        Recipients {
            inner: std::sync::Arc::new(Shared {
                current,
                force,
                watcher: std::sync::OnceLock::new(),
                last,
                refused_at_start,
                file,
                pushed: std::sync::Mutex::new(None),
                update: std::sync::Mutex::new(()),
            }),
        }
    }

    fn pushed_path(&self) -> Option<PathBuf> {
        self.inner.last.as_ref().map(|l| l.with_file_name(PUSHED))
    }

    /// The list to start with. Never an error: a list that cannot be used
    /// must not stop the server (on the appliance PID 1 would reboot into
    /// the same file again and again). In order:
    ///   * the pushed list ([`PUSHED`], in the spool), when there is one and
    ///     the file is not newer (by its modification time);
    ///   * the file, when it can be used and holds at least half the entries
    ///     of the last good list (`last`, kept in the spool): it becomes the
    ///     last good list;
    ///   * else the last good list, with a warning (the file is refused as a
    ///     reload would be, and taken once it changes, or by SIGHUP);
    ///   * else no list: every recipient gets `451 4.3.0` (temporary: the
    ///     sender retries), with a warning in the log, on the page and in
    ///     `/metrics`, until the watcher takes a good version (or a push).
    ///
    /// With neither a file configured nor a pushed list: no list (every
    /// address in the relay domains), as before push existed.
    pub fn start(path: Option<&Path>, last: &Path, stats: &crate::stats::Stats) -> Recipients {
        let pushed_path = last.with_file_name(PUSHED);
        if let Some(dir) = last.parent() {
            remove_push_temps(dir);
        }
        // Before reading: a change after this is seen by the watcher.
        let seen_at_start = path.map(seen);
        let file_time = path.and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        let push_error = match read_pushed(&pushed_path) {
            Ok(Some(p)) if file_time.is_none() || file_time <= p.modified() => {
                return Recipients::start_pushed(p, path, file_time.is_some(), last, seen_at_start, stats);
            }
            Ok(Some(_)) => {
                if let Some(f) = path {
                    log::info!(target: crate::logging::MASTER, "recipients list {} is newer than the pushed list {}: using the file", f.display(), pushed_path.display());
                }
                None
            }
            Ok(None) => None,
            Err(e) => {
                log::warn!(target: crate::logging::MASTER, "warning: pushed {e}: not used");
                Some(e)
            }
        };
        match path {
            Some(path) => Recipients::start_file(path, last, seen_at_start.unwrap_or_else(|| seen(path)), stats),
            None => Recipients::start_no_file(push_error, last, stats),
        }
    }

    /// Starts with the pushed list `p` (not older than the file, if any).
    fn start_pushed(
        mut p: RecipientList,
        path: Option<&Path>,
        file_exists: bool,
        last: &Path,
        seen_at_start: Option<Result<FileId, String>>,
        stats: &crate::stats::Stats,
    ) -> Recipients {
        let pushed_path = last.with_file_name(PUSHED);
        let t = p.modified();
        log::info!(
            target: crate::logging::MASTER,
            "recipients list: {} entries, pushed {} ({}){}",
            p.len(),
            t.map_or_else(|| "?".into(), |t| crate::util::iso_date(unix(t) as u64)),
            pushed_path.display(),
            match path {
                Some(f) if file_exists => format!(", newer than {}", f.display()),
                _ => String::new(),
            }
        );
        save_last(&p, last);
        publish(stats, &p, Source::Push, t);
        stats.recipients_kept.lock().unwrap_or_else(|e| e.into_inner()).clear();
        p.path = Some(pushed_path);
        let r = Recipients::with_last(p, Some(last.to_path_buf()), seen_at_start, path.map(Path::to_path_buf));
        *r.inner.pushed.lock().unwrap_or_else(|e| e.into_inner()) = t;
        r
    }

    /// No file configured and no usable push: no list (every address), or,
    /// when a pushed copy is damaged (`push_error`), the last good list,
    /// else 451 until the next push (never "everyone").
    fn start_no_file(push_error: Option<String>, last: &Path, stats: &crate::stats::Stats) -> Recipients {
        let Some(why) = push_error else {
            publish(stats, &RecipientList::default(), Source::None, None);
            return Recipients::with_last(RecipientList::default(), Some(last.to_path_buf()), None, None);
        };
        let pushed_path = last.with_file_name(PUSHED);
        let list = match RecipientList::read(last) {
            Ok(mut l) => {
                log::warn!(target: crate::logging::MASTER, "warning: using the last good list {} ({} entries) until the next push", last.display(), l.len());
                let t = l.modified();
                l.path = Some(pushed_path);
                l.id = None;
                publish(stats, &l, Source::LastGood, t);
                l
            }
            Err(_) => {
                log::warn!(target: crate::logging::MASTER, "warning: no usable recipients list: every recipient in the relay domains gets 451 4.3.0 (try again later) until the next push");
                let l = RecipientList::unusable(&pushed_path);
                publish(stats, &l, Source::Push, None);
                l
            }
        };
        *stats.recipients_kept.lock().unwrap_or_else(|p| p.into_inner()) = why;
        Recipients::with_last(list, Some(last.to_path_buf()), None, None)
    }

    /// Starts with the file at `path` (see [`Recipients::pick_at_start`]),
    /// and says where the list in force came from.
    fn start_file(path: &Path, last: &Path, seen_at_start: Result<FileId, String>, stats: &crate::stats::Stats) -> Recipients {
        let (list, refused, why) = Recipients::pick_at_start(path, last, seen_at_start);
        if refused.is_none() {
            log::info!(target: crate::logging::MASTER, "recipients list {}: {} entries", path.display(), list.len());
            save_last(&list, last);
            publish(stats, &list, Source::File, list.modified());
            // The file is newer than any push: the pushed copy is done with.
            remove_pushed(&last.with_file_name(PUSHED));
        } else if list.is_usable() {
            let last_time = std::fs::metadata(last).and_then(|m| m.modified()).ok();
            publish(stats, &list, Source::LastGood, last_time);
        } else {
            publish(stats, &list, Source::File, None);
        }
        *stats.recipients_kept.lock().unwrap_or_else(|p| p.into_inner()) = why;
        Recipients::with_last(list, Some(last.to_path_buf()), refused, Some(path.to_path_buf()))
    }

    /// The file when it can be used and holds at least half the entries of
    /// the last good list; else the last good list; else an unusable list.
    /// Returns the list, the version of the file refused (if it was) and why.
    fn pick_at_start(
        path: &Path,
        last: &Path,
        seen_at_start: Result<FileId, String>,
    ) -> (RecipientList, Option<Result<FileId, String>>, String) {
        // The last good list instead of the file, for `why`; Err: why not.
        let from_last = |why: &str| match RecipientList::read(last) {
            Ok(mut l) => {
                l.path = Some(path.to_path_buf());
                l.id = None;
                log::warn!(
                    target: crate::logging::MASTER,
                    "warning: {why}; using the last good list {} ({} entries) until the file changes (send SIGHUP to take the file as it is)",
                    last.display(),
                    l.len()
                );
                Ok(l)
            }
            Err(e) => Err(e),
        };
        match RecipientList::read(path) {
            Ok(new) => match count_lines(last) {
                Some(n) if new.len() * 2 < n => {
                    let why = format!(
                        "recipients list {}: {} entries, fewer than half of the {n} of the last good list (a copy cut short?)",
                        path.display(),
                        new.len()
                    );
                    match from_last(&why) {
                        Ok(l) => (l, Some(seen_at_start), why),
                        Err(e) => {
                            log::warn!(target: crate::logging::MASTER, "warning: {e}; using the file");
                            (new, None, String::new())
                        }
                    }
                }
                _ => (new, None, String::new()),
            },
            Err(why) => match from_last(&why) {
                Ok(l) => (l, Some(seen_at_start), why),
                Err(e) => {
                    // Missing is the normal case (the first start); say why else.
                    let last_error = match std::fs::symlink_metadata(last) {
                        Err(_) => String::new(),
                        Ok(_) => format!(": {e}"),
                    };
                    log::warn!(
                        target: crate::logging::MASTER,
                        "warning: {why}; no usable list (no last good list {}{last_error}): every recipient in the relay domains gets 451 4.3.0 (try again later) until the file is fixed",
                        last.display()
                    );
                    (RecipientList::unusable(path), Some(seen_at_start), why)
                }
            },
        }
    }

    /// The list in force now.
    pub fn get(&self) -> std::sync::Arc<RecipientList> {
        self.inner.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, list: RecipientList) {
        *self.inner.current.lock().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(list);
    }

    /// Rereads the list now and takes it even if it drops most entries (the
    /// administrator's way past the guard: SIGHUP), and even if a push is
    /// newer. False when no list file is configured.
    pub fn force_reload(&self) -> bool {
        let Some(t) = self.inner.watcher.get() else { return false };
        self.inner.force.store(true, std::sync::atomic::Ordering::SeqCst);
        t.unpark();
        true
    }

    /// Starts the watcher thread (when a list file is configured). Once a
    /// second it looks at the file (stat only); a changed file is read once
    /// it has been left alone for a second (a copy in progress keeps
    /// changing), off the SMTP runtime. A new version is refused, and the
    /// list in force kept, when it cannot be used (not a regular file, too
    /// big, not UTF-8, a bad line, no entries) or when it holds fewer than
    /// half the entries of the list in force (a truncated copy: 0 entries
    /// would answer 550 to everyone); it is not taken either when a pushed
    /// list is in force and the file's modification time is not later than
    /// the push (the newer wins). A refused version is not read again until
    /// the file changes.
    pub fn watch(&self, stats: std::sync::Arc<crate::stats::Stats>) -> std::io::Result<()> {
        let Some(path) = self.inner.file.clone() else { return Ok(()) };
        let me = self.clone();
        let handle = std::thread::Builder::new()
            .name("recipients".into())
            .stack_size(64 * 1024)
            .spawn(move || me.watcher(&path, &stats))?;
        let _ = self.inner.watcher.set(handle.thread().clone());
        Ok(())
    }

    fn watcher(&self, path: &Path, stats: &crate::stats::Stats) {
        let mut pending: Option<Result<FileId, String>> = None;
        let mut refused = self.inner.refused_at_start.lock().unwrap_or_else(|p| p.into_inner()).take();
        loop {
            // Woken early by force_reload(); spurious wake-ups only cost a stat.
            std::thread::park_timeout(WATCH_INTERVAL);
            let forced = self.inner.force.swap(false, std::sync::atomic::Ordering::SeqCst);
            let seen = seen(path);
            if !forced {
                let current = self.get();
                if seen.as_ref().ok() == current.id.as_ref() || Some(&seen) == refused.as_ref() {
                    pending = None;
                    continue;
                }
                // Changed: read it once it has stayed the same for an interval.
                if pending.as_ref() != Some(&seen) {
                    pending = Some(seen);
                    continue;
                }
            }
            pending = None;
            match self.reload(path, forced, stats) {
                Ok(()) => refused = None,
                Err(()) => refused = Some(seen),
            }
        }
    }

    /// Reads the file and takes it, or keeps the list in force and says why.
    /// With no usable list in force, any usable version is taken. A version
    /// not newer than a push in force is left alone (unless `forced`).
    fn reload(&self, path: &Path, forced: bool, stats: &crate::stats::Stats) -> Result<(), ()> {
        let _update = self.inner.update.lock().unwrap_or_else(|p| p.into_inner());
        let pushed = *self.inner.pushed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tp) = pushed.filter(|_| !forced)
            && let Ok(tf) = std::fs::metadata(path).and_then(|m| m.modified())
            && tf <= tp
        {
            log::info!(
                target: crate::logging::SMTPD,
                "recipients list {}: not taken: older than the list pushed {} (the newer one is in force; send SIGHUP to take the file)",
                path.display(),
                crate::util::iso_date(unix(tp) as u64)
            );
            return Err(());
        }
        let old = self.get();
        let why = match RecipientList::read(path) {
            Ok(new) if forced || !old.is_usable() || new.len() * 2 >= old.len() => {
                let n = new.len();
                if let Some(last) = &self.inner.last {
                    save_last(&new, last);
                }
                publish(stats, &new, Source::File, new.modified());
                self.set(new);
                stats.recipients_kept.lock().unwrap_or_else(|p| p.into_inner()).clear();
                log::info!(
                    target: crate::logging::SMTPD,
                    "recipients list reloaded: {n} entries{}",
                    if forced { " (forced by SIGHUP)" } else { "" }
                );
                if self.inner.pushed.lock().unwrap_or_else(|p| p.into_inner()).take().is_some()
                    && let Some(p) = self.pushed_path()
                {
                    remove_pushed(&p);
                }
                return Ok(());
            }
            Ok(new) => format!(
                "recipients list {}: {} entries, fewer than half of the {} in force (a copy in progress?)",
                path.display(),
                new.len(),
                old.len()
            ),
            Err(e) => e,
        };
        if old.is_usable() {
            log::warn!(
                target: crate::logging::SMTPD,
                "warning: {why}; keeping the previous list of {} entries (send SIGHUP to force a reload)",
                old.len()
            );
        } else {
            log::warn!(
                target: crate::logging::SMTPD,
                "warning: {why}; still no usable list: every recipient in the relay domains gets 451 4.3.0 (try again later)"
            );
        }
        *stats.recipients_kept.lock().unwrap_or_else(|p| p.into_inner()) = why;
        Err(())
    }

    /// Takes a pushed list. `tmp` holds the body as received (in the spool
    /// directory, where [`PUSHED`] goes: a rename there is atomic); it is
    /// parsed by the same reader as the file, then fsynced and renamed to
    /// [`PUSHED`], the directory fsynced, and only then swapped in: a crash
    /// at any point leaves the old list or the new one, never a mix. Refused
    /// (and `tmp` left for the caller to remove) when it is not a usable
    /// list, or when it holds fewer than half the entries in force unless
    /// `force`. `from` is the client, for the log.
    pub fn push(&self, tmp: &Path, force: bool, from: &str, stats: &crate::stats::Stats) -> Result<(usize, usize), PushRefused> {
        let _update = self.inner.update.lock().unwrap_or_else(|p| p.into_inner());
        let (Some(last), Some(dest)) = (self.inner.last.as_ref(), self.pushed_path()) else {
            return Err(PushRefused::Io("no spool to keep a pushed list in".into()));
        };
        let mut new = RecipientList::read(tmp).map_err(|e| PushRefused::BadList(body_error(&e, tmp)))?;
        let old = self.get();
        let before = if old.is_enabled() && old.is_usable() { old.len() } else { 0 };
        if !force && new.len() * 2 < before {
            log::warn!(
                target: crate::logging::STATUS,
                "warning: recipients list pushed by {from}: {} entries, fewer than half of the {before} in force: refused (push with ?force=1 to take it)",
                new.len()
            );
            return Err(PushRefused::Shrink(new.len(), before));
        }
        let io = |what: &str, p: &Path, e: std::io::Error| {
            let msg = format!("cannot {what} {}: {e}", p.display());
            log::warn!(target: crate::logging::STATUS, "warning: recipients list pushed by {from}: {msg}");
            PushRefused::Io(msg)
        };
        std::fs::File::open(tmp).and_then(|f| f.sync_all()).map_err(|e| io("sync", tmp, e))?;
        std::fs::rename(tmp, &dest).map_err(|e| io("rename to", &dest, e))?;
        if let Some(dir) = dest.parent() {
            crate::spool::fsync_dir(dir).map_err(|e| io("sync", dir, e))?;
        }
        let now = std::fs::metadata(&dest).and_then(|m| m.modified()).unwrap_or_else(|_| std::time::SystemTime::now());
        new.path = Some(dest);
        new.id = None;
        let n = new.len();
        save_last(&new, last);
        publish(stats, &new, Source::Push, Some(now));
        *self.inner.pushed.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
        self.set(new);
        stats.recipients_kept.lock().unwrap_or_else(|p| p.into_inner()).clear();
        log::info!(
            target: crate::logging::STATUS,
            "recipients list pushed by {from}: {n} entries (was {}){}",
            old.len(),
            if force { " (forced)" } else { "" }
        );
        Ok((n, old.len()))
    }
}

/// A reader's error about a pushed body, without the temporary file's name:
/// `line 7: ...` for a bad line.
fn body_error(e: &str, tmp: &Path) -> String {
    let prefix = format!("recipients list {}", tmp.display());
    let rest = e.strip_prefix(prefix.as_str()).unwrap_or(e);
    if let Some(r) = rest.strip_prefix(':')
        && let Some((n, what)) = r.split_once(':')
        && !n.is_empty()
        && n.bytes().all(|b| b.is_ascii_digit())
    {
        return format!("line {n}:{what}");
    }
    rest.strip_prefix(": ").unwrap_or(rest).to_string()
}

/// Removes the pushed copy once the file has taken over.
fn remove_pushed(p: &Path) {
    match std::fs::remove_file(p) {
        Ok(()) => {
            log::info!(target: crate::logging::MASTER, "recipients list: the file is newer than the pushed list; removed {}", p.display());
            if let Some(dir) = p.parent() {
                let _ = crate::spool::fsync_dir(dir);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => log::warn!(target: crate::logging::MASTER, "warning: cannot remove {}: {e}", p.display()),
    }
}

/// Keeps `list` as the last good list; a failure is only a warning (the
/// list in force is not affected, only what a restart could fall back on).
fn save_last(list: &RecipientList, last: &Path) {
    match list.save(last) {
        Ok(true) => log::info!(target: crate::logging::MASTER, "recipients list: {} entries saved to {}", list.len(), last.display()),
        Ok(false) => {}
        Err(e) => log::warn!(target: crate::logging::MASTER, "warning: cannot save the recipients list to {}: {e}", last.display()),
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
        check_recipient(&cfg(), raw, raw, &RecipientList::default(), false)
    }

    #[test]
    fn path_end_is_quote_aware() {
        assert_eq!(path_end(b"bob@example.org> SIZE=1"), Some(15));
        assert_eq!(path_end(b"\"a>b\"@x> X"), Some(7));
        // an escaped quote does not end the quoted string; outside quotes
        // a backslash escapes nothing
        assert_eq!(path_end(b"\"a\\\">\"@x>"), Some(8));
        assert_eq!(path_end(b"a\\>b"), Some(2));
        // hostile: empty, never closed, a quote never closed, a trailing
        // backslash, UTF-8 around the brackets
        for bad in [&b""[..], b"bob@example.org", b"\"a>b@x>", b"\"a\\", "\"ü>\"@bücher".as_bytes()] {
            assert_eq!(path_end(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(path_end("jörg@bücher.test>".as_bytes()), Some("jörg@bücher.test".len()));
        // the three users agree on where the path ends
        let line = b"MAIL FROM:<\"a> SIZE=9\"@x> SIZE=10 RET=HDRS";
        assert_eq!(raw_path(line), Some("\"a> SIZE=9\"@x"));
        assert_eq!(size_param(line), Ok(Some(10)));
    }

    #[test]
    fn sender_domain_by_the_one_check() {
        // RFC 5321 4.1.2: a label neither starts nor ends with `-` (the
        // config's check; this one took both before)
        for bad in ["a@-x.example", "a@x-.example", &format!("a@{}.example", "b".repeat(64)), "a@x..example", "a@x_y.example"] {
            assert!(check_sender(bad, false).is_err(), "{bad}");
        }
        assert!(check_sender("a@x-y.example", false).is_ok());
        assert!(check_sender("a@[192.0.2.1]", false).is_ok());
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
        let e = check_recipient(&cfg(), "x@example.org", "y@example.org", &RecipientList::default(), false).unwrap_err();
        assert_eq!(e.code, 550);
    }

    #[test]
    fn senders() {
        assert_eq!(check_sender("", false).unwrap(), "");
        assert_eq!(check_sender("alice@sender.test", false).unwrap(), "alice@sender.test");
        assert_eq!(check_sender("@relay.test:alice@sender.test", false).unwrap(), "alice@sender.test");
        assert_eq!(check_sender("\"alice smith\"@sender.test", false).unwrap(), "\"alice smith\"@sender.test");
        assert!(check_sender("alice", false).is_err());
        assert!(check_sender("alice@", false).is_err());
        assert!(check_sender("al ice@sender.test", false).is_err());
    }

    #[test]
    fn utf8_addresses_only_with_smtputf8() {
        // Postfix, strict_smtputf8 = yes: 553 5.6.7.
        for (s, r) in [("jörg@sender.test", "müller@example.org"), ("a@bücher.test", "bob@exämple.org")] {
            let e = check_sender(s, false).unwrap_err();
            assert_eq!((e.code, e.status), (553, "5.6.7"), "{s}");
            let e = check_recipient(&cfg(), r, r, &RecipientList::default(), false).unwrap_err();
            assert_eq!((e.code, e.status), (553, "5.6.7"), "{r}");
        }
        assert_eq!(check_sender("jörg@Bücher.test", true).unwrap(), "jörg@Bücher.test");
        let c = Config::parse(
            "hostname = \"backup.example.org\"\nrelay_domains = [\"example.org\", \"xn--bcher-kva.example\"]\nprimary = \"127.0.0.1:2526\"\n",
            Path::new("t"),
        )
        .unwrap();
        let ok = |r: &str| check_recipient(&c, r, r, &RecipientList::default(), true);
        assert_eq!(ok("Müller@example.org").unwrap(), "Müller@example.org");
        assert_eq!(ok("müller@BÜCHER.example").unwrap(), "müller@bücher.example");
        assert_eq!(ok("bob@XN--BCHER-KVA.example").unwrap(), "bob@xn--bcher-kva.example");
        for bad in ["bob@bucher.example", "bob@xn--bcher-.example", "müller%evil@example.org", "müller@evil.test", "bob@mu\u{308}nchen.example"] {
            assert_eq!(ok(bad).unwrap_err().code, 550, "{bad}");
        }
        for bad in ["mül\u{85}ler@example.org", "a\u{202e}b@example.org", "a\u{a0}b@example.org"] {
            assert_eq!(ok(bad).unwrap_err().code, 501, "{bad}");
            assert_eq!(check_sender(bad, true).unwrap_err().code, 553, "{bad}");
        }
        // Limits in bytes; a character across them never panics.
        assert!(ok(&("ü".repeat(32) + "@example.org")).is_ok());
        assert_eq!(ok(&("ü".repeat(32) + "a@example.org")).unwrap_err().code, 501);
        for n in 0..140 {
            for ch in ["é", "€", "\u{1F600}"] {
                let a = ch.repeat(n) + "@sender.test";
                assert_eq!(check_sender(&a, true).is_ok(), n > 0 && a.len() <= 254, "{} bytes", a.len());
                let _ = ok(&(ch.repeat(n) + "@example.org"));
                let _ = ok(&format!("a@{}.example", ch.repeat(n)));
            }
        }
    }

    #[test]
    fn recipient_list_in_u_labels_or_a_labels() {
        let p = std::env::temp_dir().join(format!("bartleby-rcpts-utf8-{}", std::process::id()));
        std::fs::write(&p, "bob@example.org\nMüller@xn--bcher-kva.example\n@münchen.example\nstraße@Bücher.example OK\nbroken@xn--.example\n").unwrap();
        let l = RecipientList::load(Some(&p)).unwrap();
        assert_eq!(l.len(), 5);
        for a in ["müller@bücher.example", "MÜLLER@XN--BCHER-KVA.example", "x@xn--mnchen-3ya.example", "x@MÜNCHEN.example", "straße@bücher.example", "bob@example.org"] {
            assert!(l.accepts(a), "{a}");
        }
        for a in ["mueller@bücher.example", "strasse@bücher.example", "x@munchen.example"] {
            assert!(!l.accepts(a), "{a}");
        }
        std::fs::remove_file(&p).unwrap();
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
        let e = check_recipient(&cfg(), "mallory@example.org", "mallory@example.org", &l, false).unwrap_err();
        assert_eq!((e.code, e.status), (550, "5.1.1"));
        std::fs::write(&p, "bob@example.org\nnot-an-address\n").unwrap();
        assert!(RecipientList::load(Some(&p)).unwrap_err().contains(":2:"));
        std::fs::write(&p, "Bob@Example.org # ok\n\n  carol@example.org\tOK\nbob@example.org\n").unwrap();
        let l = RecipientList::load(Some(&p)).unwrap();
        assert_eq!(l.len(), 2);
        assert!(l.accepts("BOB@example.org") && l.accepts("carol@example.org") && !l.accepts("ok"));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn recipient_list_only_regular_files_bounded() {
        let dir = std::env::temp_dir().join(format!("bartleby-rcpts-kinds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Returns at once (no writer on the FIFO), with the reason.
        let e = RecipientList::load(Some(&fifo)).unwrap_err();
        assert!(e.contains("not a regular file (a FIFO)"), "{e}");
        assert!(RecipientList::load(Some(&dir)).unwrap_err().contains("a directory"));
        assert!(RecipientList::load(Some(Path::new("/dev/null"))).unwrap_err().contains("a device"));
        let big = dir.join("big");
        std::fs::File::create(&big).unwrap().set_len(MAX_LIST_BYTES + 1).unwrap();
        assert!(RecipientList::load(Some(&big)).unwrap_err().contains("larger than"));
        // A symlink to a regular file is fine.
        let real = dir.join("real");
        std::fs::write(&real, "bob@example.org\n").unwrap();
        std::os::unix::fs::symlink(&real, dir.join("link")).unwrap();
        assert!(RecipientList::load(Some(&dir.join("link"))).unwrap().accepts("bob@example.org"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reload_keeps_the_list_when_most_of_it_would_go() {
        let p = std::env::temp_dir().join(format!("bartleby-rcpts-guard-{}", std::process::id()));
        std::fs::write(&p, "a@example.org\nb@example.org\nc@example.org\nd@example.org\n").unwrap();
        let r = Recipients::new(RecipientList::load(Some(&p)).unwrap());
        let stats = crate::stats::Stats::new();
        std::fs::write(&p, "").unwrap();
        assert!(r.reload(&p, false, &stats).is_err());
        assert_eq!(r.get().len(), 4);
        assert!(stats.recipients_kept.lock().unwrap().contains(": no entries"));
        std::fs::write(&p, "a@example.org\n").unwrap();
        assert!(r.reload(&p, false, &stats).is_err());
        assert_eq!(r.get().len(), 4);
        assert!(stats.recipients_kept.lock().unwrap().contains("1 entries, fewer than half of the 4"));
        std::fs::write(&p, "a@example.org\nb@example.org\n").unwrap();
        assert!(r.reload(&p, false, &stats).is_ok());
        assert_eq!(r.get().len(), 2);
        assert!(stats.recipients_kept.lock().unwrap().is_empty());
        std::fs::write(&p, "a@example.org\nbad\n").unwrap();
        assert!(r.reload(&p, false, &stats).is_err());
        assert!(stats.recipients_kept.lock().unwrap().contains(":2:"));
        std::fs::write(&p, "a@example.org\n").unwrap();
        assert!(r.reload(&p, true, &stats).is_ok(), "forced");
        assert_eq!(r.get().len(), 1);
        // An empty file is never taken, not even by SIGHUP: it would refuse
        // every address (remove the domain from relay_domains for that).
        std::fs::write(&p, "# nobody\n").unwrap();
        assert!(r.reload(&p, true, &stats).is_err(), "forced, empty");
        assert!(r.get().accepts("a@example.org"));
        assert!(stats.recipients_kept.lock().unwrap().contains("no entries"));
        std::fs::remove_file(&p).unwrap();
    }

    fn start_dir(name: &str) -> (PathBuf, PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("bartleby-rcpts-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        (dir.join("recipients"), dir.join(LAST_GOOD), dir)
    }

    #[test]
    fn an_unusable_list_at_start_defers_and_the_first_good_one_is_taken() {
        let (p, last, dir) = start_dir("unusable");
        for (what, spoil) in [
            ("empty", &(|p: &Path| std::fs::write(p, "").unwrap()) as &dyn Fn(&Path)),
            ("cut", &|p: &Path| std::fs::write(p, "alice@example.org\nbob@exam\ncar").unwrap()),
            ("directory", &|p: &Path| std::fs::create_dir(p).unwrap()),
            ("missing", &|_: &Path| {}),
        ] {
            spoil(&p);
            let stats = crate::stats::Stats::new();
            let r = Recipients::start(Some(&p), &last, &stats);
            let l = r.get();
            assert!(l.is_enabled() && !l.is_usable(), "{what}");
            let e = check_recipient(&cfg(), "bob@example.org", "bob@example.org", &l, false).unwrap_err();
            assert_eq!(e.line(), "451 4.3.0 <bob@example.org>: Temporary lookup failure", "{what}");
            // Still never an open relay.
            assert_eq!(check_recipient(&cfg(), "bob@evil.test", "bob@evil.test", &l, false).unwrap_err().code, 550);
            assert!(stats.recipients_unusable.load(std::sync::atomic::Ordering::Relaxed));
            assert!(!stats.recipients_kept.lock().unwrap().is_empty(), "{what}");
            // A bad version does not end it; the first good one does.
            assert!(r.reload(&p, false, &stats).is_err());
            assert!(!r.get().is_usable());
            if p.is_dir() {
                std::fs::remove_dir(&p).unwrap();
            }
            std::fs::write(&p, "bob@example.org\n").unwrap();
            assert!(r.reload(&p, false, &stats).is_ok(), "{what}");
            assert!(r.get().is_usable() && r.get().accepts("bob@example.org") && !r.get().accepts("eve@example.org"));
            assert!(!stats.recipients_unusable.load(std::sync::atomic::Ordering::Relaxed));
            assert!(stats.recipients_kept.lock().unwrap().is_empty());
            // ... and becomes the last good list.
            assert_eq!(std::fs::read_to_string(&last).unwrap(), "bob@example.org\n");
            std::fs::remove_file(&last).unwrap();
            std::fs::remove_file(&p).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_last_good_list_is_kept_and_used_at_start() {
        let (p, last, dir) = start_dir("last");
        let stats = crate::stats::Stats::new();
        std::fs::write(&p, "# users\nDave@Example.org\nbob@example.org OK\n@lists.example.org\ncarol@example.org\nbob@example.org\n").unwrap();
        let r = Recipients::start(Some(&p), &last, &stats);
        assert_eq!(r.get().len(), 4);
        // Sorted, one a line, lower case: its line count is its entry count.
        let saved = "@lists.example.org\nbob@example.org\ncarol@example.org\ndave@example.org\n";
        assert_eq!(std::fs::read_to_string(&last).unwrap(), saved);
        assert_eq!(count_lines(&last), Some(4));
        // The same list again: not rewritten.
        let before = std::fs::metadata(&last).unwrap().modified().unwrap();
        assert!(!r.get().save(&last).unwrap());
        assert_eq!(std::fs::metadata(&last).unwrap().modified().unwrap(), before);
        assert!(same_lines(&last, r.get().addresses()));
        assert!(!same_lines(&last, ["bob@example.org"].into_iter()));

        // Cut mid-line while the relay was down: the last good list is used.
        std::fs::write(&p, "bob@example.org\ncarol@exam\ncar").unwrap();
        let stats = crate::stats::Stats::new();
        let r = Recipients::start(Some(&p), &last, &stats);
        let l = r.get();
        assert!(l.is_usable() && l.accepts("dave@example.org") && l.accepts("x@lists.example.org") && !l.accepts("eve@example.org"));
        assert_eq!(l.path.as_deref(), Some(p.as_path()), "watches the configured file");
        assert!(stats.recipients_kept.lock().unwrap().contains(":3:"));
        assert!(!stats.recipients_unusable.load(std::sync::atomic::Ordering::Relaxed));
        assert_eq!(stats.recipients_entries.load(std::sync::atomic::Ordering::Relaxed), 4);
        // The refused version is remembered for the watcher.
        assert_eq!(*r.inner.refused_at_start.lock().unwrap(), Some(seen(&p)));
        assert_eq!(std::fs::read_to_string(&last).unwrap(), saved, "not overwritten");

        // Shrunk by more than half: the same guard as a reload.
        std::fs::write(&p, "bob@example.org\n").unwrap();
        let stats = crate::stats::Stats::new();
        let r = Recipients::start(Some(&p), &last, &stats);
        assert_eq!(r.get().len(), 4);
        assert!(stats.recipients_kept.lock().unwrap().contains("1 entries, fewer than half of the 4"));
        // Half is fine: taken, and saved.
        std::fs::write(&p, "bob@example.org\ncarol@example.org\n").unwrap();
        let stats = crate::stats::Stats::new();
        let r = Recipients::start(Some(&p), &last, &stats);
        assert_eq!(r.get().len(), 2);
        assert!(stats.recipients_kept.lock().unwrap().is_empty());
        assert_eq!(count_lines(&last), Some(2));

        // A damaged last good list is not used: the file is.
        std::fs::write(&last, "junk\n".repeat(10)).unwrap();
        let r = Recipients::start(Some(&p), &last, &crate::stats::Stats::new());
        assert_eq!(r.get().len(), 2);
        // A bad file and a damaged last good list: no usable list.
        std::fs::write(&last, "junk\n").unwrap();
        std::fs::write(&p, "").unwrap();
        assert!(!Recipients::start(Some(&p), &last, &crate::stats::Stats::new()).get().is_usable());
        // Not configured: everything in the relay domains.
        let r = Recipients::start(None, &last, &crate::stats::Stats::new());
        assert!(!r.get().is_enabled() && r.get().is_usable() && r.get().accepts("anyone@example.org"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn push_body(dir: &Path, text: &str) -> PathBuf {
        let tmp = dir.join(format!("{PUSH_TMP}7"));
        std::fs::write(&tmp, text).unwrap();
        tmp
    }

    fn set_mtime(p: &Path, secs_ago: u64) {
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(secs_ago);
        std::fs::File::options().write(true).open(p).unwrap().set_modified(t).unwrap();
    }

    #[test]
    fn a_push_replaces_the_list_with_the_same_guards_and_survives_a_restart() {
        use std::sync::atomic::Ordering::Relaxed;
        let (p, last, dir) = start_dir("push");
        std::fs::write(&p, "a@example.org\nb@example.org\nc@example.org\nd@example.org\n").unwrap();
        let stats = crate::stats::Stats::new();
        let r = Recipients::start(Some(&p), &last, &stats);
        assert_eq!(Source::of(stats.recipients_source.load(Relaxed)), Source::File);
        // A bad line: refused, naming the line, not the temporary file.
        let tmp = push_body(&dir, "a@example.org\nnope\n");
        assert_eq!(r.push(&tmp, false, "192.0.2.10", &stats), Err(PushRefused::BadList("line 2: `nope` is not user@domain or @domain".into())));
        assert_eq!(r.get().len(), 4);
        // No entries: never, not even forced.
        let tmp = push_body(&dir, "# nobody\n");
        assert!(matches!(r.push(&tmp, true, "x", &stats), Err(PushRefused::BadList(e)) if e.starts_with("no entries")));
        // Fewer than half: only forced.
        let tmp = push_body(&dir, "a@example.org\n");
        assert_eq!(r.push(&tmp, false, "x", &stats), Err(PushRefused::Shrink(1, 4)));
        assert!(tmp.exists() && !dir.join(PUSHED).exists());
        assert_eq!(r.push(&tmp, true, "x", &stats), Ok((1, 4)));
        assert!(!tmp.exists() && dir.join(PUSHED).exists());
        assert!(r.get().accepts("a@example.org") && !r.get().accepts("b@example.org"));
        assert_eq!(Source::of(stats.recipients_source.load(Relaxed)), Source::Push);
        assert_eq!(std::fs::read_to_string(&last).unwrap(), "a@example.org\n");
        // The file, older than the push, is not taken by the watcher...
        set_mtime(&p, 60);
        assert!(r.reload(&p, false, &stats).is_err());
        assert!(!r.get().accepts("b@example.org"));
        assert!(stats.recipients_kept.lock().unwrap().is_empty(), "not a warning");
        // ... nor at start; a crash's leftovers are removed.
        std::fs::write(dir.join(format!("{PUSH_TMP}3")), "junk").unwrap();
        let stats = crate::stats::Stats::new();
        let r = Recipients::start(Some(&p), &last, &stats);
        assert!(!r.get().accepts("b@example.org") && r.get().accepts("a@example.org"));
        assert_eq!(Source::of(stats.recipients_source.load(Relaxed)), Source::Push);
        assert!(!dir.join(format!("{PUSH_TMP}3")).exists());
        // SIGHUP takes the file whatever its age, and the push is done with.
        assert!(r.reload(&p, true, &stats).is_ok());
        assert!(r.get().accepts("b@example.org"));
        assert!(!dir.join(PUSHED).exists());
        let r = Recipients::start(Some(&p), &last, &crate::stats::Stats::new());
        assert!(r.get().accepts("b@example.org"));
        // A file edited after the push wins, at start too.
        let tmp = push_body(&dir, "a@example.org\nb@example.org\nx@example.org\n");
        assert!(r.push(&tmp, false, "x", &stats).is_ok());
        set_mtime(&dir.join(PUSHED), 60);
        std::fs::write(&p, "a@example.org\nb@example.org\nc@example.org\nd@example.org\n").unwrap();
        let stats = crate::stats::Stats::new();
        let r = Recipients::start(Some(&p), &last, &stats);
        assert!(r.get().accepts("d@example.org") && !r.get().accepts("x@example.org"));
        assert_eq!(Source::of(stats.recipients_source.load(Relaxed)), Source::File);
        assert!(!dir.join(PUSHED).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn push_without_a_file() {
        use std::sync::atomic::Ordering::Relaxed;
        let (_, last, dir) = start_dir("push-only");
        let stats = crate::stats::Stats::new();
        let r = Recipients::start(None, &last, &stats);
        assert!(!r.get().is_enabled() && r.get().accepts("anyone@example.org"));
        assert!(r.watch(std::sync::Arc::new(crate::stats::Stats::new())).is_ok() && !r.force_reload(), "no watcher");
        let tmp = push_body(&dir, "bob@example.org\n");
        assert_eq!(r.push(&tmp, false, "x", &stats), Ok((1, 0)));
        assert!(r.get().accepts("bob@example.org") && !r.get().accepts("anyone@example.org"));
        let stats = crate::stats::Stats::new();
        let r = Recipients::start(None, &last, &stats);
        assert!(r.get().accepts("bob@example.org") && !r.get().accepts("anyone@example.org"));
        assert_eq!(Source::of(stats.recipients_source.load(Relaxed)), Source::Push);
        assert!(stats.recipients_updated.load(Relaxed) > 0);
        // The pushed copy damaged: the last good list, never "everyone".
        std::fs::write(dir.join(PUSHED), "bob@exa\nmple").unwrap();
        let r = Recipients::start(None, &last, &crate::stats::Stats::new());
        assert!(r.get().accepts("bob@example.org") && !r.get().accepts("anyone@example.org"));
        std::fs::remove_file(&last).unwrap();
        let r = Recipients::start(None, &last, &crate::stats::Stats::new());
        assert!(r.get().is_enabled() && !r.get().is_usable());
        // The next push ends it, whatever its size.
        let tmp = push_body(&dir, "carol@example.org\n");
        assert!(r.push(&tmp, false, "x", &crate::stats::Stats::new()).is_ok());
        assert!(r.get().is_usable() && r.get().accepts("carol@example.org"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

}
