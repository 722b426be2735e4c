"""Small helpers for tests/bench/run: processes, waits, memory, SMTP probes.

Python 3 standard library only.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

T0 = time.monotonic()


def log(msg):
    print(f"[bench {time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A step failed; the message says which and why."""


def wait_for(pred, timeout, what, interval=0.05):
    """Polls pred() until it returns a true value; returns that value.
    Raises BenchError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def port_in_use(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def require_port_free(host, port, who):
    if port_in_use(host, port):
        raise BenchError(f"{host}:{port} (for {who}) is already in use; stop whatever listens there "
                         f"or pick another port (see tests/bench/run --help)")


def pick_port(host, preferred, who):
    """preferred if nothing listens there, else a free port chosen by the
    kernel (logged): a developer's qemu/run or server on the default port
    must not stop the benchmark."""
    if not port_in_use(host, preferred):
        return preferred
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, 0))
        port = s.getsockname()[1]
    finally:
        s.close()
    log(f"{host}:{preferred} is in use; {who} gets port {port} instead")
    return port


def smtp_banner(host, port, timeout=5):
    """Returns the 220 greeting line of an SMTP server, or None."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(512)
                if not chunk:
                    return None
                buf += chunk
            line = buf.split(b"\n", 1)[0].decode("latin-1").rstrip("\r")
            try:
                s.sendall(b"QUIT\r\n")
            except OSError:
                pass
            return line if line.startswith("220") else None
    except OSError:
        return None


def wait_banner(host, port, timeout, who, alive=None):
    """Waits for an SMTP 220 greeting. `alive` is an optional callable that
    returns False when the server process has died (so we fail fast)."""
    deadline = time.monotonic() + timeout
    while True:
        b = smtp_banner(host, port, timeout=min(10, max(1, timeout)))
        if b:
            return b
        if alive is not None and not alive():
            raise BenchError(f"{who} exited before it greeted on {host}:{port}")
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for the SMTP greeting of {who} "
                             f"on {host}:{port}")
        time.sleep(0.2)


def smtp_probe_rcpt(host, port, sender, rcpt, timeout=30):
    """Runs EHLO/MAIL/RCPT/RSET/QUIT; returns (ok, transcript-of-last-reply)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        f = s.makefile("rb")

        def reply():
            lines = []
            while True:
                ln = f.readline().decode("latin-1").rstrip("\r\n")
                if not ln:
                    raise BenchError("connection closed during probe")
                lines.append(ln)
                if len(ln) < 4 or ln[3] != "-":
                    return lines[-1]

        def cmd(c):
            s.sendall(c.encode() + b"\r\n")
            return reply()

        r = reply()
        if not r.startswith("220"):
            return False, r
        for c in ("EHLO bench.test", f"MAIL FROM:<{sender}>", f"RCPT TO:<{rcpt}>"):
            r = cmd(c)
            if not r.startswith("250"):
                return False, f"{c} -> {r}"
        cmd("RSET")
        try:
            cmd("QUIT")
        except (BenchError, OSError):
            pass
        return True, r


# ---------------------------------------------------------------- processes

def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
        return st[st.rindex(")") + 2] != "Z"
    except OSError:
        return False


def stop_popen(p, name, grace=10):
    """SIGTERM, wait `grace` seconds, then SIGKILL. Never raises."""
    if p is None or p.poll() is not None:
        return
    try:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            log(f"{name} (pid {p.pid}) ignored SIGTERM for {grace}s; killing it")
            p.kill()
            p.wait(5)
    except Exception as e:  # noqa: BLE001 -- cleanup must not raise
        log(f"stopping {name}: {e}")


def children_map():
    """ppid -> [pid] for every process."""
    m = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        rest = st[st.rindex(")") + 2:].split()
        m.setdefault(int(rest[1]), []).append(int(d))
    return m


def process_tree(root):
    """root and all its descendants (pids)."""
    m = children_map()
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(m.get(p, []))
    return out


def proc_cpu(pid):
    """(own, reaped children) CPU seconds, user + system, of a process from
    /proc/PID/stat (utime + stime count every thread of the process;
    cutime + cstime the children it has waited for). (0, 0) if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return 0.0, 0.0
    rest = st[st.rindex(")") + 2:].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(rest[11]) + int(rest[12])) / tick, (int(rest[13]) + int(rest[14])) / tick


def tree_cpu(root):
    """CPU seconds used so far by a process tree: every live process's own
    time plus what the root reaped from children that exited (Postfix's
    master reaps its smtpd, cleanup, smtp ... processes). None if no root."""
    if root is None:
        return None
    total = proc_cpu(root)[1]
    for p in process_tree(root):
        total += proc_cpu(p)[0]
    return total


