#!/usr/bin/env python3
"""The recipients list pushed by the primary (issue 13, parts 2 and 3):
`PUT /recipients` on the status listener, and how fresh the list is.

    python3 tests/relay/test_push.py target/release/bartleby

Hostile first: pushes without the token, with a wrong one, from addresses
not in `[status] push_allow`, with a token file that is missing or empty,
bodies over the cap, cut short, dripped, malformed, shrinking the list by
more than half, several at once, and for a Host that is not ours. Then what
a push does: RCPT answers, a restart, the page and /metrics.

Postfix has no push channel: a relay_recipient_maps table is a file the
administrator (or a cron job, with `postmap`) rebuilds; `postmap` writes a
new .db and renames it over the old one, so a reader never sees half a
table. The push does the same (a temporary file in the spool, fsync,
rename); the shrink guard and the "never an empty list" rule are Bartleby's
own (issue 10), kept for pushes.

Loopback only: the pusher binds 127.0.0.2 (in push_allow), 127.0.0.3 and
127.0.0.1 (not in it) as source addresses.
"""

import os
import re
import socket
import threading
import time
import unittest

import harness
from harness import Client, Relay, free_port, proc_status

TOKEN = "s3cret-Token-0123456789abcdef"
USERS = [f"user{i}@example.org" for i in range(10)]
ALLOWED = "127.0.0.2"


wait_for = harness.wait_for

class Resp:
    def __init__(self, raw):
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
        self.headers = {}
        for l in lines[1:]:
            k, _, v = l.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        self.text = self.body.decode("utf-8", "replace")

    def __repr__(self):
        return f"<{self.status} {self.text[:300]!r}>"


