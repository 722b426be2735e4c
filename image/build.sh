#!/bin/bash
# `make image`: everything, in order, each step cached by the hash of its inputs
# (kernel ~4-15 min and musl ~1 min the first time; a rerun takes seconds).
# Env: BIN_CRATE/BIN_NAME to put another binary in /init,
#      IMG output dir (default image/out), SKIP_DEPS=1 to skip the apt/rustup step.
. "$(dirname "$0")/common.sh"
t0=$(date +%s)
step() { local s=$(date +%s); log "== $1"; shift; "$@"; log "   done in $(( $(date +%s) - s ))s"; }
[ "${SKIP_DEPS:-0}" = 1 ] || step "dependencies (apt, rust-src, musl source)" "$IMAGE_DIR/deps.sh"
step "kernel (linux-source-6.1, tinyconfig + image/kernel.config + image/patches)" "$IMAGE_DIR/build-kernel.sh"
# the floppy kernel starts from the disk kernel's build directory (incremental)
KSEED=$CACHE/kbuild-$(basename "$(readlink -f "$OUT/kernel")" | sed 's/^kernel-//')
KNAME=kernel-floppy KFRAGS="kernel.config kernel-floppy.config" KBUILD_SEED=$KSEED \
  step "floppy kernel (+ image/kernel-floppy.config)" "$IMAGE_DIR/build-kernel.sh"
step "musl + libunwind for i486" "$IMAGE_DIR/build-musl.sh"
BIN_CRATE=${BIN_CRATE:-$TOP}; BIN_NAME=${BIN_NAME:-bartleby}
step "rust binary $BIN_NAME for i486" "$IMAGE_DIR/build-rust.sh" "$BIN_CRATE" "$BIN_NAME"
CONF=""; [ "$BIN_NAME" = bartleby ] && CONF=$TOP/buildroot-overlay/etc/bartleby.toml
step "486 instruction audit" "$IMAGE_DIR/check-486.sh" "$OUT/$BIN_NAME" $CONF
BIN=$OUT/$BIN_NAME step "initramfs, disk image, ISO, floppy" "$IMAGE_DIR/mkimage.sh"
log "all done in $(( $(date +%s) - t0 ))s; outputs in ${IMG:-$OUT}"
