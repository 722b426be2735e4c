"""Hostile clients: what one Internet client can do to a backup MX.

  * connection hogging: one address opens every slot it can and idles;
  * queue flooding: one address sends tiny messages as fast as it can while
    the primary is down, to fill max_queue_messages;
  * slow drip: DATA a byte at a time;
  * the recipients list being pushed: truncated (a copy in progress), a FIFO,
    a huge file, a file that does not parse;
  * control characters and bad UTF-8 in HELO/MAIL/RCPT/ETRN, which end up in
    the log.

Each case says what Postfix does in the same situation; PostfixAnchor runs
the cheap ones against a private Postfix instance (tests/bench/mtas.py) when
Postfix is installed, so the expectations below stay anchored.

Run: python3 tests/relay/test_hostile_clients.py [path/to/bartleby]
"""

import os
import re
import select
import signal
import socket
import sys
import tempfile
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Client, Relay, Sink, free_port, queued_id  # noqa: E402

HOST = "backup.example.org"


def wait_for(pred, timeout, interval=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    return pred()


class HostileTest(unittest.TestCase):
    def setUp(self):
        self.relays = []
        self.sinks = []
        self.clients = []

    def tearDown(self):
        for c in self.clients:
            c.close()
        for r in self.relays:
            if self._failed():
                sys.stderr.write(f"\n--- relay log {r.log} ---\n{r.read_log()[-4000:]}\n")
            r.cleanup()
        for s in self.sinks:
            s.stop()

    def _failed(self):
        res = getattr(self, "_outcome", None)
        if res is None or not hasattr(res, "result"):
            return False
        return any(t is self for t, _ in res.result.failures + res.result.errors)

    def relay(self, extra="", status=True, before_start=None, **kw):
        self.status_port = free_port() if status else None
        st = f'[status]\nlisten = "127.0.0.1:{self.status_port}"' if status else None
        r = Relay(extra=extra, status=st, **kw)
        self.relays.append(r)
        if before_start:
            before_start(r)
        self.start(r)
        if status:
            self.assertTrue(harness.wait_port(self.status_port), "status page did not start")
        return r

    def start(self, r):
        """Starts the relay and waits for its "daemon started" line, not by
        connecting (a probe would count towards the per-client limits until
        the server has seen it go)."""
        mark = len(r.read_log())
        if getattr(r, "logf", None):
            r.logf.close()  # from an earlier start
        r.start(wait=False)
        started = wait_for(lambda: "daemon started" in r.read_log()[mark:] or r.proc.poll() is not None, 10)
        self.assertTrue(started and r.proc.poll() is None, r.read_log())

    def client(self, r, source=None, timeout=10):
        c = Client(r.port, source=source, timeout=timeout)
        self.clients.append(c)
        return c

    def http(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}{path}", timeout=10) as resp:
            return resp.read().decode("utf-8", "replace")

    def metric(self, name):
        """The value of one metric line (name with labels), or None."""
        for line in self.http("/metrics").splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return None

    def send_one(self, r, source=None, rcpt="bob@example.org"):
        """One message over a fresh session; returns the final reply."""
        c = self.client(r, source=source)
        self.assertEqual(c.banner[0], 220, c.banner)
        self.assertEqual(c.cmd("EHLO client.test")[0], 250)
        code, text = c.cmd("MAIL FROM:<alice@sender.test>")
        if code != 250:
            return code, text
        code, text = c.cmd(f"RCPT TO:<{rcpt}>")
        if code != 250:
            return code, text
        self.assertEqual(c.cmd("DATA")[0], 354)
        c.send(b"Subject: x\r\n\r\nhello\r\n.\r\n")
        reply = c.reply()
        c.cmd("QUIT")
        return reply

    def wait_log(self, r, pattern, timeout=20, after=0):
        """Waits for a log line matching `pattern` past offset `after`."""
        rx = re.compile(pattern)
        found = wait_for(lambda: rx.search(r.read_log()[after:]), timeout)
        self.assertTrue(found, f"no log line /{pattern}/ within {timeout}s:\n{r.read_log()[after:][-3000:]}")
        return found


class Hogging(HostileTest):
    """Postfix (run in PostfixAnchor): smtpd_client_connection_count_limit
    (default 50) counts a client's concurrent sessions in anvil; the one past
    the limit gets, instead of the greeting,
    `421 4.7.0 <myhostname> Error: too many connections from 127.0.0.1` and the
    log says `warning: Connection concurrency limit exceeded: 3 from
    localhost[127.0.0.1] for service ...`. Other addresses are unaffected.
    (Postfix exempts $mynetworks by default; Bartleby exempts nobody.)"""

    def test_one_address_cannot_take_every_slot(self):
        r = self.relay(extra="max_connections = 6")
        held, refused = [], None
        for _ in range(8):
            c = self.client(r)
            if c.banner[0] != 220:
                refused = c.banner
                break
            held.append(c)
        # Default: half of max_connections per client.
        self.assertEqual(len(held), 3, f"one address got {len(held)} of 6 slots")
        self.assertIsNotNone(refused)
        self.assertEqual(refused[1], f"421 4.7.0 {HOST} Error: too many connections from 127.0.0.1")
        # Another client still gets in and delivers.
        code, text = self.send_one(r, source="127.0.0.2")
        self.assertEqual(code, 250, text)
        self.assertTrue(queued_id(text))
        self.assertEqual(self.metric('bartleby_client_limit_refusals_total{limit="connections"}'), 1)
        page = self.http("/")
        m = re.search(r'<p class="warn" id="client-limit">(.*?)</p>', page)
        self.assertTrue(m, page[:3000])
        self.assertIn("127.0.0.1", m.group(1))
        self.assertIn("connections", m.group(1))
        self.assertRegex(r.read_log(), r"warning: Connection concurrency limit exceeded: 4 from unknown\[127\.0\.0\.1\]")
        # The slots come back when the hog lets go.
        for c in held:
            c.close()
        self.assertTrue(wait_for(lambda: self.metric("bartleby_connections") == 0, 5))
        again = [self.client(r) for _ in range(3)]
        self.assertEqual([c.banner[0] for c in again], [220, 220, 220])

    def test_configured_limit_and_zero_turns_it_off(self):
        r = self.relay(extra="max_connections = 4\nsmtpd_client_connection_count_limit = 1", status=False)
        self.assertEqual(self.client(r).banner[0], 220)
        self.assertEqual(self.client(r).banner[0], 421)
        self.assertEqual(self.client(r, source="127.0.0.3").banner[0], 220)
        r2 = self.relay(extra="max_connections = 3\nsmtpd_client_connection_count_limit = 0", status=False)
        self.assertEqual([self.client(r2).banner[0] for _ in range(3)], [220, 220, 220])
        # Past max_connections, the global cap answers as before.
        self.assertIn("too many connections; try again later", self.client(r2).banner[1])

    def test_three_hogs_cannot_starve_a_fourth(self):
        """With a cap of half of max_connections per client, two addresses
        held every slot. The last max(2, max_connections / 10) slots go only
        to clients that hold no session yet. Postfix has no such reserve:
        anvil only counts per client, and smtpd's process limit
        (default_process_limit = 100) is shared by all clients; past it new
        connections wait in the listen queue while master logs `service
        "smtp" ... has reached its process limit`."""
        r = self.relay(extra="max_connections = 10")
        got = {}
        for src in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            got[src] = 0
            for _ in range(8):
                c = self.client(r, source=src)
                if c.banner[0] != 220:
                    self.assertEqual(c.banner[1], f"421 4.7.0 {HOST} Error: too many connections from {src}")
                    break
                got[src] += 1
        # 5 (the per-client cap), then 3 (the last 2 slots are kept), then 1.
        self.assertEqual(got, {"127.0.0.2": 5, "127.0.0.3": 3, "127.0.0.4": 1})
        code, text = self.send_one(r, source="127.0.0.5")
        self.assertEqual(code, 250, text)
        self.assertEqual(self.metric('bartleby_client_limit_refusals_total{limit="connections"}'), 3)
        self.assertRegex(r.read_log(), r"warning: Connection concurrency limit exceeded: 4 from unknown\[127\.0\.0\.3\]")

    def test_many_distinct_addresses_keep_memory_bounded(self):
        """Connections from 3000 distinct addresses (the per-client table must
        not grow without bound: it evicts idle entries)."""
        r = self.relay(extra="max_connections = 50", status=False)
        base = harness.proc_status(r.proc.pid)["VmHWM"]
        for i in range(3000):
            src = f"127.{1 + i // 250 % 250}.{i % 250 + 1}.{7 + i // 62500}"
            s = socket.create_connection(("127.0.0.1", r.port), timeout=10, source_address=(src, 0))
            s.recv(100)
            s.close()
        self.assertEqual(self.send_one(r, source="127.0.0.9")[0], 250)
        grew = harness.proc_status(r.proc.pid)["VmHWM"] - base
        sys.stderr.write(f"\n  [clients] 3000 distinct addresses: VmHWM grew {grew} kB\n")
        self.assertLess(grew, 1024)


class Flooding(HostileTest):
    """Postfix has no per-client share of the queue; its nearest knob is
    smtpd_client_message_rate_limit (default 0: off), which answers MAIL with
    `450 4.7.1 Error: too much mail from 127.0.0.3` once a client has sent
    more MAIL commands than the limit within anvil_rate_time_unit (checked in
    PostfixAnchor). Bartleby keeps a share of max_queue_messages per client
    (smtpd_client_queue_share, 25 % by default) and refuses beyond it with
    `452 4.3.1`, the code of "queue full", since the condition clears as the
    queue drains."""

    def flood(self, c, limit=60):
        """Sends tiny messages until MAIL is refused; returns (accepted, refusal)."""
        self.assertEqual(c.cmd("EHLO flood.test")[0], 250)
        accepted = 0
        for _ in range(limit):
            code, text = c.cmd("MAIL FROM:<flood@sender.test>")
            if code != 250:
                return accepted, (code, text)
            self.assertEqual(c.cmd("RCPT TO:<bob@example.org>")[0], 250)
            self.assertEqual(c.cmd("DATA")[0], 354)
            c.send(b"Subject: flood\r\n\r\nx\r\n.\r\n")
            code, text = c.reply()
            self.assertEqual(code, 250, text)
            accepted += 1
        return accepted, None

    def test_flooder_refused_at_its_share_others_accepted(self):
        # The primary is down (nothing listens on its port).
        r = self.relay(extra="max_queue_messages = 20")
        accepted, refusal = self.flood(self.client(r))
        self.assertIsNotNone(refusal, "the flooder was never refused")
        self.assertEqual(accepted, 5, "25 % of max_queue_messages = 20")
        self.assertEqual(refusal[0], 452, refusal)
        self.assertIn("4.3.1", refusal[1])
        self.assertIn("too much mail from 127.0.0.1", refusal[1])
        code, text = self.send_one(r, source="127.0.0.2")
        self.assertEqual(code, 250, text)
        self.assertEqual(self.metric('bartleby_client_limit_refusals_total{limit="queue_share"}'), 1)
        m = re.search(r'id="client-limit">(.*?)</p>', self.http("/"))
        self.assertTrue(m and "127.0.0.1" in m.group(1), m)
        # After a restart the share is counted from the spool.
        r.stop()
        self.start(r)
        c = self.client(r)
        c.cmd("EHLO flood.test")
        code, text = c.cmd("MAIL FROM:<flood@sender.test>")
        self.assertEqual(code, 452, text)
        c.close()
        # Once the queue drains, the client may send again.
        sink = Sink(r.primary_port)
        self.sinks.append(sink)
        r.flush()
        self.assertTrue(r.wait_empty(30), r.mailq())
        c = self.client(r)
        c.cmd("EHLO flood.test")
        self.assertEqual(c.cmd("MAIL FROM:<flood@sender.test>")[0], 250)

    def test_message_rate_limit(self):
        r = self.relay(extra='smtpd_client_message_rate_limit = 3\nanvil_rate_time_unit = "1h"')
        c = self.client(r)
        c.cmd("EHLO x")
        for _ in range(3):
            self.assertEqual(c.cmd("MAIL FROM:<a@sender.test>")[0], 250)
            self.assertEqual(c.cmd("RSET")[0], 250)
        self.assertEqual(c.cmd("MAIL FROM:<a@sender.test>"), (450, "450 4.7.1 Error: too much mail from 127.0.0.1"))
        self.assertEqual(self.send_one(r, source="127.0.0.2")[0], 250)
        self.assertEqual(self.metric('bartleby_client_limit_refusals_total{limit="rate"}'), 1)
        self.assertRegex(r.read_log(), r"warning: Message delivery request rate limit exceeded: 4 from unknown\[127\.0\.0\.1\]")


class FloodLogging(HostileTest):
    """Postfix logs every refusal: `Connection concurrency limit exceeded`
    and `Message delivery request rate limit exceeded` once per refused
    connection or MAIL. On the appliance the log is the serial console, and
    one flooder in the 30-minute soak wrote 532,129 warning lines. Bartleby
    logs at most one line per client and limit a minute (and for the global
    limits, one a minute), then how many were not logged; the counters in
    /metrics stay exact."""

    def count(self, r, pattern):
        return len(re.findall(pattern, r.read_log()))

    def refused_banner(self, r, source=None):
        c = Client(r.port, source=source)
        try:
            return c.banner[0]
        finally:
            c.close()

    def test_connection_refusals_are_logged_once_a_minute(self):
        r = self.relay(extra="max_connections = 4\nsmtpd_client_connection_count_limit = 1")
        held = self.client(r)
        self.assertEqual(held.banner[0], 220)
        self.assertEqual([self.refused_banner(r) for _ in range(40)], [421] * 40)
        self.assertEqual(self.metric('bartleby_client_limit_refusals_total{limit="connections"}'), 40)
        self.assertEqual(self.count(r, r"Connection concurrency limit exceeded"), 1, r.read_log())
        # Another client has its own line.
        self.assertEqual(self.client(r, source="127.0.0.2").banner[0], 220)
        self.assertEqual(self.refused_banner(r, "127.0.0.2"), 421)
        self.assertEqual(self.count(r, r"Connection concurrency limit exceeded: 2 from unknown\[127\.0\.0\.2\]"), 1)
        # When the client lets go, the log says how many were not logged.
        held.close()
        self.wait_log(r, r"warning: 127\.0\.0\.1: 39 more per-client limit refusals were not logged", 10)
        # Past max_connections (no per-client limit): one line a minute too.
        r2 = self.relay(extra="max_connections = 2\nsmtpd_client_connection_count_limit = 0", status=False)
        hold = [self.client(r2) for _ in range(2)]
        self.assertEqual([c.banner[0] for c in hold], [220, 220])
        self.assertEqual([self.refused_banner(r2) for _ in range(30)], [421] * 30)
        self.assertEqual(self.count(r2, r"too many connections"), 1, r2.read_log())

    def test_mail_refusals_are_logged_once_a_minute(self):
        r = self.relay(extra='smtpd_client_message_rate_limit = 2\nanvil_rate_time_unit = "1h"\nerror_limit = 100')
        c = self.client(r)
        c.cmd("EHLO x")
        codes = []
        for _ in range(32):
            code = c.cmd("MAIL FROM:<a@sender.test>")[0]
            codes.append(code)
            if code == 250:
                c.cmd("RSET")
        self.assertEqual(codes, [250, 250] + [450] * 30)
        self.assertEqual(self.metric('bartleby_client_limit_refusals_total{limit="rate"}'), 30)
        self.assertEqual(self.count(r, r"Message delivery request rate limit exceeded"), 1, r.read_log())
        # The queue share (2 of max_queue_messages = 8), and, with no share,
        # the queue full: one line each, exact counters.
        r = self.relay(extra="max_queue_messages = 8\nerror_limit = 100")
        for _ in range(2):
            self.assertEqual(self.send_one(r)[0], 250)
        c = self.client(r)
        c.cmd("EHLO x")
        self.assertEqual([c.cmd("MAIL FROM:<a@sender.test>")[0] for _ in range(30)], [452] * 30)
        self.assertEqual(self.metric('bartleby_client_limit_refusals_total{limit="queue_share"}'), 30)
        self.assertEqual(self.count(r, r"Queue share limit exceeded"), 1, r.read_log())
        r = self.relay(extra="max_queue_messages = 2\nsmtpd_client_queue_share = 0\nerror_limit = 100", status=False)
        for _ in range(2):
            self.assertEqual(self.send_one(r)[0], 250)
        c = self.client(r)
        c.cmd("EHLO x")

        def full():
            # The scheduler counts the queue a moment after the 250.
            if c.cmd("MAIL FROM:<a@sender.test>")[0] == 452:
                return True
            c.cmd("RSET")
            return False

        self.assertTrue(wait_for(full, 10, 0.1))
        self.assertEqual([c.cmd("MAIL FROM:<a@sender.test>")[0] for _ in range(30)], [452] * 30)
        self.assertEqual(self.count(r, r"refusing mail: queue is full"), 1, r.read_log())


class SlowDrip(HostileTest):
    """A client that sends DATA a byte at a time below min_data_rate is cut
    off with 421 once data_timeout plus its allowance has passed, and its slot
    (global and per-client) is free again. Postfix does the same only with
    smtpd_per_request_deadline = yes (smtpd_min_data_rate)."""

    def test_drip_is_cut_off_and_slot_freed(self):
        r = self.relay(extra='max_connections = 2\ndata_timeout = "2s"\nmin_data_rate = 500', status=False)
        c = self.client(r)
        c.cmd("EHLO drip.test")
        c.cmd("MAIL FROM:<a@sender.test>")
        c.cmd("RCPT TO:<bob@example.org>")
        self.assertEqual(c.cmd("DATA")[0], 354)
        # Per-client limit (1 of 2): the same address cannot open another.
        self.assertIn("too many connections from 127.0.0.1", self.client(r).banner[1])
        t0 = time.monotonic()
        got = b""
        while time.monotonic() - t0 < 15:
            try:
                c.sock.send(b"x")
            except OSError:
                break
            ready, _, _ = select.select([c.sock], [], [], 0.1)
            if ready:
                chunk = c.sock.recv(4096)
                if not chunk:
                    break
                got += chunk
                if got.endswith(b"\r\n"):
                    break
        took = time.monotonic() - t0
        self.assertTrue(got.startswith(b"421 4.4.2"), got)
        self.assertLess(took, 6, "cut off about data_timeout after the drip began")
        self.assertTrue(c.closed())
        self.assertTrue(wait_for(lambda: self.client(r).banner[0] == 220, 5))
        self.assertEqual(r.queue_ids(), [])
        self.assertEqual(os.listdir(os.path.join(r.spool, "incoming")), [])


class RecipientsPush(HostileTest):
    """The recipients list while a cron job pushes it. Postfix has no guard:
    a relay_recipient_maps table is used as it is (a truncated texthash file
    rejects everyone; `postmap` builds .db files atomically, which avoids the
    problem there). Bartleby keeps the previous list when a reload would drop
    most of it, reads only regular files, never on the SMTP runtime."""

    USERS = ["bob@example.org", "carol@example.org", "dave@example.org", "erin@example.org"]

    def rcpt(self, r, addr, timeout=5):
        c = self.client(r, timeout=timeout)
        self.assertEqual(c.banner[0], 220, c.banner)
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<a@sender.test>")
        code = c.cmd(f"RCPT TO:<{addr}>")[0]
        c.cmd("QUIT")
        c.close()
        return code

    def path(self, r):
        return os.path.join(r.dir, "recipients")

    def rcpt_reply(self, r, addr):
        c = self.client(r)
        self.assertEqual(c.banner[0], 220, c.banner)
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<a@sender.test>")
        reply = c.cmd(f"RCPT TO:<{addr}>")
        c.cmd("QUIT")
        c.close()
        return reply

    def put_list(self, r, lines):
        """Replaces whatever is at the path by a good list, atomically."""
        p = self.path(r)
        with open(p + ".new", "w") as f:
            f.write("\n".join(lines) + "\n")
        if os.path.isdir(p) and not os.path.islink(p):
            os.rmdir(p)
        os.rename(p + ".new", p)

    def test_unusable_list_at_start_defers_until_a_good_one_arrives(self):
        """Before: a 0-byte list at start (a push cut by a power failure) got
        every recipient 550 5.1.1 until the next push; a list cut mid-line, a
        FIFO, a directory or a file over 1 MiB made `serve` exit 75 (on the
        appliance: reboot, the same file, reboot). Postfix answers a recipient
        whose relay_recipient_maps lookup fails with `451 4.3.0 <addr>:
        Temporary lookup failure` (smtpd_check.c, reject_dict_retry; a
        texthash table that cannot be opened does that, checked in
        PostfixAnchor): the sender retries later, nothing is refused for
        good."""

        def write(text):
            def spoil(p):
                with open(p, "w") as f:
                    f.write(text)
            return spoil

        def replace(make):
            def spoil(p):
                os.remove(p)
                make(p)
            return spoil

        def huge(p):
            with open(p, "w") as f:
                f.truncate(2 * 1024 * 1024)

        cases = [
            ("empty", write(""), "no entries"),
            ("comments only", write("# nobody yet\n\n"), "no entries"),
            ("cut mid-line", write("bob@example.org\ncarol@exam\ncar"), ":3: `car` is not user@domain"),
            ("FIFO", replace(os.mkfifo), "not a regular file (a FIFO)"),
            ("directory", replace(os.mkdir), "not a regular file (a directory)"),
            ("over 1 MiB", huge, "larger than"),
            ("missing", os.remove, "No such file"),
        ]
        for name, spoil, why in cases:
            with self.subTest(name):
                r = self.relay(recipients=self.USERS, before_start=lambda r: spoil(self.path(r)))
                self.assertEqual(self.rcpt_reply(r, "bob@example.org"), (451, "451 4.3.0 <bob@example.org>: Temporary lookup failure"))
                # Never an open relay meanwhile.
                self.assertEqual(self.rcpt_reply(r, "bob@evil.test")[0], 550)
                self.assertRegex(r.read_log(), rf"warning: recipients list .*{re.escape(why)}.*no usable list.*451 4\.3\.0")
                self.assertEqual(self.metric("bartleby_recipients_list_usable"), 0)
                self.assertRegex(self.http("/"), r'id="recipients-unusable"[^>]*>[^<]*451')
                # `check` still calls it an error.
                out = r.cli("check")
                self.assertEqual(out.returncode, 78, out)
                self.assertIn(why, out.stderr)
                # The first good version is taken.
                mark = len(r.read_log())
                self.put_list(r, self.USERS)
                self.wait_log(r, r"recipients list reloaded: 4 entries", 10, mark)
                self.assertEqual(self.rcpt_reply(r, "bob@example.org")[0], 250)
                self.assertEqual(self.rcpt_reply(r, "mallory@example.org")[0], 550)
                self.assertEqual(self.metric("bartleby_recipients_list_usable"), 1)
                self.assertNotIn('id="recipients-unusable"', self.http("/"))
                r.cleanup()
                r.logf.close()

    def test_last_good_list_survives_a_restart_with_a_bad_file(self):
        """The last list taken is kept in spool/recipients.last; at start, a
        file that cannot be used, or that has shrunk by more than half, gives
        way to it (the same guard as a reload while running)."""
        r = self.relay(recipients=self.USERS)
        last = os.path.join(r.spool, "recipients.last")
        self.assertTrue(wait_for(lambda: os.path.exists(last), 5))
        r.stop()
        # Cut short while the relay was down.
        with open(self.path(r), "w") as f:
            f.write("bob@example.org\ncarol@exam\ncar")
        mark = len(r.read_log())
        self.start(r)
        self.assertRegex(r.read_log()[mark:], r"warning: recipients list .*:3: .*using the last good list .*recipients\.last \(4 entries\)")
        self.assertEqual(self.rcpt_reply(r, "erin@example.org")[0], 250)
        self.assertEqual(self.rcpt_reply(r, "mallory@example.org")[0], 550)
        self.assertEqual(self.metric("bartleby_recipients_entries"), 4)
        self.assertEqual(self.metric("bartleby_recipients_list_kept"), 1)
        self.assertEqual(self.metric("bartleby_recipients_list_usable"), 1)
        self.assertRegex(self.http("/"), r'id="recipients-kept"[^>]*>[^<]*:3:')
        # Shrunk by more than half while the relay was down.
        r.stop()
        with open(self.path(r), "w") as f:
            f.write("bob@example.org\n")
        mark = len(r.read_log())
        self.start(r)
        self.assertRegex(r.read_log()[mark:], r"warning: recipients list .*: 1 entries, fewer than half of the 4 .*using the last good list")
        self.assertEqual(self.rcpt_reply(r, "erin@example.org")[0], 250)
        # Not reread by the watcher a second later: one warning.
        time.sleep(2.5)
        self.assertEqual(len(re.findall("fewer than half", r.read_log()[mark:])), 1, r.read_log()[mark:])
        # SIGHUP takes the file as it is, and it becomes the last good list.
        r.proc.send_signal(signal.SIGHUP)
        self.wait_log(r, r"recipients list reloaded: 1 entries", 10, mark)
        self.assertEqual(self.rcpt_reply(r, "erin@example.org")[0], 550)
        r.stop()
        mark = len(r.read_log())
        self.start(r)
        self.assertNotIn("warning: recipients list", r.read_log()[mark:])
        self.assertEqual(self.rcpt_reply(r, "erin@example.org")[0], 550)
        self.assertEqual(self.rcpt_reply(r, "bob@example.org")[0], 250)
        self.assertEqual(self.metric("bartleby_recipients_list_kept"), 0)

    def test_fifo_does_not_freeze_sessions(self):
        r = self.relay(recipients=self.USERS)
        self.assertEqual(self.rcpt(r, "bob@example.org"), 250)
        mark = len(r.read_log())
        os.remove(self.path(r))
        os.mkfifo(self.path(r))
        end = time.monotonic() + 20
        seen_at = None
        while time.monotonic() < end:
            # A frozen runtime shows as a timeout here.
            self.assertEqual(self.rcpt(r, "bob@example.org"), 250)
            if seen_at is None and "not a regular file" in r.read_log()[mark:]:
                seen_at = time.monotonic()
            if seen_at and time.monotonic() - seen_at > 1.5:
                break
            time.sleep(0.2)
        self.assertIsNotNone(seen_at, r.read_log()[mark:])
        self.assertIn("keeping the previous list", r.read_log()[mark:])
        self.assertEqual(self.rcpt(r, "mallory@example.org"), 550)
        page = self.http("/")
        self.assertRegex(page, r'id="recipients-kept"[^>]*>[^<]*[Kk]ept the previous list')
        self.assertEqual(self.metric("bartleby_recipients_list_kept"), 1)

    def test_truncated_list_keeps_previous(self):
        r = self.relay(recipients=self.USERS)
        mark = len(r.read_log())
        open(self.path(r), "w").close()  # a copy in progress: 0 bytes
        end = time.monotonic() + 20
        while time.monotonic() < end and "keeping the previous list" not in r.read_log()[mark:]:
            self.assertEqual(self.rcpt(r, "bob@example.org"), 250)
            time.sleep(0.2)
        self.wait_log(r, r"warning: recipients list .*: no entries .*keeping the previous list of 4 entries", 1, mark)
        self.assertEqual(self.rcpt(r, "bob@example.org"), 250)
        self.assertEqual(self.rcpt(r, "erin@example.org"), 250)
        self.assertEqual(self.metric("bartleby_recipients_entries"), 4)
        self.assertEqual(self.metric("bartleby_recipients_list_kept"), 1)
        self.assertIn('id="recipients-kept"', self.http("/"))
        # The copy finishes: a plausible list is taken as it is.
        mark = len(r.read_log())
        with open(self.path(r), "w") as f:
            f.write("bob@example.org\ncarol@example.org\ndave@example.org\nfrank@example.org\n")
        self.wait_log(r, r"recipients list reloaded: 4 entries", 10, mark)
        self.assertEqual(self.rcpt(r, "frank@example.org"), 250)
        self.assertEqual(self.rcpt(r, "erin@example.org"), 550)
        self.assertEqual(self.metric("bartleby_recipients_list_kept"), 0)
        self.assertNotIn('id="recipients-kept"', self.http("/"))
        # A list that does not parse: kept, and the page says why.
        mark = len(r.read_log())
        with open(self.path(r), "w") as f:
            f.write("bob@example.org\nnot-an-address\ncarol@example.org\ndave@example.org\n")
        self.wait_log(r, r"warning: recipients list .*:2: .*keeping the previous list", 10, mark)
        self.assertEqual(self.rcpt(r, "frank@example.org"), 250)
        self.assertRegex(self.http("/"), r'id="recipients-kept"[^>]*>[^<]*:2:')
        # Too big: never read whole.
        mark = len(r.read_log())
        with open(self.path(r), "w") as f:
            f.truncate(64 * 1024 * 1024)
        self.wait_log(r, r"warning: recipients list .*larger than .*keeping the previous list", 10, mark)
        self.assertEqual(self.rcpt(r, "frank@example.org"), 250)
        # The documented way to force a drastic change: SIGHUP.
        mark = len(r.read_log())
        with open(self.path(r), "w") as f:
            f.write("bob@example.org\n")
        self.wait_log(r, r"1 entries.*keeping the previous list", 10, mark)
        self.assertEqual(self.rcpt(r, "frank@example.org"), 250)
        r.proc.send_signal(signal.SIGHUP)
        self.wait_log(r, r"recipients list reloaded: 1 entries", 10, mark)
        self.assertEqual(self.rcpt(r, "frank@example.org"), 550)
        self.assertEqual(self.rcpt(r, "bob@example.org"), 250)
        self.assertEqual(self.metric("bartleby_recipients_list_kept"), 0)


class LogEscaping(HostileTest):
    """Postfix passes every log line through printable(line, '?'): a byte that
    is not printable ASCII becomes '?', valid UTF-8 is kept (smtputf8_enable =
    yes), a bad UTF-8 byte becomes '?' (checked in PostfixAnchor:
    `<\\x1b]0;pwn\\x07@evil.test>` is logged as `<?]0;pwn?@evil.test>`). Bartleby
    does the same in its logger, and also masks C1 controls (U+0080..U+009F),
    which Postfix keeps, since some terminals act on them."""

    def test_control_characters_are_escaped_in_the_log(self):
        r = self.relay(status=False)
        c = self.client(r)
        lines = [
            b"EHLO \x1b[31mevil\x07\xff\xfe.test",
            b"EHLO \x1b[31mok\x07.test",
            b"ETRN \x1b]0;etrn\x07example.org",
            b'MAIL FROM:<"\x1b[2J\x07"@sender.test>',
            b"RCPT TO:<\x1b]0;pwn\x07@example.org>",
            b"RCPT TO:<caf\xc3\xa9\xc2\x9b@example.org>",
            b"RCPT TO:<bad\xff\xfe@example.org>",
            b"RCPT TO:<bell\x07\x7f@evil.test>",
            b"RCPT TO:<cr\rx@example.org>",
            b"RCPT TO:<bob@example.org>",
        ]
        for l in lines:
            c.send(l + b"\r\n")
            c.reply()
        self.assertEqual(c.cmd("DATA")[0], 354)
        c.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        self.assertEqual(c.reply()[0], 250)
        c.cmd("QUIT")
        # Wait for the message's "from=" line, then check every byte.
        self.wait_log(r, r"from=<", 5)
        with open(r.log, "rb") as f:
            raw = f.read()
        bad = sorted({b for b in raw if (b < 0x20 and b != 0x0A) or b == 0x7F})
        self.assertEqual(bad, [], "raw control bytes in the log")
        text = raw.decode("utf-8")  # raises on invalid UTF-8
        self.assertNotRegex(text, "[\u0080-\u009f\ufffd]")
        self.assertIn('from=<"?[2J?"@sender.test>', text)
        self.assertIn("caf\u00e9?@example.org", text)  # valid UTF-8 kept, C1 masked


class PostfixAnchor(HostileTest):
    """The same cases against a private Postfix instance (when Postfix is
    installed and we are root): the expectations above are Postfix's."""

    @classmethod
    def setUpClass(cls):
        cls.pf = None
        if os.geteuid() != 0 or not os.path.exists("/usr/sbin/postfix"):
            raise unittest.SkipTest("Postfix not installed, or not root")
        sys.path.insert(0, os.path.join(harness.ROOT, "tests", "bench"))
        import mtas  # noqa: E402

        cls.base = tempfile.mkdtemp(prefix="bartleby-pf-", dir="/var/tmp")
        os.chmod(cls.base, 0o755)
        cls.port = free_port()
        cls.pf = mtas.Postfix(cls.base, "127.0.0.1", cls.port, "127.0.0.1", free_port())
        cls.pf.setup()
        with open(os.path.join(cls.pf.etc, "main.cf"), "a") as f:
            f.write(
                "smtpd_client_connection_count_limit = 2\n"
                "smtpd_client_event_limit_exceptions =\n"
                "smtpd_client_message_rate_limit = 3\n"
                "anvil_rate_time_unit = 3600s\n"
                # A recipient table that cannot be opened (a push that has
                # not arrived): what does smtpd answer at RCPT?
                f"relay_recipient_maps = texthash:{cls.base}/no-such-recipients\n"
            )
        cls.pf.start()

    @classmethod
    def tearDownClass(cls):
        if cls.pf:
            cls.pf.stop()
            import shutil

            shutil.rmtree(cls.base, ignore_errors=True)

    def pclient(self, source=None):
        c = Client(self.port, source=source)
        self.clients.append(c)
        return c

    def test_postfix_limits_and_log_escaping(self):
        held = [self.pclient() for _ in range(2)]
        self.assertEqual([c.banner[0] for c in held], [220, 220])
        self.assertEqual(self.pclient().banner[1], "421 4.7.0 backup.bench.test Error: too many connections from 127.0.0.1")
        self.assertEqual(self.pclient("127.0.0.2").banner[0], 220)
        c = self.pclient("127.0.0.3")
        c.cmd("EHLO x")
        for _ in range(3):
            self.assertEqual(c.cmd("MAIL FROM:<a@sender.test>")[0], 250)
            c.cmd("RSET")
        self.assertEqual(c.cmd("MAIL FROM:<a@sender.test>")[1], "450 4.7.1 Error: too much mail from 127.0.0.3")
        c = self.pclient("127.0.0.4")
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<a@sender.test>")
        c.send(b"RCPT TO:<\x1b]0;pwn\x07@evil.test>\r\n")
        c.reply()
        c.cmd("QUIT")
        def maillog():
            try:
                with open(self.pf.maillog, "rb") as f:
                    return f.read()
            except OSError:
                return b""

        self.assertTrue(wait_for(lambda: b"pwn" in maillog(), 10))
        self.assertIn(b"<?]0;pwn?@evil.test>", maillog())

    def test_postfix_defers_when_the_recipient_table_cannot_be_read(self):
        # What Bartleby answers when no recipients list can be used.
        c = self.pclient("127.0.0.5")
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<a@sender.test>")
        self.assertEqual(c.cmd("RCPT TO:<bob@example.org>"), (451, "451 4.3.0 <bob@example.org>: Temporary lookup failure"))
        self.assertEqual(c.cmd("RCPT TO:<bob@evil.test>")[0], 554)


def main():
    harness.take_binary_arg()
    harness.report("hostile_clients", unittest.main(exit=False, verbosity=2).result)


if __name__ == "__main__":
    main()
