"""A hostile primary, table-driven: every row scripts the fake primary to
answer one step of the delivery (greeting, EHLO, MAIL, RCPT, DATA, the end
of data, RSET) with something wrong: a wrong code or class, extra lines, a
doubled greeting, silence, a close, a partial line, an endless or a 1 MiB
reply, garbage. Every row runs against a primary with and without
PIPELINING.

One invariant for every row: a message is marked sent (log `status=sent`,
state file `sent`, queue file removed) only when the primary answered the
end of its data with a 2xx; otherwise nothing is removed, nothing bounces,
the message stays in the queue (mailq shows it) and a well-behaved primary
(Postfix's smtp-sink) gets it intact afterwards. The relay never dies and
its memory stays bounded.

Postfix's smtp client (src/smtp/smtp_proto.c, smtp_chat.c, smtp_trouble.c)
is noted per row where it differs. The main difference: Postfix takes a
reply of the wrong class (a 2xx or 3xx where only 4xx/5xx fit, e.g. "250"
to DATA) as "Protocol error: host X said: ..." with status 5.5.0 and
*bounces* the message; Bartleby defers: with a single primary and no other
MX, a broken or desynchronised primary must not bounce the queue, and a
delay (or at worst a duplicate) is better than a loss.

Run: python3 tests/relay/test_hostile_primary.py [path/to/bartleby]
"""

import concurrent.futures
import os
import re
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Close, Endless, FakePrimary, Relay, Silent, Sink, proc_status, queued_id, strip_sink_headers  # noqa: E402
import smtplib  # noqa: E402

MIB = 1 << 20
# Timeouts small enough for the silent rows: a reply must come within
# delivery_timeout (the end-of-data reply within twice that).
EXTRA = 'delivery_timeout = "2s"\nconnect_timeout = "2s"\ndelivery_connections = 1'
# Two messages per row, so RSET is exercised and a failure on one
# connection is followed by a fresh one: m1 with two recipients, m2 with one.
MESSAGES = [
    (("bob@example.org", "carol@example.org"), b"Subject: m1\r\nMessage-ID: <m1-%(row)s@sender.test>\r\n\r\n.dot line\r\nbody \xc3\xa9 one\r\n"),
    (("dave@example.org",), b"Subject: m2\r\nMessage-ID: <m2-%(row)s@sender.test>\r\n\r\nbody two\r\n..\r\n"),
]

PROTO = r"Protocol error: host 127\.0\.0\.1\[127\.0\.0\.1\]:\d+ "
LOST = r"4\.4\.2 lost connection with 127\.0\.0\.1\[127\.0\.0\.1\]:\d+ while "
TIMEOUT = r"4\.4\.2 conversation with 127\.0\.0\.1\[127\.0\.0\.1\]:\d+ timed out while "


def utf8_greeting(port):
    """A 554 greeting whose error text, as the relay words it, has a 3-byte
    character across byte 300 (where the page's copy of it was cut)."""
    prefix = f"host 127.0.0.1[127.0.0.1]:{port} refused to talk to me: 554 5.3.2 "
    return {"greeting": "554 5.3.2 " + "x" * (299 - len(prefix)) + "\u20ac" * 200}


