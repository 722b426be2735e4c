#!/usr/bin/env python3
"""Logs that Postfix tools read (issue 11, part 4).

* pflogsumm: a mixed run through the relay (delivered, deferred by a 4xx,
  bounced by a 5xx, relay access denied), then `pflogsumm
  --syslog-name=bartleby` (Debian's pflogsumm 1.1.5 spells it so) on the
  log file; every count it prints must be the run's, exactly. The expected
  figures come from the test's own primary (what it accepted, the bytes of
  each message it received), not from the relay's log.
* log_host: every line also goes, as an RFC 3164 datagram with facility
  mail, to a syslog server on UDP; a log host where nothing listens (or that
  cannot be reached) never stops or slows the relay.

Usage: test_pflogsumm.py [path/to/bartleby]
"""

import os
import re
import socket
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Client, Relay, free_port, queued_id  # noqa: E402


class AddressPrimary:
    """A primary that answers RCPT by the address: `defer-*` gets 450,
    `bounce-*` 550, anything else 250 (like a Postfix primary with a
    recipient table). Records each message it accepted: (sender, accepted
    recipients, data as received, dot-unstuffed, without the final dot)."""

    def __init__(self, port):
        self.accepted = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn):
        f = conn.makefile("rwb")

        def say(s):
            f.write((s + "\r\n").encode())
            f.flush()

        try:
            say("220 primary.example.org ESMTP")
            sender, rcpts = None, []
            while True:
                line = f.readline()
                if not line:
                    return
                cmd = line.decode(errors="replace").rstrip("\r\n")
                verb = cmd[:4].upper()
                if verb in ("EHLO", "HELO"):
                    say("250 primary.example.org")
                elif verb == "MAIL":
                    sender, rcpts = re.search(r"<([^>]*)>", cmd).group(1), []
                    say("250 2.1.0 Ok")
                elif verb == "RCPT":
                    addr = re.search(r"<([^>]*)>", cmd).group(1)
                    if addr.startswith("defer-"):
                        say(f"450 4.2.0 <{addr}>: Recipient address rejected: try later")
                    elif addr.startswith("bounce-"):
                        say(f"550 5.1.1 <{addr}>: Recipient address rejected: User unknown in virtual mailbox table")
                    else:
                        rcpts.append(addr)
                        say("250 2.1.5 Ok")
                elif verb == "DATA":
                    say("354 End data with <CR><LF>.<CR><LF>")
                    data = b""
                    while True:
                        l = f.readline()
                        if not l or l == b".\r\n":
                            break
                        data += l[1:] if l.startswith(b".") else l
                    with self.lock:
                        self.accepted.append((sender, list(rcpts), data))
                    say("250 2.0.0 Ok: queued as 4F00BA")
                elif verb == "RSET":
                    sender, rcpts = None, []
                    say("250 2.0.0 Ok")
                elif verb == "QUIT":
                    say("221 2.0.0 Bye")
                    return
                else:
                    say("502 5.5.2 Error: command not recognized")
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self):
        self.stopping = True
        self.thread.join(timeout=5)
        self.sock.close()


wait_until = harness.wait_until

