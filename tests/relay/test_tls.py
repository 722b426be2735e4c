"""STARTTLS in and out (issue 12), with real peers, hostile cases first.

Inbound: openssl s_client -starttls smtp (TLS 1.2 and 1.3, the chain),
swaks --tls, a Postfix sender with smtp_tls_security_level = encrypt; the
CVE-2011-0411 case (plaintext pipelined after STARTTLS is never answered
inside TLS); every session limit inside TLS; the handshake's own timeout
and its place in the per-client limits; a certificate swapped on disk (new
connections get it) and a bad pair at reload (the old one kept, a warning
in the log, on the page and in /metrics).

Outbound: a Postfix primary with TLS under "verify" (delivered, its log
shows the TLS session from Bartleby); a primary with a certificate from
another CA, or the wrong pinned fingerprint (deferred, and no MAIL command
ever sent, in clear or not); "encrypt" with a primary that offers no
STARTTLS (deferred); "may" with a broken handshake (the host again in
clear, as Postfix's RETRY_AS_PLAINTEXT).

Certificates (ECDSA P-256) are made with openssl in a temp dir at start.
Run: python3 tests/relay/test_tls.py [path/to/bartleby]
"""

import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Client, Relay, Sink, free_port, queued_id, wait_port  # noqa: E402

wait_until = harness.wait_until
CERTS = None  # the temp dir of certificates, made once


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


# Every certificate starts a day in the past: a wall clock that steps back
# (a VM's clock corrected after a snapshot is restored) must not make a
# certificate made a second ago "not yet valid" for the peers that verify it
# (openssl's req/x509 -days start at this second; `openssl ca` takes a date).
CA_CNF = """[ca]
default_ca = test
[test]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = any
unique_subject = no
email_in_dn = no
[any]
commonName = supplied
organizationName = optional
"""


def _asn1_time(t):
    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(t))


def issue(d, name, subj, ext, signer=None, days=20):
    """Makes `name`.pem in dir d for the key `name`.key (made if absent):
    signed by `signer` (a CA made here), or self-signed when signer is None;
    `ext` holds the X.509v3 extensions, one per line."""
    if not os.path.exists(os.path.join(d, f"{name}.key")):
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key", cwd=d)
    cnf = os.path.join(d, "ca.cnf")
    if not os.path.exists(cnf):
        open(cnf, "w").write(CA_CNF)
        open(os.path.join(d, "index.txt"), "w").close()
        open(os.path.join(d, "serial"), "w").write("1000\n")
    open(os.path.join(d, f"{name}.ext"), "w").write(ext)
    openssl("req", "-new", "-key", f"{name}.key", "-subj", subj, "-out", f"{name}.csr", cwd=d)
    now = time.time()
    sign = ["-selfsign", "-keyfile", f"{name}.key"] if signer is None else ["-cert", f"{signer}.pem", "-keyfile", f"{signer}.key"]
    openssl("ca", "-batch", "-notext", "-config", "ca.cnf", *sign, "-in", f"{name}.csr", "-out", f"{name}.pem",
            "-startdate", _asn1_time(now - 86400), "-enddate", _asn1_time(now + days * 86400), "-extfile", f"{name}.ext", cwd=d)


def make_certs():
    """root CA -> intermediate CA -> leaf (fullchain = leaf + intermediate),
    a renewed leaf, a primary's leaf, and a primary leaf from another CA."""
    d = tempfile.mkdtemp(prefix="bartleby-tls-")
    ca_ext = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"

    def leaf(name, subj, san, signer, days=20):
        issue(d, name, subj, f"basicConstraints=CA:FALSE\nsubjectAltName={san}\nextendedKeyUsage=serverAuth\n", signer, days)

    issue(d, "root", "/CN=Bartleby Test Root", ca_ext, days=30)
    issue(d, "inter", "/CN=Bartleby Test Intermediate", ca_ext, "root")
    san = "DNS:backup.example.org,DNS:localhost,IP:127.0.0.1"
    leaf("mx", "/CN=backup.example.org/O=Before", san, "inter")
    leaf("renewed", "/CN=backup.example.org/O=Renewed", san, "inter", days=10)
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "stray.key", cwd=d)
    # The primary: its name in the config is 127.0.0.1 (an IP SAN).
    leaf("primary", "/CN=primary.example.org", "DNS:primary.example.org,IP:127.0.0.1", "root")
    issue(d, "evil", "/CN=Some Other CA", ca_ext, days=30)
    leaf("impostor", "/CN=primary.example.org", "DNS:primary.example.org,IP:127.0.0.1", "evil")
    for name in ("mx", "renewed"):
        with open(os.path.join(d, f"{name}-full.pem"), "w") as f:
            f.write(open(os.path.join(d, f"{name}.pem")).read() + open(os.path.join(d, "inter.pem")).read())
    return d


