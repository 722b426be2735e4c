#!/bin/bash
# Build the crate's own unit tests (lib + bin) for the i486 target and run them
# under `qemu-i386 -cpu 486` (traps CMOV/CMPXCHG8B/FCOMI/SSE). Tests use panic=unwind
# (in-process test harness), so this also exercises the i486 libunwind.
set -euo pipefail
TOP=$(cd "$(dirname "$0")/../.." && pwd)
IMAGE_DIR=$TOP/image
CACHE=${BARTLEBY_CACHE:-$HOME/.cache/bartleby}
[ -f "$IMAGE_DIR/out/sysroot486/lib/libc.a" ] || "$IMAGE_DIR/build-musl.sh"
export RUSTC_BOOTSTRAP=1
export BARTLEBY_SYSROOT486=$(readlink -f "$IMAGE_DIR/out/sysroot486")
export PATH="$IMAGE_DIR:$PATH"
export CARGO_TARGET_I486_UNKNOWN_LINUX_MUSL_RUNNER="qemu-i386 -cpu 486"
export CARGO_PROFILE_DEV_PANIC=unwind CARGO_PROFILE_TEST_PANIC=unwind
# i486 libunwind crashes walking the stack for a backtrace; without one a
# failing test reports its message instead of dying with SIGSEGV.
export RUST_BACKTRACE=0
# The target leaves out unwind tables (panic=immediate-abort in the image);
# the test harness unwinds to report a failing test, so tests keep them.
export RUSTFLAGS="-C force-unwind-tables=yes"
cd "$TOP"
exec cargo test --target "$IMAGE_DIR/i486-unknown-linux-musl.json" --target-dir "$CACHE/target486-test" \
  -Z json-target-spec -Z build-std=std,panic_unwind,panic_abort,test "$@"
