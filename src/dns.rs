//! A small DNS stub resolver for routing by MX: a query builder and a
//! response parser (no I/O: bytes in, records out; fuzzed), and lookups over
//! tokio's UDP sockets (never `getaddrinfo`, never blocking the runtime).
//!
//! * Servers: `[network] dns` (an IP with an optional `:port`), else the
//!   `nameserver` lines of `/etc/resolv.conf` (read at each lookup that
//!   misses the cache: the appliance's DHCP rewrites it), else 127.0.0.1.
//! * Each query comes from a new socket (a random source port from the
//!   kernel) with a random ID; an answer whose ID or question is not ours is
//!   dropped and the wait goes on (an off-path forger must guess both).
//! * A truncated answer (TC) is asked again over TCP, from the same server.
//! * [`TRY_TIMEOUT`] per try, [`ROUNDS`] rounds over the servers. SERVFAIL,
//!   REFUSED, a malformed answer or silence move on to the next server;
//!   when every try failed the lookup fails *temporarily*. NXDOMAIN and
//!   NODATA are answers, cached like the others.
//! * Answers are cached for their TTL, clamped to [`MIN_TTL`]..[`MAX_TTL`],
//!   in at most [`CACHE_ENTRIES`] entries.
//!
//! The parser's bounds: a name is at most 255 bytes, each compression
//! pointer must point before the label it replaces (so no loop), at most
//! [`MAX_RECORDS`] records of the asked type are kept, and every read is
//! checked against the packet's end.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

pub const TYPE_A: u16 = 1;
pub const TYPE_MX: u16 = 15;
pub const TYPE_AAAA: u16 = 28;

/// Wait for one server's answer.
pub const TRY_TIMEOUT: Duration = Duration::from_secs(2);
/// Rounds over the server list (glibc's `attempts:2`).
pub const ROUNDS: usize = 2;
/// At most this many servers are used (glibc's MAXNS).
pub const MAX_SERVERS: usize = 3;
pub const MIN_TTL: u32 = 5;
pub const MAX_TTL: u32 = 3600;
pub const CACHE_ENTRIES: usize = 128;
/// Records of the asked type kept from one answer.
pub const MAX_RECORDS: usize = 32;
/// Largest answer read over UDP (more is truncated by the socket, and then
/// malformed) and over TCP.
const UDP_MAX: usize = 4096;
const TCP_MAX: usize = 16384;

/// One record of the asked type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rdata {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// Preference and exchange (lower case, no trailing dot; "" for the
    /// root, a null MX).
    Mx(u16, String),
}

/// A parsed response to our question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub rcode: u8,
    pub truncated: bool,
    pub records: Vec<Rdata>,
    /// Smallest TTL of the kept records (0 when none).
    pub ttl: u32,
}

/// The result of a lookup that got an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Records(Vec<Rdata>),
    /// NXDOMAIN: the name does not exist.
    NxDomain,
    /// The name exists, without records of this type.
    NoData,
}

/// A valid host name to ask for: 1..=63-byte labels of letters, digits,
/// `-` and `_`, at most 253 bytes.
pub fn valid_name(name: &str) -> bool {
    let n = name.trim_end_matches('.');
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
}

