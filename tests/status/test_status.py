#!/usr/bin/env python3
"""Tests of the LAN status page (issue 3). Python 3 standard library only,
plus chromium for the real-browser test.

    python3 tests/status/test_status.py path/to/bartleby
    python3 tests/status/test_status.py --demo target/debug/examples/status_demo

With a `bartleby` binary the relay is started with `serve -c CONFIG` (SMTP,
scheduler and status page); with `--demo` the status_demo example (status
page only) is used. Either way the spool is seeded with queue files written
here, in the spool's on-disk format, before the process starts.

Prints figures (threads, VmRSS, VmSize) for the abuse tests, keeps a
screenshot in tests/artifacts/, and ends with `N passed, M failed`.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ROOT = os.path.dirname(os.path.dirname(HERE))
ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")

N_MESSAGES = 230  # more than the 200 rows the page shows
FLUSH_INTERVAL = 3
HOSTILE_SENDER = "<script>alert(1)</script>\"'&@evil.test"
# No break opportunity in 120 characters: must not widen the page on a phone.
LONG_SENDER = "a" * 64 + "@very-long-subdomain-without-any-break.sender-domain.example.test"
NOW = int(time.time())

# --------------------------------------------------------------------------
# Spool seeding (format: src/spool.rs)


def queue_id(i):
    return "%08X%05X" % (NOW - 86400 + i, 0x10 + i)


def write_message(spool, i, sender, rcpts, body, arrival, state=None):
    qid = queue_id(i)
    lines = ["BARTLEBY-QUEUE 1", "id " + qid, "arrival %d" % arrival,
             "client mx.sender.test[192.0.2.1]", "helo mx.sender.test", "from " + sender]
    lines += ["rcpt " + r for r in rcpts]
    header = ("\n".join(lines) + "\nlength %020d\n\n" % len(body)).encode()
    with open(os.path.join(spool, "queue", qid), "wb") as f:
        f.write(header + body)
    if state:
        with open(os.path.join(spool, "state", qid), "w") as f:
            f.write(state)
    return qid


def seed(spool, n):
    for d in ("incoming", "queue", "state", "corrupt"):
        os.makedirs(os.path.join(spool, d), exist_ok=True)
    ids, total = [], 0
    for i in range(n):
        body = b"Subject: test %d\r\n\r\nSECRET-BODY-TEXT line\r\n" % i + b"x" * (i * 37 % 5000) + b"\r\n"
        sender = {1: HOSTILE_SENDER, 2: "", 3: LONG_SENDER}.get(i, "alice%d@sender.test" % i)
        rcpts = ["bob@example.org"] if i % 3 else ["r%d@example.org" % k for k in range(6)]
        state = None
        if i % 2 == 0:
            state = ("attempts %d\nnext %d\nlast %d\nerror 421 4.3.2 <primary> busy, try later\n"
                     % (i % 7 + 1, NOW + 600 + i, NOW - 60))
        ids.append(write_message(spool, i, sender, rcpts, body, NOW - 86400 + i * 60, state))
        total += len(body)
    return ids, total


# --------------------------------------------------------------------------
# A tiny HTTP client on raw sockets (full control over every byte sent)


class Resp:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def header(self, name):
        return self.headers.get(name.lower())

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")


def dechunk(data):
    out, pos = b"", 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return out
        out += data[end + 2:end + 2 + size]
        pos = end + 2 + size + 2


def parse_response(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for l in lines[1:]:
        k, _, v = l.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked" and body:
        body = dechunk(body)
    return Resp(status, headers, body)


def raw_request(port, data, src="127.0.0.1", timeout=10):
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((src, 0))
    s.connect(("127.0.0.1", port))
    s.sendall(data)
    chunks = []
    while True:
        b = s.recv(65536)
        if not b:
            break
        chunks.append(b)
    s.close()
    return parse_response(b"".join(chunks))


def request(port, method, path, headers=None, body=b"", src="127.0.0.1", timeout=10):
    h = {"Host": "127.0.0.1:%d" % port}
    h.update(headers or {})
    if body or method == "POST":
        h["Content-Length"] = str(len(body))
    req = "%s %s HTTP/1.1\r\n" % (method, path) + "".join("%s: %s\r\n" % kv for kv in h.items()) + "\r\n"
    return raw_request(port, req.encode() + body, src, timeout)


def proc_status(pid):
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Threads", "VmRSS", "VmSize", "VmHWM"):
                out[k] = int(v.split()[0])
    return out


def fmt(st):
    return "threads=%d VmRSS=%d kB VmSize=%d kB VmHWM=%d kB" % (st["Threads"], st["VmRSS"], st["VmSize"], st["VmHWM"])


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


# --------------------------------------------------------------------------
# The system under test


class Relay:
    def __init__(self, binary, demo, n_messages=N_MESSAGES):
        self.binary = binary
        self.tmp = tempfile.mkdtemp(prefix="bartleby-status-")
        self.spool = os.path.join(self.tmp, "spool")
        self.ids, self.total = seed(self.spool, n_messages)
        self.port, self.smtp_port = free_port(), free_port()
        self.recipients = os.path.join(self.tmp, "recipients")
        with open(self.recipients, "w") as f:
            f.write("bob@example.org\n@example.org\n")
        old = time.time() - 10 * 86400
        os.utime(self.recipients, (old, old))  # older than recipients_max_age
        self.config = os.path.join(self.tmp, "bartleby.toml")
        with open(self.config, "w") as f:
            f.write(f'''hostname = "backup.example.org"
listen = ["127.0.0.1:{self.smtp_port}"]
spool = "{self.spool}"
relay_domains = ["example.org"]
primary = "127.0.0.1:1"
recipients = "{self.recipients}"

[status]
listen = "127.0.0.1:{self.port}"
allow = ["127.0.0.1/32"]
flush_interval = "{FLUSH_INTERVAL}s"
recipients_max_age = "7d"
names = ["status.lan", "203.0.113.7", "[2001:db8::7]"]
''')
        self.demo = demo
        cmd = [binary, self.config] if demo else [binary, "serve", "-c", self.config]
        env = dict(os.environ)
        # glibc reserves a 64 MiB malloc arena per thread, which swamps VmSize
        # on this x86_64 build; the musl target has no such arenas.
        env.setdefault("MALLOC_ARENA_MAX", "1")
        self.log = open(os.path.join(self.tmp, "stderr.log"), "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, env=env)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("relay exited: " + open(self.log.name, errors="replace").read())
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("status page did not start listening on %d" % self.port)
        time.sleep(0.3)

    def stop(self):
        if self.proc.poll() is not None:
            with open(self.log.name, errors="replace") as f:
                print("   last stderr lines:\n" + "".join(f.readlines()[-20:]))
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------------
# Tests

TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def get_token(r):
    page = request(r.port, "GET", "/").text
    m = re.search(r'name="token" value="([0-9a-f]+)"', page)
    check(m, "no token in the page")
    return m.group(1)


@test
def page_shows_queue(r):
    resp = request(r.port, "GET", "/")
    check(resp.status == 200, "status %d" % resp.status)
    check(resp.header("content-type").startswith("text/html"), resp.header("content-type"))
    t = resp.text
    table = t.split('id="queue-table"')[1].split("</table>")[0]
    for qid in r.ids[:200]:
        check(qid in table, "queue ID %s missing" % qid)
    check(table.count("<tr>") == 201, "%d rows, want 200 and a header" % (table.count("<tr>") - 1))
    check(r.ids[-1] not in table, "more than 200 rows shown")
    check("and %d more" % (len(r.ids) - 200) in t, "no 'and N more' line")
    check('name="viewport"' in t, "no viewport meta")
    check("<script" not in t.lower(), "a <script> in the page: escaping broken or JS used")
    # (<wbr>: a break opportunity in a long word, see phone_width_no_horizontal_scroll)
    check("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;@evil.test" in t.replace("<wbr>", ""), "hostile sender not escaped as expected")
    check("SECRET-BODY-TEXT" not in t, "message body shown")
    check('<form method="post" action="/flush">' in t and "Flush queue now" in t, "no flush form")
    check('id="recipients-warning"' in t, "no stale recipients list warning")
    check("Primary mail server" in t and "127.0.0.1:1" in t, "no primary section")
    check(re.search(r"<th>Size</th><th>Used</th><th>Avail</th><th>Use%</th>", t) and re.search(r"<td class=\"n\">\d+%</td>", t), "no df-style disk table")
    check("Memory" in t and "Load average" in t and "Machine uptime" in t, "no memory/load/uptime")
    check('<pre id="log">' in t, "no log section")
    check("<b>" not in t.split('<pre id="log">')[1], "raw HTML in the log/after")
    check(resp.header("content-security-policy"), "no CSP header")
    print("    page: %d bytes" % len(resp.body))


@test
def head_works(r):
    resp = request(r.port, "HEAD", "/")
    check(resp.status == 200 and resp.body == b"", "HEAD: %d, %d bytes" % (resp.status, len(resp.body)))


@test
def api_queue_json(r):
    resp = request(r.port, "GET", "/api/queue")
    check(resp.status == 200, "status %d" % resp.status)
    check(resp.header("content-type") == "application/json", resp.header("content-type"))
    d = json.loads(resp.body)
    check(d["count"] == len(r.ids), "count %s" % d["count"])
    check(len(d["messages"]) == len(r.ids), "messages %d" % len(d["messages"]))
    check(d["bytes"] == r.total, "bytes %s != %s" % (d["bytes"], r.total))
    check([m["id"] for m in d["messages"]] == r.ids, "ids differ")
    m1 = d["messages"][1]
    check(m1["sender"] == HOSTILE_SENDER, "sender round trip: %r" % m1["sender"])
    m0 = d["messages"][0]
    for k in ("id", "size", "sender", "recipients", "arrival", "arrival_iso", "attempts", "next_attempt", "last_error"):
        check(k in m0, "key %s missing" % k)
    check(isinstance(m0["arrival"], int) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", m0["arrival_iso"]), "arrival")
    check(len(d["messages"][0]["recipients"]) == 6, "recipients list")
    if r.demo:  # the real scheduler may have retried meanwhile
        check(m0["attempts"] == 1 and m0["last_error"] == "421 4.3.2 <primary> busy, try later", "state: %r" % m0)
    check(b"SECRET-BODY-TEXT" not in resp.body, "body leaked")


@test
def metrics_format(r):
    resp = request(r.port, "GET", "/metrics")
    check(resp.status == 200 and resp.header("content-type").startswith("text/plain; version=0.0.4"), "type")
    values, helps, types = {}, set(), set()
    for line in resp.text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split()[2])
        elif line.startswith("# TYPE "):
            types.add(line.split()[2])
            check(line.split()[3] in ("gauge", "counter"), line)
        elif line:
            name, value = line.split(" ")
            values[name] = float(value)
    for name in ("bartleby_queue_messages", "bartleby_queue_bytes", "bartleby_oldest_message_age_seconds",
                 "bartleby_received_total", "bartleby_delivered_total", "bartleby_deferred_total",
                 "bartleby_bounced_total", "bartleby_spool_free_bytes", "bartleby_primary_up", "bartleby_connections"):
        check(name in values and name in helps and name in types, "metric %s missing" % name)
    check(values["bartleby_queue_messages"] == len(r.ids), "queue_messages")
    check(values["bartleby_queue_bytes"] == r.total, "queue_bytes")
    check(86400 - 5 <= values["bartleby_oldest_message_age_seconds"] <= 86400 + 60, "oldest age")
    check(values["bartleby_spool_free_bytes"] > 0, "free bytes")


@test
def not_found_and_methods(r):
    check(request(r.port, "GET", "/nope").status == 404, "404")
    check(request(r.port, "GET", "/../etc/passwd").status in (400, 404), "traversal")
    resp = request(r.port, "PUT", "/")
    check(resp.status == 405 and "GET" in resp.header("allow"), "PUT / -> %d" % resp.status)
    check(request(r.port, "DELETE", "/metrics").status == 405, "DELETE")
    resp = request(r.port, "GET", "/flush")
    check(resp.status == 405 and resp.header("allow") == "POST", "GET /flush -> %d %s" % (resp.status, resp.header("allow")))


@test
def forbidden_peer(r):
    resp = request(r.port, "GET", "/api/queue", src="127.0.0.2")
    check(resp.status == 403, "status %d" % resp.status)
    check(not any(q in resp.text for q in r.ids[:5]) and len(resp.body) < 100, "data leaked to a forbidden peer")
    resp = request(r.port, "POST", "/flush", body=b"token=x", src="127.0.0.2")
    check(resp.status == 403, "flush from forbidden peer: %d" % resp.status)


@test
def spoofed_peer_header_is_ignored(r):
    # The gate strips client X-Bartleby-* headers and sets its own.
    resp = request(r.port, "GET", "/metrics", headers={"X-Bartleby-Gate": "guess", "X-Bartleby-Peer": "10.9.9.9"})
    check(resp.status == 200, "status %d" % resp.status)


# DNS rebinding (issue 10, defect 5): a page on evil.test whose name is
# re-pointed at the relay's LAN address reads the relay's answers as
# same-origin. Browsers always send the name they resolved in Host (scripts
# cannot change it), so the page answers only for its own names: the
# configured hostname, [status] names, localhost, and IP literals of its own
# addresses. Everything else gets 421 Misdirected Request and no data.
FOREIGN_HOSTS = ["evil.test", "evil.test:{port}", "EVIL.test.", "backup.example.org.evil.test",
                 "status.lan.evil.test", "127.0.0.1.evil.test", "localhost.evil.test", "xbackup.example.org",
                 "10.9.9.9", "192.0.2.1:{port}", "[2001:db8::1]", "[2001:db8::8]:{port}",
                 "203.0.113.8", "0.0.0.0", "[::]"]
# Not even well-formed: 400 or 421, never data.
MALFORMED_HOSTS = ["", "127.0.0.1:99999", "127.0.0.1:8o", "::1", "[::1", "[::1]x", "127.0.0.1 evil.test",
                   "user@127.0.0.1", "127.0.0.1/x", "%31%32%37.0.0.1", "[fe80::1%25lo]"]
ALLOWED_HOSTS = ["127.0.0.1", "127.0.0.1:{port}", "127.0.0.1.", "127.0.0.2:8080", "[::1]:{port}", "[::ffff:127.0.0.1]",
                 "backup.example.org", "BACKUP.Example.ORG:8080", "backup.example.org.", "backup.example.org.:{port}",
                 "status.lan", "Status.LAN.:80", "203.0.113.7", "203.0.113.7:{port}", "[2001:DB8::7]:{port}",
                 "localhost", "LocalHost.:{port}"]


def no_data(r, resp, token, what):
    body = resp.body
    check(token.encode() not in body, "%s: the flush token leaked" % what)
    check(not any(q.encode() in body for q in r.ids), "%s: a queue ID leaked" % what)
    check(b"bartleby_" not in body and b"example.org" not in body, "%s: metrics or names leaked" % what)
    check(len(body) < 300, "%s: %d bytes of body" % (what, len(body)))


def foreign_requests(r, token, host):
    """Every endpoint, as a rebinding page on `host` would ask for it."""
    origin = "http://" + host
    form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": origin}
    yield "GET /", request(r.port, "GET", "/", headers={"Host": host})
    yield "HEAD /", request(r.port, "HEAD", "/", headers={"Host": host})
    yield "GET /?flushed=1", request(r.port, "GET", "/?flushed=1", headers={"Host": host})
    yield "GET /api/queue", request(r.port, "GET", "/api/queue", headers={"Host": host})
    yield "GET /metrics", request(r.port, "GET", "/metrics", headers={"Host": host})
    yield "POST /flush", request(r.port, "POST", "/flush", headers=dict(form, Host=host), body=("token=" + token).encode())
    yield "GET /nope", request(r.port, "GET", "/nope", headers={"Host": host})


@test
def foreign_host_refused(r):
    token = get_token(r)
    flushes = metric(r, "bartleby_flush_requests_total")
    for host in FOREIGN_HOSTS:
        host = host.format(port=r.port)
        for what, resp in foreign_requests(r, token, host):
            what = "Host %r, %s" % (host, what)
            check(resp.status == 421, "%s: status %d, want 421" % (what, resp.status))
            no_data(r, resp, token, what)
    for host in MALFORMED_HOSTS:
        host = host.format(port=r.port)
        for what, resp in foreign_requests(r, token, host):
            what = "Host %r, %s" % (host, what)
            check(resp.status in (400, 421), "%s: status %d, want 400 or 421" % (what, resp.status))
            no_data(r, resp, token, what)
    check(metric(r, "bartleby_flush_requests_total") == flushes, "a flush with a foreign Host was counted")
    # HTTP/1.0 with a foreign Host is refused all the same.
    resp = raw_request(r.port, b"GET /api/queue HTTP/1.0\r\nHost: evil.test\r\n\r\n")
    check(resp.status == 421, "HTTP/1.0 with Host evil.test: %d" % resp.status)
    no_data(r, resp, token, "HTTP/1.0 evil.test")
    # RFC 9112 3.2: two Host fields, or HTTP/1.1 without one, is a 400.
    resp = raw_request(r.port, b"GET /api/queue HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.test\r\n\r\n")
    check(resp.status == 400, "two Host fields: %d" % resp.status)
    no_data(r, resp, token, "two Host fields")
    resp = raw_request(r.port, b"GET /api/queue HTTP/1.1\r\nHost: evil.test\r\nhost: 127.0.0.1\r\n\r\n")
    check(resp.status == 400, "two host fields: %d" % resp.status)
    resp = raw_request(r.port, b"GET /api/queue HTTP/1.1\r\nAccept: */*\r\n\r\n")
    check(resp.status == 400, "HTTP/1.1 without Host: %d" % resp.status)
    no_data(r, resp, token, "HTTP/1.1 without Host")
    # The refusal is logged, with the peer and the name.
    t0 = time.monotonic()
    while b'"evil.test"' not in open(r.log.name, "rb").read():
        check(time.monotonic() - t0 < 5, "no warning logged for Host evil.test")
        time.sleep(0.05)


@test
def own_names_answered(r):
    for host in ALLOWED_HOSTS:
        host = host.format(port=r.port)
        resp = request(r.port, "GET", "/", headers={"Host": host})
        check(resp.status == 200 and 'name="token"' in resp.text, "Host %r: %d" % (host, resp.status))
        resp = request(r.port, "GET", "/metrics", headers={"Host": host})
        check(resp.status == 200 and "bartleby_queue_messages" in resp.text, "Host %r, /metrics: %d" % (host, resp.status))
    # Prometheus and curl -0 send Host; an HTTP/1.0 client without Host (an
    # old text browser, a shell script) is not a browser that could be
    # rebound, and is answered: see http10_client.
    resp = raw_request(r.port, b"GET /metrics HTTP/1.0\r\n\r\n")
    check(resp.status == 200, "HTTP/1.0 without Host: %d" % resp.status)


def wait_for(cond, what, timeout=15):
    t0 = time.monotonic()
    while True:
        v = cond()
        if v:
            return v
        check(time.monotonic() - t0 < timeout, "timed out waiting for " + what)
        time.sleep(0.1)


def primary_down(r):
    try:
        return metric(r, "bartleby_primary_up") == 0
    except AssertionError:
        return False


def send_mail(r, sender):
    import smtplib
    s = smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=10)
    s.ehlo("client.test")
    s.mail(sender)
    s.rcpt("bob@example.org")
    code, msg = s.data(b"Subject: test\r\n\r\nwaits for the primary\r\n")
    s.quit()
    check(code == 250, "DATA: %d %r" % (code, msg))
    return msg.decode().rsplit(" ", 1)[1]


def queue_entry(r, qid):
    d = json.loads(request(r.port, "GET", "/api/queue").body)
    return next((m for m in d["messages"] if m["id"] == qid), None)


@test
def dead_host_wait_is_shown(r):
    """Issue 10, defect 10: a message that arrives while the dead-host cache
    holds the primary as down is not tried before minimal_backoff (5 minutes
    by default) has passed. The page and /api/queue said "attempts 0, next
    retry now"; they must say that it waits for the primary, and until when.
    (Postfix's qmgr also holds mail for a dead destination without trying
    it; its mailq shows such mail without a reason of its own.)
    A relay of its own with an empty queue, so the message is on the page."""
    if r.demo:
        print("    (skipped: the demo runs no scheduler)")
        return
    r2 = Relay(r.binary, False, n_messages=0)
    try:
        first = send_mail(r2, "first@sender.test")
        # Tried at once; 127.0.0.1:1 refuses: the primary is taken as down.
        wait_for(lambda: (queue_entry(r2, first) or {}).get("attempts") == 1, "the first message's attempt")
        check(primary_down(r2), "primary not down after a refused connection")
        qid = send_mail(r2, "held@sender.test")
        t_sent = int(time.time())
        m = wait_for(lambda: queue_entry(r2, qid), "%s in /api/queue" % qid)
        page = request(r2.port, "GET", "/").text
    finally:
        r2.stop()
    print("    /api/queue: attempts=%s next_attempt=%s (sent %d) waiting_for_primary=%s"
          % (m["attempts"], m["next_attempt"], t_sent, m.get("waiting_for_primary")))
    check(m["attempts"] == 0, "attempts %s" % m["attempts"])
    # minimal_backoff is the default 5 minutes, counted from the first failure.
    check(t_sent + 240 < m["next_attempt"] <= t_sent + 301, "next_attempt %s, sent at %d" % (m["next_attempt"], t_sent))
    check(m.get("waiting_for_primary") is True, "waiting_for_primary: %r" % m.get("waiting_for_primary"))
    row = re.search(r"<tr><td class=\"id\">%s</td>.*?</tr>" % qid, page, re.S)
    check(row, "no queue row for %s" % qid)
    row = row.group(0)
    hms = time.strftime("%H:%M:%S", time.gmtime(m["next_attempt"]))
    check("waiting for the primary" in row and hms in row, "row does not say it waits until %s: %s" % (hms, row))
    check(">now<" not in row, "row still says 'now': %s" % row)
    # The primary's table says when new mail is tried next.
    prim = page.split('id="primary"')[1].split("</table>")[0]
    check("Next try" in prim and hms in prim, "primary table: no next try at %s" % hms)

def flush(r, token, headers=None):
    return request(r.port, "POST", "/flush", headers=dict({"Content-Type": "application/x-www-form-urlencoded"}, **(headers or {})),
                   body=("token=" + token).encode())


@test
def flush_cross_site_refused(r):
    token = get_token(r)
    origin = "http://127.0.0.1:%d" % r.port
    cases = [
        ("no token", "wrong", {"Origin": origin}),
        ("foreign Origin", token, {"Origin": "http://evil.example"}),
        ("null Origin", token, {"Origin": "null"}),
        ("foreign Referer", token, {"Referer": "http://evil.example/x"}),
        ("lookalike Origin", token, {"Origin": "http://127.0.0.1:%d.evil.example" % r.port}),
    ]
    for name, tok, h in cases:
        resp = flush(r, tok, h)
        check(resp.status == 403, "%s: %d" % (name, resp.status))


@test
def flush_and_rate_limit(r):
    token = get_token(r)
    origin = {"Origin": "http://127.0.0.1:%d" % r.port}
    before = metric(r, "bartleby_flush_requests_total")
    resp = flush(r, token, origin)
    check(resp.status == 303 and resp.header("location") == "/?flushed=1", "flush: %d %s" % (resp.status, resp.header("location")))
    check(metric(r, "bartleby_flush_requests_total") == before + 1, "request_flush not called")
    check('id="flushed"' in request(r.port, "GET", "/?flushed=1").text, "no feedback on /?flushed=1")
    resp = flush(r, token, {"Referer": "http://127.0.0.1:%d/" % r.port})
    check(resp.status == 429 and resp.header("retry-after"), "second flush: %d" % resp.status)
    wait = int(resp.header("retry-after"))
    check(1 <= wait <= FLUSH_INTERVAL, "Retry-After %d" % wait)
    time.sleep(wait + 0.2)
    resp = flush(r, token)  # lynx-style: no Origin, no Referer, token only
    check(resp.status == 303, "flush after the interval: %d" % resp.status)
    check(metric(r, "bartleby_flush_requests_total") == before + 2, "second flush not counted")


def metric(r, name):
    for line in request(r.port, "GET", "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError("no metric " + name)


@test
def oversized_head_and_body(r):
    resp = request(r.port, "GET", "/", headers={"X-Pad": "a" * 9000})
    check(resp.status == 431, "9 KB head: %d" % resp.status)
    resp = raw_request(r.port, b"POST /flush HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"t" * 1000)
    check(resp.status == 413, "big body: %d" % resp.status)
    resp = raw_request(r.port, b"POST /flush HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    check(resp.status == 501, "chunked body: %d" % resp.status)
    resp = raw_request(r.port, b"GARBAGE\r\n\r\n")
    check(resp.status == 400, "garbage: %d" % resp.status)


@test
def slow_client_times_out(r):
    s = socket.create_connection(("127.0.0.1", r.port))
    s.settimeout(15)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    t0 = time.monotonic()
    data = s.recv(4096)
    took = time.monotonic() - t0
    s.close()
    check(data.startswith(b"HTTP/1.1 408"), "got %r" % data[:40])
    print("    unfinished request answered 408 after %.1f s" % took)
    check(took < 8, "took %.1f s" % took)


def smtp_banner(r):
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", r.smtp_port), timeout=5)
    banner = s.recv(512)
    s.sendall(b"QUIT\r\n")
    s.close()
    check(banner.startswith(b"220"), "SMTP banner %r" % banner)
    return time.monotonic() - t0


@test
def idle_connections(r):
    base = proc_status(r.proc.pid)
    print("    idle:                 " + fmt(base))
    socks = []
    for _ in range(200):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.connect(("127.0.0.1", r.port))
        socks.append(s)
    time.sleep(0.5)
    held = proc_status(r.proc.pid)
    print("    200 idle connections: " + fmt(held))
    t0 = time.monotonic()
    resp = request(r.port, "GET", "/", timeout=5)
    took = time.monotonic() - t0
    check(resp.status == 200, "page under 200 idle connections: %d" % resp.status)
    print("    page answered in %.2f s while 200 idle connections were open" % took)
    check(took < 2, "took %.2f s" % took)
    if not r.demo:
        print("    SMTP banner in %.2f s" % smtp_banner(r))
    after = proc_status(r.proc.pid)
    print("    after the request:    " + fmt(after))
    for s in socks:
        s.close()
    check(held["Threads"] <= base["Threads"] + 1, "threads grew %d -> %d" % (base["Threads"], held["Threads"]))
    check(held["VmRSS"] - base["VmRSS"] < 2048, "RSS grew by %d kB" % (held["VmRSS"] - base["VmRSS"]))
    check(held["VmSize"] - base["VmSize"] < 4096, "VmSize grew by %d kB" % (held["VmSize"] - base["VmSize"]))


@test
def huge_header(r):
    base = proc_status(r.proc.pid)
    print("    before:               " + fmt(base))
    peak = dict(base)
    result = {}

    def attack():
        s = socket.create_connection(("127.0.0.1", r.port))
        s.settimeout(10)
        try:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"A" * (8 * 1024 * 1024) + b"\r\n\r\n")
            result["reply"] = s.recv(200)
        except OSError as e:
            result["error"] = repr(e)
            try:  # the gate answers 431 after 8 KiB and may reset later
                result["reply"] = s.recv(200)
            except OSError:
                pass
        finally:
            s.close()

    t = threading.Thread(target=attack)
    t.start()
    while t.is_alive():
        st = proc_status(r.proc.pid)
        for k in st:
            peak[k] = max(peak[k], st[k])
        time.sleep(0.01)
    t.join()
    after = proc_status(r.proc.pid)
    print("    peak during 8 MiB:    " + fmt(peak))
    print("    after:                " + fmt(after))
    print("    client saw: %s" % (result.get("reply", b"")[:32] or result.get("error")))
    check(result.get("reply", b"").startswith(b"HTTP/1.1 431") or "error" in result, "not refused: %r" % result)
    check(peak["VmRSS"] - base["VmRSS"] < 1024, "RSS grew by %d kB" % (peak["VmRSS"] - base["VmRSS"]))
    check(peak["Threads"] <= base["Threads"] + 1, "threads grew")
    check(request(r.port, "GET", "/metrics").status == 200, "page dead after the attack")
    if not r.demo:
        smtp_banner(r)


@test
def request_burst(r):
    results = []

    def one():
        try:
            results.append(request(r.port, "GET", "/metrics", timeout=20).status)
        except OSError as e:
            results.append(repr(e))

    base = proc_status(r.proc.pid)
    ts = [threading.Thread(target=one) for _ in range(40)]
    for t in ts:
        t.start()
    peak = proc_status(r.proc.pid)
    for t in ts:
        t.join()
    ok = results.count(200)
    busy = results.count(503)
    print("    40 simultaneous requests: %d x 200, %d x 503, other %s; threads %d -> %d"
          % (ok, busy, [x for x in results if x not in (200, 503)], base["Threads"], peak["Threads"]))
    check(ok + busy == 40 and ok >= 4, "results %r" % results)
    check(request(r.port, "GET", "/metrics").status == 200, "page dead after the burst")


@test
def http10_client(r):
    # lynx and w3m speak HTTP/1.0 without Host.
    resp = raw_request(r.port, b"GET / HTTP/1.0\r\nUser-Agent: Lynx/2.9\r\n\r\n")
    check(resp.status == 200 and r.ids[0] in resp.text, "HTTP/1.0 page: %d" % resp.status)
    resp = raw_request(r.port, b"GET /api/queue HTTP/1.0\r\n\r\n")
    check(resp.status == 200 and json.loads(resp.body)["count"] == len(r.ids), "HTTP/1.0 JSON")


@test
def accept_errors_do_not_stop_the_page(r):
    import resource
    pid = r.proc.pid
    nofile = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    used = len(os.listdir("/proc/%d/fd" % pid))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (used + 8, nofile[1]))
    socks, statuses = [], []
    try:
        for _ in range(60):
            s = socket.socket()
            s.connect(("127.0.0.1", r.port))
            socks.append(s)
        time.sleep(0.5)
        for _ in range(3):
            try:
                statuses.append(request(r.port, "GET", "/metrics", timeout=5).status)
            except (OSError, ValueError, IndexError) as e:
                statuses.append(type(e).__name__)
    finally:
        for s in socks:
            s.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, nofile)
    print("    with %d descriptors allowed and 60 idle connections: %s" % (used + 8, statuses))
    t0 = time.monotonic()
    while True:
        try:
            if request(r.port, "GET", "/", timeout=5).status == 200:
                break
        except (OSError, ValueError, IndexError):
            pass
        check(time.monotonic() - t0 < 10, "page did not recover after descriptor exhaustion")
        time.sleep(0.2)
    print("    page answered again %.1f s after the limit was lifted" % (time.monotonic() - t0))


def find_chromium():
    for c in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(c)
        if p:
            return p
    return None


@test
def browser_renders_queue(r):
    chromium = find_chromium()
    check(chromium, "chromium not installed")
    os.makedirs(ARTIFACTS, exist_ok=True)
    png = os.path.join(ARTIFACTS, "status-page.png")
    url = "http://127.0.0.1:%d/" % r.port
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    for mode in ("screenshot", "dom"):
        udd = tempfile.mkdtemp(prefix="chromium-")
        try:
            if mode == "screenshot":
                if os.path.exists(png):
                    os.unlink(png)
                cmd = base + ["--user-data-dir=" + udd, "--screenshot=" + png, "--window-size=1200,1600",
                              "--hide-scrollbars", url]
            else:
                cmd = base + ["--user-data-dir=" + udd, "--dump-dom", url]
            p = subprocess.run(cmd, capture_output=True, timeout=90)
        finally:
            shutil.rmtree(udd, ignore_errors=True)
        if mode == "screenshot":
            check(os.path.exists(png) and os.path.getsize(png) > 10000, "no screenshot: %s" % p.stderr[-500:])
            with open(png, "rb") as f:
                check(f.read(8) == b"\x89PNG\r\n\x1a\n", "not a PNG")
            print("    screenshot: %s (%d bytes)" % (os.path.relpath(png, ROOT), os.path.getsize(png)))
        else:
            dom = p.stdout.decode("utf-8", "replace")
            for qid in r.ids[:200]:
                check(qid in dom, "queue ID %s not in the rendered DOM" % qid)
            check('id="queue-table"' in dom, "no queue table in the DOM")
            check("Flush queue now" in dom, "no flush button in the DOM")
            check("<script>alert" not in dom, "hostile sender became markup")
            with open(os.path.join(ARTIFACTS, "status-page.html"), "w") as f:
                f.write(dom)


@test
def text_browser_reads_page(r):
    """The page works without CSS or JavaScript: w3m's plain-text dump shows
    the figures with their labels, the queue IDs and the flush button."""
    w3m = shutil.which("w3m")
    check(w3m, "w3m not installed")
    p = subprocess.run([w3m, "-dump", "-cols", "100", "http://127.0.0.1:%d/" % r.port],
                       capture_output=True, timeout=60)
    text = p.stdout.decode("utf-8", "replace")
    check(re.search(r"Queued: %d\b" % len(r.ids), text), "no 'Queued: N' line in the text dump")
    check("Spool disk free: " in text, "disk figure unlabelled in the text dump")
    check("Flush queue now" in text, "no flush button in the text dump")
    for qid in r.ids[:20]:
        check(qid in text, "queue ID %s not in the text dump" % qid)


# Issue 10, defect 10: the page overflowed a 390 px phone screen. Measured in
# Chromium over DevTools (see cdp.py): the document must not be wider than
# the viewport, no element may stick out of it, and no box may scroll
# sideways; at desktop width the queue is still a table.
LAYOUT_JS = r"""(() => {
  const vw = document.documentElement.clientWidth;
  const desc = el => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') +
      (typeof el.className === 'string' && el.className ? '.' + el.className.split(' ').join('.') : '');
  const out = {vw: vw, sw: document.documentElement.scrollWidth, wide: [], scrollers: []};
  for (const el of document.querySelectorAll('body *')) {
    const r = el.getBoundingClientRect();
    if (r.width > 0 && r.right > vw + 0.5 && out.wide.length < 8)
      out.wide.push(desc(el) + ' right=' + Math.round(r.right));
    if (getComputedStyle(el).overflowX !== 'visible' && el.scrollWidth > el.clientWidth + 1 && out.scrollers.length < 8)
      out.scrollers.push(desc(el) + ' ' + el.scrollWidth + '>' + el.clientWidth);
  }
  const td = document.querySelector('#queue-table tbody td:nth-child(6)');
  out.label = td ? getComputedStyle(td, '::before').content : null;
  out.row = td ? getComputedStyle(td.parentElement).display : null;
  out.head = getComputedStyle(document.querySelector('#queue-table thead')).display;
  return out;
})()"""


@test
def phone_width_no_horizontal_scroll(r):
    chromium = find_chromium()
    check(chromium, "chromium not installed")
    from cdp import Chromium
    os.makedirs(ARTIFACTS, exist_ok=True)
    url = "http://127.0.0.1:%d/" % r.port
    c = Chromium(chromium)
    try:
        s = c.open(url, 390, 844, True)
        phone = c.evaluate(s, LAYOUT_JS)
        png = os.path.join(ARTIFACTS, "status-page-390.png")
        c.screenshot(s, png, 390, 2400)
        print("    390 px: document %d px wide in a %d px viewport; screenshot %s"
              % (phone["sw"], phone["vw"], os.path.relpath(png, ROOT)))
        s = c.open(url, 800, 900, False)
        tablet = c.evaluate(s, LAYOUT_JS)
        s = c.open(url, 1200, 900, False)
        desk = c.evaluate(s, LAYOUT_JS)
        print("    800 px: document %d px wide; 1200 px: %d px wide, queue rows display as %s"
              % (tablet["sw"], desk["sw"], desk["row"]))
    finally:
        c.close()
    check(phone["vw"] == 390, "viewport %s, want 390" % phone["vw"])
    check(phone["sw"] <= phone["vw"], "the page is %d px wide at 390 px" % phone["sw"])
    check(not phone["wide"], "elements stick out at 390 px: %s" % phone["wide"])
    check(not phone["scrollers"], "boxes scroll sideways at 390 px: %s" % phone["scrollers"])
    # On a phone each queued message is a card whose cells carry their labels.
    check(phone["head"] == "none" and phone["row"] == "block", "queue at 390 px: head %s, rows %s" % (phone["head"], phone["row"]))
    check(phone["label"] and "Attempts" in phone["label"], "no label before the attempts cell: %r" % phone["label"])
    check(tablet["sw"] <= tablet["vw"] and not tablet["wide"] and not tablet["scrollers"], "overflow at 800 px: %r" % tablet)
    # At desktop width: a table with its head row, nothing sticking out.
    check(desk["sw"] <= desk["vw"] and not desk["wide"] and not desk["scrollers"], "desktop overflow: %r" % desk)
    check(desk["head"] == "table-header-group" and desk["row"] == "table-row", "desktop queue is not a table: %r" % desk)
    check(desk["label"] in ("none", "normal"), "labels shown in the desktop table: %r" % desk["label"])


@test
def lynx_reads_page(r):
    """lynx (HTTP/1.0 with Host, no CSS): the figures with their labels, the
    queue and a working flush form."""
    lynx = shutil.which("lynx")
    check(lynx, "lynx not installed (tests/setup.sh installs it)")
    p = subprocess.run([lynx, "-dump", "-width=100", "-nolist", "http://127.0.0.1:%d/" % r.port],
                       capture_output=True, timeout=60, env=dict(os.environ, TERM="dumb"))
    text = p.stdout.decode("utf-8", "replace")
    check(re.search(r"Queued: %d\b" % len(r.ids), text), "no 'Queued: N' in lynx's dump: %r" % text[:500])
    check("Spool disk free: " in text, "disk figure unlabelled in lynx's dump")
    check("Flush queue now" in text, "no flush button in lynx's dump")
    check("Attempts" in text and "Next retry" in text, "no queue table head in lynx's dump")
    for qid in r.ids[:20]:
        check(qid in text, "queue ID %s not in lynx's dump" % qid)
    with open(os.path.join(ARTIFACTS, "status-page-lynx.txt"), "w") as f:
        f.write(text)


# --------------------------------------------------------------------------


def main():
    args = sys.argv[1:]
    demo = False
    if args and args[0] == "--demo":
        demo, args = True, args[1:]
    if len(args) != 1:
        print(__doc__)
        return 2
    binary = os.path.abspath(args[0])
    only = os.environ.get("STATUS_TESTS")
    passed = failed = 0
    print("RUST_MIN_STACK in the environment: %s" % os.environ.get("RUST_MIN_STACK", "(unset)"))
    try:
        r = Relay(binary, demo)
    except Exception as e:
        print("cannot start %s: %s" % (binary, e))
        print("0 passed, 1 failed")
        return 1
    try:
        for t in TESTS:
            if only and t.__name__ not in only.split(","):
                continue
            print("-- %s" % t.__name__)
            try:
                t(r)
                passed += 1
                print("   ok")
            except Exception as e:
                failed += 1
                print("   FAIL")
                traceback.print_exc(limit=3)
                print("FAILED %s: %s" % (t.__name__, ((str(e) or repr(e)).splitlines() or ["?"])[0][:400]))
            if r.proc.poll() is not None:
                print("   the relay died (exit %s)" % r.proc.returncode)
                failed += 1
                break
    finally:
        r.stop()
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
