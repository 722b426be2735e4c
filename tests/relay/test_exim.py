"""Exim as a real sending peer of the backup MX (issue 11, "Tests, with real peers").

Exim is not installed (Debian makes exim4 and postfix conflict): tests/relay/exim_root.sh
unpacks Debian's exim4-daemon-light into a private root, cached under
~/.cache/bartleby/exim-<version>, and runs it with a Debian-exim user in a private mount
namespace. If that fails, every test here fails (a test that cannot run is red).

Each test submits one message to a private Exim over SMTP on stdin (`exim -bs`, as root, with
its own config via -C), Exim delivers it at once (-odf) through a manualroute router to
127.0.0.1:<Bartleby's port> (an IP literal: no DNS, host_lookup unset, no ident), and Bartleby
relays it to a FakePrimary whose EHLO offers SMTPUTF8 and DSN.

1. plain ASCII: Exim logs "=> ... C="250 ..."" and the primary receives the same envelope and
   body;
2. SMTPUTF8: this Exim (4.96) is built with SUPPORT_I18N; a message submitted with SMTPUTF8 to
   müller@example.org goes to Bartleby with SMTPUTF8 on MAIL and the UTF-8 local part as is
   (utf8_downconvert's default: convert only when the next hop lacks SMTPUTF8), and reaches
   the primary unchanged (no xn--mller-kva);
3. DSN: with dsn_advertise_hosts set, Exim passes on NOTIFY, ORCPT, RET and ENVID it was
   given; they arrive at the primary unchanged;
4. for the record, what Exim does toward a next hop WITHOUT SMTPUTF8 (Bartleby before issue
   11): it silently rewrites the local parts to Punycode (xn--mller-kva@example.org), the
   behaviour issue 11 describes.

Run: python3 tests/relay/test_exim.py [path/to/bartleby]
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import FakePrimary, Relay, free_port  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
EHLO = "250-primary.example.org\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n250 SIZE 10240000"
EXIM_ROOT = "/tmp/bartleby-exim-root"  # where exim_root.sh's wrapper mounts the private root
EXIM_UID = 64011  # Debian-exim in exim_root.sh's private /etc/passwd

EXIM_CONF = """\
# A private Exim for tests/relay/test_exim.py: receives one message over SMTP on stdin
# (-bs) and delivers it at once to 127.0.0.1:{port} (Bartleby). No DNS: the route is an
# IP literal, host_lookup is unset (its built-in default), no ident callbacks.
primary_hostname = exim.sender.test
qualify_domain = sender.test
spool_directory = {base}/spool
log_file_path = {base}/log/%slog
log_selector = +smtp_protocol_error +received_recipients +deliver_time +outgoing_port
# Exim re-executes itself (-Mc, to deliver): from the private root, with its libraries.
exim_path = {root}/usr/sbin/exim4
keep_environment = LD_LIBRARY_PATH
rfc1413_query_timeout = 0s
host_lookup =
smtp_enforce_sync = false
# Offered to the submitting client, so that it can ask for them.
smtputf8_advertise_hosts = *
dsn_advertise_hosts = *
acl_smtp_rcpt = accept_all
tls_advertise_hosts =

begin acl
accept_all:
  accept

begin routers
to_bartleby:
  driver = manualroute
  domains = *
  transport = to_bartleby
  route_list = * 127.0.0.1
  # 127.0.0.1 is this host: send anyway (the port differs from 25).
  self = send

begin transports
to_bartleby:
  driver = smtp
  port = {port}
  allow_localhost
  helo_data = exim.sender.test
  hosts_try_chunking = :
  hosts_try_prdr = :
  hosts_try_fastopen = :
  hosts_avoid_tls = *
  hosts_try_dane = :
