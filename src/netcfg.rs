//! Network configuration for the appliance (PID 1 only): interfaces up, static
//! IPv4 or a small DHCP client, default route, `/etc/resolv.conf`.
//!
//! Everything is done with plain ioctls on a UDP socket (`SIOCSIFFLAGS`,
//! `SIOCSIFADDR`, `SIOCSIFNETMASK`, `SIOCADDRT`), so the image needs no `ip`
//! or `udhcpc`. The DHCP client speaks DISCOVER/OFFER/REQUEST/ACK over an
//! ordinary UDP socket bound to `0.0.0.0:68` with `SO_BROADCAST` and
//! `SO_BINDTODEVICE` (Linux routes limited broadcasts out of a bound device
//! even before it has an address). Retries and waiting time are bounded; a
//! lease is renewed by a small background thread at half its lifetime.
//!
//! IPv6 needs nothing here: the kernel gives every interface a link-local
//! address and follows router advertisements (SLAAC) on its own.
//!
//! Role: PID 1 only. Touches network interfaces and routes (ioctls), UDP
//! ports 67/68 and `/etc/resolv.conf`. The DHCP messages are
//! `netcfg/dhcp.rs`; the address comes from the config's parser
//! ([`crate::config::values::parse_ipv4_prefix`]).

use std::io::{self, Error, ErrorKind};
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::init::say;

mod dhcp;

use dhcp::{ACK, DISCOVER, NAK, OFFER, REQUEST, build, parse};
pub use dhcp::Lease;

/// How long the first DHCP exchange may take before the console says no
/// server answered (the relay is already listening: nothing waits on this).
pub const FIRST_DHCP_WAIT: Duration = Duration::from_secs(10);
/// Between two DHCP attempts while no lease is held.
pub const DHCP_RETRY: Duration = Duration::from_secs(30);

/// Starts the network without holding up the caller (PID 1 starts the
/// relay right after, listening on 0.0.0.0 / [::]): `lo` up; a static
/// `address` is applied at once (ioctls only, no waiting); with `"dhcp"` a
/// thread gives the interface `fallback` (`"a.b.c.d/prefix"`, with `gateway`
/// as its route) or else an IPv4 link-local address (169.254/16, RFC 3927,
/// chosen from the MAC address) at once, then asks for a lease. A lease
/// replaces the fallback and is renewed at half its lifetime; while no DHCP
/// server answers, DHCP is asked again every [`DHCP_RETRY`].
///
/// Returns the line for the console (the thread prints its own outcome).
pub fn start(iface: Option<&str>, address: &str, gateway: Option<&str>, dns: &[String], fallback: Option<&str>) -> io::Result<String> {
    if !address.trim().eq_ignore_ascii_case("dhcp") {
        return configure(iface, address, gateway, dns);
    }
    let _ = set_up("lo");
    let gw: Option<Ipv4Addr> = gateway.and_then(|g| g.parse().ok());
    let fallback = match fallback {
        Some(f) if !f.trim().is_empty() => Some(parse_cidr(f)?),
        _ => None,
    };
    let (iface, dns) = (iface.filter(|n| !n.is_empty()).map(str::to_string), dns.to_vec());
    std::thread::Builder::new().name("dhcp".into()).stack_size(64 * 1024).spawn(move || {
        let name = match iface {
            Some(n) => n,
            None => match first_interface(Duration::from_secs(3)) {
                Some(n) => n,
                None => {
                    say!("network: no network interface found (no NIC driver matched the hardware?)");
                    return;
                }
            },
        };
        if let Err(e) = set_up(&name) {
            say!("network: {e}");
        }
        // The fallback first, so the relay answers from the first second;
        // a lease replaces it when (if) a DHCP server answers.
        let (addr, prefix, how) = match fallback {
            Some((a, p)) => (a, p, "configured fallback"),
            None => {
                let (a, p) = hw_addr(&name).map(|m| link_local(&m)).unwrap_or((Ipv4Addr::new(169, 254, 1, 1), 16));
                (a, p, "link-local")
            }
        };
        let route = if fallback.is_some() { gw } else { None };
        match set_address(&name, addr, mask_of(prefix), route) {
            Ok(()) => {
                if fallback.is_some() {
                    write_resolv_conf(&dns);
                }
                say!("network: {name} {addr}/{prefix} ({how}) until a DHCP lease comes; asking DHCP now");
            }
            Err(e) => say!("network: {how} {addr}/{prefix}: {e}"),
        }
        let lease = match dhcp(&name, FIRST_DHCP_WAIT) {
            Ok(l) => {
                say!("network: {}", take_lease(&name, &l, gw, &dns));
                Some(l)
            }
            Err(e) => {
                say!(
                    "network: WARNING: {e}; keeping {addr}/{prefix} ({how}); asking DHCP again every {}s",
                    DHCP_RETRY.as_secs()
                );
                None
            }
        };
        renew_loop(name, lease, gw, dns);
    })?;
    Ok("asking for a DHCP lease in the background; the relay starts now".to_string())
}