class PushTest(unittest.TestCase):
    def setUp(self):
        self.relays = []

    def tearDown(self):
        for r in self.relays:
            r.cleanup()

    # -- the relay --------------------------------------------------------

    def relay(self, users=USERS, token=TOKEN, push_allow=(ALLOWED + "/32",), max_age=None, extra="", start=True):
        self.status_port = free_port()
        st = [
            "[status]",
            f'listen = "127.0.0.1:{self.status_port}"',
            'allow = ["127.0.0.1/32"]',
        ]
        if push_allow is not None:
            st.append("push_allow = [%s]" % ", ".join(f'"{a}"' for a in push_allow))
        r = Relay(recipients=users, extra=extra, status="\n".join(st))
        self.token_path = os.path.join(r.dir, "push.token")
        with open(r.config, "a") as f:
            f.write(f'push_token_file = "{self.token_path}"\n')
            if max_age is not None:
                f.write(f'recipients_max_age = "{max_age}"\n')
        if token is not None:
            with open(self.token_path, "w") as f:
                f.write(token + "\n")
        self.relays.append(r)
        if start:
            self.start(r)
        return r

    def start(self, r):
        r.start()
        self.assertTrue(harness.wait_port(self.status_port), "status page did not start:\n" + r.read_log())

    def restart(self, r):
        r.stop()
        self.start(r)

    # -- HTTP ---------------------------------------------------------------

    def connect(self, src):
        s = socket.socket()
        s.settimeout(30)
        s.bind((src, 0))
        s.connect(("127.0.0.1", self.status_port))
        return s

    @staticmethod
    def read_all(s):
        chunks = []
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
        except (ConnectionResetError, socket.timeout):
            pass
        s.close()
        return Resp(b"".join(chunks))

    def push(self, body, token=TOKEN, src=ALLOWED, path="/recipients", host=None, headers=None):
        if isinstance(body, str):
            body = body.encode()
        h = {"Host": host or f"127.0.0.1:{self.status_port}", "Content-Length": str(len(body))}
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        h.update(headers or {})
        head = f"PUT {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items() if v is not None) + "\r\n"
        s = self.connect(src)
        s.sendall(head.encode())
        try:
            s.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return self.read_all(s)

    def get(self, path, src="127.0.0.1"):
        s = self.connect(src)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.status_port}\r\n\r\n".encode())
        return self.read_all(s)

    def metrics(self):
        out = {}
        for line in self.get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                out[k] = float(v)
        return out

    # -- SMTP ---------------------------------------------------------------

    def rcpt(self, r, addr):
        c = Client(r.port)
        try:
            self.assertEqual(c.banner[0], 220, c.banner)
            c.cmd("EHLO client.test")
            c.cmd("MAIL FROM:<alice@sender.test>")
            return c.cmd(f"RCPT TO:<{addr}>")[0]
        finally:
            c.cmd("QUIT")
            c.close()

    def spool_files(self, r):
        return sorted(os.listdir(r.spool))

    def temp_files(self, r):
        return [n for n in os.listdir(r.spool) if n.startswith("recipients.push.") and n != "recipients.push"]

    def body(self, users):
        return "".join(u + "\n" for u in users)

    # ======================================================================
    # Who may push

    def test_token_is_required_and_never_logged(self):
        r = self.relay()
        new = self.body(USERS + ["newbie@example.org"])
        resp = self.push(new, token=None)
        self.assertEqual(resp.status, 401, resp)
        self.assertRegex(resp.headers.get("www-authenticate", ""), r"^Bearer")
        wrong = "x" + TOKEN[1:]
        resp = self.push(new, token=wrong)
        self.assertEqual(resp.status, 401, resp)
        self.assertIn("invalid_token", resp.headers.get("www-authenticate", ""))
        # A prefix of the token, a longer one, another scheme.
        self.assertEqual(self.push(new, token=TOKEN[:-1]).status, 401)
        self.assertEqual(self.push(new, token=TOKEN + "0").status, 401)
        self.assertEqual(self.push(new, token=None, headers={"Authorization": f"Basic {TOKEN}"}).status, 401)
        self.assertEqual(self.rcpt(r, "newbie@example.org"), 550, "a refused push changed the list")
        self.assertEqual(self.temp_files(r), [])
        self.assertNotIn("recipients.push", self.spool_files(r))
        resp = self.push(new)
        self.assertEqual(resp.status, 200, resp)
        self.assertEqual(self.rcpt(r, "newbie@example.org"), 250)
        log = r.read_log()
        self.assertNotIn(TOKEN, log, "the token was logged")
        self.assertNotIn(wrong, log, "a wrong token was logged")
        self.assertRegex(log, r"recipients list pushed by 127\.0\.0\.2: 11 entries")
        m = self.metrics()
        self.assertEqual(m.get('bartleby_recipients_pushes_total{result="unauthorized"}'), 5, m)
        self.assertEqual(m.get('bartleby_recipients_pushes_total{result="accepted"}'), 1, m)

    def test_only_from_push_allow(self):
        """push_allow is its own list: 127.0.0.1 may read the page but not
        push; 127.0.0.2 may push but not read the page; 127.0.0.3 neither."""
        r = self.relay()
        new = self.body(USERS + ["newbie@example.org"])
        # Neither list: refused at accept, before a byte is read (as for the page).
        resp = self.push(new, src="127.0.0.3")
        self.assertEqual(resp.status, 403, resp)
        # Allowed to read the page only: refused with the reason.
        resp = self.push(new, src="127.0.0.1")
        self.assertEqual(resp.status, 403, resp)
        self.assertIn("127.0.0.1 is not in [status] push_allow", resp.text)
        self.assertEqual(self.get("/", src="127.0.0.2").status, 403)
        self.assertEqual(self.get("/", src="127.0.0.3").status, 403)
        self.assertEqual(self.rcpt(r, "newbie@example.org"), 550)
        self.assertEqual(self.push(new, src="127.0.0.2").status, 200)
        self.assertEqual(self.rcpt(r, "newbie@example.org"), 250)
        self.assertEqual(self.metrics().get('bartleby_recipients_pushes_total{result="forbidden"}'), 1)

    def test_push_disabled_without_push_allow(self):
        r = self.relay(push_allow=None)
        resp = self.push(self.body(USERS), src="127.0.0.1")
        self.assertEqual(resp.status, 403, resp)
        self.assertIn("disabled", resp.text)

    def test_token_file_missing_or_empty_disables_push(self):
        for what, token in (("missing", None), ("empty", ""), ("short", "abc")):
            with self.subTest(what):
                r = self.relay(token=token)
                resp = self.push(self.body(USERS + ["newbie@example.org"]), token=token or TOKEN)
                self.assertEqual(resp.status, 403, resp)
                self.assertIn("disabled", resp.text)
                self.assertEqual(self.rcpt(r, "newbie@example.org"), 550)
                self.assertTrue(wait_for(lambda: re.search(r"warning: .*push_token_file " + re.escape(self.token_path), r.read_log()), 5), r.read_log())
                # Fixed without a restart: the file is read for each push.
                with open(self.token_path, "w") as f:
                    f.write(TOKEN + "\n")
                self.assertEqual(self.push(self.body(USERS + ["newbie@example.org"])).status, 200)
                self.assertEqual(self.rcpt(r, "newbie@example.org"), 250)
                r.cleanup()
                self.relays.remove(r)

    def test_check_reports_the_push_configuration(self):
        """`check` fails (78) where `serve` would run with push off; like a
        bad recipients list (issue 10), serve itself does not stop."""
        r = self.relay(token=None, start=False)
        out = r.cli("check")
        self.assertEqual(out.returncode, 78, out)
        self.assertIn(f"push_token_file {self.token_path}", out.stderr)
        with open(self.token_path, "w") as f:
            f.write(TOKEN + "\n")
        out = r.cli("check")
        self.assertEqual(out.returncode, 0, out)
        self.assertIn("push: enabled", out.stdout)
        # push_allow without a token file: a configuration error.
        with open(r.config) as f:
            cfg = f.read()
        with open(r.config, "w") as f:
            f.write(re.sub(r"push_token_file = .*\n", "", cfg))
        out = r.cli("check")
        self.assertEqual(out.returncode, 78, out)
        self.assertIn("`status.push_allow` needs `status.push_token_file`", out.stderr)

    def test_host_not_ours_is_421(self):
        """The DNS-rebinding check of the gate applies to pushes too (a cron
        job uses the appliance's IP address, which is accepted)."""
        r = self.relay()
        resp = self.push(self.body(USERS + ["newbie@example.org"]), host="evil.test")
        self.assertEqual(resp.status, 421, resp)
        self.assertEqual(self.rcpt(r, "newbie@example.org"), 550)
        self.assertEqual(self.temp_files(r), [])

    # ======================================================================
    # What is pushed

    def test_half_size_push_refused_unless_forced(self):
        r = self.relay()
        half = self.body(USERS[:4])
        resp = self.push(half)
        self.assertEqual(resp.status, 409, resp)
        self.assertIn("force=1", resp.text)
        self.assertEqual(self.rcpt(r, "user9@example.org"), 250, "list changed by a refused push")
        self.assertNotIn("recipients.push", self.spool_files(r))
        # Exactly half is fine (as for the file).
        self.assertEqual(self.push(self.body(USERS[:5])).status, 200)
        self.assertEqual(self.rcpt(r, "user9@example.org"), 550)
        resp = self.push(self.body(USERS[:2]), path="/recipients?force=1")
        self.assertEqual(resp.status, 200, resp)
        self.assertEqual(self.rcpt(r, "user2@example.org"), 550)
        self.assertEqual(self.rcpt(r, "user1@example.org"), 250)
        self.assertEqual(self.metrics().get('bartleby_recipients_pushes_total{result="shrink"}'), 1)
        # An empty list is never taken, not even forced.
        resp = self.push("# nobody\n", path="/recipients?force=1")
        self.assertEqual(resp.status, 400, resp)
        self.assertIn("no entries", resp.text)
        self.assertEqual(self.rcpt(r, "user1@example.org"), 250)

    def test_malformed_body_names_the_line(self):
        r = self.relay()
        resp = self.push("user1@example.org\n# ok\nnot-an-address\n")
        self.assertEqual(resp.status, 400, resp)
        self.assertIn("line 3", resp.text)
        self.assertIn("not-an-address", resp.text)
        self.assertEqual(self.rcpt(r, "user9@example.org"), 250)
        resp = self.push(b"user1@example.org\n\xff\xfe\n" * 6)
        self.assertEqual(resp.status, 400, resp)
        self.assertEqual(self.temp_files(r), [])
        self.assertEqual(self.metrics().get('bartleby_recipients_pushes_total{result="bad_list"}'), 2)

    def test_over_the_cap_413_memory_bounded(self):
        r = self.relay()
        before = proc_status(r.proc.pid)
        # Announced: refused before a byte of the body is read.
        big = 1024 * 1024 + 1
        s = self.connect(ALLOWED)
        s.sendall(f"PUT /recipients HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {big}\r\n\r\n".encode())
        resp = self.read_all(s)
        self.assertEqual(resp.status, 413, resp)
        # Sent anyway, 8 MiB of it: still 413, nothing kept.
        s = self.connect(ALLOWED)
        s.sendall(f"PUT /recipients HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {8 << 20}\r\n\r\n".encode())

        def flood():
            try:
                for _ in range(128):
                    s.sendall(b"x@example.org\n" * 4681)
            except OSError:
                pass

        th = threading.Thread(target=flood, daemon=True)
        th.start()
        # Read while it sends: the answer comes before the body, and a
        # reset after it must not hide it.
        raw = b""
        try:
            while b"\r\n\r\n" not in raw:
                b = s.recv(4096)
                if not b:
                    break
                raw += b
        except OSError:
            pass
        th.join(30)
        s.close()
        resp = Resp(raw)
        self.assertEqual(resp.status, 413, resp)
        refused = proc_status(r.proc.pid)
        # Nothing of the 8 MiB was kept (the gate drains at most 256 KiB
        # after an error, a chunk at a time).
        self.assertLess(refused["VmHWM"] - before["VmHWM"], 512, "memory grew while 8 MiB were refused")
        # Chunked (curl -T - from a pipe): 411, the length is needed first.
        s = self.connect(ALLOWED)
        s.sendall(f"PUT /recipients HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nx@y.z\r\n0\r\n\r\n".encode())
        resp = self.read_all(s)
        self.assertEqual(resp.status, 411, resp)
        self.assertEqual(self.temp_files(r), [])
        # Without Content-Length: 411 too.
        s = self.connect(ALLOWED)
        s.sendall(f"PUT /recipients HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        self.assertEqual(self.read_all(s).status, 411)
        # A list just under the cap is taken (about 40,000 addresses).
        users = [f"someone.with.a.long.name{i:06d}@example.org" for i in range(23000)]
        body = self.body(users)
        self.assertLess(len(body), 1024 * 1024)
        resp = self.push(body)
        self.assertEqual(resp.status, 200, resp)
        self.assertEqual(self.rcpt(r, "someone.with.a.long.name022999@example.org"), 250)
        after = proc_status(r.proc.pid)
        import sys
        sys.stderr.write(f"\n  [push] VmHWM before {before['VmHWM']} kB, after 8 MiB refused {refused['VmHWM']} kB, after a {len(body) >> 10} KiB push: {after['VmHWM']} kB\n")
        # The list itself is about 1 MiB of text plus 8 bytes an entry, and
        # the old one is in memory while the new one is read; nothing near
        # the 8 MiB sent.
        self.assertLess(after["VmHWM"] - before["VmHWM"], 4 * 1024, "memory grew by more than 4 MiB")
        self.assertEqual(self.metrics().get('bartleby_recipients_pushes_total{result="too_large"}'), 2)

    def test_truncated_body_keeps_the_old_list_and_no_temp_file(self):
        r = self.relay()
        s = self.connect(ALLOWED)
        s.sendall(f"PUT /recipients HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 5000\r\n\r\n".encode())
        s.sendall(b"newbie@example.org\n" * 20)
        s.shutdown(socket.SHUT_WR)
        resp = self.read_all(s)
        self.assertIn(resp.status, (0, 400), resp)
        self.assertTrue(wait_for(lambda: self.temp_files(r) == [], 5), self.temp_files(r))
        self.assertEqual(self.rcpt(r, "newbie@example.org"), 550)
        self.assertEqual(self.rcpt(r, "user9@example.org"), 250)
        self.assertNotIn("recipients.push", self.spool_files(r))
        self.assertTrue(wait_for(lambda: self.metrics().get('bartleby_recipients_pushes_total{result="incomplete"}') == 1, 5))

    def test_dripped_body_is_cut_off_and_the_page_still_answers(self):
        r = self.relay()
        s = self.connect(ALLOWED)
        s.sendall(f"PUT /recipients HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100000\r\n\r\n".encode())
        t0 = time.monotonic()
        stop = threading.Event()
        got = []

        def drip():
            try:
                while not stop.is_set():
                    s.sendall(b"a")
                    time.sleep(0.5)
            except OSError:
                pass

        th = threading.Thread(target=drip, daemon=True)
        th.start()
        # Meanwhile the page answers at once: the body is streamed by a
        # forwarder thread, not by the serial page handler.
        t = time.monotonic()
        self.assertEqual(self.get("/").status, 200)
        self.assertLess(time.monotonic() - t, 3)
        s.settimeout(40)
        try:
            while True:
                b = s.recv(4096)
                if not b:
                    break
                got.append(b)
        except (ConnectionResetError, socket.timeout):
            pass
        took = time.monotonic() - t0
        stop.set()
        s.close()
        resp = Resp(b"".join(got))
        self.assertEqual(resp.status, 408, resp)
        self.assertLess(took, 25, "a dripped push is cut off by a deadline")
        self.assertTrue(wait_for(lambda: self.temp_files(r) == [], 5), self.temp_files(r))
        self.assertEqual(self.rcpt(r, "user9@example.org"), 250)

    def test_concurrent_pushes(self):
        r = self.relay()
        lists = [[f"c{k}-{i}@example.org" for i in range(2000)] for k in range(6)]
        results = [None] * len(lists)

        def one(k):
            results[k] = self.push(self.body(lists[k]))

        threads = [threading.Thread(target=one, args=(k,)) for k in range(len(lists))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        codes = [x.status for x in results]
        self.assertIn(200, codes)
        self.assertTrue(all(c in (200, 503) for c in codes), results)
        self.assertTrue(wait_for(lambda: self.temp_files(r) == [], 5), self.temp_files(r))
        # The list in force is one of them, whole.
        with open(os.path.join(r.spool, "recipients.push")) as f:
            pushed = f.read()
        k = [self.body(l) for l in lists].index(pushed)
        self.assertEqual(self.rcpt(r, f"c{k}-1999@example.org"), 250)
        other = (k + 1) % len(lists)
        self.assertEqual(self.rcpt(r, f"c{other}-0@example.org"), 550)
        self.assertEqual(self.metrics().get("bartleby_recipients_entries"), 2000)

    # ======================================================================
    # What a push does

    def test_smtp_follows_the_push_and_it_survives_a_restart(self):
        r = self.relay()
        new = USERS[1:] + ["newbie@example.org"]
        self.assertEqual(self.rcpt(r, "newbie@example.org"), 550)
        resp = self.push(self.body(new))
        self.assertEqual(resp.status, 200, resp)
        self.assertIn("10 entries", resp.text)
        self.assertEqual(self.rcpt(r, "newbie@example.org"), 250)
        self.assertEqual(self.rcpt(r, "user0@example.org"), 550)
        self.assertEqual(self.rcpt(r, "bob@evil.test"), 550, "never an open relay")
        # 200 only once it is on disk: a SIGKILL right after loses nothing.
        r.kill()
        self.start(r)
        self.assertEqual(self.rcpt(r, "newbie@example.org"), 250)
        self.assertEqual(self.rcpt(r, "user0@example.org"), 550)
        m = self.metrics()
        self.assertEqual(m.get('bartleby_recipients_source{source="push"}'), 1, m)
        self.assertEqual(m.get('bartleby_recipients_source{source="file"}'), 0, m)
        self.assertEqual(m.get("bartleby_recipients_entries"), 10)
        # The file changes after the push: newer, so it wins; the push is gone.
        mark = len(r.read_log())
        with open(os.path.join(r.dir, "recipients"), "w") as f:
            f.write(self.body(USERS + ["filer@example.org"]))
        self.assertTrue(wait_for(lambda: "recipients list reloaded: 11 entries" in r.read_log()[mark:], 10), r.read_log()[mark:])
        self.assertEqual(self.rcpt(r, "filer@example.org"), 250)
        self.assertEqual(self.rcpt(r, "newbie@example.org"), 550)
        self.assertEqual(self.metrics().get('bartleby_recipients_source{source="file"}'), 1)
        self.assertNotIn("recipients.push", self.spool_files(r))
        self.restart(r)
        self.assertEqual(self.rcpt(r, "filer@example.org"), 250)

    def test_a_file_older_than_the_push_is_not_taken(self):
        r = self.relay()
        self.assertEqual(self.push(self.body(USERS + ["newbie@example.org"])).status, 200)
        path = os.path.join(r.dir, "recipients")
        mark = len(r.read_log())
        with open(path, "w") as f:
            f.write(self.body(USERS + ["old@example.org"]))
        old = time.time() - 3600
        os.utime(path, (old, old))  # rsync -t of an hour-old file
        self.assertTrue(wait_for(lambda: "older than the list pushed" in r.read_log()[mark:], 10), r.read_log()[mark:])
        self.assertEqual(self.rcpt(r, "newbie@example.org"), 250)
        self.assertEqual(self.rcpt(r, "old@example.org"), 550)
        self.restart(r)
        self.assertEqual(self.rcpt(r, "newbie@example.org"), 250)
        self.assertEqual(self.rcpt(r, "old@example.org"), 550)

    def test_push_without_a_recipients_file(self):
        r = self.relay(users=None)
        # No list yet: every address in the relay domains, as without push.
        self.assertEqual(self.rcpt(r, "anyone@example.org"), 250)
        self.assertEqual(self.push(self.body(USERS)).status, 200)
        self.assertEqual(self.rcpt(r, "anyone@example.org"), 550)
        self.assertEqual(self.rcpt(r, "user3@example.org"), 250)
        self.restart(r)
        self.assertEqual(self.rcpt(r, "anyone@example.org"), 550)
        self.assertEqual(self.rcpt(r, "user3@example.org"), 250)
        # The shrink guard holds without a file too.
        self.assertEqual(self.push(self.body(USERS[:2])).status, 409)

    def test_page_and_metrics_show_source_entries_age_and_staleness(self):
        r = self.relay(max_age="2s")
        t0 = time.time()
        self.assertEqual(self.push(self.body(USERS + ["newbie@example.org"])).status, 200)
        m = self.metrics()
        self.assertEqual(m.get('bartleby_recipients_source{source="push"}'), 1, m)
        self.assertEqual(m.get("bartleby_recipients_entries"), 11)
        self.assertLessEqual(abs(m.get("bartleby_recipients_last_update_timestamp_seconds", 0) - t0), 3, m)
        page = self.get("/").text
        row = re.search(r'<td id="recipients">(.*?)</td>', page, re.S)
        self.assertTrue(row, page[-3000:])
        self.assertIn("11 entries", row.group(1))
        self.assertIn("pushed", row.group(1))
        # Not refreshed within recipients_max_age: stale, on the page and in /metrics.
        self.assertTrue(wait_for(lambda: self.metrics().get("bartleby_recipients_stale") == 1, 10))
        self.assertRegex(self.get("/").text, r'id="recipients-warning"[^>]*>[^<]*pushed[^<]*not been refreshed')
        # A new push (the same list) refreshes it.
        self.assertEqual(self.push(self.body(USERS + ["newbie@example.org"])).status, 200)
        self.assertEqual(self.metrics().get("bartleby_recipients_stale"), 0)
        self.assertNotIn('id="recipients-warning"', self.get("/").text)


def main():
    harness.take_binary_arg()
    harness.report("push", unittest.main(exit=False, verbosity=2).result)


if __name__ == "__main__":
    main()
