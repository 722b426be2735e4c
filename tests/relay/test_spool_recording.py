#!/usr/bin/env python3
"""Recording delivery outcomes on a spool that cannot (fully) be written,
and the write probe that tells when it can again.

    python3 tests/relay/test_spool_recording.py [path/to/bartleby]

Cases (the loop-device ones on a small ext4 image, as test_faults.py):

  full_spool_drains        a full file system: messages whose outcome a
                           removal records (one recipient left) are still
                           delivered, which frees space; a message with more
                           recipients waits, and goes out by itself once
                           there is room again (the flush that held it back
                           is remembered);
  removal_recorded_late    queue/ made immutable (chattr +i: EPERM on
                           unlink, reversible): deliveries stop after the
                           one in flight, MAIL gets 452, a flush meanwhile
                           is remembered; once the directory is writable
                           again the removal is recorded and the rest is
                           delivered, without a restart and without another
                           flush, each message exactly once;
  state_recorded_late      state/ made immutable: the state of a partly
                           delivered message is recorded once it can be,
                           and the recipient already delivered to is not
                           tried again;
  probe_during_queue_run   one failed DATA during a long queue run (a primary
                           that never answers the end of data): MAIL is
                           accepted again within one probe interval, not
                           after the run;
  probe_off_the_runtime    the write probe meets a frozen file system
                           (fsfreeze: every write blocks, as on a disk whose
                           fsync hangs): SMTP keeps answering;
  no_reconnect_for_nothing a primary that drops the connection at the end
                           of data: the worker does not reconnect when no
                           message is left.

What Postfix does (src/global/deliver_completed.c, src/qmgr/): its qmgr
exits ("fatal: ... remove ...: Read-only file system") when it cannot update
or remove a queue file and is restarted by master, so deliveries of the
messages it has in hand are repeated. On a full queue file system (ENOSPC)
it keeps delivering: a delivery agent crosses a delivered recipient off in
place in the queue file (an overwrite of an existing record) and qmgr
unlinks the file when all are done, neither of which needs space; only new
mail is refused (smtpd's queue_minfree check, "452 4.3.1 Insufficient
system storage"). A deferred message's retry time is its queue file's
mtime, set with utime(2), needing no space either.

Needs root and loop devices: without them the suite FAILS (the project
requires these tests). The last line is "N passed, M failed".
"""

import os
import re
import shutil
import smtplib
import socket
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Client, Close, FakePrimary, Relay, Silent, Sink  # noqa: E402
from test_faults import Disk, loop_devices_usable, sh  # noqa: E402

# How often the relay probes a spool that cannot be written (scheduler.rs).
PROBE_INTERVAL = 10


def body(tok):
    return f"From: alice@sender.test\r\nSubject: {tok}\r\nMessage-ID: <{tok}@sender.test>\r\n\r\nbody {tok}\r\n"


def send(port, tok, rcpts=("bob@example.org",)):
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        s.ehlo("client.sender.test")
        s.mail("alice@sender.test")
        for r in rcpts:
            code, resp = s.rcpt(r)
            assert code == 250, resp
        code, resp = s.data(body(tok).encode())
        assert code == 250, (code, resp)
        return resp.decode().split("queued as ")[1].strip()


def mail_reply(port):
    """The reply to a MAIL command on a fresh session."""
    c = Client(port, timeout=10)
    try:
        c.cmd("EHLO client.sender.test")
        code, text = c.cmd("MAIL FROM:<alice@sender.test>")
        c.cmd("QUIT")
        return code, text
    finally:
        c.close()


def token_counts(sink, toks):
    blobs = sink.messages()
    return {t: sum(1 for b in blobs if f"Subject: {t}\r".encode() in b or f"Subject: {t}\n".encode() in b) for t in toks}


