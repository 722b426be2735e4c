//! The relay's configuration: a TOML file, read once at start.
//!
//! Bartleby reads the subset of TOML a configuration needs (key = value,
//! `[table]` headers, strings, integers, booleans, arrays that may span
//! lines, comments) with its own small parser instead of serde + a TOML
//! crate: that keeps ~100 KiB out of a binary that must fit on a floppy, and
//! lets every error name the line and the key, the way an administrator
//! reading `bartleby check` output needs it ("bartleby.toml:7: ...").
//!
//! Unknown keys are errors, never ignored: a typo in `relay_domains` must not
//! silently turn the relay into something else.
//!
//! Role: the schema (which keys and tables exist, what each takes, the
//! checks across keys); the reader is `config/toml.rs`, the value types
//! `config/values.rs`. Touches only the one file it is given (read, never
//! written); init and the relay both load it through [`Config::load`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

mod toml;
pub mod values;

use toml::{Event, Item, Value, clip, parse_toml_with};
pub use toml::MAX_ARRAY_ITEMS;
pub use values::{Cidr, allowed, parse_duration, parse_fingerprint, parse_ip_port, parse_size, split_host_port, valid_domain};
use values::secs_duration;

/// Reads a configuration file: a regular file of at most [`MAX_CONFIG_BYTES`],
/// never blocking (see [`crate::util::read_small_file`]).
fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    crate::util::read_small_file(path, MAX_CONFIG_BYTES).map(|(b, _)| b).map_err(|e| {
        let hint = if e.to_string().starts_with("too large") { " (a configuration file is at most 1 MiB)" } else { "" };
        format!("cannot read: {e}{hint}")
    })
}

/// One configuration error, with the place it was found: the file, the
/// line (0: none, as for a missing key or an unreadable file), the key it
/// is about and its kind. Its text (Display) is `file:line: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    /// The key, as `table.key` (`network.address`); empty when the error is
    /// about no one key (the file cannot be read, a syntax error).
    pub key: String,
    pub kind: ErrorKind,
    pub message: String,
}

/// What kind of error a [`ConfigError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The file cannot be read: missing, not a regular file, too large.
    Read,
    /// Not the TOML this reader takes: bytes, syntax, an unknown table.
    Syntax,
    /// A key that is unknown, set twice, or not in this build.
    Key,
    /// A key's value is wrong (type, form, bounds).
    Value,
    /// A required key is missing.
    Missing,
    /// Keys fine one by one do not go together (a certificate without its
    /// key, a primary that is Bartleby itself).
    Conflict,
}

/// An error found before its file is known (the schema's checks).
struct Fault {
    kind: ErrorKind,
    key: String,
    line: usize,
    message: String,
}

impl Fault {
    fn new(kind: ErrorKind, key: &str, line: usize, message: impl Into<String>) -> Fault {
        Fault { kind, key: key.to_string(), line, message: message.into() }
    }

    fn in_file(self, file: &str) -> ConfigError {
        ConfigError { file: file.to_string(), line: self.line, key: self.key, kind: self.kind, message: self.message }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// What the relay does with a bare CR or LF inside message data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BareNewline {
    /// Treat it as a line end and store CRLF (Postfix's `normalize`).
    Normalize,
    /// Refuse the message with 550 5.5.2 (what the session sends; Postfix's
    /// smtpd_forbid_bare_newline = reject, with its reject code 550).
    Reject,
}

/// The `[status]` table: the LAN status page.
#[derive(Debug, Clone)]
pub struct StatusConfig {
    pub listen: Option<SocketAddr>,
    pub allow: Vec<Cidr>,
    /// Seconds between two accepted flushes from the page.
    pub flush_interval: Duration,
    /// Age after which the recipients list is reported stale: not taken
    /// from its source (the file, a push) for this long. 0: never stale.
    pub recipients_max_age: Duration,
    /// May replace the recipients list with `PUT /recipients` (with the
    /// token of `push_token_file`). Empty: push is off.
    pub push_allow: Vec<Cidr>,
    /// The file holding the push's bearer token (read for each push).
    pub push_token_file: Option<PathBuf>,
    /// Further names (lower case, no trailing dot) and IP addresses the page
    /// answers for besides `hostname` (DNS rebinding: see status/gate.rs).
    pub names: Vec<String>,
}

/// The `[network]` table: used only when Bartleby runs as PID 1 on the appliance.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    pub interface: Option<String>,
    /// `"dhcp"` or `address/prefix`.
    pub address: String,
    pub gateway: Option<String>,
    pub dns: Vec<String>,
    /// With DHCP: the address (`address/prefix`) used while no DHCP server
    /// answers; `None`: an IPv4 link-local address.
    pub fallback: Option<String>,
}

/// `[tls] primary`: TLS towards the primary, as Postfix's
/// smtp_tls_security_level (none, may, encrypt, verify).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsLevel {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered; in clear otherwise.
    May,
    /// STARTTLS or defer: never in clear; any certificate.
    Encrypt,
    /// STARTTLS with a certificate that `ca_file` vouches for (and the host
    /// name), or whose SHA-256 is `primary_fingerprint`; else defer.
    Verify,
}

/// The `[tls]` table (absent: no TLS either way, as before).
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// A `[tls]` table was written (a build without TLS refuses it).
    pub present: bool,
    /// PEM chain offered with STARTTLS (Postfix's smtpd_tls_cert_file).
    pub certificate: Option<PathBuf>,
    /// PEM private key (smtpd_tls_key_file).
    pub key: Option<PathBuf>,
    /// smtp_tls_security_level towards the primary; "may" with a `[tls]`
    /// table, "none" without.
    pub primary: TlsLevel,
    /// Trust anchors for the primary's certificate (smtp_tls_CAfile).
    pub ca_file: Option<PathBuf>,
    /// SHA-256 of the primary's leaf certificate (smtp_tls_fingerprint_cert_match
    /// with smtp_tls_fingerprint_digest = sha256).
    pub primary_fingerprint: Option<[u8; 32]>,
}

/// `[network] address`/`fallback`: an IPv4 address with its prefix, as
/// netcfg applies it (`shape` names what else the key takes, for the error).
fn want_ipv4_prefix(s: &str, shape: &str) -> Result<(), String> {
    if !s.contains('/') {
        return Err(format!("`{s}` must be {shape} like \"192.168.1.20/24\""));
    }
    values::parse_ipv4_prefix(s).map(|_| ())
}

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub hostname: String,
    pub listen: Vec<SocketAddr>,
    pub spool: PathBuf,
    pub relay_domains: Vec<String>,
    /// `host:port` of the primary MX (name or address): the first of
    /// `primary_list`, or `"mx"` when mail is routed by MX records.
    pub primary: String,
    /// Every `host:port` of `primary`, tried in order (empty with `"mx"`).
    pub primary_list: Vec<String>,
    /// Further names of this host in MX records besides `hostname`
    /// (lower case, no trailing dot): RFC 5321 5.1 drops them and every
    /// host not more preferred.
    pub my_names: Vec<String>,
    /// The port of MX hosts (Postfix's smtp_tcp_port), 25.
    pub smtp_tcp_port: u16,
    pub recipients: Option<PathBuf>,
    pub max_message_size: u64,
    pub max_connections: usize,
    pub max_recipients: usize,
    pub queue_run_interval: Duration,
    pub minimal_backoff: Duration,
    pub maximal_backoff: Duration,
    pub max_queue_lifetime: Duration,
    /// Empty means "the primary's addresses", resolved at start.
    pub etrn_allow: Vec<Cidr>,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub max_line_length: usize,
    pub error_limit: u32,
    pub max_received_headers: u32,
    /// Bytes per second a client must average in DATA beyond the first
    /// `data_timeout` (after Postfix's smtpd_min_data_rate, which applies only
    /// with its per-request deadlines; here always); 0: no such limit.
    pub min_data_rate: u64,
    /// Free space the spool keeps in reserve; MAIL gets 452 below it.
    pub min_free_space: u64,
    pub max_queue_messages: usize,
    pub bare_newline: BareNewline,
    pub delivery_timeout: Duration,
    pub connect_timeout: Duration,
    /// Parallel connections to the primary during a queue run.
    pub delivery_connections: usize,
    pub log_file: Option<PathBuf>,
    pub log_level: log::LevelFilter,
    /// The timestamp of log lines: syslog's (default) or RFC 3339.
    pub log_format: crate::logging::Format,
    /// A syslog server on the LAN that gets every log line (UDP, RFC 3164).
    pub log_host: Option<SocketAddr>,
    pub status: StatusConfig,
    pub network: NetworkConfig,
    /// Sessions one client (an IPv4 address or an IPv6 /64) may hold at
    /// once; 0 = no limit. Default: half of `max_connections`, at least 1.
    pub smtpd_client_connection_count_limit: usize,
    /// Percent of `max_queue_messages` one client's mail may fill; 0 = no limit.
    pub smtpd_client_queue_share: u32,
    /// MAIL commands one client may send per `anvil_rate_time_unit`; 0 = no limit.
    pub smtpd_client_message_rate_limit: u32,
    pub anvil_rate_time_unit: Duration,
    /// Ask the primary whether a recipient exists (see [`crate::verify`]).
    pub verify_recipients: bool,
    /// Longest a session waits for the primary's answer to one probe.
    pub verify_timeout: Duration,
    pub verify_positive_ttl: Duration,
    pub verify_negative_ttl: Duration,
    /// What a never-seen address gets while the primary cannot be asked.
    pub verify_unknown: VerifyUnknown,
    /// Entries in the verification cache (a quarter at most negative).
    pub verify_cache_size: usize,
    /// Send a delay warning (one per message) after this long in the
    /// queue, to recipients without NOTIFY; 0 = only for NOTIFY=DELAY
    /// (Postfix's delay_warning_time, off by default).
    pub delay_warning_time: Duration,
    /// Largest original returned whole in a bounce (RET=FULL); a larger
    /// one is returned as its headers (Postfix's bounce_size_limit).
    pub bounce_size_limit: u64,
    /// STARTTLS in and out (see [`crate::tls`]).
    pub tls: TlsConfig,
}

