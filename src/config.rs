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

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One configuration error, with the place it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub message: String,
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

/// An IPv4 or IPv6 network in CIDR notation (`192.0.2.0/24`, `2001:db8::/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n`, `v6::/n`, or a bare address (a host: /32 or /128).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }

    /// True when `ip` lies in this network. IPv4-mapped IPv6 addresses
    /// (`::ffff:192.0.2.1`, what a dual-stack socket reports) match IPv4 networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            },
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) };
                (u32::from(net) & mask) == (u32::from(ip) & mask)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - self.prefix) };
                (u128::from(net) & mask) == (u128::from(ip) & mask)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// True when any network in `list` contains `ip`.
pub fn allowed(list: &[Cidr], ip: IpAddr) -> bool {
    list.iter().any(|c| c.contains(ip))
}

/// What the relay does with a bare CR or LF inside message data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BareNewline {
    /// Treat it as a line end and store CRLF (Postfix's `normalize`).
    Normalize,
    /// Refuse the message with 550 5.6.11 (Postfix's `reject`).
    Reject,
}

/// The `[status]` table: the LAN status page.
#[derive(Debug, Clone)]
pub struct StatusConfig {
    pub listen: Option<SocketAddr>,
    pub allow: Vec<Cidr>,
    /// Seconds between two accepted flushes from the page.
    pub flush_interval: Duration,
    /// Age after which the recipients list is reported stale.
    pub recipients_max_age: Duration,
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
}

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub hostname: String,
    pub listen: Vec<SocketAddr>,
    pub spool: PathBuf,
    pub relay_domains: Vec<String>,
    /// `host:port` of the primary MX (name or address).
    pub primary: String,
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
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: 0,
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Parses configuration text; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let items = parse_toml(text).map_err(|(line, message)| ConfigError {
            file: file.clone(),
            line,
            message,
        })?;
        let mut b = Builder::new(path);
        for it in &items {
            b.set(it).map_err(|message| ConfigError {
                file: file.clone(),
                line: it.line,
                message,
            })?;
        }
        b.finish().map_err(|(line, message)| ConfigError { file, line, message })
    }

    /// True when `domain` (any case) is one of `relay_domains`.
    pub fn is_relay_domain(&self, domain: &str) -> bool {
        self.relay_domains.iter().any(|d| d.eq_ignore_ascii_case(domain))
    }
}

/// A value as written in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    Array(Vec<Value>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Str(_) => "a string",
            Value::Int(_) => "an integer",
            Value::Bool(_) => "a boolean",
            Value::Array(_) => "an array",
        }
    }
}

/// One `key = value` with its table and line.
#[derive(Debug, Clone)]
pub struct Item {
    pub table: String,
    pub key: String,
    pub value: Value,
    pub line: usize,
}

/// The tables a configuration may have.
const TABLES: [&str; 2] = ["status", "network"];

/// Parses the TOML subset into a flat list of items.
pub fn parse_toml(text: &str) -> Result<Vec<Item>, (usize, String)> {
    let mut items: Vec<Item> = Vec::new();
    let mut table = String::new();
    let mut seen_tables: Vec<String> = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let lineno = i + 1;
        let line = strip_comment(lines[i]).trim().to_string();
        i += 1;
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let name = rest
                .strip_suffix(']')
                .ok_or((lineno, "a table header must end with `]`".to_string()))?
                .trim();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err((lineno, format!("`[{name}]` is not a valid table name")));
            }
            if !TABLES.contains(&name) {
                return Err((lineno, format!("unknown table `[{name}]` (known: [status], [network])")));
            }
            if seen_tables.iter().any(|t| t == name) {
                return Err((lineno, format!("table `[{name}]` appears twice")));
            }
            seen_tables.push(name.to_string());
            table = name.to_string();
            continue;
        }
        let (key, rest) = line
            .split_once('=')
            .ok_or((lineno, format!("expected `key = value`, found `{line}`")))?;
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err((lineno, format!("`{key}` is not a valid key")));
        }
        // An array may continue over several lines until its brackets balance.
        let mut src = rest.trim().to_string();
        if src.starts_with('[') {
            while !brackets_closed(&src) {
                if i >= lines.len() {
                    return Err((lineno, format!("array for `{key}` is not closed with `]`")));
                }
                src.push(' ');
                src.push_str(strip_comment(lines[i]).trim());
                i += 1;
            }
        }
        let mut p = ValueParser { s: src.as_bytes(), pos: 0 };
        let value = p.value().map_err(|e| (lineno, format!("`{key}`: {e}")))?;
        p.skip_ws();
        if p.pos != p.s.len() {
            return Err((lineno, format!("`{key}`: unexpected text after the value")));
        }
        if items.iter().any(|it| it.table == table && it.key == key) {
            return Err((lineno, format!("`{key}` is set twice")));
        }
        items.push(Item { table: table.clone(), key: key.to_string(), value, line: lineno });
    }
    Ok(items)
}