# (name, replies, expected outcome, deferral reason regex, note)
# outcome: "deferred" (both messages), "sent" (both), "one" (one sent, the
# other deferred: RSET only happens between messages). `replies` may be a
# function of the primary's port.
ROWS = [
    # --- the greeting -----------------------------------------------------
    ("greet_double", {"greeting": "220 primary.example.org ESMTP\r\n220 primary.example.org ESMTP"}, "deferred",
     PROTO + r"sent more than its reply: \"220 primary", "Postfix reads the 2nd 220 as the EHLO reply: desync"),
    ("greet_250", {"greeting": "250 primary.example.org"}, "deferred", PROTO + r"said: 250 primary\.example\.org \(in the server greeting\)",
     "Postfix accepts any 2xx greeting"),
    ("greet_1xx", {"greeting": "120 wait"}, "deferred", PROTO + r"said: 120 wait", "Postfix: refused to talk to me, deferred"),
    ("greet_699", {"greeting": "699 what"}, "deferred", PROTO + r"said: 699 what", ""),
    ("greet_garbage", {"greeting": b"hello there\r\n"}, "deferred", PROTO + r"sent a malformed reply: \"hello there\"",
     "Postfix skips non-reply lines (a warning), reads on"),
    ("greet_mismatch", {"greeting": "220-primary.example.org\r\n250 ESMTP"}, "deferred", PROTO + r"sent a multi-line reply with different codes", ""),
    ("greet_silent", {"greeting": Silent()}, "deferred", TIMEOUT + r"receiving the initial server greeting", ""),
    ("greet_close", {"greeting": Close()}, "deferred", LOST + r"receiving the initial server greeting", ""),
    ("greet_partial_close", {"greeting": [b"220 prim", Close()]}, "deferred", LOST + r"receiving the initial server greeting", ""),
    ("greet_endless_lines", {"greeting": Endless(b"220-" + b"x" * 60 + b"\r\n")}, "deferred", PROTO + r"sent a reply of more than 100 lines",
     "Postfix keeps reading (text capped at 2048), bounded only by its timeouts"),
    ("greet_1mib_line", {"greeting": b"220 " + b"x" * MIB + b"\r\n"}, "deferred", PROTO + r"sent a reply line longer than 2048 bytes",
     "Postfix cuts at line_length_limit 2048 and uses the line"),
    ("greet_endless_no_lf", {"greeting": Endless(b"220 " + b"y" * 4092)}, "deferred", PROTO + r"sent a reply line longer than 2048 bytes", ""),
    ("greet_554_utf8", utf8_greeting, "deferred", r"refused to talk to me: 554 5\.3\.2 ",
     "stats cut the error at byte 300: a panic across a UTF-8 character"),
    ("greet_own_hostname", {"greeting": "220 backup.example.org ESMTP"}, "deferred", r"4\.4\.6 mail for 127\.0\.0\.1 loops back to myself",
     "Postfix only warns on the greeting, defers on the EHLO reply"),
    ("greet_junk_text", {"greeting": b"220 primary \x00\xff\xfe\x1b[31m \x07 junk\r\n"}, "sent", None, "text is junk, the reply is fine"),
    # --- EHLO ---------------------------------------------------------------
    ("ehlo_own_hostname", {"EHLO": "250-BACKUP.example.org\r\n250 PIPELINING"}, "deferred", r"4\.4\.6 mail for 127\.0\.0\.1 loops back to myself",
     "Postfix: 4.4.6 (5.4.6 when it is the best MX) mail for X loops back to myself"),
    ("ehlo_354", {"EHLO": "354 go ahead"}, "deferred", PROTO + r"said: 354 go ahead \(in reply to EHLO command\)", ""),
    ("ehlo_220", {"EHLO": "220 primary.example.org\r\n250 primary.example.org"}, "deferred", PROTO + r"said: 220 primary\.example\.org \(in reply to EHLO command\)",
     "a late doubled greeting; Postfix takes any 2xx to EHLO"),
    ("ehlo_mismatch", {"EHLO": "250-primary.example.org\r\n220 PIPELINING"}, "deferred", PROTO + r"sent a multi-line reply with different codes", ""),
    ("ehlo_garbage_line", {"EHLO": "250-primary.example.org\r\nPIPELINING\r\n250 8BITMIME"}, "deferred", PROTO + r"sent a malformed reply: \"PIPELINING\"", ""),
    ("ehlo_size_junk", {"EHLO": ["250-primary.example.org", "250-SIZE -1", "250-SIZE 99999999999999999999999", "250-SIZE abc",
                                 b"250-\xff\xfe\x00 SIZE\r\n", "250-SIZE", "250-SIZE=x12", "250 8BITMIME"]}, "sent", None,
     "keywords that make no sense are ignored (a real SIZE below the message size bounces it, as in Postfix)"),
    ("ehlo_bare_lf", {"EHLO": b"250-primary.example.org\n250 8BITMIME\n"}, "sent", None, "bare LF line ends are accepted, as Postfix does"),
    ("ehlo_silent", {"EHLO": Silent()}, "deferred", TIMEOUT + r"performing the EHLO handshake", ""),
    ("ehlo_close", {"EHLO": Close()}, "deferred", LOST + r"performing the EHLO handshake", ""),
    ("ehlo_partial_close", {"EHLO": [b"250-primary.example.org\r\n250 PIPEL", Close()]}, "deferred", LOST + r"performing the EHLO handshake", ""),
    ("ehlo_endless_lines", {"EHLO": Endless(b"250-XKEYWORD " + b"z" * 50 + b"\r\n")}, "deferred", PROTO + r"sent a reply of more than 100 lines", ""),
    ("ehlo_1mib_line", {"EHLO": b"250 " + b"k" * MIB + b"\r\n"}, "deferred", PROTO + r"sent a reply line longer than 2048 bytes", ""),
    # --- MAIL FROM -----------------------------------------------------------
    ("mail_354", {"MAIL": "354 go ahead"}, "deferred", PROTO, "Postfix: 3xx has no DSN: 5.5.0, bounced"),
    ("mail_1xx", {"MAIL": "150 hmm"}, "deferred", PROTO, ""),
    ("mail_699", {"MAIL": "699 hmm"}, "deferred", PROTO, ""),
    ("mail_extra", {"MAIL": "250 2.1.0 Ok\r\n250 2.1.0 Ok again"}, "deferred", PROTO, "non-pipelined: seen before RCPT; pipelined: shifts every reply"),
    ("mail_garbage", {"MAIL": b"\x00\x01garbage\r\n"}, "deferred", PROTO + r"sent a malformed reply", ""),
    ("mail_mismatch", {"MAIL": "250-2.1.0 Ok\r\n550 5.1.0 no"}, "deferred", PROTO + r"sent a multi-line reply with different codes", ""),
    ("mail_silent", {"MAIL": Silent()}, "deferred", TIMEOUT + r"sending MAIL FROM", ""),
    ("mail_close", {"MAIL": Close()}, "deferred", LOST + r"sending MAIL FROM", ""),
    ("mail_partial_close", {"MAIL": [b"250 2.1", Close()]}, "deferred", LOST + r"sending MAIL FROM", ""),
    ("mail_endless_lines", {"MAIL": Endless(b"250-ok\r\n")}, "deferred", PROTO + r"sent a reply of more than 100 lines", ""),
    ("mail_1mib_line", {"MAIL": b"250 " + b"m" * MIB + b"\r\n"}, "deferred", PROTO + r"sent a reply line longer than 2048 bytes", ""),
    # --- RCPT TO -------------------------------------------------------------
    ("rcpt_354", {"RCPT": "354 go ahead"}, "deferred", PROTO, "Postfix: 5.5.0, bounced"),
    ("rcpt_1xx", {"RCPT": "199 hmm"}, "deferred", PROTO, ""),
    ("rcpt_000", {"RCPT": "000 hmm"}, "deferred", PROTO, ""),
    ("rcpt_extra", {"RCPT": "250 2.1.5 Ok\r\n250 2.1.5 Ok again"}, "deferred", PROTO, ""),
    ("rcpt_extra_then_550", {"RCPT#1": "250 2.1.5 Ok\r\n550 5.1.1 shifted"}, "deferred", PROTO,
     "a desync must void the whole transaction: never bounce on a shifted 5xx"),
    ("rcpt_garbage", {"RCPT": b"OK\r\n"}, "deferred", PROTO + r"sent a malformed reply", ""),
    ("rcpt_mismatch", {"RCPT": "550-5.1.1 no\r\n250 2.1.5 yes"}, "deferred", PROTO + r"sent a multi-line reply with different codes", ""),
    ("rcpt_silent", {"RCPT": Silent()}, "deferred", TIMEOUT + r"sending RCPT TO", ""),
    ("rcpt2_close", {"RCPT#2": Close()}, "one", LOST + r"sending RCPT TO", "m1 deferred; m2, with one recipient, goes on a new connection"),
    ("rcpt_partial_close", {"RCPT": [b"250 2.1.5 O", Close()]}, "deferred", LOST + r"sending RCPT TO", ""),
    ("rcpt_endless_lines", {"RCPT": Endless(b"250-ok\r\n")}, "deferred", PROTO + r"sent a reply of more than 100 lines", ""),
    ("rcpt_1mib_line", {"RCPT": b"250 " + b"r" * MIB + b"\r\n"}, "deferred", PROTO + r"sent a reply line longer than 2048 bytes", ""),
    # --- DATA ------------------------------------------------------------
    ("data_250", {"DATA": "250 2.0.0 Ok"}, "deferred", PROTO + r"said: 250 2\.0\.0 Ok \(in reply to DATA command\)",
     "THE defect: was logged sent. Postfix: Protocol error ..., 5.5.0, bounced"),
    ("data_220", {"DATA": "220 hello"}, "deferred", PROTO + r"said: 220 hello \(in reply to DATA command\)", ""),
    ("data_1xx", {"DATA": "150 go"}, "deferred", PROTO, ""),
    ("data_334", {"DATA": "334 go"}, "deferred", PROTO + r"said: 334 go \(in reply to DATA command\)", ""),
    ("data_354_extra", {"DATA": "354 go ahead\r\n250 2.0.0 Ok"}, "deferred", PROTO + r"sent more than its reply", "an early 250 must not be read as the end-of-data reply"),
    ("data_354_twice", {"DATA": "354 go ahead\r\n354 go ahead"}, "deferred", PROTO + r"sent more than its reply", ""),
    ("data_garbage", {"DATA": b"go ahead\r\n"}, "deferred", PROTO + r"sent a malformed reply", ""),
    ("data_mismatch", {"DATA": "354-go\r\n250 ahead"}, "deferred", PROTO + r"sent a multi-line reply with different codes", ""),
    ("data_silent", {"DATA": Silent()}, "deferred", TIMEOUT + r"sending DATA command", ""),
    ("data_close", {"DATA": Close()}, "deferred", LOST + r"sending DATA command", ""),
    ("data_partial_close", {"DATA": [b"354 go", Close()]}, "deferred", LOST + r"sending DATA command", ""),
    ("data_endless_lines", {"DATA": Endless(b"354-go\r\n")}, "deferred", PROTO + r"sent a reply of more than 100 lines", ""),
    ("data_1mib_line", {"DATA": b"250 " + b"d" * MIB + b"\r\n"}, "deferred", PROTO + r"sent a reply line longer than 2048 bytes",
     "was read as a 250 to DATA (first 1024 bytes): sent"),
    # --- the end of data -------------------------------------------------
    ("end_354", {"end": "354 more"}, "deferred", PROTO + r"said: 354 more \(in reply to end of DATA command\)", "Postfix: 5.5.0, bounced"),
    ("end_1xx", {"end": "100 hmm"}, "deferred", PROTO, ""),
    ("end_699", {"end": "699 hmm"}, "deferred", PROTO, ""),
    ("end_extra", {"end": "250 2.0.0 Ok: queued\r\n250 2.0.0 Ok again"}, "deferred", PROTO + r"sent more than its reply",
     "the 250 may belong to something else: defer, delivered twice at worst. Postfix delivers once"),
    ("end_garbage", {"end": b"queued!\r\n"}, "deferred", PROTO + r"sent a malformed reply", ""),
    ("end_mismatch", {"end": "250-2.0.0 Ok\r\n550 5.0.0 no"}, "deferred", PROTO + r"sent a multi-line reply with different codes", ""),
    ("end_silent", {"end": Silent()}, "deferred", TIMEOUT + r"sending end of data -- message may be sent more than once", ""),
    ("end_close", {"end": Close()}, "deferred", LOST + r"sending end of data -- message may be sent more than once", ""),
    ("end_partial_close", {"end": [b"250 2.0.0 O", Close()]}, "deferred", LOST + r"sending end of data", "a partial 250 is no 250"),
    ("end_endless_lines", {"end": Endless(b"250-queued\r\n")}, "deferred", PROTO + r"sent a reply of more than 100 lines", ""),
    ("end_1mib_line", {"end": b"250 " + b"e" * MIB + b"\r\n"}, "deferred", PROTO + r"sent a reply line longer than 2048 bytes",
     "Postfix cuts the line at 2048 and takes the 250: delivered once"),
    ("end_250_close", {"end": ["250 2.0.0 Ok: queued", Close()]}, "one", LOST + r"sending RSET",
     "the reply was complete: delivered; the next message finds the connection gone at RSET"),
    ("end_251", {"end": "251 2.0.0 Ok"}, "sent", None, "any 2xx to the end of data, as Postfix"),
    # --- RSET between the two messages ------------------------------------
    ("rset_extra", {"RSET": "250 2.0.0 Ok\r\n250 2.0.0 Ok again"}, "one", PROTO + r"sent more than its reply", ""),
    ("rset_354", {"RSET": "354 go"}, "one", PROTO + r"said: 354 go \(in reply to RSET command\)", ""),
    ("rset_silent", {"RSET": Silent()}, "one", TIMEOUT + r"sending RSET", ""),
    ("rset_close", {"RSET": Close()}, "one", LOST + r"sending RSET", ""),
    ("rset_endless", {"RSET": Endless(b"250-ok\r\n")}, "one", PROTO + r"sent a reply of more than 100 lines", ""),
]