/// `verify_unknown`: queue the mail, or answer 450 4.1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyUnknown {
    Accept,
    Defer,
}

impl Config {
    /// Reads and validates a configuration file. Only a regular file of at
    /// most [`MAX_CONFIG_BYTES`] is read; it is opened non-blocking, so a FIFO
    /// at the path is refused instead of hanging the start (or PID 1).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = read_file(path).map_err(|message| Fault::new(ErrorKind::Read, "", 0, message).in_file(&path.display().to_string()))?;
        Config::parse_bytes(&bytes, path)
    }

    /// Parses the bytes of a configuration file: UTF-8 (an invalid byte is
    /// refused with its line), a leading BOM skipped.
    pub fn parse_bytes(bytes: &[u8], path: &Path) -> Result<Config, ConfigError> {
        let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let good = &bytes[..e.valid_up_to()];
            let line = 1 + good.iter().filter(|&&b| b == b'\n').count();
            let column = 1 + good.iter().rev().take_while(|&&b| b != b'\n').count();
            let message = format!("byte 0x{:02X} (column {column}) is not valid UTF-8; save the file as UTF-8", bytes[e.valid_up_to()]);
            Fault::new(ErrorKind::Syntax, "", line, message).in_file(&path.display().to_string())
        })?;
        Config::parse(text, path)
    }

    /// Parses configuration text; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let mut b = Builder::new(path);
        // The schema's error, kept whole while the reader stops on it.
        let mut fault = None;
        parse_toml_with(text, |ev| {
            let f = match ev {
                Event::Table(name, line) => known_table(name).map_err(|(kind, m)| Fault::new(kind, "", line, m)),
                Event::Item(it) => b.set(&it),
            };
            f.map_err(|f| (f.line, fault.insert(f).message.clone()))
        })
        .map_err(|(line, message)| fault.take().unwrap_or_else(|| Fault::new(ErrorKind::Syntax, "", line, message)).in_file(&file))?;
        b.finish().map_err(|f| f.in_file(&file))
    }

    /// True when `domain` (any case, U-labels or A-labels) is one of
    /// `relay_domains`. A name that is not a valid domain never is.
    pub fn is_relay_domain(&self, domain: &str) -> bool {
        // `relay_domains` holds checked lower-case A-labels: an ASCII domain
        // compares as it is, with no allocation (this runs for every RCPT).
        if domain.is_ascii() {
            return self.relay_domains.iter().any(|d| d.eq_ignore_ascii_case(domain));
        }
        match crate::punycode::to_ascii(domain) {
            Some(a) => self.relay_domains.contains(&a),
            None => false,
        }
    }
}

/// A `[tls]` table in a build without the `tls` feature.
const NO_TLS: &str = "[tls]: this build of Bartleby has no TLS (built without the `tls` feature, as the floppy image may be): \
                      remove the [tls] table, or run the disk or CD image";
/// The tables a configuration may have.
const TABLES: [&str; 3] = ["status", "network", "tls"];

/// A `[table]` header the schema knows (and this build has).
fn known_table(name: &str) -> Result<(), (ErrorKind, String)> {
    if !TABLES.contains(&name) {
        return Err((ErrorKind::Syntax, format!("unknown table `[{name}]` (known: [status], [network], [tls])")));
    }
    if name == "tls" && !cfg!(feature = "tls") {
        return Err((ErrorKind::Key, NO_TLS.into()));
    }
    Ok(())
}

/// Largest configuration file read: far more than any real configuration
/// (the example is 1.5 KiB), small enough to read whole on a 16 MB machine.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
struct Builder {
    c: Config,
    seen: Vec<(String, usize)>,
}

fn want_str(v: &Value) -> Result<&str, String> {
    match v {
        Value::Str(s) => Ok(s),
        other => Err(format!("must be a string, found {}", other.kind())),
    }
}

fn want_strs(v: &Value) -> Result<Vec<&str>, String> {
    match v {
        Value::Array(a) => a.iter().map(want_str).collect(),
        Value::Str(s) => Ok(vec![s.as_str()]),
        other => Err(format!("must be an array of strings, found {}", other.kind())),
    }
}

fn want_uint(v: &Value) -> Result<u64, String> {
    match v {
        Value::Int(n) if *n >= 0 => Ok(*n as u64),
        Value::Int(_) => Err("must not be negative".into()),
        Value::Str(s) => parse_size(s),
        other => Err(format!("must be a number, found {}", other.kind())),
    }
}

/// Largest `max_message_size`: 1 GiB. SIZE (RFC 1870) is a plain decimal
/// and Postfix's message_size_limit has no cap of its own, but a message is
/// spooled and sent whole: 1 GiB is 40 times what the big mail services take
/// (25 to 50 MB), keeps twice the size (the default `min_free_space`) and
/// every offset well inside 32 bits signed, and a typo like "10G" (a 10 GiB
/// DATA held open for hours) is refused rather than advertised.
pub const MAX_MESSAGE_SIZE: u64 = 1 << 30;
/// Largest `max_line_length`: 64 KiB. The session holds one command line in
/// memory per connection (up to `max_connections` at once): 64 KiB is 128
/// times RFC 5321's 512-octet command line and 32 times Postfix's
/// line_length_limit default (2048), while 20 sessions at the limit stay at
/// 1.25 MiB, inside the 4 MiB the relay lives in.
pub const MAX_LINE_LENGTH: u64 = 64 * 1024;

/// A number in `lo..=hi`, checked as u64 before any narrowing: on the i486
/// build `usize` is 32 bits, and `4294967297 as usize` is 1.
fn want_range(v: &Value, lo: u64, hi: u64, hi_text: &str) -> Result<u64, String> {
    let n = want_uint(v)?;
    if n > hi {
        return Err(format!("must be at most {hi}{hi_text}"));
    }
    if n < lo {
        return Err(format!("must be at least {lo}"));
    }
    Ok(n)
}

fn to_usize(n: u64) -> Result<usize, String> {
    usize::try_from(n).map_err(|_| format!("{n} does not fit this machine's word size"))
}

fn to_u32(n: u64) -> Result<u32, String> {
    u32::try_from(n).map_err(|_| format!("{n} is too large"))
}

/// A duration of at most `max` seconds (`max_text` says it the admin's way).
fn want_duration_max(v: &Value, max: u64, max_text: &str) -> Result<Duration, String> {
    let d = want_duration(v)?;
    if d.as_secs() > max {
        return Err(format!("must be at most {max_text}"));
    }
    Ok(d)
}

/// An absolute path, not `/` itself, without control characters (a NUL
/// written as `\u0000` could not reach open(2)).
fn want_path(v: &Value) -> Result<PathBuf, String> {
    let s = want_str(v)?;
    if s.is_empty() {
        return Err("must be an absolute path (like \"/var/spool/bartleby\"), not empty".into());
    }
    if s.contains(|c: char| c.is_control()) {
        return Err(format!("must not contain control characters: `{}`", clip(s)));
    }
    if !s.starts_with('/') {
        return Err(format!("must be an absolute path, not `{s}` (write it from the root, like \"/{s}\")"));
    }
    if s.trim_end_matches('/').is_empty() {
        return Err(format!("must be a directory of its own, not the root `{s}`"));
    }
    Ok(PathBuf::from(s))
}

/// An absolute path, or "" for none.
/// `log_host`: an IP address with an optional port (514 by default):
/// `192.168.1.5`, `192.168.1.5:514`, `[fe80::1]:514`, `fe80::1`. No name:
/// it would need a DNS lookup before every start, and the appliance logs
/// before its network is up.
fn parse_log_host(s: &str) -> Result<SocketAddr, String> {
    parse_ip_port(s, 514).ok_or_else(|| format!("`{}` is not an IP address with an optional port (like \"192.168.1.5:514\")", clip(s)))
}

fn want_opt_path(v: &Value) -> Result<Option<PathBuf>, String> {
    match v {
        Value::Str(s) if s.is_empty() => Ok(None),
        _ => want_path(v).map(Some),
    }
}

fn want_duration(v: &Value) -> Result<Duration, String> {
    match v {
        Value::Int(n) if *n >= 0 => secs_duration(*n as u64, &n.to_string()),
        Value::Str(s) => parse_duration(s),
        other => Err(format!("must be a duration like \"30m\", found {}", other.kind())),
    }
}

#[allow(dead_code)]
fn want_bool(v: &Value) -> Result<bool, String> {
    match v {
        Value::Bool(b) => Ok(*b),
        other => Err(format!("must be true or false, found {}", other.kind())),
    }
}

fn want_cidrs(v: &Value) -> Result<Vec<Cidr>, String> {
    want_strs(v)?.into_iter().map(Cidr::parse).collect()
}

fn want_addrs(v: &Value) -> Result<Vec<SocketAddr>, String> {
    want_strs(v)?
        .into_iter()
        .map(|s| values::parse_socket_addr(s).ok_or_else(|| format!("`{s}` is not an address:port (like \"0.0.0.0:25\" or \"[::]:25\")")))
        .collect()
}

/// The keys, by group: each function sets the keys it knows (`Ok(true)`)
/// and leaves the others (`Ok(false)`). A new key goes into its group's
/// `match`, before the `_` arm.
type SetKey = fn(&mut Config, &Item) -> Result<bool, String>;
const KEYS: [SetKey; 8] = [site, limits, queue, logging, verify, status, network, tls_table];

/// The error for a key no group knows.
fn unknown_key(it: &Item, full: &str) -> String {
    match (it.table.as_str(), it.key.as_str()) {
        ("", "status") | ("", "network") | ("", "tls") => format!("`{}` is a table: write it as [{}]", it.key, it.key),
        ("", k) => format!("unknown key `{k}`"),
        ("status", _) | ("network", _) | ("tls", _) => format!("unknown key `{full}`"),
        (t, _) => format!("unknown table `[{t}]`"),
    }
}

