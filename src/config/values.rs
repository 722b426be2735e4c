//! The small value types of the configuration, parsed in one place each:
//! CIDR networks, an IPv4 address with its prefix, `host:port` and
//! `ip:port`, durations, sizes, domain names, certificate fingerprints.
//! Pure functions of their text (no I/O); used by the config schema, by
//! netcfg (the interface address) and by policy (domains in addresses).
//!
//! Each refuses what it does not fully understand: blanks, signs and
//! trailing junk in numbers, an empty host, a prefix past the address's
//! width, a port 0, a number past its type.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use super::toml::clip;

/// An IPv4 or IPv6 network in CIDR notation (`192.0.2.0/24`, `2001:db8::/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n`, `v6::/n`, or a bare address (a host: /32 or /128).
    /// No blanks: the text is the whole value (`" 10.0.0.0/8"` is refused).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| format!("`{}` is not an IP address or CIDR network", clip(s)))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => prefix_len(p, max).ok_or_else(|| format!("`{}`: prefix length must be 0 to {max}", clip(s)))?,
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

pub(crate) fn secs_duration(secs: u64, written: &str) -> Result<Duration, String> {
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
    let n: u64 = num.parse().map_err(|e: std::num::ParseIntError| match e.kind() {
        std::num::IntErrorKind::PosOverflow => format!("`{s}` is too large"),
        _ => format!("`{s}` is not a size (like 10240000 or \"10M\")"),
    })?;
    let mult = match unit.trim() {
        "" => 1,
        "k" | "K" => 1024,
        "m" | "M" => 1024 * 1024,
        "g" | "G" => 1024 * 1024 * 1024,
        u => return Err(format!("`{u}` is not a size unit (use k, M or G)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("`{s}` is too large"))
}

/// The one domain-name check: ASCII letters, digits and `-` in labels of 1
/// to 63 characters that neither start nor end with `-`, at most 253 in all
/// (RFC 1035 2.3.1, RFC 1123 2.1). No trailing dot: callers strip it. U-labels
/// are checked in their A-label form ([`crate::punycode::to_ascii`]).
pub fn valid_domain(d: &str) -> bool {
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

/// Splits `host:port` (or `[v6]:port`); a missing port means 25. The host
/// is never empty; the port is digits, 1 to 65535.
pub fn split_host_port(s: &str) -> Result<(String, u16), String> {
    let port_of = |p: &str| port(p).ok_or_else(|| format!("`{s}`: `{}` is not a port number", clip(p)));
    if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once(']').ok_or_else(|| format!("`{s}`: missing `]`"))?;
        let port = match p.strip_prefix(':') {
            Some(p) => port(p).ok_or_else(|| format!("`{s}`: bad port"))?,
            None if p.is_empty() => 25,
            None => return Err(format!("`{s}`: expected `:port` after `]`")),
        };
        if h.is_empty() {
            return Err(format!("`{s}`: the host is missing"));
        }
        return Ok((h.to_string(), port));
    }
    if s.matches(':').count() > 1 {
        // A bare IPv6 address without a port.
        return s
            .parse::<Ipv6Addr>()
            .map(|_| (s.to_string(), 25))
            .map_err(|_| format!("`{s}`: write IPv6 addresses as [addr]:port"));
    }
    let (h, port) = match s.split_once(':') {
        Some((h, p)) => (h, port_of(p)?),
        None => (s, 25),
    };
    if h.is_empty() {
        return Err(format!("`{s}`: the host is missing"));
    }
    Ok((h.to_string(), port))
}

/// A port number: 1 to 5 ASCII digits, 1 to 65535 (no sign, no blank).
fn port(p: &str) -> Option<u16> {
    digits(p, 5)?.parse().ok().filter(|&n| n != 0)
}

/// A prefix length `0..=max`: 1 to 3 ASCII digits (Postfix's alldig: no
/// sign, no blank).
fn prefix_len(p: &str, max: u8) -> Option<u8> {
    digits(p, 3)?.parse().ok().filter(|&n| n <= max)
}

/// `s` when it is 1 to `most` ASCII digits.
fn digits(s: &str, most: usize) -> Option<&str> {
    (!s.is_empty() && s.len() <= most && s.bytes().all(|b| b.is_ascii_digit())).then_some(s)
}

/// `a.b.c.d/n`: an IPv4 address with its prefix length, as an interface
/// takes it (`[network] address` and `fallback`, applied by netcfg). The
/// prefix is required: a bare address is refused (netcfg once took it as
/// a /24, where the configuration refused it).
pub fn parse_ipv4_prefix(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (a, p) = s.split_once('/').ok_or_else(|| format!("`{}` has no /prefix (like \"192.168.1.20/24\")", clip(s)))?;
    let addr = a.parse::<Ipv4Addr>().map_err(|_| format!("`{}` is not an IPv4 address", clip(a)))?;
    let prefix = prefix_len(p, 32).ok_or_else(|| format!("`{}` is not a prefix length", clip(p)))?;
    Ok((addr, prefix))
}

/// `ip`, `[ip6]`, `ip:port` or `[ip6]:port` (`[network] dns`, `log_host`),
/// with `default` when no port is given; never port 0, never a name.
pub fn parse_ip_port(s: &str, default: u16) -> Option<SocketAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, default));
    }
    match s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        Some(ip) => Some(SocketAddr::new(IpAddr::V6(ip.parse().ok()?), default)),
        // No IPv6 zone here: these were never taken with one.
        None if s.contains('%') => None,
        None => parse_socket_addr(s),
    }
}

