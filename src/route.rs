//! Where mail for a domain goes: the hosts of `primary` in order, or, with
//! `primary = "mx"`, the MX hosts of the domain by RFC 5321 5.1.
//!
//! With MX routing ([`hosts_for`]):
//! * the MX records are sorted by preference; Bartleby finds itself among
//!   them by name (`hostname`, `my_names`) or by address (an MX host that
//!   resolves to an address and `smtp_tcp_port` we listen on) and drops
//!   itself and every host whose preference is not better than its own, as
//!   Postfix's smtp client does ("MX preference >= own");
//! * hosts of equal preference are shuffled, then each host's A and then
//!   AAAA addresses are tried in order;
//! * no MX record: the domain's own A/AAAA (the implicit MX of RFC 5321
//!   5.1), as Postfix; Bartleby is then no MX of the domain at all, which a
//!   backup MX should not see: the route says so on the page;
//! * nothing better than Bartleby left: "mail for X loops back to myself",
//!   deferred (4.4.6; Postfix bounces with 5.4.6, a backup MX keeps the mail
//!   while the DNS is fixed);
//! * a DNS failure (timeout, SERVFAIL, a malformed answer) defers with
//!   Postfix's words: "Host or domain name not found. Name service error
//!   for name=X type=MX: Host not found, try again" (4.4.3); NXDOMAIN
//!   defers too (4.4.4: Postfix bounces; a backup MX for the domain keeps
//!   its mail until `max_queue_lifetime`).
//!
//! A name in `primary = "host:port"` goes through the same resolver.
//! The recipient-verification prober can call [`hosts_for`] as well.

use std::net::{IpAddr, SocketAddr};

use crate::config::{Config, listens_on, split_host_port};
use crate::delivery::Reply;
use crate::dns::{self, Answer, Rdata, TYPE_A, TYPE_AAAA, TYPE_MX};

/// Most addresses tried for one destination.
pub const MAX_HOPS: usize = 16;
/// Most MX hosts looked at.
const MAX_MX: usize = 10;

/// One address to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// The host name (or the address as written in `primary`).
    pub name: String,
    pub addr: SocketAddr,
}

/// The addresses to try, in order, for mail to `domain`, and a note for the
/// page when the route is odd (an implicit MX).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub hops: Vec<Hop>,
    pub note: Option<String>,
}

impl Route {
    /// Identifies the destination: routes with the same addresses share a
    /// connection (Postfix's per-nexthop queues).
    pub fn key(&self) -> String {
        let mut v: Vec<String> = self.hops.iter().map(|h| format!("{}[{}]", h.name, h.addr)).collect();
        insertion_sort(&mut v, |a, b| a < b);
        v.join(",")
    }

    /// For the page: the hosts in the order they are tried.
    pub fn describe(&self) -> String {
        let mut names: Vec<String> = Vec::new();
        for h in &self.hops {
            let s = format!("{}[{}]:{}", h.name, h.addr.ip(), h.addr.port());
            if !names.contains(&s) {
                names.push(s);
            }
        }
        let mut s = names.join(", ");
        if let Some(n) = &self.note {
            s.push_str(" (");
            s.push_str(n);
            s.push(')');
        }
        s
    }
}

fn name_error(name: &str, qtype: u16, try_again: bool) -> Reply {
    if try_again {
        Reply::local(451, format!("4.4.3 Host or domain name not found. Name service error for name={name} type={}: Host not found, try again", dns::type_name(qtype)))
    } else {
        Reply::local(450, format!("4.4.4 Host or domain name not found. Name service error for name={name} type={}: Host not found", dns::type_name(qtype)))
    }
}

pub fn loops_back(domain: &str) -> Reply {
    Reply::local(451, format!("4.4.6 mail for {domain} loops back to myself"))
}

/// A stable sort for the few entries of an MX set: std's sorts cost KBs of
/// binary for each type.
pub fn insertion_sort<T>(v: &mut [T], less: impl Fn(&T, &T) -> bool) {
    for i in 1..v.len() {
        let mut j = i;
        while j > 0 && less(&v[j], &v[j - 1]) {
            v.swap(j, j - 1);
            j -= 1;
        }
    }
}

/// The domain of an address (after the last `@`, lower case).
/// A U-label domain comes back in its A-label form: what DNS is asked.
pub fn domain_of(addr: &str) -> String {
    let d = addr.rsplit_once('@').map_or("", |(_, d)| d).trim_end_matches('.');
    if d.is_ascii() { d.to_ascii_lowercase() } else { crate::punycode::to_ascii(d).unwrap_or_else(|| d.to_string()) }
}