/// Removes a `#` comment that is not inside a string.
fn strip_comment(line: &str) -> &str {
    let mut in_str = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            '\\' if in_str && !escaped => {
                escaped = true;
                continue;
            }
            '"' if !escaped => in_str = !in_str,
            '#' if !in_str => return &line[..i],
            _ => {}
        }
        escaped = false;
    }
    line
}

fn brackets_closed(s: &str) -> bool {
    let mut depth = 0i32;
    let mut in_str = false;
    let mut escaped = false;
    for c in s.chars() {
        match c {
            '\\' if in_str && !escaped => {
                escaped = true;
                continue;
            }
            '"' if !escaped => in_str = !in_str,
            '[' if !in_str => depth += 1,
            ']' if !in_str => depth -= 1,
            _ => {}
        }
        escaped = false;
    }
    depth <= 0
}

struct ValueParser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl ValueParser<'_> {
    fn skip_ws(&mut self) {
        while self.pos < self.s.len() && (self.s[self.pos] == b' ' || self.s[self.pos] == b'\t') {
            self.pos += 1;
        }
    }

    fn value(&mut self) -> Result<Value, String> {
        self.skip_ws();
        match self.s.get(self.pos) {
            None => Err("a value is missing".into()),
            Some(b'"') => self.string().map(Value::Str),
            Some(b'\'') => {
                let start = self.pos + 1;
                let end = self.s[start..]
                    .iter()
                    .position(|&c| c == b'\'')
                    .ok_or("a string is not closed")?;
                self.pos = start + end + 1;
                Ok(Value::Str(String::from_utf8_lossy(&self.s[start..start + end]).into_owned()))
            }
            Some(b'[') => {
                self.pos += 1;
                let mut v = Vec::new();
                loop {
                    self.skip_ws();
                    match self.s.get(self.pos) {
                        Some(b']') => {
                            self.pos += 1;
                            return Ok(Value::Array(v));
                        }
                        None => return Err("an array is not closed".into()),
                        _ => {}
                    }
                    v.push(self.value()?);
                    self.skip_ws();
                    match self.s.get(self.pos) {
                        Some(b',') => self.pos += 1,
                        Some(b']') => {}
                        _ => return Err("array items must be separated by `,`".into()),
                    }
                }
            }
            Some(_) => {
                let start = self.pos;
                while self.pos < self.s.len() && !matches!(self.s[self.pos], b',' | b']' | b' ' | b'\t') {
                    self.pos += 1;
                }
                let word = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("");
                match word {
                    "true" => Ok(Value::Bool(true)),
                    "false" => Ok(Value::Bool(false)),
                    w => w
                        .replace('_', "")
                        .parse::<i64>()
                        .map(Value::Int)
                        .map_err(|_| format!("`{w}` is not a value (strings need double quotes)")),
                }
            }
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.pos += 1; // opening quote
        let mut out = Vec::new();
        loop {
            let c = *self.s.get(self.pos).ok_or("a string is not closed with `\"`")?;
            self.pos += 1;
            match c {
                b'"' => return String::from_utf8(out).map_err(|_| "a string is not valid UTF-8".into()),
                b'\\' => {
                    let e = *self.s.get(self.pos).ok_or("a string is not closed with `\"`")?;
                    self.pos += 1;
                    match e {
                        b'"' => out.push(b'"'),
                        b'\\' => out.push(b'\\'),
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        _ => return Err(format!("unknown escape `\\{}` in a string", e as char)),
                    }
                }
                c => out.push(c),
            }
        }
    }
}