def pflogsumm(path):
    out = subprocess.run(["pflogsumm", "--syslog-name=bartleby", path], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def grand_totals(text):
    """The "Grand Totals" figures of pflogsumm's report, by name."""
    want = {
        "received": r"^\s*(\d+)([km]?)\s+received$",
        "delivered": r"^\s*(\d+)([km]?)\s+delivered$",
        "deferred": r"^\s*(\d+)([km]?)\s+deferred",
        "bounced": r"^\s*(\d+)([km]?)\s+bounced$",
        "rejected": r"^\s*(\d+)([km]?)\s+rejected",
        "bytes received": r"^\s*(\d+)([km]?)\s+bytes received$",
        "bytes delivered": r"^\s*(\d+)([km]?)\s+bytes delivered$",
        "senders": r"^\s*(\d+)([km]?)\s+senders$",
        "sending hosts/domains": r"^\s*(\d+)([km]?)\s+sending hosts/domains$",
        "recipients": r"^\s*(\d+)([km]?)\s+recipients$",
        "recipient hosts/domains": r"^\s*(\d+)([km]?)\s+recipient hosts/domains$",
    }
    got = {}
    for name, rx in want.items():
        m = re.search(rx, text, re.M)
        got[name] = (int(m.group(1)), m.group(2)) if m else None
    return got


class Pflogsumm(unittest.TestCase):
    def setUp(self):
        self.cleanups = []

    def tearDown(self):
        for c in reversed(self.cleanups):
            c()

    def send(self, port, sender, rcpts, body):
        """One SMTP transaction; returns (queue ID or None, RCPT replies)."""
        c = Client(port)
        try:
            self.assertEqual(c.banner[0], 220)
            c.cmd("EHLO client.sender.test")
            self.assertEqual(c.cmd(f"MAIL FROM:<{sender}>")[0], 250)
            replies = [c.cmd(f"RCPT TO:<{r}>")[1] for r in rcpts]
            qid = None
            if any(r.startswith("250") for r in replies):
                self.assertEqual(c.cmd("DATA")[0], 354)
                c.send(body.replace(b"\n", b"\r\n") + b".\r\n")
                ack = c.reply()
                self.assertEqual(ack[0], 250, ack)
                qid = queued_id(ack[1])
            c.cmd("QUIT")
            return qid, replies
        finally:
            c.close()

    def test_mixed_run_counts_exactly(self):
        port = free_port()
        primary = AddressPrimary(port)
        self.cleanups.append(primary.stop)
        r = Relay(primary_port=port)
        self.cleanups.append(r.cleanup)
        r.start()
        body = lambda n: (f"Subject: test {n}\nMessage-ID: <m{n}@sender.test>\n\nbody of message {n}\n" + "x" * (40 * n) + "\n").encode()
        runs = [
            ("alice@sender.test", ["a1@example.org"]),
            ("bob@sender.test", ["a2@example.org", "a3@example.org"]),
            # A relay refusal after an accepted recipient (Postfix logs it
            # with the queue ID then).
            ("alice@sender.test", ["a4@example.net", "evil@relay.test"]),
            ("carol@other.test", ["ok-y@example.org", "defer-1@example.org"]),
            ("dave@sender.test", ["ok-z@example.org", "bounce-1@example.org"]),
            ("erin@other.test", ["bounce-2@example.net", "ok-x@example.net"]),
        ]
        ids = []
        for n, (sender, rcpts) in enumerate(runs, 1):
            qid, replies = self.send(r.port, sender, rcpts, body(n))
            self.assertIsNotNone(qid, replies)
            ids.append(qid)
            # One at a time, so that every message is tried at once and its
            # outcome logged before the next arrives (deterministic order).
            wait_until(lambda: len(primary.accepted) >= n, 20, f"message {n} at the primary")
        # A transaction whose only recipient is refused: no client= line
        # (Postfix's smtpd logs client= when the first recipient is accepted),
        # one reject.
        qid, replies = self.send(r.port, "bob@sender.test", ["evil2@relay.test"], b"")
        self.assertIsNone(qid)
        self.assertTrue(replies[0].startswith("550 5.7.1"), replies)
        # The two bounces (to dave and erin) reach the primary too.
        wait_until(lambda: len(primary.accepted) >= len(runs) + 2, 30, "the bounces at the primary")
        # Only the deferred message is left.
        wait_until(lambda: r.queue_ids() == [ids[3]], 20, "the queue to hold only the deferred message")
        wait_until(lambda: re.search(ids[3] + r": to=<defer-1@example\.org>.*status=deferred", r.read_log()), 10, "the deferral in the log")
        r.stop()
        log = r.read_log()

        # What the run was, from the primary's side.
        msgs = [m for m in primary.accepted if m[0]]
        bounces = [m for m in primary.accepted if m[0] == ""]
        self.assertEqual(len(bounces), 2)
        self.assertEqual(sorted(b[1][0] for b in bounces), ["dave@sender.test", "erin@other.test"])
        # Each message reached the primary once (the deferred and bounced
        # ones with their other recipient): its size there is the size
        # Postfix would log, the message as queued.
        self.assertEqual([m[0] for m in msgs], [s for s, _ in runs])
        sizes = [len(m[2]) for m in msgs]
        delivered_rcpts = [rc for m in primary.accepted for rc in m[1]]
        bytes_delivered = sum(len(m[2]) * len(m[1]) for m in primary.accepted)
        senders = {s for s, _ in runs}
        expected = {
            "received": (len(runs), " "),
            "delivered": (len(delivered_rcpts), " "),
            "deferred": (1, " "),
            "bounced": (2, " "),
            "rejected": (2, " "),
            "bytes received": (sum(sizes), " "),
            "bytes delivered": (bytes_delivered, " "),
            "senders": (len(senders), " "),
            "sending hosts/domains": (len({s.split("@")[1] for s in senders}), " "),
            "recipients": (len(set(delivered_rcpts)), " "),
            "recipient hosts/domains": (len({a.split("@")[1] for a in delivered_rcpts}), " "),
        }
        self.assertEqual(expected["delivered"][0], 9)
        report = pflogsumm(r.log)
        got = {k: (v[0], v[1] or " ") if v else None for k, v in grand_totals(report).items()}
        sys.stderr.write("  pflogsumm counted: " + ", ".join(f"{k} {v[0] if v else None}" for k, v in got.items()) + "\n")
        self.assertEqual(got, expected, "\n" + report[:3000] + "\n--- log:\n" + log[-4000:])

    def test_line_format_as_postfix(self):
        """The fields of each line, as syslogd writes Postfix's."""
        port = free_port()
        primary = AddressPrimary(port)
        self.cleanups.append(primary.stop)
        r = Relay(primary_port=port)
        self.cleanups.append(r.cleanup)
        r.start()
        qid, _ = self.send(r.port, "alice@sender.test", ["bob@example.org"], b"Subject: x\n\nhi\n")
        wait_until(lambda: f"{qid}: removed" in r.read_log(), 20, "the removal")
        log = r.read_log()
        pid = r.proc.pid
        stamp = r"^[A-Z][a-z]{2} [ 1-3]\d \d\d:\d\d:\d\d backup "
        self.assertRegex(log, re.compile(stamp + rf"bartleby/smtpd\[{pid}\]: {qid}: client=unknown\[127\.0\.0\.1\]$", re.M))
        self.assertRegex(log, re.compile(stamp + rf"bartleby/qmgr\[{pid}\]: {qid}: from=<alice@sender\.test>, size=\d+, nrcpt=1 \(queue active\)$", re.M))
        self.assertRegex(
            log,
            re.compile(
                stamp + rf"bartleby/smtp\[{pid}\]: {qid}: to=<bob@example\.org>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{port}, "
                r"delay=[\d.]+, delays=[\d.]+/[\d.]+/[\d.]+/[\d.]+, dsn=2\.0\.0, status=sent \(250 2\.0\.0 Ok: queued as 4F00BA\)$",
                re.M,
            ),
        )
        self.assertRegex(log, re.compile(stamp + rf"bartleby/qmgr\[{pid}\]: {qid}: removed$", re.M))
        # client= comes after the RCPT was accepted, before from=.
        self.assertLess(log.index(f"{qid}: client="), log.index(f"{qid}: from="))


    def test_retry_logs_from_again_counted_once(self):
        """Postfix's qmgr logs from=, size= each time a deferred message
        enters the active queue; pflogsumm counts it once."""
        port = free_port()
        primary = AddressPrimary(port)
        self.cleanups.append(primary.stop)
        r = Relay(primary_port=port)
        self.cleanups.append(r.cleanup)
        r.start()
        qid, _ = self.send(r.port, "alice@sender.test", ["defer-1@example.org"], b"Subject: x\n\nhi\n")
        line = re.compile(qid + r": to=<defer-1@example\.org>.*status=deferred")
        wait_until(lambda: len(line.findall(r.read_log())) == 1, 20, "the first deferral")
        r.flush()
        wait_until(lambda: len(line.findall(r.read_log())) == 2, 20, "the second deferral")
        r.stop()
        log = r.read_log()
        froms = re.findall(rf"bartleby/qmgr\[\d+\]: {qid}: from=<alice@sender\.test>, size=(\d+), nrcpt=1 \(queue active\)$", log, re.M)
        self.assertEqual(len(froms), 2, log)
        self.assertEqual(len(set(froms)), 1)
        got = grand_totals(pflogsumm(r.log))
        self.assertEqual(
            {k: got[k][0] for k in ("received", "deferred", "bytes received", "senders")},
            {"received": 1, "deferred": 1, "bytes received": int(froms[0]), "senders": 1},
        )


class SyslogReceiver:
    """A UDP socket on loopback collecting datagrams."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self.got = []
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping:
            try:
                d, _ = self.sock.recvfrom(65536)
                self.got.append(d.decode(errors="replace"))
            except socket.timeout:
                continue
            except OSError:
                return

    def stop(self):
        self.stopping = True
        self.thread.join(timeout=5)
        self.sock.close()


class LogHost(unittest.TestCase):
    def setUp(self):
        self.cleanups = []

    def tearDown(self):
        for c in reversed(self.cleanups):
            c()

    def relay_with(self, log_host):
        sink = harness.Sink(free_port())
        self.cleanups.append(sink.stop)
        r = Relay(primary_port=sink.port, extra=f'log_host = "{log_host}"')
        self.cleanups.append(r.cleanup)
        r.start()
        return r, sink

    def mail(self, r, n):
        c = Client(r.port)
        try:
            c.cmd("EHLO client.sender.test")
            c.cmd("MAIL FROM:<alice@sender.test>")
            c.cmd(f"RCPT TO:<bob{n}@example.org>")
            c.cmd("DATA")
            c.send(b"Subject: udp\r\n\r\nhi\r\n.\r\n")
            return queued_id(c.reply()[1])
        finally:
            c.close()

    def test_datagrams_carry_pri_mail_and_the_log_text(self):
        rx = SyslogReceiver()
        self.cleanups.append(rx.stop)
        r, sink = self.relay_with(f"127.0.0.1:{rx.port}")
        qid = self.mail(r, 1)
        self.assertTrue(sink.wait_count(1, 20))
        wait_until(lambda: any(f"{qid}: removed" in d for d in rx.got), 10, "the removal datagram")
        r.stop()
        log_lines = r.read_log().splitlines()
        got = list(rx.got)
        self.assertTrue(got)
        for d in got:
            m = re.fullmatch(r"<(\d+)>([A-Z][a-z]{2} [ 1-3]\d \d\d:\d\d:\d\d backup bartleby/\w+\[\d+\]: .*)", d, re.S)
            self.assertTrue(m, d)
            pri = int(m.group(1))
            # RFC 3164: PRI = facility * 8 + severity; mail is facility 2.
            self.assertEqual(pri // 8, 2, d)
            self.assertIn(pri % 8, (3, 4, 6, 7), d)
            # The same line as the log file, whatever its timestamp second.
            self.assertIn(m.group(2), log_lines, d)
        infos = [d for d in got if f"{qid}: to=<bob1@example.org>" in d]
        self.assertEqual(len(infos), 1)
        self.assertTrue(infos[0].startswith("<22>"), infos[0])  # mail.info
        self.assertTrue(any(d.startswith("<22>") and f"{qid}: client=" in d for d in got))

    def test_unreachable_log_host_never_blocks(self):
        # A port where nothing listens (every datagram draws an ICMP port
        # unreachable), and a log host that never reads (its buffer fills
        # up at once): the relay keeps relaying, at speed.
        dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dead.bind(("127.0.0.1", 0))
        dead_port = dead.getsockname()[1]
        dead.close()
        deaf = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        deaf.bind(("127.0.0.1", 0))
        self.addCleanup(deaf.close)
        for host in (f"127.0.0.1:{dead_port}", f"127.0.0.1:{deaf.getsockname()[1]}"):
            with self.subTest(log_host=host):
                r, sink = self.relay_with(host)
                t = time.monotonic()
                ids = [self.mail(r, n) for n in range(20)]
                self.assertTrue(all(ids), ids)
                self.assertTrue(sink.wait_count(20, 30), r.read_log()[-2000:])
                self.assertTrue(r.wait_empty(30))
                took = time.monotonic() - t
                self.assertLess(took, 20, f"20 messages took {took:.1f} s with log_host {host}")
                self.assertIsNone(r.proc.poll(), "the relay stopped")
                # The log file is complete all the same.
                log = r.read_log()
                for qid in ids:
                    self.assertIn(f"{qid}: removed", log)
                r.stop()
                for c in reversed(self.cleanups):
                    c()
                self.cleanups.clear()

    def test_bad_log_host_is_a_config_error_naming_the_key(self):
        for bad in ("syslog.lan:514", "192.168.1.5:99999", "192.168.1.5:0", "192.168.1.5:x"):
            with self.subTest(value=bad):
                r = Relay(extra=f'log_host = "{bad}"')
                self.cleanups.append(r.cleanup)
                out = subprocess.run([harness.BINARY, "check", "-c", r.config], capture_output=True, text=True, timeout=10)
                self.assertEqual(out.returncode, 78, out.stderr)
                self.assertIn("log_host", out.stderr)
        r = Relay(extra='log_format = "json"')
        self.cleanups.append(r.cleanup)
        out = subprocess.run([harness.BINARY, "check", "-c", r.config], capture_output=True, text=True, timeout=10)
        self.assertEqual(out.returncode, 78, out.stderr)
        self.assertIn("log_format", out.stderr)

    def test_iso_format_on_request(self):
        sink = harness.Sink(free_port())
        self.cleanups.append(sink.stop)
        r = Relay(primary_port=sink.port, extra='log_format = "iso"')
        self.cleanups.append(r.cleanup)
        r.start()
        qid = self.mail(r, 1)
        wait_until(lambda: f"{qid}: removed" in r.read_log(), 20, "the removal")
        self.assertRegex(
            r.read_log(),
            re.compile(rf"^\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}Z backup bartleby/qmgr\[{r.proc.pid}\]: {qid}: removed$", re.M),
        )
        # pflogsumm reads this form too.
        r.stop()
        got = grand_totals(pflogsumm(r.log))
        self.assertEqual((got["received"][0], got["delivered"][0]), (1, 1))


def main():
    harness.take_binary_arg()
    harness.report("pflogsumm", unittest.main(exit=False, verbosity=2).result)


if __name__ == "__main__":
    main()
