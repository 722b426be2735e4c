"""The two servers under test, each as the same backup MX:
accept mail for example.org from anyone, relay it to the primary at
127.0.0.1:SINK_PORT, queue it while the primary is down.

Python 3 standard library only.
"""

import os
import shutil
import signal
import subprocess
import time

from benchutil import (BenchError, log, pid_alive, process_tree, require_port_free,
                       status_kib, stop_popen, wait_banner, count_files, pss_kib)

RELAY_DOMAIN = "example.org"


# ====================================================================== Postfix

POSTFIX_MAIN_CF = """\
# Private Postfix instance for tests/bench/run. Written by tests/bench/mtas.py.
# Everything not set here is Debian's/Postfix's default, including all
# durability (cleanup fsyncs each queue file before smtpd says 250).
compatibility_level = 3.6
config_directory = {etc}
queue_directory = {spool}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C
maillog_file = {maillog}

myhostname = backup.bench.test
mydomain = bench.test
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8

# The backup-MX role (STANDARD_CONFIGURATION_README, "backup MX"):
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains = {domain}
relay_recipient_maps =
smtpd_relay_restrictions = reject_unauth_destination
transport_maps = inline:{{{domain}=relay:[{sink_host}]:{sink_port}}}

# Like Bartleby's queue_run_interval = "30m" in this benchmark: no periodic
# queue run happens during a measurement; the drain starts with
# `postqueue -f` (sendmail -q), which ignores back-off and the dead-host cache.
queue_run_delay = {queue_run_delay}
default_process_limit = 100
smtpd_banner = $myhostname ESMTP
biff = no
"""

# No chroot (the instance's queue directory has no etc/ or lib/ copies);
# otherwise the services of Debian's master.cf.
POSTFIX_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{host}:{port} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
        -o syslog_name=postfix/$service_name
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""



def run_cmd(cmd, timeout, check):
    """Runs an administration command; its output, or BenchError on failure."""
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=timeout)
    out = r.stdout.decode("utf-8", "replace")
    if check and r.returncode != 0:
        raise BenchError(f"`{' '.join(cmd)}` failed (exit {r.returncode}): {out.strip()[-800:]}")
    return out

class Postfix:
    name = "Postfix"

    def __init__(self, base, host, port, sink_host, sink_port, queue_run_delay="300s"):
        self.base = os.path.join(base, "postfix")
        self.etc = os.path.join(self.base, "etc")
        self.spool = os.path.join(self.base, "spool")
        self.data = os.path.join(self.base, "data")
        self.maillog = os.path.join(self.base, "maillog")
        self.host, self.port = host, port
        self.sink_host, self.sink_port = sink_host, sink_port
        self.queue_run_delay = queue_run_delay
        self.started = False

    def _postfix(self, *args, timeout=120, check=True):
        return run_cmd(list(args[:1]) + ["-c", self.etc] + list(args[1:]), timeout, check)

    def version(self):
        try:
            return subprocess.run(["postconf", "-d", "-h", "mail_version"], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, timeout=30).stdout.decode().strip()
        except Exception:  # noqa: BLE001
            return "?"

    def setup(self):
        for d in (self.etc, self.spool, self.data):
            os.makedirs(d, exist_ok=True)
        # postfix(1) wants the data directory owned by mail_owner; the queue
        # directory itself root-owned (post-install creates the rest).
        shutil.chown(self.data, "postfix", "postfix")
        for d in (self.base, self.etc, self.spool, self.data):
            os.chmod(d, 0o755)
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            f.write(POSTFIX_MAIN_CF.format(
                etc=self.etc, spool=self.spool, data=self.data, maillog=self.maillog,
                domain=RELAY_DOMAIN, sink_host=self.sink_host, sink_port=self.sink_port,
                queue_run_delay=self.queue_run_delay))
        with open(os.path.join(self.etc, "master.cf"), "w") as f:
            f.write(POSTFIX_MASTER_CF.format(host=self.host, port=self.port))
        # Sanity: postconf must read our files without complaint.
        self._postfix("postconf", "-n")

    def start(self):
        require_port_free(self.host, self.port, "Postfix smtpd")
        log(f"Postfix: starting private instance (config {self.etc})")
        self._postfix("postfix", "start", timeout=120)
        self.started = True
        wait_banner(self.host, self.port, 60, "Postfix", alive=lambda: self.master_pid() is not None)

    def master_pid(self):
        try:
            with open(os.path.join(self.spool, "pid", "master.pid")) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def stop(self):
        """Never raises."""
        if not self.started:
            return
        self.started = False
        pid = self.master_pid()
        try:
            self._postfix("postfix", "stop", timeout=60, check=False)
        except Exception as e:  # noqa: BLE001
            log(f"postfix stop: {e}")
        if pid is None:
            return
        deadline = time.monotonic() + 20
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            log("Postfix master still running after `postfix stop`; killing the instance")
            for p in reversed(process_tree(pid)):
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass

    # -- queue

    def _queue_dirs(self, names=("maildrop", "incoming", "active", "deferred")):
        return [os.path.join(self.spool, n) for n in names]

    def queued(self):
        """Messages anywhere in the queue (not hold/corrupt)."""
        return count_files(self._queue_dirs())

    def settled(self, n):
        """True once all n accepted messages sit in the deferred queue."""
        return (count_files(self._queue_dirs(("incoming", "active", "maildrop"))) == 0
                and count_files(self._queue_dirs(("deferred",))) == n)

    def flush(self):
        self._postfix("postqueue", "-f", timeout=60)

    # -- memory

    def pss_root(self):
        return self.master_pid()

    def describe_extra(self):
        return {}