class Recording(unittest.TestCase):
    def setUp(self):
        self.disk = None
        self.relay = None
        self.sink = None
        self.fake = None
        self.undo = []  # run first in tearDown (thaw, chattr -i)

    def tearDown(self):
        for f in reversed(self.undo):
            try:
                f()
            except Exception as e:  # noqa: BLE001
                sys.stderr.write(f"tearDown: {e}\n")
        failed = self._failed()
        if self.relay:
            if failed:
                sys.stderr.write(f"\n--- relay log (tail) ---\n{self.relay.read_log()[-6000:]}\n")
            self.relay.stop()
            shutil.rmtree(self.relay.dir, ignore_errors=True)
        if self.sink:
            self.sink.stop()
        if self.fake:
            self.fake.stop()
        if self.disk:
            self.disk.cleanup()

    def _failed(self):
        res = getattr(self, "_outcome", None)
        if res is None or not hasattr(res, "result"):
            return False
        return any(t is self for t, _ in res.result.failures + res.result.errors)

    # --- set-up -------------------------------------------------------------

    def start(self, extra="", on_disk=True, size_mb=48):
        r = Relay(extra=extra)
        if on_disk:
            why = loop_devices_usable()
            if why:
                self.fail(f"loop devices unavailable ({why}): this suite needs root and /dev/loop-control")
            self.disk = Disk(size_mb)
            spool = os.path.join(self.disk.mnt, "spool")
            with open(r.config) as f:
                conf = f.read().replace(r.spool, spool)
            with open(r.config, "w") as f:
                f.write(conf)
            r.spool = spool
        self.relay = r
        r.start()
        return r

    def wait_log(self, pattern, timeout=15, after=0):
        """Waits for a regex in the log (from offset `after`); returns the
        log offset just past the match."""
        end = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            log = self.relay.read_log()
            m = rx.search(log, after)
            if m:
                return m.end()
            if time.monotonic() > end:
                self.fail(f"no {pattern!r} in the log within {timeout}s:\n{log[-3000:]}")
            time.sleep(0.05)

    def wait_until(self, cond, timeout, what):
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > end:
                self.fail(f"{what} (waited {timeout}s):\n{self.relay.read_log()[-3000:]}")
            time.sleep(0.1)

    def queue_while_down(self, msgs):
        """Queues (tok, rcpts) with the primary down; each gets a state file
        (one failed attempt), so every later attempt is a retry."""
        r = self.relay
        ids = {}
        for tok, rcpts in msgs:
            ids[tok] = send(r.port, tok, rcpts)
        r.flush()
        self.wait_until(
            lambda: all(os.path.exists(os.path.join(r.spool, "state", i)) for i in ids.values()),
            15,
            "the messages were not deferred once",
        )
        return ids

    def fill(self):
        """Takes every block of the spool's file system (as root: the
        reserved blocks too), until even a small new file cannot be written."""
        filler = os.path.join(self.disk.mnt, "filler")
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for size in (1 << 20, 1 << 16, 4096, 1024, 1):
                for _ in range(3):
                    try:
                        while True:
                            os.write(fd, b"\0" * size)
                    except OSError:
                        pass
                    try:
                        os.fsync(fd)
                    except OSError:
                        pass
        finally:
            os.close(fd)
        probe = os.path.join(self.disk.mnt, "probe")
        try:
            with open(probe, "wb") as f:
                f.write(b"x" * 2048)
                f.flush()
                os.fsync(f.fileno())
            full = False
        except OSError:
            full = True
        if os.path.exists(probe):
            os.remove(probe)
        self.assertTrue(full, "the file system is not full after filling it")
        return filler

    def chattr(self, flag, path):
        sh("chattr", flag, path)
        if flag == "+i":
            self.undo.append(lambda: sh("chattr", "-i", path, check=False))

    # --- the cases ----------------------------------------------------------

    def test_full_spool_drains(self):
        # Defect: a failed retry-time write suspended every delivery, and the
        # probe that lifts it writes a file, so on a full disk nothing ever
        # drained (0 delivered after 15 s; still 0 after freeing space,
        # until another manual flush).
        r = self.start(extra="delivery_connections = 2")
        singles = [f"full-one-{i}" for i in range(3)]
        ids = self.queue_while_down([(t, ("bob@example.org",)) for t in singles] + [("full-two", ("bob@example.org", "carol@example.org"))])
        filler = self.fill()
        at = len(r.read_log())
        r.flush()  # primary still down: the new retry times cannot be written
        self.wait_log(r"cannot (write|record) delivery state.*(No space left|ENOSPC)", after=at)
        self.sink = Sink(r.primary_port)
        r.flush()
        # Messages with one recipient left: a removal records their outcome
        # (an unlink needs no space): delivered although the disk is full.
        self.wait_until(lambda: all(token_counts(self.sink, singles).values()), 15, "nothing drains from the full spool")
        self.wait_until(lambda: r.queue_ids() == [ids["full-two"]], 10, "the delivered messages were not removed")
        # The one with two recipients left waits (a partial delivery would
        # need a state write): not delivered while the disk is full.
        self.assertEqual(token_counts(self.sink, ["full-two"])["full-two"], 0, "a message with two recipients went out on a full spool")
        self.assertRegex(r.read_log(), ids["full-two"] + r": held")
        # Room again: it goes out by itself (no further flush), once.
        os.remove(filler)
        self.wait_until(lambda: token_counts(self.sink, ["full-two"])["full-two"] > 0, PROBE_INTERVAL + 10, "the held message did not go out once there was room")
        self.wait_until(lambda: r.queue_ids() == [], 10, "queue not empty")
        counts = token_counts(self.sink, singles + ["full-two"])
        self.assertEqual(set(counts.values()), {1}, f"delivered more than once: {counts}")
        self.assertNotIn("panicked", r.read_log())

    def test_removal_recorded_late(self):
        r = self.start(extra="delivery_connections = 1")
        toks = [f"late-{i}" for i in range(3)]
        self.queue_while_down([(t, ("bob@example.org",)) for t in toks])
        queue = os.path.join(r.spool, "queue")
        self.chattr("+i", queue)  # unlink (and create) in queue/: EPERM
        self.sink = Sink(r.primary_port)
        at = len(r.read_log())
        r.flush()
        at = self.wait_log(r"cannot remove queue file.*Operation not permitted", after=at)
        self.wait_log(r"no new deliveries until it is writable again", after=0)
        time.sleep(1.0)
        # Bounded: only the delivery in flight (delivery_connections = 1).
        self.assertEqual(len(self.sink.files()), 1, "deliveries went on while the spool could not record them")
        self.assertEqual(mail_reply(r.port)[0], 452, "MAIL accepted while the spool cannot record")
        r.flush()  # during the suspension: must not be forgotten
        # Handled while the spool is still unwritable (before this change the
        # relay logged "queue run skipped" and forgot it).
        self.wait_log(r"queue run (skipped|requested \(flush\): deferred)", after=at)
        sh("chattr", "-i", queue)
        # No restart, no further flush: the removal is recorded and the rest
        # goes out once the probe finds the spool writable.
        self.wait_until(lambda: r.queue_ids() == [], PROBE_INTERVAL + 10, "the queue did not drain once the spool was writable again")
        self.assertRegex(r.read_log(), r"removed \(recorded late")
        self.wait_until(lambda: all(token_counts(self.sink, toks).values()), 10, "not every message was delivered")
        counts = token_counts(self.sink, toks)
        self.assertEqual(set(counts.values()), {1}, f"delivered more than once: {counts}")
        self.assertEqual(mail_reply(r.port)[0], 250, "MAIL still refused after the spool was writable again")

    def test_state_recorded_late(self):
        # bob accepted, carol deferred on the first connection; both fine later.
        def replies(n):
            return ({"RCPT#2": "450 4.2.0 <carol@example.org>: busy"} if n == 1 else {}), False

        r = self.start(extra="delivery_connections = 1")
        self.fake = FakePrimary(r.primary_port, replies)
        state = os.path.join(r.spool, "state")
        self.chattr("+i", state)
        qid = send(r.port, "partial", ("bob@example.org", "carol@example.org"))
        self.wait_log(qid + r": cannot record delivery state")
        self.assertFalse(os.path.exists(os.path.join(state, qid)))
        self.assertEqual(mail_reply(r.port)[0], 452, "MAIL accepted while the spool cannot record")
        sh("chattr", "-i", state)
        self.wait_log(qid + r": delivery state recorded \(late", timeout=PROBE_INTERVAL + 10)
        with open(os.path.join(state, qid)) as f:
            self.assertIn("sent bob@example.org", f.read())
        r.flush()
        self.wait_until(lambda: r.queue_ids() == [], 15, "carol's delivery did not complete")
        rcpts = [c for c in self.fake.commands if c.upper().startswith("RCPT TO:")]
        self.assertEqual(sum("<bob@example.org>" in c for c in rcpts), 1, f"bob was given the message twice: {rcpts}")
        self.assertEqual(sum("<carol@example.org>" in c for c in rcpts), 2, rcpts)

    def test_probe_during_queue_run(self):
        # Defect: the probe that clears "a write failed" ran only between
        # queue runs; against a primary that never answers the end of data a
        # run lasts 2 x delivery_timeout per message, and every MAIL got 452
        # for all that time although the spool was fine.
        r = self.start(extra='delivery_connections = 1\ndelivery_timeout = "3s"\nconnect_timeout = "3s"', on_disk=False)
        toks = [f"slow-{i}" for i in range(5)]
        for t in toks:
            send(r.port, t)
        self.fake = FakePrimary(r.primary_port, {"end": Silent()})
        r.flush()
        self.wait_until(lambda: len(self.fake.messages) >= 1, 15, "the queue run did not start")
        # The directory new messages are written in (incoming/ until the
        # spool reused files, free/ since).
        incoming = os.path.join(r.spool, "free")
        os.rename(incoming, incoming + ".away")
        with open(incoming, "w") as f:
            f.write("not a directory\n")
        try:
            c = Client(r.port)
            c.cmd("EHLO client.sender.test")
            self.assertEqual(c.cmd("MAIL FROM:<alice@sender.test>")[0], 250)
            self.assertEqual(c.cmd("RCPT TO:<bob@example.org>")[0], 250)
            code, text = c.cmd("DATA")
            self.assertEqual(code, 451, text)
            c.close()
        finally:
            os.remove(incoming)
            os.rename(incoming + ".away", incoming)
        t_restored = time.monotonic()
        while True:
            code, _ = mail_reply(r.port)
            if code == 250:
                break
            self.assertEqual(code, 452)
            self.assertLess(time.monotonic() - t_restored, PROBE_INTERVAL + 3, "MAIL still refused long after the spool was fine again")
            time.sleep(0.3)
        # The run was still going: the probe did not wait for it.
        self.assertLess(len(self.fake.messages), len(toks), "the queue run had ended: the test proves nothing")

    def test_probe_off_the_runtime(self):
        # Defect: the probe (create, fsync, fsync the directories) ran on the
        # runtime thread: on a disk whose fsync hangs, SMTP froze with it.
        r = self.start()
        # The directory new messages are written in (incoming/ until the
        # spool reused files, free/ since).
        incoming = os.path.join(r.spool, "free")
        os.rename(incoming, incoming + ".away")
        with open(incoming, "w") as f:
            f.write("not a directory\n")
        sh("fsfreeze", "-f", self.disk.mnt)
        self.undo.append(lambda: sh("fsfreeze", "-u", self.disk.mnt, check=False))
        # A DATA that fails at once (ENOTDIR: nothing blocks on the path
        # walk), which makes the relay probe the frozen spool.
        c = Client(r.port)
        c.cmd("EHLO client.sender.test")
        c.cmd("MAIL FROM:<alice@sender.test>")
        c.cmd("RCPT TO:<bob@example.org>")
        try:
            code, text = c.cmd("DATA")
        except socket.timeout:
            self.fail("no reply to DATA: the relay's runtime is blocked")
        self.assertEqual(code, 451, text)
        c.close()
        end = time.monotonic() + 6
        worst = 0.0
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                c = Client(r.port, timeout=3)
                self.assertEqual(c.banner[0], 220)
                code, _ = c.cmd("EHLO client.sender.test")
                self.assertEqual(code, 250)
                code, _ = c.cmd("MAIL FROM:<alice@sender.test>")
                self.assertEqual(code, 452, "MAIL accepted while the spool probe has not passed")
                c.close()
            except socket.timeout:
                self.fail(f"SMTP did not answer within 3 s while the spool was frozen ({time.monotonic() - end + 6:.1f}s after the failed DATA)")
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.3)
        self.assertLess(worst, 2.0)
        sh("fsfreeze", "-u", self.disk.mnt)
        os.remove(incoming)
        os.rename(incoming + ".away", incoming)
        # The hung probe came back: probing goes on, and mail is taken again.
        t0 = time.monotonic()
        while mail_reply(r.port)[0] != 250:
            self.assertLess(time.monotonic() - t0, PROBE_INTERVAL + 35, "MAIL still refused after the spool thawed")
            time.sleep(0.3)
        send(r.port, "after-thaw")

    def test_no_reconnect_for_nothing(self):
        # Defect: after a broken connection the worker opened a new one even
        # when no message was left, which against a hostile primary costs
        # connect_timeout + 2 x delivery_timeout while the run waits for it.
        r = Relay(extra="delivery_connections = 1")
        self.fake = FakePrimary(r.primary_port, {"end": Close()})
        self.relay = r.start()
        qid = send(r.port, "once")
        self.wait_log(qid + r": to=<bob@example.org>.*status=deferred")
        time.sleep(1.5)
        self.assertEqual(self.fake.connections, 1, "the worker reconnected with nothing left to deliver")


def main():
    harness.take_binary_arg()
    why = loop_devices_usable()
    if why:
        print(f"spool_recording: FAILED: loop devices unavailable ({why}): this suite needs root and /dev/loop-control")
    harness.report("spool_recording", unittest.main(exit=False, verbosity=2).result)


if __name__ == "__main__":
    main()
