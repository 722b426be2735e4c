#!/bin/bash
# The 486's own speed (issue 14, part 5): boot and accept figures of the disk
# image under `qemu-system-i386 -cpu 486 -icount shift=5` (one instruction =
# 2^5 ns: ~31 MIPS, close to a 486DX2-66), measured with the GUEST's clock
# (/proc/uptime: init's "started, N s after the kernel started", the relay's
# "daemon started ... N s after the kernel started", and /metrics
# bartleby_machine_uptime_seconds around the accepts), so the host's load and
# speed do not enter the figures.
#
#   tests/qemu/icount.sh [MESSAGES (20)] [SESSIONS (1)]   prints the figures; exit 1 on failure
set -uo pipefail
TOP=$(cd "$(dirname "$0")/../.." && pwd)
IMAGES=${IMAGES:-$TOP/image/out}
N=${1:-20}; S=${2:-1}; MEMORY=${MEM:-16}; SHIFT=${SHIFT:-5}
T=$(mktemp -d /tmp/bartleby-icount.XXXXXX)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SMTP=$(port); HTTP=$(port)
cp --sparse=always "$IMAGES/bartleby.img" "$T/disk.img"
qemu-system-i386 -M pc -cpu 486 -m "$MEMORY" -icount shift=$SHIFT -display none -no-user-config -no-reboot \
  -serial "file:$T/console.log" -nic "user,model=ne2k_pci,hostfwd=tcp:127.0.0.1:$SMTP-:25,hostfwd=tcp:127.0.0.1:$HTTP-:80" \
  -drive "file=$T/disk.img,format=raw,if=ide" -boot c > "$T/qemu.err" 2>&1 &
Q=$!
trap 'kill -9 $Q 2>/dev/null; wait 2>/dev/null; rm -rf "$T"' EXIT
if ! python3 "$TOP/tests/qemu/mailtool.py" banner "$SMTP" 600 > "$T/banner"; then
  echo "no banner: $(cat "$T/banner")"; tail -5 "$T/console.log"; exit 1
fi
g() { grep -a -m1 "$1" "$T/console.log" | sed "s/$2/\\1/"; }
init=$(g 'bartleby-init: started, ' '.*started, \([0-9.]*\)s after.*')
listen=$(g 'daemon started -- ' '.*, \([0-9.]*\)s after the kernel started.*')
bogo=$(grep -a -m1 -o 'Calibrating delay.* \([0-9.]*\) BogoMIPS' "$T/console.log" | grep -o '[0-9.]* BogoMIPS')
up() { python3 "$TOP/tests/qemu/mailtool.py" get "http://127.0.0.1:$HTTP/metrics" | awk '/^bartleby_machine_uptime_seconds /{print $2}'; }
t0=$(up)
python3 - "$SMTP" "$N" "$S" <<'PY'
import smtplib, sys, threading
port, n, sessions = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def run(k):
    s = smtplib.SMTP("127.0.0.1", port, timeout=300)
    s.ehlo("bench.example.net")
    for i in range(k, n, sessions):
        body = ("Subject: icount %d\r\n\r\n" % i + "x" * 76 + "\r\n") * 50   # ~4 KiB
        s.sendmail("bench@example.net", ["icount%d@example.org" % i], body.encode())
    s.quit()
ts = [threading.Thread(target=run, args=(k,)) for k in range(sessions)]
[t.start() for t in ts]; [t.join() for t in ts]
PY
rc=$?
t1=$(up)
echo "guest: ${bogo:-? BogoMIPS}; -icount shift=$SHIFT, -m $MEMORY"
echo "guest clock: /init at ${init}s, relay listening at ${listen}s after the kernel started ($(awk -v a="$init" -v b="$listen" 'BEGIN{printf "%.2f", b-a}')s after /init)"
[ $rc = 0 ] || { echo "sending failed"; exit 1; }
awk -v a="$t0" -v b="$t1" -v n="$N" -v s="$S" 'BEGIN{printf "guest clock: %d messages of 4 KiB in %d session(s) accepted in %.2fs: %.1f msg/s\n", n, s, b-a, n/(b-a)}'