/// The addresses /etc/hosts gives `host` (`localhost` is 127.0.0.1 and ::1
/// without it), as the system's resolver would have found them.
fn hosts_file(host: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    if let Ok((text, _)) = crate::util::read_small_file(std::path::Path::new("/etc/hosts"), 64 * 1024) {
        for line in String::from_utf8_lossy(&text).lines() {
            let mut w = line.split('#').next().unwrap_or("").split_whitespace();
            let Some(ip) = w.next().and_then(|a| a.parse::<IpAddr>().ok()) else { continue };
            if w.any(|n| n.trim_end_matches('.').eq_ignore_ascii_case(host)) && out.len() < 8 {
                out.push(ip);
            }
        }
    }
    if out.is_empty() && (host.eq_ignore_ascii_case("localhost") || host.eq_ignore_ascii_case("localhost.localdomain")) {
        out = vec![IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)];
    }
    out
}

/// The addresses of `host`: /etc/hosts, else A, then AAAA. `Err` only for a temporary
/// failure when nothing was found.
async fn addresses(cfg: &Config, host: &str) -> Result<Vec<IpAddr>, Reply> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    let mut out = hosts_file(host);
    if !out.is_empty() {
        return Ok(out);
    }
    let mut failed = None;
    for qtype in [TYPE_A, TYPE_AAAA] {
        match dns::lookup(&cfg.network.dns, host, qtype).await {
            Ok(Answer::Records(rs)) => out.extend(rs.into_iter().filter_map(|r| match r {
                Rdata::A(a) => Some(IpAddr::V4(a)),
                Rdata::Aaaa(a) => Some(IpAddr::V6(a)),
                Rdata::Mx(..) => None,
            })),
            Ok(_) => {}
            Err(_) => failed = failed.or(Some(name_error(host, qtype, true))),
        }
    }
    match failed {
        Some(r) if out.is_empty() => Err(r),
        _ => Ok(out),
    }
}

/// The route for mail to `domain`: the `primary` hosts in order, or its MX
/// hosts (see the module doc). `Err` is the reply every recipient of the
/// domain is deferred with.
pub async fn hosts_for(cfg: &Config, domain: &str) -> Result<Route, Reply> {
    if cfg.primary_list.is_empty() {
        return mx_route(cfg, domain).await;
    }
    let mut hops = Vec::new();
    let mut first_err = None;
    for p in &cfg.primary_list {
        let Ok((host, port)) = split_host_port(p) else { continue };
        match addresses(cfg, &host).await {
            Ok(ips) if ips.is_empty() => {
                first_err.get_or_insert_with(|| name_error(&host, TYPE_A, false));
            }
            Ok(ips) => hops.extend(ips.into_iter().map(|ip| Hop { name: host.clone(), addr: SocketAddr::new(ip, port) })),
            Err(r) => {
                first_err.get_or_insert(r);
            }
        }
    }
    hops.truncate(MAX_HOPS);
    match first_err {
        Some(r) if hops.is_empty() => Err(r),
        _ => Ok(Route { hops, note: None }),
    }
}

