"""The config-abuse matrix: `bartleby check -c FILE` and `bartleby serve -c FILE`
over hostile configuration files (huge, binary, BOM/CRLF, out-of-range
numbers, empty/relative paths, a self-loop primary, a FIFO ...).

Rule asserted for every refusal: exit status 78 (EX_CONFIG), a message naming
the file and the line (`FILE:LINE: ...`) and the key, no panic, no hang (every
run has a timeout). Accepted files must give the values TOML gives them.

Postfix anchors: Postfix's daemons refuse an out-of-range number with
"fatal: bad numerical configuration: NAME = VALUE" (get_mail_conf_int/long
check a min and a max per parameter); main.cf lines may end in CRLF; a
leading UTF-8 BOM is NOT skipped by Postfix (`postconf -n` warns "unused
parameter: \\ufeffmyhostname"), which is worse than what we do: a file
saved by Notepad works here.

Run: python3 tests/relay/test_config_abuse.py [path/to/bartleby]
Env: BARTLEBY_WRAP="qemu-i386 -cpu 486" runs the check rows with the i486
binary under user-mode QEMU (32-bit usize).
"""

import http.client
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Client, free_port, wait_port  # noqa: E402

WRAP = shlex.split(os.environ.get("BARTLEBY_WRAP", ""))
TIMEOUT = 10  # seconds for any one check/serve run; "never hang"

# `listen` and `primary` ports of the base config: free ports, and never equal
# (an equal pair is the self-loop row).
LPORT = free_port()
PPORT = free_port()
while PPORT == LPORT:
    PPORT = free_port()


def base_lines(spool, q='"'):
    """The five lines every row starts from (lines 1..5)."""
    return [
        f"hostname = {q}backup.example.org{q}",
        f"listen = [{q}127.0.0.1:{LPORT}{q}]",
        f"spool = {q}{spool}{q}",
        f"relay_domains = [{q}example.org{q}]",
        f"primary = {q}127.0.0.1:{PPORT}{q}",
    ]


def run(args, timeout=TIMEOUT, wrap=True):
    """Runs bartleby; returns (rc, stdout, stderr, seconds). rc None = timed out."""
    cmd = (WRAP if wrap else []) + [harness.BINARY] + args
    t = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=timeout)
        return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"), time.monotonic() - t
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace")
        err = (e.stderr or b"").decode(errors="replace")
        return None, out, err, time.monotonic() - t