/// The host and where mail goes: `hostname`, `listen`, `spool`, `relay_domains`,
/// `primary`, `recipients`, `my_names`, `smtp_tcp_port`.
fn site(c: &mut Config, it: &Item) -> Result<bool, String> {
    let v = &it.value;
    let r: Result<(), String> = match (it.table.as_str(), it.key.as_str()) {
        ("", "hostname") => {
            let h = want_str(v)?;
            if !valid_domain(h) {
                return Err(format!("hostname: `{h}` is not a valid host name"));
            }
            c.hostname = h.to_ascii_lowercase();
            Ok(())
        }
        ("", "listen") => want_addrs(v).map(|a| c.listen = a),
        ("", "spool") => want_path(v).map(|p| c.spool = p),
        ("", "relay_domains") => {
            let mut out = Vec::new();
            for d in want_strs(v)? {
                let d = d.trim_end_matches('.');
                // U-labels or A-labels: kept in ASCII form (A-labels),
                // which is how every domain is compared.
                match crate::punycode::to_ascii(d).filter(|a| valid_domain(a)) {
                    Some(a) => out.push(a),
                    None => return Err(format!("relay_domains: `{d}` is not a valid domain name")),
                }
            }
            c.relay_domains = out;
            Ok(())
        }
        ("", "primary") => {
            let list = want_strs(v)?;
            if list.len() == 1 && list[0].eq_ignore_ascii_case("mx") {
                c.primary = "mx".into();
                c.primary_list.clear();
                return Ok(true);
            }
            if list.is_empty() {
                return Err("must name at least one host:port, or be \"mx\"".into());
            }
            if list.len() > 8 {
                return Err(format!("at most 8 hosts, found {}", list.len()));
            }
            for p in &list {
                split_host_port(p)?;
            }
            c.primary = list[0].to_string();
            c.primary_list = list.iter().map(|p| p.to_string()).collect();
            Ok(())
        }
        ("", "recipients") => want_opt_path(v).map(|p| c.recipients = p),
        ("", "my_names") => {
            let mut out = Vec::new();
            for n in want_strs(v)? {
                let n = n.trim_end_matches('.');
                if !valid_domain(n) {
                    return Err(format!("my_names: `{n}` is not a valid host name"));
                }
                out.push(n.to_ascii_lowercase());
            }
            c.my_names = out;
            Ok(())
        }
        ("", "smtp_tcp_port") => want_range(v, 1, 65535, "").map(|n| c.smtp_tcp_port = n as u16),
        _ => return Ok(false),
    };
    r.map(|()| true)
}

/// What one client and one message may use: sizes, counts, rates, bare newlines.
fn limits(c: &mut Config, it: &Item) -> Result<bool, String> {
    let v = &it.value;
    let r: Result<(), String> = match (it.table.as_str(), it.key.as_str()) {
        ("", "max_message_size") => want_range(v, 0, MAX_MESSAGE_SIZE, " (1G)").map(|n| c.max_message_size = n),
        ("", "max_connections") => want_range(v, 1, 10_000, "").and_then(to_usize).map(|n| c.max_connections = n),
        ("", "max_recipients") => want_range(v, 0, 1000, "").and_then(to_usize).map(|n| c.max_recipients = n),
        ("", "max_line_length") => want_range(v, 0, MAX_LINE_LENGTH, " (64k)").and_then(to_usize).map(|n| c.max_line_length = n),
        ("", "error_limit") => want_range(v, 0, 1000, "").and_then(to_u32).map(|n| c.error_limit = n),
        ("", "min_data_rate") => want_range(v, 0, 1 << 30, " (1G)").map(|n| c.min_data_rate = n),
        ("", "max_received_headers") => want_range(v, 1, 1000, "").and_then(to_u32).map(|n| c.max_received_headers = n),
        ("", "min_free_space") => want_range(v, 0, 1 << 50, " (1048576G, 1 PiB)").map(|n| c.min_free_space = n),
        ("", "max_queue_messages") => want_range(v, 0, 100_000, "").and_then(to_usize).map(|n| c.max_queue_messages = n),
        ("", "bare_newline") => match want_str(v)? {
            "normalize" => {
                c.bare_newline = BareNewline::Normalize;
                Ok(())
            }
            "reject" => {
                c.bare_newline = BareNewline::Reject;
                Ok(())
            }
            o => Err(format!("`{o}` must be \"normalize\" or \"reject\"")),
        },
        ("", "smtpd_client_connection_count_limit") => match want_uint(v)? {
            n @ 0..=10_000 => {
                c.smtpd_client_connection_count_limit = n as usize;
                Ok(())
            }
            _ => Err("must be 0 (no limit) to 10000".into()),
        },
        ("", "smtpd_client_queue_share") => match want_uint(v)? {
            n @ 0..=100 => {
                c.smtpd_client_queue_share = n as u32;
                Ok(())
            }
            _ => Err("must be a percentage of max_queue_messages, 0 (no limit) to 100".into()),
        },
        ("", "smtpd_client_message_rate_limit") => match want_uint(v)? {
            n @ 0..=1_000_000 => {
                c.smtpd_client_message_rate_limit = n as u32;
                Ok(())
            }
            _ => Err("must be 0 (no limit) to 1000000".into()),
        },
        ("", "anvil_rate_time_unit") => {
            let d = want_duration(v)?;
            if d.is_zero() || d.as_secs() > 86400 {
                return Err("must be 1s to 1d".into());
            }
            c.anvil_rate_time_unit = d;
            Ok(())
        }
        _ => return Ok(false),
    };
    r.map(|()| true)
}

/// The queue and the delivery client: timers, backoff, lifetime, ETRN, connections, bounces.
fn queue(c: &mut Config, it: &Item) -> Result<bool, String> {
    let v = &it.value;
    let r: Result<(), String> = match (it.table.as_str(), it.key.as_str()) {
        ("", "queue_run_interval") => want_duration_max(v, 86400, "1d").map(|d| c.queue_run_interval = d),
        ("", "minimal_backoff") => want_duration(v).map(|d| c.minimal_backoff = d),
        ("", "maximal_backoff") => want_duration(v).map(|d| c.maximal_backoff = d),
        ("", "max_queue_lifetime") => want_duration_max(v, 100 * 86400, "100d").map(|d| c.max_queue_lifetime = d),
        ("", "etrn_allow") => want_cidrs(v).map(|a| c.etrn_allow = a),
        ("", "command_timeout") => want_duration_max(v, 3600, "1h").map(|d| c.command_timeout = d),
        ("", "data_timeout") => want_duration_max(v, 3600, "1h").map(|d| c.data_timeout = d),
        ("", "delivery_timeout") => want_duration_max(v, 3600, "1h").map(|d| c.delivery_timeout = d),
        ("", "connect_timeout") => want_duration_max(v, 600, "10m").map(|d| c.connect_timeout = d),
        ("", "delivery_connections") => want_range(v, 1, 64, "").and_then(to_usize).map(|n| c.delivery_connections = n),
        ("", "delay_warning_time") => want_duration_max(v, 100 * 86400, "100d").map(|d| c.delay_warning_time = d),
        ("", "bounce_size_limit") => want_range(v, 0, MAX_MESSAGE_SIZE, " (1G)").map(|n| c.bounce_size_limit = n),
        _ => return Ok(false),
    };
    r.map(|()| true)
}

/// `log_file`, `log_level`, `log_format`, `log_host`.
fn logging(c: &mut Config, it: &Item) -> Result<bool, String> {
    let v = &it.value;
    let r: Result<(), String> = match (it.table.as_str(), it.key.as_str()) {
        ("", "log_file") => want_opt_path(v).map(|p| c.log_file = p),
        ("", "log_level") => {
            use log::LevelFilter as L;
            let level = match want_str(v)?.to_ascii_lowercase().as_str() {
                "error" => L::Error,
                "warn" => L::Warn,
                "info" => L::Info,
                "debug" => L::Debug,
                "trace" => L::Trace,
                o => return Err(format!("`{o}` must be error, warn, info, debug or trace")),
            };
            c.log_level = level;
            Ok(())
        }
        ("", "log_format") => match want_str(v)? {
            "syslog" => {
                c.log_format = crate::logging::Format::Syslog;
                Ok(())
            }
            "iso" => {
                c.log_format = crate::logging::Format::Iso;
                Ok(())
            }
            o => Err(format!("`{}` must be \"syslog\" or \"iso\"", clip(o))),
        },
        ("", "log_host") => {
            let s = want_str(v)?;
            if s.is_empty() {
                c.log_host = None;
                return Ok(true);
            }
            c.log_host = Some(parse_log_host(s)?);
            Ok(())
        }
        _ => return Ok(false),
    };
    r.map(|()| true)
}

/// Recipient verification: `verify_*`.
fn verify(c: &mut Config, it: &Item) -> Result<bool, String> {
    let v = &it.value;
    let r: Result<(), String> = match (it.table.as_str(), it.key.as_str()) {
        ("", "verify_recipients") => want_bool(v).map(|b| c.verify_recipients = b),
        ("", "verify_timeout") => {
            let d = want_duration_max(v, 600, "10m")?;
            if d.is_zero() {
                return Err("must be more than 0".into());
            }
            c.verify_timeout = d;
            Ok(())
        }
        ("", "verify_positive_ttl") | ("", "verify_negative_ttl") => {
            let d = want_duration_max(v, 365 * 86400, "365d")?;
            if d.as_secs() < 1 {
                return Err("must be at least 1s".into());
            }
            if it.key == "verify_positive_ttl" {
                c.verify_positive_ttl = d;
            } else {
                c.verify_negative_ttl = d;
            }
            Ok(())
        }
        ("", "verify_unknown") => match want_str(v)? {
            "accept" => {
                c.verify_unknown = VerifyUnknown::Accept;
                Ok(())
            }
            "defer" => {
                c.verify_unknown = VerifyUnknown::Defer;
                Ok(())
            }
            o => Err(format!("`{}` must be \"accept\" or \"defer\"", clip(o))),
        },
        ("", "verify_cache_size") => want_range(v, 100, 50_000, "").and_then(to_usize).map(|n| c.verify_cache_size = n),
        _ => return Ok(false),
    };
    r.map(|()| true)
}