# ===================================================================== Bartleby

BARTLEBY_TOML = """\
# Bartleby for tests/bench/run. Written by tests/bench/mtas.py.
hostname = "backup.bench.test"
listen = ["{host}:{port}"]
spool = "{spool}"
relay_domains = ["{domain}"]
primary = "{sink_host}:{sink_port}"
max_connections = 50
minimal_backoff = "5m"
queue_run_interval = "30m"
log_file = "{log}"
# The load comes from one loopback address, which Postfix exempts from its
# per-client (anvil) limits ($mynetworks): no per-client queue share here
# either, or a run with --messages above 2500 would be refused part-way.
smtpd_client_queue_share = 0
"""


class Bartleby:
    name = "Bartleby"

    def __init__(self, base, binary, host, port, sink_host, sink_port):
        self.base = os.path.join(base, "bartleby")
        self.spool = os.path.join(self.base, "spool")
        self.config = os.path.join(self.base, "bartleby.toml")
        self.logfile = os.path.join(self.base, "bartleby.log")
        self.outfile = os.path.join(self.base, "bartleby.out")
        self.binary = binary
        self.host, self.port = host, port
        self.sink_host, self.sink_port = sink_host, sink_port
        self.p = None
        self._hwm_before_reset = 0

    def _cmd(self, *args, timeout=60, check=True):
        return run_cmd([self.binary] + list(args) + ["-c", self.config], timeout, check)

    def setup(self):
        os.makedirs(self.base, exist_ok=True)
        os.chmod(self.base, 0o755)
        with open(self.config, "w") as f:
            f.write(BARTLEBY_TOML.format(
                host=self.host, port=self.port, spool=self.spool, domain=RELAY_DOMAIN,
                sink_host=self.sink_host, sink_port=self.sink_port, log=self.logfile))

    def start(self):
        require_port_free(self.host, self.port, "Bartleby")
        log(f"Bartleby: starting {self.binary} serve -c {self.config}")
        self.out = open(self.outfile, "wb")
        self.p = subprocess.Popen([self.binary, "serve", "-c", self.config], stdin=subprocess.DEVNULL,
                                  stdout=self.out, stderr=subprocess.STDOUT)
        try:
            wait_banner(self.host, self.port, 30, "Bartleby", alive=lambda: self.p.poll() is None)
        except BenchError as e:
            raise BenchError(f"{e}; its output:\n{self.tail_output()}") from None

    def tail_output(self, n=2000):
        txt = ""
        for path in (self.outfile, self.logfile):
            try:
                with open(path, "rb") as f:
                    f.seek(0, 2)
                    f.seek(max(0, f.tell() - n))
                    txt += f"--- {path}\n" + f.read().decode("utf-8", "replace") + "\n"
            except OSError:
                pass
        return txt

    def stop(self):
        """Never raises."""
        stop_popen(self.p, "bartleby", grace=10)
        self.p = None
        try:
            self.out.close()
        except Exception:  # noqa: BLE001
            pass

    def alive(self):
        return self.p is not None and self.p.poll() is None

    def check_alive(self):
        if not self.alive():
            raise BenchError(f"bartleby exited (status {self.p.returncode if self.p else '?'}); "
                             f"its output:\n{self.tail_output()}")

    # -- queue

    def queued(self):
        return count_files([os.path.join(self.spool, "queue")])

    def settled(self, n):
        return self.queued() == n and count_files([os.path.join(self.spool, "incoming")]) == 0

    def flush(self):
        self._cmd("flush", timeout=60)

    def mailq_empty(self):
        out = self._cmd("mailq", timeout=60, check=False)
        return "Mail queue is empty" in out

    # -- memory

    def pss_root(self):
        return self.p.pid if self.alive() else None

    def vmhwm_kib(self):
        v = status_kib(self.p.pid, "VmHWM") if self.alive() else None
        if v:
            self._hwm_before_reset = max(self._hwm_before_reset, v)
        return v

    def reset_vmhwm(self):
        """Resets VmHWM to the current RSS (proc(5), clear_refs "5"), so the
        next reading is the peak of the run that follows. The peak over the
        whole life is kept in vmhwm_lifetime_kib()."""
        self.vmhwm_kib()
        try:
            with open(f"/proc/{self.p.pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError as e:
            log(f"cannot reset Bartleby's VmHWM ({e}); it will include everything since start")

    def vmhwm_lifetime_kib(self):
        self.vmhwm_kib()
        return self._hwm_before_reset or None

    def vmrss_kib(self):
        return status_kib(self.p.pid, "VmRSS") if self.alive() else None

    def pss_kib(self):
        return pss_kib(self.p.pid) if self.alive() else 0
