"""Test harness: start the relay with a config, a Postfix smtp-sink as the
primary, talk SMTP over raw sockets. Loopback only; ports chosen free."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.environ.get("BARTLEBY", os.path.join(ROOT, "target", "release", "bartleby"))


_PORTS_GIVEN = set()
_PORTS_LOCK = threading.Lock()


def _ephemeral_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
            return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port():
    """A port free now, below the kernel's ephemeral range, and never handed
    out before by this process. Below the ephemeral range, because a port
    from bind(0) can be taken as the source port of any outgoing connection
    before the server meant for it binds (smtp-sink then dies with "Address
    already in use"); never twice, because tests run side by side
    (test_hostile_primary.py)."""
    import random
    lo, _ = _ephemeral_range()
    with _PORTS_LOCK:
        for _ in range(1000):
            port = random.randrange(max(1024, lo - 12000), lo) if lo > 2048 else 0
            if port in _PORTS_GIVEN:
                continue
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
                port = s.getsockname()[1]
            except OSError:
                continue
            finally:
                s.close()
            if port not in _PORTS_GIVEN:
                _PORTS_GIVEN.add(port)
                return port
        raise RuntimeError("no free port")


def wait_for(cond, timeout=10.0, step=0.05):
    """Polls cond() until it is truthy or `timeout` seconds pass; returns
    its last value (so a test can assert on it)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(step)
    return cond()


def wait_until(pred, timeout, what):
    """wait_for, failing the test with "timed out waiting for WHAT"."""
    v = wait_for(pred, timeout)
    if not v:
        raise AssertionError(f"timed out waiting for {what}")
    return v


def wait_port(port, host="127.0.0.1", timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def proc_status(pid):
    """VmRSS, VmHWM, Threads of a process, in kB / count."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "VmSize", "Threads"):
                out[k] = int(v.split()[0])
    return out


class Relay:
    """A bartleby server in a temp dir."""

    def __init__(self, primary_port=None, extra="", recipients=None, status=None):
        self.dir = tempfile.mkdtemp(prefix="bartleby-test-")
        self.port = free_port()
        self.primary_port = primary_port or free_port()
        self.spool = os.path.join(self.dir, "spool")
        self.log = os.path.join(self.dir, "bartleby.log")
        self.config = os.path.join(self.dir, "bartleby.toml")
        lines = [
            'hostname = "backup.example.org"',
            f'listen = ["127.0.0.1:{self.port}"]',
            f'spool = "{self.spool}"',
            'relay_domains = ["example.org", "example.net"]',
            f'primary = "127.0.0.1:{self.primary_port}"',
            'minimal_backoff = "5m"',
            'maximal_backoff = "1h"',
            'min_free_space = "1M"',
        ]
        if recipients is not None:
            rpath = os.path.join(self.dir, "recipients")
            with open(rpath, "w") as f:
                f.write("\n".join(recipients) + "\n")
            lines.append(f'recipients = "{rpath}"')
        lines.append(extra)
        if status:
            lines.append(status)
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.proc = None

    def start(self, wait=True):
        self.logf = open(self.log, "ab")
        self.proc = subprocess.Popen([BINARY, "serve", "-c", self.config], stdout=self.logf, stderr=self.logf)
        if wait and not wait_port(self.port):
            raise RuntimeError("relay did not start:\n" + self.read_log())
        return self

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self):
        self.stop(signal.SIGKILL)

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def read_log(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def cli(self, *args, check=False):
        return subprocess.run([BINARY, *args, "-c", self.config], capture_output=True, text=True, timeout=30, check=check)

    def mailq(self):
        return self.cli("mailq").stdout

    def flush(self):
        return self.cli("flush")

    def queue_ids(self):
        q = os.path.join(self.spool, "queue")
        return sorted(os.listdir(q)) if os.path.isdir(q) else []

    def wait_empty(self, timeout=30.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.queue_ids():
                return True
            time.sleep(0.1)
        return False


class Sink:
    """Postfix's smtp-sink as the primary, writing each message to a file."""

    def __init__(self, port, extra_args=()):
        self.port = port
        self.dir = tempfile.mkdtemp(prefix="bartleby-sink-")
        os.chmod(self.dir, 0o777)
        self.proc = subprocess.Popen(
            ["smtp-sink", "-u", "nobody", *extra_args, "-d", self.dir + "/%M.", f"127.0.0.1:{port}", "64"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not wait_port(port):
            raise RuntimeError("smtp-sink did not start")

    def files(self):
        """The messages received whole: smtp-sink creates a message's file
        when the transaction starts and closes it at the end of data, so a
        file it still holds open is left out (read in this order: a file
        made after the listing is not in it)."""
        out = []
        for root, _, names in os.walk(self.dir):
            for n in names:
                out.append(os.path.join(root, n))
        writing = set()
        fds = f"/proc/{self.proc.pid}/fd"
        try:
            for fd in os.listdir(fds):
                try:
                    writing.add(os.readlink(os.path.join(fds, fd)))
                except OSError:
                    pass
        except OSError:
            pass
        return sorted(p for p in out if p not in writing)

    def messages(self):
        res = []
        for p in self.files():
            with open(p, "rb") as f:
                res.append(f.read())
        return res

    def wait_count(self, n, timeout=30.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(self.files()) >= n:
                return True
            time.sleep(0.1)
        return False

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


class Silent:
    """A FakePrimary action: say nothing more and read nothing more; hold the
    connection open until the client drops it (or the fake stops)."""

    def __repr__(self):
        return "Silent()"


class Close:
    """A FakePrimary action: close the connection at once."""

    def __repr__(self):
        return "Close()"


class Endless:
    """A FakePrimary action: write `chunk` again and again until the client
    goes away or `limit` bytes are out (an endless reply, or with a chunk
    without LF, an endless line)."""

    def __init__(self, chunk, limit=64 << 20):
        self.chunk = chunk if isinstance(chunk, bytes) else chunk.encode()
        self.limit = limit

    def __repr__(self):
        return f"Endless({self.chunk[:12]!r}...)"


class FakePrimary:
    """A scripted primary for what smtp-sink cannot do: wrong codes, wrong
    classes, extra lines, silence, endless replies, closing at any step.

    `replies` maps a command verb ("EHLO", "MAIL", "RCPT", "DATA", "RSET",
    "QUIT", ...), "greeting" or "end" (the reply to the end-of-data line) to
    what the fake answers. "RCPT#2" (1-based, counted from MAIL) overrides
    "RCPT" for one recipient. An answer is:
      * a str: written with CR LF appended (it may hold CR LF itself, for
        several lines);
      * bytes: written exactly as given (partial lines, bare LF, binary);
      * Silent(), Close(), Endless(chunk): see those classes;
      * a list of the above, done in order.
    Anything unlisted gets a plain success. With `pipelining`, the default
    EHLO reply offers PIPELINING (and 8BITMIME). `replies` may instead be a
    function of the connection number returning (replies, pipelining).

    The fake enters DATA mode when its answer to DATA holds a line starting
    with 354. Serves connections one after another on a thread. Records:
    `commands` (every command line), `messages` (the data of each DATA,
    complete or not), `acked` (the data of each message it read up to the
    end-of-data line and answered with a 2xx), `connections`."""

    EHLO_PLAIN = "250 primary.example.org"
    EHLO_PIPELINING = "250-primary.example.org\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 10240000"

    def __init__(self, port, replies, pipelining=False, host="127.0.0.1"):
        # A callable picks (replies, pipelining) afresh for each connection,
        # given the connection's number (1, 2, ...).
        self.choose = replies if callable(replies) else None
        self.replies = {} if self.choose else dict(replies)
        self.pipelining = pipelining
        self.commands = []
        self.messages = []
        self.acked = []
        self.connections = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.stopping = False
        self.conn = None
        self._said = ""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    class _End(Exception):
        """The script ended the session (Silent or Close)."""

    def _do(self, conn, f, action):
        """Performs one answer; returns the text written (for the caller to
        see whether it was a 354 or a 2xx)."""
        if isinstance(action, list):
            return "".join(self._do(conn, f, a) for a in action)
        if isinstance(action, str):
            f.write((action + "\r\n").encode())
            f.flush()
            self._said += action + "\r\n"
            return action + "\r\n"
        if isinstance(action, bytes):
            f.write(action)
            f.flush()
            self._said += action.decode(errors="replace")
            return action.decode(errors="replace")
        if isinstance(action, Close):
            raise FakePrimary._End()
        if isinstance(action, Silent):
            conn.settimeout(0.2)
            while not self.stopping:
                try:
                    if not conn.recv(65536):
                        break
                except socket.timeout:
                    continue
            raise FakePrimary._End()
        if isinstance(action, Endless):
            sent = 0
            while sent < action.limit and not self.stopping:
                f.write(action.chunk)
                sent += len(action.chunk)
            f.flush()
            return action.chunk.decode(errors="replace")
        raise TypeError(f"unknown FakePrimary action {action!r}")

    def _reply(self, conn, f, verb, default):
        self._said = ""
        return self._do(conn, f, self.replies.get(verb, default))

    def _serve(self):
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            self.conn = conn
            if self.choose:
                self.replies, self.pipelining = self.choose(self.connections)
            conn.settimeout(10)
            try:
                self._session(conn, conn.makefile("rwb"))
            except (OSError, FakePrimary._End):
                pass
            finally:
                self.conn = None
                conn.close()

    def _session(self, conn, f):
        if not self._reply(conn, f, "greeting", "220 primary.example.org ESMTP fake").startswith("2"):
            return
        nrcpt = 0
        while True:
            line = f.readline()
            if not line:
                return
            cmd = line.decode(errors="replace").rstrip("\r\n")
            self.commands.append(cmd)
            verb = cmd.split(" ", 1)[0].split(":", 1)[0].upper()
            if verb == "EHLO":
                self._reply(conn, f, verb, self.EHLO_PIPELINING if self.pipelining else self.EHLO_PLAIN)
            elif verb == "MAIL":
                nrcpt = 0
                self._reply(conn, f, verb, "250 2.1.0 Ok")
            elif verb == "RCPT":
                nrcpt += 1
                self._reply(conn, f, f"RCPT#{nrcpt}" if f"RCPT#{nrcpt}" in self.replies else verb, "250 2.1.5 Ok")
            elif verb == "DATA":
                said = self._reply(conn, f, verb, "354 go ahead")
                if not any(l.startswith("354") for l in said.split("\n")):
                    continue
                # A bytearray: appending to bytes is quadratic (a message
                # of several MB would take minutes).
                data = bytearray()
                complete = False
                while True:
                    l = f.readline()
                    if not l:
                        break
                    if l == b".\r\n":
                        complete = True
                        break
                    data += l
                data = bytes(data)
                self.messages.append(data)
                if not complete:
                    return
                try:
                    self._reply(conn, f, "end", "250 2.0.0 Ok: queued")
                finally:
                    # Also when the script closes right after its reply.
                    if self._said.startswith("2"):
                        self.acked.append(data)
            elif verb == "QUIT":
                self._reply(conn, f, verb, "221 bye")
                return
            else:
                self._reply(conn, f, verb, "250 2.0.0 Ok")

    def stop(self):
        self.stopping = True
        c = self.conn
        if c is not None:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(timeout=5)
        # shutdown() first: a child process forked meanwhile by another
        # thread (before its exec) holds a copy of the descriptor, and close()
        # alone would leave the port listening until that child execs.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def strip_sink_headers(raw):
    """Removes what smtp-sink and Bartleby prepended: smtp-sink's X-* lines and
    its Received header, then Bartleby's Received header. Returns the rest."""
    lines = raw.split(b"\r\n") if b"\r\n" in raw else raw.split(b"\n")
    i = 0
    while i < len(lines) and lines[i].startswith(b"X-"):
        i += 1
    received_seen = 0
    while i < len(lines) and received_seen < 2:
        if lines[i].startswith(b"Received:"):
            received_seen += 1
            i += 1
            while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
                i += 1
        else:
            break
    sep = b"\r\n" if b"\r\n" in raw else b"\n"
    return sep.join(lines[i:])


class Client:
    """A raw SMTP client for exact protocol tests."""

    def __init__(self, port, source=None, timeout=10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None)
        self.buf = b""
        self.banner = self.reply()

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def reply(self):
        """Reads one (possibly multi-line) reply; returns (code, text)."""
        lines = []
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    if lines or self.buf:
                        break
                    return (0, "closed")
                self.buf += chunk
            if b"\n" not in self.buf:
                break
            line, _, self.buf = self.buf.partition(b"\n")
            line = line.rstrip(b"\r").decode(errors="replace")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                break
        if not lines:
            return (0, "closed")
        return (int(lines[-1][:3]), "\n".join(lines))

    def cmd(self, line):
        self.send(line + "\r\n")
        return self.reply()

    def closed(self, timeout=5):
        self.sock.settimeout(timeout)
        try:
            while True:
                d = self.sock.recv(4096)
                if not d:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def queued_id(text):
    m = re.search(r"queued as ([0-9A-F]+)", text)
    return m.group(1) if m else None


def take_binary_arg():
    """Takes the relay binary from the command line (the first argument, as
    tests/run passes it) and checks that it exists."""
    global BINARY
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        BINARY = os.path.abspath(sys.argv.pop(1))
    if not os.path.exists(BINARY):
        sys.exit(f"no binary at {BINARY}: run cargo build --release first")


def report(name, res):
    """Ends a suite with the "NAME: N passed, M failed" line tests/run adds
    up (skipped tests count as neither); exits non-zero on a failure."""
    failed = len(res.failures) + len(res.errors)
    # One line per failure, with the traceback's last line: tests/run
    # repeats these at the end of the whole run, where CI's tail shows them.
    for test, tb in res.failures + res.errors:
        lines = tb.strip().splitlines()
        # The exception's own line (its message may go on for lines after).
        err = [l for l in lines if re.match(r"^\w+(\.\w+)*(Error|Exception|Exit|Interrupt)\b", l)]
        print(f"FAILED {test.id()}: {(err[-1] if err else lines[-1] if lines else '?').strip()[:400]}")
    print(f"{name}: {res.testsRun - failed - len(res.skipped)} passed, {failed} failed")
    sys.exit(1 if failed else 0)