/// The `[status]` table: the page, its gate and pushes.
fn status(c: &mut Config, it: &Item) -> Result<bool, String> {
    let v = &it.value;
    let r: Result<(), String> = match (it.table.as_str(), it.key.as_str()) {
        ("status", "listen") => {
            let s = want_str(v)?;
            if s.is_empty() {
                c.status.listen = None;
                Ok(())
            } else {
                values::parse_socket_addr(s)
                    .map(|a| c.status.listen = Some(a))
                    .ok_or_else(|| format!("`{s}` is not an address:port (like \"0.0.0.0:80\")"))
            }
        }
        ("status", "allow") => want_cidrs(v).map(|a| c.status.allow = a),
        ("status", "flush_interval") => want_duration(v).map(|d| c.status.flush_interval = d),
        ("status", "recipients_max_age") => want_duration(v).map(|d| c.status.recipients_max_age = d),
        ("status", "names") => {
            let mut out = Vec::new();
            for n in want_strs(v)? {
                let bare = n.strip_prefix('[').and_then(|x| x.strip_suffix(']')).unwrap_or(n);
                if let Ok(ip) = bare.parse::<IpAddr>() {
                    out.push(ip.to_canonical().to_string());
                    continue;
                }
                let name = n.strip_suffix('.').unwrap_or(n);
                if !valid_domain(name) {
                    return Err(format!("`{n}` is not a host name or an IP address"));
                }
                out.push(name.to_ascii_lowercase());
            }
            c.status.names = out;
            Ok(())
        }
        ("status", "push_allow") => want_cidrs(v).map(|a| c.status.push_allow = a),
        ("status", "push_token_file") => want_opt_path(v).map(|p| c.status.push_token_file = p),
        _ => return Ok(false),
    };
    r.map(|()| true)
}

/// The `[network]` table (PID 1 only).
fn network(c: &mut Config, it: &Item) -> Result<bool, String> {
    let v = &it.value;
    let r: Result<(), String> = match (it.table.as_str(), it.key.as_str()) {
        ("network", "interface") => {
            // IFNAMSIZ is 16 with the NUL; a name is never empty and has no `/` or blank
            // (ASCII only here)
            let s = want_str(v)?;
            if s.is_empty() || s.len() > 15 || !s.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
                return Err(format!("`{}` is not an interface name (like \"eth0\": 1 to 15 characters)", clip(s)));
            }
            c.network.interface = Some(s.to_string());
            Ok(())
        }
        ("network", "address") => {
            let s = want_str(v)?;
            // netcfg does DHCP or a static IPv4 address: what passes here works there
            let s = if s.eq_ignore_ascii_case("dhcp") { "dhcp" } else { s };
            if s != "dhcp" {
                want_ipv4_prefix(s, "\"dhcp\" or address/prefix")?;
            }
            c.network.address = s.to_string();
            Ok(())
        }
        ("network", "gateway") => {
            let s = want_str(v)?;
            // netcfg sets an IPv4 default route; IPv6 comes from router advertisements
            s.parse::<Ipv4Addr>().map_err(|_| format!("`{s}` is not an IPv4 address"))?;
            c.network.gateway = Some(s.to_string());
            Ok(())
        }
        ("network", "dns") => {
            let mut out = Vec::new();
            for s in want_strs(v)? {
                crate::dns::parse_server(s).ok_or_else(|| format!("`{s}` is not an IP address (with an optional :port)"))?;
                out.push(s.to_string());
            }
            c.network.dns = out;
            Ok(())
        }
        ("network", "fallback") => {
            // used only with address = "dhcp", while no DHCP server answers
            let s = want_str(v)?;
            want_ipv4_prefix(s, "address/prefix")?;
            c.network.fallback = Some(s.to_string());
            Ok(())
        }
        _ => return Ok(false),
    };
    r.map(|()| true)
}

/// The `[tls]` table.
fn tls_table(c: &mut Config, it: &Item) -> Result<bool, String> {
    let v = &it.value;
    let r: Result<(), String> = match (it.table.as_str(), it.key.as_str()) {
        ("tls", "certificate") => want_opt_path(v).map(|p| c.tls.certificate = p),
        ("tls", "key") => want_opt_path(v).map(|p| c.tls.key = p),
        ("tls", "ca_file") => want_opt_path(v).map(|p| c.tls.ca_file = p),
        ("tls", "primary") => {
            c.tls.primary = match want_str(v)? {
                "none" => TlsLevel::None,
                "may" => TlsLevel::May,
                "encrypt" => TlsLevel::Encrypt,
                "verify" => TlsLevel::Verify,
                o => return Err(format!("`{}` must be \"none\", \"may\", \"encrypt\" or \"verify\"", clip(o))),
            };
            Ok(())
        }
        ("tls", "primary_fingerprint") => {
            let s = want_str(v)?;
            c.tls.primary_fingerprint = if s.is_empty() { None } else { Some(parse_fingerprint(s)?) };
            Ok(())
        }
        _ => return Ok(false),
    };
    r.map(|()| true)
}