/// An IPv4 link-local address for `mac` (RFC 3927 2.1: 169.254.1.0 to
/// 169.254.254.255, chosen from the hardware address so it stays the same
/// boot after boot). No ARP probe: the image has no packet socket.
pub fn link_local(mac: &[u8; 6]) -> (Ipv4Addr, u8) {
    let h = mac.iter().fold(2166136261u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(16777619));
    let n = h % (254 * 256);
    (Ipv4Addr::new(169, 254, 1 + (n / 256) as u8, (n % 256) as u8), 16)
}

/// Applies a lease; returns the console summary.
fn take_lease(name: &str, lease: &Lease, gw: Option<Ipv4Addr>, dns: &[String]) -> String {
    if let Err(e) = set_address(name, lease.addr, lease.mask, gw.or(lease.router)) {
        return format!("{name}: lease {}: {e}", lease.addr);
    }
    let servers: Vec<String> = if dns.is_empty() { lease.dns.iter().map(|a| a.to_string()).collect() } else { dns.to_vec() };
    write_resolv_conf(&servers);
    format!(
        "{name} {}/{} via {} dns {} (dhcp from {}, lease {})",
        lease.addr,
        prefix_len(lease.mask),
        lease.router.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
        if servers.is_empty() { "-".to_string() } else { servers.join(",") },
        lease.server,
        if lease.lease_secs == u32::MAX { "infinite".to_string() } else { format!("{}s", lease.lease_secs) }
    )
}

/// Configures a static `address` (`"a.b.c.d/prefix"`) on `iface` (default:
/// the first interface other than `lo`), an optional default `gateway`, and
/// `dns` servers (written to `/etc/resolv.conf`). Also brings `lo` up.
/// For `"dhcp"` see [`start`].
///
/// Returns a one-line summary such as `eth0 10.0.2.15/24 via 10.0.2.2 dns - (static)`.
pub fn configure(iface: Option<&str>, address: &str, gateway: Option<&str>, dns: &[String]) -> io::Result<String> {
    let _ = set_up("lo");
    let name = match iface {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => first_interface(Duration::from_secs(3))
            .ok_or_else(|| Error::new(ErrorKind::NotFound, "no network interface found (no NIC driver matched the hardware?)"))?,
    };
    set_up(&name)?;
    let (addr, prefix) = parse_cidr(address)?;
    let mask = mask_of(prefix);
    let gw = match gateway {
        Some(g) if !g.is_empty() => Some(g.parse::<Ipv4Addr>().map_err(|_| inval(format!("gateway `{g}` is not an IPv4 address")))?),
        _ => None,
    };
    set_address(&name, addr, mask, gw)?;
    write_resolv_conf(dns);
    Ok(format!(
        "{name} {addr}/{prefix} via {} dns {} (static)",
        gw.map(|g| g.to_string()).unwrap_or_else(|| "-".into()),
        if dns.is_empty() { "-".to_string() } else { dns.join(",") }
    ))
}

fn inval(m: String) -> Error {
    Error::new(ErrorKind::InvalidInput, m)
}

/// `"192.168.1.20/24"` → (address, prefix), by the configuration's own
/// parser ([`crate::config::values::parse_ipv4_prefix`]): what `bartleby
/// check` accepts is what is applied here.
fn parse_cidr(s: &str) -> io::Result<(Ipv4Addr, u8)> {
    crate::config::values::parse_ipv4_prefix(s).map_err(inval)
}

fn mask_of(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(if prefix == 0 { 0 } else { u32::MAX << (32 - prefix as u32) })
}

fn prefix_len(mask: Ipv4Addr) -> u32 {
    u32::from(mask).count_ones()
}

/// The first interface in /sys/class/net that is not loopback, waiting up to
/// `wait` for a driver to register one.
pub fn first_interface(wait: Duration) -> Option<String> {
    let until = Instant::now() + wait;
    loop {
        let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.retain(|n| n != "lo" && !n.starts_with("sit") && !n.starts_with("ip6") && !n.starts_with("dummy"));
        names.sort();
        if let Some(n) = names.into_iter().next() {
            return Some(n);
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------- ioctls

/// `struct ifreq`: 16-byte name + a union (24 bytes covers every ABI).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> io::Result<IfReq> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() > 15 {
            return Err(inval(format!("bad interface name `{name}`")));
        }
        let mut r = IfReq { name: [0; 16], data: [0; 24] };
        r.name[..b.len()].copy_from_slice(b);
        Ok(r)
    }
    fn with_addr(name: &str, a: Ipv4Addr) -> io::Result<IfReq> {
        let mut r = IfReq::new(name)?;
        r.data[..16].copy_from_slice(&sockaddr_in(a));
        Ok(r)
    }
}

