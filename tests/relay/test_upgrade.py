#!/usr/bin/env python3
"""An upgrade with mail queued: a spool written by the version before the
reuse of queue files (free/) is taken over whole.

    python3 tests/relay/test_upgrade.py [path/to/bartleby]

  old_spool_is_delivered   queue files in the previous format (no `check`
                           line in the header), a delivery state recording
                           one recipient as sent, and a partial message in
                           incoming/ (a crash during DATA): after the
                           upgrade every queued message reaches the primary
                           once, the recipient already sent to is not tried
                           again, the partial is removed, nothing goes to
                           corrupt/, and the delivered files are kept in
                           free/ for reuse;
  previous_binary          with BARTLEBY_PREVIOUS=path/to/old/bartleby: mail
                           queued by that binary itself (primary down),
                           then delivered by this one; and the other way
                           round (a downgrade: this version's queue files,
                           with their `check` line, delivered by the old
                           binary). Skipped without the variable.

Postfix alike keeps reading its older queue file records after an upgrade
(its queue files carry record types that older and newer versions skip).
Loopback only; the last line is "N passed, M failed".
"""

import os
import smtplib
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Relay, Sink, free_port, wait_until  # noqa: E402


def body(tok):
    return (f"From: alice@sender.test\r\nTo: bob@example.org\r\nSubject: {tok}\r\n\r\n"
            f"token {tok}\r\n" + "x" * 3000 + "\r\n").encode()


def send(port, tok, rcpts=("bob@example.org",)):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.sender.test")
        s.mail("alice@sender.test")
        for r in rcpts:
            code, resp = s.rcpt(r)
            assert code == 250, resp
        code, resp = s.data(body(tok))
        assert code == 250, resp
        return resp.decode().split("queued as ")[1].strip()


def strip_check(path):
    """Makes a queue file exactly what the version before wrote: the same
    header without its `check` line."""
    with open(path, "rb") as f:
        data = f.read()
    head, sep, rest = data.partition(b"\n\n")
    lines = [l for l in head.split(b"\n") if not l.startswith(b"check ")]
    assert len(lines) == len(head.split(b"\n")) - 1, "no check line to strip"
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + sep + rest)


def copies(sink, tok):
    return sum(1 for m in sink.messages() if f"token {tok}\r\n".encode() in m or f"token {tok}\n".encode() in m)


class Upgrade(unittest.TestCase):
    def setUp(self):
        self.undo = []

    def tearDown(self):
        for f in reversed(self.undo):
            f()

    def relay(self, **kw):
        r = Relay(**kw)
        self.undo.append(r.cleanup)
        return r

    def sink(self, port):
        s = Sink(port)
        self.undo.append(s.stop)
        return s

    def test_old_spool_is_delivered(self):
        r = self.relay(extra="delivery_connections = 1")
        r.start()
        toks = [f"old-{i}" for i in range(3)]
        ids = [send(r.port, t) for t in toks]
        two = send(r.port, "old-two", ("bob@example.org", "carol@example.org"))
        r.stop()
        for qid in ids + [two]:
            strip_check(os.path.join(r.spool, "queue", qid))
        # bob already has old-two (as the old version recorded it).
        with open(os.path.join(r.spool, "state", two), "w") as f:
            f.write("attempts 1\nnext 0\nlast 0\nerror 421 down\nsent bob@example.org 250 2.0.0 Ok\n")
        # A crash during DATA under the old version.
        with open(os.path.join(r.spool, "incoming", "ABCDEF0000099"), "wb") as f:
            f.write(b"BARTLEBY-QUEUE 1\nid ABCDEF0000099\narrival 1\nclient c[192.0.2.1]\nhelo c\nfrom a@b.test\nrcpt bob@example.org\nlength 00000000000000000000\n\nhalf a mes")
        sink = self.sink(r.primary_port)
        r.start()
        r.flush()
        wait_until(lambda: not r.queue_ids(), 30, "the old queue to drain:\n" + r.mailq())
        wait_until(lambda: all(copies(sink, t) for t in toks + ["old-two"]), 10, "every old message at the primary")
        time.sleep(0.3)
        for t in toks:
            self.assertEqual(copies(sink, t), 1, t)
        two_msgs = [m for m in sink.messages() if b"token old-two" in m]
        self.assertEqual(len(two_msgs), 1, "old-two not sent exactly once")
        self.assertEqual(os.listdir(os.path.join(r.spool, "incoming")), [])
        self.assertEqual(os.listdir(os.path.join(r.spool, "corrupt")), [])
        self.assertNotIn("queue file damaged", r.read_log())
        log = r.read_log()
        self.assertIn(f"{two}: to=<carol@example.org>", log)
        self.assertNotRegex(log, two + r": to=<bob@example.org>.*status=sent", "bob, recorded as sent by the old version, was sent it again")
        # The delivered files are kept for reuse, and reused: a new message
        # makes no file.
        pooled = sorted(os.listdir(os.path.join(r.spool, "free")))
        self.assertGreaterEqual(len(pooled), 4, pooled)
        send(r.port, "new-after-upgrade")
        wait_until(lambda: copies(sink, "new-after-upgrade") == 1, 15, "the new message at the primary")

    def test_previous_binary(self):
        old = os.environ.get("BARTLEBY_PREVIOUS")
        if not old:
            self.skipTest("BARTLEBY_PREVIOUS not set")
        new = harness.BINARY
        # Upgrade: queued by the old binary, delivered by this one.
        r = self.relay()
        harness.BINARY = old
        try:
            r.start()
            toks = [f"prev-{i}" for i in range(5)]
            for t in toks:
                send(r.port, t)
            r.stop()
        finally:
            harness.BINARY = new
        sink = self.sink(r.primary_port)
        r.start()
        r.flush()
        wait_until(lambda: not r.queue_ids(), 30, "the old binary's queue to drain")
        wait_until(lambda: all(copies(sink, t) for t in toks), 10, "every message at the primary")
        self.assertEqual([copies(sink, t) for t in toks], [1] * 5)
        self.assertEqual(os.listdir(os.path.join(r.spool, "corrupt")), [])
        r.stop()
        # Downgrade: queued by this one (reused files, check lines), then
        # delivered by the old binary.
        d = self.relay()
        d.start()
        toks = [f"down-{i}" for i in range(5)]
        for t in toks:
            send(d.port, t)
        d.stop()
        harness.BINARY = old
        try:
            sink2 = self.sink(d.primary_port)
            d.start()
            d.flush()
            wait_until(lambda: not d.queue_ids(), 30, "this version's queue to drain under the old binary")
            wait_until(lambda: all(copies(sink2, t) for t in toks), 10, "every message at the primary")
            self.assertEqual([copies(sink2, t) for t in toks], [1] * 5)
            self.assertEqual(os.listdir(os.path.join(d.spool, "corrupt")), [])
            d.stop()
        finally:
            harness.BINARY = new


def main():
    harness.take_binary_arg()
    harness.report("upgrade", unittest.main(exit=False, verbosity=2).result)


if __name__ == "__main__":
    main()
