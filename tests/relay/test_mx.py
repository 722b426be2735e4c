#!/usr/bin/env python3
"""Routing by MX (issue 11, part 3): RFC 5321 5.1 against a DNS server of
our own on loopback, fake primaries on 127.0.0.2 and 127.0.0.3.

The DNS server (below, `struct` only) answers on 127.0.0.1:<high port>;
the relay is pointed at it with `[network] dns = ["127.0.0.1:PORT"]`, so no
query reaches the machine's resolver. Bartleby listens on 127.0.0.1:P and
`smtp_tcp_port = P` (Postfix's knob for the port of MX hosts), so the fake
primaries listen on 127.0.0.2:P and 127.0.0.3:P, and an MX host that
resolves to 127.0.0.1 is Bartleby itself by address.

Postfix, for comparison (smtp(8), RFC 5321 5.1): it sorts MX hosts by
preference, drops itself and every host whose preference is >= its own
(by name: myhostname; by address: inet_interfaces), shuffles equal
preferences, and with no MX record uses the domain's A record. When
nothing better remains it says "mail for X loops back to myself" (5.4.6,
bounce); Bartleby defers (4.4.6) and keeps the mail. A DNS failure is
"Host or domain name not found. Name service error for name=X type=MX:
Host not found, try again" (4.4.3, deferred), as here.
"""

import os
import socket
import struct
import sys
import threading
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import FakePrimary, Relay, free_port  # noqa: E402

P1, P2 = "127.0.0.2", "127.0.0.3"
MSG = b"From: alice@sender.test\r\nSubject: mx\r\n\r\nhello\r\n"


wait_for = harness.wait_for

# ---- a DNS server ---------------------------------------------------------

def name_wire(name):
    out = b""
    for label in name.rstrip(".").split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def read_qname(b, at):
    labels = []
    while b[at]:
        n = b[at]
        labels.append(b[at + 1:at + 1 + n].decode().lower())
        at += 1 + n
    return ".".join(labels), at + 1


class Dns:
    """Serves `zone`: name -> dict with "MX": [(pref, host)], "A": [ip],
    "ttl": seconds, or "mode": one of nxdomain, servfail, silent, wrong_id,
    short (a packet cut inside a record), loop (a compression pointer to
    itself), many (1000 MX answers), tc (truncated over UDP, whole over
    TCP). `down` makes the whole server silent. Records every question."""

    def __init__(self):
        self.zone = {}
        self.down = False
        self.questions = []
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.port = self.udp.getsockname()[1]
        self.tcp = socket.socket()
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("127.0.0.1", self.port))
        self.tcp.listen(4)
        self.tcp.settimeout(0.2)
        self.udp.settimeout(0.2)
        self.stopping = False
        self.threads = [threading.Thread(target=self._udp, daemon=True), threading.Thread(target=self._tcp, daemon=True)]
        for t in self.threads:
            t.start()

    def stop(self):
        self.stopping = True
        for t in self.threads:
            t.join(timeout=2)
        self.udp.close()
        self.tcp.close()

    def answer(self, q, over_tcp=False):
        qid = q[:2]
        name, at = read_qname(q, 12)
        qtype, = struct.unpack("!H", q[at:at + 2])
        question = q[12:at + 4]
        self.questions.append((name, qtype))
        entry = self.zone.get(name)
        mode = entry.get("mode") if entry else None
        head = lambda rcode, an, flags=0x8180: qid + struct.pack("!HHHHH", flags | rcode, 1, an, 0, 0)  # noqa: E731
        if self.down or mode == "silent":
            return None
        if entry is None or mode == "nxdomain":
            return head(3, 0) + question
        if mode == "servfail":
            return head(2, 0) + question
        if mode == "wrong_id":
            bad = bytes([q[0] ^ 0xff, q[1]])
            return bad + head(0, 0)[2:] + question
        ttl = entry.get("ttl", 300)
        rrs = []
        if mode == "many":
            for i in range(1000):
                rrs.append(b"\xc0\x0c" + struct.pack("!HHIH", 15, 1, ttl, 4) + struct.pack("!H", i) + b"\xc0\x0c")
        elif mode == "loop":
            off = len(head(0, 1) + question)
            # An answer whose owner name is a pointer to itself.
            return head(0, 1) + question + struct.pack("!H", 0xc000 | off) + struct.pack("!HHIH", qtype, 1, ttl, 4) + b"\x7f\0\0\2"
        elif qtype == 15:
            for pref, host in entry.get("MX", []):
                data = struct.pack("!H", pref) + name_wire(host)
                rrs.append(b"\xc0\x0c" + struct.pack("!HHIH", 15, 1, ttl, len(data)) + data)
        elif qtype == 1:
            for ip in entry.get("A", []):
                rrs.append(b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, ttl, 4) + socket.inet_aton(ip))
        if mode == "tc" and not over_tcp:
            return head(0, 0, 0x8380) + question
        pkt = head(0, len(rrs)) + question + b"".join(rrs)
        if mode == "short":
            return pkt[:len(pkt) - 3]
        return pkt

    def _udp(self):
        while not self.stopping:
            try:
                q, peer = self.udp.recvfrom(4096)
            except OSError:
                continue
            try:
                a = self.answer(q)
            except Exception as e:  # a bug here must not look like silence
                sys.stderr.write(f"dns server: {e!r}\n")
                a = None
            if a is not None:
                try:
                    self.udp.sendto(a, peer)
                except OSError:
                    pass

    def _tcp(self):
        while not self.stopping:
            try:
                c, _ = self.tcp.accept()
            except OSError:
                continue
            try:
                c.settimeout(2)
                n, = struct.unpack("!H", c.recv(2))
                q = b""
                while len(q) < n:
                    q += c.recv(n - len(q))
                a = self.answer(q, over_tcp=True)
                if a is not None:
                    c.sendall(struct.pack("!H", len(a)) + a)
            except OSError:
                pass
            finally:
                c.close()