/// A query for `name` (see [`valid_name`]) and `qtype`, class IN, RD set.
pub fn query(id: u16, name: &str, qtype: u16) -> Option<Vec<u8>> {
    if !valid_name(name) {
        return None;
    }
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in name.trim_end_matches('.').split('.') {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    Some(q)
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, &'static str> {
    match b.get(at..at + 2) {
        Some(s) => Ok(u16::from_be_bytes([s[0], s[1]])),
        None => Err("truncated packet"),
    }
}

/// Reads the (possibly compressed) name at `at`: the name in lower case
/// without trailing dot, and the offset after it in the record.
fn read_name(b: &[u8], mut at: usize) -> Result<(String, usize), &'static str> {
    let mut name = String::new();
    let mut end = None;
    // Every pointer must point before the label it stands in for: the
    // walk goes strictly backwards at each jump, so it always ends.
    let mut limit = at;
    let mut wire = 0usize;
    loop {
        let len = *b.get(at).ok_or("truncated name")? as usize;
        match len & 0xc0 {
            0xc0 => {
                let ptr = (u16_at(b, at)? & 0x3fff) as usize;
                if ptr >= limit {
                    return Err("compression pointer does not point backwards");
                }
                end.get_or_insert(at + 2);
                limit = ptr;
                at = ptr;
            }
            0 if len == 0 => {
                return Ok((name, end.unwrap_or(at + 1)));
            }
            0 => {
                let label = b.get(at + 1..at + 1 + len).ok_or("truncated label")?;
                wire += len + 1;
                if wire > 255 {
                    return Err("name longer than 255 bytes");
                }
                if !name.is_empty() {
                    name.push('.');
                }
                for &c in label {
                    if !(c.is_ascii_alphanumeric() || c == b'-' || c == b'_') {
                        return Err("name with a character not allowed in a host name");
                    }
                    name.push(c.to_ascii_lowercase() as char);
                }
                at += 1 + len;
            }
            _ => return Err("label type not supported"),
        }
    }
}

/// Parses the answer to the query `id`/`name`/`qtype`. An answer to another
/// ID or question is an error (the caller keeps waiting for its own).
pub fn parse(b: &[u8], id: u16, name: &str, qtype: u16) -> Result<Response, &'static str> {
    if b.len() < 12 {
        return Err("truncated header");
    }
    if u16_at(b, 0)? != id {
        return Err("wrong ID");
    }
    let flags = u16_at(b, 2)?;
    if flags & 0x8000 == 0 || (flags >> 11) & 0xf != 0 {
        return Err("not a response to a standard query");
    }
    let truncated = flags & 0x0200 != 0;
    let rcode = (flags & 0xf) as u8;
    if u16_at(b, 4)? != 1 {
        return Err("not one question");
    }
    let ancount = u16_at(b, 6)?;
    let (qname, mut at) = read_name(b, 12)?;
    if qname != name.trim_end_matches('.').to_ascii_lowercase() || u16_at(b, at)? != qtype || u16_at(b, at + 2)? != 1 {
        return Err("answer to another question");
    }
    at += 4;
    let mut records = Vec::new();
    let mut ttl = u32::MAX;
    for _ in 0..ancount {
        if truncated && at >= b.len() {
            break;
        }
        let (_owner, next) = read_name(b, at)?;
        at = next;
        let rtype = u16_at(b, at)?;
        let class = u16_at(b, at + 2)?;
        let t = u32::from(u16_at(b, at + 4)?) << 16 | u32::from(u16_at(b, at + 6)?);
        let rdlen = u16_at(b, at + 8)? as usize;
        let start = at + 10;
        let rdata = b.get(start..start + rdlen).ok_or("truncated record")?;
        at = start + rdlen;
        if class != 1 || rtype != qtype || records.len() >= MAX_RECORDS {
            // CNAMEs and other records: the recursive server followed them.
            continue;
        }
        // TTLs with the top bit set count as 0 (RFC 2181 8).
        let t = if t > i32::MAX as u32 { 0 } else { t };
        let r = match rtype {
            TYPE_A if rdlen == 4 => Rdata::A(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3])),
            TYPE_AAAA if rdlen == 16 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(rdata);
                Rdata::Aaaa(Ipv6Addr::from(a))
            }
            TYPE_MX if rdlen >= 3 => {
                let pref = u16_at(b, start)?;
                let (host, end) = read_name(b, start + 2)?;
                if end != at {
                    return Err("MX record length does not match its name");
                }
                Rdata::Mx(pref, host)
            }
            _ => return Err("record of the asked type with a bad length"),
        };
        ttl = ttl.min(t);
        records.push(r);
    }
    Ok(Response { rcode, truncated, ttl: if records.is_empty() { 0 } else { ttl }, records })
}