/// Is `name` one of our names?
fn is_me(cfg: &Config, name: &str) -> bool {
    name.eq_ignore_ascii_case(&cfg.hostname) || cfg.my_names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

async fn mx_route(cfg: &Config, domain: &str) -> Result<Route, Reply> {
    let port = cfg.smtp_tcp_port;
    let mut mxs: Vec<(u16, String)> = match dns::lookup(&cfg.network.dns, domain, TYPE_MX).await {
        Err(_) => return Err(name_error(domain, TYPE_MX, true)),
        Ok(Answer::NxDomain) => return Err(name_error(domain, TYPE_MX, false)),
        Ok(Answer::NoData) => Vec::new(),
        Ok(Answer::Records(rs)) => rs.into_iter().filter_map(|r| if let Rdata::Mx(p, h) = r { Some((p, h)) } else { None }).collect(),
    };
    let mut note = None;
    if mxs.is_empty() {
        // RFC 5321 5.1: no MX, the domain itself (an implicit MX of 0).
        note = Some(format!("{domain} has no MX record: its own address is used; Bartleby is not an MX of it"));
        mxs.push((0, domain.to_string()));
    }
    insertion_sort(&mut mxs, |a, b| a.0 < b.0);
    // A null MX (RFC 7505: "MX 0 .") says the domain takes no mail.
    mxs.retain(|(_, h)| !h.is_empty());
    if mxs.is_empty() {
        return Err(Reply::local(450, format!("4.1.10 Domain {domain} does not accept mail (nullMX)")));
    }
    // Ourselves by name: drop every host not more preferred.
    if let Some(own) = mxs.iter().filter(|(_, h)| is_me(cfg, h)).map(|(p, _)| *p).min() {
        mxs.retain(|(p, _)| *p < own);
    }
    mxs.truncate(MAX_MX);
    // Equal preferences shuffled (RFC 5321 5.1).
    let mut i = 0;
    while i < mxs.len() {
        let j = mxs[i..].iter().position(|(p, _)| *p != mxs[i].0).map_or(mxs.len(), |n| i + n);
        for k in (i + 1..j).rev() {
            let r = i + (crate::sys::random_u32() as usize) % (k - i + 1);
            mxs.swap(k, r);
        }
        i = j;
    }
    let mut hops: Vec<Hop> = Vec::new();
    let mut failed: Option<Reply> = None;
    let mut cut: Option<u16> = None;
    for (pref, host) in &mxs {
        if cut.is_some_and(|c| *pref >= c) {
            break;
        }
        let ips = match addresses(cfg, host).await {
            Ok(ips) => ips,
            Err(r) => {
                failed.get_or_insert(r);
                continue;
            }
        };
        if ips.iter().any(|ip| listens_on(cfg, *ip, port).is_some()) {
            // Ourselves by address: this host and every one of equal or
            // worse preference go.
            cut = Some(*pref);
            let mine: Vec<String> = mxs.iter().filter(|(p, _)| *p == *pref).map(|(_, h)| h.clone()).collect();
            hops.retain(|h| !mine.contains(&h.name));
            continue;
        }
        for ip in ips {
            if hops.len() < MAX_HOPS {
                hops.push(Hop { name: host.clone(), addr: SocketAddr::new(ip, port) });
            }
        }
    }
    if hops.is_empty() {
        if let Some(r) = failed {
            return Err(r);
        }
        if mxs.is_empty() || cut.is_some() {
            return Err(loops_back(domain));
        }
        return Err(name_error(&mxs[0].1, TYPE_A, false));
    }
    Ok(Route { hops, note })
}

/// The addresses of the primaries (every relay domain's route with MX
/// routing), which may send ETRN when `etrn_allow` is not set.
static PRIMARY_ADDRS: std::sync::Mutex<Vec<IpAddr>> = std::sync::Mutex::new(Vec::new());

/// Is `ip` one of the primaries' addresses, as last learnt?
pub fn is_primary_addr(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    PRIMARY_ADDRS.lock().is_ok_and(|a| a.contains(&ip))
}

/// Learns the primaries' addresses for the default `etrn_allow`: at start,
/// then every `queue_run_interval` (at least a minute; the DNS cache keeps
/// this cheap; a minute after a failure), so a primary whose address moves
/// keeps its ETRN. Replaces the list only with what was found: a domain
/// that failed keeps no stale address.
pub async fn learn_primary_addrs(cfg: std::sync::Arc<Config>) {
    loop {
        let domains: Vec<&str> = if cfg.primary_list.is_empty() { cfg.relay_domains.iter().map(String::as_str).collect() } else { vec![""] };
        let mut addrs: Vec<IpAddr> = Vec::new();
        let mut failed = false;
        for d in domains {
            match hosts_for(&cfg, d).await {
                Ok(r) => addrs.extend(r.hops.iter().map(|h| h.addr.ip().to_canonical())),
                Err(e) => {
                    failed = true;
                    log::info!(target: crate::logging::MASTER, "etrn_allow: cannot resolve the primary{}{d}: {}", if d.is_empty() { "" } else { " of " }, e.text)
                }
            }
        }
        let mut seen: Vec<IpAddr> = Vec::new();
        for a in addrs {
            if !seen.contains(&a) && seen.len() < 256 {
                seen.push(a);
            }
        }
        let addrs = seen;
        if let Ok(mut a) = PRIMARY_ADDRS.lock() {
            *a = addrs;
        }
        // A failure (the DNS not up yet at boot) is tried again in a minute.
        let wait = if failed { std::time::Duration::from_secs(60) } else { cfg.queue_run_interval.max(std::time::Duration::from_secs(60)) };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_domains() {
        let h = |n: &str, a: &str| Hop { name: n.into(), addr: a.parse().unwrap() };
        let a = Route { hops: vec![h("a", "127.0.0.2:25"), h("b", "127.0.0.3:25")], note: None };
        let b = Route { hops: vec![h("b", "127.0.0.3:25"), h("a", "127.0.0.2:25")], note: None };
        assert_eq!(a.key(), b.key(), "a shuffle does not make another destination");
        assert_eq!(a.describe(), "a[127.0.0.2]:25, b[127.0.0.3]:25");
        assert_eq!(domain_of("Bob@Example.ORG"), "example.org");
        assert_eq!(domain_of("postmaster"), "");
        let mut v = vec![(20, "a"), (10, "b"), (10, "c"), (5, "d"), (10, "e")];
        insertion_sort(&mut v, |a, b| a.0 < b.0);
        assert_eq!(v, [(5, "d"), (10, "b"), (10, "c"), (10, "e"), (20, "a")]);
        assert_eq!(loops_back("example.org").text, "451 4.4.6 mail for example.org loops back to myself");
    }
}