# ---- the tests ------------------------------------------------------------

def submit(r, rcpts):
    import smtplib
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.ehlo("client.sender.test")
        s.mail("alice@sender.test")
        for a in rcpts:
            code, resp = s.rcpt(a)
            if code != 250:
                raise AssertionError(f"RCPT {a}: {code} {resp}")
        code, resp = s.data(MSG)
        if code != 250:
            raise AssertionError(f"DATA: {code} {resp}")
        return harness.queued_id(resp.decode())


DOMAINS = ["one.example", "two.example", "three.example", "nomx.example", "nx.example", "sf.example", "slow.example",
           "ttl.example", "hostile.example", "tc.example", "absent.example", "bücher.example"]


class MxTest(unittest.TestCase):
    def setUp(self):
        self.dns = Dns()
        self.relays = []
        self.primaries = []

    def tearDown(self):
        for r in self.relays:
            if self._outcome_failed():
                sys.stderr.write(f"\n--- relay log {r.log} ---\n{r.read_log()[-4000:]}\n")
            r.cleanup()
        for p in self.primaries:
            p.stop()
        self.dns.stop()

    def _outcome_failed(self):
        res = getattr(self._outcome, "result", None)
        if res is None:
            return False
        return any(t is self for t, _ in res.failures + res.errors)

    def relay(self, primary='"mx"', status=False, extra=()):
        self.status_port = free_port() if status else None
        st = f'[status]\nlisten = "127.0.0.1:{self.status_port}"' if status else None
        r = Relay(status=None)
        doms = ", ".join(f'"{d}"' for d in DOMAINS)
        with open(r.config) as f:
            lines = [ln for ln in f.read().splitlines() if not ln.startswith(("primary =", "relay_domains ="))]
        lines += [f"primary = {primary.replace('PORT', str(r.port))}", f"relay_domains = [{doms}]", f"smtp_tcp_port = {r.port}", 'my_names = ["mx-alias.example.org"]',
                  'connect_timeout = "3s"', *extra]
        if st:
            lines.append(st)
        lines += ["[network]", f'dns = ["127.0.0.1:{self.dns.port}"]']
        with open(r.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.relays.append(r)
        r.start()
        if status:
            self.assertTrue(harness.wait_port(self.status_port))
        return r

    def primary(self, host, r):
        p = FakePrimary(r.port, {}, host=host)
        self.primaries.append(p)
        return p

    def rcpts_at(self, p):
        return [c for c in p.commands if c.upper().startswith("RCPT")]

    def page(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/", timeout=10) as resp:
            return resp.read().decode()

    def queued_error(self, r, qid):
        try:
            with open(os.path.join(r.spool, "state", qid), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def deferred_with(self, r, qid, text, timeout=20):
        return wait_for(lambda: text in self.queued_error(r, qid), timeout)

    def base_zone(self):
        z = self.dns.zone
        z["p1.example"] = {"A": [P1]}
        z["p2.example"] = {"A": [P2]}
        z["backup.example.org"] = {"A": ["127.0.0.1"]}
        z["self-by-address.example"] = {"A": ["127.0.0.1"]}
        return z

    # -- RFC 5321 5.1 -------------------------------------------------------

    def test_behind_one_primary(self):
        """Bartleby MX 20 behind p1 MX 10: mail goes to p1."""
        z = self.base_zone()
        z["one.example"] = {"MX": [(20, "backup.example.org"), (10, "p1.example")]}
        r = self.relay()
        p1, p2 = self.primary(P1, r), self.primary(P2, r)
        submit(r, ["bob@one.example"])
        self.assertTrue(r.wait_empty(15), r.mailq())
        self.assertEqual(len(p1.acked), 1)
        self.assertEqual(p2.connections, 0)
        self.assertIn("relay=p1.example[127.0.0.2]", r.read_log())

    def test_two_equal_primaries_share_and_fail_over(self):
        """MX 10 p1, MX 10 p2, Bartleby MX 20: equal preferences shuffled, so
        over several messages both get mail; with p2 down p1 gets all."""
        z = self.base_zone()
        z["two.example"] = {"MX": [(10, "p1.example"), (10, "p2.example"), (20, "backup.example.org")]}
        r = self.relay()
        p1, p2 = self.primary(P1, r), self.primary(P2, r)
        for i in range(12):
            submit(r, [f"u{i}@two.example"])
            self.assertTrue(r.wait_empty(15), r.mailq())
        self.assertEqual(len(p1.acked) + len(p2.acked), 12)
        self.assertGreater(len(p1.acked), 0, "p1 never chosen in 12 shuffles")
        self.assertGreater(len(p2.acked), 0, "p2 never chosen in 12 shuffles")
        p2.stop()
        before = len(p1.acked)
        for i in range(5):
            submit(r, [f"v{i}@two.example"])
            self.assertTrue(r.wait_empty(15), r.mailq())
        self.assertEqual(len(p1.acked) - before, 5)

    def test_bartleby_best_mx_loops_back(self):
        """Bartleby MX 5 ahead of the primaries: nothing better remains, the
        mail is deferred (Postfix: 5.4.6 bounce) and the page warns."""
        z = self.base_zone()
        z["one.example"] = {"MX": [(5, "backup.example.org"), (10, "p1.example")]}
        r = self.relay(status=True)
        p1 = self.primary(P1, r)
        qid = submit(r, ["bob@one.example"])
        self.assertTrue(self.deferred_with(r, qid, "4.4.6 mail for one.example loops back to myself"), self.queued_error(r, qid))
        self.assertEqual(p1.connections, 0)
        self.assertIn(qid, r.queue_ids())
        self.assertIn("loops back to myself", r.mailq())
        page = self.page()
        self.assertIn('id="route-warning"', page)
        self.assertIn("loops back to myself", page)
        import json
        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/api/queue", timeout=10) as resp:
            routes = {x["domain"]: x for x in json.load(resp)["routes"]}
        self.assertTrue(routes["one.example"]["warning"])
        self.assertIn("loops back to myself", routes["one.example"]["route"])

    def test_self_by_my_names_and_by_address_with_equal_preference(self):
        """Bartleby found by `my_names` and by address (an MX host resolving
        to the address and port it listens on); an equally preferred
        primary is dropped too (Postfix: preference >= own)."""
        z = self.base_zone()
        z["one.example"] = {"MX": [(10, "self-by-address.example"), (10, "p1.example")]}
        z["two.example"] = {"MX": [(10, "mx-alias.example.org"), (10, "p2.example")]}
        z["three.example"] = {"MX": [(10, "self-by-address.example"), (5, "p2.example")]}
        r = self.relay()
        p1, p2 = self.primary(P1, r), self.primary(P2, r)
        q1 = submit(r, ["bob@one.example"])
        q2 = submit(r, ["bob@two.example"])
        q3 = submit(r, ["bob@three.example"])
        self.assertTrue(self.deferred_with(r, q1, "mail for one.example loops back to myself"), self.queued_error(r, q1))
        self.assertTrue(self.deferred_with(r, q2, "mail for two.example loops back to myself"), self.queued_error(r, q2))
        self.assertTrue(wait_for(lambda: q3 not in r.queue_ids(), 15), r.mailq())
        self.assertEqual(p1.connections, 0)
        self.assertEqual(len(p2.acked), 1)

    def test_absent_from_mx_set(self):
        """Bartleby is no MX of the domain at all: it delivers to the MX hosts."""
        z = self.base_zone()
        z["absent.example"] = {"MX": [(10, "p1.example")]}
        r = self.relay()
        p1 = self.primary(P1, r)
        submit(r, ["bob@absent.example"])
        self.assertTrue(r.wait_empty(15), r.mailq())
        self.assertEqual(len(p1.acked), 1)

    def test_no_mx_uses_the_address_and_says_so(self):
        """No MX record: the domain's own A record (implicit MX, as Postfix);
        the page notes that Bartleby is no MX of it."""
        z = self.base_zone()
        z["nomx.example"] = {"A": [P1]}
        r = self.relay(status=True)
        p1 = self.primary(P1, r)
        submit(r, ["bob@nomx.example"])
        self.assertTrue(r.wait_empty(15), r.mailq())
        self.assertEqual(len(p1.acked), 1)
        page = self.page()
        self.assertIn("has no MX record", page)
        self.assertIn("Route for nomx.example", page)
        self.assertIn(f"nomx.example[{P1}]:{r.port}", page)

    def test_recipients_in_two_destinations(self):
        """One message for one.example (p1) and three.example (p2): each
        primary gets only its own recipient; both are marked sent."""
        z = self.base_zone()
        z["one.example"] = {"MX": [(10, "p1.example")]}
        z["three.example"] = {"MX": [(10, "p2.example")]}
        r = self.relay()
        p1, p2 = self.primary(P1, r), self.primary(P2, r)
        submit(r, ["bob@one.example", "carol@three.example", "dave@one.example"])
        self.assertTrue(r.wait_empty(15), r.mailq())
        self.assertEqual(sorted(self.rcpts_at(p1)), ["RCPT TO:<bob@one.example>", "RCPT TO:<dave@one.example>"])
        self.assertEqual(self.rcpts_at(p2), ["RCPT TO:<carol@three.example>"])

    def test_grouped_by_destination(self):
        """Postfix's per-destination queues: the due messages of two domains
        with the same MX hosts share one connection (delivery_connections =
        1), a third domain's go over a connection of their own."""
        z = self.base_zone()
        z["one.example"] = {"MX": [(10, "p1.example"), (20, "backup.example.org")]}
        z["absent.example"] = {"MX": [(10, "p1.example")]}
        z["three.example"] = {"MX": [(10, "p2.example")]}
        r = self.relay(extra=["delivery_connections = 1"])
        ids = [submit(r, [rc]) for rc in ["a@one.example", "b@absent.example", "c@one.example", "d@three.example", "e@absent.example"]]
        # The first of each destination is tried and deferred; the others
        # wait for the dead-host cache's retry time without a try.
        for qid in (ids[0], ids[3]):
            self.assertTrue(self.deferred_with(r, qid, "connect to p"), self.queued_error(r, qid))
        self.assertEqual(sorted(r.queue_ids()), sorted(ids))
        p1, p2 = self.primary(P1, r), self.primary(P2, r)
        r.flush()
        self.assertTrue(r.wait_empty(15), r.mailq())
        self.assertEqual((len(p1.acked), len(p2.acked)), (4, 1))
        self.assertEqual((p1.connections, p2.connections), (1, 1))

    def test_other_destination_down_is_tried_once_per_run(self):
        """Messages for one.example (p1, up) that also name three.example
        (p2, greeting 421): p2 is asked once in the run, not once per
        message; its recipients are deferred with its reply, p1 gets all."""
        z = self.base_zone()
        z["one.example"] = {"MX": [(10, "p1.example")]}
        z["three.example"] = {"MX": [(10, "p2.example")]}
        r = self.relay(extra=["delivery_connections = 1"])
        ids = [submit(r, [f"u{i}@one.example", f"v{i}@three.example"]) for i in range(4)]
        self.assertTrue(self.deferred_with(r, ids[0], "connect to p"), self.queued_error(r, ids[0]))
        p1 = self.primary(P1, r)
        p2 = FakePrimary(r.port, {"greeting": "421 4.3.2 p2 busy"}, host=P2)
        self.primaries.append(p2)
        r.flush()
        self.assertTrue(wait_for(lambda: len(p1.acked) == 4, 15), (len(p1.acked), r.mailq()))
        for qid in ids:
            self.assertTrue(self.deferred_with(r, qid, "p2 busy"), self.queued_error(r, qid))
        self.assertEqual(p2.connections, 1)

    def test_one_destination_down_other_delivered(self):
        """one.example's only primary is down, three.example's is up: the
        recipient of three.example is sent, one.example's waits (the dead
        host cache is per destination)."""
        z = self.base_zone()
        z["one.example"] = {"MX": [(10, "p1.example")]}
        z["three.example"] = {"MX": [(10, "p2.example")]}
        r = self.relay()
        p2 = self.primary(P2, r)
        q1 = submit(r, ["bob@one.example"])
        self.assertTrue(self.deferred_with(r, q1, "connect to p1.example[127.0.0.2]"), self.queued_error(r, q1))
        submit(r, ["carol@three.example"])
        self.assertTrue(wait_for(lambda: len(p2.acked) == 1, 15), r.mailq())
        self.assertEqual(r.queue_ids(), [q1])

    def test_one_message_first_destination_down_other_still_delivered(self):
        """One message for bob@one.example (p1 down) then carol@three.example
        (p2 up): carol is sent in the first run and recorded, bob waits.
        Before, the message went to one.example's group only; p1 unreachable
        deferred every recipient, carol too, run after run, until
        max_queue_lifetime bounced her though p2 was up all along. Postfix's
        qmgr keeps a queue per destination: a dead one holds up no other."""
        z = self.base_zone()
        z["one.example"] = {"MX": [(10, "p1.example")]}
        z["three.example"] = {"MX": [(10, "p2.example")]}
        r = self.relay()
        p2 = self.primary(P2, r)
        q = submit(r, ["bob@one.example", "carol@three.example"])
        self.assertTrue(wait_for(lambda: len(p2.acked) == 1, 15), (r.mailq(), self.queued_error(r, q)))
        self.assertEqual(self.rcpts_at(p2), ["RCPT TO:<carol@three.example>"])
        self.assertTrue(wait_for(lambda: "sent carol@three.example" in self.queued_error(r, q), 10), self.queued_error(r, q))
        st = self.queued_error(r, q)
        self.assertIn("connect to p1.example[127.0.0.2]", st)
        self.assertNotIn("sent bob@", st)
        self.assertEqual(r.queue_ids(), [q])

    def test_dead_dns_of_bounce_domains_does_not_hold_up_relay_domains(self):
        """Ten queued bounces to sender domains whose DNS never answers (4 s
        a lookup here: 2 tries of 2 s) and a new message for one.example.
        Before, each queue run looked every domain up, one after the other,
        before any delivery began, and failed lookups are not cached: mail
        for the relay domains waited 40 s a run (a thousand such bounces: over
        an hour, every run). Now lookups for domains other than relay_domains
        stop after 10 s of a run; those messages wait a minute."""
        z = self.base_zone()
        z["one.example"] = {"MX": [(10, "p1.example")]}
        for i in range(10):
            z[f"dead{i}.test"] = {"mode": "silent"}
        r = self.relay()
        r.stop()
        data = b"Subject: bounce\r\n\r\nreturned\r\n"
        for i in range(10):
            qid = f"DEAD{i:09d}"
            head = (f"BARTLEBY-QUEUE 1\nid {qid}\narrival {int(time.time())}\nclient local\nhelo backup.example.org\nfrom \n"
                    f"rcpt someone@dead{i}.test\nlength {len(data):020}\n\n")
            with open(os.path.join(r.spool, "queue", qid), "wb") as f:
                f.write(head.encode() + data)
        p1 = self.primary(P1, r)
        r.start()
        self.assertTrue(wait_for(lambda: sum(1 for n, _ in self.dns.questions if n.startswith("dead")) >= 1, 10))
        submit(r, ["bob@one.example"])
        self.assertTrue(wait_for(lambda: len(p1.acked) == 1, 25), r.mailq())
        self.assertEqual(len(r.queue_ids()), 10)

    def test_etrn_default_is_the_mx_hosts(self):
        """Without etrn_allow, the MX hosts more preferred than Bartleby may
        send ETRN (their addresses, learnt in the background); another
        loopback address may not (Postfix: smtpd_etrn_restrictions)."""
        z = self.base_zone()
        z["one.example"] = {"MX": [(10, "p1.example"), (20, "backup.example.org")]}
        r = self.relay()

        def etrn_from(src):
            c = harness.Client(r.port, source=src)
            try:
                c.cmd("EHLO primary.test")
                return c.cmd("ETRN one.example")[0]
            finally:
                c.close()
        # 251: allowed, nothing waiting (Postfix's words for an empty queue).
        self.assertTrue(wait_for(lambda: etrn_from(P1) == 251, 15), r.read_log()[-2000:])
        self.assertEqual(etrn_from(P2), 459)
        self.assertEqual(etrn_from("127.0.0.9"), 459)

    # -- DNS failures --------------------------------------------------------

    def dns_failure_then_back(self, mode, expect):
        z = self.base_zone()
        z["one.example"] = {"mode": mode}
        r = self.relay(status=True)
        p1 = self.primary(P1, r)
        qid = submit(r, ["bob@one.example"])
        self.assertTrue(self.deferred_with(r, qid, expect, 30), self.queued_error(r, qid))
        self.assertEqual(p1.connections, 0)
        z["one.example"] = {"MX": [(10, "p1.example")]}
        # Back: a flush delivers (a negative answer is cached for 5 s at most).
        self.assertTrue(wait_for(lambda: r.flush() and (r.wait_empty(1.5)), 30), r.mailq())
        self.assertEqual(len(p1.acked), 1)
        return r

    def test_nxdomain_defers(self):
        # Postfix bounces (5.4.4); a backup MX keeps its domains' mail.
        self.dns_failure_then_back("nxdomain", "4.4.4 Host or domain name not found. Name service error for name=one.example type=MX: Host not found")

    def test_servfail_defers(self):
        self.dns_failure_then_back("servfail", "4.4.3 Host or domain name not found. Name service error for name=one.example type=MX: Host not found, try again")

    def test_silent_dns_defers_and_never_blocks_smtp(self):
        z = self.base_zone()
        z["one.example"] = {"mode": "silent"}
        r = self.relay()
        p1 = self.primary(P1, r)
        qid = submit(r, ["bob@one.example"])
        # While the lookups time out (2 s per try), sessions are served at once.
        t = time.monotonic()
        with socket.create_connection(("127.0.0.1", r.port), timeout=5) as s:
            self.assertTrue(s.recv(100).startswith(b"220"))
        self.assertLess(time.monotonic() - t, 1.0)
        self.assertTrue(self.deferred_with(r, qid, "type=MX: Host not found, try again", 30), self.queued_error(r, qid))
        z["one.example"] = {"MX": [(10, "p1.example")]}
        self.assertTrue(wait_for(lambda: r.flush() and r.wait_empty(1.5), 30), r.mailq())
        self.assertEqual(len(p1.acked), 1)

    def test_ttl_expiry_takes_the_new_route(self):
        z = self.base_zone()
        z["ttl.example"] = {"MX": [(10, "p1.example")], "ttl": 1}
        r = self.relay()
        p1, p2 = self.primary(P1, r), self.primary(P2, r)
        submit(r, ["a@ttl.example"])
        self.assertTrue(r.wait_empty(15), r.mailq())
        self.assertEqual(len(p1.acked), 1)
        z["ttl.example"] = {"MX": [(10, "p2.example")], "ttl": 1}
        # TTL 1 s is clamped to 5 s: within it the cached route holds...
        submit(r, ["b@ttl.example"])
        self.assertTrue(r.wait_empty(15), r.mailq())
        self.assertEqual((len(p1.acked), len(p2.acked)), (2, 0))
        # ... after it, the new one is used.
        time.sleep(5.5)
        submit(r, ["c@ttl.example"])
        self.assertTrue(r.wait_empty(15), r.mailq())
        self.assertEqual((len(p1.acked), len(p2.acked)), (2, 1))

    def test_hostile_dns_server(self):
        """Wrong ID, a packet cut short, a compression loop, 1000 answers:
        no panic, the mail is deferred with the DNS failure text, and the
        relay goes on serving and delivering."""
        z = self.base_zone()
        z["absent.example"] = {"MX": [(10, "p1.example")]}
        z["hostile.example"] = {"mode": "wrong_id"}
        r = self.relay()
        p1 = self.primary(P1, r)
        for mode in ["wrong_id", "short", "loop", "many"]:
            z["hostile.example"] = {"mode": mode}
            qid = submit(r, [f"{mode}@hostile.example"])
            self.assertTrue(self.deferred_with(r, qid, "name=hostile.example type=MX: Host not found, try again", 30), f"{mode}: {self.queued_error(r, qid)}")
            self.assertIsNone(r.proc.poll(), f"{mode}: relay died")
            self.assertEqual(p1.connections, 0, mode)
        submit(r, ["bob@absent.example"])
        self.assertTrue(wait_for(lambda: len(p1.acked) == 1, 15), r.mailq())
        self.assertIsNone(r.proc.poll())

    def test_truncated_answer_asked_again_over_tcp(self):
        z = self.base_zone()
        z["tc.example"] = {"MX": [(10, "p1.example")], "mode": "tc"}
        r = self.relay()
        p1 = self.primary(P1, r)
        submit(r, ["bob@tc.example"])
        self.assertTrue(r.wait_empty(15), r.mailq())
        self.assertEqual(len(p1.acked), 1)

    # -- a list of primaries -------------------------------------------------

    def test_verification_asks_the_domains_mx_hosts(self):
        """verify_recipients with primary = "mx": the probe goes where the
        domain's mail would go (its MX hosts), not to a "primary" there is
        none of; the MX's 550 5.1.1 comes back at RCPT."""
        z = self.base_zone()
        z["one.example"] = {"MX": [(20, "backup.example.org"), (10, "p1.example")]}
        r = self.relay(extra=("verify_recipients = true", 'verify_timeout = "5s"'))
        p1 = FakePrimary(r.port, {"RCPT": "550 5.1.1 <bob@one.example>: Recipient address rejected: User unknown"}, host=P1)
        self.primaries.append(p1)
        c = harness.Client(r.port, timeout=15)
        try:
            c.cmd("EHLO client.test")
            self.assertEqual(c.cmd("MAIL FROM:<alice@sender.test>")[0], 250)
            code, text = c.cmd("RCPT TO:<bob@one.example>")
            self.assertEqual(code, 550, text)
            self.assertIn("5.1.1", text)
        finally:
            c.close()
        self.assertIn("RCPT TO:<bob@one.example>", p1.commands)
        self.assertNotIn("DATA", p1.commands)

    def test_u_label_domain_routed_by_its_a_label(self):
        """A recipient domain written in U-labels is looked up (MX) and sent
        in its A-label form to a primary without SMTPUTF8."""
        import smtplib
        z = self.base_zone()
        z["xn--bcher-kva.example"] = {"MX": [(20, "backup.example.org"), (10, "p1.example")]}
        r = self.relay()
        p1 = self.primary(P1, r)
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
            s.ehlo("client.sender.test")
            s.mail("alice@sender.test", ["SMTPUTF8"])
            code, resp = s.rcpt("info@bücher.example")
            self.assertEqual(code, 250, resp)
            code, resp = s.data(MSG)
            self.assertEqual(code, 250, resp)
        self.assertTrue(r.wait_empty(15), r.mailq())
        self.assertIn("RCPT TO:<info@xn--bcher-kva.example>", self.rcpts_at(p1))

    def test_primary_list_in_order_first_down(self):
        """primary = [first, second], the first down: the second gets it."""
        r = self.relay(primary=f'["{P1}:PORT", "{P2}:PORT"]')
        p2 = self.primary(P2, r)
        submit(r, ["bob@one.example"])
        self.assertTrue(r.wait_empty(15), r.mailq())
        self.assertEqual(len(p2.acked), 1)
        self.assertIn(f"relay={P2}[{P2}]:{r.port}", r.read_log())
        # The first back: it is tried first again.
        p1 = self.primary(P1, r)
        submit(r, ["carol@one.example"])
        self.assertTrue(r.wait_empty(15), r.mailq())
        self.assertEqual(len(p1.acked), 1)
        self.assertEqual(self.dns.questions, [], "a list of addresses needs no DNS")


def main():
    harness.take_binary_arg()
    harness.report("mx", unittest.main(exit=False, verbosity=2).result)


if __name__ == "__main__":
    main()
