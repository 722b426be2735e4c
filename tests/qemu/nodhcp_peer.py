#!/usr/bin/env python3
"""The other end of a QEMU `-netdev socket,udp=...` link: a network with NO
DHCP server (stdlib only).

  nodhcp_peer.py MY_PORT QEMU_PORT GUEST_IP TIMEOUT [WANT_RETRY_SECS]

QEMU sends each Ethernet frame of the guest as one UDP datagram to
127.0.0.1:MY_PORT and takes frames from us on 127.0.0.1:QEMU_PORT. We are
10.0.2.2 (MAC 52:54:00:00:00:02): we answer ARP for it, count the guest's
DHCP DISCOVERs (and never answer them), and open TCP connections to
GUEST_IP:25 by hand (SYN, ACK, read the banner, RST) until the SMTP banner
comes. With WANT_RETRY_SECS we go on listening until a DISCOVER comes at
least that long after the first one (the client asks again by itself).

Prints lines `banner <secs> <line>`, `discover <count> <secs of each>`;
exit 0 when the banner came (and the retry, if asked), 1 otherwise.
"""
import random
import socket
import struct
import sys
import time

MY_MAC = bytes.fromhex("525400000002")
MY_IP = socket.inet_aton("10.0.2.2")


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip_packet(src, dst, proto, payload):
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), random.randrange(65536), 0x4000, 64, proto, 0, src, dst)
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return hdr + payload


def tcp_segment(src, dst, sport, dport, seq, ack, flags, data=b""):
    h = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 8192, 0, 0)
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(h) + len(data))
    c = csum(pseudo + h + data)
    return h[:16] + struct.pack("!H", c) + h[18:] + data


def main():
    my_port, qemu_port, guest_ip, timeout = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    want_retry = float(sys.argv[5]) if len(sys.argv) > 5 else 0
    gip = socket.inet_aton(guest_ip)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", my_port))
    s.settimeout(0.2)
    dest = ("127.0.0.1", qemu_port)
    start = time.monotonic()
    guest_mac = None
    discovers = []
    banner = None
    conn = None  # (sport, our next seq, data so far)
    next_syn = 0.0

    def send_eth(dst_mac, ethertype, payload):
        s.sendto(dst_mac + MY_MAC + struct.pack("!H", ethertype) + payload, dest)

    while time.monotonic() - start < timeout:
        now = time.monotonic()
        done_retry = not want_retry or (len(discovers) >= 2 and discovers[-1] - discovers[0] >= want_retry)
        if banner and done_retry:
            break
        if guest_mac and not banner and now >= next_syn:
            sport = random.randrange(20000, 60000)
            iss = random.randrange(1 << 31)
            conn = (sport, iss + 1, b"")
            send_eth(guest_mac, 0x0800, ip_packet(MY_IP, gip, 6, tcp_segment(MY_IP, gip, sport, 25, iss, 0, 0x02)))
            next_syn = now + 0.5
        try:
            f = s.recv(2048)
        except socket.timeout:
            continue
        if len(f) < 14:
            continue
        src_mac, etype, p = f[6:12], struct.unpack("!H", f[12:14])[0], f[14:]
        if etype == 0x0806 and len(p) >= 28:
            op, sha, spa, tpa = struct.unpack("!H", p[6:8])[0], p[8:14], p[14:18], p[24:28]
            if op == 1 and tpa == MY_IP:
                reply = p[:6] + struct.pack("!H", 2) + MY_MAC + MY_IP + sha + spa
                send_eth(sha, 0x0806, reply)
            continue
        if etype != 0x0800 or len(p) < 20:
            continue
        ihl = (p[0] & 15) * 4
        proto, src, dst = p[9], p[12:16], p[16:20]
        body = p[ihl:struct.unpack("!H", p[2:4])[0]]
        if proto == 17 and len(body) >= 8 and struct.unpack("!H", body[2:4])[0] == 67:
            # DHCP from the guest: note it, never answer
            guest_mac = guest_mac or src_mac
            d = body[8:]
            if len(d) > 242 and d[236:240] == bytes([99, 130, 83, 99]) and bytes([53, 1, 1]) in d[240:]:
                discovers.append(round(now - start, 1))
            continue
        if proto == 6 and src == gip and conn and len(body) >= 20:
            guest_mac = src_mac
            sport_g, dport_g, seq, ack, off, flags = struct.unpack("!HHIIBB", body[:14])
            if dport_g != conn[0]:
                continue
            data = body[(off >> 4) * 4:]
            if flags & 0x04:  # RST: not listening yet
                conn = None
                continue
            if flags & 0x12 == 0x12:  # SYN-ACK
                send_eth(src_mac, 0x0800, ip_packet(MY_IP, gip, 6, tcp_segment(MY_IP, gip, conn[0], 25, conn[1], seq + 1, 0x10)))
                continue
            if data:
                got = conn[2] + data
                conn = (conn[0], conn[1], got)
                send_eth(src_mac, 0x0800, ip_packet(MY_IP, gip, 6, tcp_segment(MY_IP, gip, conn[0], 25, conn[1], seq + len(data), 0x10)))
                if b"\n" in got:
                    line = got.split(b"\n")[0].decode("latin-1").strip()
                    if line.startswith("220"):
                        banner = (round(time.monotonic() - start, 1), line)
                    # close: RST (we never need the session)
                    send_eth(src_mac, 0x0800, ip_packet(MY_IP, gip, 6, tcp_segment(MY_IP, gip, conn[0], 25, conn[1], 0, 0x04)))
                    conn = None
    if banner:
        print(f"banner {banner[0]} {banner[1]}")
    else:
        print("banner none")
    print(f"discover {len(discovers)} {' '.join(map(str, discovers))}")
    ok = banner is not None and (not want_retry or (len(discovers) >= 2 and discovers[-1] - discovers[0] >= want_retry))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
