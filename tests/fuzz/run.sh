#!/bin/sh
# Fuzzes Bartleby with cargo-fuzz (libFuzzer + AddressSanitizer).
#
#   tests/fuzz/run.sh [SECONDS]      each target for SECONDS (default 60)
#
# Targets: session (a whole SMTP session over an in-memory pipe), data (the
# DATA parser), config (the configuration parser), reply (the delivery
# client's reply parser, and whole deliveries to an arbitrary primary), dns
# (the DNS response parser: compression loops, truncation, 1000 answers), cert
# (the certificate reader of the page and the log: subject, names, expiry).
# FUZZ_TARGETS="data config" picks some. New corpus entries go to tests/fuzz/corpus/TARGET (ignored by
# git), the committed seeds are read from tests/fuzz/seeds/TARGET; a crash
# leaves its input in tests/fuzz/artifacts/TARGET/. Reproduce one with
#   BARTLEBY_FUZZ_DEBUG=1 cargo +nightly fuzz run --fuzz-dir tests/fuzz TARGET ARTIFACT
# Exits non-zero when any target found a crash; the last line is
# "N passed, M failed" (one test per target).
set -u

secs=${1:-60}
case $secs in
    '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 64 ;;
esac
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root" || exit 1
targets=${FUZZ_TARGETS:-session data config reply dns cert}

# cargo-fuzz needs unstable flags (-Zsanitizer). Use nightly when the
# machine has it; otherwise stable with RUSTC_BOOTSTRAP=1, whose sysroot also
# carries the AddressSanitizer runtime.
if cargo +nightly --version >/dev/null 2>&1; then
    tc=+nightly
else
    echo "run.sh: no nightly toolchain: using stable with RUSTC_BOOTSTRAP=1"
    tc=+stable
    export RUSTC_BOOTSTRAP=1
fi
if ! cargo $tc fuzz --version >/dev/null 2>&1; then
    echo "run.sh: installing cargo-fuzz"
    if ! cargo install cargo-fuzz --locked; then
        echo "run.sh: cannot install cargo-fuzz" >&2
        echo "0 passed, 1 failed"
        exit 1
    fi
fi

# The session target keeps a spool under TMPDIR: put it in RAM when we can
# (syncfs per accepted message) and remove it afterwards.
base=/tmp
[ -d /dev/shm ] && [ -w /dev/shm ] && base=/dev/shm
tmp=$(mktemp -d "$base/bartleby-fuzz.XXXXXX") || exit 1
trap 'rm -rf "$tmp"' EXIT INT TERM

if ! cargo $tc fuzz build --fuzz-dir tests/fuzz; then
    echo "run.sh: build failed" >&2
    n=$(echo $targets | wc -w)
    echo "0 passed, $n failed"
    exit 1
fi

passed=0
failed=0
failed_names=
for t in $targets; do
    echo "=== fuzz $t for ${secs}s"
    mkdir -p "tests/fuzz/corpus/$t"
    if TMPDIR=$tmp cargo $tc fuzz run --fuzz-dir tests/fuzz "$t" \
        "tests/fuzz/corpus/$t" "tests/fuzz/seeds/$t" -- \
        -max_total_time="$secs" -timeout=30 -print_final_stats=1; then
        echo "=== $t: ok"
        passed=$((passed + 1))
    else
        echo "=== $t: FAILED (input in tests/fuzz/artifacts/$t/)"
        failed=$((failed + 1))
        failed_names="$failed_names $t"
    fi
done
[ $failed -gt 0 ] && echo "failed targets:$failed_names"
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