/// Parses a duration: `90` (seconds), `"90s"`, `"30m"`, `"1h"`, `"5d"`, `"1w"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (like \"90s\", \"30m\", \"1h\", \"5d\")"))?;
    let mult = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        u => return Err(format!("`{u}` is not a duration unit (use s, m, h, d or w)")),
    };
    secs_duration(n.saturating_mul(mult), s)
}

/// Longest duration the configuration takes: ten years. Anything longer is
/// a typo, and bounding it keeps every deadline sum (now + backoff, data
/// timeout + rate allowance) far from overflow.
const MAX_DURATION_SECS: u64 = 3650 * 86400;

fn secs_duration(secs: u64, written: &str) -> Result<Duration, String> {
    if secs > MAX_DURATION_SECS {
        return Err(format!("`{written}` is longer than 3650d (ten years)"));
    }
    Ok(Duration::from_secs(secs))
}

/// Parses a size: `10240000`, `"10M"`, `"512k"`, `"1G"` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size (like 10240000 or \"10M\")"))?;
    let mult = match unit.trim() {
        "" => 1,
        "k" | "K" => 1024,
        "m" | "M" => 1024 * 1024,
        "g" | "G" => 1024 * 1024 * 1024,
        u => return Err(format!("`{u}` is not a size unit (use k, M or G)")),
    };
    Ok(n.saturating_mul(mult))
}

