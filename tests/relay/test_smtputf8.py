"""SMTPUTF8 (RFC 6531/6532) through the backup MX, hostile cases first.

* A client that says SMTPUTF8 on MAIL may use UTF-8 in the local part and
  the domain of its addresses; the message reaches a primary that offers
  SMTPUTF8 with `SMTPUTF8` on MAIL and the exact bytes it was given.
* Without SMTPUTF8 on MAIL, a non-ASCII address is refused with
  553 5.6.7, as Postfix with strict_smtputf8 = yes words it (Postfix's
  default strict_smtputf8 = no accepts it and marks the message itself).
* To a primary that does not offer SMTPUTF8, a message whose envelope needs
  it (a non-ASCII local part) is neither downgraded nor mangled: it stays
  queued with "SMTPUTF8 is required, but was not offered by host X"
  (Postfix's words; Postfix bounces such mail at once with 5.6.7, Bartleby
  keeps it until max_queue_lifetime: the primary may be upgraded, or be
  back from a fallback that lacked it). A domain-only UTF-8 address goes as
  A-labels (the same domain); UTF-8 in headers only is data (8BITMIME).
* Domains compare as the same whether written as U-labels or A-labels, in
  relay_domains and in the recipients list; nothing else slips through.

Run: python3 tests/relay/test_smtputf8.py [path/to/bartleby]
"""

import json
import os
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Client, FakePrimary, Relay, free_port, queued_id, wait_port  # noqa: E402

EHLO_UTF8 = "250-primary.example.org\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 10240000"
EHLO_NO_UTF8 = FakePrimary.EHLO_PIPELINING

BODY = "From: Jörg <jörg@sender.test>\r\nTo: Müller <müller@example.org>\r\nSubject: Grüße\r\n\r\nHallo Müller, schöne Grüße.\r\n".encode()


wait_until = harness.wait_until

POSTFIX_MAIN_CF = """\
# A private Postfix instance for tests/relay/test_smtputf8.py, with the
# defaults of a fresh installation (compatibility_level = 3.6, hence
# smtputf8_enable = yes), as in tests/bench/mtas.py.
compatibility_level = 3.6
config_directory = {etc}
queue_directory = {spool}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
maillog_file = {maillog}
maillog_file_prefixes = {base}
myhostname = {name}
mydomain = {name}
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
smtpd_banner = $myhostname ESMTP
biff = no
{extra}
"""

