"""Relay tests with real peers: smtplib, swaks, Postfix's smtp-sink and
smtp-source. Run: python3 tests/relay/test_relay.py [path/to/bartleby]"""

import ctypes
import os
import re
import smtplib
import socket
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Client, FakePrimary, Relay, Sink, free_port, queued_id, strip_sink_headers  # noqa: E402

# A message with what tends to break relays: dot lines, 8-bit text, a long
# line, blank lines, trailing spaces, a final line without trailing blank.
TRICKY = (
    b"From: Alice <alice@sender.test>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: tricky \xc3\xa9t\xc3\xa9\r\n"
    b"Message-ID: <tricky-1@sender.test>\r\n"
    b"\r\n"
    b".\r\n"
    b"..two dots\r\n"
    b". dot space\r\n"
    b"trailing spaces   \r\n"
    b"\r\n"
    b"\r\n" + b"x" * 3000 + b"\r\n"
    b"caf\xc3\xa9 8-bit\r\n"
    b"last line"
)


def dot_stuff(msg):
    lines = msg.split(b"\r\n")
    return b"\r\n".join(b"." + l if l.startswith(b".") else l for l in lines)


class RelayTest(unittest.TestCase):
    def setUp(self):
        self.relays = []
        self.sinks = []

    def tearDown(self):
        for r in self.relays:
            if self._outcome_failed():
                sys.stderr.write(f"\n--- relay log {r.log} ---\n{r.read_log()[-3000:]}\n")
            r.cleanup()
        for s in self.sinks:
            s.stop()

    def _outcome_failed(self):
        res = getattr(self, "_outcome", None)
        if res is None or not hasattr(res, "result"):
            return False
        return any(t is self for t, _ in res.result.failures + res.result.errors)

    def relay(self, **kw):
        r = Relay(**kw)
        self.relays.append(r)
        return r.start()

    def sink(self, port, extra_args=()):
        s = Sink(port, extra_args)
        self.sinks.append(s)
        return s

    def send(self, r, sender="alice@sender.test", rcpts=("bob@example.org",), msg=b"Subject: t\r\n\r\nhello\r\n"):
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
            s.ehlo("client.sender.test")
            code, resp = s.docmd("MAIL FROM:<%s>" % sender)
            self.assertEqual(code, 250, resp)
            for rc in rcpts:
                code, resp = s.docmd("RCPT TO:<%s>" % rc)
                self.assertEqual(code, 250, resp)
            code, resp = s.data(msg)
            self.assertEqual(code, 250, resp)
            return queued_id(resp.decode())


class Config(RelayTest):
    def test_check_ok_and_errors_name_the_line(self):
        r = Relay()
        self.relays.append(r)
        out = r.cli("check")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("OK", out.stdout)
        with open(r.config, "a") as f:
            f.write('relay_domain = ["typo.org"]\n')
        n = sum(1 for _ in open(r.config))
        out = r.cli("check")
        self.assertNotEqual(out.returncode, 0)
        self.assertIn(f"bartleby.toml:{n}: unknown key `relay_domain`", out.stderr)
        out = r.cli("serve")
        self.assertNotEqual(out.returncode, 0)
        self.assertIn(f":{n}:", out.stderr)

    def test_check_reads_the_recipients_list(self):
        r = Relay(recipients=["bob@example.org", "not-an-address"])
        self.relays.append(r)
        out = r.cli("check")
        self.assertNotEqual(out.returncode, 0)
        self.assertRegex(out.stderr, r"recipients:2: `not-an-address` is not user@domain")

    def test_bad_value(self):
        r = Relay(extra='max_connections = "many"')
        self.relays.append(r)
        out = r.cli("check")
        self.assertNotEqual(out.returncode, 0)
        self.assertRegex(out.stderr, r"bartleby\.toml:\d+: max_connections: `many` is not")

    def test_help_and_version(self):
        out = subprocess.run([harness.BINARY, "--version"], capture_output=True, text=True)
        self.assertEqual(out.returncode, 0)
        self.assertRegex(out.stdout, r"^bartleby \d+\.\d+")
        out = subprocess.run([harness.BINARY, "--help"], capture_output=True, text=True)
        self.assertIn("mailq", out.stdout)
        out = subprocess.run([harness.BINARY, "frobnicate"], capture_output=True, text=True)
        self.assertNotEqual(out.returncode, 0)