def proc_name(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def status_kib(pid, field):
    """A `field:  N kB` value from /proc/PID/status, in KiB (None if gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for ln in f:
                if ln.startswith(field + ":"):
                    return int(ln.split()[1])
    except OSError:
        return None
    return None


def pss_kib(pid):
    """Pss from /proc/PID/smaps_rollup in KiB (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for ln in f:
                if ln.startswith("Pss:"):
                    return int(ln.split()[1])
    except OSError:
        pass
    return 0


class PeakSampler:
    """Calls sample() -> (value_kib, detail) every `interval` seconds in a
    thread and keeps the peak value and the detail at the peak."""

    def __init__(self, sample, interval=0.1):
        self.sample = sample
        self.interval = interval
        self.peak = 0
        self.peak_detail = None
        self.samples = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                v, detail = self.sample()
            except Exception:  # noqa: BLE001 -- processes come and go
                v, detail = 0, None
            self.samples += 1
            if v > self.peak:
                self.peak, self.peak_detail = v, detail
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(5)
        # one last sample after the load
        try:
            v, detail = self.sample()
            if v > self.peak:
                self.peak, self.peak_detail = v, detail
        except Exception:  # noqa: BLE001
            pass
        return False


def tree_pss(root_pid_fn):
    """A sample() for PeakSampler: summed PSS of a process tree."""

    def sample():
        root = root_pid_fn()
        if not root:
            return 0, None
        by_name = {}
        total = 0
        for pid in process_tree(root):
            k = pss_kib(pid)
            n = proc_name(pid)
            if k == 0 and n == "?":
                continue  # exited meanwhile
            total += k
            c, s = by_name.get(n, (0, 0))
            by_name[n] = (c + 1, s + k)
        return total, by_name

    return sample


# ---------------------------------------------------------------- files

def count_files(dirs, skip_suffix=(".tmp",)):
    """Regular files below each directory (recursive), ignoring names that
    end in one of skip_suffix."""
    n = 0
    for d in dirs:
        for _root, _dirs, files in os.walk(d):
            for name in files:
                if not name.endswith(skip_suffix):
                    n += 1
    return n


# ---------------------------------------------------------------- load

class SmtpSink:
    """Postfix's smtp-sink as the primary MX (throws mail away, counts it)."""

    def __init__(self, host, port, workdir, user="nobody"):
        self.host, self.port = host, port
        self.out_path = os.path.join(workdir, f"smtp-sink-{port}.out")
        self.user = user
        self.p = None

    def start(self):
        require_port_free(self.host, self.port, "smtp-sink (the primary)")
        self.out = open(self.out_path, "wb")
        # -c: counters on stdout; backlog 1024
        self.p = subprocess.Popen(
            ["smtp-sink", "-4", "-c", "-u", self.user, f"{self.host}:{self.port}", "1024"],
            stdout=self.out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_banner(self.host, self.port, 10, "smtp-sink", alive=lambda: self.p.poll() is None)
        # The probe above was a session, not a message; counters count messages too.

    def received(self):
        """Messages received so far (from the -c counters)."""
        try:
            with open(self.out_path, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                f.seek(max(0, size - 200))
                tail = f.read().decode("latin-1")
        except OSError:
            return 0
        m = re.findall(r"mesg=(\d+)", tail)
        return int(m[-1]) if m else 0

    def stop(self):
        stop_popen(self.p, "smtp-sink", grace=5)
        self.p = None
        try:
            self.out.close()
        except Exception:  # noqa: BLE001
            pass


def smtp_source(host, port, sessions, messages, size, timeout, sender, rcpt, helo="bench.test"):
    """Runs smtp-source; returns elapsed seconds. Raises BenchError on any
    failure (smtp-source aborts on the first non-2xx reply)."""
    cmd = ["smtp-source", "-4", "-s", str(sessions), "-m", str(messages), "-l", str(size),
           "-M", helo, "-f", sender, "-t", rcpt, f"{host}:{port}"]
    log("  $ " + " ".join(cmd))
    t = time.monotonic()
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"smtp-source did not finish within {timeout:.0f}s") from None
    elapsed = time.monotonic() - t
    if r.returncode != 0:
        out = r.stdout.decode("latin-1", "replace").strip()
        raise BenchError(f"smtp-source failed (exit {r.returncode}): {out[-500:]}")
    return elapsed