def C(name):
    return os.path.join(CERTS, name)


def fingerprint(pem):
    out = subprocess.run(["openssl", "x509", "-in", pem, "-noout", "-fingerprint", "-sha256"], capture_output=True, text=True, check=True)
    return "sha256:" + out.stdout.strip().split("=", 1)[1]


def tls_section(cert="mx-full.pem", key="mx.key", extra=""):
    return f'[tls]\ncertificate = "{C(cert)}"\nkey = "{C(key)}"\n{extra}'


def client_ctx(version=None):
    ctx = ssl.create_default_context(cafile=C("root.pem"))
    if version:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


class TlsClient(Client):
    """harness.Client that can turn TLS on after STARTTLS."""

    def starttls(self, ctx=None, name="backup.example.org"):
        code, text = self.cmd("STARTTLS")
        if code != 220:
            return code, text
        self.sock = (ctx or client_ctx()).wrap_socket(self.sock, server_hostname=name)
        return code, text


class TlsPrimary:
    """A primary in Python: offers STARTTLS (or not), records every command
    with whether it came inside TLS, accepts everything."""

    def __init__(self, port, cert=None, key=None, offer=True, broken=False, inject=False, refuse=False):
        self.port, self.offer, self.broken = port, offer, broken
        # inject: a reply pipelined after the 220 to STARTTLS, in the same
        # write (a MITM's response injection); refuse: 454 to STARTTLS.
        self.inject, self.refuse = inject, refuse
        self.ctx = None
        if cert:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(cert, key)
        self.commands = []  # (in_tls, line)
        self.handshakes = []  # seconds each TLS handshake took, seen from here
        self.reused = []  # each handshake resumed a session
        self.messages = []
        self.lock = threading.Lock()
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", port))
        self.srv.listen(16)
        self.srv.settimeout(0.2)
        self.stopped = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopped:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                continue
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn):
        conn.settimeout(20)
        tls = False
        f = conn.makefile("rb")
        try:
            conn.sendall(b"220 primary.example.org ESMTP\r\n")
            while True:
                line = f.readline()
                if not line:
                    return
                cmd = line.decode(errors="replace").rstrip("\r\n")
                with self.lock:
                    self.commands.append((tls, cmd))
                verb = cmd.split(" ")[0].upper()
                if verb == "EHLO":
                    caps = ["primary.example.org", "8BITMIME"]
                    if self.offer and not tls:
                        caps.append("STARTTLS")
                    conn.sendall("".join(f"250{'-' if i < len(caps) - 1 else ' '}{c}\r\n" for i, c in enumerate(caps)).encode())
                elif verb == "STARTTLS" and self.offer and not tls and self.refuse:
                    conn.sendall(b"454 4.7.0 TLS not available due to local problem\r\n")
                elif verb == "STARTTLS" and self.offer and not tls:
                    extra = b"250-primary.example.org\r\n250 AUTH PLAIN\r\n" if self.inject else b""
                    conn.sendall(b"220 2.0.0 Ready to start TLS\r\n" + extra)
                    if self.broken:
                        conn.sendall(b"this is not TLS\r\n" * 4)
                        time.sleep(0.5)
                        return
                    t0 = time.monotonic()
                    conn = self.ctx.wrap_socket(conn, server_side=True)
                    self.handshakes.append(time.monotonic() - t0)
                    self.reused.append(conn.session_reused)
                    f = conn.makefile("rb")
                    tls = True
                elif verb == "DATA":
                    conn.sendall(b"354 go\r\n")
                    body = b""
                    while True:
                        l = f.readline()
                        if not l or l == b".\r\n":
                            break
                        body += l
                    with self.lock:
                        self.messages.append((tls, body))
                    conn.sendall(b"250 2.0.0 queued\r\n")
                elif verb == "QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n")
        except (OSError, ssl.SSLError):
            return
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def mail_commands(self):
        with self.lock:
            return [c for c in self.commands if c[1].upper().startswith(("MAIL", "RCPT", "DATA"))]

    def stop(self):
        self.stopped = True
        self.srv.close()


