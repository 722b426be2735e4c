//! The DHCP messages (RFC 2131): a BOOTREQUEST built into a buffer, a
//! BOOTREPLY parsed into a [`Lease`]. Pure functions of bytes; the sockets,
//! retries and renewal are netcfg's.

use std::net::Ipv4Addr;

/// What a DHCPACK gave us.
#[derive(Debug, Clone)]
pub struct Lease {
    pub addr: Ipv4Addr,
    pub mask: Ipv4Addr,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub server: Ipv4Addr,
    /// Seconds; `u32::MAX` means infinite.
    pub lease_secs: u32,
}

pub(super) const DISCOVER: u8 = 1;
pub(super) const OFFER: u8 = 2;
pub(super) const REQUEST: u8 = 3;
pub(super) const ACK: u8 = 5;
pub(super) const NAK: u8 = 6;
pub(super) const COOKIE: [u8; 4] = [99, 130, 83, 99];

/// Builds a BOOTREQUEST (300 bytes, the BOOTP minimum some servers insist on).
pub(super) fn build(buf: &mut [u8; 300], xid: u32, mac: &[u8; 6], kind: u8, want: Option<(Ipv4Addr, Ipv4Addr)>, secs: u16) -> usize {
    buf.fill(0);
    buf[0] = 1; // BOOTREQUEST
    buf[1] = 1; // ethernet
    buf[2] = 6;
    buf[4..8].copy_from_slice(&xid.to_be_bytes());
    buf[8..10].copy_from_slice(&secs.to_be_bytes());
    buf[10] = 0x80; // broadcast flag: we cannot take unicast before we have an address
    buf[28..34].copy_from_slice(mac);
    buf[236..240].copy_from_slice(&COOKIE);
    let mut i = 240;
    let mut opt = |buf: &mut [u8; 300], code: u8, data: &[u8]| {
        buf[i] = code;
        buf[i + 1] = data.len() as u8;
        buf[i + 2..i + 2 + data.len()].copy_from_slice(data);
        i += 2 + data.len();
    };
    opt(buf, 53, &[kind]);
    let mut cid = [1u8; 7];
    cid[1..].copy_from_slice(mac);
    opt(buf, 61, &cid);
    if let Some((addr, server)) = want {
        opt(buf, 50, &addr.octets());
        opt(buf, 54, &server.octets());
    }
    opt(buf, 55, &[1, 3, 6, 15, 51, 54, 58, 59]);
    opt(buf, 57, &576u16.to_be_bytes());
    buf[i] = 255;
    300
}

/// Parses a BOOTREPLY for us; returns (message type, lease fields).
pub(super) fn parse(p: &[u8], xid: u32, mac: &[u8; 6]) -> Option<(u8, Lease)> {
    if p.len() < 241 || p[0] != 2 || p[4..8] != xid.to_be_bytes() || p[28..34] != mac[..] || p[236..240] != COOKIE {
        return None;
    }
    let ip = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    let mut l = Lease {
        addr: ip(&p[16..20]),
        mask: Ipv4Addr::new(255, 255, 255, 0),
        router: None,
        dns: Vec::new(),
        server: ip(&p[20..24]),
        lease_secs: 3600,
    };
    let mut kind = 0;
    let mut i = 240;
    while i < p.len() {
        let code = p[i];
        if code == 0 {
            i += 1;
            continue;
        }
        if code == 255 || i + 1 >= p.len() {
            break;
        }
        let len = p[i + 1] as usize;
        let Some(d) = p.get(i + 2..i + 2 + len) else { break };
        match (code, len) {
            (53, 1) => kind = d[0],
            (1, 4) => l.mask = ip(d),
            (3, n) if n >= 4 => l.router = Some(ip(d)),
            (6, n) if n >= 4 => l.dns = d.chunks_exact(4).take(3).map(ip).collect(),
            (51, 4) => l.lease_secs = u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
            (54, 4) => l.server = ip(d),
            _ => {}
        }
        i += 2 + len;
    }
    // an offer or lease must name an address this host can take
    let a = l.addr;
    if matches!(kind, OFFER | ACK) && (a.is_unspecified() || a.is_broadcast() || a.is_loopback() || a.is_multicast()) {
        return None;
    }
    Some((kind, l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dhcp_roundtrip() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let mut p = [0u8; 300];
        let n = build(&mut p, 0xdeadbeef, &mac, DISCOVER, None, 0);
        assert_eq!(n, 300);
        assert_eq!(&p[236..240], &COOKIE);
        // turn our request into a fake server reply
        let mut r = p.to_vec();
        r[0] = 2;
        r[16..20].copy_from_slice(&[10, 0, 2, 15]);
        let opts: &[u8] = &[53, 1, ACK, 1, 4, 255, 255, 255, 0, 3, 4, 10, 0, 2, 2, 6, 4, 10, 0, 2, 3, 51, 4, 0, 1, 81, 128, 54, 4, 10, 0, 2, 2, 255];
        r.truncate(240);
        r.extend_from_slice(opts);
        let (k, l) = parse(&r, 0xdeadbeef, &mac).unwrap();
        assert_eq!(k, ACK);
        assert_eq!(l.addr, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(l.router, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(l.dns, vec![Ipv4Addr::new(10, 0, 2, 3)]);
        assert_eq!(l.lease_secs, 86400);
        assert!(parse(&r, 1, &mac).is_none());
        // an OFFER or ACK without a usable address (yiaddr 0.0.0.0 from a
        // broken or hostile server) is not a lease: applied, it would take
        // the fallback address away and leave the relay unreachable
        for bad in [[0, 0, 0, 0], [255, 255, 255, 255], [127, 0, 0, 1], [224, 0, 0, 1]] {
            r[16..20].copy_from_slice(&bad);
            assert!(parse(&r, 0xdeadbeef, &mac).is_none(), "{bad:?}");
            r[242] = OFFER;
            assert!(parse(&r, 0xdeadbeef, &mac).is_none(), "{bad:?}");
            r[242] = ACK;
        }
        // a NAK has no address: still understood
        r[16..20].copy_from_slice(&[0, 0, 0, 0]);
        r[242] = NAK;
        assert_eq!(parse(&r, 0xdeadbeef, &mac).unwrap().0, NAK);
    }
}