class Base(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="bartleby-cfgabuse-")
        self.spool = os.path.join(self.dir, "spool")
        self.path = os.path.join(self.dir, "bartleby.toml")
        self.procs = []
        self.mounts = []

    def tearDown(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for m in self.mounts:
            subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -------------------------------------------------------------- helpers
    def write(self, data):
        if isinstance(data, str):
            data = data.encode()
        with open(self.path, "wb") as f:
            f.write(data)
        return self.path

    def base(self, extra=(), q='"'):
        return "\n".join(base_lines(self.spool, q) + list(extra)) + "\n"

    def assert_refused(self, line, *words, serve=True, max_secs=None):
        """check (and serve) must exit 78 naming FILE:LINE: and every word."""
        rc, out, err, secs = run(["check", "-c", self.path])
        where = f"{self.path}:{line}:" if line else f"{self.path}:"
        msg = f"check rc={rc} after {secs:.2f}s\nstdout: {out[-600:]}\nstderr: {err[-600:]}"
        self.assertIsNotNone(rc, "check hung: " + msg)
        self.assertNotIn("panicked", err, msg)
        self.assertEqual(rc, 78, msg)
        self.assertIn(where, err, msg)
        for w in words:
            self.assertIn(w, err, msg)
        if max_secs is not None:
            self.assertLess(secs, max_secs, msg)
        if serve:
            rc, out, err, secs = run(["serve", "-c", self.path], wrap=False)
            msg = f"serve rc={rc} after {secs:.2f}s\nstderr: {err[-600:]}"
            self.assertIsNotNone(rc, "serve did not refuse (still running): " + msg)
            self.assertEqual(rc, 78, msg)
            self.assertIn(where, err, msg)
            self.assertNotIn("panicked", err, msg)
        return err

    def assert_ok(self, *words):
        rc, out, err, secs = run(["check", "-c", self.path])
        msg = f"check rc={rc} after {secs:.2f}s\nstdout: {out[-600:]}\nstderr: {err[-600:]}"
        self.assertEqual(rc, 0, msg)
        self.assertIn(": OK: ", out, msg)
        for w in words:
            self.assertIn(w, out, msg)
        return out, secs

    def serve(self, status_port=None):
        log = open(os.path.join(self.dir, "serve.log"), "wb")
        p = subprocess.Popen([harness.BINARY, "serve", "-c", self.path], stdout=log, stderr=log)
        self.procs.append(p)
        if not wait_port(LPORT, timeout=TIMEOUT):
            p.kill()
            p.wait()
            self.fail("relay did not start:\n" + self.serve_log())
        if status_port:
            self.assertTrue(wait_port(status_port, timeout=TIMEOUT), self.serve_log())
        return p

    def serve_log(self):
        with open(os.path.join(self.dir, "serve.log"), errors="replace") as f:
            return f.read()

    def stop(self, p):
        p.terminate()
        self.assertEqual(p.wait(timeout=15), 0, self.serve_log())


# ------------------------------------------------------------------ the matrix
# Out-of-range values, one row each: (key, value as written, words expected).
# Values above 2^32 are the ones a `u64 as usize` truncates on the i486 build
# (4294967396 -> 100, 4294967297 -> 1): they must be refused on u64 before any
# narrowing. Postfix: "fatal: bad numerical configuration".
NUMERIC = [
    ("max_message_size", '"99999999999G"', "max_message_size"),  # overflow: was SIZE 18446744073709551615
    ("max_message_size", '"2G"', "max_message_size"),
    ("max_message_size", "1073741825", "max_message_size"),
    ("max_message_size", "4294967296", "max_message_size"),
    ("max_message_size", "1000", "max_message_size"),
    ("max_connections", "4294967297", "max_connections"),
    ("max_connections", "10001", "max_connections"),
    ("max_connections", "0", "max_connections"),
    ("max_recipients", "4294967396", "max_recipients"),
    ("max_recipients", "1001", "max_recipients"),
    ("max_line_length", "1000000000000", "max_line_length"),  # was: 100 MB per command line
    ("max_line_length", "4294967808", "max_line_length"),
    ("max_line_length", "65537", "max_line_length"),
    ("error_limit", "4294967297", "error_limit"),
    ("error_limit", "1001", "error_limit"),
    ("error_limit", "0", "error_limit"),
    ("max_received_headers", "4294967346", "max_received_headers"),
    ("max_received_headers", "1001", "max_received_headers"),
    ("max_received_headers", "0", "max_received_headers"),
    ("min_data_rate", '"2G"', "min_data_rate"),
    ("min_data_rate", "4294967296000", "min_data_rate"),
    ("min_free_space", '"99999999999G"', "min_free_space"),
    ("min_free_space", '"1048577G"', "min_free_space"),
    ("max_queue_messages", "4294967297", "max_queue_messages"),
    ("max_queue_messages", "100001", "max_queue_messages"),
    ("max_queue_messages", "0", "max_queue_messages"),
    ("delivery_connections", "4294967297", "delivery_connections"),
    ("delivery_connections", "65", "delivery_connections"),
    ("delivery_connections", "0", "delivery_connections"),
    ("command_timeout", '"2h"', "command_timeout"),
    ("data_timeout", '"2h"', "data_timeout"),
    ("delivery_timeout", '"2h"', "delivery_timeout"),
    ("connect_timeout", '"11m"', "connect_timeout"),
    ("queue_run_interval", '"2d"', "queue_run_interval"),
    ("max_queue_lifetime", '"101d"', "max_queue_lifetime"),
    ("maximal_backoff", '"3651d"', "maximal_backoff"),
    ("max_connections", "-1", "max_connections"),
    ("max_connections", "99999999999999999999", "max_connections"),  # beyond i64
]


def _numeric(key, value, word):
    def t(self):
        self.write(self.base([f"{key} = {value}"]))
        self.assert_refused(6, word)
    return t


class Ranges(Base):
    pass


for i, (k, v, w) in enumerate(NUMERIC):
    setattr(Ranges, f"test_range_{i:02d}_{k}_{v.strip(chr(34))}", _numeric(k, v, w))

# Bad strings/paths: (line to add, or a replacement of a base line, line, words).
PATHS = [
    ('spool = ""', "spool"),
    ('spool = "var/spool/bartleby"', "spool"),
    ('spool = "/"', "spool"),
    ('recipients = "recipients.txt"', "recipients"),
    ('log_file = "bartleby.log"', "log_file"),
]


def _path(line, word):
    def t(self):
        lines = base_lines(self.spool)
        if line.startswith("spool"):
            lines[2] = line
            self.write("\n".join(lines) + "\n")
            self.assert_refused(3, word)
        else:
            self.write(self.base([line]))
            self.assert_refused(6, word)
    return t


class Paths(Base):
    pass


for i, (l, w) in enumerate(PATHS):
    setattr(Paths, f"test_path_{i}_{w}", _path(l, w))


class Rows(Base):
    # ---------------------------------------------------------- size and time
    def test_huge_file_refused_fast(self):
        # 2 MiB of comments: refused before parsing, naming the file
        self.write(self.base() + ("# " + "x" * 1000 + "\n") * 2100)
        err = self.assert_refused(0, "1 MiB", max_secs=3)
        self.assertIn("too large", err)

    def test_100000_line_array_is_linear(self):
        # a 100,000-line array (comments, blank lines, CRLF) around 3 entries:
        # the old lexer rescanned the whole array at every line (minutes)
        body = "relay_domains = [\n" + "# filler\r\n\n" * 50000 + '"a.org",\n"b.org", # two\n"c.org"\n]\n'
        lines = base_lines(self.spool)
        del lines[3]
        self.write("\n".join(lines) + "\n" + body)
        out, secs = self.assert_ok("a.org, b.org, c.org")
        self.assertLess(secs, 2.0, f"took {secs:.2f}s")

    def test_100000_entry_array_refused_fast(self):
        lines = base_lines(self.spool)
        del lines[3]
        body = "relay_domains = [\n" + "".join(f'"{i}",\n' for i in range(100000)) + "]\n"
        self.write("\n".join(lines) + "\n" + body)
        self.assert_refused(5, "relay_domains", "1000", max_secs=2)

    def test_nested_array_bomb_no_stack_overflow(self):
        # 500,000 `[`: a recursive parser overflows PID 1's stack (abort)
        self.write(self.base(["relay_domains = " + "[" * 200000 + "]" * 200000]))
        self.assert_refused(6, "relay_domains", "nested", max_secs=3)

    def test_many_unknown_keys_stop_at_first(self):
        # 1 MiB of `a = 1`: the first unknown key ends it (no 250,000-item list)
        self.write(self.base() + "a = 1\n" * 170000)
        self.assert_refused(6, "unknown key", max_secs=2)

    def test_many_duplicate_keys_fast(self):
        self.write(self.base() + "".join(f"# {i}\n" for i in range(100000)) + 'hostname = "x.org"\n')
        self.assert_refused(100006, "hostname", "twice", max_secs=2)

    # ---------------------------------------------------------- bytes
    def test_binary_garbage(self):
        rnd = random.Random(10)
        for n in range(20):
            data = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 4000)))
            self.write(data)
            rc, out, err, secs = run(["check", "-c", self.path])
            self.assertEqual(rc, 78, f"case {n}: rc={rc} {err[-300:]}")
            self.assertIn(f"{self.path}:", err)
            self.assertNotIn("panicked", err)

    def test_nul_byte_names_line(self):
        self.write(self.base(['log_level = "info"', "# a comment \x00 with NUL"]))
        self.assert_refused(7, "NUL")

    def test_nul_in_value_names_line(self):
        self.write(self.base(['log_level = "in\x00fo"']))
        self.assert_refused(6, "NUL")

    def test_invalid_utf8_names_line(self):
        self.write(self.base().encode() + b'log_file = "/tmp/caf\xe9.log"\n')
        self.assert_refused(6, "UTF-8")

    def test_bom_is_skipped(self):
        # Notepad's BOM on the FAT partition: accepted; before, line 1 said
        # "`\ufeffhostname` is not a valid key" with the BOM invisible
        self.write(b"\xef\xbb\xbf" + self.base().encode())
        self.assert_ok("backup.example.org relaying for example.org")

    def test_bom_then_error_keeps_line_numbers(self):
        self.write(b"\xef\xbb\xbf" + self.base(["mystery = 1"]).encode())
        self.assert_refused(6, "mystery")

    def test_crlf_everywhere(self):
        lines = base_lines(self.spool)
        del lines[3]
        text = "\r\n".join(["# comment\t", *lines, 'relay_domains = [ # inline comment', '  "a.org",  # one', "", '  "b.org"', "]", "[status] # page", 'allow = ["127.0.0.1/32"]']) + "\r\n"
        self.write(text)
        self.assert_ok("relaying for a.org, b.org to 127.0.0.1")

    def test_lone_cr_names_line(self):
        self.write(self.base(['log_level = "info"\rmax_connections = 5']))
        self.assert_refused(6, "CR")

    def test_cr_inside_string(self):
        self.write(self.base(['log_file = "/tmp/a\rb"']))
        self.assert_refused(6, "CR")

    # ---------------------------------------------------------- TOML forms
    def test_single_quotes_everywhere(self):
        q = "'"
        text = self.base(
            [
                "etrn_allow = ['127.0.0.1/32']",
                "log_level = 'info'",
                "bare_newline = 'reject'",
                "queue_run_interval = '30m'",
                "max_message_size = '10M'",
                "[network]",
                "interface = 'eth0'",
                "address = '192.168.1.20/24'",
                "gateway = '192.168.1.1'",
                "dns = ['192.168.1.1', '9.9.9.9']",
            ],
            q=q,
        )
        self.write(text)
        self.assert_ok("backup.example.org relaying for example.org to 127.0.0.1")
        # the relay uses the unquoted path (init reads it with the same parser)
        p = self.serve()
        self.assertTrue(os.path.isdir(os.path.join(self.spool, "queue")), os.listdir(self.dir))
        self.assertFalse(any("'" in n for n in os.listdir(self.dir)), os.listdir(self.dir))
        c = Client(LPORT)
        code, text = c.cmd("EHLO client.test")
        self.assertIn("SIZE 10485760", text)
        c.cmd("QUIT")
        c.close()
        self.stop(p)

    def test_network_values_checked(self):
        for line, word in [
            ("address = '192.168.1.20'", "address"),
            ("address = '192.168.1.20/33'", "address"),
            ("gateway = 'fe80::1'", "IPv4"),
            ("interface = 'averyveryverylongname0'", "interface"),
        ]:
            self.write(self.base(["[network]", line]))
            self.assert_refused(7, word, serve=False)

    def test_unknown_key_and_table(self):
        self.write(self.base(["relay_domain = ['x.org']"]))
        self.assert_refused(6, "unknown key `relay_domain`")
        self.write(self.base(["[mystery]"]))
        self.assert_refused(6, "unknown table", serve=False)

    def test_duplicate_key_and_table(self):
        self.write(self.base(["hostname = 'x.example.org'"]))
        self.assert_refused(6, "hostname", "twice")
        self.write(self.base(["[status]", "[status]"]))
        self.assert_refused(7, "status", "twice", serve=False)

    def test_unclosed_string_and_array(self):
        self.write(self.base(["log_file = '/tmp/x.log"]))
        self.assert_refused(6, "log_file", "not closed")
        self.write(self.base(["etrn_allow = ['127.0.0.1/32',", "# never closed"]))
        self.assert_refused(6, "etrn_allow", "not closed", serve=False)

    def test_size_advertised_is_the_configured_one(self):
        # the largest value accepted is advertised as is
        self.write(self.base(['max_message_size = "1G"']))
        self.assert_ok()
        p = self.serve()
        c = Client(LPORT)
        code, text = c.cmd("EHLO client.test")
        self.assertIn("SIZE 1073741824", text)
        c.cmd("QUIT")
        c.close()
        self.stop(p)

    # ---------------------------------------------------------- self-loop
    def test_self_loop_by_hostname(self):
        lines = base_lines(self.spool)
        lines[4] = 'primary = "Backup.Example.org.:25"'
        self.write("\n".join(lines) + "\n")
        self.assert_refused(5, "primary", "Bartleby itself")

    def test_self_loop_same_address(self):
        lines = base_lines(self.spool)
        lines[4] = f'primary = "127.0.0.1:{LPORT}"'
        self.write("\n".join(lines) + "\n")
        self.assert_refused(5, "primary", "listen")

    def test_self_loop_wildcard_listen(self):
        for listen, primary in [
            (f"0.0.0.0:{LPORT}", f"127.0.0.5:{LPORT}"),
            (f"[::]:{LPORT}", f"[::1]:{LPORT}"),
            (f"[::]:{LPORT}", f"127.0.0.1:{LPORT}"),
            (f"0.0.0.0:{LPORT}", f"localhost:{LPORT}"),
        ]:
            lines = base_lines(self.spool)
            lines[1] = f'listen = ["{listen}"]'
            lines[4] = f'primary = "{primary}"'
            self.write("\n".join(lines) + "\n")
            self.assert_refused(5, "primary", serve=False)

    def test_self_loop_local_address(self):
        # a non-loopback address of this machine, with 0.0.0.0 listening
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.connect(("192.0.2.1", 9))
            local = s.getsockname()[0]
        except OSError:
            self.skipTest("no non-loopback IPv4 address")
        finally:
            s.close()
        lines = base_lines(self.spool)
        lines[1] = f'listen = ["0.0.0.0:{LPORT}"]'
        lines[4] = f'primary = "{local}:{LPORT}"'
        self.write("\n".join(lines) + "\n")
        self.assert_refused(5, "primary", serve=False)

    def test_not_a_loop(self):
        lines = base_lines(self.spool)
        lines[1] = f'listen = ["0.0.0.0:{LPORT}"]'
        lines[4] = f'primary = "127.0.0.1:{PPORT}"'
        self.write("\n".join(lines) + "\n")
        self.assert_ok()

    # ---------------------------------------------------------- file types
    def test_directory_as_config(self):
        os.mkdir(self.path)
        err = self.assert_refused(0, "directory")
        self.assertIn(self.path, err)

    def test_fifo_as_config_does_not_hang(self):
        os.mkfifo(self.path)
        err = self.assert_refused(0, "not a regular file", max_secs=3)
        self.assertIn(self.path, err)

    def test_missing_config(self):
        err = self.assert_refused(0, "cannot read")
        self.assertIn(self.path, err)


