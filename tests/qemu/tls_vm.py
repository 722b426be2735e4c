"""The 486 VM does STARTTLS both ways (issue 12): boots the disk image in
qemu-system-i386 -cpu 486 -m 16 (plain TCG, then -icount shift=5, which runs
the guest at about 31 BogoMIPS, a 486DX2-66), with an ECDSA P-256 certificate
and [tls] primary = "verify" on the FAT partition, then
  * times inbound handshakes (openssl-equivalent Python client, TLS 1.3 and
    1.2; the first one after boot may wait for the kernel's CRNG);
  * sends a message over TLS; the VM delivers it to a TLS primary on the host
    (verified against its CA), which times the outbound handshake.
Prints PASS/FAIL lines, the figures, and "N passed, M failed".
Usage: tls_vm.py DISK_IMAGE OUT_DIR [MODE...]   (MODE: tcg, icount5; default both)
       TLS_VM_RSA=1 ...: the VM's certificate with an RSA-2048 key instead
"""
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(TOP, "tests", "relay"))
import harness  # noqa: E402
import test_tls as T  # noqa: E402

passed = failed = 0


def ok(msg):
    global passed
    passed += 1
    print("PASS: " + msg, flush=True)


def bad(msg):
    global failed
    failed += 1
    print("FAIL: " + msg, flush=True)