# Memory: the relay's peak resident size after any row (the appliance's
# target is 4 MiB; the 1 MiB and endless replies must not show here).
MAX_HWM_KB = 8 * 1024


def wait(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def submit(r, rcpts, msg):
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.ehlo("client.sender.test")
        s.mail("alice@sender.test")
        for a in rcpts:
            code, resp = s.rcpt(a)
            if code != 250:
                raise AssertionError(f"RCPT {a}: {code} {resp}")
        code, resp = s.data(msg)
        if code != 250:
            raise AssertionError(f"DATA: {code} {resp}")
        return queued_id(resp.decode())


def state_of(r, qid):
    try:
        with open(os.path.join(r.spool, "state", qid), errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def attempts(r, qid):
    m = re.search(r"^attempts (\d+)$", state_of(r, qid), re.M)
    return int(m.group(1)) if m else 0


def run_row(name, replies, expect, why, pipelining):
    """Plays one row; returns a list of problems (empty: the row passed)."""
    problems = []
    tag = f"{name}-{'p' if pipelining else 'n'}"
    r = Relay(extra=EXTRA)
    fake = sink = None
    try:
        r.start()
        # Queue both messages while no primary listens: the first attempt
        # is refused, the dead-host cache holds the second, and the flush
        # below carries both over one connection (RSET between them).
        msgs = []
        for rcpts, body in MESSAGES:
            body = body % {b"row": tag.encode()}
            qid = submit(r, rcpts, body)
            msgs.append((qid, rcpts, body))
            if len(msgs) == 1 and not wait(lambda: attempts(r, qid) >= 1, 10):
                return [f"first attempt of {qid} not recorded"]
        tries = {qid: attempts(r, qid) + 1 for qid, _, _ in msgs}
        mark = len(r.read_log())
        if callable(replies):
            replies = replies(r.primary_port)
        fake = FakePrimary(r.primary_port, replies, pipelining=pipelining)
        r.flush()
        # Each message's attempt on the hostile primary is over once its
        # state holds the new attempt count or the message is gone.
        done = lambda: r.proc.poll() is not None or all(attempts(r, q) >= tries[q] or q not in r.queue_ids() for q, _, _ in msgs)  # noqa: E731
        if not wait(done, 40):
            problems.append("the attempts on the hostile primary did not end: " + repr({q: attempts(r, q) for q, _, _ in msgs}))
        if r.proc.poll() is not None:
            return problems + [f"the relay died (exit {r.proc.returncode})", "log tail:\n" + r.read_log()[-2500:]]
        # The queue file can show the attempt a moment before the relay's
        # buffered log lines of it are written: wait for one status line per
        # recipient (sent, deferred or bounced) of the messages still there.
        wait(lambda: all(re.search(rf"{q}: to=<{re.escape(a)}>, .*status=", r.read_log()[mark:]) or q not in r.queue_ids()
                         for q, rcpts, _ in msgs for a in rcpts), 5)
        hwm = proc_status(r.proc.pid)["VmHWM"]
        HWM[tag] = hwm
        if hwm > MAX_HWM_KB:
            problems.append(f"VmHWM {hwm} kB")
        log = r.read_log()[mark:]
        mailq = r.mailq()
        acked = b"\n".join(fake.acked)
        sent_ids = []
        for qid, rcpts, body in msgs:
            mid = re.search(rb"Message-ID: (<[^>]+>)", body).group(1)
            in_queue = qid in r.queue_ids()
            state = state_of(r, qid)
            sent_lines = [a for a in rcpts if re.search(rf"{qid}: to=<{re.escape(a)}>, relay=\S+, delay=[\d.]+, delays=[\d./]+, dsn=\d\.\d+\.\d+, status=sent", log)]
            marked = [a for a in rcpts if re.search(rf"^sent {re.escape(a)} ", state, re.M)]
            removed = not in_queue or f"{qid}: removed" in log
            if sent_lines or marked or removed:
                sent_ids.append(qid)
                # THE invariant: sent only after a 2xx to the end of data.
                if mid not in acked:
                    problems.append(f"{qid} marked sent (log {sent_lines}, state {marked}, removed {removed}) but the primary never acknowledged its end of data")
            else:
                if qid not in mailq:
                    problems.append(f"{qid} not in mailq")
                for a in rcpts:
                    m = re.search(rf"{qid}: to=<{re.escape(a)}>, relay=\S+, delay=[\d.]+, delays=[\d./]+, dsn=\d\.\d+\.\d+, status=deferred \((.*)\)$", log, re.M)
                    if not m:
                        problems.append(f"{qid} to {a}: no deferral logged")
                    elif why and not re.search(why, m.group(1)):
                        problems.append(f"{qid} to {a}: deferred for {m.group(1)[:200]!r}, expected /{why}/")
        if "status=bounced" in log or "non-delivery notification" in log:
            problems.append("something bounced: " + "; ".join(l for l in log.splitlines() if "bounced" in l or "non-delivery" in l)[:500])
        want = {"deferred": 0, "sent": 2, "one": 1}[expect]
        if len(sent_ids) != want:
            problems.append(f"{len(sent_ids)} messages sent on the hostile primary, expected {want}")
        # A well-behaved primary then gets what is left, intact.
        fake.stop()
        fake = None
        left = [m for m in msgs if m[0] not in sent_ids]
        sink = Sink(r.primary_port)
        r.flush()
        if not r.wait_empty(20):
            problems.append("not delivered to smtp-sink afterwards: " + r.mailq()[-500:])
            problems.append(f"smtp-sink exit status: {sink.proc.poll()}")
        got = [strip_sink_headers(raw).replace(b"\r\n", b"\n").rstrip(b"\n") for raw in sink.messages()]
        for qid, _, body in left:
            if body.replace(b"\r\n", b"\n").rstrip(b"\n") not in got:
                problems.append(f"{qid} not delivered intact to smtp-sink")
        log = r.read_log()
        if "status=bounced" in log:
            problems.append("a bounce after recovery")
        if r.proc.poll() is not None:
            problems.append(f"the relay died (exit {r.proc.returncode})")
    except Exception as e:  # noqa: BLE001 - a row's failure is reported, the others go on
        problems.append(f"{type(e).__name__}: {e}")
    finally:
        if fake:
            fake.stop()
        if sink:
            sink.stop()
        if problems:
            problems.append("log tail:\n" + r.read_log()[-6000:])
        r.cleanup()
        if getattr(r, "logf", None):
            r.logf.close()
    return problems


RESULTS = {}
HWM = {}


class HostilePrimary(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # Rows are independent (each has its own relay and ports) and mostly
        # wait on timeouts: run them side by side.
        t0 = time.monotonic()
        jobs = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=int(os.environ.get("HOSTILE_JOBS", "12"))) as ex:
            for name, replies, expect, why, _note in ROWS:
                for pipelining in (False, True):
                    jobs[(name, pipelining)] = ex.submit(run_row, name, replies, expect, why, pipelining)
        for k, fut in jobs.items():
            RESULTS[k] = fut.result()
        top = max(HWM.items(), key=lambda kv: kv[1], default=("-", 0))
        sys.stderr.write(f"  [hostile] {len(jobs)} rows in {time.monotonic() - t0:.1f} s; highest VmHWM {top[1]} kB ({top[0]})\n")


class LoopAtDelivery(unittest.TestCase):
    """A primary that greets with our own hostname (or names it in its EHLO
    reply) is Bartleby itself, or forwards to it: mail would loop. Postfix
    logs "mail for X loops back to myself" (4.4.6, or 5.4.6 when it is the
    best MX: a bounce). Bartleby defers: a misconfiguration must not bounce
    the queue. The primary is not counted as up (page, /metrics)."""

    def test_own_hostname_defers_and_primary_is_down(self):
        import urllib.request
        status_port = harness.free_port()
        r = Relay(extra=EXTRA, status=f'[status]\nlisten = "127.0.0.1:{status_port}"\nallow = ["127.0.0.1/32"]')
        try:
            r.start()
            self.assertTrue(harness.wait_port(status_port), r.read_log())

            def up():
                with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/metrics", timeout=5) as resp:
                    m = re.search(r"^bartleby_primary_up (\S+)$", resp.read().decode(), re.M)
                return m.group(1) if m else None

            for replies in ({"greeting": "220 Backup.Example.Org ESMTP"}, {"EHLO": "250-backup.example.org\r\n250 8BITMIME"}):
                fake = FakePrimary(r.primary_port, replies)
                try:
                    qid = submit(r, ("bob@example.org",), b"Subject: loop\r\n\r\nloop\r\n")
                    self.assertTrue(wait(lambda: attempts(r, qid) >= 1, 15), r.read_log())
                finally:
                    fake.stop()
                log = r.read_log()
                self.assertRegex(log, qid + r": to=<bob@example\.org>, relay=none, delay=[\d.]+, delays=[\d./]+, dsn=\d\.\d+\.\d+, status=deferred \(451 4\.4\.6 mail for 127\.0\.0\.1 loops back to myself\)")
                self.assertRegex(log, r"warning: host 127\.0\.0\.1\[127\.0\.0\.1\]:\d+ (greeted me|replied to HELO/EHLO) with my own hostname backup\.example\.org")
                self.assertEqual(fake.messages, [])
                self.assertIn(qid, r.queue_ids())
                self.assertIn("loops back to myself", r.mailq())
                self.assertEqual(up(), "0")
                self.assertNotIn("status=bounced", log)
                # A real primary then gets it; the primary counts as up again.
                sink = Sink(r.primary_port)
                try:
                    r.flush()
                    self.assertTrue(r.wait_empty(15), r.read_log()[-2000:])
                    self.assertEqual(up(), "1")
                finally:
                    sink.stop()
        finally:
            r.cleanup()
            if getattr(r, "logf", None):
                r.logf.close()


def make_test(name, pipelining):
    def test(self):
        problems = RESULTS.get((name, pipelining))
        if problems is None:
            self.fail("row did not run")
        if problems:
            self.fail("\n".join(problems))
    test.__doc__ = f"{name} ({'pipelined' if pipelining else 'not pipelined'})"
    return test


for _name, _replies, _expect, _why, _note in ROWS:
    for _p in (False, True):
        setattr(HostilePrimary, f"test_{_name}_{'pipelined' if _p else 'plain'}", make_test(_name, _p))


def main():
    harness.take_binary_arg()
    only = os.environ.get("HOSTILE_ROWS")
    if only:
        keep = set(only.split(","))
        ROWS[:] = [row for row in ROWS if row[0] in keep]
        for attr in list(vars(HostilePrimary)):
            if attr.startswith("test_") and not any(attr in (f"test_{k}_plain", f"test_{k}_pipelined") for k in keep):
                delattr(HostilePrimary, attr)
    harness.report("hostile", unittest.main(exit=False, verbosity=2).result)


if __name__ == "__main__":
    main()