/// `ip:port` or `[ip6]:port`, the port required and never 0 (`listen`,
/// `[status] listen`); brackets go around an IPv6 address and only there.
/// By hand: std's SocketAddr parser costs KBs of binary.
pub fn parse_socket_addr(s: &str) -> Option<SocketAddr> {
    let (host, p) = s.rsplit_once(':')?;
    let port = port(p)?;
    let Some(h) = host.strip_prefix('[') else {
        return Some(SocketAddr::new(IpAddr::V4(host.parse().ok()?), port));
    };
    // An IPv6 zone, `[fe80::1%2]`: its interface number, as std's parser
    // (used here before) took it.
    let (ip, zone) = match h.strip_suffix(']')?.split_once('%') {
        Some((ip, z)) => (ip, digits(z, 10)?.parse().ok()?),
        None => (h.strip_suffix(']')?, 0),
    };
    Some(SocketAddr::V6(std::net::SocketAddrV6::new(ip.parse().ok()?, port, 0, zone)))
}

/// Parses `sha256:AB:CD:...` (or plain hex, with or without colons).
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], String> {
    let t = s.trim();
    let hex = t.strip_prefix("sha256:").or_else(|| t.strip_prefix("SHA256:")).unwrap_or(t);
    let digits: Vec<u8> = hex.bytes().filter(|&b| b != b':').collect();
    let bad = || format!("`{}` is not a SHA-256 fingerprint (64 hex digits, like \"sha256:3A:7F:...\")", clip(s));
    if digits.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks(2).enumerate() {
        let h = std::str::from_utf8(pair).map_err(|_| bad())?;
        out[i] = u8::from_str_radix(h, 16).map_err(|_| bad())?;
    }
    Ok(out)
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_hostile() {
        let c = Cidr::parse("192.0.2.0/24").unwrap();
        assert!(c.contains("192.0.2.77".parse().unwrap()) && !c.contains("192.0.3.1".parse().unwrap()));
        assert!(c.contains("::ffff:192.0.2.1".parse().unwrap()));
        assert_eq!(Cidr::parse("2001:db8::/32").unwrap().prefix, 32);
        assert_eq!(Cidr::parse("192.0.2.7").unwrap().prefix, 32);
        assert_eq!(Cidr::parse("::1").unwrap().prefix, 128);
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("203.0.113.9".parse().unwrap()));
        for bad in [
            "",
            "/",
            "/8",
            "10.0.0.0/",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/255",
            "10.0.0.0/256",
            "10.0.0.0/99999999999999999999",
            "10.0.0.0/+8",
            "10.0.0.0/-0",
            "10.0.0.0/8 ",
            " 10.0.0.0/8",
            "10.0.0.0/8x",
            "10.0.0.0/8/8",
            "10.0.0.0 / 8",
            "10.0.0.0/８",
            "10.0.0.256/8",
            "１0.0.0.0/8",
            "example.org/8",
        ] {
            let e = Cidr::parse(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad:?}");
        }
        // the error shows invisible characters, never raw control bytes
        assert!(Cidr::parse("10.0.0.0/8\u{0}").unwrap_err().contains("\\u{0}"));
    }

    #[test]
    fn ipv4_prefix_hostile() {
        assert_eq!(parse_ipv4_prefix("192.168.1.20/24").unwrap(), (Ipv4Addr::new(192, 168, 1, 20), 24));
        assert_eq!(parse_ipv4_prefix("10.0.0.1/0").unwrap().1, 0);
        assert_eq!(parse_ipv4_prefix("10.0.0.1/32").unwrap().1, 32);
        for bad in
            ["", "10.0.0.1", "10.0.0.1/", "10.0.0.1/33", "10.0.0.1/300", "10.0.0.1/+24", "10.0.0.1/24 ", " 10.0.0.1/24", "::1/64", "10.0.0.1/2٤", "nope/8"]
        {
            assert!(parse_ipv4_prefix(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_ipv4_prefix("10.0.0.1/33").unwrap_err(), "`33` is not a prefix length");
        assert_eq!(parse_ipv4_prefix("nope/8").unwrap_err(), "`nope` is not an IPv4 address");
    }

    #[test]
    fn host_port_hostile() {
        assert_eq!(split_host_port("mail.example.org:2525").unwrap(), ("mail.example.org".into(), 2525));
        assert_eq!(split_host_port("mail.example.org").unwrap(), ("mail.example.org".into(), 25));
        assert_eq!(split_host_port("[2001:db8::1]:26").unwrap(), ("2001:db8::1".into(), 26));
        assert_eq!(split_host_port("[2001:db8::1]").unwrap(), ("2001:db8::1".into(), 25));
        assert_eq!(split_host_port("2001:db8::1").unwrap(), ("2001:db8::1".into(), 25));
        assert_eq!(split_host_port("a:65535").unwrap().1, 65535);
        for bad in [
            "",
            ":25",
            "[]:25",
            "[]",
            "a:",
            "a:0",
            "a:65536",
            "a:99999999999999999999",
            "a:+25",
            "a: 25",
            "a:25 ",
            "a:2５",
            "[::1]:",
            "[::1]x",
            "[::1",
            "[::1]:0",
            "2001:db8::zz",
        ] {
            assert!(split_host_port(bad).is_err(), "{bad:?}");
        }
        assert_eq!(split_host_port("a:x").unwrap_err(), "`a:x`: `x` is not a port number");
    }

    #[test]
    fn ip_port_hostile() {
        assert_eq!(parse_ip_port("192.0.2.1", 53), Some("192.0.2.1:53".parse().unwrap()));
        assert_eq!(parse_ip_port("192.0.2.1:5353", 53), Some("192.0.2.1:5353".parse().unwrap()));
        assert_eq!(parse_ip_port("[::1]", 514), Some("[::1]:514".parse().unwrap()));
        assert_eq!(parse_ip_port("[::1]:5", 514), Some("[::1]:5".parse().unwrap()));
        assert_eq!(parse_ip_port("fe80::1", 514), Some("[fe80::1]:514".parse().unwrap()));
        for bad in ["", ":", "192.0.2.1:", "192.0.2.1:0", "192.0.2.1:65536", "192.0.2.1:+5", "name.example:53", "[::1]:", "::1:53x", "[192.0.2.1]x:5", "[192.0.2.1]", "[192.0.2.1]:5", "١.2.3.4", "[fe80::1%2]:53", "[fe80::1%2]"] {
            assert_eq!(parse_ip_port(bad, 53), None, "{bad:?}");
        }
    }

    #[test]
    fn socket_addr_hostile() {
        assert_eq!(parse_socket_addr("0.0.0.0:25"), Some("0.0.0.0:25".parse().unwrap()));
        assert_eq!(parse_socket_addr("[::]:25"), Some("[::]:25".parse().unwrap()));
        assert_eq!(parse_socket_addr("[2001:db8::1]:65535"), Some("[2001:db8::1]:65535".parse().unwrap()));
        for bad in [
            "",
            ":",
            ":25",
            "0.0.0.0",
            "0.0.0.0:",
            "0.0.0.0:0",
            "0.0.0.0:65536",
            "0.0.0.0:+25",
            "0.0.0.0: 25",
            "0.0.0.0:25 ",
            " 0.0.0.0:25",
            "[0.0.0.0]:25",
            "::1:25",
            "[::1]",
            "[::1]25",
            "[::1:25",
            "localhost:25",
            "0.0.0.0:２5",
            "0.0.0.0:99999999999999999999",
        ] {
            assert_eq!(parse_socket_addr(bad), None, "{bad:?}");
        }
    }

    /// An IPv6 address with a zone (`[fe80::1%2]:25`, the interface's
    /// number): std's SocketAddr parser, used for `listen` and `[status]
    /// listen` before this one, took it (a link-local address means nothing
    /// without its interface), so a configuration that listened there must
    /// still boot. The zone is a number, as std took it (no interface name).
    #[test]
    fn socket_addr_keeps_an_ipv6_zone() {
        for good in ["[fe80::1%2]:25", "[fe80::1%0]:2525", "[fe80::1%4294967295]:80", "[::1%1]:25"] {
            let std_took = good.parse::<SocketAddr>().ok();
            assert!(std_took.is_some(), "{good:?}");
            assert_eq!(parse_socket_addr(good), std_took, "{good:?}");
        }
        for bad in ["[fe80::1%]:25", "[fe80::1%eth0]:25", "[fe80::1%+2]:25", "[fe80::1%-2]:25", "[fe80::1%4294967296]:25", "[fe80::1% 2]:25", "[fe80::1%2 ]:25", "[192.0.2.1%2]:25", "[fe80::1%2]:0", "[fe80::1%2%3]:25", "[fe80::1%２]:25"] {
            assert_eq!(parse_socket_addr(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn durations_and_sizes_hostile() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1w").unwrap(), Duration::from_secs(7 * 86400));
        assert_eq!(parse_duration("3650d").unwrap(), Duration::from_secs(3650 * 86400));
        for bad in ["", "m", "-5s", "+5s", "5x", "5mm", "1.5h", "99999999999999999999s", "3651d", "18446744073709551615w", "5ｍ", "５m"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_size("10M").unwrap(), 10 << 20);
        assert_eq!(parse_size("512k").unwrap(), 512 << 10);
        assert_eq!(parse_size("0").unwrap(), 0);
        for bad in ["", "M", "-1", "+1", "1T", "1.5M", "18446744073709551615G", "99999999999999999999", "1é"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert!(parse_size("99999999999999999999").unwrap_err().contains("too large"));
        assert!(parse_size("17179869184G").unwrap_err().contains("too large"));
    }

    #[test]
    fn domains_hostile() {
        assert!(valid_domain("example.org") && valid_domain("a-b.example") && valid_domain("x") && valid_domain("xn--bcher-kva.example"));
        let label = "a".repeat(63);
        assert!(valid_domain(&format!("{label}.org")));
        assert!(!valid_domain(&format!("a{label}.org")));
        let long = [label.as_str(); 4].join(".");
        assert_eq!(long.len(), 255);
        assert!(!valid_domain(&long));
        assert!(valid_domain(long[..253].trim_end_matches('.')));
        for bad in ["", ".", "a..b", ".a", "a.", "-a.org", "a-.org", "a_b.org", "a b.org", "bücher.example", "a.org\0", "a.org\n"] {
            assert!(!valid_domain(bad), "{bad:?}");
        }
    }

    #[test]
    fn fingerprints_hostile() {
        for bad in ["", "sha256:", "sha256:zz", &"é".repeat(32), &"0".repeat(63), &"0".repeat(65)] {
            assert!(parse_fingerprint(bad).is_err(), "{bad:?}");
        }
    }
}
