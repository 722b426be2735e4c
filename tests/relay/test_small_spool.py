#!/usr/bin/env python3
"""Loud, not silent (issue 14, part 3): a spool too small for the reserve.

The appliance falls back to a RAM spool (tmpfs, 25 % of RAM: about 2.5 MB on
a 16 MB machine) when its spool disk is missing. The default min_free_space
is twice max_message_size (20 MB): before the fix every MAIL got
"452 4.3.1 Insufficient system storage" and nothing but a log line a minute
said why. Postfix does the same with queue_minfree (smtpd: "452 4.3.1
Insufficient system storage", a "warning: not enough free space in mail
queue" log line) and never adapts; Bartleby on a RAM spool now cuts the two
limits to fit and says so; on a disk that small it still refuses but says
"ALL MAIL IS REFUSED" on the console, the log, the page and /metrics.

Mounts a 3 MB tmpfs and a 6 MB ext4 loop file system of its own (root
needed; skipped otherwise) and removes them afterwards.
"""
import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Relay, free_port  # noqa: E402


def run(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


class SmallSpool(unittest.TestCase):
    def setUp(self):
        if os.geteuid() != 0:
            self.skipTest("needs root (mounts a tmpfs and a loop file system)")
        self.relays = []
        self.mounts = []
        self.tmp = tempfile.mkdtemp(prefix="bartleby-small-")

    def tearDown(self):
        for r in self.relays:
            r.stop()
        for m in reversed(self.mounts):
            run("umount", m)
        for r in self.relays:
            shutil.rmtree(r.dir, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def relay_on(self, mount_cmd):
        """A relay with the default limits (max_message_size 10240000, so
        min_free_space 20480000) whose spool is the file system mounted by
        mount_cmd(dir)."""
        http = free_port()
        r = Relay(status=f'[status]\nlisten = "127.0.0.1:{http}"\nallow = ["127.0.0.1/32"]')
        r.http = http
        self.relays.append(r)
        with open(r.config) as f:
            cfg = f.read().replace('min_free_space = "1M"\n', "")
        with open(r.config, "w") as f:
            f.write(cfg)
        os.makedirs(r.spool)
        out = mount_cmd(r.spool)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.mounts.append(r.spool)
        return r.start()

    def mail(self, r):
        s = smtplib.SMTP("127.0.0.1", r.port, timeout=20)
        try:
            s.ehlo("client.example.net")
            code, msg = s.mail("a@example.net")
            if code != 250:
                return code, msg.decode()
            s.rcpt("bob@example.org")
            code, msg = s.data(b"Subject: small spool\r\n\r\nhello\r\n")
            return code, msg.decode()
        finally:
            s.quit()

    def get(self, r, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{r.http}{path}", timeout=10) as f:
            return f.read().decode()

    def test_ram_spool_smaller_than_reserve_takes_mail_and_says_so(self):
        r = self.relay_on(lambda d: run("mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", d))
        code, msg = self.mail(r)
        # before: 452 4.3.1 Insufficient system storage, to every MAIL
        self.assertEqual(code, 250, msg)
        log = r.read_log()
        self.assertIn("the spool is on tmpfs of 3072 kB (RAM): messages are limited to 768 kB", log)
        m = self.get(r, "/metrics")
        self.assertIn("bartleby_alerts 1", m)
        self.assertIn('bartleby_alert{message="the spool is on tmpfs of 3072 kB (RAM)', m)
        page = self.get(r, "/")
        self.assertIn('id="start-alert"', page)
        self.assertIn("messages are limited to 768 kB", page)
        # the limit is the one advertised and enforced
        s = smtplib.SMTP("127.0.0.1", r.port, timeout=20)
        s.ehlo("client.example.net")
        self.assertEqual(s.esmtp_features.get("size"), str(768 * 1024))
        code, _ = s.mail("a@example.net", ["SIZE=%d" % (800 * 1024)])
        self.assertEqual(code, 552)
        s.quit()

    def test_disk_spool_smaller_than_reserve_says_all_mail_is_refused(self):
        img = os.path.join(self.tmp, "small.ext4")
        out = run("mkfs.ext4", "-q", "-F", img, "6M")
        self.assertEqual(out.returncode, 0, out.stderr)
        r = self.relay_on(lambda d: run("mount", "-o", "loop", img, d))
        code, msg = self.mail(r)
        # a disk is not resized: the reserve stands (as Postfix's queue_minfree), but loudly
        self.assertEqual(code, 452, msg)
        log = r.read_log()
        self.assertIn("ALL MAIL IS REFUSED (452): the spool file system", log)
        self.assertIn("less than min_free_space (20000 kB) plus max_message_size (10000 kB)", log)
        m = self.get(r, "/metrics")
        self.assertIn("bartleby_alerts 1", m)
        self.assertIn("ALL MAIL IS REFUSED", m)
        self.assertIn("ALL MAIL IS REFUSED", self.get(r, "/"))

    def test_roomy_spool_has_no_alert(self):
        r = self.relay_on(lambda d: run("mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", d))
        code, msg = self.mail(r)
        self.assertEqual(code, 250, msg)
        m = self.get(r, "/metrics")
        self.assertIn("bartleby_alerts 0", m)
        self.assertNotIn("bartleby_alert{", m)
        self.assertIn("bartleby_memory_available_bytes", m)
        self.assertNotIn('id="start-alert"', self.get(r, "/"))


def main():
    harness.take_binary_arg()
    harness.report("small_spool", unittest.main(exit=False, verbosity=2).result)


if __name__ == "__main__":
    main()