impl Builder {
    fn new(path: &Path) -> Builder {
        let c = Config {
            path: path.to_path_buf(),
            hostname: String::new(),
            listen: vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 25)],
            spool: PathBuf::from("/var/spool/bartleby"),
            relay_domains: Vec::new(),
            primary: String::new(),
            primary_list: Vec::new(),
            my_names: Vec::new(),
            smtp_tcp_port: 25,
            recipients: None,
            max_message_size: 10_240_000,
            max_connections: 20,
            max_recipients: 100,
            queue_run_interval: Duration::from_secs(30 * 60),
            minimal_backoff: Duration::from_secs(5 * 60),
            maximal_backoff: Duration::from_secs(3600),
            max_queue_lifetime: Duration::from_secs(5 * 86400),
            etrn_allow: Vec::new(),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            max_line_length: 2048,
            error_limit: 20,
            max_received_headers: 50,
            min_data_rate: 500,
            min_free_space: 0,
            max_queue_messages: 10_000,
            bare_newline: BareNewline::Normalize,
            delivery_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(30),
            delivery_connections: 4,
            log_file: None,
            log_level: log::LevelFilter::Info,
            log_format: crate::logging::Format::Syslog,
            log_host: None,
            status: StatusConfig {
                listen: None,
                allow: vec![Cidr::parse("127.0.0.1/32").unwrap(), Cidr::parse("::1/128").unwrap()],
                flush_interval: Duration::from_secs(10),
                recipients_max_age: Duration::from_secs(7 * 86400),
                names: Vec::new(),
                push_allow: Vec::new(),
                push_token_file: None,
            },
            network: NetworkConfig { interface: None, address: "dhcp".into(), gateway: None, dns: Vec::new(), fallback: None },
            smtpd_client_connection_count_limit: 0, // see finish()
            smtpd_client_queue_share: 25,
            smtpd_client_message_rate_limit: 0,
            anvil_rate_time_unit: Duration::from_secs(60),
            verify_recipients: false,
            verify_timeout: Duration::from_secs(10),
            verify_positive_ttl: Duration::from_secs(31 * 86400),
            verify_negative_ttl: Duration::from_secs(3 * 86400),
            verify_unknown: VerifyUnknown::Accept,
            verify_cache_size: 2000,
            delay_warning_time: Duration::ZERO,
            bounce_size_limit: 50_000,
            tls: TlsConfig { present: false, certificate: None, key: None, primary: TlsLevel::None, ca_file: None, primary_fingerprint: None },
        };
        Builder { c, seen: Vec::new() }
    }

    fn set(&mut self, it: &Item) -> Result<(), Fault> {
        let full = if it.table.is_empty() { it.key.clone() } else { format!("{}.{}", it.table, it.key) };
        // `seen` holds only keys set successfully: at most the known keys
        if self.seen.iter().any(|(k, _)| *k == full) {
            return Err(Fault::new(ErrorKind::Key, &full, it.line, format!("`{}` is set twice", it.key)));
        }
        // One function per group of keys (see KEYS); the first that knows
        // the key sets it.
        let mut r = Err(Fault::new(ErrorKind::Key, &full, it.line, unknown_key(it, &full)));
        for group in KEYS {
            match group(&mut self.c, it) {
                Ok(false) => continue,
                Ok(true) => r = Ok(()),
                Err(e) => r = Err(Fault::new(ErrorKind::Value, &full, it.line, e)),
            }
            break;
        }
        let key_tick = format!("`{}`", it.key);
        r.map_err(|mut f| {
            let e = &f.message;
            if !(e.starts_with("unknown") || e.starts_with(&full) || e.starts_with(&key_tick)) {
                f.message = format!("{full}: {e}");
            }
            f
        })?;
        self.seen.push((full, it.line));
        Ok(())
    }

    /// An error about `key`, at the line that set it (0: not set).
    fn fault(&self, kind: ErrorKind, key: &str, message: impl Into<String>) -> Fault {
        Fault::new(kind, key, self.line_of(key), message)
    }

    fn line_of(&self, key: &str) -> usize {
        self.seen.iter().find(|(k, _)| k == key).map(|(_, l)| *l).unwrap_or(0)
    }

    /// The checks that need the whole file, then the defaults that depend
    /// on other keys; an error names the line of the key it is about (0:
    /// a key that is missing).
    fn finish(mut self) -> Result<Config, Fault> {
        self.required()?;
        self.bounds()?;
        if self.line_of("smtpd_client_connection_count_limit") == 0 {
            // Not set: one client may take half the sessions, so one address
            // can never lock everyone else out.
            self.c.smtpd_client_connection_count_limit = (self.c.max_connections / 2).max(1);
        }
        if !self.c.status.push_allow.is_empty() && self.c.status.push_token_file.is_none() {
            return Err(self.fault(
                ErrorKind::Conflict,
                "status.push_allow",
                "`status.push_allow` needs `status.push_token_file`: a file holding the token the primary sends (Authorization: Bearer)",
            ));
        }
        self.tls()?;
        if let Some(e) = self_loop(&self.c) {
            return Err(self.fault(ErrorKind::Conflict, "primary", e));
        }
        let c = &mut self.c;
        if c.min_free_space == 0 {
            // Room for a few messages in flight plus the logs, like Postfix's
            // queue_minfree advice (at least 1.5 x message_size_limit).
            c.min_free_space = c.max_message_size.saturating_mul(2).max(4 * 1024 * 1024);
        }
        Ok(self.c)
    }

    /// The keys without a default.
    fn required(&self) -> Result<(), Fault> {
        let c = &self.c;
        if c.hostname.is_empty() {
            return Err(Fault::new(ErrorKind::Missing, "hostname", 0, "`hostname` is required (the EHLO name, like \"backup.example.org\")"));
        }
        if c.relay_domains.is_empty() {
            return Err(Fault::new(ErrorKind::Missing, "relay_domains", 0, "`relay_domains` is required: the domains this backup MX accepts mail for"));
        }
        if c.primary.is_empty() {
            return Err(Fault::new(ErrorKind::Missing, "primary", 0, "`primary` is required: host:port of the primary mail server"));
        }
        if c.listen.is_empty() {
            return Err(self.fault(ErrorKind::Value, "listen", "`listen` must name at least one address"));
        }
        Ok(())
    }

    /// Lower bounds (RFC 5321's minimums among them) and relations between keys.
    fn bounds(&self) -> Result<(), Fault> {
        let c = &self.c;
        let checks: [(&str, bool, &str); 13] = [
            ("error_limit", c.error_limit >= 1, "must be at least 1"),
            ("max_queue_messages", c.max_queue_messages >= 1, "must be at least 1"),
            ("max_message_size", c.max_message_size >= 65536, "must be at least 65536 (RFC 5321 4.5.3.1.7)"),
            ("max_connections", (1..=10_000).contains(&c.max_connections), "must be 1 to 10000"),
            ("max_recipients", c.max_recipients >= 100, "must be at least 100 (RFC 5321 4.5.3.1.8)"),
            ("minimal_backoff", !c.minimal_backoff.is_zero(), "must be more than 0"),
            ("maximal_backoff", c.maximal_backoff >= c.minimal_backoff, "must not be less than minimal_backoff"),
            ("queue_run_interval", !c.queue_run_interval.is_zero(), "must be more than 0"),
            ("max_line_length", c.max_line_length >= 512, "must be at least 512 (RFC 5321 4.5.3.1.4)"),
            // A zero timeout would end every session or delivery at once.
            ("command_timeout", !c.command_timeout.is_zero(), "must be more than 0"),
            ("data_timeout", !c.data_timeout.is_zero(), "must be more than 0"),
            ("delivery_timeout", !c.delivery_timeout.is_zero(), "must be more than 0"),
            ("connect_timeout", !c.connect_timeout.is_zero(), "must be more than 0"),
        ];
        for (key, ok, why) in checks {
            if !ok {
                return Err(self.fault(ErrorKind::Value, key, format!("`{key}` {why}")));
            }
        }
        Ok(())
    }

    /// A `[tls]` table: this build has TLS, `primary` is "may" unless
    /// written, a certificate goes with its key, "verify" has something to
    /// verify with.
    fn tls(&mut self) -> Result<(), Fault> {
        let Some(first) = self.seen.iter().find(|(k, _)| k.starts_with("tls.")).map(|(_, l)| *l) else { return Ok(()) };
        let tls_lines = [self.line_of("tls.certificate"), self.line_of("tls.key"), self.line_of("tls.primary")];
        let t = &mut self.c.tls;
        t.present = true;
        if !cfg!(feature = "tls") {
            return Err(Fault::new(ErrorKind::Key, "tls", first, NO_TLS));
        }
        // "may" unless written.
        if tls_lines[2] == 0 {
            t.primary = TlsLevel::May;
        }
        if t.certificate.is_some() != t.key.is_some() {
            let (has, lacks, line) =
                if t.certificate.is_some() { ("certificate", "key", tls_lines[0]) } else { ("key", "certificate", tls_lines[1]) };
            return Err(Fault::new(ErrorKind::Conflict, &format!("tls.{has}"), line, format!("`tls.{has}` needs `tls.{lacks}`")));
        }
        if t.primary == TlsLevel::Verify && t.ca_file.is_none() && t.primary_fingerprint.is_none() {
            return Err(Fault::new(
                ErrorKind::Conflict,
                "tls.primary",
                tls_lines[2],
                "`tls.primary = \"verify\"` needs `tls.ca_file` (the CA that signed the primary's certificate) or `tls.primary_fingerprint`",
            ));
        }
        Ok(())
    }
}

impl Config {
    /// `primary` for messages: the list in order, or what "mx" means.
    pub fn primary_display(&self) -> String {
        if self.primary_list.is_empty() { "the MX hosts of each domain (primary = \"mx\")".into() } else { self.primary_list.join(", ") }
    }
}

/// Says why `primary` is Bartleby itself, if one of its hosts is: its host
/// is our `hostname` or one of `my_names`, or it is an address and port we
/// listen on (see [`listens_on`]). Mail sent there would come back and loop
/// until its Received headers run out.
fn self_loop(c: &Config) -> Option<String> {
    for p in &c.primary_list {
        let Ok((host, port)) = split_host_port(p) else { continue };
        let host = host.trim_end_matches('.');
        if host.eq_ignore_ascii_case(&c.hostname) || c.my_names.iter().any(|n| host.eq_ignore_ascii_case(n)) {
            return Some(format!(
                "`primary` \"{p}\" is Bartleby itself (the `hostname`): mail would loop back here; name the primary mail server"
            ));
        }
        let ips: Vec<IpAddr> = if host.eq_ignore_ascii_case("localhost") || host.eq_ignore_ascii_case("localhost.localdomain") {
            vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()]
        } else {
            match host.parse::<IpAddr>() {
                Ok(ip) => vec![ip],
                Err(_) => continue,
            }
        };
        for ip in ips {
            if let Some(l) = listens_on(c, ip, port) {
                return Some(format!(
                    "`primary` \"{p}\" is Bartleby itself (`listen` has {l}): mail would loop back here; name the primary mail server"
                ));
            }
        }
    }
    None
}