"""


class EximError(Exception):
    pass


_exim_dir = None


def exim_dir():
    """The cached private root (built on first use); raises with the script's reason."""
    global _exim_dir
    if _exim_dir is None:
        out = subprocess.run([os.path.join(HERE, "exim_root.sh")], capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise EximError("tests/relay/exim_root.sh failed: " + out.stderr.strip())
        _exim_dir = out.stdout.strip().splitlines()[-1]
    return _exim_dir


class Exim:
    """A private exim instance (spool, log, config in a temp dir) sending to `port`."""

    def __init__(self, port):
        self.wrapper = os.path.join(exim_dir(), "exim")
        self.base = tempfile.mkdtemp(prefix="bartleby-exim-")
        os.chmod(self.base, 0o755)
        for d in ("spool", "log"):
            os.makedirs(os.path.join(self.base, d))
            os.chown(os.path.join(self.base, d), EXIM_UID, EXIM_UID)
        self.conf = os.path.join(self.base, "exim.conf")
        with open(self.conf, "w") as f:
            f.write(EXIM_CONF.format(base=self.base, port=port, root=EXIM_ROOT))

    def run(self, *args, **kw):
        return subprocess.run([self.wrapper, "-C", self.conf, *args], capture_output=True, timeout=30, **kw)

    def smtp(self, dialogue):
        """Speaks SMTP to `exim -bs -odf` on its stdin, one command at a time; returns the
        replies (code, text) in order. Delivery starts when the message is accepted."""
        p = subprocess.Popen([self.wrapper, "-C", self.conf, "-bs", "-odf", "-oMa", "127.0.0.1", "-oMi", "127.0.0.1"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        replies = []
        try:
            replies.append(self._reply(p))  # greeting
            for cmd in dialogue:
                p.stdin.write(cmd.encode() + b"\r\n")
                p.stdin.flush()
                replies.append(self._reply(p))
            p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
        return replies

    @staticmethod
    def _reply(p):
        text = []
        while True:
            line = p.stdout.readline().decode(errors="replace")
            if not line:
                raise EximError("exim closed its output; stderr: " + p.stderr.read().decode(errors="replace"))
            text.append(line.rstrip("\r\n"))
            if len(line) < 4 or line[3] != "-":
                return int(line[:3]), "\n".join(text)

    def log(self):
        try:
            with open(os.path.join(self.base, "log", "mainlog"), encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def wait_log(self, pattern, timeout=20):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = re.search(pattern, self.log(), re.M)
            if m:
                return m
            time.sleep(0.05)
        raise AssertionError(f"exim's log never showed {pattern!r}:\n{self.log()}")

    def cleanup(self):
        shutil.rmtree(self.base, ignore_errors=True)


wait_until = harness.wait_until

class EximSender(unittest.TestCase):
    def setUp(self):
        self.cleanups = []
        self.relay = Relay()
        self.cleanups.append(self.relay.cleanup)
        self.primary = FakePrimary(self.relay.primary_port, {"EHLO": EHLO})
        self.cleanups.append(self.primary.stop)
        self.relay.start()
        self.exim = Exim(self.relay.port)
        self.cleanups.append(self.exim.cleanup)

    def tearDown(self):
        for c in reversed(self.cleanups):
            try:
                c()
            except Exception:
                pass

    def send(self, mail, rcpt, body):
        dialogue = ["EHLO client.sender.test", mail, rcpt, "DATA", body + "\r\n.", "QUIT"]
        replies = self.exim.smtp(dialogue)
        codes = [c for c, _ in replies]
        self.assertEqual(codes, [220, 250, 250, 250, 354, 250, 221], replies)
        return replies

    def delivered(self, rcpt_re):
        """Waits for Exim's delivery line and Bartleby's relay to the primary."""
        m = self.exim.wait_log(r"^.* => " + rcpt_re + r" .*$")
        self.assertRegex(m.group(0), r'H=127\.0\.0\.1 \[127\.0\.0\.1\]:%d .*C="250 ' % self.relay.port)
        # The 250 Exim logged is Bartleby's: its queue ID is in Bartleby's log.
        qid = harness.queued_id(m.group(0))
        self.assertTrue(qid, m.group(0))
        wait_until(lambda: qid in self.relay.read_log(), 10, f"{qid} in Bartleby's log")
        wait_until(lambda: self.primary.acked, 20, "the primary's copy:\n" + self.relay.read_log())
        self.assertTrue(self.relay.wait_empty(10), self.relay.mailq())
        return m.group(0)

    def primary_cmd(self, verb):
        return [c for c in self.primary.commands if c.upper().startswith(verb)]

    def test_1_plain_ascii(self):
        ehlo = self.exim.smtp(["EHLO client.sender.test", "QUIT"])[1][1]
        # What this build offers its clients, with the config above.
        self.assertIn("250-SMTPUTF8", ehlo)
        self.assertIn("250-DSN", ehlo)
        body = "From: alice@sender.test\r\nTo: bob@example.org\r\nSubject: plain\r\n\r\nline one\r\n..dot line\r\nend"
        self.send("MAIL FROM:<alice@sender.test>", "RCPT TO:<bob@example.org>", body)
        line = self.delivered(r"bob@example\.org")
        mail = self.primary_cmd("MAIL")
        self.assertEqual(len(mail), 1, mail)
        # Exim passes on the size it received (SIZE=, as Bartleby offers SIZE); nothing else.
        self.assertRegex(mail[0], r"^MAIL FROM:<alice@sender\.test>( SIZE=\d+)?$")
        self.assertEqual(self.primary_cmd("RCPT"), ["RCPT TO:<bob@example.org>"])
        got = self.primary.acked[0]
        # Bartleby's Received: on top of Exim's, then the message exactly as submitted to Exim
        # (the data is compared as on the wire: "..dot line" is the stuffed ".dot line").
        self.assertTrue(got.startswith(b"Received: from exim.sender.test (unknown [127.0.0.1])\r\n\tby backup.example.org"), got)
        self.assertRegex(got, rb"\r\nReceived: from \[127\.0\.0\.1\] \(helo=client\.sender\.test ident=root\)\r\n\tby exim\.sender\.test with esmtp \(Exim 4\.[0-9.]+\)")
        self.assertTrue(got.endswith((body + "\r\n").encode()), got)
        sys.stderr.write(f"  [exim] {line}\n  [primary] {self.primary.commands[1:-2]}\n")

    def test_2_smtputf8_local_part(self):
        body = "From: Jörg <jörg@sender.test>\r\nTo: müller@example.org\r\nSubject: Grüße\r\n\r\nHallo Müller."
        self.send("MAIL FROM:<jörg@sender.test> SMTPUTF8 BODY=8BITMIME", "RCPT TO:<müller@example.org>", body)
        line = self.delivered(r"müller@example\.org")
        mail = self.primary_cmd("MAIL")
        self.assertEqual(len(mail), 1, mail)
        self.assertTrue(mail[0].startswith("MAIL FROM:<jörg@sender.test>"), mail)
        self.assertIn("SMTPUTF8", mail[0].split())
        self.assertEqual(self.primary_cmd("RCPT"), ["RCPT TO:<müller@example.org>"])
        self.assertNotIn("xn--", "\n".join(self.primary.commands))
        self.assertTrue(self.primary.acked[0].endswith((body + "\r\n").encode()), self.primary.acked[0])
        sys.stderr.write(f"  [exim] {line}\n  [primary] {self.primary.commands[1:-2]}\n")

    def test_3_dsn_parameters(self):
        body = "From: alice@sender.test\r\nTo: bob@example.org\r\nSubject: dsn\r\n\r\nplease confirm"
        self.send("MAIL FROM:<alice@sender.test> RET=HDRS ENVID=QQ314159",
                  "RCPT TO:<bob@example.org> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;bob@example.org", body)
        line = self.delivered(r"bob@example\.org")
        mail = self.primary_cmd("MAIL")
        self.assertEqual(len(mail), 1, mail)
        params = mail[0].split()[2:]
        self.assertIn("RET=HDRS", params, mail)
        self.assertIn("ENVID=QQ314159", params, mail)
        self.assertEqual(self.primary_cmd("RCPT"), ["RCPT TO:<bob@example.org> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;bob@example.org"])
        sys.stderr.write(f"  [exim] {line}\n  [primary] {self.primary.commands[1:-2]}\n")

    def test_4_exim_downconverts_for_a_hop_without_smtputf8(self):
        # Why the backup must offer SMTPUTF8: toward a next hop that does not (as Bartleby did
        # before issue 11), Exim 4.96 with utf8_downconvert's default (-1: "only if needed")
        # does not refuse or bounce: it silently sends the Punycode of the local parts,
        # xn--mller-kva@ and xn--jrg-sna@, addresses that are not the recipient's. (Postfix,
        # with smtputf8_enable = yes, bounces such a message with 5.6.7 instead.) Here Exim
        # delivers straight to a fake server whose EHLO lacks SMTPUTF8.
        port = free_port()
        plain = FakePrimary(port, {"EHLO": FakePrimary.EHLO_PIPELINING})
        self.cleanups.append(plain.stop)
        exim = Exim(port)
        self.cleanups.append(exim.cleanup)
        replies = exim.smtp(["EHLO client.sender.test", "MAIL FROM:<jörg@sender.test> SMTPUTF8",
                             "RCPT TO:<müller@example.org>", "DATA", "Subject: x\r\n\r\nhi\r\n.", "QUIT"])
        self.assertEqual([c for c, _ in replies], [220, 250, 250, 250, 354, 250, 221], replies)
        m = exim.wait_log(r"^.* => .*$")
        self.assertIn("=> xn--mller-kva@example.org <müller@example.org>", m.group(0))
        wait_until(lambda: plain.acked, 10, "the fake's copy")
        self.assertRegex([c for c in plain.commands if c.startswith("MAIL")][0], r"^MAIL FROM:<xn--jrg-sna@sender\.test>( SIZE=\d+)?$")
        self.assertEqual([c for c in plain.commands if c.startswith("RCPT")], ["RCPT TO:<xn--mller-kva@example.org>"])
        sys.stderr.write(f"  [exim] {m.group(0)}\n")


def main():
    harness.take_binary_arg()
    harness.report("exim", unittest.main(exit=False, verbosity=2).result)


if __name__ == "__main__":
    main()