/// A `struct sockaddr_in` as bytes (family is host order, port/address network order).
fn sockaddr_in(a: Ipv4Addr) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    s[4..8].copy_from_slice(&a.octets());
    s
}

fn ctl_socket() -> io::Result<UdpSocket> {
    UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).or_else(|_| UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)))
}

fn ioctl(fd: i32, req: libc::c_ulong, arg: *mut libc::c_void) -> io::Result<()> {
    // SAFETY: every caller passes a pointer to a live, correctly sized request struct.
    let r = unsafe { libc::ioctl(fd, req as _, arg) };
    if r < 0 { Err(Error::last_os_error()) } else { Ok(()) }
}

/// Sets IFF_UP (and IFF_RUNNING) on an interface.
pub fn set_up(name: &str) -> io::Result<()> {
    let s = ctl_socket().or_else(|_| raw_dgram())?;
    let mut r = IfReq::new(name)?;
    ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut r as *mut _ as *mut _)?;
    let mut flags = i16::from_ne_bytes([r.data[0], r.data[1]]);
    flags |= (libc::IFF_UP | libc::IFF_RUNNING) as i16;
    r.data[..2].copy_from_slice(&flags.to_ne_bytes());
    ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS as _, &mut r as *mut _ as *mut _)
        .map_err(|e| Error::new(e.kind(), format!("{name}: cannot set up: {e}")))
}

/// A UDP socket without binding: works before `lo` has its address.
fn raw_dgram() -> io::Result<UdpSocket> {
    // SAFETY: plain socket(2); the fd is owned by the returned UdpSocket.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Error::last_os_error());
    }
    use std::os::fd::FromRawFd;
    // SAFETY: fd is a fresh, valid socket.
    Ok(unsafe { UdpSocket::from_raw_fd(fd) })
}

/// MAC address of an interface.
fn hw_addr(name: &str) -> io::Result<[u8; 6]> {
    let s = raw_dgram()?;
    let mut r = IfReq::new(name)?;
    ioctl(s.as_raw_fd(), libc::SIOCGIFHWADDR as _, &mut r as *mut _ as *mut _)?;
    let mut m = [0u8; 6];
    m.copy_from_slice(&r.data[2..8]);
    Ok(m)
}

/// `struct rtentry` (route.h); unsigned long/pointers follow the target ABI.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: [u8; 16],
    rt_gateway: [u8; 16],
    rt_genmask: [u8; 16],
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// Address, netmask, broadcast, and (optionally) the default route.
fn set_address(name: &str, addr: Ipv4Addr, mask: Ipv4Addr, gw: Option<Ipv4Addr>) -> io::Result<()> {
    let s = raw_dgram()?;
    let fd = s.as_raw_fd();
    let mut r = IfReq::with_addr(name, addr)?;
    ioctl(fd, libc::SIOCSIFADDR as _, &mut r as *mut _ as *mut _).map_err(|e| Error::new(e.kind(), format!("{name}: SIOCSIFADDR {addr}: {e}")))?;
    let mut r = IfReq::with_addr(name, mask)?;
    ioctl(fd, libc::SIOCSIFNETMASK as _, &mut r as *mut _ as *mut _).map_err(|e| Error::new(e.kind(), format!("{name}: SIOCSIFNETMASK {mask}: {e}")))?;
    let bcast = Ipv4Addr::from(u32::from(addr) | !u32::from(mask));
    let mut r = IfReq::with_addr(name, bcast)?;
    let _ = ioctl(fd, libc::SIOCSIFBRDADDR as _, &mut r as *mut _ as *mut _);
    set_up(name)?;
    match gw {
        Some(g) => replace_default_route(fd, name, g),
        None => Ok(()),
    }
}