class Protocol(RelayTest):
    def test_ehlo_advertises_only_what_is_implemented(self):
        r = self.relay()
        c = Client(r.port)
        self.assertEqual(c.banner[0], 220)
        code, text = c.cmd("EHLO client.sender.test")
        self.assertEqual(code, 250)
        kws = {l[4:].split()[0] for l in text.splitlines()[1:]}
        self.assertEqual(kws, {"PIPELINING", "SIZE", "8BITMIME", "ENHANCEDSTATUSCODES", "ETRN", "SMTPUTF8", "DSN"})
        self.assertIn("SIZE 10240000", text)
        self.assertEqual(c.cmd("HELO client.sender.test")[0], 250)
        self.assertEqual(c.cmd("STARTTLS")[0], 502)
        self.assertEqual(c.cmd("BDAT 10 LAST")[0], 502)
        self.assertEqual(c.cmd("VRFY bob")[0], 502)
        self.assertEqual(c.cmd("QUIT")[0], 221)

    def test_sequence_errors(self):
        r = self.relay()
        c = Client(r.port)
        self.assertEqual(c.cmd("MAIL FROM:<a@sender.test>")[0], 503)
        c.cmd("EHLO x")
        self.assertEqual(c.cmd("RCPT TO:<bob@example.org>")[0], 503)
        self.assertEqual(c.cmd("DATA")[0], 503)
        self.assertEqual(c.cmd("MAIL FROM:<a@sender.test>")[0], 250)
        self.assertEqual(c.cmd("MAIL FROM:<a@sender.test>")[0], 503)
        self.assertEqual(c.cmd("DATA")[0], 554)
        self.assertEqual(c.cmd("RSET")[0], 250)
        # Offered now (test_smtputf8.py).
        self.assertEqual(c.cmd("MAIL FROM:<a@sender.test> SMTPUTF8")[0], 250)
        self.assertEqual(c.cmd("RSET")[0], 250)
        # DSN is offered (test_dsn.py): RET is taken, a bad one refused.
        self.assertEqual(c.cmd("MAIL FROM:<a@sender.test> RET=BOGUS")[0], 501)
        self.assertEqual(c.cmd("MAIL FROM:<a@sender.test> RET=FULL")[0], 250)

    def test_swaks_and_null_sender(self):
        r = self.relay()
        out = subprocess.run(
            ["swaks", "--server", f"127.0.0.1:{r.port}", "--from", "<>", "--to", "bob@example.org", "--body", "bounce-ish"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertRegex(out.stdout, r"250 2\.0\.0 Ok: queued as [0-9A-F]+")
        self.assertIn("MAILER-DAEMON", r.mailq())

    def test_bare_lf_command_refused(self):
        r = self.relay()
        c = Client(r.port)
        c.send("EHLO x\n")
        self.assertEqual(c.reply()[0], 500)
        self.assertEqual(c.cmd("EHLO x")[0], 250)

    def test_line_too_long(self):
        r = self.relay()
        c = Client(r.port)
        c.cmd("EHLO x")
        self.assertEqual(c.cmd("NOOP " + "a" * 5000)[0], 500)
        self.assertEqual(c.cmd("NOOP")[0], 250)

    def test_error_budget_closes_session(self):
        r = self.relay(extra="error_limit = 3")
        c = Client(r.port)
        codes = [c.cmd("BOGUS")[0] for _ in range(4)]
        self.assertEqual(codes, [500, 500, 500, 500])
        # Past the budget the error reply is followed by 421 and a close.
        self.assertEqual(c.reply()[0], 421)
        self.assertTrue(c.closed())

    def test_command_timeout(self):
        r = self.relay(extra='command_timeout = "2s"')
        c = Client(r.port)
        t = time.monotonic()
        code, text = c.reply()
        self.assertEqual(code, 421, text)
        self.assertIn("4.4.2", text)
        self.assertLess(time.monotonic() - t, 5)

    def test_data_drip_cut_by_min_data_rate(self):
        # Each chunk arrives well within data_timeout, but at 10 bytes/s the
        # client is far below min_data_rate: cut after about data_timeout.
        r = self.relay(extra='data_timeout = "3s"\nmin_data_rate = 100')
        c = Client(r.port)
        c.cmd("EHLO client.sender.test")
        self.assertEqual(c.cmd("MAIL FROM:<alice@sender.test>")[0], 250)
        self.assertEqual(c.cmd("RCPT TO:<bob@example.org>")[0], 250)
        self.assertEqual(c.cmd("DATA")[0], 354)
        t = time.monotonic()
        c.sock.settimeout(0.01)
        got = b""
        while time.monotonic() - t < 10 and b"\n" not in got:
            try:
                c.send(b"x" * 10)
            except OSError:
                break
            end = time.monotonic() + 1
            while time.monotonic() < end:
                try:
                    d = c.sock.recv(4096)
                except socket.timeout:
                    continue
                except OSError:
                    break
                if not d:
                    break
                got += d
        self.assertTrue(got.startswith(b"421 4.4.2"), got)
        self.assertLess(time.monotonic() - t, 6)
        self.assertEqual(r.queue_ids(), [])
        self.assertIn("timeout after DATA", r.read_log())

    def test_junk_limit_and_reset_after_mail(self):
        r = self.relay()
        # A loop of EHLO is junk: cut off after 100.
        c = Client(r.port)
        codes = [c.cmd("EHLO client.sender.test")[0] for _ in range(101)]
        self.assertEqual(codes, [250] * 101)
        # The 101st is answered, then 421 and a close.
        self.assertEqual(c.reply()[0], 421)
        self.assertTrue(c.closed())
        # A client that RSETs before every message is not idle: 120
        # messages in one session all go through.
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
            s.ehlo("client.sender.test")
            for i in range(120):
                self.assertEqual(s.rset()[0], 250)
                s.sendmail("alice@sender.test", ["bob@example.org"], b"Subject: %d\r\n\r\nbody\r\n" % i)
        self.assertEqual(len(r.queue_ids()), 120)

    def test_connection_cap(self):
        r = self.relay(extra="max_connections = 3")
        # Three addresses: one alone may hold only half the slots (see
        # test_hostile_clients.py for the per-client cap).
        held = [Client(r.port, source=f"127.0.0.{i}") for i in (2, 3, 4)]
        for c in held:
            self.assertEqual(c.banner[0], 220)
        extra = Client(r.port, source="127.0.0.5")
        self.assertEqual(extra.banner[0], 421)
        self.assertIn("too many connections; try again later", extra.banner[1])
        for c in held:
            c.close()
        time.sleep(0.3)
        self.assertEqual(Client(r.port).banner[0], 220)

    def test_recipient_cap_452(self):
        r = self.relay(extra="max_recipients = 100")
        c = Client(r.port)
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<a@sender.test>")
        codes = [c.cmd(f"RCPT TO:<u{i}@example.org>")[0] for i in range(101)]
        self.assertEqual(codes[:100], [250] * 100)
        code, text = c.cmd("RCPT TO:<u101@example.org>")
        self.assertEqual(code, 452)
        self.assertIn("4.5.3", text)

    def test_size_limits(self):
        r = self.relay(extra="max_message_size = 65536")
        c = Client(r.port)
        code, text = c.cmd("EHLO x")
        self.assertIn("SIZE 65536", text)
        self.assertEqual(c.cmd("MAIL FROM:<a@sender.test> SIZE=70000")[0], 552)
        # Beyond 32 bits must not wrap to a small number.
        self.assertEqual(c.cmd("MAIL FROM:<a@sender.test> SIZE=50000000000")[0], 552)
        self.assertEqual(c.cmd("MAIL FROM:<a@sender.test> SIZE=1000")[0], 250)
        self.assertEqual(c.cmd("RCPT TO:<bob@example.org>")[0], 250)
        self.assertEqual(c.cmd("DATA")[0], 354)
        c.send(b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 100 + b".\r\n")
        code, text = c.reply()
        self.assertEqual(code, 552, text)
        self.assertIn("5.3.4", text)
        self.assertEqual(r.queue_ids(), [])
        self.assertEqual(os.listdir(os.path.join(r.spool, "incoming")), [])

    def test_empty_body_and_leading_dots(self):
        r = self.relay()
        c = Client(r.port)
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<a@sender.test>")
        c.cmd("RCPT TO:<bob@example.org>")
        self.assertEqual(c.cmd("DATA")[0], 354)
        c.send(".\r\n")
        code, text = c.reply()
        self.assertEqual(code, 250, text)

    def test_mail_loop_refused(self):
        r = self.relay()
        c = Client(r.port)
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<a@sender.test>")
        c.cmd("RCPT TO:<bob@example.org>")
        c.cmd("DATA")
        c.send(b"".join(b"Received: from hop%d\r\n" % i for i in range(51)) + b"Subject: loop\r\n\r\nx\r\n.\r\n")
        code, text = c.reply()
        self.assertEqual(code, 554, text)
        self.assertIn("5.4.6", text)
        self.assertEqual(r.queue_ids(), [])

    def test_low_disk_452_at_mail(self):
        r = self.relay(extra="")
        # Rewrite the reserve to more than any disk has, restart.
        r.stop()
        with open(r.config) as f:
            cfg = f.read().replace('min_free_space = "1M"', 'min_free_space = "100000G"')
        with open(r.config, "w") as f:
            f.write(cfg)
        r.start()
        c = Client(r.port)
        c.cmd("EHLO x")
        code, text = c.cmd("MAIL FROM:<a@sender.test>")
        self.assertEqual(code, 452, text)
        self.assertIn("4.3.1", text)

    def test_pipelining(self):
        r = self.relay()
        c = Client(r.port)
        c.cmd("EHLO x")
        c.send("MAIL FROM:<a@sender.test>\r\nRCPT TO:<bob@example.org>\r\nRCPT TO:<mallory@evil.test>\r\nDATA\r\n")
        self.assertEqual([c.reply()[0] for _ in range(4)], [250, 250, 550, 354])
        c.send("Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        self.assertEqual(c.reply()[0], 250)
        self.assertEqual(c.reply()[0], 221)

    def test_data_stuffing_refused(self):
        """Bytes sent before the 354 (command/data stuffing) close the session."""
        r = self.relay()
        c = Client(r.port)
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<a@sender.test>")
        c.cmd("RCPT TO:<bob@example.org>")
        c.send("DATA\r\nSubject: stuffed\r\n\r\nx\r\n.\r\n")
        code, text = c.reply()
        self.assertEqual(code, 554, text)
        self.assertTrue(c.closed())
        self.assertEqual(r.queue_ids(), [])


class Relaying(RelayTest):
    TRICKS = [
        "bob@evil.test",
        "bob%evil.test@example.org",
        "evil.test!bob@example.org",
        '"bob@evil.test"@example.org',
        '"bob%evil.test"@example.org',
        "@example.org:bob@evil.test",
        "@evil.test,@example.org:bob@example.org",
        "bob@evil.test@example.org",
        "bob@example.org@evil.test",
        "bob@example.org.evil.test",
        "bob@sub.example.org",
        "bob@[127.0.0.1]",
        "bob",
    ]

    def test_relay_tricks_refused(self):
        r = self.relay(extra="error_limit = 50")
        c = Client(r.port)
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<spammer@evil.test>")
        for t in self.TRICKS:
            code, text = c.cmd(f"RCPT TO:<{t}>")
            self.assertIn(code, (550, 501), f"{t}: {text}")
            if code == 550:
                self.assertIn("5.7.1", text, t)
        # Case-insensitive domain match, and the rest still works.
        self.assertEqual(c.cmd("RCPT TO:<Bob@EXAMPLE.ORG>")[0], 250)
        self.assertEqual(c.cmd("RCPT TO:<carol@example.net>")[0], 250)

    def test_recipients_list_enforced(self):
        r = self.relay(recipients=["bob@example.org", "@example.net"])
        c = Client(r.port)
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<a@sender.test>")
        self.assertEqual(c.cmd("RCPT TO:<bob@example.org>")[0], 250)
        self.assertEqual(c.cmd("RCPT TO:<anyone@example.net>")[0], 250)
        code, text = c.cmd("RCPT TO:<mallory@example.org>")
        self.assertEqual(code, 550)
        self.assertIn("5.1.1", text)
        # The list is reread when it changes (checked every 10 s at most).
        with open(os.path.join(r.dir, "recipients"), "a") as f:
            f.write("mallory@example.org\n")
        time.sleep(11)
        self.assertEqual(c.cmd("RCPT TO:<mallory@example.org>")[0], 250)


class Queue(RelayTest):
    def test_queued_listed_kept_across_restart_then_flushed_byte_identical(self):
        r = self.relay()
        qid = self.send(r, msg=TRICKY)
        self.assertTrue(qid)
        # Primary down: the first attempt fails, the message waits.
        time.sleep(0.5)
        q = r.mailq()
        self.assertIn(qid, q)
        self.assertIn("alice@sender.test", q)
        self.assertIn("bob@example.org", q)
        self.assertIn("Connection refused", q)
        self.assertRegex(q, r"-- \d+ Kbytes in 1 Request\.")
        # mailq works with the server stopped; a restart keeps the queue.
        r.stop()
        self.assertIn(qid, r.mailq())
        r.start()
        self.assertIn(qid, r.mailq())
        # Primary up, flush: delivered, and byte-identical but for Received.
        s = self.sink(r.primary_port)
        out = r.flush()
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertTrue(s.wait_count(1), r.read_log())
        self.assertTrue(r.wait_empty())
        got = s.messages()[0]
        body = strip_sink_headers(got)
        # smtp-sink stores the message as received on the wire, minus the
        # final ".": compare with the original's own line structure.
        self.assertEqual(body.rstrip(b"\r\n"), TRICKY.replace(b"\r\n", b"\n").rstrip(b"\n"))
        self.assertIn(b"by backup.example.org (Bartleby) with ESMTP id " + qid.encode(), got)
        self.assertIn("Mail queue is empty", r.mailq())
        log = r.read_log()
        self.assertRegex(log, qid + r": client=unknown\[127\.0\.0\.1\]")
        self.assertRegex(log, qid + r": from=<alice@sender\.test>, size=\d+, nrcpt=1")
        self.assertRegex(log, qid + r": to=<bob@example\.org>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, delay=[\d.]+, delays=[\d./]+, dsn=\d\.\d+\.\d+, status=sent \(250")
        self.assertRegex(log, qid + r": to=<bob@example\.org>, relay=none, delay=[\d.]+, delays=[\d./]+, dsn=\d\.\d+\.\d+, status=deferred")

    def test_flush_without_server_fails(self):
        r = Relay()
        self.relays.append(r)
        os.makedirs(os.path.join(r.spool, "queue"))
        out = r.flush()
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("no bartleby server is running", out.stderr)

    def test_many_messages_few_connections(self):
        r = self.relay()
        ids = [self.send(r, rcpts=("bob@example.org", "carol@example.org")) for _ in range(20)]
        s = self.sink(r.primary_port)
        r.flush()
        self.assertTrue(s.wait_count(20), r.read_log())
        self.assertTrue(r.wait_empty())
        # smtp-sink names files by session; one file per message.
        self.assertEqual(len(s.files()), 20)
        log = r.read_log()
        for qid in ids:
            self.assertEqual(log.count(qid + ": to=<"), log.count(qid + ": to=<b") * 2, qid)
            self.assertEqual(len(re.findall(qid + r": to=<[a-z]+@example\.org>, relay=127[^ ]+, delay=[\d.]+, delays=[\d./]+, dsn=\d\.\d+\.\d+, status=sent", log)), 2, qid)
        # Twenty messages, but no more connections than delivery_connections (4).
        sessions = {os.path.basename(f).split(".")[0] for f in s.files()}
        self.assertLessEqual(len(sessions), 4, s.files())

    def test_etrn(self):
        r = self.relay()
        qid = self.send(r)
        time.sleep(0.3)
        s = self.sink(r.primary_port)
        c = Client(r.port)
        c.cmd("EHLO primary.example.org")
        code, text = c.cmd("ETRN example.org")
        self.assertEqual(code, 250, text)
        self.assertTrue(s.wait_count(1), r.read_log())
        self.assertTrue(r.wait_empty())
        self.assertEqual(c.cmd("ETRN example.org")[0], 251)
        self.assertEqual(c.cmd("ETRN evil.test")[0], 459)
        self.assertEqual(c.cmd("ETRN #queue")[0], 458)
        self.assertIn(qid, r.read_log())

    def test_etrn_refused_for_hosts_not_allowed(self):
        r = self.relay(extra='etrn_allow = ["127.0.0.2/32"]')
        c = Client(r.port)
        c.cmd("EHLO x")
        code, text = c.cmd("ETRN example.org")
        self.assertEqual(code, 459, text)
        c2 = Client(r.port, source="127.0.0.2")
        c2.cmd("EHLO primary.example.org")
        self.assertIn(c2.cmd("ETRN example.org")[0], (250, 251))

    def test_bounce_on_expiry(self):
        r = self.relay(extra='max_queue_lifetime = "2s"')
        qid = self.send(r, msg=b"Subject: will expire\r\nMessage-ID: <exp-1@sender.test>\r\n\r\nbody\r\n")
        nullq = self.send(r, sender="", msg=b"Subject: a bounce itself\r\n\r\nbody\r\n")
        time.sleep(2.5)
        r.flush()
        # The original expires; a bounce to the sender replaces it. The
        # message from <> expires without a bounce.
        end = time.monotonic() + 10
        while time.monotonic() < end and (qid in r.queue_ids() or nullq in r.queue_ids()):
            time.sleep(0.1)
        ids = r.queue_ids()
        self.assertNotIn(qid, ids)
        self.assertNotIn(nullq, ids)
        self.assertEqual(len(ids), 1, r.mailq())
        q = r.mailq()
        self.assertIn("MAILER-DAEMON", q)
        self.assertIn("alice@sender.test", q)
        log = r.read_log()
        self.assertIn(qid + ": to=<bob@example.org>", log)
        self.assertIn("status=expired, returned to sender", log)
        self.assertIn(nullq + ": bounce of a bounce (null sender): discarded", log)
        # The bounce goes out via the primary, from <>.
        s = self.sink(r.primary_port)
        r.flush()
        self.assertTrue(s.wait_count(1), r.read_log())
        dsn = s.messages()[0].decode(errors="replace")
        self.assertIn("X-Mail-Args: <>", dsn)
        self.assertIn("X-Rcpt-Args: <alice@sender.test>", dsn)
        self.assertIn("Content-Type: multipart/report; report-type=delivery-status", dsn)
        self.assertIn("Content-Type: message/delivery-status", dsn)
        self.assertIn("Reporting-MTA: dns; backup.example.org", dsn)
        self.assertIn("Final-Recipient: rfc822; bob@example.org", dsn)
        self.assertIn("Action: failed", dsn)
        self.assertIn("Status: 4.4.7", dsn)
        self.assertRegex(dsn, r"Diagnostic-Code: smtp; 421 4\.4\.1 connect to")
        self.assertIn("Content-Type: text/rfc822-headers", dsn)
        self.assertIn("Message-ID: <exp-1@sender.test>", dsn)
        self.assertNotIn("\nbody\r\n", dsn.split("text/rfc822-headers")[1])

    def test_5xx_from_primary_bounces(self):
        r = self.relay()
        qid = self.send(r, rcpts=("bob@example.org", "carol@example.org"))
        time.sleep(0.3)
        # The primary rejects every RCPT with a permanent error.
        s = self.sink(r.primary_port, extra_args=("-f", "RCPT"))
        r.flush()
        end = time.monotonic() + 10
        while time.monotonic() < end and qid in r.queue_ids():
            time.sleep(0.1)
        self.assertNotIn(qid, r.queue_ids(), r.read_log())
        log = r.read_log()
        self.assertRegex(log, qid + r": to=<bob@example\.org>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, delay=[\d.]+, delays=[\d./]+, dsn=\d\.\d+\.\d+, status=bounced \(5")
        self.assertIn(qid + ": sender non-delivery notification:", log)
        # One bounce for both recipients, from <> to the sender; this
        # primary refuses every RCPT, so the bounce bounces too and, being
        # from <>, is discarded: never a bounce of a bounce.
        bid = re.search(qid + r": sender non-delivery notification: ([0-9A-F]+)", log).group(1)
        self.assertEqual(log.count(qid + ": sender non-delivery notification:"), 1)
        end = time.monotonic() + 10
        while time.monotonic() < end and bid in r.queue_ids():
            time.sleep(0.1)
        log = r.read_log()
        self.assertRegex(log, bid + r": to=<alice@sender\.test>, relay=\S+, delay=[\d.]+, delays=[\d./]+, dsn=\d\.\d+\.\d+, status=bounced")
        self.assertIn(bid + ": bounce of a bounce (null sender): discarded", log)
        self.assertEqual(r.queue_ids(), [])

    def test_session_refusals_defer_never_bounce(self):
        # Refusals of the session itself (a 554 greeting, a 5xx to HELO or
        # RSET) say nothing about the mail: with one primary, taking them as
        # permanent would bounce the whole queue. They defer.
        r = self.relay(extra="delivery_connections = 1")
        ids = [self.send(r, msg=b"Subject: m%d\r\n\r\nbody\r\n" % i) for i in range(2)]
        time.sleep(0.3)
        for replies, seen in (
            ({"greeting": "554 5.3.2 primary.example.org not accepting mail"}, "refused to talk to me: 554 5.3.2"),
            ({"EHLO": "502 5.5.2 no EHLO", "HELO": "550 5.7.1 go away"}, "said: 550 5.7.1 go away (in reply to HELO command)"),
        ):
            deferred = [re.compile(qid + r": to=<bob@example\.org>, relay=none, delay=[\d.]+, delays=[\d./]+, dsn=\d\.\d+\.\d+, status=deferred \(host 127\.0\.0\.1\[127\.0\.0\.1\]:\d+ " + re.escape(seen)) for qid in ids]
            p = FakePrimary(r.primary_port, replies)
            try:
                r.flush()
                # Each message's own deferral, and its state written (the
                # scheduler's warning line holds the same text).
                end = time.monotonic() + 10
                while time.monotonic() < end and not (all(d.search(r.read_log()) for d in deferred) and r.mailq().count(seen) >= 2):
                    time.sleep(0.1)
            finally:
                p.stop()
            log = r.read_log()
            for d in deferred:
                self.assertRegex(log, d)
            self.assertEqual(sorted(r.queue_ids()), sorted(ids), log)
            self.assertNotIn("non-delivery notification", log)
            self.assertNotIn("status=bounced", log)
            self.assertEqual(r.mailq().count(seen), 2, r.mailq())
        # A primary that takes one message, then refuses RSET: the first is
        # sent, the second deferred on that connection; no bounce.
        p = FakePrimary(r.primary_port, {"RSET": "554 5.5.1 no RSET here"})
        try:
            r.flush()
            end = time.monotonic() + 10
            while time.monotonic() < end and "(in reply to RSET command)" not in r.read_log():
                time.sleep(0.1)
            log = r.read_log()
            self.assertIn("said: 554 5.5.1 no RSET here (in reply to RSET command)", log)
            self.assertEqual(len(p.messages), 1, p.commands)
            self.assertEqual(len(r.queue_ids()), 1, log)
            self.assertNotIn("status=bounced", log)
            # The next run, on a fresh connection, needs no RSET.
            r.flush()
            self.assertTrue(r.wait_empty(), r.read_log())
            self.assertEqual(len(p.messages), 2, p.commands)
        finally:
            p.stop()
        self.assertNotIn("non-delivery notification", r.read_log())

    def test_unreadable_queue_file_waits_then_goes(self):
        # A queue file that exists but cannot be read (here: a directory in
        # its place, EISDIR) is retried after minimal_backoff, not in a hot
        # loop of failed runs; once readable again it is delivered.
        r = Relay()
        self.relays.append(r)
        with open(r.config) as f:
            conf = f.read()
        with open(r.config, "w") as f:
            f.write(conf.replace('minimal_backoff = "5m"', 'minimal_backoff = "1s"'))
        r.start()
        qid = self.send(r)
        path = os.path.join(r.spool, "queue", qid)
        os.rename(path, path + ".aside")
        os.mkdir(path)
        time.sleep(3)
        errors = r.read_log().count(qid + ": cannot read queue file")
        self.assertGreaterEqual(errors, 1, r.read_log())
        self.assertLessEqual(errors, 5, r.read_log()[-2000:])
        # Swapped back in one step (renameat2 RENAME_EXCHANGE): an rmdir
        # then a rename leaves an instant with no file, and a run that reads
        # then finds the message gone for good (it was taken out of the
        # queue, by the relay or an admin) and forgets it until the next
        # full scan; the test raced that under load.
        libc = ctypes.CDLL(None, use_errno=True)
        AT_FDCWD, RENAME_EXCHANGE = -100, 2
        if libc.renameat2(AT_FDCWD, (path + ".aside").encode(), AT_FDCWD, path.encode(), RENAME_EXCHANGE) != 0:
            raise OSError(ctypes.get_errno(), "renameat2 RENAME_EXCHANGE")
        os.rmdir(path + ".aside")
        s = self.sink(r.primary_port)
        self.assertTrue(s.wait_count(1, timeout=10), r.read_log()[-2000:])
        self.assertTrue(r.wait_empty())

    def test_smuggling_is_data_and_stored_with_crlf_only(self):
        r = self.relay()
        c = Client(r.port)
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<alice@sender.test>")
        c.cmd("RCPT TO:<bob@example.org>")
        self.assertEqual(c.cmd("DATA")[0], 354)
        c.send(
            b"Subject: smuggle\r\n\r\nhello\n.\r\nMAIL FROM:<admin@example.org>\r\nRCPT TO:<victim@example.org>\r\n"
            b"DATA\r\nSubject: smuggled\r\n\r\nx\r.\r\nbare cr\rend\r\n.\r\n"
        )
        code, text = c.reply()
        self.assertEqual(code, 250, text)
        c.cmd("QUIT")
        ids = r.queue_ids()
        self.assertEqual(len(ids), 1)
        with open(os.path.join(r.spool, "queue", ids[0]), "rb") as f:
            data = f.read().split(b"\n\n", 1)[1]
        self.assertNotRegex(data, rb"[^\r]\n")
        self.assertNotRegex(data, rb"\r[^\n]")
        self.assertIn(b"MAIL FROM:<admin@example.org>", data)
        s = self.sink(r.primary_port)
        r.flush()
        self.assertTrue(s.wait_count(1))
        time.sleep(0.5)
        self.assertEqual(len(s.files()), 1, "the smuggled message must not exist")
        self.assertNotIn(b"victim", b"".join(l for l in s.messages()[0].split(b"\n") if l.startswith(b"X-Rcpt")))

    def test_bare_newline_reject_mode(self):
        r = self.relay(extra='bare_newline = "reject"')
        c = Client(r.port)
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<alice@sender.test>")
        c.cmd("RCPT TO:<bob@example.org>")
        c.cmd("DATA")
        c.send(b"Subject: x\r\n\r\nbare\nlf\r\n.\r\n")
        code, text = c.reply()
        self.assertEqual(code, 550, text)
        self.assertEqual(r.queue_ids(), [])


class Load(RelayTest):
    def test_smtp_source_load_and_memory(self):
        """20 sessions of Postfix's smtp-source; all accepted; peak RSS printed."""
        r = self.relay(extra="max_connections = 50")
        n = 400
        t = time.monotonic()
        out = subprocess.run(
            ["smtp-source", "-s", "20", "-m", str(n), "-l", "4096", "-f", "alice@sender.test", "-t", "bob@example.org", f"127.0.0.1:{r.port}"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        took = time.monotonic() - t
        self.assertEqual(out.returncode, 0, out.stderr)
        st = harness.proc_status(r.proc.pid)
        ids = r.queue_ids()
        self.assertEqual(len(ids), n)
        sys.stderr.write(
            f"\n  [load] {n} messages of 4 KiB, 20 sessions: {took:.2f} s ({n / took:.0f} msg/s); "
            f"server VmHWM {st['VmHWM']} kB, VmRSS {st['VmRSS']} kB, threads {st['Threads']}\n"
        )
        self.assertLess(st["VmHWM"], 16 * 1024, "the whole appliance has 16 MB")
        s = self.sink(r.primary_port)
        t = time.monotonic()
        r.flush()
        self.assertTrue(r.wait_empty(120), r.mailq()[-2000:])
        took = time.monotonic() - t
        sys.stderr.write(f"  [load] drained {n} messages in {took:.2f} s ({n / took:.0f} msg/s)\n")


class Shutdown(RelayTest):
    def test_sigterm_exits_cleanly_and_second_server_refused(self):
        r = self.relay()
        r2 = Relay()
        self.relays.append(r2)
        # Same spool, other port: must refuse to run.
        with open(r2.config) as f:
            cfg = f.read().replace(r2.spool, r.spool)
        with open(r2.config, "w") as f:
            f.write(cfg)
        out = subprocess.run([harness.BINARY, "serve", "-c", r2.config], capture_output=True, text=True, timeout=10)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("already serving", out.stderr)
        r.proc.terminate()
        self.assertEqual(r.proc.wait(timeout=15), 0)
        self.assertIn("stopped", r.read_log())


def main():
    harness.take_binary_arg()
    harness.report("relay", unittest.main(exit=False, verbosity=2).result)


if __name__ == "__main__":
    main()
