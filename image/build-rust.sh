#!/bin/bash
# Build the bartleby binary for the i486 custom target (static musl, build-std, panic=immediate-abort).
# Usage: build-rust.sh [crate-dir [bin-name]]   (default: the repo, bin bartleby)
# Output (cached by hash of sources): $CACHE/rust-<hash>/<bin>; copied to $OUT/<bin>.
. "$(dirname "$0")/common.sh"
CRATE=$(cd "${1:-$TOP}" && pwd)
BIN=${2:-bartleby}
# cargo features: FEATURES="" builds with the crate's defaults; FEATURES="-"
# builds with --no-default-features (the floppy: no TLS once feature `tls` exists)
FEATURES=${FEATURES:-}
SYSROOT=$(readlink -f "$OUT/sysroot486")
[ -f "$SYSROOT/lib/libc.a" ] || die "no i486 musl sysroot; run image/build-musl.sh"
TARGET_JSON=$IMAGE_DIR/i486-unknown-linux-musl.json
srcfiles() { (cd "$CRATE" && find Cargo.toml Cargo.lock .cargo src build.rs "$@" -type f 2>/dev/null | LC_ALL=C sort); }
H=$( { for f in $(srcfiles); do echo "== $f"; cat "$CRATE/$f"; done
       cat "$TARGET_JSON" "$IMAGE_DIR/i486-bartleby-musl-cc" "$0"; echo "$SYSROOT $BIN $CRATE features=$FEATURES"; rustc -vV; } | sha256sum | cut -c1-16)
DEST=$CACHE/rust-$H
if [ -x "$DEST/$BIN" ]; then
  log "rust binary cached: $DEST/$BIN"; cp "$DEST/$BIN" "$OUT/$BIN"; exit 0
fi
# one target dir per crate: two packages named bartleby must not share release/bartleby
TD=${CARGO_TARGET_DIR_486:-$CACHE/target486}
[ "$CRATE" = "$TOP" ] || TD=$TD-$(printf %s "$CRATE" | sha256sum | cut -c1-8)
start=$(date +%s)
log "cargo build ($CRATE, bin $BIN) for i486 into $TD"
export RUSTC_BOOTSTRAP=1
export BARTLEBY_SYSROOT486=$SYSROOT
export PATH="$IMAGE_DIR:$PATH"     # i486-bartleby-musl-cc
export CARGO_PROFILE_RELEASE_PANIC=immediate-abort
export CARGO_PROFILE_RELEASE_OPT_LEVEL=${OPT_LEVEL:-z}
export CARGO_PROFILE_RELEASE_LTO=true CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 CARGO_PROFILE_RELEASE_STRIP=true
unset RUSTFLAGS
feat=()
case "$FEATURES" in
  "") ;;
  -) feat=(--no-default-features) ;;
  -,*) feat=(--no-default-features --features "${FEATURES#-,}") ;;
  *) feat=(--features "$FEATURES") ;;
esac
(cd "$CRATE" && cargo build --release "${feat[@]}" --bin "$BIN" --target "$TARGET_JSON" --target-dir "$TD" \
   -Z json-target-spec -Z build-std=std,panic_abort -Z build-std-features=optimize_for_size \
   -Z panic-immediate-abort) || die "cargo build failed"
mkdir -p "$DEST.tmp"
cp "$TD/i486-unknown-linux-musl/release/$BIN" "$DEST.tmp/$BIN"
echo "$(( $(date +%s) - start ))" > "$DEST.tmp/build-seconds"
rm -rf "$DEST"; mv "$DEST.tmp" "$DEST"
cp "$DEST/$BIN" "$OUT/$BIN"
log "built $BIN in $(cat "$DEST/build-seconds")s: $(stat -c %s "$DEST/$BIN") bytes"
