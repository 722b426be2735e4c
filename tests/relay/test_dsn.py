"""DSN (RFC 3461/3464) through the backup: parameters accepted, checked,
kept in the queue and passed on unchanged to a primary that offers DSN;
"relayed" notices for a primary that does not; bounces that honour NOTIFY,
RET, ORCPT and ENVID; one delay warning per message.
Run: python3 tests/relay/test_dsn.py [path/to/bartleby]"""

import os
import re
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Client, FakePrimary, Relay, free_port, queued_id  # noqa: E402

EHLO_DSN = "250-primary.example.org\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-DSN\r\n250 SIZE 52428800"
EHLO_NO_DSN = "250-primary.example.org\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 52428800"


class ByAddress(FakePrimary):
    """A fake primary that answers RCPT by address: `rcpt` maps an address
    to its reply (others get 250)."""

    def __init__(self, port, rcpt, replies=None):
        self.rcpt = rcpt
        super().__init__(port, replies or {"EHLO": EHLO_NO_DSN}, pipelining=True)

    def _reply(self, conn, f, verb, default):
        if verb.startswith("RCPT"):
            cmd = self.commands[-1]
            for addr, ans in self.rcpt.items():
                if f"<{addr}>" in cmd:
                    self._said = ""
                    return self._do(conn, f, ans)
        return super()._reply(conn, f, verb, default)


def reports(fake):
    """The notifications a fake primary took (a pipelining client ends an
    empty DATA when every RCPT was refused: those are left out)."""
    return [m for m in fake.acked if b"report-type=delivery-status" in m]


def wait(cond, timeout=20.0):
    return harness.wait_for(cond, timeout)