/// Makes `g` the default route through `name`: first deletes every default
/// route on `name` (the fallback's, or a lease renewal's with a new router;
/// a zero gateway in SIOCDELRT matches any, and none there is fine), then
/// adds the new one (already there is fine too).
fn replace_default_route(fd: i32, name: &str, g: Ipv4Addr) -> io::Result<()> {
    let mut dev = [0u8; 16];
    dev[..name.len()].copy_from_slice(name.as_bytes());
    let mut rt = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_flags: libc::RTF_UP as libc::c_ushort,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: dev.as_mut_ptr() as *mut libc::c_char,
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    while ioctl(fd, libc::SIOCDELRT as _, &mut rt as *mut _ as *mut _).is_ok() {}
    rt.rt_gateway = sockaddr_in(g);
    rt.rt_flags = (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort;
    match ioctl(fd, libc::SIOCADDRT as _, &mut rt as *mut _ as *mut _) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(Error::new(e.kind(), format!("default route via {g}: {e}"))),
    }
}

/// Writes /etc/resolv.conf (musl re-reads it on every lookup).
pub fn write_resolv_conf(servers: &[String]) {
    if servers.is_empty() {
        return;
    }
    let mut s = String::new();
    for d in servers {
        // resolv.conf has no port: an `ip:port` entry is written as its ip
        // (Bartleby's own resolver reads `[network] dns` with the port).
        let ip = crate::dns::parse_server(d).map_or_else(|| d.trim().to_string(), |a| a.ip().to_string());
        s.push_str("nameserver ");
        s.push_str(&ip);
        s.push('\n');
    }
    let _ = std::fs::create_dir_all("/etc");
    let tmp = "/etc/resolv.conf.tmp";
    if std::fs::write(tmp, s.as_bytes()).is_ok() {
        let _ = std::fs::rename(tmp, "/etc/resolv.conf");
    }
}

// ---------------------------------------------------------------- DHCP

fn random_u32(mac: &[u8; 6]) -> u32 {
    crate::sys::random_u32() ^ u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]])
}

fn dhcp_socket(name: &str) -> io::Result<UdpSocket> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 68)).map_err(|e| Error::new(e.kind(), format!("dhcp: bind 0.0.0.0:68: {e}")))?;
    s.set_broadcast(true)?;
    let n = name.as_bytes();
    // SAFETY: setsockopt with a byte buffer of the given length.
    let r = unsafe {
        libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_BINDTODEVICE, n.as_ptr() as *const _, n.len() as libc::socklen_t)
    };
    if r < 0 {
        return Err(Error::last_os_error());
    }
    Ok(s)
}