MSG = "From: a@sender.test\r\nTo: u@example.org\r\nSubject: tls\r\n\r\nhello over TLS\r\n"


class Base(unittest.TestCase):
    def setUp(self):
        self.cleanups = []

    def tearDown(self):
        for c in reversed(self.cleanups):
            try:
                c()
            except Exception:
                pass

    def relay(self, extra="", tls=None, status=None, start=True, **kw):
        r = Relay(extra=extra + "\n" + (tls if tls is not None else tls_section()), status=status, **kw)
        self.cleanups.append(r.cleanup)
        if start:
            r.start()
        return r

    def sink(self, port):
        s = Sink(port)
        self.cleanups.append(s.stop)
        return s

    def send_one(self, r, tls=True):
        c = TlsClient(r.port)
        self.cleanups.append(c.close)
        self.assertEqual(c.cmd("EHLO client.test")[0], 250)
        if tls:
            self.assertEqual(c.starttls()[0], 220)
            self.assertEqual(c.cmd("EHLO client.test")[0], 250)
        self.assertEqual(c.cmd("MAIL FROM:<a@sender.test>")[0], 250)
        self.assertEqual(c.cmd("RCPT TO:<u@example.org>")[0], 250)
        self.assertEqual(c.cmd("DATA")[0], 354)
        code, text = c.cmd(MSG + ".")
        self.assertEqual(code, 250, text)
        c.cmd("QUIT")
        return queued_id(text)


