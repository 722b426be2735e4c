#!/usr/bin/env python3
"""Crash test: SIGKILL the server several times during a multi-session load;
after restart and flush, every message that got 250 reached the sink.

    python3 tests/relay/test_crash.py [path/to/bartleby]

Eight client threads send messages in a loop with smtplib, each with a
unique token (tok-<thread>-<n>) in its Subject and body, and record the
tokens that got "250" to DATA. Meanwhile a killer thread SIGKILLs the server
five times at random moments (every 0.5-1.5 s) and restarts it at once. The
primary is down during the load (nothing listens on its port), so the queue
fills. Then Postfix's smtp-sink starts as the primary, `bartleby flush`
asks for a queue run, and once `bartleby mailq` says the queue is empty
every acknowledged token must be in at least one sink file (duplicates are
allowed: a kill between the commit and the "250" makes the client send the
message again; losses are not), complete, and spool/corrupt/ must be empty
(SIGKILL loses no page cache, so no queue file can be torn).

Python 3 standard library only; loopback only; ports chosen free. Set
CRASH_SEED to replay the kill timings, CRASH_KEEP=1 to keep the work
directory (log, spool, sink files) after a pass. Exits non-zero on failure;
the last line is "N passed, M failed".
"""

import os
import random
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else os.path.join(ROOT, "target", "release", "bartleby")

CLIENTS = 8
KILLS = 5
LOAD_SECONDS = 12.0  # the whole load phase, kills included
DRAIN_SECONDS = 60.0
TOKEN = re.compile(rb"tok-\d+-\d+")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def body_of(tok):
    # Dot lines and a longer line, so a torn or badly unstuffed copy shows.
    return (
        f"From: load-{tok}@sender.test\r\n"
        f"To: bob@example.org\r\n"
        f"Subject: {tok}\r\n"
        f"Message-ID: <{tok}@sender.test>\r\n"
        f"\r\n"
        f"body of {tok}\r\n"
        f".leading dot\r\n"
        f"..two dots\r\n" + ("y" * 300) + "\r\n"
        f"end-of-{tok}\r\n"
    ).encode()


class Server:
    """The bartleby server under test, restartable."""

    def __init__(self, cfg, out):
        self.cfg = cfg
        # stdout/stderr of every run (the log proper goes to log_file).
        self.out = out
        self.proc = None
        self.lock = threading.Lock()

    def start(self, port):
        with self.lock:
            logf = open(self.out, "ab")
            self.proc = subprocess.Popen([BINARY, "serve", "-c", self.cfg], stdout=logf, stderr=logf)
            logf.close()
        if not wait_port(port):
            return False
        return self.proc.poll() is None

    def kill(self):
        with self.lock:
            p = self.proc
        if p and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            return True
        return False

    def stop(self):
        with self.lock:
            p = self.proc
            self.proc = None
        if p and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def cli(cfg, *args):
    return subprocess.run([BINARY, *args, "-c", cfg], capture_output=True, text=True, timeout=30)


def client(idx, port, stop, acked, stats):
    """Sends messages until `stop`; records the tokens that got 250."""
    n = 0
    rng = random.Random(idx)
    while not stop.is_set():
        try:
            s = smtplib.SMTP("127.0.0.1", port, local_hostname="client.sender.test", timeout=10)
        except (OSError, smtplib.SMTPException):
            stats["connect_errors"] += 1
            time.sleep(0.05 + rng.random() * 0.1)
            continue
        try:
            # A few messages per connection, like a real MTA's session reuse.
            for _ in range(rng.randint(1, 5)):
                if stop.is_set():
                    break
                tok = f"tok-{idx}-{n}"
                n += 1
                stats["attempts"] += 1
                s.sendmail(f"load-{tok}@sender.test", ["bob@example.org"], body_of(tok))
                acked.append(tok)
                # A short pause keeps the queue to a few thousand messages,
                # so the drain stays well inside its time limit.
                time.sleep(rng.uniform(0.005, 0.025))
            s.quit()
        except smtplib.SMTPResponseException as e:
            # A refusal (4xx/5xx) is not an acknowledgement; not a failure either.
            stats["refused"] += 1
            stats["refusals"].add(f"{e.smtp_code} {e.smtp_error[:80]!r}")
            s.close()
        except (OSError, smtplib.SMTPException):
            # Server killed under us: reset, EOF, refused. Retry shortly.
            stats["broken"] += 1
            s.close()
            time.sleep(0.05 + rng.random() * 0.1)