/// The `listen` address that takes connections to `ip`:`port`, if one
/// does: the same address, or a wildcard one of its family (every loopback
/// and local address; `[::]` takes IPv4 too, as a dual-stack socket does).
/// 0.0.0.0 and :: as `ip` reach this machine.
pub fn listens_on(c: &Config, ip: IpAddr, port: u16) -> Option<SocketAddr> {
    let unmap = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let ip = match unmap(ip) {
        IpAddr::V4(a) if a.is_unspecified() => Ipv4Addr::LOCALHOST.into(),
        IpAddr::V6(a) if a.is_unspecified() => Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    let mut local: Option<Vec<IpAddr>> = None;
    for l in c.listen.iter().filter(|l| l.port() == port) {
        let lip = unmap(l.ip());
        let hit = if lip.is_unspecified() {
            (lip.is_ipv6() || ip.is_ipv4()) && (ip.is_loopback() || local.get_or_insert_with(local_addrs).contains(&ip))
        } else {
            lip == ip
        };
        if hit {
            return Some(*l);
        }
    }
    None
}

/// The addresses of this machine's interfaces (getifaddrs(3)).
fn local_addrs() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, which is walked read-only and freed
    // once with freeifaddrs; each sockaddr is read as the type its family says.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut p = list;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() {
                match i32::from((*a).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(a as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(a as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("t.toml"))
    }

    const MIN: &str = "hostname = \"backup.example.org\"\nrelay_domains = [\"example.org\"]\nprimary = \"mail.example.org:25\"\n";

    #[test]
    fn full_example_parses() {
        let text = r#"
hostname = "backup.example.org"          # EHLO name
listen = ["0.0.0.0:25", "[::]:25"]
spool = "/var/spool/bartleby"
relay_domains = ["Example.org",
                 "example.net"]
primary = "mail.example.org:25"
recipients = "/etc/bartleby/recipients"
max_message_size = 10240000
max_connections = 20
queue_run_interval = "30m"
minimal_backoff = "5m"
maximal_backoff = "1h"
max_queue_lifetime = "5d"
etrn_allow = ["192.0.2.10/32"]

[status]
listen = "0.0.0.0:80"
allow = ["127.0.0.1/32", "192.168.1.0/24", "fe80::/10"]
"#;
        let c = parse(text).unwrap();
        assert_eq!(c.relay_domains, vec!["example.org", "example.net"]);
        assert_eq!(c.queue_run_interval, Duration::from_secs(1800));
        assert_eq!(c.max_queue_lifetime, Duration::from_secs(5 * 86400));
        assert_eq!(c.listen.len(), 2);
        assert!(c.is_relay_domain("EXAMPLE.ORG"));
        assert!(!c.is_relay_domain("example.org.evil"));
        assert!(!c.is_relay_domain("xn--example.org"));
        assert_eq!(c.status.allow.len(), 3);
        assert!(allowed(&c.status.allow, "192.168.1.77".parse().unwrap()));
        assert!(!allowed(&c.status.allow, "192.168.2.1".parse().unwrap()));
        assert!(allowed(&c.status.allow, "::ffff:127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn relay_domains_in_u_label_or_a_label_form() {
        let base = MIN.replace("relay_domains = [\"example.org\"]\n", "");
        let c = parse(&format!("{base}relay_domains = [\"Bücher.example\", \"xn--mnchen-3ya.example\"]\n")).unwrap();
        assert_eq!(c.relay_domains, ["xn--bcher-kva.example", "xn--mnchen-3ya.example"]);
        for d in ["bücher.example", "XN--BCHER-KVA.example", "münchen.Example", "xn--mnchen-3ya.example"] {
            assert!(c.is_relay_domain(d), "{d}");
        }
        for d in ["bucher.example", "xn--bcher-.example", "xn--mnchen-3yb.example", "b\u{3cb}cher.example", "bücher.example.evil"] {
            assert!(!c.is_relay_domain(d), "{d}");
        }
        for bad in ["xn--bcher-.example", "xn--zz!.example", "a\u{200b}b.example", "ab cd.example"] {
            let e = parse(&format!("{base}relay_domains = [\"{bad}\"]\n")).unwrap_err();
            assert!(e.message.contains("is not a valid domain name"), "{bad}: {e}");
        }
    }

    #[test]
    fn unknown_key_names_line() {
        let e = parse(&format!("{MIN}\nrelay_domain = [\"x.org\"]\n")).unwrap_err();
        assert_eq!(e.line, 5);
        assert!(e.message.contains("unknown key `relay_domain`"), "{e}");
        assert_eq!(e.to_string(), "t.toml:5: unknown key `relay_domain`");
    }

    #[test]
    fn bad_values_name_line_and_key() {
        let e = parse(&format!("{MIN}max_connections = \"lots\"\n")).unwrap_err();
        assert_eq!(e.line, 4);
        assert!(e.message.contains("max_connections"), "{e}");
        let e = parse(&format!("{MIN}queue_run_interval = \"30 minutes\"\n")).unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        let e = parse(&format!("{MIN}[status]\nallow = [\"300.1.1.1/8\"]\n")).unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        let e = parse(&format!("{MIN}[status]\nlisten = 80\n")).unwrap_err();
        assert!(e.message.contains("status.listen"), "{e}");
        let e = parse(&format!("{MIN}[mystery]\n")).unwrap_err();
        assert!(e.message.contains("unknown table"), "{e}");
        let e = parse(&format!("{MIN}max_recipients = 10\n")).unwrap_err();
        assert!(e.message.contains("at least 100"), "{e}");
        let e = parse("hostname = \"a b\"\n").unwrap_err();
        assert_eq!(e.line, 1);
        let e = parse(&format!("{MIN}hostname = \"x.org\"\n")).unwrap_err();
        assert!(e.message.contains("twice"), "{e}");
        let e = parse("relay_domains = [\"a.org\"\n").unwrap_err();
        assert!(e.message.contains("not closed"), "{e}");
        for key in ["command_timeout", "data_timeout", "delivery_timeout", "connect_timeout"] {
            let e = parse(&format!("{MIN}{key} = \"0s\"\n")).unwrap_err();
            assert_eq!((e.line, e.message.as_str()), (4, format!("`{key}` must be more than 0").as_str()), "{e}");
        }
        for (v, want) in [("192.168.1.5", "192.168.1.5:514"), ("192.168.1.5:1514", "192.168.1.5:1514"), ("[fe80::1]:514", "[fe80::1]:514"), ("::1", "[::1]:514"), ("[::1]", "[::1]:514")] {
            let c = parse(&format!("{MIN}log_host = \"{v}\"\n")).unwrap();
            assert_eq!(c.log_host.unwrap().to_string(), want);
        }
        for v in ["syslog.lan", "192.168.1.5:0", "192.168.1.5:70000", "1.2.3:514", "192.168.1.5:"] {
            let e = parse(&format!("{MIN}log_host = \"{v}\"\n")).unwrap_err().to_string();
            assert!(e.contains("log_host") && e.contains("not an IP address"), "{v}: {e}");
        }
        assert_eq!(parse(&format!("{MIN}log_format = \"iso\"\n")).unwrap().log_format, crate::logging::Format::Iso);
        assert_eq!(parse(MIN).unwrap().log_format, crate::logging::Format::Syslog);
        let e = parse(&format!("{MIN}log_format = \"rfc5424\"\n")).unwrap_err().to_string();
        assert!(e.contains("log_format"), "{e}");
        let e = parse(&format!("{MIN}log_level = \"loud\"\n")).unwrap_err();
        assert!(e.message.contains("must be error, warn"), "{e}");
        assert_eq!(parse(&format!("{MIN}log_level = \"Debug\"\n")).unwrap().log_level, log::LevelFilter::Debug);
    }

    #[test]
    fn status_names() {
        let c = parse(&format!("{MIN}[status]\nnames = [\"Status.LAN.\", \"192.168.1.20\", \"[2001:DB8::1]\", \"::ffff:10.0.0.1\"]\n")).unwrap();
        assert_eq!(c.status.names, ["status.lan", "192.168.1.20", "2001:db8::1", "10.0.0.1"]);
        assert!(parse(MIN).unwrap().status.names.is_empty());
        for bad in ["evil test", "", "a..b", "http://x", "x:80", "[x]", "fe80::1%eth0"] {
            let e = parse(&format!("{MIN}[status]\nnames = [\"{bad}\"]\n")).unwrap_err();
            assert_eq!(e.line, 5, "{e}");
            assert!(e.message.contains("status.names") && e.message.contains("not a host name or an IP address"), "{e}");
        }
    }

    #[test]
    fn per_client_limits() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.smtpd_client_connection_count_limit, 10);
        assert_eq!((c.smtpd_client_queue_share, c.smtpd_client_message_rate_limit), (25, 0));
        assert_eq!(c.anvil_rate_time_unit, Duration::from_secs(60));
        assert_eq!(parse(&format!("{MIN}max_connections = 1\n")).unwrap().smtpd_client_connection_count_limit, 1);
        assert_eq!(parse(&format!("{MIN}max_connections = 7\n")).unwrap().smtpd_client_connection_count_limit, 3);
        let c = parse(&format!("{MIN}smtpd_client_connection_count_limit = 0\nsmtpd_client_queue_share = 0\n")).unwrap();
        assert_eq!((c.smtpd_client_connection_count_limit, c.smtpd_client_queue_share), (0, 0));
        let c = parse(&format!("{MIN}smtpd_client_message_rate_limit = 30\nanvil_rate_time_unit = \"1h\"\n")).unwrap();
        assert_eq!((c.smtpd_client_message_rate_limit, c.anvil_rate_time_unit.as_secs()), (30, 3600));
        for (bad, why) in [
            ("smtpd_client_queue_share = 101", "0 (no limit) to 100"),
            ("smtpd_client_connection_count_limit = 4294967297", "0 (no limit) to 10000"),
            ("smtpd_client_message_rate_limit = -1", "negative"),
            ("anvil_rate_time_unit = 0", "1s to 1d"),
            ("anvil_rate_time_unit = \"2d\"", "1s to 1d"),
        ] {
            let e = parse(&format!("{MIN}{bad}\n")).unwrap_err();
            assert_eq!(e.line, 4, "{e}");
            assert!(e.message.contains(why) && e.message.contains(bad.split(' ').next().unwrap()), "{e}");
        }
    }

    #[test]
    fn required_keys() {
        let e = parse("hostname = \"b.example.org\"\n").unwrap_err();
        assert!(e.message.contains("relay_domains"), "{e}");
    }

    #[test]
    fn cidr_and_host_port() {
        assert!(Cidr::parse("10.0.0.0/8").unwrap().contains("10.1.2.3".parse().unwrap()));
        assert!(!Cidr::parse("10.0.0.0/8").unwrap().contains("11.1.2.3".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("1.2.3.4".parse().unwrap()));
        assert!(Cidr::parse("2001:db8::/32").unwrap().contains("2001:db8::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert_eq!(split_host_port("mail.example.org").unwrap(), ("mail.example.org".into(), 25));
        assert_eq!(split_host_port("[::1]:2525").unwrap(), ("::1".into(), 2525));
        assert!(split_host_port("host:port").is_err());
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("2 fortnights").is_err());
        assert_eq!(parse_duration("3650d").unwrap(), Duration::from_secs(3650 * 86400));
        assert!(parse_duration("3651d").unwrap_err().contains("longer than 3650d"));
        assert!(parse_duration("9999999999999999999d").is_err());
        assert_eq!(parse_size("10M").unwrap(), 10 * 1024 * 1024);
        assert!(parse_size("99999999999G").unwrap_err().contains("too large"));
        assert!(parse_size("99999999999999999999").unwrap_err().contains("too large"));
        assert_eq!(parse_size("1G").unwrap(), MAX_MESSAGE_SIZE);
    }

    fn err(extra: &str) -> ConfigError {
        parse(&format!("{MIN}{extra}")).unwrap_err()
    }

    #[test]
    fn tls_table() {
        // No [tls]: no TLS either way, as before the table existed.
        let c = parse(MIN).unwrap();
        assert!(!c.tls.present);
        assert_eq!(c.tls.primary, TlsLevel::None);
        if !cfg!(feature = "tls") {
            // A build without TLS refuses the table, even empty, and says why.
            for t in ["[tls]\n", "[tls]\nprimary = \"may\"\n"] {
                let e = err(t);
                assert!(e.message.contains("this build of Bartleby has no TLS"), "{e}");
                assert_eq!(e.line, 4, "{e}");
            }
            return;
        }
        let c = parse(&format!("{MIN}[tls]\ncertificate = \"/boot/tls/fullchain.pem\"\nkey = \"/boot/tls/privkey.pem\"\n")).unwrap();
        assert!(c.tls.present);
        // "may" by default once there is a [tls] table.
        assert_eq!(c.tls.primary, TlsLevel::May);
        assert_eq!(c.tls.certificate.as_deref(), Some(Path::new("/boot/tls/fullchain.pem")));
        let c = parse(&format!("{MIN}[tls]\nprimary = \"none\"\n")).unwrap();
        assert_eq!(c.tls.primary, TlsLevel::None);
        let c = parse(&format!("{MIN}[tls]\nprimary = \"verify\"\nprimary_fingerprint = \"sha256:{}\"\n", ["AB"; 32].join(":"))).unwrap();
        assert_eq!(c.tls.primary_fingerprint, Some([0xab; 32]));
        let e = err("[tls]\ncertificate = \"/a.pem\"\n");
        assert!(e.message.contains("`tls.certificate` needs `tls.key`") && e.line == 5, "{e}");
        let e = err("[tls]\nkey = \"/a.key\"\n");
        assert!(e.message.contains("`tls.key` needs `tls.certificate`") && e.line == 5, "{e}");
        let e = err("[tls]\nprimary = \"verify\"\n");
        assert!(e.message.contains("needs `tls.ca_file`") && e.line == 5, "{e}");
        let e = err("[tls]\nprimary = \"secure\"\n");
        assert!(e.message.contains("tls.primary: `secure` must be"), "{e}");
        let e = err("[tls]\nprimary_fingerprint = \"sha256:AB:CD\"\n");
        assert!(e.message.contains("not a SHA-256 fingerprint"), "{e}");
        let e = err("[tls]\ncert = \"/a\"\n");
        assert!(e.message.contains("unknown key `tls.cert`"), "{e}");
        let e = err("[tls]\ncertificate = \"relative.pem\"\nkey = \"/k\"\n");
        assert_eq!(e.line, 5, "{e}");
    }

    #[test]
    fn errors_name_their_kind_and_key() {
        let k = |extra: &str| {
            let e = err(extra);
            (e.kind, e.key, e.line)
        };
        assert_eq!(k("max_connections = 0\n"), (ErrorKind::Value, "max_connections".into(), 4));
        assert_eq!(k("[network]\naddress = \"10.0.0.1\"\n"), (ErrorKind::Value, "network.address".into(), 5));
        assert_eq!(k("mystery = 1\n"), (ErrorKind::Key, "mystery".into(), 4));
        assert_eq!(k("spool = \"/a\"\nspool = \"/b\"\n"), (ErrorKind::Key, "spool".into(), 5));
        assert_eq!(k("[nope]\n"), (ErrorKind::Syntax, String::new(), 4));
        assert_eq!(k("max_connections = 5 6\n"), (ErrorKind::Syntax, String::new(), 4));
        assert_eq!(k("minimal_backoff = \"2h\"\nmaximal_backoff = \"1h\"\n"), (ErrorKind::Value, "maximal_backoff".into(), 5));
        assert_eq!(k("[status]\npush_allow = [\"10.0.0.1\"]\n"), (ErrorKind::Conflict, "status.push_allow".into(), 5));
        assert_eq!(k("listen = [\"127.0.0.1:25\"]\nprimary = \"127.0.0.1:25\"\n").0, ErrorKind::Key, "primary set twice");
        let e = Config::parse("relay_domains = [\"example.org\"]\nprimary = \"mail.example.org\"\n", Path::new("t.toml")).unwrap_err();
        assert_eq!((e.kind, e.key.as_str(), e.line), (ErrorKind::Missing, "hostname", 0));
        let e = Config::parse(&format!("{MIN}listen = [\"0.0.0.0:25\"]\n").replace("mail.example.org:25", "127.0.0.1:25"), Path::new("t.toml")).unwrap_err();
        assert_eq!((e.kind, e.key.as_str(), e.line), (ErrorKind::Conflict, "primary", 3));
        let e = Config::parse_bytes(b"hostname = \"\xff\"\n", Path::new("t.toml")).unwrap_err();
        assert_eq!((e.kind, e.line), (ErrorKind::Syntax, 1));
        let e = Config::load(Path::new("/nonexistent/bartleby.toml")).unwrap_err();
        assert_eq!((e.kind, e.line, e.key.as_str()), (ErrorKind::Read, 0, ""));
        // the text is as before: file:line: message
        assert_eq!(err("mystery = 1\n").to_string(), "t.toml:4: unknown key `mystery`");
    }

    #[test]
    fn fingerprints() {
        let hex: String = (0..32).map(|i| format!("{i:02x}")).collect();
        let want: Vec<u8> = (0..32).collect();
        assert_eq!(parse_fingerprint(&hex).unwrap().to_vec(), want);
        assert_eq!(parse_fingerprint(&format!("SHA256:{}", hex.to_uppercase())).unwrap().to_vec(), want);
        assert!(parse_fingerprint(&hex[..62]).is_err());
        assert!(parse_fingerprint(&format!("{}zz", &hex[..62])).is_err());
        assert!(parse_fingerprint(&format!("{hex}00")).is_err());
    }

    #[test]
    fn bom_crlf_and_comments() {
        let base = MIN.replace("relay_domains = [\"example.org\"]\n", "").replace('\n', "\r\n");
        let text = format!(
            "\u{feff}# saved by Notepad\r\n{base}relay_domains = [ # first\r\n  \"a.org\",\r\n\r\n  # between\r\n  \"b.org\", ]\r\n[status] # page\r\nallow = ['10.0.0.0/8'] \t# tab\r\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.relay_domains, vec!["a.org", "b.org"]);
        assert_eq!(c.hostname, "backup.example.org");
        assert_eq!(c.status.allow.len(), 1);
        // the BOM is skipped in bytes too, and line numbers stay right
        let e = Config::parse_bytes(format!("\u{feff}{MIN}mystery = 1\n").as_bytes(), Path::new("t.toml")).unwrap_err();
        assert_eq!((e.line, e.message.as_str()), (4, "unknown key `mystery`"));
    }

    #[test]
    fn bytes_toml_refuses_name_the_line() {
        let e = err("log_level = \"info\"\rmax_connections = 5\n");
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("carriage return"), "{e}");
        let e = err("# fine\n# NUL \0 here\n");
        assert_eq!((e.line, e.message.contains("NUL")), (5, true), "{e}");
        let e = err("log_level = \"in\x07fo\"\n");
        assert_eq!((e.line, e.message.contains("0x07")), (4, true), "{e}");
        let mut bytes = format!("{MIN}\n").into_bytes();
        bytes.extend_from_slice(b"log_file = \"/tmp/caf\xe9.log\"\n");
        let e = Config::parse_bytes(&bytes, Path::new("t.toml")).unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("0xE9") && e.message.contains("UTF-8"), "{e}");
    }

    #[test]
    fn toml_forms() {
        // single quotes are TOML literal strings: no escapes, no quotes kept
        let c = parse(
            "hostname = 'backup.example.org'\nspool = '/data/spool'\nrelay_domains = ['example.org']\nprimary = 'mail.example.org:25'\n\
             log_file = '/tmp/a\\b.log'\n[network]\naddress = '192.168.1.20/24'\ngateway = '192.168.1.1'\ndns = ['192.168.1.1']\n",
        )
        .unwrap();
        assert_eq!(c.spool, Path::new("/data/spool"));
        assert_eq!(c.log_file.as_deref(), Some(Path::new("/tmp/a\\b.log")));
        assert_eq!(c.network.address, "192.168.1.20/24");
        assert_eq!(c.network.gateway.as_deref(), Some("192.168.1.1"));
        // escapes in basic strings, `#` inside strings, underscores in numbers
        let c = parse(&format!("{MIN}log_file = \"/tmp/\\u0041#\\\"x\" # c\nmax_message_size = 10_240_000\n")).unwrap();
        assert_eq!(c.log_file.as_deref(), Some(Path::new("/tmp/A#\"x")));
        assert_eq!(c.max_message_size, 10_240_000);
        for (extra, want) in [
            ("log_file = \"\"\"/tmp/x\"\"\"\n", "multi-line"),
            ("log_file = '''/tmp/x'''\n", "multi-line"),
            ("log_file = '/tmp/x\n", "not closed"),
            ("log_file = \"/tmp/x\n", "not closed"),
            ("log_file = \"\\q\"\n", "unknown escape"),
            ("log_file = \"\\ud800\"\n", "Unicode escape"),
            ("status = { listen = \"x\" }\n", "inline tables"),
            ("max_connections = 1.5\n", "not a value"),
            ("max_connections = 99999999999999999999\n", "too large"),
            ("max_connections =\n", "missing"),
            ("max_connections = 5 6\n", "unexpected text"),
            ("\"quoted\" = 5\n", "not a valid key"),
            ("a.b = 5\n", "not a valid key"),
            ("[[status]]\n", "not a valid table"),
            ("[status] x\n", "unexpected text"),
            ("just words\n", "expected `key = value`"),
        ] {
            let e = err(extra);
            assert_eq!(e.line, 4, "{extra:?}: {e}");
            assert!(e.message.contains(want), "{extra:?}: {e}");
        }
    }

    #[test]
    fn arrays_bounded_and_linear() {
        // an error inside a multi-line array names the key's line and its own
        let e = err("etrn_allow = [\n\"10.0.0.0/8\"\n\"10.1.0.0/16\"]\n");
        assert_eq!(e.line, 4);
        assert!(e.message.contains("separated by `,` (line 6)"), "{e}");
        let e = err("etrn_allow = [\"10.0.0.0/8\",\n# never closed\n");
        assert!(e.message.contains("not closed"), "{e}");
        // nesting is bounded (a recursive parser would overflow the stack)
        let e = err(&format!("etrn_allow = {}{}\n", "[".repeat(100_000), "]".repeat(100_000)));
        assert!(e.message.contains("nested deeper"), "{e}");
        // at most MAX_ARRAY_ITEMS entries
        let list: String = (0..=MAX_ARRAY_ITEMS).map(|i| format!("\"10.0.{}.{}/32\",\n", i / 256, i % 256)).collect();
        let e = err(&format!("etrn_allow = [\n{list}]\n"));
        assert!(e.message.contains("more than 1000 entries"), "{e}");
        // 200,000 lines of comments inside an array: one pass (the old lexer
        // rescanned the array at every line: quadratic, minutes)
        let t = std::time::Instant::now();
        let filler = "  # filler\r\n\n".repeat(100_000);
        let c = parse(&format!("{MIN}etrn_allow = [\n{filler}\"10.0.0.0/8\", \"10.1.0.0/16\"\n]\n")).unwrap();
        assert_eq!(c.etrn_allow.len(), 2);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[test]
    fn numbers_bounded_before_narrowing() {
        // every value here is > 2^32 or just past the bound: on the i486 build
        // `n as usize` would have made 4294967396 into 100 before any check
        for (key, value, want) in [
            ("max_message_size", "\"99999999999G\"", "too large"),
            ("max_message_size", "1073741825", "at most 1073741824"),
            ("max_message_size", "4294967296", "at most"),
            ("max_connections", "4294967297", "at most 10000"),
            ("max_connections", "0", "at least 1"),
            ("max_recipients", "4294967396", "at most 1000"),
            ("max_line_length", "1000000000000", "at most 65536"),
            ("max_line_length", "4294967808", "at most 65536"),
            ("error_limit", "4294967297", "at most 1000"),
            ("max_received_headers", "4294967346", "at most 1000"),
            ("max_received_headers", "0", "at least 1"),
            ("min_data_rate", "4294967296000", "at most"),
            ("min_free_space", "\"1048577G\"", "at most"),
            ("max_queue_messages", "4294967297", "at most 100000"),
            ("delivery_connections", "4294967297", "at most 64"),
            ("delivery_connections", "0", "at least 1"),
            ("command_timeout", "\"61m\"", "at most 1h"),
            ("data_timeout", "3601", "at most 1h"),
            ("delivery_timeout", "\"2h\"", "at most 1h"),
            ("connect_timeout", "\"11m\"", "at most 10m"),
            ("queue_run_interval", "\"25h\"", "at most 1d"),
            ("max_queue_lifetime", "\"101d\"", "at most 100d"),
            ("max_connections", "-5", "negative"),
        ] {
            let e = err(&format!("{key} = {value}\n"));
            assert_eq!(e.line, 4, "{key} = {value}: {e}");
            assert!(e.message.contains(key) && e.message.contains(want), "{key} = {value}: {e}");
        }
        // the bounds themselves are accepted
        let c = parse(&format!(
            "{MIN}max_message_size = \"1G\"\nmax_line_length = \"64k\"\nmax_recipients = 1000\nmax_connections = 10000\n\
             max_queue_messages = 100000\ndelivery_connections = 64\nmax_received_headers = 1000\nerror_limit = 1000\n\
             min_free_space = \"1048576G\"\nmin_data_rate = \"1G\"\ncommand_timeout = \"1h\"\nmax_queue_lifetime = \"100d\"\n"
        ))
        .unwrap();
        assert_eq!(c.max_message_size, 1 << 30);
        assert_eq!(c.max_line_length, 65536);
        assert_eq!((c.max_recipients, c.max_connections, c.max_queue_messages, c.delivery_connections), (1000, 10000, 100_000, 64));
        assert_eq!(c.min_free_space, 1 << 50);
    }

    #[test]
    fn paths_are_absolute() {
        for (extra, key) in [
            ("spool = \"\"\n", "spool"),
            ("spool = \"spool\"\n", "spool"),
            ("spool = \"/\"\n", "spool"),
            ("spool = \"/var/\\u0000x\"\n", "spool"),
            ("recipients = \"etc/recipients\"\n", "recipients"),
            ("log_file = \"bartleby.log\"\n", "log_file"),
        ] {
            let e = err(extra);
            assert_eq!(e.line, 4, "{extra:?}: {e}");
            assert!(e.message.starts_with(key), "{extra:?}: {e}");
        }
        let c = parse(&format!("{MIN}recipients = \"\"\nlog_file = \"\"\n")).unwrap();
        assert_eq!((c.recipients, c.log_file), (None, None));
    }

    #[test]
    fn primary_forms_and_mx_keys() {
        let cfg = |rest: &str| Config::parse(&format!("hostname = \"backup.example.org\"\nrelay_domains = [\"example.org\"]\n{rest}\n"), Path::new("t.toml"));
        // The old form: one host:port.
        let c = cfg("primary = \"mail.example.org:25\"").unwrap();
        assert_eq!((c.primary.as_str(), c.primary_list.len(), c.smtp_tcp_port), ("mail.example.org:25", 1, 25));
        // A list, tried in order.
        let c = cfg("primary = [\"a.example.org:25\", \"192.0.2.7:2525\"]").unwrap();
        assert_eq!(c.primary_list, ["a.example.org:25", "192.0.2.7:2525"]);
        assert_eq!(c.primary, "a.example.org:25");
        // By MX.
        let c = cfg("primary = \"MX\"\nmy_names = [\"MX2.example.org.\"]\nsmtp_tcp_port = 2525\n[network]\ndns = [\"127.0.0.1:5353\", \"192.0.2.53\", \"[::1]:53\"]").unwrap();
        assert_eq!((c.primary.as_str(), c.primary_list.len()), ("mx", 0));
        assert_eq!(c.my_names, ["mx2.example.org"]);
        assert_eq!(c.smtp_tcp_port, 2525);
        assert_eq!(c.network.dns.len(), 3);
        for bad in [
            "primary = []",
            "primary = [\"a.example.org:x\"]",
            "primary = \"mx\"\nsmtp_tcp_port = 0",
            "primary = \"mx\"\nmy_names = [\"a b\"]",
            "primary = \"mx\"\n[network]\ndns = [\"127.0.0.1:0\"]",
            "primary = \"mx\"\n[network]\ndns = [\"dns.example.org\"]",
            // A list with ourselves in it.
            "primary = [\"a.example.org:25\", \"backup.example.org:25\"]",
        ] {
            assert!(cfg(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn primary_is_not_ourselves() {
        let cfg = |listen: &str, primary: &str| {
            Config::parse(
                &format!("hostname = \"backup.example.org\"\nlisten = [\"{listen}\"]\nrelay_domains = [\"example.org\"]\nprimary = \"{primary}\"\n"),
                Path::new("t.toml"),
            )
        };
        for (listen, primary) in [
            ("0.0.0.0:25", "backup.example.org"),
            ("0.0.0.0:25", "BACKUP.example.org.:2525"),
            ("127.0.0.1:2525", "127.0.0.1:2525"),
            ("0.0.0.0:25", "127.0.0.1"),
            ("0.0.0.0:25", "127.1.2.3:25"),
            ("0.0.0.0:25", "localhost:25"),
            ("0.0.0.0:25", "0.0.0.0:25"),
            ("[::]:25", "[::1]:25"),
            ("[::]:25", "127.0.0.1:25"),
            ("[::]:25", "[::ffff:127.0.0.1]:25"),
            ("192.0.2.1:25", "192.0.2.1"),
        ] {
            let e = cfg(listen, primary).unwrap_err();
            assert_eq!(e.line, 4, "{listen} {primary}: {e}");
            assert!(e.message.contains("is Bartleby itself"), "{listen} {primary}: {e}");
        }
        for (listen, primary) in [
            ("0.0.0.0:25", "127.0.0.1:2526"),
            ("127.0.0.1:25", "127.0.0.2:25"),
            ("0.0.0.0:25", "[::1]:25"),
            ("0.0.0.0:25", "mail.example.org"),
            ("192.0.2.1:25", "192.0.2.2"),
        ] {
            assert!(cfg(listen, primary).is_ok(), "{listen} {primary}");
        }
        // an address of this machine, with a wildcard listen
        if let Some(ip) = local_addrs().into_iter().find(|ip| ip.is_ipv4() && !ip.is_loopback()) {
            assert!(cfg("0.0.0.0:25", &format!("{ip}:25")).is_err());
        }
    }

    #[test]
    fn network_values_work_in_netcfg() {
        let net = |extra: &str| parse(&format!("{MIN}[network]\n{extra}\n"));
        assert_eq!(net("address = \"DHCP\"").unwrap().network.address, "dhcp");
        for bad in [
            "address = \"192.168.1.20\"",
            "address = \"192.168.1.20/33\"",
            "gateway = \"fe80::1\"",
            "interface = \"\"",
            "interface = \"eth0/1\"",
            "interface = \"abcdefghijklmnop\"",
            "fallback = \"192.168.1.20\"",
            "fallback = \"dhcp\"",
        ] {
            assert!(net(bad).is_err(), "{bad}");
        }
        let c = net("address = \"dhcp\"\nfallback = \"10.0.2.15/24\"").unwrap();
        assert_eq!(crate::config::values::parse_ipv4_prefix(c.network.fallback.as_deref().unwrap()).unwrap(), ("10.0.2.15".parse().unwrap(), 24));
        assert_eq!(net("interface = \"enp0s3\"").unwrap().network.interface.as_deref(), Some("enp0s3"));
    }

    #[test]
    fn file_types_and_size() {
        let d = std::env::temp_dir().join(format!("bartleby-config-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let e = Config::load(&d).unwrap_err();
        assert!(e.message.contains("not a regular file (a directory)"), "{e}");
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = Config::load(&fifo).unwrap_err(); // would block forever without O_NONBLOCK
        assert!(e.message.contains("a FIFO"), "{e}");
        let big = d.join("big.toml");
        std::fs::write(&big, format!("{MIN}{}", "#".repeat(MAX_CONFIG_BYTES as usize))).unwrap();
        let e = Config::load(&big).unwrap_err();
        assert!(e.message.contains("too large") && e.line == 0, "{e}");
        std::fs::write(&big, MIN).unwrap();
        assert!(Config::load(&big).is_ok());
        let _ = std::fs::remove_dir_all(&d);
    }
}
