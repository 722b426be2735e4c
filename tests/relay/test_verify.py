#!/usr/bin/env python3
"""Recipient verification against the primary (issue 13, part 1):
verify_recipients, verify_timeout, verify_positive_ttl, verify_negative_ttl,
verify_unknown, verify_cache_size.

A fake primary that knows a set of users (harness.FakePrimary, answering
RCPT by address). Postfix's reject_unverified_recipient is the model: it
probes the primary with MAIL FROM:<> / RCPT TO (never DATA), caches the
answer (address_verify_map), answers the client 450 by default for an
undeliverable address (unverified_recipient_reject_code = 450; here 550
5.1.1, as the issue asks), 450 4.1.1 while the answer is pending or the
primary says 4xx (unverified_recipient_defer_code = 450), and refreshes
positive entries after address_verify_positive_refresh_time (7d of 31d).

Usage: test_verify.py [path/to/bartleby]
"""

import os
import random
import socket
import sys
import threading
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Client, Relay, free_port  # noqa: E402


wait_for = harness.wait_for

class UserPrimary(harness.FakePrimary):
    """A fake primary that knows `users`: 250 for them, 550 5.1.1 for the
    rest (Postfix's smtpd_reject_unlisted_recipient wording). `mode` turns
    every RCPT into a 4xx ("tempfail") or silence ("silent"); `delay` makes
    each RCPT answer wait (seconds)."""

    def __init__(self, port, users, replies=None):
        self.users = {u.lower() for u in users}
        self.mode = None
        self.delay = 0.0
        super().__init__(port, replies or {})

    def rcpts(self, addr=None):
        out = [c for c in self.commands if c.upper().startswith("RCPT TO:")]
        if addr is not None:
            out = [c for c in out if c.lower() == f"rcpt to:<{addr.lower()}>"]
        return out

    def _reply(self, conn, f, verb, default):
        if not verb.startswith("RCPT"):
            return super()._reply(conn, f, verb, default)
        self._said = ""
        addr = self.commands[-1].split(":", 1)[1].strip().strip("<>").lower()
        if self.delay:
            time.sleep(self.delay)
        if self.mode == "tempfail":
            action = f"450 4.2.0 <{addr}>: Recipient address rejected: try again later"
        elif self.mode == "silent":
            action = harness.Silent()
        elif self.mode and self.mode[0].isdigit():
            action = self.mode  # this reply to every RCPT
        elif addr in self.users:
            action = "250 2.1.5 Ok"
        else:
            action = f"550 5.1.1 <{addr}>: Recipient address rejected: User unknown in local recipient table"
        return self._do(conn, f, action)


