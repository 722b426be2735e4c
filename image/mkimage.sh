#!/bin/bash
# Assemble initramfs, disk image, ISO and floppy from the kernel, the i486 binary
# and the overlay. Rootless: gen_init_cpio, mkfs.* on files, mtools, syslinux --offset.
# Env: BIN (default $OUT/bartleby), IMG (output dir, default $OUT).
. "$(dirname "$0")/common.sh"
BIN=${BIN:-$OUT/bartleby}
IMG=${IMG:-$OUT}
K=$OUT/kernel
OVERLAY=$TOP/buildroot-overlay
SYSL=/usr/lib/syslinux
mkdir -p "$IMG"
[ -f "$K/bzImage" ] || die "no kernel (image/build-kernel.sh)"
[ -x "$BIN" ] || die "no binary $BIN (image/build-rust.sh)"
W=$(mktemp -d "$IMG/.work.XXXXXX"); trap 'rm -rf "$W"' EXIT
export MTOOLS_SKIP_CHECK=1

# ---------------------------------------------------------------- initramfs
L=$W/initramfs.list
{
  echo "dir /dev 0755 0 0"
  echo "nod /dev/console 0600 0 0 c 5 1"
  echo "nod /dev/null 0666 0 0 c 1 3"
  echo "nod /dev/tty0 0620 0 0 c 4 0"
  echo "nod /dev/ttyS0 0620 0 0 c 4 64"
  for d in /proc /sys /run /sbin /etc /var /var/spool /boot /cdrom; do echo "dir $d 0755 0 0"; done
  echo "dir /tmp 1777 0 0"
  echo "file /sbin/bartleby $BIN 0755 0 0"
  echo "slink /init /sbin/bartleby 0777 0 0"
  # the overlay tree (etc/bartleby.toml, ...) on top
  (cd "$OVERLAY" && find . -mindepth 1 ! -name '.empty' ! -name '*~' | LC_ALL=C sort) | while read -r p; do
    p=${p#.}
    if [ -d "$OVERLAY$p" ]; then
      case " /etc /var /var/spool /sbin " in *" $p "*) ;; *) echo "dir $p 0755 0 0";; esac
    else
      echo "file $p $OVERLAY$p $( [ -x "$OVERLAY$p" ] && echo 0755 || echo 0644) 0 0"
    fi
  done
} > "$L"
cp "$L" "$IMG/initramfs.list"
"$K/gen_init_cpio" "$L" > "$W/initramfs.cpio"
# 256 KiB dictionary: the kernel's unpacker allocates it, and with 8 MB of RAM
# a 1 MiB one does not fit beside the unpacked files (+2.4 KB of initrd)
xz --check=crc32 --lzma2=dict=256KiB -T1 -c "$W/initramfs.cpio" > "$IMG/initrd.xz"
cp "$K/bzImage" "$IMG/bzImage"

# The disk's MBR signature is fixed, so the kernel finds "the Bartleby disk's
# first partition" as its root wherever the disk sits (root=PARTUUID=...).
DISK_ID=ba87eb1e
ROOT_ARGS="root=PARTUUID=$DISK_ID-01 rootfstype=vfat ro init=/bartleby"
# pty.legacy_count=0: no BSD ptys (nothing here uses one; 256 of them cost
# ~860 KB of slab with the VTs: the difference between booting in 8 MB or not)
KARGS="console=tty0 console=ttyS0,115200 panic=10 pty.legacy_count=0"
syslinux_cfg() { # $1 = medium (disk|cd)
  if [ "$1" = disk ]; then
    # no initramfs: the root is this FAT partition, read-only; an unpacked
    # initramfs would take ~1 MB of an 8 MB machine for the whole run
    cat <<CFG
SERIAL 0 115200
DEFAULT bartleby
PROMPT 0
TIMEOUT 10
LABEL bartleby
  KERNEL /bzImage
  APPEND $KARGS $ROOT_ARGS bartleby.boot=$1
LABEL ramspool
  KERNEL /bzImage
  APPEND $KARGS $ROOT_ARGS bartleby.boot=$1 bartleby.spool=tmpfs
LABEL initramfs
  KERNEL /bzImage
  INITRD /initrd.xz
  APPEND $KARGS bartleby.boot=$1
CFG
    return
  fi
  cat <<CFG
SERIAL 0 115200
DEFAULT bartleby
PROMPT 0
TIMEOUT 10
LABEL bartleby
  KERNEL /bzImage
  INITRD /initrd.xz
  APPEND $KARGS bartleby.boot=$1
LABEL ramspool
  KERNEL /bzImage
  INITRD /initrd.xz
  APPEND $KARGS bartleby.boot=$1 bartleby.spool=tmpfs
CFG
}
CONF=$OVERLAY/etc/bartleby.toml

