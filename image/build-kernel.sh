#!/bin/bash
# Build an i486 kernel from Debian's linux-source-6.1: tinyconfig + fragments,
# with the source patches of image/patches/ applied.
#   build-kernel.sh                      the appliance kernel: image/kernel.config
#   KNAME=kernel-floppy KFRAGS="kernel.config kernel-floppy.config" build-kernel.sh
# Output (cached by hash of fragments + patches + source version + this script):
#   $CACHE/kernel-<hash>/{bzImage,gen_init_cpio,config}; symlinked as $OUT/$KNAME.
# KBUILD_SEED=dir: a previous build directory to start from (incremental build
# of a config variant: only what the changed symbols touch is rebuilt).
. "$(dirname "$0")/common.sh"
KNAME=${KNAME:-kernel}
KFRAGS=${KFRAGS:-kernel.config}
TARBALL=$(ls /usr/src/linux-source-6.1.tar.xz 2>/dev/null || true)
[ -n "$TARBALL" ] || die "linux-source-6.1 not installed (run image/deps.sh)"
KVER=$(dpkg-query -W -f='${Version}' linux-source-6.1)
FRAGS=(); for f in $KFRAGS; do FRAGS+=("$IMAGE_DIR/$f"); done
PATCHES=("$IMAGE_DIR"/patches/*.patch)
[ -e "${PATCHES[0]}" ] || PATCHES=()
H=$(hash_inputs "${FRAGS[@]}" "${PATCHES[@]}" "$0" "$KVER")
DEST=$CACHE/kernel-$H
if [ -f "$DEST/bzImage" ] && [ -x "$DEST/gen_init_cpio" ]; then
  log "$KNAME cached: $DEST"; ln -sfn "$DEST" "$OUT/$KNAME"; exit 0
fi
SRC0=$CACHE/src/linux-source-6.1
if [ ! -f "$SRC0/.extracted-$KVER" ]; then
  log "extracting $TARBALL"
  rm -rf "$SRC0"; mkdir -p "$CACHE/src"
  tar -C "$CACHE/src" -xf "$TARBALL"
  touch "$SRC0/.extracted-$KVER"
fi
# patched sources live in a tree of their own (the pristine one is shared)
SRC=$SRC0
if [ ${#PATCHES[@]} -gt 0 ]; then
  PH=$(hash_inputs "${PATCHES[@]}" "$KVER")
  SRC=$CACHE/src/linux-source-6.1-p$PH
  if [ ! -f "$SRC/.patched" ]; then
    log "patched source tree $SRC"
    rm -rf "$SRC"; mkdir -p "$SRC"
    tar -C "$SRC" --strip-components=1 -xf "$TARBALL"
    for p in "${PATCHES[@]}"; do
      patch -d "$SRC" -p1 --forward --no-backup-if-mismatch < "$p" > "$SRC/.patch.log" 2>&1 \
        || { cat "$SRC/.patch.log"; die "patch $(basename "$p") does not apply to linux-source $KVER"; }
      log "applied $(basename "$p")"
    done
    touch "$SRC/.patched"
  fi
fi
B=$CACHE/kbuild-$H
if [ ! -d "$B" ] && [ -n "${KBUILD_SEED:-}" ] && [ -d "$KBUILD_SEED" ]; then
  log "seeding $B from $KBUILD_SEED"
  cp -a "$KBUILD_SEED" "$B.tmp" && mv "$B.tmp" "$B"
fi
mkdir -p "$B"
start=$(date +%s)
log "configuring $KNAME in $B ($KFRAGS)"
make -s -C "$SRC" O="$B" ARCH=i386 tinyconfig >/dev/null
(cd "$SRC" && KCONFIG_CONFIG="$B/.config" scripts/kconfig/merge_config.sh -m -O "$B" "$B/.config" "${FRAGS[@]}" >/dev/null)
make -s -C "$SRC" O="$B" ARCH=i386 olddefconfig >/dev/null
# every requested value must have survived olddefconfig (a later fragment's
# line overrides an earlier one's, "is not set" included)
missing=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*) grep -qxF "$line" "$B/.config" || { log "config not applied: $line"; missing=1; } ;;
    "# CONFIG_"*" is not set") s=${line#\# }; s=${s%% *}; grep -q "^$s=" "$B/.config" && { log "config not applied: $line"; missing=1; } ;;
  esac
done < <(cat "${FRAGS[@]}" | awk '/^CONFIG_[A-Za-z0-9_]*=/{k=$0; sub(/=.*/,"",k); v[k]=$0; if(!(k in o)){o[k]=n++}} /^# CONFIG_[A-Za-z0-9_]* is not set/{k=$2; v[k]=$0; if(!(k in o)){o[k]=n++}} END{for(k in v) print v[k]}')
[ $missing = 0 ] || die "kernel fragments not fully applied (see above)"
log "building $KNAME with -j$JOBS (a full build takes 10-15 min on 2 cores)"
make -C "$SRC" O="$B" ARCH=i386 -j"$JOBS" bzImage > "$B/build.log" 2>&1 || { tail -30 "$B/build.log"; die "kernel build failed"; }
make -C "$SRC" O="$B" ARCH=i386 usr/gen_init_cpio >> "$B/build.log" 2>&1 || true
mkdir -p "$DEST.tmp"
cp "$B/arch/x86/boot/bzImage" "$DEST.tmp/bzImage"
cp "$B/usr/gen_init_cpio" "$DEST.tmp/gen_init_cpio"
cp "$B/.config" "$DEST.tmp/config"
echo "$(( $(date +%s) - start ))" > "$DEST.tmp/build-seconds"
rm -rf "$DEST"; mv "$DEST.tmp" "$DEST"
ln -sfn "$DEST" "$OUT/$KNAME"
log "$KNAME built in $(cat "$DEST/build-seconds")s: $(stat -c %s "$DEST/bzImage") bytes"