/// Sends `msg` and waits for a reply of one of `want` kinds; bounded retries.
fn exchange(s: &UdpSocket, msg: &[u8], xid: u32, mac: &[u8; 6], want: &[u8], deadline: Instant) -> io::Result<Option<(u8, Lease)>> {
    let mut buf = [0u8; 1500];
    let mut wait = Duration::from_secs(2);
    while Instant::now() < deadline {
        s.send_to(msg, (Ipv4Addr::BROADCAST, 67))?;
        let until = (Instant::now() + wait).min(deadline);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s.set_read_timeout(Some(left))?;
            match s.recv_from(&mut buf) {
                Ok((n, _)) => {
                    if let Some((k, l)) = parse(&buf[..n], xid, mac)
                        && want.contains(&k)
                    {
                        return Ok(Some((k, l)));
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
                Err(e) => return Err(e),
            }
        }
        wait = (wait * 2).min(Duration::from_secs(8));
    }
    Ok(None)
}

/// One full DISCOVER/OFFER/REQUEST/ACK exchange on `name`, at most `limit` long.
pub fn dhcp(name: &str, limit: Duration) -> io::Result<Lease> {
    let mac = hw_addr(name)?;
    let s = dhcp_socket(name)?;
    let start = Instant::now();
    let deadline = start + limit;
    for _attempt in 0..3 {
        let xid = random_u32(&mac);
        let mut pkt = [0u8; 300];
        let n = build(&mut pkt, xid, &mac, DISCOVER, None, start.elapsed().as_secs() as u16);
        let Some((_, offer)) = exchange(&s, &pkt[..n], xid, &mac, &[OFFER], deadline)? else { break };
        let n = build(&mut pkt, xid, &mac, REQUEST, Some((offer.addr, offer.server)), start.elapsed().as_secs() as u16);
        match exchange(&s, &pkt[..n], xid, &mac, &[ACK, NAK], deadline)? {
            Some((ACK, lease)) => return Ok(lease),
            Some(_) => say!(@"net", "{name}: DHCPNAK from {}, starting over", offer.server),
            None => break,
        }
    }
    Err(Error::new(ErrorKind::TimedOut, format!("{name}: no DHCP lease within {}s", limit.as_secs())))
}

/// Renews at half the lease time (a full exchange, re-applied if anything
/// changed); with no lease yet, asks again every [`DHCP_RETRY`] until one
/// arrives. Runs for ever (in the `dhcp` thread).
fn renew_loop(name: String, mut lease: Option<Lease>, gw: Option<Ipv4Addr>, dns: Vec<String>) {
    let mut got = Instant::now();
    loop {
        let Some(wait) = next_try(lease.as_ref().map(|l| l.lease_secs), got.elapsed()) else { return };
        std::thread::sleep(wait);
        match dhcp(&name, Duration::from_secs(30)) {
            Ok(new) => {
                let changed = lease.as_ref().is_none_or(|l| new.addr != l.addr || new.mask != l.mask || new.router != l.router);
                if changed {
                    say!(@"net", "{}", take_lease(&name, &new, gw, &dns));
                }
                lease = Some(new);
                got = Instant::now();
            }
            Err(e) => {
                if let Some(l) = &lease {
                    say!(@"net", "{name}: lease renewal failed ({e}); keeping {}", l.addr);
                }
            }
        }
    }
}

/// How long the `dhcp` thread sleeps before its next exchange: `lease_secs`
/// of the lease held (`None`: none yet), obtained `held` ago. `None`: an
/// infinite lease, nothing more to do.
/// Renewal at T1 (half the lease); after a failed one, half the time left
/// down to 60 s (RFC 2131 4.4.5), so a DHCP server down for a while is asked
/// several times before the lease runs out; past it, every 60 s (the
/// address is kept meanwhile: the relay stays reachable where it was).
fn next_try(lease_secs: Option<u32>, held: Duration) -> Option<Duration> {
    let s = match lease_secs {
        None => return Some(DHCP_RETRY),
        Some(u32::MAX) => return None,
        Some(s) => u64::from(s),
    };
    let t1 = Duration::from_secs((s / 2).clamp(30, 7 * 86400));
    if held < t1 {
        return Some(t1 - held);
    }
    let left = Duration::from_secs(s).saturating_sub(held);
    Some((left / 2).max(Duration::from_secs(60)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_and_mask() {
        assert_eq!(parse_cidr("192.168.1.20/24").unwrap(), (Ipv4Addr::new(192, 168, 1, 20), 24));
        // a bare address: refused, as the configuration refuses it (this
        // parser used to take it as a /24)
        assert!(parse_cidr("10.0.0.1").is_err());
        assert!(parse_cidr("10.0.0.1/33").is_err());
        assert!(parse_cidr("nope/8").is_err());
        assert_eq!(mask_of(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(mask_of(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(prefix_len(Ipv4Addr::new(255, 255, 240, 0)), 20);
    }

    #[test]
    fn renewal_backs_off_within_the_lease() {
        let s = Duration::from_secs;
        // no lease: ask every DHCP_RETRY; infinite: never again
        assert_eq!(next_try(None, s(0)), Some(DHCP_RETRY));
        assert_eq!(next_try(Some(u32::MAX), s(5)), None);
        // fresh 1 h lease: renew at T1 = half of it (RFC 2131 4.4.5)
        assert_eq!(next_try(Some(3600), s(0)), Some(s(1800)));
        // the renewal at T1 failed (30 s spent on it): the next try must come
        // well before the lease runs out at 3600 s (RFC 2131: half the time
        // left, down to 60 s), not another 1800 s later (after expiry)
        let w = next_try(Some(3600), s(1830)).unwrap();
        assert!(w >= s(60) && s(1830) + w < s(3600) - s(60), "{w:?}");
        assert_eq!(w, s(885));
        // close to and past expiry: every 60 s
        assert_eq!(next_try(Some(3600), s(3550)), Some(s(60)));
        assert_eq!(next_try(Some(3600), s(9000)), Some(s(60)));
        // a short lease is still renewed no sooner than 30 s, a long one at
        // least once a week
        assert_eq!(next_try(Some(10), s(0)), Some(s(30)));
        assert_eq!(next_try(Some(u32::MAX - 1), s(0)), Some(s(7 * 86400)));
    }

    #[test]
    fn link_local_is_in_rfc3927_range_and_stable() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..2000u32 {
            let b = i.to_be_bytes();
            let mac = [0x52, 0x54, b[0], b[1], b[2], b[3]];
            let (a, p) = link_local(&mac);
            assert_eq!(p, 16);
            let o = a.octets();
            // 169.254.0.x and 169.254.255.x are reserved (RFC 3927 2.1)
            assert!(o[0] == 169 && o[1] == 254 && (1..=254).contains(&o[2]), "{a}");
            assert_eq!(link_local(&mac).0, a);
            seen.insert(a);
        }
        // different cards get different addresses (almost always)
        assert!(seen.len() > 1900, "{}", seen.len());
    }
}