# ---------------------------------------------------------------- disk: MBR, FAT16 boot + ext4 spool
DISK_MB=${DISK_MB:-64}; BOOT_MB=${BOOT_MB:-16}
D=$W/bartleby.img
truncate -s ${DISK_MB}M "$D"
P1=2048; P1S=$((BOOT_MB*2048)); P2=$((P1+P1S)); P2S=$((DISK_MB*2048-P2))
printf 'label: dos\nlabel-id: 0x%s\nstart=%d, size=%d, type=6, bootable\nstart=%d, size=%d, type=83\n' $DISK_ID $P1 $P1S $P2 $P2S | sfdisk -q "$D"
mkfs.fat -F 16 -n BARTLEBY -h $P1 --offset=$P1 "$D" $((P1S/2)) >/dev/null 2>&1
syslinux --offset $((P1*512)) --install "$D"
dd if=$SYSL/mbr/mbr.bin of="$D" bs=440 count=1 conv=notrunc status=none
syslinux_cfg disk > "$W/syslinux.cfg"
mcopy -i "$D@@$((P1*512))" "$K/bzImage" "$IMG/initrd.xz" "$W/syslinux.cfg" "$CONF" ::/
# the rescue floppy's kernel has no initramfs: it mounts this partition as its
# root (read-only) and runs /bartleby from it, so the binary, the built-in
# configuration and the mount points are here too
for d in /dev /proc /sys /tmp /run /boot /cdrom /etc /var /var/spool /var/spool/bartleby; do mmd -i "$D@@$((P1*512))" "::$d"; done
mcopy -i "$D@@$((P1*512))" "$BIN" ::/bartleby
mcopy -i "$D@@$((P1*512))" "$CONF" ::/etc/bartleby.toml
# spool: ext4 (journal: survives power cuts), made on its own file, then copied in
mkfs.ext4 -q -F -L BSPOOL -m 0 -N 4096 -E lazy_itable_init=0,lazy_journal_init=0 "$W/spool.ext4" $((P2S/2))k >/dev/null
dd if="$W/spool.ext4" of="$D" bs=512 seek=$P2 conv=notrunc,sparse status=none
mv "$D" "$IMG/bartleby.img"

# ---------------------------------------------------------------- ISO (isolinux)
I=$W/iso; mkdir -p "$I/isolinux"
cp /usr/lib/ISOLINUX/isolinux.bin $SYSL/modules/bios/ldlinux.c32 "$I/isolinux/"
syslinux_cfg cd > "$I/isolinux/isolinux.cfg"
cp "$K/bzImage" "$IMG/initrd.xz" "$CONF" "$I/"
xorriso -as mkisofs -quiet -R -J -V BARTLEBY -o "$IMG/bartleby.iso" \
  -b isolinux/isolinux.bin -c isolinux/boot.cat -no-emul-boot -boot-load-size 4 -boot-info-table \
  -isohybrid-mbr /usr/lib/ISOLINUX/isohdpfx.bin "$I" 2>/dev/null

# ---------------------------------------------------------------- floppy: 1.44 MB, GRUB + kernel, relay from the disk
# SYSLINUX 6 takes 178 KB of a floppy (ldlinux.sys + ldlinux.c32). GRUB's
# core (boot.img in the boot sector, core.img in the FAT's reserved sectors,
# modules biosdisk fat linux16 echo and an embedded config) takes 61 KB once
# normal.mod (115 KB, of which linux.mod needs one empty function) is
# replaced by image/grub/normal-stub.c.
KF=$OUT/kernel-floppy
if [ "${SKIP_FLOPPY:-0}" = 1 ]; then
  log "floppy: skipped (SKIP_FLOPPY=1)"
else
[ -f "$KF/bzImage" ] || die "no floppy kernel (KNAME=kernel-floppy image/build-kernel.sh)"
GD=$W/grub; mkdir -p "$GD"; cp -a /usr/lib/grub/i386-pc/. "$GD/"
gcc -m32 -march=i386 -Os -fno-pic -fno-pie -ffreestanding -fno-asynchronous-unwind-tables -fno-stack-protector \
  -c "$IMAGE_DIR/grub/normal-stub.c" -o "$W/stub.o"
printf 'normal\0' > "$W/modname"; printf 'LICENSE=GPLv3+\0' > "$W/license"
objcopy --remove-section=.comment --remove-section=.note.GNU-stack \
  --add-section .modname="$W/modname" --add-section .module_license="$W/license" "$W/stub.o" "$GD/normal.mod"