/// A `[network] dns` entry: see [`crate::config::parse_ip_port`]; port 53
/// by default.
pub fn parse_server(s: &str) -> Option<SocketAddr> {
    crate::config::parse_ip_port(s.trim(), 53)
}

/// The servers to ask: the configured ones, else resolv.conf's.
pub fn servers(configured: &[String]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = configured.iter().filter_map(|s| parse_server(s)).collect();
    if out.is_empty()
        && let Ok((text, _)) = crate::util::read_small_file(std::path::Path::new("/etc/resolv.conf"), 64 * 1024)
    {
        for line in String::from_utf8_lossy(&text).lines() {
            let mut w = line.split_whitespace();
            if w.next() == Some("nameserver")
                && let Some(ip) = w.next().and_then(|a| a.split('%').next()).and_then(|a| a.parse::<IpAddr>().ok())
            {
                out.push(SocketAddr::new(ip, 53));
            }
        }
    }
    if out.is_empty() {
        out.push(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 53));
    }
    out.truncate(MAX_SERVERS);
    out
}

struct Cached {
    expires: Instant,
    answer: Answer,
}

/// A few dozen entries at most: a vector searched in order is smaller code
/// than a map.
static CACHE: Mutex<Vec<(String, u16, Cached)>> = Mutex::new(Vec::new());

fn cache_get(name: &str, qtype: u16) -> Option<Answer> {
    let now = Instant::now();
    let c = CACHE.lock().ok()?;
    c.iter().find(|(n, t, e)| n == name && *t == qtype && e.expires > now).map(|(_, _, e)| e.answer.clone())
}

fn cache_put(name: &str, qtype: u16, answer: Answer, ttl: u32) {
    let now = Instant::now();
    let Ok(mut c) = CACHE.lock() else { return };
    c.retain(|(n, t, e)| e.expires > now && !(n == name && *t == qtype));
    if c.len() >= CACHE_ENTRIES
        && let Some(i) = c.iter().enumerate().min_by_key(|(_, (_, _, e))| e.expires).map(|(i, _)| i)
    {
        c.swap_remove(i);
    }
    let ttl = u64::from(ttl.clamp(MIN_TTL, MAX_TTL));
    c.push((name.to_string(), qtype, Cached { expires: now + Duration::from_secs(ttl), answer }));
}

pub fn type_name(qtype: u16) -> &'static str {
    match qtype {
        TYPE_A => "A",
        TYPE_AAAA => "AAAA",
        TYPE_MX => "MX",
        _ => "?",
    }
}

/// Looks `name` up: an answer (cached for its TTL), or why none came (a
/// temporary failure: every server failed, timed out or answered SERVFAIL).
/// Boxed: one copy of the lookup's code however many callers inline it.
pub fn lookup<'a>(configured: &'a [String], name: &'a str, qtype: u16) -> std::pin::Pin<Box<dyn Future<Output = Result<Answer, String>> + Send + 'a>> {
    Box::pin(lookup_inner(configured, name, qtype))
}

async fn lookup_inner(configured: &[String], name: &str, qtype: u16) -> Result<Answer, String> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if !valid_name(&name) {
        return Err(format!("{name}: not a valid host name"));
    }
    if let Some(a) = cache_get(&name, qtype) {
        return Ok(a);
    }
    let servers = servers(configured);
    let mut why = String::from("no DNS server");
    for _ in 0..ROUNDS {
        for &server in &servers {
            match ask(server, &name, qtype).await {
                Ok(r) if r.rcode == 3 => {
                    cache_put(&name, qtype, Answer::NxDomain, MIN_TTL);
                    return Ok(Answer::NxDomain);
                }
                Ok(r) if r.rcode == 0 && r.records.is_empty() => {
                    cache_put(&name, qtype, Answer::NoData, MIN_TTL);
                    return Ok(Answer::NoData);
                }
                Ok(r) if r.rcode == 0 => {
                    let ttl = r.ttl;
                    let a = Answer::Records(r.records);
                    cache_put(&name, qtype, a.clone(), ttl);
                    return Ok(a);
                }
                Ok(r) => why = format!("server {server} answered rcode {}", r.rcode),
                Err(e) => why = format!("server {server}: {e}"),
            }
        }
    }
    log::debug!("dns: {name} type={}: {why}", type_name(qtype));
    Err(why)
}