class Inbound(Base):
    def test_check_refuses_a_bad_or_mismatched_pair_naming_the_file(self):
        r = self.relay(tls=tls_section(key="stray.key"), start=False)
        p = r.cli("check")
        self.assertEqual(p.returncode, 78, p.stdout + p.stderr)
        self.assertIn(f"{C('stray.key')}: the key does not match the certificate in {C('mx-full.pem')}", p.stderr)
        r = self.relay(tls=tls_section(cert="nonexistent.pem"), start=False)
        p = r.cli("check")
        self.assertEqual(p.returncode, 78)
        self.assertIn(f"{C('nonexistent.pem')}: cannot read", p.stderr)
        r = self.relay(tls=tls_section(cert="mx.key", key="mx.key"), start=False)
        p = r.cli("check")
        self.assertEqual(p.returncode, 78)
        self.assertIn(f"{C('mx.key')}: no certificate", p.stderr)
        r = self.relay(start=False)
        p = r.cli("check")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("subject CN=backup.example.org, O=Before", p.stdout)
        self.assertIn(fingerprint(C("mx.pem")), p.stdout)

    def test_openssl_s_client_tls13_and_tls12_with_the_chain(self):
        r = self.relay()
        for ver, want in (("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")):
            p = subprocess.run(
                ["openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{r.port}", ver, "-CAfile", C("root.pem"),
                 "-verify_hostname", "backup.example.org", "-verify_return_error", "-showcerts", "-ign_eof"],
                input="EHLO client.test\r\nQUIT\r\n", capture_output=True, text=True, timeout=30)
            out = p.stdout + p.stderr
            self.assertIn("Verify return code: 0 (ok)", out)
            self.assertIn(f"New, {want}, Cipher is", out)
            # The chain: the leaf and the intermediate, as in the file.
            self.assertIn("0 s:CN = backup.example.org, O = Before", out)
            self.assertIn("1 s:CN = Bartleby Test Intermediate", out)
            self.assertEqual(out.count("-----BEGIN CERTIFICATE-----"), 2)
            # Inside TLS: EHLO again, STARTTLS not offered twice.
            after = p.stdout.rsplit("Verify return code: 0 (ok)", 1)[1]
            self.assertIn("250-backup.example.org", after)
            self.assertNotIn("STARTTLS", after)
        log = r.read_log()
        self.assertRegex(log, r"Anonymous TLS connection established from unknown\[127\.0\.0\.1\]: TLSv1\.3 with cipher TLS_AES_\d+_GCM_SHA\d+ \(\d+/\d+ bits\)")
        self.assertRegex(log, r"Anonymous TLS connection established from unknown\[127\.0\.0\.1\]: TLSv1\.2 with cipher ECDHE-ECDSA-")

    def test_session_starts_over_inside_tls(self):
        r = self.relay()
        c = TlsClient(r.port)
        self.cleanups.append(c.close)
        code, text = c.cmd("EHLO client.test")
        self.assertIn("250-STARTTLS", text)
        self.assertEqual(c.cmd("MAIL FROM:<a@sender.test>")[0], 250)
        self.assertEqual(c.cmd("STARTTLS x")[0], 501)
        self.assertEqual(c.starttls()[0], 220)
        # RFC 3207 4.2: the transaction and the EHLO before TLS are gone.
        self.assertEqual(c.cmd("MAIL FROM:<a@sender.test>")[0], 503)
        code, text = c.cmd("EHLO client.test")
        self.assertEqual(code, 250)
        self.assertNotIn("STARTTLS", text)
        # Postfix's reply to a second STARTTLS.
        self.assertEqual(c.cmd("STARTTLS"), (554, "554 5.5.1 Error: TLS already active"))
        # Strict CRLF and the line limit hold inside TLS.
        c.send("NOOP\n")
        c.send("NOOP\r\n")
        self.assertEqual(c.reply()[0], 500)
        self.assertEqual(c.reply()[0], 250)
        self.assertEqual(c.cmd("X" * 3000)[0], 500)
        self.assertEqual(c.cmd("NOOP"), (250, "250 2.0.0 Ok"))

    def test_plaintext_pipelined_after_starttls_is_never_answered(self):
        # CVE-2011-0411: "STARTTLS\r\nRSET\r\n" in one write. The RSET must
        # not be answered inside TLS (a MITM could inject commands that way).
        # Postfix purges such input after its 220 (vstream_fpurge); so here.
        r = self.relay()
        c = TlsClient(r.port)
        self.cleanups.append(c.close)
        c.cmd("EHLO client.test")
        c.send("STARTTLS\r\nMAIL FROM:<evil@sender.test>\r\n")
        code, text = c.reply()
        self.assertEqual(code, 220, text)
        self.assertEqual(c.buf, b"")
        c.sock = client_ctx().wrap_socket(c.sock, server_hostname="backup.example.org")
        # The first reply inside TLS is to our EHLO, not to the injected MAIL.
        code, text = c.cmd("EHLO client.test")
        self.assertEqual(code, 250)
        self.assertTrue(text.startswith("250-backup.example.org"), text)
        # And no transaction was started by it.
        self.assertEqual(c.cmd("RCPT TO:<u@example.org>")[0], 503)
        self.assertIn("plaintext pipelined after STARTTLS discarded", r.read_log())

    def test_garbage_instead_of_a_handshake(self):
        # Not TLS after the 220: the handshake fails, the session ends,
        # the relay goes on (Postfix logs "SSL_accept error from ...").
        r = self.relay()
        for junk in (b"EHLO again in clear\r\n", b"\x16\x03\x01\xff\xff" + b"\0" * 64, b"\x16\x03\x03\x00\x05\x01\x00\x00\x01\x00"):
            c = TlsClient(r.port)
            self.cleanups.append(c.close)
            c.cmd("EHLO client.test")
            self.assertEqual(c.cmd("STARTTLS")[0], 220)
            c.send(junk)
            self.assertTrue(c.closed(timeout=10), junk)
        wait_until(lambda: r.read_log().count("SSL_accept error from unknown[127.0.0.1]") == 3, 15, "three handshake errors logged")
        self.send_one(r)
        self.assertIsNone(r.proc.poll())

    def test_handshake_timeout_and_slot(self):
        # A client that says STARTTLS and never shakes hands holds its slot
        # (smtpd_client_connection_count_limit = 1 refuses a second one)
        # until command_timeout, then is cut off.
        r = self.relay(extra='command_timeout = "2s"\nsmtpd_client_connection_count_limit = 1')
        # The harness's probe of the port must be gone first.
        wait_until(lambda: "disconnect from" in r.read_log(), 15, "the start probe to disconnect")
        c = TlsClient(r.port)
        self.cleanups.append(c.close)
        c.cmd("EHLO client.test")
        self.assertEqual(c.cmd("STARTTLS")[0], 220)
        c2 = Client(r.port)
        self.cleanups.append(c2.close)
        self.assertEqual(c2.banner[0], 421)
        t0 = time.monotonic()
        self.assertTrue(c.closed(timeout=10))
        self.assertLess(time.monotonic() - t0, 6)
        wait_until(lambda: "timeout after STARTTLS from unknown[127.0.0.1]" in r.read_log(), 15, "the timeout logged")

    def test_swaks_tls_delivery_and_received_header(self):
        port = free_port()
        sink = self.sink(port)
        r = self.relay(primary_port=port)
        p = subprocess.run(["swaks", "--server", f"127.0.0.1:{r.port}", "--tls", "--tls-verify", "--tls-ca-path", C("root.pem"),
                            "--tls-sni", "backup.example.org", "--from", "a@sender.test", "--to", "u@example.org",
                            "--helo", "client.test", "--body", "hello via swaks"],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("TLS started with cipher", p.stdout)
        self.assertTrue(sink.wait_count(1, 30), r.read_log())
        msg = sink.messages()[0].decode(errors="replace")
        # Postfix's form (smtpd_tls_received_header) and RFC 3848's ESMTPS.
        self.assertRegex(msg, r"Received: from client\.test \(unknown \[127\.0\.0\.1\]\)\r?\n\t\(using TLSv1\.[23] with cipher \S+ \(\d+/\d+ bits\)\)\r?\n\tby backup\.example\.org \(Bartleby\) with ESMTPS id ")

    def test_certificate_swapped_on_disk_then_a_bad_pair_kept_out(self):
        d = tempfile.mkdtemp(prefix="bartleby-tls-swap-")
        self.cleanups.append(lambda: shutil.rmtree(d, ignore_errors=True))
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        shutil.copy(C("mx-full.pem"), cert)
        shutil.copy(C("mx.key"), key)
        sport = free_port()
        r = self.relay(tls=f'[tls]\ncertificate = "{cert}"\nkey = "{key}"\n',
                       status=f'[status]\nlisten = "127.0.0.1:{sport}"')
        wait_port(sport)

        def subject():
            c = TlsClient(r.port)
            try:
                c.cmd("EHLO client.test")
                c.starttls()
                return dict(x[0] for x in c.sock.getpeercert()["subject"]).get("organizationName")
            finally:
                c.close()

        def page(path="/"):
            with urllib.request.urlopen(f"http://127.0.0.1:{sport}{path}", timeout=10) as resp:
                return resp.read().decode()

        self.assertEqual(subject(), "Before")
        self.assertIn("O=Before", page())
        # A renewal: both files replaced (renamed into place, as certbot's
        # deploy hooks and cp do it), no restart.
        for src, dst in ((C("renewed-full.pem"), cert), (C("renewed.key"), key)):
            shutil.copy(src, dst + ".new")
            os.rename(dst + ".new", dst)
        wait_until(lambda: subject() == "Renewed", 10, "new connections to get the renewed certificate")
        self.assertIn("TLS: reloaded: now serving certificate", r.read_log())
        m = page("/metrics")
        exp = int(re.search(r"^bartleby_tls_certificate_expiry_seconds (\d+)$", m, re.M).group(1))
        end = subprocess.run(["openssl", "x509", "-in", C("renewed.pem"), "-noout", "-enddate"], capture_output=True, text=True).stdout
        self.assertEqual(exp, ssl.cert_time_to_seconds(end.strip().split("=", 1)[1]))
        self.assertIn("bartleby_tls_certificate_reload_failed 0", m)
        # 10 days left: the page warns (14 days ahead).
        html = page()
        self.assertIn('id="tls-expiry"', html)
        # A bad pair: a key that is not the certificate's. The renewed pair
        # stays in force; the log, the page and /metrics say so.
        shutil.copy(C("stray.key"), key + ".new")
        os.rename(key + ".new", key)
        wait_until(lambda: "the key does not match the certificate" in r.read_log(), 10, "the warning")
        self.assertRegex(r.read_log(), r"warning: TLS: .*key\.pem: the key does not match the certificate in .*cert\.pem .*; the certificate in force is kept")
        self.assertEqual(subject(), "Renewed")
        self.assertIn('id="tls-warning"', page())
        self.assertIn("bartleby_tls_certificate_reload_failed 1", page("/metrics"))
        # The good key back: the warning goes.
        shutil.copy(C("renewed.key"), key + ".new")
        os.rename(key + ".new", key)
        wait_until(lambda: 'id="tls-warning"' not in page(), 10, "the warning to clear")

    def test_no_certificate_no_starttls(self):
        r = self.relay(tls="[tls]\nprimary = \"none\"\n")
        c = Client(r.port)
        self.cleanups.append(c.close)
        self.assertNotIn("STARTTLS", c.cmd("EHLO client.test")[1])
        self.assertEqual(c.cmd("STARTTLS")[0], 502)


def postfix(test, name, extra):
    if not shutil.which("postfix"):
        test.skipTest("no postfix")
    import test_smtputf8
    if "tlsmgr" not in test_smtputf8.POSTFIX_MASTER_CF:
        # Postfix's TLS needs its tlsmgr (the PRNG and session caches).
        test_smtputf8.POSTFIX_MASTER_CF += "tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n"
    from test_smtputf8 import Postfix
    p = Postfix(name, extra)
    test.cleanups.append(p.stop)
    return p


class WithPostfix(Base):
    def test_postfix_sender_with_smtp_tls_security_level_encrypt(self):
        port = free_port()
        sink = self.sink(port)
        r = self.relay(primary_port=port)
        sender = postfix(self, "mx.sender.test",
                         f"relay_domains = example.org\ntransport_maps = inline:{{example.org=relay:[127.0.0.1]:{r.port}}}\n"
                         "smtpd_relay_restrictions = permit_mynetworks, reject\n"
                         "smtp_tls_security_level = encrypt\nsmtp_tls_loglevel = 1\n")
        import smtplib
        with smtplib.SMTP("127.0.0.1", sender.port, timeout=30) as s:
            s.sendmail("a@sender.test", ["u@example.org"], MSG.encode())
        self.assertTrue(sink.wait_count(1, 60), "not delivered; the sender says:\n" + sender.log())
        slog = sender.log()
        self.assertRegex(slog, r"TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:\d+: TLSv1\.3 with cipher")
        self.assertRegex(slog, r"to=<u@example\.org>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, .*status=sent")
        self.assertIn("with ESMTPS id", sink.messages()[0].decode(errors="replace"))

    def test_postfix_primary_with_tls_under_verify(self):
        primary = postfix(self, "primary.example.org",
                          "virtual_mailbox_domains = example.org\nvirtual_mailbox_base = {mail}\nvirtual_mailbox_maps = static:box\n"
                          "virtual_uid_maps = static:65534\nvirtual_gid_maps = static:65534\nvirtual_minimum_uid = 1\n"
                          f"smtpd_tls_security_level = may\nsmtpd_tls_cert_file = {C('primary.pem')}\n"
                          f"smtpd_tls_key_file = {C('primary.key')}\nsmtpd_tls_loglevel = 1\nsmtpd_tls_received_header = yes\n")
        r = self.relay(primary_port=primary.port, tls=tls_section(extra=f'primary = "verify"\nca_file = "{C("root.pem")}"\n'))
        self.send_one(r)
        box = wait_until(lambda: primary.mailbox(), 60, "delivery to the Postfix primary\n" + r.read_log())
        self.assertIn(b"hello over TLS", box)
        self.assertRegex(primary.log(), r"TLS connection established from .*\[127\.0\.0\.1\]: TLSv1\.3 with cipher")
        self.assertRegex(box.decode(errors="replace"), r"\(using TLSv1\.3 with cipher \S+ \(\d+/\d+ bits\)")
        log = r.read_log()
        self.assertRegex(log, r"Verified TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:\d+: TLSv1\.3 with cipher")
        self.assertRegex(log, r"to=<u@example\.org>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, .*status=sent")


class Outbound(Base):
    def primary(self, **kw):
        port = free_port()
        p = TlsPrimary(port, **kw)
        self.cleanups.append(p.stop)
        return p

    def deferred(self, r, pattern):
        r.flush()
        wait_until(lambda: re.search(pattern, r.read_log()), 20, f"{pattern} in the log\n{r.read_log()}")
        self.assertEqual(len(r.queue_ids()), 1, "the message must stay queued")

    def test_verify_with_a_certificate_from_another_ca_defers_never_in_clear(self):
        p = self.primary(cert=C("impostor.pem"), key=C("impostor.key"))
        r = self.relay(primary_port=p.port, tls=tls_section(extra=f'primary = "verify"\nca_file = "{C("root.pem")}"\n'))
        self.send_one(r)
        self.deferred(r, r"status=deferred \(421 4\.7\.5 Server certificate not trusted \(host 127\.0\.0\.1\[127\.0\.0\.1\]:\d+")
        self.assertIn("Untrusted TLS connection established to 127.0.0.1[127.0.0.1]", r.read_log())
        # Not a single MAIL/RCPT/DATA was sent, in TLS or in clear.
        self.assertEqual(p.mail_commands(), [])
        # Inside TLS only QUIT (each attempt ends politely, as Postfix's).
        inside = [c for tls, c in p.commands if tls]
        self.assertTrue(inside and all(c == "QUIT" for c in inside), p.commands)

    def test_verify_by_fingerprint(self):
        p = self.primary(cert=C("impostor.pem"), key=C("impostor.key"))
        r = self.relay(primary_port=p.port, tls=tls_section(extra=f'primary = "verify"\nprimary_fingerprint = "{fingerprint(C("primary.pem"))}"\n'))
        self.send_one(r)
        self.deferred(r, r"status=deferred \(421 4\.7\.5 Server certificate not trusted")
        self.assertEqual(p.mail_commands(), [])
        # The pinned certificate itself: delivered, inside TLS only.
        p2 = self.primary(cert=C("primary.pem"), key=C("primary.key"))
        r2 = self.relay(primary_port=p2.port, tls=tls_section(extra=f'primary = "verify"\nprimary_fingerprint = "{fingerprint(C("primary.pem"))}"\n'))
        self.send_one(r2)
        wait_until(lambda: p2.messages, 20, "delivery\n" + r2.read_log())
        # A second connection resumes the TLS session (a full handshake
        # costs a 486 about a second) and is verified just the same.
        self.send_one(r2)
        wait_until(lambda: len(p2.messages) == 2, 20, "the second delivery\n" + r2.read_log())
        self.assertTrue(all(tls for tls, _ in p2.mail_commands()))
        self.assertEqual(r2.read_log().count("Verified TLS connection established"), 2)
        self.assertTrue(p2.reused[-1], "the second connection did not resume the TLS session")

    def test_encrypt_with_a_primary_without_starttls_defers(self):
        p = self.primary(offer=False)
        r = self.relay(primary_port=p.port, tls=tls_section(extra='primary = "encrypt"\n'))
        self.send_one(r)
        self.deferred(r, r"status=deferred \(421 4\.7\.4 TLS is required, but was not offered by host 127\.0\.0\.1\[127\.0\.0\.1\]:\d+\)")
        self.assertEqual(p.mail_commands(), [])

    def test_encrypt_with_any_certificate_is_sent_in_tls(self):
        p = self.primary(cert=C("impostor.pem"), key=C("impostor.key"))
        r = self.relay(primary_port=p.port, tls=tls_section(extra='primary = "encrypt"\n'))
        self.send_one(r)
        wait_until(lambda: p.messages, 20, "delivery\n" + r.read_log())
        self.assertTrue(all(tls for tls, _ in p.mail_commands()))
        self.assertIn("Untrusted TLS connection established to 127.0.0.1[127.0.0.1]", r.read_log())

    def test_may_after_a_failed_handshake_tries_again_in_clear(self):
        # Postfix under "may": RETRY_AS_PLAINTEXT (smtp_proto.c).
        p = self.primary(cert=C("primary.pem"), key=C("primary.key"), broken=True)
        r = self.relay(primary_port=p.port, tls=tls_section(extra='primary = "may"\n'))
        self.send_one(r)
        wait_until(lambda: p.messages, 20, "delivery in clear\n" + r.read_log())
        self.assertIn("SSL_connect error to 127.0.0.1[127.0.0.1]", r.read_log())
        self.assertFalse(p.messages[0][0])

    def test_a_reply_injected_after_the_220_to_starttls_is_never_read(self):
        # A MITM's (or a broken primary's) plaintext pipelined after "220
        # Ready to start TLS": thrown away with the buffer, never taken as
        # the reply to the EHLO inside TLS (Postfix purges it too). Had it
        # been kept it would have been read as TLS records (a failed
        # handshake) or as the EHLO's reply (replies off by one).
        p = self.primary(cert=C("primary.pem"), key=C("primary.key"), inject=True)
        r = self.relay(primary_port=p.port, tls=tls_section(extra='primary = "encrypt"\n'))
        self.send_one(r)
        wait_until(lambda: p.messages, 20, "delivery\n" + r.read_log())
        self.assertTrue(p.messages[0][0], "delivered inside TLS")
        self.assertTrue(all(tls for tls, _ in p.mail_commands()), p.commands)
        wait_until(lambda: "status=sent" in r.read_log(), 10, "status=sent\n" + r.read_log())

    def test_starttls_refused_with_454_defers_under_encrypt_and_goes_in_clear_under_may(self):
        # Postfix: under "encrypt" such a host is skipped (the mail waits);
        # under "may" the session goes on in clear.
        p = self.primary(cert=C("primary.pem"), key=C("primary.key"), refuse=True)
        r = self.relay(primary_port=p.port, tls=tls_section(extra='primary = "encrypt"\n'))
        self.send_one(r)
        self.deferred(r, r"status=deferred \(421 4\.7\.5 TLS is required, but host 127\.0\.0\.1\[127\.0\.0\.1\]:\d+ refused to start TLS: 454 4\.7\.0")
        self.assertEqual(p.mail_commands(), [])
        p2 = self.primary(cert=C("primary.pem"), key=C("primary.key"), refuse=True)
        r2 = self.relay(primary_port=p2.port, tls=tls_section(extra='primary = "may"\n'))
        self.send_one(r2)
        wait_until(lambda: p2.messages, 20, "delivery in clear\n" + r2.read_log())
        self.assertFalse(p2.messages[0][0])

    def test_encrypt_after_a_failed_handshake_defers(self):
        p = self.primary(cert=C("primary.pem"), key=C("primary.key"), broken=True)
        r = self.relay(primary_port=p.port, tls=tls_section(extra='primary = "encrypt"\n'))
        self.send_one(r)
        self.deferred(r, r"status=deferred \(421 4\.7\.5 Cannot start TLS: handshake failure with host 127\.0\.0\.1\[127\.0\.0\.1\]")
        self.assertEqual(p.mail_commands(), [])


def main():
    global CERTS
    harness.take_binary_arg()
    CERTS = make_certs()
    try:
        res = unittest.main(exit=False, verbosity=2).result
    finally:
        shutil.rmtree(CERTS, ignore_errors=True)
    harness.report("tls", res)


if __name__ == "__main__":
    main()