class DsnTest(unittest.TestCase):
    def setUp(self):
        self.relays = []
        self.fakes = []

    def tearDown(self):
        for r in self.relays:
            if self._failed():
                sys.stderr.write(f"\n--- relay log {r.log} ---\n{r.read_log()[-4000:]}\n")
            r.cleanup()
        for f in self.fakes:
            f.stop()

    def _failed(self):
        res = getattr(self, "_outcome", None)
        if res is None or not hasattr(res, "result"):
            return False
        return any(t is self for t, _ in res.result.failures + res.result.errors)

    def relay(self, extra="", start=True):
        r = Relay(extra=extra)
        self.relays.append(r)
        return r.start() if start else r

    def fake(self, port, cls=FakePrimary, *a, **kw):
        f = cls(port, *a, **kw)
        self.fakes.append(f)
        return f

    def send(self, r, mail, rcpts, msg=b"Subject: dsn test\r\nMessage-ID: <dsn-1@sender.test>\r\n\r\nSECRET BODY LINE\r\n"):
        """MAIL and RCPT lines as given (with their parameters); returns the
        queue ID."""
        c = Client(r.port)
        try:
            code, text = c.cmd("EHLO client.sender.test")
            self.assertEqual(code, 250, text)
            code, text = c.cmd(mail)
            self.assertEqual(code, 250, f"{mail}: {text}")
            for l in rcpts:
                code, text = c.cmd(l)
                self.assertEqual(code, 250, f"{l}: {text}")
            self.assertEqual(c.cmd("DATA")[0], 354)
            c.send(msg + b".\r\n")
            code, text = c.reply()
            self.assertEqual(code, 250, text)
            c.cmd("QUIT")
            return queued_id(text)
        finally:
            c.close()

    # --- the SMTP server side -------------------------------------------

    def test_ehlo_offers_dsn(self):
        r = self.relay()
        c = Client(r.port)
        code, text = c.cmd("EHLO client.sender.test")
        c.close()
        self.assertEqual(code, 250)
        self.assertIn("250-DSN", text.replace("250 DSN", "250-DSN"))

    def test_malformed_parameters_get_501(self):
        # Postfix's smtpd answers each of these with 501 5.5.4 and its text
        # (smtpd.c mail_cmd/rcpt_cmd); a repeated parameter likewise.
        r = self.relay(extra="error_limit = 100")
        c = Client(r.port)
        c.cmd("EHLO client.sender.test")
        mail_bad = [
            ("MAIL FROM:<alice@sender.test> RET=FULL RET=HDRS", "Bad RET parameter syntax"),
            ("MAIL FROM:<alice@sender.test> RET=BOGUS", "Bad RET parameter syntax"),
            ("MAIL FROM:<alice@sender.test> ENVID=" + "x" * 101, "Bad ENVID parameter syntax"),
            ("MAIL FROM:<alice@sender.test> ENVID=a+ZZ", "Bad ENVID parameter syntax"),
            ("MAIL FROM:<alice@sender.test> ENVID=a ENVID=b", "Bad ENVID parameter syntax"),
            ("MAIL FROM:<alice@sender.test> ENVID=caf\u00e9", "Bad ENVID parameter syntax"),
        ]
        for line, text in mail_bad:
            code, got = c.cmd(line)
            self.assertEqual(code, 501, f"{line}: {got}")
            self.assertIn("5.5.4 " + text, got, line)
        # A RCPT parameter on MAIL (and the reverse) is not a parameter of
        # that command: 555, as Postfix's "Unsupported option".
        self.assertEqual(c.cmd("MAIL FROM:<alice@sender.test> NOTIFY=NEVER")[0], 555)
        self.assertEqual(c.cmd("MAIL FROM:<alice@sender.test> ORCPT=rfc822;a@b")[0], 555)
        # 100 characters is the most RFC 3461 allows: taken.
        code, got = c.cmd("MAIL FROM:<alice@sender.test> ENVID=" + "x" * 100)
        self.assertEqual(code, 250, got)
        rcpt_bad = [
            ("RCPT TO:<bob@example.org> NOTIFY=NEVER,SUCCESS", "Bad NOTIFY parameter syntax"),
            ("RCPT TO:<bob@example.org> NOTIFY=SUCCESS,NEVER", "Bad NOTIFY parameter syntax"),
            ("RCPT TO:<bob@example.org> NOTIFY=FOO", "Bad NOTIFY parameter syntax"),
            ("RCPT TO:<bob@example.org> NOTIFY=SUCCESS NOTIFY=FAILURE", "Bad NOTIFY parameter syntax"),
            ("RCPT TO:<bob@example.org> ORCPT=rfc822", "Bad ORCPT parameter syntax"),
            ("RCPT TO:<bob@example.org> ORCPT=rfc822;+ZZ", "Bad ORCPT parameter syntax"),
            ("RCPT TO:<bob@example.org> ORCPT=rfc822;a@b ORCPT=rfc822;a@b", "Bad ORCPT parameter syntax"),
            ("RCPT TO:<bob@example.org> ORCPT=rfc822;b\u00e9@example.org", "Bad ORCPT parameter syntax"),
            ("RCPT TO:<bob@example.org> ORCPT=rfc822;" + "x" * 500, "Bad ORCPT parameter syntax"),
        ]
        for line, text in rcpt_bad:
            code, got = c.cmd(line)
            self.assertEqual(code, 501, f"{line}: {got}")
            self.assertIn("5.5.4 Error: " + text, got, line)
        self.assertEqual(c.cmd("RCPT TO:<bob@example.org> RET=FULL")[0], 555)
        # Other RCPT extensions are still not offered (as before DSN).
        self.assertEqual(c.cmd("RCPT TO:<bob@example.org> CONNEG")[0], 555)
        self.assertEqual(c.cmd("RCPT TO:<bob@example.org> NOTIFY=NEVER RRVS=2030-01-01T00:00:00Z")[0], 555)
        self.assertEqual(c.cmd("RCPT TO:<bob@example.org> ENVID=x")[0], 555)
        # And the good forms still work in the same transaction.
        code, got = c.cmd("RCPT TO:<bob@example.org> NOTIFY=success,Delay ORCPT=utf-8;bob+40example.org")
        self.assertEqual(code, 250, got)
        code, got = c.cmd("RCPT TO:<carol@example.org> NOTIFY=NEVER")
        self.assertEqual(code, 250, got)
        c.close()
        self.assertNotIn("panicked", r.read_log())

    # --- passing the parameters on --------------------------------------

    def test_parameters_reach_a_dsn_primary_unchanged(self):
        r = self.relay(start=False)
        fake = self.fake(r.primary_port, FakePrimary, {"EHLO": EHLO_DSN}, pipelining=True)
        r.start()
        qid = self.send(
            r,
            "MAIL FROM:<alice@sender.test> RET=HDRS ENVID=QQ+2B1+3Dx.y",
            [
                "RCPT TO:<bob@example.org> NOTIFY=success,Delay ORCPT=rfc822;bob+2Bx+40example.org",
                "RCPT TO:<carol@example.org>",
                "RCPT TO:<dave@example.org> NOTIFY=NEVER",
            ],
        )
        self.assertTrue(wait(lambda: fake.acked and not r.queue_ids()), r.read_log())
        cmds = fake.commands
        mail = [l for l in cmds if l.startswith("MAIL")]
        self.assertEqual(len(mail), 1, cmds)
        self.assertTrue(mail[0].endswith(" RET=HDRS ENVID=QQ+2B1+3Dx.y"), mail[0])
        rcpts = [l for l in cmds if l.startswith("RCPT")]
        self.assertEqual(
            rcpts,
            [
                "RCPT TO:<bob@example.org> NOTIFY=success,Delay ORCPT=rfc822;bob+2Bx+40example.org",
                "RCPT TO:<carol@example.org>",
                "RCPT TO:<dave@example.org> NOTIFY=NEVER",
            ],
        )
        # A DSN primary reports success itself: no notice from here.
        time.sleep(0.5)
        self.assertEqual(len(fake.acked), 1)
        self.assertNotIn("notification", r.read_log())
        self.assertIn(qid + ": removed", r.read_log())

    def test_real_postfix_peer_smtp_sink(self):
        # Postfix's smtp-sink as the primary: it offers DSN and writes the
        # MAIL and RCPT parameters it got into X-Mail-Args / X-Rcpt-Args.
        # With -N it does not offer DSN: no parameters, and a "relayed"
        # notice for NOTIFY=SUCCESS.
        for offer in (True, False):
            r = self.relay(start=False)
            sink = harness.Sink(r.primary_port, () if offer else ("-N",))
            try:
                r.start()
                self.send(
                    r,
                    "MAIL FROM:<alice@sender.test> RET=HDRS ENVID=sink+2B1",
                    ["RCPT TO:<bob@example.org> NOTIFY=SUCCESS ORCPT=rfc822;bob+40example.org"],
                )
                self.assertTrue(sink.wait_count(1 if offer else 2), r.read_log())
                self.assertTrue(wait(lambda: not r.queue_ids()), r.read_log())
                msgs = [m.decode(errors="replace") for m in sink.messages()]
                orig = next(m for m in msgs if "SECRET BODY LINE" in m)
                if offer:
                    self.assertEqual(len(msgs), 1)
                    self.assertRegex(orig, r"X-Mail-Args: <alice@sender\.test>.* RET=HDRS ENVID=sink\+2B1\r?\n")
                    self.assertRegex(orig, r"X-Rcpt-Args: <bob@example\.org> NOTIFY=SUCCESS ORCPT=rfc822;bob\+40example\.org\r?\n")
                else:
                    self.assertNotRegex(orig, r"RET=|ENVID=|NOTIFY=|ORCPT=")
                    notice = next(m for m in msgs if "Action: relayed" in m)
                    self.assertIn("X-Mail-Args: <>", notice)
                    self.assertIn("Original-Envelope-Id: sink+1", notice)
            finally:
                sink.stop()

    def test_no_parameters_to_a_primary_without_dsn(self):
        r = self.relay(start=False)
        fake = self.fake(r.primary_port, FakePrimary, {"EHLO": EHLO_NO_DSN}, pipelining=True)
        r.start()
        self.send(r, "MAIL FROM:<alice@sender.test> RET=FULL ENVID=e1", ["RCPT TO:<bob@example.org> NOTIFY=FAILURE ORCPT=rfc822;bob+40example.org"])
        self.assertTrue(wait(lambda: fake.acked and not r.queue_ids()), r.read_log())
        for l in fake.commands:
            self.assertNotRegex(l, r"RET=|ENVID=|NOTIFY=|ORCPT=", l)

    def test_relayed_notice_when_the_primary_lacks_dsn(self):
        # Postfix's smtp client (smtp_rcpt.c): a primary without DSN and
        # NOTIFY=SUCCESS give a "relayed" success notice to the sender.
        r = self.relay(start=False)
        fake = self.fake(r.primary_port, FakePrimary, {"EHLO": EHLO_NO_DSN}, pipelining=True)
        r.start()
        qid = self.send(
            r,
            "MAIL FROM:<alice@sender.test> ENVID=env+2B1",
            ["RCPT TO:<bob@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+40example.org", "RCPT TO:<carol@example.org>"],
        )
        self.assertTrue(wait(lambda: len(fake.acked) >= 2 and not r.queue_ids()), r.read_log())
        notice = fake.acked[1].decode(errors="replace")
        mails = [l for l in fake.commands if l.startswith("MAIL")]
        self.assertTrue(mails[1].startswith("MAIL FROM:<>"), mails)
        self.assertIn("RCPT TO:<alice@sender.test>", fake.commands)
        self.assertIn("Subject: Successful Mail Delivery Report", notice)
        # Decoded from its xtext, as Postfix writes it.
        self.assertIn("Original-Envelope-Id: env+1\r\n", notice)
        self.assertIn("Final-Recipient: rfc822; bob@example.org", notice)
        self.assertIn("Original-Recipient: rfc822; bob@example.org", notice)
        self.assertIn("Action: relayed", notice)
        self.assertIn("Status: 2.0.0", notice)
        self.assertIn("delivered to a host that does not support DSN", notice)
        self.assertNotIn("carol@example.org", notice.split("message/delivery-status")[1])
        self.assertNotIn("SECRET BODY LINE", notice)
        log = r.read_log()
        self.assertEqual(log.count(qid + ": sender delivery status notification: "), 1, log)

    def test_no_relayed_notice_before_the_primary_took_it(self):
        # The end of data refused for now: nothing was relayed yet; and never
        # a notice to the null sender.
        r = self.relay(start=False)
        fake = self.fake(r.primary_port, FakePrimary, {"EHLO": EHLO_NO_DSN, "end": "451 4.3.0 try later"}, pipelining=True)
        r.start()
        qid = self.send(r, "MAIL FROM:<alice@sender.test>", ["RCPT TO:<bob@example.org> NOTIFY=SUCCESS"])
        self.assertTrue(wait(lambda: qid + ": to=<bob@example.org>" in r.read_log()), r.read_log())
        fake.replies["end"] = "250 2.0.0 Ok"
        nq = self.send(r, "MAIL FROM:<>", ["RCPT TO:<bob@example.org> NOTIFY=SUCCESS"])
        self.assertTrue(wait(lambda: nq + ": removed" in r.read_log()), r.read_log())
        log = r.read_log()
        self.assertIn(qid + ": to=<bob@example.org>", log)
        self.assertRegex(log, qid + r": to=<bob@example\.org>.*status=deferred")
        self.assertNotIn("delivery status notification", log)
        self.assertEqual(r.queue_ids(), [qid])

    # --- bounces --------------------------------------------------------

    def test_notify_never_and_without_failure_get_no_bounce(self):
        # Postfix's bounce daemon (bounce_one_service.c) skips a recipient
        # whose NOTIFY lacks FAILURE; the smtp line still says bounced.
        r = self.relay(start=False)
        no = "550 5.1.1 no such user"
        fake = self.fake(r.primary_port, ByAddress, {"bob@example.org": no, "carol@example.org": no, "dave@example.org": no, "erin@example.org": no})
        r.start()
        q1 = self.send(r, "MAIL FROM:<alice@sender.test>", ["RCPT TO:<bob@example.org> NOTIFY=NEVER"])
        self.assertTrue(wait(lambda: q1 + ": removed" in r.read_log()), r.read_log())
        q2 = self.send(
            r,
            "MAIL FROM:<alice@sender.test>",
            ["RCPT TO:<carol@example.org> NOTIFY=SUCCESS,DELAY", "RCPT TO:<dave@example.org>", "RCPT TO:<erin@example.org> NOTIFY=NEVER"],
        )
        self.assertTrue(wait(lambda: len(reports(fake)) >= 1 and not r.queue_ids()), r.read_log())
        log = r.read_log()
        for q, a in ((q1, "bob"), (q2, "carol"), (q2, "dave"), (q2, "erin")):
            self.assertRegex(log, q + r": to=<" + a + r"@example\.org>, relay=\S+, delay=[\d.]+, delays=[\d./]+, dsn=5\.1\.1, status=bounced")
        self.assertNotIn(q1 + ": sender non-delivery notification", log)
        self.assertIn(q1 + ": no sender non-delivery notification: NOTIFY without FAILURE for <bob@example.org>", log)
        self.assertEqual(log.count(q2 + ": sender non-delivery notification: "), 1, log)
        time.sleep(0.3)
        self.assertEqual(len(reports(fake)), 1, "one bounce, for dave only")
        b = reports(fake)[0].decode(errors="replace")
        report = b.split("message/delivery-status")[1]
        self.assertIn("Final-Recipient: rfc822; dave@example.org", report)
        self.assertNotIn("carol@", report)
        self.assertNotIn("erin@", report)

    def _bounce_of(self, r, fake, mail, rcpt, msg):
        qid = self.send(r, mail, [rcpt], msg=msg)
        self.assertTrue(wait(lambda: len(reports(fake)) >= 1 and not r.queue_ids(), 60), r.read_log()[-3000:])
        self.assertIn(qid + ": sender non-delivery notification: ", r.read_log())
        return reports(fake)[0]

    def test_ret_hdrs_returns_headers_only(self):
        r = self.relay(start=False)
        fake = self.fake(r.primary_port, ByAddress, {"bob@example.org": "550 5.1.1 no such user"})
        r.start()
        b = self._bounce_of(
            r, fake, "MAIL FROM:<alice@sender.test> RET=HDRS ENVID=hdrs-1", "RCPT TO:<bob@example.org> ORCPT=rfc822;b+2Bbob+40example.org",
            b"Subject: hdrs\r\nX-Test: 1\r\n\r\nSECRET BODY LINE\r\n",
        ).decode(errors="replace")
        self.assertIn("Content-Type: text/rfc822-headers", b)
        self.assertIn("X-Test: 1", b)
        self.assertNotIn("SECRET BODY LINE", b)
        self.assertIn("Original-Envelope-Id: hdrs-1", b)
        self.assertIn("Original-Recipient: rfc822; b+bob@example.org", b)
        self.assertIn("Final-Recipient: rfc822; bob@example.org", b)
        self.assertIn("Action: failed", b)
        self.assertIn("Status: 5.1.1", b)

    def test_ret_full_returns_a_large_message_streamed(self):
        # 5 MB returned whole; the relay's memory stays small (the message is
        # streamed from the spool into the bounce's spool file).
        r = self.relay(extra='max_message_size = "8M"\nbounce_size_limit = "6M"', start=False)
        fake = self.fake(r.primary_port, ByAddress, {"bob@example.org": "550 5.1.1 no such user"})
        r.start()
        line = b"".join(bytes([0x41 + (i % 26)]) for i in range(76))
        body = b"".join(b"%07d " % i + line + b"\r\n" for i in range(5 * 1024 * 1024 // 86))
        msg = b"Subject: big\r\nX-Big: yes\r\n\r\n" + body
        b = self._bounce_of(r, fake, "MAIL FROM:<alice@sender.test> RET=FULL", "RCPT TO:<bob@example.org>", msg)
        self.assertGreater(len(body), 5_000_000)
        self.assertIn(b"Content-Type: message/rfc822", b)
        self.assertIn(msg, b, "the whole original, byte for byte")
        self.assertNotIn(b"text/rfc822-headers", b)
        hwm = harness.proc_status(r.proc.pid)["VmHWM"]
        sys.stderr.write(f"  [ret-full] bounce of {len(b)} bytes, relay VmHWM {hwm} kB\n")
        self.assertLess(hwm, 4096)

    def test_ret_full_over_the_limits_returns_headers(self):
        # Postfix (bounce_notify_util.c bounce_original): a message over
        # bounce_size_limit (default 50000) is returned as headers only.
        r = self.relay(start=False)
        fake = self.fake(r.primary_port, ByAddress, {"bob@example.org": "550 5.1.1 no such user"})
        r.start()
        msg = b"Subject: medium\r\n\r\n" + b"SECRET BODY LINE " * 4000 + b"\r\n"
        b = self._bounce_of(r, fake, "MAIL FROM:<alice@sender.test> RET=FULL", "RCPT TO:<bob@example.org>", msg).decode(errors="replace")
        self.assertIn("Content-Type: text/rfc822-headers", b)
        self.assertIn("Subject: medium", b)
        self.assertNotIn("SECRET BODY LINE", b)
        self.assertIn("too large to return", b)

    def test_ret_full_near_max_message_size_still_bounces(self):
        # A message just under max_message_size with a bounce_size_limit
        # above it: returned whole, the bounce would be over the size
        # limit; it is returned as headers instead, and still bounces.
        r = self.relay(extra='max_message_size = "1M"\nbounce_size_limit = "2M"', start=False)
        fake = self.fake(r.primary_port, ByAddress, {"bob@example.org": "550 5.1.1 no such user"})
        r.start()
        msg = b"Subject: near\r\n\r\n" + (b"SECRET BODY LINE " * 60 + b"\r\n") * (1_048_000 // 1022)
        self.assertLess(len(msg) + 300, 1 << 20)
        b = self._bounce_of(r, fake, "MAIL FROM:<alice@sender.test> RET=FULL", "RCPT TO:<bob@example.org>", msg).decode(errors="replace")
        self.assertIn("Content-Type: text/rfc822-headers", b)
        self.assertNotIn("SECRET BODY LINE", b)
        self.assertLess(len(b), 1 << 20)

    # --- delay warnings -------------------------------------------------

    def test_one_delay_warning_across_a_restart(self):
        # Postfix's delay_warning_time: one warning per message, after it.
        r = self.relay(extra='delay_warning_time = "1s"')
        warned = self.send(r, "MAIL FROM:<alice@sender.test> ENVID=w1", ["RCPT TO:<bob@example.org> NOTIFY=DELAY,FAILURE"])
        default = self.send(r, "MAIL FROM:<alice@sender.test>", ["RCPT TO:<carol@example.org>"])
        never = self.send(r, "MAIL FROM:<alice@sender.test>", ["RCPT TO:<dave@example.org> NOTIFY=NEVER"])
        nodelay = self.send(r, "MAIL FROM:<alice@sender.test>", ["RCPT TO:<erin@example.org> NOTIFY=FAILURE,SUCCESS"])
        null = self.send(r, "MAIL FROM:<>", ["RCPT TO:<frank@example.org> NOTIFY=DELAY"])
        ids = (warned, default, never, nodelay, null)

        def tries(q):
            return len(re.findall(q + r": to=<[^>]*>, .*status=deferred", r.read_log()))

        # New mail waits while the primary is known down: a flush tries all.
        time.sleep(1.2)
        r.flush()
        self.assertTrue(wait(lambda: all(tries(q) >= 1 for q in ids)), r.read_log())
        self.assertTrue(wait(lambda: r.read_log().count("sender delay notification: ") >= 2), r.read_log())
        r.flush()
        self.assertTrue(wait(lambda: all(tries(q) >= 2 for q in ids)), r.read_log())
        before = {q: tries(q) for q in ids}
        r.stop()
        r.start()
        r.flush()
        self.assertTrue(wait(lambda: all(tries(q) > before[q] for q in ids)), r.read_log())
        fake = self.fake(r.primary_port, FakePrimary, {"EHLO": EHLO_NO_DSN}, pipelining=True)
        r.flush()
        self.assertTrue(wait(lambda: not r.queue_ids()), r.read_log())
        log = r.read_log()
        self.assertEqual(log.count(warned + ": sender delay notification: "), 1, log)
        self.assertEqual(log.count(default + ": sender delay notification: "), 1, log)
        for q in (never, nodelay, null):
            self.assertNotIn(q + ": sender delay notification", log)
        self.assertEqual(log.count("sender delay notification: "), 2, log)
        warnings = [m.decode(errors="replace") for m in fake.acked if b"Delayed Mail" in m]
        self.assertEqual(len(warnings), 2, [m[:300] for m in fake.acked])
        w = next(x for x in warnings if "bob@example.org" in x)
        self.assertIn("Subject: Delayed Mail (still being retried)", w)
        self.assertIn("Action: delayed", w)
        self.assertRegex(w, r"Status: 4\.\d+\.\d+")
        self.assertIn("Original-Envelope-Id: w1", w)
        self.assertIn("Will-Retry-Until: ", w)
        self.assertIn("It will be retried until ", w)
        self.assertNotIn("SECRET BODY LINE", w)

    # --- logs ---------------------------------------------------------

    def test_pflogsumm_counts_notices_as_postfix_mail(self):
        # Notices are logged as Postfix's bounce daemon logs them: pflogsumm
        # counts the two messages received, the two deliveries (the message
        # and the relayed notice), one bounce without a notification.
        from test_pflogsumm import grand_totals, pflogsumm
        r = self.relay(start=False)
        fake = self.fake(r.primary_port, ByAddress, {"nobody@example.org": "550 5.1.1 no such user"})
        r.start()
        q1 = self.send(r, "MAIL FROM:<alice@sender.test>", ["RCPT TO:<bob@example.org> NOTIFY=SUCCESS"])
        self.assertTrue(wait(lambda: len(reports(fake)) >= 1 and not r.queue_ids()), r.read_log())
        q2 = self.send(r, "MAIL FROM:<carol@sender.test>", ["RCPT TO:<nobody@example.org> NOTIFY=NEVER"])
        self.assertTrue(wait(lambda: q2 + ": removed" in r.read_log()), r.read_log())
        r.stop()
        got = grand_totals(pflogsumm(r.log))
        self.assertEqual(got["received"][0], 2, got)
        self.assertEqual(got["delivered"][0], 2, got)
        self.assertEqual(got["bounced"][0], 1, got)
        self.assertEqual(got["deferred"][0], 0, got)
        self.assertIn(q1 + ": sender delivery status notification: ", r.read_log())

    # --- upgrades -------------------------------------------------------

    def test_old_queue_file_is_delivered(self):
        # A queue file written before DSN existed (no dsn-* lines): sent
        # without DSN parameters, even to a DSN primary.
        r = self.relay(start=False)
        os.makedirs(os.path.join(r.spool, "queue"))
        body = b"Subject: old\r\n\r\nfrom the old version\r\n"
        head = (
            "BARTLEBY-QUEUE 1\nid ABCDEF0000001\narrival %d\nclient mx.sender.test[192.0.2.1]\nhelo mx.sender.test\n"
            "from alice@sender.test\nrcpt bob@example.org\nlength %020d\n\n" % (int(time.time()), len(body))
        ).encode()
        with open(os.path.join(r.spool, "queue", "ABCDEF0000001"), "wb") as f:
            f.write(head + body)
        fake = self.fake(r.primary_port, FakePrimary, {"EHLO": EHLO_DSN}, pipelining=True)
        r.start()
        r.flush()
        self.assertTrue(wait(lambda: fake.acked and not r.queue_ids()), r.read_log())
        self.assertIn(b"from the old version", fake.acked[0])
        self.assertIn("RCPT TO:<bob@example.org>", fake.commands)
        self.assertTrue(any(l.startswith("MAIL FROM:<alice@sender.test>") and "RET=" not in l for l in fake.commands))


def main():
    harness.take_binary_arg()
    harness.report("dsn", unittest.main(exit=False, verbosity=2).result)


if __name__ == "__main__":
    main()