POSTFIX_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """A private Postfix instance listening on 127.0.0.1:port."""

    def __init__(self, name, extra):
        self.base = tempfile.mkdtemp(prefix="bartleby-postfix-")
        self.port = free_port()
        self.etc, self.spool, self.data = (os.path.join(self.base, d) for d in ("etc", "spool", "data"))
        self.maildir = os.path.join(self.base, "mail")
        self.maillog = os.path.join(self.base, "maillog")
        for d in (self.etc, self.spool, self.data, self.maildir):
            os.makedirs(d)
        os.chmod(self.base, 0o755)
        shutil.chown(self.data, "postfix", "postfix")
        shutil.chown(self.maildir, "nobody", "nogroup")
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            f.write(POSTFIX_MAIN_CF.format(base=self.base, etc=self.etc, spool=self.spool, data=self.data, maillog=self.maillog, name=name,
                                           extra=extra.replace("{mail}", self.maildir)))
        with open(os.path.join(self.etc, "master.cf"), "w") as f:
            f.write(POSTFIX_MASTER_CF.format(port=self.port))
        self.cmd("postfix", "start")
        if not wait_port(self.port, timeout=60):
            raise RuntimeError("postfix did not start: " + self.log())

    def cmd(self, prog, *args):
        return subprocess.run([prog, "-c", self.etc, *args], capture_output=True, text=True, timeout=120, check=True)

    def log(self):
        try:
            with open(self.maillog, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def mailbox(self):
        try:
            with open(os.path.join(self.maildir, "box"), "rb") as f:
                return f.read()
        except OSError:
            return b""

    def stop(self):
        subprocess.run(["postfix", "-c", self.etc, "abort"], capture_output=True, timeout=60)
        try:
            with open(os.path.join(self.spool, "pid", "master.pid")) as f:
                pid = int(f.read().strip())
            end = time.monotonic() + 20
            while time.monotonic() < end and os.path.exists(f"/proc/{pid}"):
                time.sleep(0.1)
        except (OSError, ValueError):
            pass
        shutil.rmtree(self.base, ignore_errors=True)


class Utf8Test(unittest.TestCase):
    def setUp(self):
        self.cleanups = []

    def tearDown(self):
        for c in reversed(self.cleanups):
            try:
                c()
            except Exception:
                pass

    def relay(self, primary_port=None, relay_domains=None, recipients=None, extra="", status=False, start=True):
        st = None
        if status:
            self.status_port = free_port()
            st = f'[status]\nlisten = "127.0.0.1:{self.status_port}"\nallow = ["127.0.0.1/32"]'
        r = Relay(primary_port=primary_port, extra=extra, recipients=recipients, status=st)
        self.cleanups.append(r.cleanup)
        if relay_domains is not None:
            with open(r.config, encoding="utf-8") as f:
                text = f.read()
            doms = ", ".join(f'"{d}"' for d in relay_domains)
            text = re.sub(r"^relay_domains = .*$", f"relay_domains = [{doms}]", text, flags=re.M)
            with open(r.config, "w", encoding="utf-8") as f:
                f.write(text)
        if start:
            r.start()
            if status:
                self.assertTrue(wait_port(self.status_port), r.read_log())
        return r

    def primary(self, ehlo, port=None):
        p = FakePrimary(port or free_port(), {"EHLO": ehlo})
        self.cleanups.append(p.stop)
        return p

    def send(self, r, sender, rcpts, body=BODY, utf8=True):
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
            s.ehlo("client.sender.test")
            opts = ["SMTPUTF8", "BODY=8BITMIME"] if utf8 else ["BODY=8BITMIME"]
            s.mail(sender, opts)
            for a in rcpts:
                code, text = s.rcpt(a)
                self.assertEqual(code, 250, (a, text))
            code, text = s.data(body)
            self.assertEqual(code, 250, text)
            return queued_id(text.decode())

    def raw(self, r):
        c = Client(r.port)
        self.cleanups.append(c.close)
        self.assertEqual(c.cmd("EHLO client.sender.test")[0], 250)
        return c

    # -- what the server says -----------------------------------------------

    def test_ehlo_offers_smtputf8(self):
        r = self.relay()
        code, text = self.raw(r).cmd("EHLO again.sender.test")
        self.assertEqual(code, 250)
        self.assertIn("SMTPUTF8", {l[4:].split()[0] for l in text.splitlines()[1:]})
        self.assertIn("8BITMIME", text)

    def test_utf8_address_without_smtputf8_is_refused(self):
        # Postfix (strict_smtputf8 = yes): 553 5.6.7 Must declare SMTPUTF8
        # to send unicode address. Its default (no) would take it.
        r = self.relay()
        c = self.raw(r)
        code, text = c.cmd("MAIL FROM:<jörg@sender.test>")
        self.assertEqual(code, 553, text)
        self.assertIn("5.6.7", text)
        self.assertIn("SMTPUTF8", text)
        self.assertEqual(c.cmd("MAIL FROM:<alice@sender.test>")[0], 250)
        for rcpt in ("müller@example.org", "bob@bücher.example", "bob@exämple.org"):
            code, text = c.cmd(f"RCPT TO:<{rcpt}>")
            self.assertEqual((code, text[4:9]), (553, "5.6.7"), (rcpt, text))
        # SMTPUTF8 on MAIL lets the same recipient in.
        self.assertEqual(c.cmd("RSET")[0], 250)
        self.assertEqual(c.cmd("MAIL FROM:<jörg@sender.test> SMTPUTF8")[0], 250)
        self.assertEqual(c.cmd("RCPT TO:<müller@example.org>")[0], 250)
        # Bytes that are not UTF-8 are no address at all, flag or not.
        c.send(b"RCPT TO:<m\xfcller@example.org>\r\n")
        code, text = c.reply()
        self.assertEqual(code // 100, 5, text)
        self.assertEqual(c.cmd("RSET")[0], 250)
        for line in (b"MAIL FROM:<j\xf6rg@sender.test> SMTPUTF8\r\n", b"MAIL FROM:<j\xf6rg@sender.test>\r\n", b"MAIL FROM:<jorg@s\xe9nder.test> SMTPUTF8\r\n"):
            c.send(line)
            code, text = c.reply()
            self.assertEqual(code // 100, 5, (line, text))

    def test_relay_rules_hold_for_utf8_addresses(self):
        r = self.relay()
        c = self.raw(r)
        self.assertEqual(c.cmd("MAIL FROM:<jörg@sender.test> SMTPUTF8")[0], 250)
        for rcpt, code in [
            ("müller%evil.test@example.org", 550),
            ("müller!evil.test@example.org", 550),
            ('"müller@evil.test"@example.org', 550),
            ("@example.org:müller@evil.test", 550),
            ("müller@evil.test", 550),
            # A control or invisible character: not an address.
            ("mül\u0085ler@example.org", 501),
            ("mül\u202eler@example.org", 501),
            ("mül ler@example.org", 501),
            # A local part over 64 bytes, 33 characters.
            ("ü" * 32 + "a@example.org", 501),
        ]:
            got, text = c.cmd(f"RCPT TO:<{rcpt}>")
            self.assertEqual(got, code, (rcpt, text))
        self.assertEqual(c.cmd("RCPT TO:<" + "ü" * 32 + "@example.org>")[0], 250, "64 bytes")

    def test_limits_count_bytes_and_a_character_across_them_is_safe(self):
        # An address may have 254 octets (RFC 5321 4.5.3.1.3: a path of 256
        # with its brackets), counted in bytes, not characters. Every length
        # around the limit, with 2-, 3- and 4-byte characters, one of them
        # across byte 254 when the address is longer.
        r = self.relay()
        for ch in ("é", "€", "\U0001F600"):
            w = len(ch.encode())
            for pad in range(0, 4):
                for n in range((240 - 12) // w, (262 - 12) // w + 1):
                    addr = "a" * pad + ch * n + "@sender.test"
                    size = len(addr.encode())
                    # A session each: refusals count towards error_limit.
                    c = self.raw(r)
                    code, text = c.cmd(f"MAIL FROM:<{addr}> SMTPUTF8")
                    c.close()
                    self.assertNotEqual(code, 0, f"connection lost at {size} bytes: a panic?")
                    if size <= 254:
                        self.assertEqual(code, 250, (size, text))
                    else:
                        self.assertIn(code, (501, 553), (size, text))
        # A local part is at most 64 bytes: 32 two-byte characters, not 33.
        c = self.raw(r)
        self.assertEqual(c.cmd("MAIL FROM:<a@sender.test> SMTPUTF8")[0], 250)
        self.assertEqual(c.cmd("RCPT TO:<" + "ü" * 32 + "@example.org>")[0], 250)
        self.assertEqual(c.cmd("RCPT TO:<" + "ü" * 32 + "x@example.org>")[0], 501)
        self.assertEqual(c.cmd("RCPT TO:<" + "€" * 21 + "xy@example.org>")[0], 501)
        self.assertEqual(c.cmd("QUIT")[0], 221)
        self.assertIsNone(r.proc.poll(), "the relay died")

    # -- relay domains: U-labels and A-labels ---------------------------------

    def test_u_labels_and_a_labels_are_the_same_domain(self):
        r = self.relay(relay_domains=["xn--bcher-kva.example", "münchen.example", "example.org"])
        c = self.raw(r)
        self.assertEqual(c.cmd("MAIL FROM:<jörg@sender.test> SMTPUTF8")[0], 250)
        for rcpt in (
            "müller@bücher.example",
            "müller@BÜCHER.example",
            "bob@xn--bcher-kva.example",
            "bob@XN--BCHER-KVA.EXAMPLE",
            "bob@münchen.example",
            "bob@xn--mnchen-3ya.example",
            "bob@münchen.example.",
        ):
            code, text = c.cmd(f"RCPT TO:<{rcpt}>")
            self.assertEqual(code, 250, (rcpt, text))
        # No open relay through IDN confusion.
        for rcpt in (
            "bob@bucher.example",  # the ASCII look-alike
            "bob@xn--bcher-.example",  # an "A-label" of plain ASCII
            "bob@xn--bcher-kva-.example",
            "bob@xn--bcher-kvaa.example",  # another valid label
            "bob@xn--zzzzzzzzzzzzzzzzzzzzzz.example",  # overflow
            "bob@xn--.example",
            "bob@b\u00fccher.example.evil.test",
            "bob@xn--bcher-kva.example.evil.test",
            "bob@b\u03cbcher.example",  # Greek ϋ, not ü
            "bob@bücher\u3002example",  # ideographic full stop: not a dot here
            "bob@mu\u0308nchen.example",  # decomposed ü (no NFC here): another name
        ):
            code, text = c.cmd(f"RCPT TO:<{rcpt}>")
            self.assertIn(code, (550, 501, 553), (rcpt, text))
        self.assertIsNone(r.proc.poll())

    def test_recipients_list_in_either_form(self):
        r = self.relay(
            relay_domains=["bücher.example", "xn--mnchen-3ya.example"],
            recipients=["müller@xn--bcher-kva.example", "@münchen.example", "Straße@bücher.example"],
        )
        c = self.raw(r)
        self.assertEqual(c.cmd("MAIL FROM:<jörg@sender.test> SMTPUTF8")[0], 250)
        for rcpt in ("müller@bücher.example", "MÜLLER@xn--bcher-kva.example", "anyone@xn--mnchen-3ya.example", "anyone@MÜNCHEN.example", "straße@bücher.example"):
            code, text = c.cmd(f"RCPT TO:<{rcpt}>")
            self.assertEqual(code, 250, (rcpt, text))
        for rcpt in ("mueller@bücher.example", "muller@bücher.example", "strasse@bücher.example"):
            code, text = c.cmd(f"RCPT TO:<{rcpt}>")
            self.assertEqual(code, 550, (rcpt, text))

    # -- delivery -----------------------------------------------------------

    def test_delivered_with_smtputf8_to_a_primary_that_offers_it(self):
        p = self.primary(EHLO_UTF8)
        r = self.relay(primary_port=p.sock.getsockname()[1], relay_domains=["example.org", "xn--bcher-kva.example"])
        qid = self.send(r, "jörg@sender.test", ["müller@example.org", "bob@bücher.example"])
        wait_until(lambda: p.acked, 20, "delivery")
        mail = [c for c in p.commands if c.startswith("MAIL")]
        self.assertEqual(len(mail), 1, p.commands)
        self.assertTrue(mail[0].startswith("MAIL FROM:<jörg@sender.test>"), mail)
        self.assertIn(" SMTPUTF8", mail[0])
        rcpts = [c for c in p.commands if c.startswith("RCPT")]
        self.assertEqual(rcpts, ["RCPT TO:<müller@example.org>", "RCPT TO:<bob@bücher.example>"])
        self.assertTrue(p.acked[0].endswith(BODY), p.acked[0][-200:])
        self.assertIn("with UTF8ESMTP id", p.acked[0].decode())
        wait_until(lambda: not r.queue_ids(), 10, "removal")
        log = r.read_log()
        self.assertIn(f"{qid}: to=<müller@example.org>", log)
        self.assertIn("status=sent", log)

    def test_smtputf8_with_dsn_parameters_both_passed_on(self):
        # SMTPUTF8 and DSN on the same MAIL and RCPT: neither parser eats
        # the other's words; a primary offering both gets both, unchanged.
        p = self.primary("250-primary.example.org\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 DSN")
        r = self.relay(primary_port=p.sock.getsockname()[1])
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
            s.ehlo("client.sender.test")
            s.mail("jörg@sender.test", ["SMTPUTF8", "BODY=8BITMIME", "RET=HDRS", "ENVID=QQ+2B1"])
            code, text = s.rcpt("müller@example.org", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;m+FCller@example.org"])
            self.assertEqual(code, 250, text)
            code, text = s.data(BODY)
            self.assertEqual(code, 250, text)
        wait_until(lambda: p.acked, 20, "delivery")
        mail = [c for c in p.commands if c.startswith("MAIL")]
        self.assertEqual(len(mail), 1, p.commands)
        for word in (" SMTPUTF8", " RET=HDRS", " ENVID=QQ+2B1"):
            self.assertIn(word, mail[0])
        rcpts = [c for c in p.commands if c.startswith("RCPT")]
        self.assertEqual(rcpts, ["RCPT TO:<müller@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;m+FCller@example.org"])

    def test_held_for_a_primary_without_smtputf8_others_delivered(self):
        p = self.primary(EHLO_NO_UTF8)
        port = p.sock.getsockname()[1]
        r = self.relay(primary_port=port, relay_domains=["example.org", "bücher.example"], status=True)
        needs = self.send(r, "alice@sender.test", ["müller@example.org"])
        mixed = self.send(r, "alice@sender.test", ["carol@example.org", "günther@example.org"])
        idn = self.send(r, "alice@sender.test", ["bob@bücher.example"])
        headers = self.send(r, "alice@sender.test", ["dave@example.org"])
        plain = self.send(r, "alice@sender.test", ["erin@example.org"], body=b"Subject: plain\r\n\r\nascii\r\n", utf8=False)
        wait_until(lambda: len(p.acked) >= 4, 20, "the deliverable messages")
        wait_until(lambda: "SMTPUTF8 is required" in r.mailq(), 10, "mailq")
        # Nothing downgraded: no SMTPUTF8 on MAIL, no UTF-8 local part sent,
        # no invented xn-- local part.
        for c in p.commands:
            self.assertNotIn("SMTPUTF8", c)
            self.assertNotIn("ller@", c)
            self.assertNotIn("nther@", c)
        rcpts = sorted(c for c in p.commands if c.startswith("RCPT"))
        self.assertEqual(rcpts, ["RCPT TO:<bob@xn--bcher-kva.example>", "RCPT TO:<carol@example.org>", "RCPT TO:<dave@example.org>", "RCPT TO:<erin@example.org>"])
        # The messages with UTF-8 only in headers or domains went in full.
        self.assertTrue(all(m.endswith(BODY) for m in p.acked[:4] if b"plain" not in m))
        self.assertEqual(sorted(r.queue_ids()), sorted([needs, mixed]))
        q = r.mailq()
        self.assertIn(f"SMTPUTF8 is required, but was not offered by host 127.0.0.1[127.0.0.1]:{port}", q)
        self.assertIn("müller@example.org", q)
        self.assertIn("günther@example.org", q)
        self.assertNotIn("carol@example.org", q)
        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/api/queue", timeout=10) as resp:
            body = resp.read().decode()
        json.loads(body)
        self.assertIn("SMTPUTF8 is required, but was not offered by host", body)
        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/", timeout=10) as resp:
            page = resp.read().decode()
        self.assertIn("SMTPUTF8 is required, but was not offered by host", page)
        log = r.read_log()
        self.assertRegex(log, rf"{needs}: to=<müller@example\.org>, relay=.*dsn=4\.6\.7, status=deferred \(.*SMTPUTF8 is required")
        # Not a dead primary: the rest of the queue is not held back.
        self.assertNotIn("primary unreachable", log)
        del idn, headers, plain

    def test_bounced_with_5_6_7_only_at_max_queue_lifetime(self):
        p = self.primary(EHLO_NO_UTF8)
        port = p.sock.getsockname()[1]
        r = self.relay(primary_port=port, extra='max_queue_lifetime = "3s"')
        qid = self.send(r, "alice@sender.test", ["müller@example.org"])
        wait_until(lambda: "SMTPUTF8 is required" in r.mailq(), 20, "the deferral")
        self.assertEqual(p.acked, [])
        self.assertEqual(r.queue_ids(), [qid])
        time.sleep(3.2)
        r.flush()
        wait_until(lambda: p.acked, 20, "the bounce")
        bounce = p.acked[0].decode()
        self.assertIn("Status: 5.6.7", bounce)
        self.assertIn("SMTPUTF8 is required, but was not offered by host", bounce)
        self.assertIn("RCPT TO:<alice@sender.test>", p.commands)
        wait_until(lambda: not r.queue_ids(), 10, "the queue to empty")

    def test_old_queue_file_without_the_field_is_delivered(self):
        # A queue file as the previous version wrote it (no smtputf8 line).
        p = self.primary(EHLO_UTF8)
        r = self.relay(primary_port=p.sock.getsockname()[1], start=False)
        os.makedirs(os.path.join(r.spool, "queue"), exist_ok=True)
        for d in ("incoming", "state", "corrupt"):
            os.makedirs(os.path.join(r.spool, d), exist_ok=True)
        data = b"Subject: old\r\n\r\nfrom before the upgrade\r\n"
        qid = "0123456789ABC"
        head = f"BARTLEBY-QUEUE 1\nid {qid}\narrival {int(time.time())}\nclient c[192.0.2.1]\nhelo c.test\nfrom alice@sender.test\nbody 8BITMIME\nrcpt bob@example.org\nlength {len(data):020}\n\n"
        with open(os.path.join(r.spool, "queue", qid), "wb") as f:
            f.write(head.encode() + data)
        r.start()
        wait_until(lambda: p.acked, 20, "delivery of the old file")
        self.assertEqual(p.acked[0], data)
        mail = [c for c in p.commands if c.startswith("MAIL")]
        self.assertNotIn("SMTPUTF8", mail[0])
        wait_until(lambda: not r.queue_ids(), 10, "removal")

    # -- real Postfix peers ---------------------------------------------------

    def postfix(self, name, extra):
        if not shutil.which("postfix"):
            self.skipTest("no postfix")
        p = Postfix(name, extra)
        self.cleanups.append(p.stop)
        return p

    def test_real_postfix_sender_to_real_postfix_primary(self):
        # The case: a Postfix sender with default settings relays
        # müller@example.org to the backup MX (before: "5.6.7 SMTPUTF8 is
        # required, but was not offered", a bounce); the backup hands it to
        # a Postfix primary that offers SMTPUTF8.
        primary = self.postfix(
            "primary.example.org",
            "virtual_mailbox_domains = example.org\nvirtual_mailbox_base = {mail}\nvirtual_mailbox_maps = static:box\n"
            "virtual_uid_maps = static:65534\nvirtual_gid_maps = static:65534\nvirtual_minimum_uid = 1\n",
        )
        r = self.relay(primary_port=primary.port)
        sender = self.postfix(
            "mx.sender.test",
            f"relay_domains = example.org\ntransport_maps = inline:{{example.org=relay:[127.0.0.1]:{r.port}}}\n"
            "smtpd_relay_restrictions = permit_mynetworks, reject\n",
        )
        with smtplib.SMTP("127.0.0.1", sender.port, timeout=30) as s:
            s.ehlo("client.sender.test")
            self.assertTrue(s.has_extn("smtputf8"), "the Postfix sender does not offer SMTPUTF8")
            s.sendmail("jörg@sender.test", ["müller@example.org"], BODY, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        try:
            box = wait_until(lambda: primary.mailbox(), 60, "delivery to the Postfix primary")
        except AssertionError:
            self.fail("not delivered; the Postfix sender says:\n" + "\n".join(l for l in sender.log().splitlines() if "status=" in l))
        self.assertIn("Delivered-To: müller@example.org".encode(), box)
        self.assertIn("Return-Path: <jörg@sender.test>".encode(), box)
        self.assertIn(BODY.split(b"\r\n\r\n")[1].replace(b"\r\n", b"\n"), box)
        self.assertIn("Subject: Grüße".encode(), box)
        slog, plog = sender.log(), primary.log()
        self.assertRegex(slog, r"to=<müller@example\.org>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, .*status=sent")
        self.assertRegex(plog, r"to=<müller@example\.org>, relay=virtual, .*status=sent")
        # Bartleby received with SMTPUTF8 (UTF8ESMTP) and logged it sent.
        self.assertIn("with UTF8ESMTP", box.decode(errors="replace"))
        self.assertRegex(r.read_log(), r"to=<müller@example\.org>, relay=127\.0\.0\.1.*status=sent")

    def test_real_postfix_primary_without_smtputf8_keeps_it_queued(self):
        # Postfix as the primary with SMTPUTF8 switched off in EHLO
        # (smtpd_discard_ehlo_keywords): held, ASCII mail goes on.
        primary = self.postfix(
            "primary.example.org",
            "smtpd_discard_ehlo_keywords = smtputf8\nvirtual_mailbox_domains = example.org\nvirtual_mailbox_base = {mail}\n"
            "virtual_mailbox_maps = static:box\nvirtual_uid_maps = static:65534\nvirtual_gid_maps = static:65534\nvirtual_minimum_uid = 1\n",
        )
        r = self.relay(primary_port=primary.port)
        held = self.send(r, "alice@sender.test", ["müller@example.org"])
        self.send(r, "alice@sender.test", ["bob@example.org"], body=b"Subject: plain\r\n\r\nascii\r\n", utf8=False)
        wait_until(lambda: b"Subject: plain" in primary.mailbox(), 60, "the ASCII message")
        wait_until(lambda: "SMTPUTF8 is required" in r.mailq(), 20, "the deferral")
        self.assertEqual(r.queue_ids(), [held])
        self.assertNotIn(b"ller@", primary.mailbox())
        self.assertNotIn("ller@", primary.log())


def main():
    harness.take_binary_arg()
    harness.report("smtputf8", unittest.main(exit=False, verbosity=2).result)


if __name__ == "__main__":
    main()
