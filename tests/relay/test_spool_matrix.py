#!/usr/bin/env python3
"""Broken-spool matrix: start-up on a spool with one bad entry per row.

    python3 tests/relay/test_spool_matrix.py [path/to/bartleby]

A template spool is made once with real queued messages (sent through the
relay while the primary is down, so each has its queue file and a real
delivery state). Each row copies it, plants one bad entry (a directory, a
FIFO, a symlink to a file outside / to /dev/zero / dangling, a truncated,
non-UTF-8, zero-length or unreadable file) in one of incoming/, queue/,
state/, corrupt/, or breaks one of those directories itself (a file, a
dangling symlink, missing, unwritable), and then checks the rule of issue 10:

* `bartleby mailq` works on the broken spool before the server runs: it
  lists every readable message and names the unreadable ones with a reason;
* the relay starts within a few seconds, never hangs, never exits;
* the log names the bad entry by its path;
* with a primary (Postfix's smtp-sink) up and a flush, every good message
  arrives, with all its recipients;
* nothing readable was deleted: every planted file, its content, a symlink's
  target, a planted directory's contents, and every damaged queue or state
  file is still somewhere under the spool (in place, or in corrupt/).

Unreadable (EACCES) for root: the relay and `mailq` run under
`setpriv --bounding-set -dac_override,-dac_read_search`, so uid 0 without
CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: a `chmod 000` file gives a real
EACCES (checked by the test itself before relying on it), and a
`chmod 555` directory a real EACCES on create/unlink.

What Postfix does in the same cases (src/global/mail_open_ok.c,
src/qmgr/qmgr_active.c, src/showq/showq.c, read from vdukhovni/postfix):
* qmgr lstat()s every queue file and skips anything that is not a regular
  file with "warning: PATH: uid N: not a regular file" (a symlink is not
  followed); it leaves the entry where it is;
* a queue file whose content does not parse is moved to the corrupt queue
  ("warning: saving corrupt file ID from queue X to queue corrupt");
* a queue file it cannot open for another reason than ENOENT (EACCES) is
  "fatal: open active ID: Permission denied": qmgr exits and master restarts
  it later; the file is left alone, never moved or deleted;
* showq (mailq) skips a file it cannot open with a warning and lists the rest.
Bartleby follows that, except that at start-up it moves non-regular entries
to corrupt/ (logged with their path) instead of warning on every scan, and
mailq names unreadable entries in the listing itself rather than in syslog.

Loopback only; ports chosen free. The last line is "N passed, M failed".
"""

import os
import re
import shutil
import smtplib
import stat
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Client, Relay, Sink, wait_port  # noqa: E402

NOCAP = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
NEW_ID = "0000AAAA00001"  # a valid queue ID no real message has
START_TIMEOUT = 5.0


class MRelay(Relay):
    """A relay (and its CLI) run as root without the DAC capabilities."""

    def start(self, wait=True):
        self.logf = open(self.log, "ab")
        self.proc = subprocess.Popen(NOCAP + [harness.BINARY, "serve", "-c", self.config], stdout=self.logf, stderr=self.logf)
        if wait and not wait_port(self.port, timeout=START_TIMEOUT):
            raise AssertionError(f"relay did not start within {START_TIMEOUT}s:\n" + self.read_log()[-3000:])
        return self

    def cli(self, *args, check=False):
        return subprocess.run(NOCAP + [harness.BINARY, *args, "-c", self.config], capture_output=True, text=True, timeout=15, check=check)


def body(tok):
    return (f"From: alice@sender.test\r\nTo: bob@example.org\r\nSubject: {tok}\r\nMessage-ID: <{tok}@sender.test>\r\n\r\nbody {tok}\r\n").encode()


def send(port, tok, rcpts=("bob@example.org", "carol@example.org")):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.sender.test")
        s.mail("alice@sender.test")
        for r in rcpts:
            code, resp = s.rcpt(r)
            assert code == 250, resp
        code, resp = s.data(body(tok))
        assert code == 250, resp
        return resp.decode().split("queued as ")[1].strip()


