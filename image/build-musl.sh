#!/bin/bash
# musl libc (Debian source package) + LLVM libunwind (from rust-src), both -march=i486, static.
# Output (cached): $CACHE/sysroot486-<hash>/{include,lib/{crt1.o,crti.o,crtn.o,libc.a,libunwind.a}}
# symlinked as $OUT/sysroot486.
. "$(dirname "$0")/common.sh"
MUSL_CFLAGS="-march=i486 -Os -pipe"
RUST_SRC=$(rustc --print sysroot)/lib/rustlib/src/rust
MVER=$(apt-cache showsrc musl 2>/dev/null | awk '/^Version:/{print $2; exit}')
[ -n "$MVER" ] || die "no musl source package (run image/deps.sh: needs a deb-src entry)"
H=$(hash_inputs "$0" "$MVER" "$MUSL_CFLAGS" "$(rustc --version)")
DEST=$CACHE/sysroot486-$H
if [ -f "$DEST/lib/libc.a" ] && [ -f "$DEST/lib/libunwind.a" ]; then
  log "musl sysroot cached: $DEST"; ln -sfn "$DEST" "$OUT/sysroot486"; exit 0
fi
W=$CACHE/musl-work-$H
rm -rf "$W" "$DEST.tmp"; mkdir -p "$W" "$DEST.tmp/lib"
start=$(date +%s)
log "fetching musl $MVER source (apt-get source)"
(cd "$W" && apt-get source --download-only -qq musl >/dev/null && dpkg-source -x --skip-patches musl_*.dsc src >/dev/null)
[ -d "$W/src" ] || die "musl source extraction failed"
log "building musl with CC='gcc -m32' CFLAGS='$MUSL_CFLAGS'"
(cd "$W/src" && CC="gcc -m32" CFLAGS="$MUSL_CFLAGS" ./configure --target=i386 --prefix="$DEST.tmp" \
    --disable-shared --enable-static >"$W/configure.log" 2>&1 \
  && make -j"$JOBS" AR=ar RANLIB=ranlib >"$W/build.log" 2>&1 \
  && make install AR=ar RANLIB=ranlib >>"$W/build.log" 2>&1) || { tail -20 "$W/build.log" "$W/configure.log"; die "musl build failed"; }
# LLVM libunwind: std's `unwind` crate links -lunwind statically on musl targets
log "building libunwind from rust-src for i486"
U=$RUST_SRC/src/llvm-project/libunwind
[ -d "$U/src" ] || die "rust-src has no libunwind ($U)"
mkdir -p "$W/unwind"
INC="-nostdinc -isystem $DEST.tmp/include -isystem $(gcc -m32 -print-file-name=include) -I$U/include"
FL="-m32 -march=i486 -Os -fPIC -funwind-tables -fno-stack-protector -D_LIBUNWIND_IS_NATIVE_ONLY -DNDEBUG -D_LIBUNWIND_HAS_NO_THREADS"
for f in "$U"/src/*.c "$U"/src/*.S; do
  case "$f" in *Sgx*|*wasm*) continue;; esac
  gcc $FL $INC -std=c99 -c "$f" -o "$W/unwind/$(basename "$f").o" || die "libunwind: $f"
done
for f in "$U"/src/*.cpp; do
  g++ $FL $INC -nostdinc++ -fno-exceptions -fno-rtti -std=c++17 -c "$f" -o "$W/unwind/$(basename "$f").o" || die "libunwind: $f"
done
ar rcs "$DEST.tmp/lib/libunwind.a" "$W"/unwind/*.o
echo "$(( $(date +%s) - start ))" > "$DEST.tmp/build-seconds"
rm -rf "$DEST"; mv "$DEST.tmp" "$DEST"
# musl's install paths point to $DEST.tmp in its specs only; nothing we use depends on it
rm -rf "$W"
ln -sfn "$DEST" "$OUT/sysroot486"
log "musl+libunwind built in $(cat "$DEST/build-seconds")s"