def banner(port, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.settimeout(30)
                b = s.recv(512)
                if b.startswith(b"220"):
                    return b.decode(errors="replace").strip()
        except OSError:
            pass
        time.sleep(1)
    return None


def handshake(port, version, ctx):
    c = T.TlsClient(port, timeout=120)
    try:
        c.cmd("EHLO client.test")
        code, _ = c.cmd("STARTTLS")
        if code != 220:
            raise RuntimeError(f"STARTTLS: {code}")
        t0 = time.monotonic()
        c.sock = ctx.wrap_socket(c.sock, server_hostname="mx2.example.org")
        took = time.monotonic() - t0
        return took, c.sock.version(), c.sock.cipher()[0], c
    except Exception:
        c.close()
        raise


def run(mode, disk, out, certs):
    icount = ["-icount", "shift=5,align=on"] if mode == "icount5" else []
    smtp, http, prim = harness.free_port(), harness.free_port(), harness.free_port()
    img = os.path.join(out, f"tls-{mode}.img")
    shutil.copy(disk, img)
    conf = open(os.path.join(TOP, "buildroot-overlay", "etc", "bartleby.toml")).read()
    conf = conf.replace('primary = "10.0.2.2:2526"', f'primary = "10.0.2.2:{prim}"')
    conf += ('\n[tls]\ncertificate = "/boot/tls/fullchain.pem"\nkey = "/boot/tls/privkey.pem"\n'
             'primary = "verify"\nca_file = "/boot/tls/primary-ca.pem"\n')
    cpath = os.path.join(out, f"tls-{mode}.toml")
    open(cpath, "w").write(conf)
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    m = lambda *a: subprocess.run(list(a), env=env, check=True, capture_output=True)  # noqa: E731
    m("mcopy", "-o", "-i", img + "@@1M", cpath, "::/bartleby.toml")
    m("mmd", "-i", img + "@@1M", "::/tls")
    for src, dst in (("vm-full.pem", "fullchain.pem"), ("vm.key", "privkey.pem"), ("root.pem", "primary-ca.pem")):
        m("mcopy", "-o", "-i", img + "@@1M", os.path.join(certs, src), "::/tls/" + dst)
    primary = T.TlsPrimary(prim, cert=os.path.join(certs, "host.pem"), key=os.path.join(certs, "host.key"))
    log = os.path.join(out, f"tls-{mode}.console.log")
    q = subprocess.Popen(["qemu-system-i386", "-M", "pc", "-cpu", "486", "-m", "16", *icount, "-display", "none", "-no-user-config",
                          "-no-reboot", "-serial", f"file:{log}",
                          "-nic", f"user,model=ne2k_pci,hostfwd=tcp:127.0.0.1:{smtp}-:25,hostfwd=tcp:127.0.0.1:{http}-:80",
                          "-drive", f"file={img},format=raw,if=ide,index=0", "-boot", "c"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:
        b = banner(smtp, 400)
        if not b:
            bad(f"[{mode}] no SMTP banner within 400 s")
            return
        ok(f"[{mode}] SMTP banner after {time.monotonic() - t0:.0f} s")
        ctx_any = T.ssl.create_default_context(cafile=os.path.join(certs, "root.pem"))
        times = []
        for i, ver in enumerate((ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)):
            ctx = ssl.create_default_context(cafile=os.path.join(certs, "root.pem"))
            ctx.minimum_version = ctx.maximum_version = ver
            try:
                took, v, cipher, c = handshake(smtp, ver, ctx)
                c.cmd("QUIT")
                c.close()
                times.append((v, took))
                print(f"      [{mode}] inbound handshake {i + 1}: {v} {cipher}: {took * 1000:.0f} ms (client wall time)", flush=True)
            except Exception as e:
                bad(f"[{mode}] inbound handshake {i + 1} ({ver.name}): {e}")
                return
        ok(f"[{mode}] inbound STARTTLS, certificate verified for mx2.example.org: " +
           ", ".join(f"{v} {t * 1000:.0f} ms" for v, t in times))
        # The relay's one thread is not held by a handshake: a NOOP on
        # another session is answered while the 486 computes one.
        import threading
        worst, hs = 0.0, []
        for _ in range(3):
            p = T.Client(smtp, timeout=120)
            p.cmd("EHLO other.test")
            c = T.TlsClient(smtp, timeout=120)
            c.cmd("EHLO client.test")
            c.cmd("STARTTLS")
            done = []

            def shake():
                t = time.monotonic()
                c.sock = ctx_any.wrap_socket(c.sock, server_hostname="mx2.example.org")
                done.append(time.monotonic() - t)
            th = threading.Thread(target=shake)
            th.start()
            time.sleep(0.05)
            t1 = time.monotonic()
            code, _ = p.cmd("NOOP")
            noop = time.monotonic() - t1
            th.join(60)
            p.close()
            c.close()
            if code != 250 or not done:
                bad(f"[{mode}] NOOP during a handshake: {code}, handshake {'done' if done else 'not done'}")
                return
            worst, hs = max(worst, noop), hs + done
        msg = f"[{mode}] NOOP on another session during a handshake: answered in {worst * 1000:.0f} ms at worst (handshakes {', '.join(f'{h * 1000:.0f}' for h in hs)} ms)"
        if worst < min(hs) / 2:
            ok(msg)
        else:
            bad(msg + ": the handshake holds the relay")
        # A message over TLS; the VM delivers it to the host's TLS primary.
        _, _, _, c = handshake(smtp, None, ctx_any)
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<a@sender.test>")
        c.cmd("RCPT TO:<u@example.org>")
        c.cmd("DATA")
        code, text = c.cmd(T.MSG + ".")
        c.cmd("QUIT")
        c.close()
        if code != 250:
            bad(f"[{mode}] message over TLS: {text}")
            return
        end = time.monotonic() + 300
        while time.monotonic() < end and not primary.messages:
            time.sleep(0.5)
        if primary.messages and primary.messages[0][0] and all(tls for tls, _ in primary.mail_commands()):
            ok(f"[{mode}] outbound: delivered to the primary inside TLS under \"verify\"; "
               f"handshake seen from the primary {primary.handshakes[0] * 1000:.0f} ms")
        else:
            bad(f"[{mode}] outbound: not delivered in TLS within 300 s (commands: {primary.commands[:6]})")
        try:
            import urllib.request
            met = urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=60).read().decode()
            if "bartleby_tls_certificate_expiry_seconds" in met:
                ok(f"[{mode}] /metrics exports bartleby_tls_certificate_expiry_seconds")
            else:
                bad(f"[{mode}] /metrics lacks bartleby_tls_certificate_expiry_seconds")
        except OSError as e:
            bad(f"[{mode}] /metrics: {e}")
    finally:
        q.kill()
        q.wait()
        primary.stop()


def main():
    disk, out = sys.argv[1], sys.argv[2]
    modes = sys.argv[3:] or ["tcg", "icount5"]
    os.makedirs(out, exist_ok=True)
    certs = T.make_certs()
    T.CERTS = certs
    try:
        san = "DNS:mx2.example.org"
        if os.environ.get("TLS_VM_RSA"):  # what an RSA-2048 key costs (not run by run_all.sh)
            T.openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "vm.key", cwd=certs)
        T.issue(certs, "vm", "/CN=mx2.example.org", f"basicConstraints=CA:FALSE\nsubjectAltName={san}\n", "inter")
        open(os.path.join(certs, "vm-full.pem"), "w").write(open(os.path.join(certs, "vm.pem")).read() + open(os.path.join(certs, "inter.pem")).read())
        # The primary as the VM sees the host: 10.0.2.2.
        T.issue(certs, "host", "/CN=primary.example.org", "basicConstraints=CA:FALSE\nsubjectAltName=IP:10.0.2.2\n", "root")
        for mode in modes:
            run(mode, disk, out, certs)
    finally:
        shutil.rmtree(certs, ignore_errors=True)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