class Base(unittest.TestCase):
    def setUp(self):
        self.relays, self.clients, self.primaries = [], [], []
        self.status_port = None

    def tearDown(self):
        for c in self.clients:
            c.close()
        for r in self.relays:
            if self._failed():
                sys.stderr.write(f"\n--- relay log {r.log} ---\n{r.read_log()[-4000:]}\n")
            r.cleanup()
        for p in self.primaries:
            p.stop()

    def _failed(self):
        res = getattr(self, "_outcome", None)
        if res is None or not hasattr(res, "result"):
            return False
        return any(t is self for t, _ in res.result.failures + res.result.errors)

    def primary(self, users=(), replies=None, port=None):
        p = UserPrimary(port or free_port(), users, replies)
        self.primaries.append(p)
        return p

    def relay(self, primary_port, extra="", status=False, before_start=None, status_extra="", **kw):
        self.status_port = free_port() if status else None
        st = f'[status]\nlisten = "127.0.0.1:{self.status_port}"\n{status_extra}' if status else None
        r = Relay(primary_port=primary_port, extra="verify_recipients = true\n" + extra, status=st, **kw)
        self.relays.append(r)
        if before_start:
            before_start(r)
        self.start(r)
        if status:
            self.assertTrue(harness.wait_port(self.status_port), "status page did not start")
        return r

    def start(self, r):
        mark = len(r.read_log())
        if getattr(r, "logf", None):
            r.logf.close()
        r.start(wait=False)
        started = wait_for(lambda: "daemon started" in r.read_log()[mark:] or r.proc.poll() is not None, 10)
        self.assertTrue(started and r.proc.poll() is None, r.read_log())

    def restart(self, r, replace=None):
        r.stop()
        if replace:
            with open(r.config) as f:
                cfg = f.read()
            for a, b in replace:
                self.assertIn(a, cfg)
                cfg = cfg.replace(a, b)
            with open(r.config, "w") as f:
                f.write(cfg)
        self.start(r)

    def session(self, r):
        c = Client(r.port, timeout=30)
        self.clients.append(c)
        self.assertEqual(c.banner[0], 220, c.banner)
        self.assertEqual(c.cmd("EHLO client.test")[0], 250)
        self.assertEqual(c.cmd("MAIL FROM:<someone@sender.test>")[0], 250)
        return c

    def rcpt(self, c, addr):
        return c.cmd(f"RCPT TO:<{addr}>")

    def metrics(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out



class VerifyTest(Base):
    # -- while the primary is up ------------------------------------------

    def test_known_accepted_unknown_refused_one_connection_never_data(self):
        p = self.primary(["alice@example.org", "bob@example.org"])
        r = self.relay(p.sock.getsockname()[1], status=True)
        c = self.session(r)
        self.assertEqual(self.rcpt(c, "alice@example.org")[0], 250)
        code, text = self.rcpt(c, "nobody@example.org")
        self.assertEqual(code, 550, text)
        self.assertIn("5.1.1", text)
        self.assertIn("User unknown", text)
        self.assertEqual(self.rcpt(c, "bob@example.org")[0], 250)
        # Cached (any case): no new probe.
        self.assertEqual(self.rcpt(c, "Alice@Example.org")[0], 250)
        self.assertEqual(self.rcpt(c, "nobody@example.org")[0], 550)
        self.assertEqual(len(p.rcpts()), 3, p.commands)
        self.assertEqual(c.cmd("QUIT")[0], 221)
        # One connection for all probes; MAIL FROM:<>, RSET; never DATA.
        self.assertEqual(p.connections, 1)
        self.assertIn("MAIL FROM:<>", p.commands)
        self.assertIn("RSET", p.commands)
        self.assertFalse([x for x in p.commands if x.upper().startswith(("DATA", "BDAT"))], p.commands)
        # Idle: QUIT within a few seconds.
        self.assertTrue(wait_for(lambda: "QUIT" in p.commands, 10), p.commands)
        m = self.metrics()
        self.assertEqual(m['bartleby_verify_cache_entries{kind="positive"}'], 2)
        self.assertEqual(m['bartleby_verify_cache_entries{kind="negative"}'], 1)
        self.assertEqual(m["bartleby_verify_cache_hits_total"], 2)
        self.assertEqual(m["bartleby_verify_cache_misses_total"], 3)
        self.assertEqual(m["bartleby_verify_probes_total"], 3)
        self.assertEqual(m["bartleby_verify_probes_answered_total"], 3)
        self.assertGreater(m["bartleby_verify_last_refresh_timestamp_seconds"], time.time() - 60)
        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/", timeout=10) as resp:
            page = resp.read().decode()
        self.assertIn('id="verify"', page)
        self.assertIn("2 known, 1 unknown cached", page)

    def test_primary_tempfail_gives_450_and_is_not_cached(self):
        # Postfix: a 4xx from the primary is "undeliverable for now": 450 4.1.1.
        p = self.primary(["alice@example.org"])
        p.mode = "tempfail"
        r = self.relay(p.sock.getsockname()[1])
        c = self.session(r)
        code, text = self.rcpt(c, "alice@example.org")
        self.assertEqual(code, 450, text)
        self.assertIn("4.1.1", text)
        p.mode = None
        self.assertEqual(self.rcpt(c, "alice@example.org")[0], 250)
        self.assertEqual(len(p.rcpts("alice@example.org")), 2)

    def test_a_5xx_about_the_probe_not_the_address_is_not_user_unknown(self):
        # Postfix's smtpd_delay_reject = yes (the default) answers a sender
        # restriction at RCPT: a primary that refuses MAIL FROM:<> (say
        # check_sender_access) or refuses the backup itself (an RBL that
        # listed it, a 5.7.1 policy) says 5xx to every RCPT, known users
        # included. That is not "no such user": cached for
        # verify_negative_ttl (3 days) it would refuse every user's mail
        # with 550 long after the primary is fixed, and turn the warm
        # positives into negatives as they are refreshed. (Postfix's own
        # safety net is unverified_recipient_reject_code = 450.) Only a 5xx
        # that speaks of the recipient's mailbox (5.1.x but 5.1.7/5.1.8,
        # which are the sender's; or 550/551/553 without an enhanced code)
        # is "no such user"; any other 5xx gets 450 4.1.1 and is not cached.
        p = self.primary(["alice@example.org"])
        r = self.relay(p.sock.getsockname()[1])
        c = self.session(r)
        for reply in [
            "554 5.7.1 <>: Sender address rejected: Access denied",
            "554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using zen.example",
            "550 5.1.8 <>: Sender address rejected: Domain not found",
            "552 5.2.2 <alice@example.org>: Recipient address rejected: Mailbox full",
            "503 5.5.1 Error: need MAIL command",
            "554 Relay access denied",
        ]:
            p.mode = reply
            code, text = self.rcpt(c, "alice@example.org")
            self.assertEqual(code, 450, f"{reply!r} -> {code} {text}")
            self.assertIn("4.1.1", text)
        p.mode = None
        self.assertEqual(self.rcpt(c, "alice@example.org")[0], 250)
        # While a real "no such user" is still one, with or without a DSN code.
        self.assertEqual(self.rcpt(c, "nobody@example.org")[0], 550)
        p.mode = "550 Unrouteable address"
        self.assertEqual(self.rcpt(c, "nobody2@example.org")[0], 550)
        p.mode = "550 5.1.10 RESOLVER.ADR.RecipientNotFound; not found"
        self.assertEqual(self.rcpt(c, "nobody3@example.org")[0], 550)

    def test_a_5xx_to_the_probes_mail_from_is_not_cached(self):
        # A primary that refuses MAIL FROM:<> at MAIL (Postfix with
        # smtpd_delay_reject = no and a sender restriction): no answer about
        # the address. Postfix's verify would record the address as
        # undeliverable; here the primary only counts as unusable for
        # minimal_backoff and nothing is cached.
        p = self.primary(["alice@example.org"], replies={"MAIL": "550 5.7.1 <>: Sender address rejected: Access denied"})
        r = self.relay(p.sock.getsockname()[1], extra='verify_unknown = "defer"\n')
        c = self.session(r)
        code, text = self.rcpt(c, "alice@example.org")
        self.assertEqual(code, 450, text)
        self.assertEqual(p.rcpts(), [])
        c.cmd("QUIT")
        p.replies.pop("MAIL")
        self.restart(r)
        self.assertEqual(self.rcpt(self.session(r), "alice@example.org")[0], 250)

    def test_silent_primary_answered_within_verify_timeout(self):
        p = self.primary(["alice@example.org"])
        p.mode = "silent"
        r = self.relay(p.sock.getsockname()[1], extra='verify_timeout = "2s"\nverify_unknown = "defer"')
        c = self.session(r)
        t = time.monotonic()
        code, text = self.rcpt(c, "alice@example.org")
        took = time.monotonic() - t
        self.assertEqual(code, 450, text)
        self.assertLess(took, 2 + 1.5, f"answered after {took:.1f} s")
        self.assertGreater(took, 1.5)
        # The primary now counts as down: the next address is answered at once.
        t = time.monotonic()
        code, text = self.rcpt(c, "carol@example.org")
        self.assertEqual(code, 450, text)
        self.assertLess(time.monotonic() - t, 1.0)
        self.assertIn("timed out", r.read_log())

    def test_concurrent_sessions_share_one_probe(self):
        p = self.primary(["alice@example.org"])
        p.delay = 1.0
        r = self.relay(p.sock.getsockname()[1])
        cs = [self.session(r) for _ in range(5)]
        for c in cs:
            c.send("RCPT TO:<alice@example.org>\r\n")
        for c in cs:
            self.assertEqual(c.reply()[0], 250)
        self.assertEqual(len(p.rcpts("alice@example.org")), 1, p.commands)

    def test_address_waiting_behind_a_busy_prober_is_deferred_not_accepted(self):
        # The primary is up and answering, only slowly (Postfix's smtpd sleeps
        # smtpd_error_sleep_time before each reply once a client made
        # smtpd_soft_error_limit errors, as a probe connection does under a
        # dictionary attack). An address still waiting for its probe when
        # verify_timeout runs out is not "the primary is down": Postfix answers
        # 450 4.1.1 "Address verification in progress" (verify(8)), and so must
        # we. Accepting it (verify_unknown = "accept", the default) would let
        # anyone who keeps the prober busy get mail for unknown users queued:
        # the backscatter this feature exists to stop.
        p = self.primary(["alice@example.org"])
        p.delay = 0.8
        r = self.relay(p.sock.getsockname()[1], extra='verify_timeout = "1s"\n')
        a, b = self.session(r), self.session(r)
        a.send("RCPT TO:<nobody1@example.org>\r\n")
        self.assertTrue(wait_for(lambda: p.rcpts("nobody1@example.org"), 5), p.commands)
        # Queued behind nobody1's probe: its own answer comes >= 1.6 s later.
        code, text = self.rcpt(b, "nobody2@example.org")
        self.assertEqual(code, 450, text)
        self.assertIn("4.1.1", text)
        self.assertEqual(a.reply()[0], 550)

    def test_primary_greeting_with_our_name_counts_as_down(self):
        # Issue 10's self-loop check applies to probes too.
        p = self.primary(["alice@example.org"], replies={"greeting": "220 backup.example.org ESMTP"})
        r = self.relay(p.sock.getsockname()[1], extra='verify_unknown = "defer"')
        c = self.session(r)
        code, text = self.rcpt(c, "alice@example.org")
        self.assertEqual(code, 450, text)
        self.assertEqual(p.rcpts(), [])
        self.assertIn("greeted me with my own hostname", r.read_log())

    # -- the primary goes down; restarts ----------------------------------

    def test_primary_down_cache_holds_unknown_follows_verify_unknown_restart_keeps_cache(self):
        p = self.primary(["alice@example.org"])
        port = p.sock.getsockname()[1]
        r = self.relay(port)
        c = self.session(r)
        self.assertEqual(self.rcpt(c, "alice@example.org")[0], 250)
        self.assertEqual(self.rcpt(c, "nobody@example.org")[0], 550)
        c.cmd("QUIT")
        p.stop()
        self.primaries.remove(p)
        c = self.session(r)
        self.assertEqual(self.rcpt(c, "alice@example.org")[0], 250)
        code, text = self.rcpt(c, "nobody@example.org")
        self.assertEqual(code, 550, text)
        self.assertIn("cached", text)
        # Never seen, primary down, verify_unknown = "accept" (the default).
        self.assertEqual(self.rcpt(c, "newbie@example.org")[0], 250)
        c.cmd("QUIT")
        # Restart with verify_unknown = "defer": the cache is still there.
        self.restart(r, [("verify_recipients = true", 'verify_recipients = true\nverify_unknown = "defer"')])
        self.assertTrue(os.path.isfile(os.path.join(r.spool, "verify.cache")))
        self.assertIn("verify cache", r.read_log())
        c = self.session(r)
        self.assertEqual(self.rcpt(c, "alice@example.org")[0], 250)
        self.assertEqual(self.rcpt(c, "nobody@example.org")[0], 550)
        code, text = self.rcpt(c, "stranger@example.org")
        self.assertEqual(code, 450, text)
        self.assertIn("4.1.1", text)

    def test_cache_not_refreshed_within_recipients_max_age_is_flagged_stale(self):
        # The cache is what keeps backscatter away while the primary is down;
        # once the primary has not answered for recipients_max_age, the page
        # and /metrics say the cache is ageing (the "stale warning").
        p = self.primary(["alice@example.org"])
        r = self.relay(p.sock.getsockname()[1], status=True, status_extra='recipients_max_age = "2s"')
        c = self.session(r)
        self.assertEqual(self.rcpt(c, "alice@example.org")[0], 250)
        c.cmd("QUIT")
        m = self.metrics()
        self.assertGreater(m["bartleby_verify_last_refresh_timestamp_seconds"], 0)
        self.assertEqual(m["bartleby_verify_stale"], 0)
        p.stop()
        self.primaries.remove(p)
        self.assertTrue(wait_for(lambda: self.metrics()["bartleby_verify_stale"] == 1, 10), "cache never flagged stale")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/", timeout=10) as resp:
            page = resp.read().decode()
        self.assertIn("has not been refreshed by the primary within", page)

    @staticmethod
    def _idn_domains(r):
        with open(r.config) as f:
            cfg = f.read()
        with open(r.config, "w") as f:
            f.write(cfg.replace('relay_domains = ["example.org", "example.net"]', 'relay_domains = ["example.org", "bücher.example"]'))

    def test_utf8_recipient_probed_with_smtputf8_or_not_at_all(self):
        # A UTF-8 local part can be asked only with SMTPUTF8 on MAIL; to a
        # primary without it there is no verdict (450, not cached, never a
        # 550 from a garbled probe), as its delivery would be held too.
        ehlo = "250-primary.example.org\r\n250-SMTPUTF8\r\n250 8BITMIME"
        p = self.primary(["müller@example.org"], replies={"EHLO": ehlo})
        r = self.relay(p.sock.getsockname()[1], before_start=self._idn_domains)
        c = Client(r.port, timeout=30)
        self.clients.append(c)
        c.cmd("EHLO client.test")
        self.assertEqual(c.cmd("MAIL FROM:<someone@sender.test> SMTPUTF8")[0], 250)
        self.assertEqual(self.rcpt(c, "müller@example.org")[0], 250)
        self.assertEqual(self.rcpt(c, "schmidt@example.org")[0], 550)
        mails = [m for m in p.commands if m.upper().startswith("MAIL")]
        self.assertIn("MAIL FROM:<> SMTPUTF8", mails)
        self.assertTrue(p.rcpts("müller@example.org"), p.commands)
        c.cmd("QUIT")
        # The same without SMTPUTF8 at the primary: no probe goes out for
        # the UTF-8 local part; an ASCII one under a U-label domain is asked
        # in its A-label form.
        p2 = self.primary(["info@xn--bcher-kva.example"])
        r2 = self.relay(p2.sock.getsockname()[1], before_start=self._idn_domains)
        c = Client(r2.port, timeout=30)
        self.clients.append(c)
        c.cmd("EHLO client.test")
        self.assertEqual(c.cmd("MAIL FROM:<someone@sender.test> SMTPUTF8")[0], 250)
        code, text = self.rcpt(c, "jürgen@example.org")
        self.assertEqual(code, 450, text)
        self.assertIn("SMTPUTF8", text)
        self.assertFalse([m for m in p2.commands if "jürgen" in m or "j?rgen" in m], p2.commands)
        self.assertEqual(self.rcpt(c, "info@bücher.example")[0], 250)
        self.assertTrue(p2.rcpts("info@xn--bcher-kva.example"), p2.commands)

    def test_recipients_file_wins_when_it_has_the_address(self):
        # The primary knows only new@; the file only listed@.
        p = self.primary(["new@example.org"])
        r = self.relay(p.sock.getsockname()[1], recipients=["listed@example.org"])
        c = self.session(r)
        self.assertEqual(self.rcpt(c, "listed@example.org")[0], 250)
        self.assertEqual(p.rcpts(), [], "a listed address is not probed")
        # Not in the (maybe stale) file: the primary decides.
        self.assertEqual(self.rcpt(c, "new@example.org")[0], 250)
        self.assertEqual(self.rcpt(c, "gone@example.org")[0], 550)
        p.stop()
        self.primaries.remove(p)
        # Down, not in the file, never seen: 450 even with verify_unknown = accept.
        code, text = self.rcpt(c, "other@example.org")
        self.assertEqual(code, 450, text)
        self.assertEqual(self.rcpt(c, "new@example.org")[0], 250)

    def test_background_refresh_reprobes_before_expiry(self):
        # Small TTLs: positive entries are refreshed after a quarter of
        # verify_positive_ttl (Postfix: 7d of 31d).
        p = self.primary(["alice@example.org"])
        r = self.relay(p.sock.getsockname()[1], extra='verify_positive_ttl = "8s"')
        c = self.session(r)
        self.assertEqual(self.rcpt(c, "alice@example.org")[0], 250)
        c.cmd("QUIT")
        self.assertTrue(wait_for(lambda: len(p.rcpts("alice@example.org")) >= 2, 8), p.commands)
        self.assertIn("refreshing <alice@example.org>", r.read_log())
        # Past the first answer's expiry, the refreshed entry still holds
        # while the primary is down.
        self.assertTrue(wait_for(lambda: len(p.rcpts("alice@example.org")) >= 3, 8), p.commands)
        p.stop()
        self.primaries.remove(p)
        c = self.session(r)
        self.assertEqual(self.rcpt(c, "alice@example.org")[0], 250)

    def test_shutdown_during_a_probe_saves_the_cache(self):
        # SIGTERM while a probe waits on a silent primary: the prober stops
        # at once and writes the cache before the server exits.
        p = self.primary(["alice@example.org"])
        r = self.relay(p.sock.getsockname()[1], extra='verify_timeout = "30s"')
        c = self.session(r)
        self.assertEqual(self.rcpt(c, "alice@example.org")[0], 250)
        p.mode = "silent"
        c.send("RCPT TO:<bob@example.org>\r\n")
        self.assertTrue(wait_for(lambda: p.rcpts("bob@example.org"), 10))
        t = time.monotonic()
        r.proc.terminate()
        self.assertEqual(r.proc.wait(timeout=30), 0)
        took = time.monotonic() - t
        with open(os.path.join(r.spool, "verify.cache")) as f:
            self.assertIn("alice@example.org", f.read())
        # (Open sessions get up to 10 s to finish, as before.)
        self.assertLess(took, 15, f"shutdown took {took:.1f} s")
        r.proc = None

    # -- a damaged cache file ---------------------------------------------

    def test_damaged_cache_file_is_reported_and_moved_aside(self):
        target = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness.py")
        with open(target, "rb") as f:
            before = f.read()

        def garbage(path):
            with open(path, "wb") as f:
                f.write(os.urandom(5000))

        def directory(path):
            os.mkdir(path)
            with open(os.path.join(path, "x"), "w") as f:
                f.write("x")

        def symlink(path):
            os.symlink(target, path)

        def bad_line(path):
            with open(path, "w") as f:
                f.write("# bartleby verify cache 1\n+ 123 ok@example.org\n? what\n")

        def fifo(path):
            os.mkfifo(path)

        for name, make in [("garbage", garbage), ("directory", directory), ("symlink", symlink), ("bad line", bad_line), ("fifo", fifo)]:
            with self.subTest(name):
                p = self.primary(["alice@example.org"])

                def before_start(r, make=make):
                    os.makedirs(r.spool, exist_ok=True)
                    make(os.path.join(r.spool, "verify.cache"))

                r = self.relay(p.sock.getsockname()[1], before_start=before_start)
                path = os.path.join(r.spool, "verify.cache")
                log = r.read_log()
                self.assertIn(f"warning: verify cache {path}:", log)
                self.assertIn("moved to", log)
                c = self.session(r)
                self.assertEqual(self.rcpt(c, "alice@example.org")[0], 250)
                self.assertEqual(self.rcpt(c, "nobody@example.org")[0], 550)
                c.cmd("QUIT")
                r.stop()
                # Saved anew at shutdown, as a regular file; the link's
                # target untouched.
                self.assertTrue(os.path.isfile(path) and not os.path.islink(path))
                with open(path) as f:
                    self.assertIn("+ ", f.read())
                with open(target, "rb") as f:
                    self.assertEqual(f.read(), before)

    # -- a dictionary attack ----------------------------------------------

    def test_dictionary_attack_keeps_cache_and_memory_bounded(self):
        p = self.primary(["alice@example.org"])
        r = self.relay(p.sock.getsockname()[1], extra="verify_cache_size = 100\nerror_limit = 1000\nmax_connections = 50\nsmtpd_client_connection_count_limit = 0", status=True)
        c = self.session(r)
        self.assertEqual(self.rcpt(c, "alice@example.org")[0], 250)
        c.cmd("QUIT")
        start = harness.proc_status(r.proc.pid)["VmHWM"]
        # 100,000 random addresses: 10 clients at once, each 10 sessions of
        # 1,000 pipelined RCPTs (error_limit 1000: every 550 counts as an
        # error, as Postfix counts unknown recipients).
        rng = random.Random(13)
        clients, rounds, per = 10, 10, 1000
        lock = threading.Lock()
        refused = [0]
        other = {}

        def attack():
            for _ in range(rounds):
                with lock:
                    names = [f"{rng.getrandbits(48):x}@example.org" for _ in range(per)]
                c = Client(r.port, timeout=60)
                c.cmd("EHLO attacker.test")
                c.cmd("MAIL FROM:<>")
                # Sent from a thread of its own: replies are read meanwhile.
                w = threading.Thread(target=c.send, args=("".join(f"RCPT TO:<{n}>\r\n" for n in names),))
                w.start()
                n = 0
                for _ in names:
                    code, text = c.reply()
                    if code == 550:
                        n += 1
                    elif code not in other:
                        other[code] = text
                w.join(60)
                c.close()
                with lock:
                    refused[0] += n

        t0 = time.monotonic()
        threads = [threading.Thread(target=attack) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        took = time.monotonic() - t0
        total = clients * rounds * per
        self.assertEqual(refused[0], total, other)
        m = self.metrics()
        neg = m['bartleby_verify_cache_entries{kind="negative"}']
        pos = m['bartleby_verify_cache_entries{kind="positive"}']
        self.assertLessEqual(neg, 25)
        self.assertEqual(pos, 1, "the known address was not evicted")
        hwm = harness.proc_status(r.proc.pid)["VmHWM"]
        probes = m["bartleby_verify_probes_total"]
        sys.stderr.write(f"\n  [verify] {total} random addresses in {took:.1f} s, {probes:.0f} probes; cache {pos:.0f}+{neg:.0f}; VmHWM {hwm} kB\n")
        self.assertGreaterEqual(probes, total)
        # VmHWM counts the binary's mapped pages too: the TLS code (issue
        # 12) adds about 0.7 MB of them to this host build (3452 -> 4308 kB
        # here; the i486 build serves 20 TLS sessions in 1.9 MB). The bound
        # is on the relay as started (the 4 MiB target) and on what the
        # attack adds to it.
        self.assertLess(start, 4096)
        self.assertLess(hwm - start, 1024)
        # The positive entry still answers from the cache with the primary down.
        p.stop()
        self.primaries.remove(p)
        c = self.session(r)
        self.assertEqual(self.rcpt(c, "alice@example.org")[0], 250)
        # And the file on disk stays bounded too.
        r.stop()
        with open(os.path.join(r.spool, "verify.cache")) as f:
            self.assertLessEqual(len(f.read().splitlines()), 1 + 100)

    def test_cache_is_saved_and_refreshed_during_a_sustained_attack(self):
        # The cache is written every 1,000 answers (or every minute) so that
        # a crash loses little. Under a load that never lets the prober's
        # queue run empty (clients pipelining unknown addresses), the save
        # must still happen while the load lasts, not only once it stops.
        # Nor may it starve the background refresh of the positives (due
        # here after 2 s: a quarter of verify_positive_ttl).
        p = self.primary(["alice@example.org"])
        r = self.relay(p.sock.getsockname()[1], extra='error_limit = 1000\nmax_connections = 50\nsmtpd_client_connection_count_limit = 0\nverify_positive_ttl = "8s"\n')
        c = self.session(r)
        self.assertEqual(self.rcpt(c, "alice@example.org")[0], 250)
        c.cmd("QUIT")
        path = os.path.join(r.spool, "verify.cache")
        stop = threading.Event()
        rng = random.Random(7)
        lock = threading.Lock()

        def attack():
            while not stop.is_set():
                # 900 refusals a session (error_limit 1000).
                c = Client(r.port, timeout=60)
                c.cmd("EHLO attacker.test")
                c.cmd("MAIL FROM:<>")
                for _ in range(3):
                    if stop.is_set():
                        break
                    with lock:
                        names = [f"{rng.getrandbits(48):x}@example.org" for _ in range(300)]
                    w = threading.Thread(target=c.send, args=("".join(f"RCPT TO:<{n}>\r\n" for n in names),))
                    w.start()
                    for _ in names:
                        c.reply()
                    w.join(60)
                c.close()

        threads = [threading.Thread(target=attack) for _ in range(10)]
        for t in threads:
            t.start()
        try:
            saved = wait_for(lambda: os.path.exists(path), 30)
            answered = len(p.rcpts())
            refreshed = wait_for(lambda: len(p.rcpts("alice@example.org")) >= 2, 10)
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        self.assertTrue(saved, f"no {path} after {answered} probes answered")
        self.assertTrue(refreshed, "alice@example.org not refreshed during the load")

    def test_pipelined_replies_are_not_held_without_bound(self):
        # Found with the dictionary attack above: a session wrote its
        # replies only when its input buffer was empty, so a client that
        # pipelines without reading (here 300,000 RCPTs for one address,
        # each answered 250 and never counted as an error) made the reply
        # buffer grow with every command: 4 MB of "250 2.1.5 Ok". Postfix
        # flushes its output stream when its buffer (4 KiB) is full.
        r = Relay()
        self.relays.append(r)
        self.start(r)
        base = harness.proc_status(r.proc.pid)["VmHWM"]
        c = self.session(r)
        done = threading.Event()

        def blast():
            try:
                # 30-byte lines after a 9-byte one: every command ends at an
                # odd offset, never where a 2 KiB read does, so the input
                # buffer is never empty after a command.
                c.send("NOOP xx\r\n" + "RCPT TO:<bobbyb@example.org>\r\n" * 300_000)
            except OSError:
                pass
            done.set()

        threading.Thread(target=blast, daemon=True).start()
        # Either the relay stops reading (its replies fill the socket) or it
        # has read everything: then look at what it holds.
        done.wait(5)
        time.sleep(0.5)
        hwm = harness.proc_status(r.proc.pid)["VmHWM"]
        sys.stderr.write(f"\n  [verify] 300,000 pipelined RCPTs, no reply read: VmHWM {base} -> {hwm} kB\n")
        self.assertLess(hwm - base, 1024)
        c.close()

    def test_config_keys_are_checked(self):
        p = self.primary()
        for bad in ['verify_unknown = "maybe"', 'verify_timeout = "0s"', "verify_cache_size = 5", "verify_recipients = 2"]:
            with self.subTest(bad):
                rr = Relay(primary_port=p.sock.getsockname()[1], extra=bad)
                self.relays.append(rr)
                import subprocess
                out = subprocess.run([harness.BINARY, "check", "-c", rr.config], capture_output=True, text=True, timeout=10)
                self.assertEqual(out.returncode, 78, out.stderr)
                self.assertIn(bad.split(" ")[0], out.stderr)


class PostfixPrimary(Base):
    """A real Postfix as the primary: a private instance (tests/bench/mtas.py)
    relaying example.org with a relay_recipient_maps that lists only
    alice@example.org (smtpd_reject_unlisted_recipient = yes, the default):
    its own 550 5.1.1 "User unknown in relay recipient table" must come back
    as Bartleby's 550 5.1.1, and its 250 as 250."""

    @classmethod
    def setUpClass(cls):
        cls.pf = None
        if os.geteuid() != 0 or not os.path.exists("/usr/sbin/postfix"):
            raise unittest.SkipTest("Postfix not installed, or not root")
        import tempfile

        sys.path.insert(0, os.path.join(harness.ROOT, "tests", "bench"))
        import mtas  # noqa: E402

        cls.base = tempfile.mkdtemp(prefix="bartleby-pf-", dir="/var/tmp")
        os.chmod(cls.base, 0o755)
        cls.port = free_port()
        cls.pf = mtas.Postfix(cls.base, "127.0.0.1", cls.port, "127.0.0.1", free_port())
        cls.pf.setup()
        users = os.path.join(cls.base, "recipients")
        with open(users, "w") as f:
            f.write("alice@example.org OK\n")
        with open(os.path.join(cls.pf.etc, "main.cf")) as f:
            cf = f.read().replace("relay_recipient_maps =\n", f"relay_recipient_maps = texthash:{users}\n")
        with open(os.path.join(cls.pf.etc, "main.cf"), "w") as f:
            f.write(cf)
        cls.pf.start()

    @classmethod
    def tearDownClass(cls):
        if cls.pf:
            cls.pf.stop()
            import shutil

            shutil.rmtree(cls.base, ignore_errors=True)

    def test_real_postfix_primary(self):
        r = self.relay(self.port)
        c = self.session(r)
        self.assertEqual(self.rcpt(c, "alice@example.org")[0], 250)
        code, text = self.rcpt(c, "nobody@example.org")
        self.assertEqual(code, 550, text)
        self.assertIn("5.1.1", text)
        self.assertIn("User unknown in relay recipient table", text)
        c.cmd("QUIT")

        def maillog():
            try:
                with open(self.pf.maillog, errors="replace") as f:
                    return f.read()
            except OSError:
                return ""

        # The probe connection ends (QUIT when idle) with no message made:
        # Postfix's cleanup never saw one (no message-id= line).
        def probe_disconnect():
            return [l for l in maillog().splitlines() if "disconnect from" in l and "rcpt=" in l]

        self.assertTrue(wait_for(probe_disconnect, 20), maillog()[-2000:])
        line = probe_disconnect()[0]
        # e.g. "ehlo=1 mail=2 rcpt=1/2 rset=2 quit=1 commands=7/8"
        self.assertIn("mail=2 rcpt=1/2 rset=2 quit=1", line)
        self.assertNotIn("data", line)
        self.assertNotIn("message-id=", maillog())


def main():
    harness.take_binary_arg()
    harness.report("verify", unittest.main(exit=False, verbosity=2).result)


if __name__ == "__main__":
    main()