/// One try with one server: UDP, then TCP if the answer was truncated.
async fn ask(server: SocketAddr, name: &str, qtype: u16) -> Result<Response, String> {
    let id = crate::sys::random_u32() as u16;
    let q = query(id, name, qtype).ok_or("bad name")?;
    let bind: SocketAddr = if server.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let sock = tokio::net::UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    sock.connect(server).await.map_err(|e| e.to_string())?;
    sock.send(&q).await.map_err(|e| e.to_string())?;
    let deadline = Instant::now() + TRY_TIMEOUT;
    let mut buf = vec![0u8; UDP_MAX];
    let mut last = "timed out".to_string();
    let r = loop {
        let n = match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(last),
        };
        match parse(&buf[..n], id, name, qtype) {
            Ok(r) => break r,
            // Not the answer to our question (a late or forged packet):
            // keep waiting for ours until the deadline.
            Err(e @ ("wrong ID" | "answer to another question")) => last = format!("timed out (dropped an answer: {e})"),
            Err(e) => return Err(format!("malformed answer: {e}")),
        }
    };
    if !r.truncated {
        return Ok(r);
    }
    drop(sock);
    let tcp = async {
        let mut s = tokio::net::TcpStream::connect(server).await?;
        let mut msg = (q.len() as u16).to_be_bytes().to_vec();
        msg.extend_from_slice(&q);
        s.write_all(&msg).await?;
        let len = s.read_u16().await? as usize;
        if len > TCP_MAX {
            return Err(std::io::Error::other(format!("TCP answer of {len} bytes")));
        }
        let mut b = vec![0u8; len];
        s.read_exact(&mut b).await?;
        Ok::<_, std::io::Error>(b)
    };
    let b = match tokio::time::timeout(TRY_TIMEOUT, tcp).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return Err(format!("truncated answer, and over TCP: {e}")),
        Err(_) => return Err("truncated answer, and over TCP: timed out".into()),
    };
    match parse(&b, id, name, qtype) {
        Ok(r) if !r.truncated => Ok(r),
        Ok(_) => Err("truncated answer over TCP".into()),
        Err(e) => Err(format!("malformed answer over TCP: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response to `q` with the given answer records (already encoded).
    fn answer(q: &[u8], rcode: u8, answers: &[Vec<u8>]) -> Vec<u8> {
        let mut r = q.to_vec();
        r[2] = 0x81;
        r[3] = 0x80 | rcode;
        r[6..8].copy_from_slice(&(answers.len() as u16).to_be_bytes());
        for a in answers {
            r.extend_from_slice(a);
        }
        r
    }

    fn rr(rtype: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
        let mut v = vec![0xc0, 12];
        v.extend_from_slice(&rtype.to_be_bytes());
        v.extend_from_slice(&1u16.to_be_bytes());
        v.extend_from_slice(&ttl.to_be_bytes());
        v.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        v.extend_from_slice(rdata);
        v
    }

    #[test]
    fn mx_answer_with_compression() {
        let q = query(0x1234, "Example.ORG.", TYPE_MX).unwrap();
        // mx1.<pointer to example.org>, and a second MX fully written.
        let mut mx1 = vec![0, 10, 3, b'm', b'x', b'1', 0xc0, 12];
        let r1 = rr(TYPE_MX, 300, &mx1);
        mx1.clear();
        let mut mx2 = vec![0, 20];
        for l in ["backup", "example", "org"] {
            mx2.push(l.len() as u8);
            mx2.extend_from_slice(l.as_bytes());
        }
        mx2.push(0);
        let r = answer(&q, 0, &[r1, rr(TYPE_MX, 60, &mx2), rr(TYPE_A, 60, &[1, 2, 3, 4])]);
        let p = parse(&r, 0x1234, "example.org", TYPE_MX).unwrap();
        assert_eq!(p.records, vec![Rdata::Mx(10, "mx1.example.org".into()), Rdata::Mx(20, "backup.example.org".into())]);
        assert_eq!(p.ttl, 60);
        assert_eq!(parse(&r, 0x1235, "example.org", TYPE_MX), Err("wrong ID"));
        assert_eq!(parse(&r, 0x1234, "example.net", TYPE_MX), Err("answer to another question"));
        assert_eq!(parse(&r, 0x1234, "example.org", TYPE_A), Err("answer to another question"));
        // Every truncation is an error or a shorter answer, never a panic.
        for n in 0..r.len() {
            let _ = parse(&r[..n], 0x1234, "example.org", TYPE_MX);
        }
    }

    #[test]
    fn hostile_answers() {
        let q = query(7, "example.org", TYPE_A).unwrap();
        // A pointer to itself, and one pointing forward.
        let mut r = answer(&q, 0, &[]);
        r[7] = 1;
        let at = r.len();
        r.extend_from_slice(&[0xc0, at as u8]);
        assert_eq!(parse(&r, 7, "example.org", TYPE_A), Err("compression pointer does not point backwards"));
        // A loop through the question: a label pointing back to itself through two hops.
        let mut r = answer(&q, 0, &[]);
        r[7] = 1;
        let at = r.len();
        r.extend_from_slice(&[1, b'a', 0xc0, at as u8]);
        assert!(parse(&r, 7, "example.org", TYPE_A).is_err());
        // 1000 answers announced, 2 present.
        let mut r = answer(&q, 0, &[rr(TYPE_A, 1, &[127, 0, 0, 2]), rr(TYPE_A, 1, &[127, 0, 0, 3])]);
        r[6..8].copy_from_slice(&1000u16.to_be_bytes());
        assert!(parse(&r, 7, "example.org", TYPE_A).is_err());
        // 1000 present: at most MAX_RECORDS kept.
        let many: Vec<Vec<u8>> = (0..1000).map(|i| rr(TYPE_A, 1, &[127, 0, (i >> 8) as u8, i as u8])).collect();
        let p = parse(&answer(&q, 0, &many), 7, "example.org", TYPE_A).unwrap();
        assert_eq!(p.records.len(), MAX_RECORDS);
        // A bad length for an A record.
        assert!(parse(&answer(&q, 0, &[rr(TYPE_A, 1, &[1, 2, 3])]), 7, "example.org", TYPE_A).is_err());
        // A name with a character no host name has.
        assert!(parse(&answer(&q, 0, &[rr(TYPE_MX, 1, &[0, 1, 1, b' ', 0])]), 7, "example.org", TYPE_MX).is_err());
        // NXDOMAIN, SERVFAIL carried as rcodes.
        assert_eq!(parse(&answer(&q, 3, &[]), 7, "example.org", TYPE_A).unwrap().rcode, 3);
        assert_eq!(parse(&answer(&q, 2, &[]), 7, "example.org", TYPE_A).unwrap().rcode, 2);
        // A query, not a response.
        assert!(parse(&q, 7, "example.org", TYPE_A).is_err());
    }

    #[test]
    fn names_and_servers() {
        assert!(query(1, "a..b", TYPE_A).is_none());
        assert!(query(1, &"a".repeat(64), TYPE_A).is_none());
        assert!(query(1, "", TYPE_A).is_none());
        assert_eq!(parse_server("192.0.2.1"), Some("192.0.2.1:53".parse().unwrap()));
        assert_eq!(parse_server("127.0.0.1:5353"), Some("127.0.0.1:5353".parse().unwrap()));
        assert_eq!(parse_server("[::1]:5353"), Some("[::1]:5353".parse().unwrap()));
        assert_eq!(parse_server("::1"), Some("[::1]:53".parse().unwrap()));
        assert_eq!(parse_server("x"), None);
        assert_eq!(servers(&["127.0.0.1:5353".into()]), vec!["127.0.0.1:5353".parse::<SocketAddr>().unwrap()]);
    }
}
