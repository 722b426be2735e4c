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
xz --check=crc32 --lzma2=dict=1MiB -T1 -c "$W/initramfs.cpio" > "$IMG/initrd.xz"
cp "$K/bzImage" "$IMG/bzImage"

syslinux_cfg() { # $1 = medium (disk|cd|floppy)
  cat <<CFG
SERIAL 0 115200
DEFAULT bartleby
PROMPT 0
TIMEOUT 10
LABEL bartleby
  KERNEL /bzImage
  INITRD /initrd.xz
  APPEND console=tty0 console=ttyS0,115200 panic=10 bartleby.boot=$1
LABEL ramspool
  KERNEL /bzImage
  INITRD /initrd.xz
  APPEND console=tty0 console=ttyS0,115200 panic=10 bartleby.boot=$1 bartleby.spool=tmpfs
CFG
}
CONF=$OVERLAY/etc/bartleby.toml

# ---------------------------------------------------------------- disk: MBR, FAT16 boot + ext4 spool
DISK_MB=${DISK_MB:-64}; BOOT_MB=${BOOT_MB:-16}
D=$W/bartleby.img
truncate -s ${DISK_MB}M "$D"
P1=2048; P1S=$((BOOT_MB*2048)); P2=$((P1+P1S)); P2S=$((DISK_MB*2048-P2))
printf 'label: dos\nstart=%d, size=%d, type=6, bootable\nstart=%d, size=%d, type=83\n' $P1 $P1S $P2 $P2S | sfdisk -q "$D"
mkfs.fat -F 16 -n BARTLEBY -h $P1 --offset=$P1 "$D" $((P1S/2)) >/dev/null 2>&1
syslinux --offset $((P1*512)) --install "$D"
dd if=$SYSL/mbr/mbr.bin of="$D" bs=440 count=1 conv=notrunc status=none
syslinux_cfg disk > "$W/syslinux.cfg"
mcopy -i "$D@@$((P1*512))" "$K/bzImage" "$IMG/initrd.xz" "$W/syslinux.cfg" "$CONF" ::/
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

# ---------------------------------------------------------------- floppy: 1.44 MB if it fits, else 2.88 MB
syslinux_cfg floppy > "$W/fd.cfg"
FLOPPY_KB=""
for kb in 1440 2880; do
  F=$W/fd$kb.img; rm -f "$F"
  mkfs.fat -C -n BARTLEBY "$F" $kb >/dev/null
  syslinux --install "$F"
  if mcopy -i "$F" "$K/bzImage" "$IMG/initrd.xz" "$CONF" ::/ 2>/dev/null && mcopy -i "$F" "$W/fd.cfg" ::/syslinux.cfg 2>/dev/null; then
    FLOPPY_KB=$kb; FLOPPY_FREE=$(mdir -i "$F" ::/ | sed -n 's/^ *\([0-9 ]*\) bytes free.*/\1/p' | tr -d ' ')" bytes free"; mv "$F" "$IMG/bartleby-floppy.img"; break
  fi
  [ $kb = 1440 ] && log "floppy: kernel + initramfs do not fit on 1.44 MB; using a 2.88 MB floppy"
done
[ -n "$FLOPPY_KB" ] || die "floppy: does not even fit 2.88 MB"
echo "$FLOPPY_KB" > "$IMG/floppy-kb"

# ---------------------------------------------------------------- sizes
{
  echo "== image sizes (bytes) =="
  printf '%-28s %10s\n' "kernel bzImage" "$(stat -c %s "$IMG/bzImage")"
  printf '%-28s %10s\n' "binary ($(basename "$BIN"))" "$(stat -c %s "$BIN")"
  printf '%-28s %10s\n' "initramfs (cpio)" "$(stat -c %s "$W/initramfs.cpio")"
  printf '%-28s %10s\n' "initramfs (xz)" "$(stat -c %s "$IMG/initrd.xz")"
  printf '%-28s %10s\n' "kernel + initramfs" "$(( $(stat -c %s "$IMG/bzImage") + $(stat -c %s "$IMG/initrd.xz") ))"
  printf '%-28s %10s\n' "bartleby.img (disk)" "$(stat -c %s "$IMG/bartleby.img")"
  printf '%-28s %10s\n' "bartleby.iso" "$(stat -c %s "$IMG/bartleby.iso")"
  printf '%-28s %10s  (%s KB floppy, %s)\n' "bartleby-floppy.img" "$(stat -c %s "$IMG/bartleby-floppy.img")" "$FLOPPY_KB" "$FLOPPY_FREE"
} | tee "$IMG/sizes.txt"