/// Checks a domain name as written in the configuration.
fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Splits `host:port` (or `[v6]:port`); a missing port means 25.
pub fn split_host_port(s: &str) -> Result<(String, u16), String> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once(']').ok_or_else(|| format!("`{s}`: missing `]`"))?;
        let port = match p.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| format!("`{s}`: bad port"))?,
            None if p.is_empty() => 25,
            None => return Err(format!("`{s}`: expected `:port` after `]`")),
        };
        return Ok((h.to_string(), port));
    }
    if s.matches(':').count() > 1 {
        // A bare IPv6 address without a port.
        return s
            .parse::<Ipv6Addr>()
            .map(|_| (s.to_string(), 25))
            .map_err(|_| format!("`{s}`: write IPv6 addresses as [addr]:port"));
    }
    match s.split_once(':') {
        Some((h, p)) => {
            let port: u16 = p.parse().map_err(|_| format!("`{s}`: `{p}` is not a port number"))?;
            if h.is_empty() {
                return Err(format!("`{s}`: the host is missing"));
            }
            Ok((h.to_string(), port))
        }
        None => Ok((s.to_string(), 25)),
    }
}

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
        .map(|s| s.parse::<SocketAddr>().map_err(|_| format!("`{s}` is not an address:port (like \"0.0.0.0:25\" or \"[::]:25\")")))
        .collect()
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
            status: StatusConfig {
                listen: None,
                allow: vec![Cidr::parse("127.0.0.1/32").unwrap(), Cidr::parse("::1/128").unwrap()],
                flush_interval: Duration::from_secs(10),
                recipients_max_age: Duration::from_secs(7 * 86400),
                names: Vec::new(),
            },
            network: NetworkConfig { interface: None, address: "dhcp".into(), gateway: None, dns: Vec::new() },
            smtpd_client_connection_count_limit: 0, // see finish()
            smtpd_client_queue_share: 25,
            smtpd_client_message_rate_limit: 0,
            anvil_rate_time_unit: Duration::from_secs(60),
        };
        Builder { c, seen: Vec::new() }
    }

    fn set(&mut self, it: &Item) -> Result<(), String> {
        let v = &it.value;
        let c = &mut self.c;
        let full = if it.table.is_empty() { it.key.clone() } else { format!("{}.{}", it.table, it.key) };
        let r: Result<(), String> = (|| match (it.table.as_str(), it.key.as_str()) {
            ("", "hostname") => {
                let h = want_str(v)?;
                if !valid_domain(h) {
                    return Err(format!("hostname: `{h}` is not a valid host name"));
                }
                c.hostname = h.to_ascii_lowercase();
                Ok(())
            }
            ("", "listen") => want_addrs(v).map(|a| c.listen = a),
            ("", "spool") => want_str(v).map(|s| c.spool = PathBuf::from(s)),
            ("", "relay_domains") => {
                let mut out = Vec::new();
                for d in want_strs(v)? {
                    let d = d.trim_end_matches('.');
                    if !valid_domain(d) {
                        return Err(format!("relay_domains: `{d}` is not a valid domain name"));
                    }
                    out.push(d.to_ascii_lowercase());
                }
                c.relay_domains = out;
                Ok(())
            }
            ("", "primary") => {
                let p = want_str(v)?;
                split_host_port(p)?;
                c.primary = p.to_string();
                Ok(())
            }
            ("", "recipients") => want_str(v).map(|s| c.recipients = if s.is_empty() { None } else { Some(PathBuf::from(s)) }),
            ("", "max_message_size") => want_uint(v).map(|n| c.max_message_size = n),
            ("", "max_connections") => want_uint(v).map(|n| c.max_connections = n.min(1_000_000) as usize),
            ("", "max_recipients") => want_uint(v).map(|n| c.max_recipients = n as usize),
            ("", "queue_run_interval") => want_duration(v).map(|d| c.queue_run_interval = d),
            ("", "minimal_backoff") => want_duration(v).map(|d| c.minimal_backoff = d),
            ("", "maximal_backoff") => want_duration(v).map(|d| c.maximal_backoff = d),
            ("", "max_queue_lifetime") => want_duration(v).map(|d| c.max_queue_lifetime = d),
            ("", "etrn_allow") => want_cidrs(v).map(|a| c.etrn_allow = a),
            ("", "command_timeout") => want_duration(v).map(|d| c.command_timeout = d),
            ("", "data_timeout") => want_duration(v).map(|d| c.data_timeout = d),
            ("", "max_line_length") => want_uint(v).map(|n| c.max_line_length = n as usize),
            ("", "error_limit") => want_uint(v).map(|n| c.error_limit = n.min(1_000_000) as u32),
            ("", "min_data_rate") => want_uint(v).map(|n| c.min_data_rate = n),
            ("", "max_received_headers") => want_uint(v).map(|n| c.max_received_headers = n.min(1_000_000) as u32),
            ("", "min_free_space") => want_uint(v).map(|n| c.min_free_space = n),
            ("", "max_queue_messages") => want_uint(v).map(|n| c.max_queue_messages = n as usize),
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
            ("", "delivery_timeout") => want_duration(v).map(|d| c.delivery_timeout = d),
            ("", "connect_timeout") => want_duration(v).map(|d| c.connect_timeout = d),
            ("", "delivery_connections") => want_uint(v).map(|n| c.delivery_connections = (n as usize).clamp(1, 64)),
            ("", "log_file") => want_str(v).map(|s| c.log_file = if s.is_empty() { None } else { Some(PathBuf::from(s)) }),
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
            ("status", "listen") => {
                let s = want_str(v)?;
                if s.is_empty() {
                    c.status.listen = None;
                    Ok(())
                } else {
                    s.parse::<SocketAddr>()
                        .map(|a| c.status.listen = Some(a))
                        .map_err(|_| format!("`{s}` is not an address:port (like \"0.0.0.0:80\")"))
                }
            }
            ("status", "allow") => want_cidrs(v).map(|a| c.status.allow = a),
            ("status", "flush_interval") => want_duration(v).map(|d| c.status.flush_interval = d),
            ("status", "recipients_max_age") => want_duration(v).map(|d| c.status.recipients_max_age = d),
            ("network", "interface") => want_str(v).map(|s| c.network.interface = Some(s.to_string())),
            ("network", "address") => {
                let s = want_str(v)?;
                if s != "dhcp" {
                    let (a, p) = s.split_once('/').ok_or_else(|| format!("`{s}` must be \"dhcp\" or address/prefix like \"192.168.1.20/24\""))?;
                    a.parse::<Ipv4Addr>().map_err(|_| format!("`{a}` is not an IPv4 address"))?;
                    p.parse::<u8>().ok().filter(|n| *n <= 32).ok_or_else(|| format!("`{p}` is not a prefix length"))?;
                }
                c.network.address = s.to_string();
                Ok(())
            }
            ("network", "gateway") => {
                let s = want_str(v)?;
                s.parse::<IpAddr>().map_err(|_| format!("`{s}` is not an IP address"))?;
                c.network.gateway = Some(s.to_string());
                Ok(())
            }
            ("network", "dns") => {
                let mut out = Vec::new();
                for s in want_strs(v)? {
                    s.parse::<IpAddr>().map_err(|_| format!("`{s}` is not an IP address"))?;
                    out.push(s.to_string());
                }
                c.network.dns = out;
                Ok(())
            }
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
            ("", "status") | ("", "network") => Err(format!("`{}` is a table: write it as [{}]", it.key, it.key)),
            ("", k) => Err(format!("unknown key `{k}`")),
            ("status", _) | ("network", _) => Err(format!("unknown key `{full}`")),
            (t, _) => Err(format!("unknown table `[{t}]`")),
        })();
        let key_tick = format!("`{}`", it.key);
        r.map_err(|e| {
            if e.starts_with("unknown") || e.starts_with(&full) || e.starts_with(&key_tick) {
                e
            } else {
                format!("{full}: {e}")
            }
        })?;
        self.seen.push((full, it.line));
        Ok(())
    }

    fn line_of(&self, key: &str) -> usize {
        self.seen.iter().find(|(k, _)| k == key).map(|(_, l)| *l).unwrap_or(0)
    }

    fn finish(mut self) -> Result<Config, (usize, String)> {
        let client_limit_set = self.line_of("smtpd_client_connection_count_limit") != 0;
        let c = &mut self.c;
        if c.hostname.is_empty() {
            return Err((0, "`hostname` is required (the EHLO name, like \"backup.example.org\")".into()));
        }
        if c.relay_domains.is_empty() {
            return Err((0, "`relay_domains` is required: the domains this backup MX accepts mail for".into()));
        }
        if c.primary.is_empty() {
            return Err((0, "`primary` is required: host:port of the primary mail server".into()));
        }
        if c.listen.is_empty() {
            return Err((self.line_of("listen"), "`listen` must name at least one address".into()));
        }
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
                return Err((self.line_of(key), format!("`{key}` {why}")));
            }
        }
        if !client_limit_set {
            // Not set: one client may take half the sessions, so one address
            // can never lock everyone else out.
            c.smtpd_client_connection_count_limit = (c.max_connections / 2).max(1);
        }
        if c.min_free_space == 0 {
            // Room for a few messages in flight plus the logs, like Postfix's
            // queue_minfree advice (at least 1.5 x message_size_limit).
            c.min_free_space = c.max_message_size.saturating_mul(2).max(4 * 1024 * 1024);
        }
        Ok(self.c)
    }
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
        assert_eq!(c.status.allow.len(), 3);
        assert!(allowed(&c.status.allow, "192.168.1.77".parse().unwrap()));
        assert!(!allowed(&c.status.allow, "192.168.2.1".parse().unwrap()));
        assert!(allowed(&c.status.allow, "::ffff:127.0.0.1".parse().unwrap()));
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
    }
}