def snapshot(root):
    """Everything under root, symlinks not followed: a list of
    (relative path, kind, payload): payload is the content of a regular
    file, the target of a symlink, None otherwise."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                out.append((rel, "link", os.readlink(p)))
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    out.append((rel, "file", f.read()))
            elif stat.S_ISFIFO(st.st_mode):
                out.append((rel, "fifo", None))
            elif stat.S_ISDIR(st.st_mode):
                out.append((rel, "dir", None))
        # os.walk does not descend into symlinked directories: fine.
    return out


class Template:
    """The spool every row starts from: three messages, two recipients
    each, deferred once (primary down), so queue/ and state/ are real."""

    dir = None
    spool = None
    msgs = []  # [(id, token)]

    @classmethod
    def make(cls):
        r = Relay()
        r.start()
        try:
            for i in range(3):
                tok = f"matrix-{i}"
                cls.msgs.append((send(r.port, tok), tok))
            # The primary was found down at the first: the others wait in the
            # dead-host cache. A flush tries (and defers) them all.
            r.flush()
            end = time.monotonic() + 15
            while time.monotonic() < end:
                if all(os.path.exists(os.path.join(r.spool, "state", i)) for i, _ in cls.msgs):
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError("template: no state files:\n" + r.read_log())
        finally:
            r.stop()
        cls.dir = r.dir
        cls.spool = r.spool
        os.remove(os.path.join(r.spool, "lock"))
        # Oldest first, as the spool sorts them.
        cls.msgs.sort()


class Row:
    def __init__(self, test, r, outside):
        self.t = test
        self.r = r
        self.sp = r.spool
        self.outside = outside
        self.good = list(Template.msgs)
        self.log_paths = []  # paths the log must name
        self.mailq_unreadable = []  # IDs mailq must name as unreadable
        self.keep = []  # (kind, payload) that must still exist under the spool
        self.outside_files = {}  # path -> content that must be unchanged
        self.restore = None  # run after the first check; then the rest is delivered too
        self.later = []  # messages delivered only after restore
        self.max_early = None  # at most this many messages before restore
        self.after = None
        # Before start-up, mailq may refuse a spool whose queue/ is not a
        # directory (no queue to list), naming it; after start-up it works.
        self.mailq_before_fails = False

    def p(self, *parts):
        return os.path.join(self.sp, *parts)

    def drop(self, mid):
        """mid is damaged by the row: not expected at the primary."""
        self.good = [(i, t) for i, t in self.good if i != mid]

    def plant_dir(self, path):
        os.mkdir(path)
        note = f"note in {os.path.basename(path)}".encode()
        with open(os.path.join(path, "note"), "wb") as f:
            f.write(note)
        self.keep.append(("file", note))
        self.log_paths.append(path)

    def plant_fifo(self, path):
        os.mkfifo(path)
        self.keep.append(("fifo", None))
        self.log_paths.append(path)

    def plant_link(self, path, target):
        os.symlink(target, path)
        self.keep.append(("link", target))
        self.log_paths.append(path)

    def outside_file(self, name, content):
        p = os.path.join(self.outside, name)
        with open(p, "wb") as f:
            f.write(content)
        self.outside_files[p] = content
        return p

    def keep_file(self, path):
        with open(path, "rb") as f:
            self.keep.append(("file", f.read()))


def g(i):
    return Template.msgs[i][0]


def queue_copy_with_id(src, new_id):
    with open(src, "rb") as f:
        data = f.read()
    head, sep, rest = data.partition(b"\n\n")
    lines = [b"id " + new_id.encode() if l.startswith(b"id ") else l for l in head.split(b"\n")]
    return b"\n".join(lines) + sep + rest


# --- the rows: each plants one bad thing -------------------------------------

def incoming_dir(x):
    x.plant_dir(x.p("incoming", NEW_ID))


def incoming_fifo(x):
    x.plant_fifo(x.p("incoming", NEW_ID))


def incoming_symlink_file(x):
    x.plant_link(x.p("incoming", NEW_ID), x.outside_file("passwd", b"root:x:0:0::/root:/bin/sh\n"))


def incoming_symlink_devzero(x):
    x.plant_link(x.p("incoming", NEW_ID), "/dev/zero")


def incoming_symlink_dangling(x):
    x.plant_link(x.p("incoming", NEW_ID), "/nonexistent/bartleby-dangling")


def incoming_unreadable(x):
    # A partial message (never acknowledged): removed as every partial is;
    # unlinking needs no read permission.
    p = x.p("incoming", NEW_ID)
    with open(p, "wb") as f:
        f.write(b"BARTLEBY-QUEUE 1\nid " + NEW_ID.encode() + b"\n")
    os.chmod(p, 0)


def queue_dir(x):
    x.plant_dir(x.p("queue", NEW_ID))
    x.mailq_unreadable.append(NEW_ID)


def queue_fifo(x):
    x.plant_fifo(x.p("queue", NEW_ID))
    x.mailq_unreadable.append(NEW_ID)


def queue_symlink_file(x):
    # A symlink to a complete, valid queue file: still refused (never
    # followed, as Postfix's lstat), and the file it points to untouched.
    target = x.outside_file(NEW_ID, queue_copy_with_id(x.p("queue", g(0)), NEW_ID))
    x.plant_link(x.p("queue", NEW_ID), target)
    x.mailq_unreadable.append(NEW_ID)


def queue_symlink_devzero(x):
    x.plant_link(x.p("queue", NEW_ID), "/dev/zero")
    x.mailq_unreadable.append(NEW_ID)


def queue_symlink_dangling(x):
    x.plant_link(x.p("queue", NEW_ID), "/nonexistent/bartleby-dangling")
    x.mailq_unreadable.append(NEW_ID)


def _damage_queue(x, i, fn):
    p = x.p("queue", g(i))
    with open(p, "rb") as f:
        data = f.read()
    data = fn(data)
    with open(p, "wb") as f:
        f.write(data)
    x.keep.append(("file", data))
    x.keep_file(x.p("state", g(i)))  # its state is kept too
    x.drop(g(i))
    x.log_paths.append(p)
    x.mailq_unreadable.append(g(i))


def queue_truncated(x):
    _damage_queue(x, 0, lambda d: d[:-5])


def queue_non_utf8(x):
    _damage_queue(x, 1, lambda d: d.replace(b"from alice@sender.test", b"from alic\xff@sender.test", 1))


def queue_zero_length(x):
    _damage_queue(x, 2, lambda d: b"")


def queue_unreadable(x):
    # Intact but unreadable (EACCES): left in queue/ with its state, named in
    # the log and by mailq; delivered once readable again.
    p = x.p("queue", g(0))
    os.chmod(p, 0)
    x.log_paths.append(p)
    x.mailq_unreadable.append(g(0))
    x.later = [m for m in x.good if m[0] == g(0)]
    x.drop(g(0))

    def restore():
        x.t.assertTrue(os.path.exists(p), "the unreadable queue file was moved or deleted")
        x.t.assertTrue(os.path.exists(x.p("state", g(0))), "its state was deleted")
        os.chmod(p, 0o600)

    x.restore = restore


def queue_bad_name(x):
    p = x.p("queue", "not-a-queue-id")
    with open(p, "wb") as f:
        f.write(b"an admin's note\n")
    x.keep.append(("file", b"an admin's note\n"))


def _state(x, i):
    p = x.p("state", g(i))
    os.remove(p)
    return p


def state_dir(x):
    x.plant_dir(_state(x, 0))


def state_fifo(x):
    x.plant_fifo(_state(x, 1))


def state_symlink_file(x):
    # A forged state that says bob already has the message: not followed,
    # so bob still gets it (a recipient may be tried again, never dropped).
    target = x.outside_file("forged-state", f"attempts 1\nnext 0\nlast 0\nerror x\nsent bob@example.org 250 forged\n".encode())
    x.plant_link(_state(x, 2), target)


def state_symlink_devzero(x):
    x.plant_link(_state(x, 0), "/dev/zero")


def state_symlink_dangling(x):
    x.plant_link(_state(x, 1), "/nonexistent/bartleby-dangling")


def _damage_state(x, i, fn):
    p = x.p("state", g(i))
    with open(p, "rb") as f:
        data = fn(f.read())
    with open(p, "wb") as f:
        f.write(data)
    x.keep.append(("file", data))
    x.log_paths.append(p)


def state_non_utf8(x):
    _damage_state(x, 0, lambda d: d.replace(b"attempts", b"\xff\xfeattempts", 1))


def state_truncated(x):
    _damage_state(x, 1, lambda d: d.rstrip(b"\n")[:-3])


def state_zero_length(x):
    _damage_state(x, 2, lambda d: b"")


def state_unreadable(x):
    # A state that cannot be read for a passing reason (EACCES here; EIO,
    # EMFILE alike) is not damaged: it stays in state/, and its message is
    # left alone (named unreadable by mailq) until it can be read, then sent
    # only to the recipients the state does not record as done. Taking it as
    # lost would send bob a second copy and move a good state to corrupt/.
    # (Postfix keeps recipient status in the queue file itself; a queue file
    # it cannot open, qmgr leaves alone: "fatal: open active ID".)
    p = x.p("state", g(0))
    with open(p, "ab") as f:
        f.write(b"sent bob@example.org 250 2.0.0 Ok: queued on an earlier attempt\n")
    # Not in x.keep: once readable, the state is used and, the message
    # done, removed with it. That it was kept while unreadable, restore checks.
    os.chmod(p, 0)
    x.log_paths.append(p)
    x.mailq_unreadable.append(g(0))
    x.later = [m for m in x.good if m[0] == g(0)]
    x.drop(g(0))

    def restore():
        x.t.assertTrue(os.path.isfile(p), "the unreadable delivery state was moved away")
        x.t.assertEqual(os.listdir(x.p("corrupt")), [], "something went to corrupt/")
        x.t.assertIn(g(0), x.r.queue_ids(), "the message was removed")
        os.chmod(p, 0o600)

    def after(x):
        tok = Template.msgs[0][1]
        copies = [b for b in x.t.sink.messages() if re.search(rb"Subject: " + tok.encode() + rb"\r?\n", b)]
        x.t.assertEqual(len(copies), 1, "not one copy")
        head = b"".join(l for l in copies[0].split(b"\n") if l.startswith(b"X-Rcpt"))
        x.t.assertIn(b"carol@example.org", head)
        x.t.assertNotIn(b"bob@example.org", head, "bob, recorded as sent, was sent the message again")

    x.restore = restore
    x.after = after


def state_tmp_dir(x):
    x.plant_dir(x.p("state", g(0) + ".tmp"))


def _corrupt_slot(x, plant):
    # g(0) is truncated, so start-up moves it to corrupt/, where something
    # already sits under its name.
    _damage_queue(x, 0, lambda d: d[:-5])
    plant(x.p("corrupt", g(0)))


def corrupt_dir_at_id(x):
    _corrupt_slot(x, x.plant_dir)


def corrupt_file_at_id(x):
    def plant(p):
        with open(p, "wb") as f:
            f.write(b"an older corrupt file of the same ID\n")
        x.keep.append(("file", b"an older corrupt file of the same ID\n"))

    _corrupt_slot(x, plant)


def corrupt_fifo_at_id(x):
    _corrupt_slot(x, x.plant_fifo)


def corrupt_symlink_at_id(x):
    _corrupt_slot(x, lambda p: x.plant_link(p, x.outside_file("old", b"outside\n")))


def _replace_dir_by_file(x, name):
    p = x.p(name)
    shutil.rmtree(p)
    with open(p, "wb") as f:
        f.write(f"a file named {name}\n".encode())
    x.keep.append(("file", f"a file named {name}\n".encode()))
    x.log_paths.append(p)


def incoming_is_file(x):
    _replace_dir_by_file(x, "incoming")


def queue_is_file(x):
    # No good messages left (the queue is gone): the relay must start and
    # take new mail; the file is kept.
    shutil.move(x.p("queue"), os.path.join(x.outside, "queue-saved"))
    x.good = []
    with open(x.p("queue"), "wb") as f:
        f.write(b"a file named queue\n")
    x.keep.append(("file", b"a file named queue\n"))
    x.log_paths.append(x.p("queue"))
    x.mailq_before_fails = True

    def after(x):
        # The relay works: a new message is taken and delivered.
        send(x.r.port, "after-queue-file")
        x.r.flush()
        counts, _ = x.t.delivered(x.t.sink, [("", "after-queue-file")])
        x.t.assertTrue(all(counts.values()), "a new message was not delivered")

    x.after = after


def state_is_file(x):
    _replace_dir_by_file(x, "state")


def corrupt_is_file(x):
    _replace_dir_by_file(x, "corrupt")
    _damage_queue(x, 0, lambda d: d[:-5])


def state_is_dangling_symlink(x):
    shutil.rmtree(x.p("state"))
    x.plant_link(x.p("state"), "/nonexistent/bartleby-state")


def incoming_is_dangling_symlink(x):
    shutil.rmtree(x.p("incoming"))
    x.plant_link(x.p("incoming"), "/nonexistent/bartleby-incoming")


def dirs_missing(x):
    for d in ("incoming", "state", "corrupt"):
        shutil.rmtree(x.p(d))


def incoming_unwritable(x):
    # New messages are written in free/ (incoming/ until the spool reused
    # files): the directory they are written in is the one made unwritable.
    os.chmod(x.p("free"), 0o555)

    def after(x):
        # New mail cannot be stored: refused with a 4xx, never a 250.
        c = Client(x.r.port)
        c.cmd("EHLO c")
        code, text = c.cmd("MAIL FROM:<alice@sender.test>")
        if code == 250:
            c.cmd("RCPT TO:<bob@example.org>")
            code, text = c.cmd("DATA")
            if code == 354:
                c.send(body("never") + b".\r\n")
                code, text = c.reply()
        c.close()
        x.t.assertTrue(400 <= code < 500, f"got {code} {text} for a message that cannot be stored")

    x.after = after


def state_unwritable(x):
    os.chmod(x.p("state"), 0o555)


def queue_unwritable(x):
    # Delivered messages cannot be removed: the relay says so, stops starting
    # deliveries (duplicates bounded by delivery_connections), and once the
    # directory is writable again records the removals: nothing is delivered
    # twice within the server's life.
    os.chmod(x.p("queue"), 0o555)
    x.log_paths.append(x.p("queue"))
    x.max_early = 1  # delivery_connections = 1 in this row

    def restore():
        os.chmod(x.p("queue"), 0o755)

    x.restore = restore
    x.later = list(x.good)
    x.good = []


ROWS = [
    incoming_dir, incoming_fifo, incoming_symlink_file, incoming_symlink_devzero, incoming_symlink_dangling,
    incoming_unreadable,
    queue_dir, queue_fifo, queue_symlink_file, queue_symlink_devzero, queue_symlink_dangling, queue_truncated,
    queue_non_utf8, queue_zero_length, queue_unreadable, queue_bad_name,
    state_dir, state_fifo, state_symlink_file, state_symlink_devzero, state_symlink_dangling, state_non_utf8,
    state_truncated, state_zero_length, state_unreadable, state_tmp_dir,
    corrupt_dir_at_id, corrupt_file_at_id, corrupt_fifo_at_id, corrupt_symlink_at_id,
    incoming_is_file, queue_is_file, state_is_file, corrupt_is_file, state_is_dangling_symlink,
    incoming_is_dangling_symlink, dirs_missing, incoming_unwritable, state_unwritable, queue_unwritable,
]


class Matrix(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # Is EACCES real for root under setpriv? (The unreadable rows rely on it.)
        with tempfile.NamedTemporaryFile() as f:
            os.chmod(f.name, 0)
            rc = subprocess.run(NOCAP + ["cat", f.name], capture_output=True).returncode
        if rc == 0:
            raise RuntimeError("setpriv did not drop CAP_DAC_OVERRIDE: cannot produce EACCES as root")
        Template.make()

    @classmethod
    def tearDownClass(cls):
        if Template.dir:
            shutil.rmtree(Template.dir, ignore_errors=True)

    def setUp(self):
        self.r = None
        self.sink = None
        self.outside = tempfile.mkdtemp(prefix="bartleby-outside-")

    def tearDown(self):
        failed = self._failed()
        if self.r:
            if failed:
                sys.stderr.write(f"\n--- relay log {self.r.log} ---\n{self.r.read_log()[-4000:]}\n")
            self.r.cleanup()
        if self.sink:
            self.sink.stop()
        shutil.rmtree(self.outside, ignore_errors=True)

    def _failed(self):
        res = getattr(self, "_outcome", None)
        if res is None or not hasattr(res, "result"):
            return False
        return any(t is self for t, _ in res.result.failures + res.result.errors)

    def mailq(self, r, want, unreadable):
        try:
            out = r.cli("mailq")
        except subprocess.TimeoutExpired:
            self.fail("mailq hung on the broken spool")
        self.assertEqual(out.returncode, 0, f"mailq failed: {out.stderr}")
        for i, _ in want:
            self.assertIn(i, out.stdout, f"mailq does not list {i}:\n{out.stdout}")
        for i in unreadable:
            line = next((l for l in out.stdout.splitlines() if l.startswith(i)), "")
            self.assertIn("unreadable", line, f"mailq does not name {i} as unreadable:\n{out.stdout}")
        return out.stdout

    def delivered(self, sink, msgs, timeout=15):
        """Waits until every token of msgs is in a sink file; returns the
        number of sink files holding each token."""
        end = time.monotonic() + timeout
        while True:
            blobs = sink.messages()
            counts = {t: sum(1 for b in blobs if f"Subject: {t}\r".encode() in b or f"Subject: {t}\n".encode() in b) for _, t in msgs}
            if all(counts.values()) or time.monotonic() > end:
                return counts, blobs
            time.sleep(0.1)

    def run_row(self, plant):
        r = MRelay(extra="delivery_connections = 1" if plant is queue_unwritable else "")
        self.r = r
        shutil.copytree(Template.spool, r.spool, symlinks=True)
        x = Row(self, r, self.outside)
        plant(x)
        # mailq needs no server: it must work on the broken spool as it is.
        if x.mailq_before_fails:
            out = r.cli("mailq")
            self.assertIn(x.p("queue"), out.stderr, "mailq does not say what is wrong")
        else:
            self.mailq(r, x.good + x.later, x.mailq_unreadable)
        t0 = time.monotonic()
        r.start()
        started = time.monotonic() - t0
        self.assertIsNone(r.proc.poll(), "relay exited")
        self.mailq(r, x.good + x.later, [])
        self.sink = Sink(r.primary_port)
        r.flush()
        counts, blobs = self.delivered(self.sink, x.good)
        missing = [t for t, n in counts.items() if n == 0]
        self.assertFalse(missing, f"good messages not delivered: {missing}")
        for b in blobs:
            # Every copy went to both recipients (a damaged state never drops one).
            if b"matrix-" in b:
                self.assertIn(b"carol@example.org", b)
                self.assertIn(b"bob@example.org", b, "a recipient was dropped")
        if x.max_early is not None:
            self.assertTrue(self.sink.wait_count(1, timeout=10), "nothing delivered")
            time.sleep(1.0)
            n = len(self.sink.files())
            self.assertLessEqual(n, x.max_early, "deliveries went on while the spool could not record them")
        if x.restore:
            x.restore()
            r.flush()
            counts, _ = self.delivered(self.sink, x.later)
            missing = [t for t, n in counts.items() if n == 0]
            self.assertFalse(missing, f"messages not delivered after the spool was fixed: {missing}")
            end = time.monotonic() + 10
            while time.monotonic() < end and r.queue_ids():
                time.sleep(0.1)
            time.sleep(0.5)
            counts, _ = self.delivered(self.sink, x.later + x.good, timeout=0)
            twice = {t: n for t, n in counts.items() if n > 1}
            self.assertFalse(twice, f"delivered twice within one server life: {twice}")
        if x.after:
            x.after(x)
        self.assertIsNone(r.proc.poll(), "relay exited")
        log = r.read_log()
        for p in x.log_paths:
            self.assertIn(p, log, f"the log does not name {p}")
        # Nothing readable deleted.
        r.stop()
        snap = snapshot(r.spool)
        for kind, payload in x.keep:
            self.assertTrue(
                any(k == kind and (payload is None or v == payload) for _, k, v in snap),
                f"{kind} {payload!r:.80} is gone from the spool; left: {[(p, k) for p, k, _ in snap]}",
            )
        for p, content in x.outside_files.items():
            with open(p, "rb") as f:
                self.assertEqual(f.read(), content, f"{p} outside the spool was changed")
        print(f"  {plant.__name__}: started in {started:.2f}s")


def make_test(plant):
    def test(self):
        self.run_row(plant)

    test.__doc__ = plant.__doc__
    return test


for _row in ROWS:
    setattr(Matrix, "test_" + _row.__name__, make_test(_row))


def main():
    harness.take_binary_arg()
    harness.report("spool_matrix", unittest.main(exit=False, verbosity=2).result)


if __name__ == "__main__":
    main()
