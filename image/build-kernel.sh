#!/bin/bash
# Build the i486 kernel from Debian's linux-source-6.1: tinyconfig + image/kernel.config.
# Output (cached by hash of fragment + source version + this script):
#   $CACHE/kernel-<hash>/{bzImage,gen_init_cpio,config}; symlinked as $OUT/kernel.
. "$(dirname "$0")/common.sh"
TARBALL=$(ls /usr/src/linux-source-6.1.tar.xz 2>/dev/null || true)
[ -n "$TARBALL" ] || die "linux-source-6.1 not installed (run image/deps.sh)"
KVER=$(dpkg-query -W -f='${Version}' linux-source-6.1)
H=$(hash_inputs "$IMAGE_DIR/kernel.config" "$0" "$KVER")
DEST=$CACHE/kernel-$H
if [ -f "$DEST/bzImage" ] && [ -x "$DEST/gen_init_cpio" ]; then
  log "kernel cached: $DEST"; ln -sfn "$DEST" "$OUT/kernel"; exit 0
fi
SRC=$CACHE/src/linux-source-6.1
if [ ! -f "$SRC/.extracted-$KVER" ]; then
  log "extracting $TARBALL"
  rm -rf "$SRC"; mkdir -p "$CACHE/src"
  tar -C "$CACHE/src" -xf "$TARBALL"
  touch "$SRC/.extracted-$KVER"
fi
B=$CACHE/kbuild-$H
mkdir -p "$B"
start=$(date +%s)
log "configuring kernel in $B"
make -s -C "$SRC" O="$B" ARCH=i386 tinyconfig >/dev/null
(cd "$SRC" && KCONFIG_CONFIG="$B/.config" scripts/kconfig/merge_config.sh -m -O "$B" "$B/.config" "$IMAGE_DIR/kernel.config" >/dev/null)
make -s -C "$SRC" O="$B" ARCH=i386 olddefconfig >/dev/null
# every requested =y / value must have survived olddefconfig
missing=0
while IFS= read -r line; do
  case "$line" in CONFIG_*=*) grep -qxF "$line" "$B/.config" || { log "config not applied: $line"; missing=1; } ;; esac
done < "$IMAGE_DIR/kernel.config"
[ $missing = 0 ] || die "kernel fragment not fully applied (see above)"
log "building kernel with -j$JOBS (takes 10-15 min on 2 cores)"
make -C "$SRC" O="$B" ARCH=i386 -j"$JOBS" bzImage > "$B/build.log" 2>&1 || { tail -30 "$B/build.log"; die "kernel build failed"; }
make -C "$SRC" O="$B" ARCH=i386 usr/gen_init_cpio >> "$B/build.log" 2>&1 || true
mkdir -p "$DEST.tmp"
cp "$B/arch/x86/boot/bzImage" "$DEST.tmp/bzImage"
cp "$B/usr/gen_init_cpio" "$DEST.tmp/gen_init_cpio"
cp "$B/.config" "$DEST.tmp/config"
echo "$(( $(date +%s) - start ))" > "$DEST.tmp/build-seconds"
rm -rf "$DEST"; mv "$DEST.tmp" "$DEST"
ln -sfn "$DEST" "$OUT/kernel"
log "kernel built in $(cat "$DEST/build-seconds")s: $(stat -c %s "$DEST/bzImage") bytes"