class Persistence(Base):
    """The page's and /metrics' "persistent spool" is a fact: statfs(2) of the
    spool directory (tmpfs/ramfs = RAM), not a flag."""

    def metrics(self, port):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/metrics")
        r = c.getresponse()
        body = r.read().decode()
        c.close()
        self.assertEqual(r.status, 200, body)
        for line in body.splitlines():
            if line.startswith("bartleby_persistent_spool "):
                return line.split()[1]
        self.fail("no bartleby_persistent_spool in /metrics:\n" + body)

    def page(self, port):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/")
        r = c.getresponse()
        body = r.read().decode()
        c.close()
        return body

    def start(self):
        sport = free_port()
        self.write(self.base(["[status]", f'listen = "127.0.0.1:{sport}"', 'allow = ["127.0.0.1/32"]']))
        return self.serve(sport), sport

    def test_spool_on_tmpfs_is_not_persistent(self):
        if os.geteuid() != 0:
            self.skipTest("needs root to mount a tmpfs")
        mnt = os.path.join(self.dir, "ram")
        os.mkdir(mnt)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mnt], check=True)
        self.mounts.append(mnt)
        self.spool = os.path.join(mnt, "spool")  # does not exist yet
        p, sport = self.start()
        self.assertEqual(self.metrics(sport), "0")
        self.assertIn("not persistent", self.page(sport))
        log = self.serve_log()
        self.assertRegex(log, r"warning: .*" + self.spool + r".*tmpfs")
        self.stop(p)

    def test_spool_on_disk_is_persistent(self):
        fstype = subprocess.run(["stat", "-f", "-c", "%T", self.dir], capture_output=True, text=True).stdout.strip()
        if fstype in ("tmpfs", "ramfs"):
            self.skipTest(f"{self.dir} is on {fstype}")
        p, sport = self.start()
        self.assertEqual(self.metrics(sport), "1")
        self.assertNotIn("not persistent", self.page(sport))
        self.assertNotIn("tmpfs", self.serve_log())
        self.stop(p)


def main():
    harness.take_binary_arg()
    suite = unittest.TestSuite()
    for case in (Ranges, Paths, Rows, Persistence):
        suite.addTests(unittest.defaultTestLoader.loadTestsFromTestCase(case))
    harness.report("config_abuse", unittest.TextTestRunner(verbosity=2).run(suite))


if __name__ == "__main__":
    main()