def killer(server, port, rng, stop, record):
    for _ in range(KILLS):
        if stop.wait(rng.uniform(0.5, 1.5)):
            return
        t = time.monotonic()
        if not server.kill():
            record["errors"].append("the server was not running at a kill")
        record["kills"] += 1
        if server.start(port):
            record["restarts"] += 1
            record["restart_times"].append(time.monotonic() - t)
        else:
            record["errors"].append("the server did not come back after a kill")
            # One more try, so the rest of the test can still say something.
            if server.start(port):
                record["restarts"] += 1


def main():
    if not os.access(BINARY, os.X_OK):
        print(f"test_crash: no binary at {BINARY} (cargo build --release)")
        print("0 passed, 1 failed")
        return 1
    if not shutil.which("smtp-sink"):
        print("test_crash: smtp-sink (Postfix) is not installed")
        print("0 passed, 1 failed")
        return 1
    seed = int(os.environ.get("CRASH_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    work = tempfile.mkdtemp(prefix="bartleby-crash-")
    spool = os.path.join(work, "spool")
    sink_dir = os.path.join(work, "sink")
    os.mkdir(sink_dir)
    os.chmod(work, 0o755)
    os.chmod(sink_dir, 0o777)
    port, primary = free_port(), free_port()
    cfg = os.path.join(work, "bartleby.toml")
    log = os.path.join(work, "bartleby.log")
    with open(cfg, "w") as f:
        f.write(
            "\n".join(
                [
                    'hostname = "backup.example.org"',
                    f'listen = ["127.0.0.1:{port}"]',
                    f'spool = "{spool}"',
                    'relay_domains = ["example.org"]',
                    f'primary = "127.0.0.1:{primary}"',
                    'minimal_backoff = "5m"',
                    "max_connections = 50",
                    'min_free_space = "1M"',
                    # One client address makes all the load: the per-client
                    # queue share (25 %) would turn most of it into 452s.
                    "smtpd_client_queue_share = 0",
                    f'log_file = "{log}"',
                ]
            )
            + "\n"
        )
    print(f"test_crash: binary {BINARY}, work dir {work}, seed {seed}, smtp port {port}, primary port {primary}")

    results = []

    def check(name, ok, detail=""):
        results.append((name, ok))
        print(f"{'ok  ' if ok else 'FAIL:'} {name}{': ' + detail if detail else ''}")

    server = Server(cfg, os.path.join(work, "serve.out"))
    sink = None
    t0 = time.monotonic()
    try:
        if not server.start(port):
            check("server starts", False, open(server.out, errors="replace").read()[-2000:])
            return finish(results, work, keep=True)

        # --- load with kills
        stop = threading.Event()
        acked_lists = [[] for _ in range(CLIENTS)]
        cstats = [
            {"attempts": 0, "refused": 0, "broken": 0, "connect_errors": 0, "refusals": set()} for _ in range(CLIENTS)
        ]
        threads = [
            threading.Thread(target=client, args=(i, port, stop, acked_lists[i], cstats[i]), daemon=True)
            for i in range(CLIENTS)
        ]
        record = {"kills": 0, "restarts": 0, "errors": [], "restart_times": []}
        kthread = threading.Thread(target=killer, args=(server, port, rng, threading.Event(), record), daemon=True)
        for t in threads:
            t.start()
        kthread.start()
        kthread.join(timeout=60)
        rest = LOAD_SECONDS - (time.monotonic() - t0)
        time.sleep(max(rest, 1.0))
        stop.set()
        for t in threads:
            t.join(timeout=30)
        load_time = time.monotonic() - t0
        acked = [tok for lst in acked_lists for tok in lst]
        attempts = sum(s["attempts"] for s in cstats)
        broken = sum(s["broken"] for s in cstats)
        refused = sum(s["refused"] for s in cstats)
        refusals = set().union(*(s["refusals"] for s in cstats))
        print(
            f"load: {load_time:.1f} s, {attempts} messages tried, {len(acked)} acknowledged (250), "
            f"{broken} sessions broken by kills, {refused} refusals{' ' + str(sorted(refusals)) if refusals else ''}, "
            f"{record['kills']} kills, {record['restarts']} restarts"
            + (f" (restart took {max(record['restart_times']):.2f} s at most)" if record["restart_times"] else "")
        )
        check("five SIGKILLs, each followed by a restart", record["kills"] == KILLS and record["restarts"] == KILLS and not record["errors"], "; ".join(record["errors"]))
        check("the load got acknowledgements", len(acked) > 0 and len(set(acked)) == len(acked), f"{len(acked)} acknowledged")
        if server.proc is None or server.proc.poll() is not None:
            check("server running after the load", False)
            return finish(results, work, keep=True)

        # --- the primary comes up; flush; drain
        corrupt_dir = os.path.join(spool, "corrupt")
        queued_before = len(os.listdir(os.path.join(spool, "queue")))
        sink = subprocess.Popen(
            ["smtp-sink", "-u", "nobody", "-d", sink_dir + "/%M.", f"127.0.0.1:{primary}", "64"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not wait_port(primary):
            check("smtp-sink starts", False)
            return finish(results, work, keep=True)
        t1 = time.monotonic()
        out = cli(cfg, "flush")
        flushes = 1
        if out.returncode != 0:
            check("bartleby flush", False, (out.stdout + out.stderr).strip())
        empty = False
        last_q = ""
        while time.monotonic() - t1 < DRAIN_SECONDS:
            q = cli(cfg, "mailq")
            last_q = q.stdout + q.stderr
            if q.returncode == 0 and "Mail queue is empty" in q.stdout:
                empty = True
                break
            if time.monotonic() - t1 > 30 and flushes == 1:
                # Not a failure by itself; the figure is printed.
                cli(cfg, "flush")
                flushes += 1
            time.sleep(0.25)
        drain_time = time.monotonic() - t1
        check(
            "queue empty after flush",
            empty,
            f"{queued_before} queued, drained in {drain_time:.1f} s, {flushes} flush(es)"
            if empty
            else f"still queued after {DRAIN_SECONDS:.0f} s:\n{last_q[-1500:]}",
        )
        time.sleep(0.3)  # smtp-sink has written its last file before the 250; be generous

        # --- what reached the sink
        delivered = {}  # token -> number of sink files
        incomplete = []
        files = 0
        for dirpath, _, names in os.walk(sink_dir):
            for name in names:
                files += 1
                with open(os.path.join(dirpath, name), "rb") as f:
                    data = f.read()
                toks = set(TOKEN.findall(data))
                for tok in toks:
                    tok = tok.decode()
                    delivered[tok] = delivered.get(tok, 0) + 1
                    norm = data.replace(b"\r\n", b"\n")
                    want = body_of(tok).replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]
                    if want not in norm:
                        incomplete.append(tok)
        lost = sorted(t for t in set(acked) if t not in delivered)
        dups = sum(1 for t in delivered.values() if t > 1)
        unacked_delivered = sum(1 for t in delivered if t not in set(acked))
        corrupt = len(os.listdir(corrupt_dir)) if os.path.isdir(corrupt_dir) else 0
        print(
            f"figures: acknowledged {len(acked)}, delivered {len(delivered)} distinct ({files} sink files), "
            f"lost {len(lost)}, duplicates {dups}, delivered without a 250 {unacked_delivered}, "
            f"kills {record['kills']}, corrupt {corrupt}"
        )
        check("every acknowledged message reached the sink", not lost, f"lost: {lost[:20]}" if lost else f"{len(acked)} of {len(acked)}")
        check("delivered copies are complete", not incomplete, f"damaged: {sorted(set(incomplete))[:20]}" if incomplete else "")
        check("spool/corrupt/ is empty", corrupt == 0, f"{corrupt} files in {corrupt_dir}" if corrupt else "")
    finally:
        server.stop()
        if sink is not None and sink.poll() is None:
            sink.terminate()
            try:
                sink.wait(timeout=10)
            except subprocess.TimeoutExpired:
                sink.kill()
    print(f"total time {time.monotonic() - t0:.1f} s")
    return finish(results, work, keep=bool(os.environ.get("CRASH_KEEP")) or not all(ok for _, ok in results))


def finish(results, work, keep):
    if keep:
        print(f"test_crash: kept {work} for inspection (bartleby.log, serve.out, spool/, sink/)")
    else:
        shutil.rmtree(work, ignore_errors=True)
    passed = sum(1 for _, ok in results if ok)
    failed = len(results) - passed
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
