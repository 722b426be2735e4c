#!/usr/bin/env python3
"""Small SMTP/HTTP client for the QEMU tests (stdlib only).

  mailtool.py banner PORT TIMEOUT           wait for a 220 banner, print it
  mailtool.py send PORT RCPT MARKER          send one message, print the 250 reply
  mailtool.py get URL                        print the body (exit 1 on error)
  mailtool.py flush BASEURL                  GET / for the token, POST /flush, print the reply
  mailtool.py etrn PORT DOMAIN               EHLO + ETRN, print the reply
"""
import re
import smtplib
import socket
import sys
import time
import urllib.parse
import urllib.request


def banner(port, timeout):
    """Waits for a 220 banner. QEMU's port forward accepts at once and only
    then tries the guest, so one try is short (a guest that is not up yet
    closes it or never answers) and tries follow each other closely: the
    time printed is the boot's, not the probe's (it used to wait 10-15 s a try)."""
    start = time.monotonic()
    end = start + float(timeout)
    last = ""
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", int(port)), timeout=2) as s:
                s.settimeout(3)
                data = b""
                while b"\n" not in data:
                    chunk = s.recv(512)
                    if not chunk:
                        break
                    data += chunk
                line = data.decode("latin-1").strip()
                if line.startswith("220"):
                    try:
                        s.sendall(b"QUIT\r\n")
                    except OSError:
                        pass
                    print(f"{line} [after {time.monotonic() - start:.1f}s]")
                    return 0
                last = line or "(connection closed without a banner)"
        except OSError as e:
            last = str(e)
        time.sleep(0.25)
    print("no banner: " + last)
    return 1


def send(port, rcpt, marker):
    msg = (
        "From: QEMU test <tester@example.net>\r\n"
        f"To: <{rcpt}>\r\n"
        f"Subject: bartleby qemu test {marker}\r\n"
        f"Message-ID: <{marker}@example.net>\r\n"
        "\r\n"
        f"Test body {marker}\r\n"
    )
    s = smtplib.SMTP("127.0.0.1", int(port), timeout=120)
    s.ehlo("tester.example.net")
    s.mail("tester@example.net")
    code, resp = s.rcpt(rcpt)
    if code != 250:
        print(f"RCPT {code} {resp.decode()}")
        return 1
    code, resp = s.data(msg.encode())
    print(f"{code} {resp.decode()}")
    try:
        s.quit()
    except smtplib.SMTPException:
        pass
    return 0 if code == 250 else 1


def get(url):
    with urllib.request.urlopen(url, timeout=60) as r:
        sys.stdout.write(r.read().decode("utf-8", "replace"))
    return 0


def flush(base):
    with urllib.request.urlopen(base + "/", timeout=60) as r:
        page = r.read().decode("utf-8", "replace")
    m = re.search(r'name="token"\s+value="([^"]*)"', page) or re.search(r'value="([^"]*)"\s+name="token"', page)
    data = urllib.parse.urlencode({"token": m.group(1) if m else ""}).encode()
    req = urllib.request.Request(base + "/flush", data=data, method="POST",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            print(r.status, r.read(300).decode("utf-8", "replace").strip().splitlines()[:1])
            return 0
    except urllib.error.HTTPError as e:
        print(e.code, e.read(300).decode("utf-8", "replace").strip().splitlines()[:1])
        return 0 if e.code in (302, 303) else 1


def etrn(port, domain):
    s = smtplib.SMTP("127.0.0.1", int(port), timeout=120)
    s.ehlo("tester.example.net")
    code, resp = s.docmd("ETRN", domain)
    print(f"{code} {resp.decode()}")
    try:
        s.quit()
    except smtplib.SMTPException:
        pass
    return 0 if code in (250, 251, 252, 253) else 1


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    try:
        sys.exit({"banner": banner, "send": send, "get": get, "flush": flush, "etrn": etrn}[cmd](*args))
    except Exception as e:  # noqa: BLE001 - the test prints the reason
        print(f"{cmd}: {type(e).__name__}: {e}")
        sys.exit(1)