sed -i 's/^normal: .*/normal:/' "$GD/moddep.lst"
cat > "$W/grub.cfg" <<CFG
set root=(fd0)
echo "Bartleby rescue floppy: the kernel is here; the relay (/bartleby) and its"
echo "files come from the first partition of the Bartleby disk. No such disk:"
echo "the kernel stops with 'Unable to mount root fs' or 'Requested init /bartleby failed'."
linux16 /bzImage $KARGS $ROOT_ARGS bartleby.boot=floppy
boot
CFG
grub-mkimage -d "$GD" -O i386-pc -o "$W/core.img" -c "$W/grub.cfg" -p "(fd0)/" biosdisk fat linux16 echo
GRUB_BYTES=$(stat -c %s "$W/core.img")
RES=$(( 1 + (GRUB_BYTES + 511) / 512 ))
F=$W/fd.img; rm -f "$F"
mkfs.fat -C -R $RES -n BARTLEBY "$F" 1440 >/dev/null
python3 - "$F" /usr/lib/grub/i386-pc/boot.img "$W/core.img" <<'PY'
import sys
img, boot, core = sys.argv[1:4]
b, c = open(boot, "rb").read(), open(core, "rb").read()
with open(img, "r+b") as f:
    sec0 = f.read(512)
    new = bytearray(b)
    new[3:0x5a] = sec0[3:0x5a]          # keep the FAT's BPB (boot.img jumps over it)
    f.seek(0); f.write(new)
    f.seek(512); f.write(c)             # core.img at sector 1: diskboot's default blocklist (2...)
PY
cat > "$W/README.TXT" <<TXT
Bartleby rescue floppy. Edit BARTLEBY.TOML here on any PC. The floppy holds the
boot loader (GRUB) and the kernel; the relay program and its files are read from
the first partition of the Bartleby disk (bartleby.img), whose second partition
holds the spool.
TXT
FLOPPY_OK=1
mcopy -i "$F" "$KF/bzImage" "$CONF" "$W/README.TXT" ::/ 2>"$W/mcopy.err" || FLOPPY_OK=0
FLOPPY_FREE=$(mdir -i "$F" ::/ 2>/dev/null | sed -n 's/^ *\([0-9 ]*\) bytes free.*/\1/p' | tr -d ' ')
rm -f "$IMG/bartleby-floppy.img"
[ "$FLOPPY_OK" = 1 ] && mv "$F" "$IMG/bartleby-floppy.img"
echo 1440 > "$IMG/floppy-kb"
fi

# ---------------------------------------------------------------- sizes and the floppy budget
FLOPPY_OK=${FLOPPY_OK:-skipped}; RES=${RES:-0}
FLOPPY_DATA=$(( (2880 - RES - 2*9 - 14) * 512 ))
fmt() { echo "$1" | sed ':a;s/\B[0-9]\{3\}\>/,&/;ta'; }
{
  echo "== image sizes (bytes) =="
  printf '%-34s %12s\n' "kernel bzImage (disk, CD)" "$(fmt "$(stat -c %s "$IMG/bzImage")")"
  printf '%-34s %12s\n' "binary ($(basename "$BIN"))" "$(fmt "$(stat -c %s "$BIN")")"
  printf '%-34s %12s\n' "initramfs (cpio)" "$(fmt "$(stat -c %s "$W/initramfs.cpio")")"
  printf '%-34s %12s\n' "initramfs (xz)" "$(fmt "$(stat -c %s "$IMG/initrd.xz")")"
  printf '%-34s %12s\n' "bartleby.img (disk)" "$(fmt "$(stat -c %s "$IMG/bartleby.img")")"
  printf '%-34s %12s\n' "bartleby.iso" "$(fmt "$(stat -c %s "$IMG/bartleby.iso")")"
  [ "$FLOPPY_OK" = skipped ] && exit 0
  [ -f "$IMG/bartleby-floppy.img" ] && printf '%-34s %12s\n' "bartleby-floppy.img" "$(fmt "$(stat -c %s "$IMG/bartleby-floppy.img")")"
  echo "== floppy budget (1,474,560 bytes, FAT12) =="
  printf '%-34s %12s\n' "boot sector + GRUB core ($RES sect.)" "$(fmt $(( RES * 512 )))"
  printf '%-34s %12s\n' "FATs + root directory" "$(fmt $(( (2*9 + 14) * 512 )))"
  printf '%-34s %12s\n' "kernel bzImage (floppy)" "$(fmt "$(stat -c %s "$KF/bzImage")")"
  printf '%-34s %12s\n' "bartleby.toml + README.TXT" "$(fmt $(( $(stat -c %s "$CONF") + $(stat -c %s "$W/README.TXT") )))"
  if [ "$FLOPPY_OK" = 1 ]; then
    printf '%-34s %12s\n' "free" "$(fmt "$FLOPPY_FREE")"
  else
    over=$(( $(stat -c %s "$KF/bzImage") + $(stat -c %s "$CONF") + $(stat -c %s "$W/README.TXT") + 3*511 - FLOPPY_DATA ))
    printf '%-34s %12s\n' "OVER BY (about)" "$(fmt "$over")"
  fi
  printf '%-34s %12s\n' "for comparison: initramfs (xz)" "$(fmt "$(stat -c %s "$IMG/initrd.xz")")"
} | tee "$IMG/sizes.txt"
[ "$FLOPPY_OK" != 0 ] || die "floppy: the floppy kernel, bartleby.toml and README.TXT do not fit on 1.44 MB ($(cat "$W/mcopy.err"))"
