#!/bin/bash
# Install (non-interactively) everything the image build needs. Idempotent; quick when done.
. "$(dirname "$0")/common.sh"
PKGS="qemu-system-x86 qemu-user linux-source-6.1 syslinux syslinux-common extlinux isolinux mtools
      e2fsprogs dosfstools xorriso cpio xz-utils bc flex bison libelf-dev gcc-multilib make
      fdisk binutils dpkg-dev python3 swaks postfix curl grub-pc-bin"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if [ -n "$missing" ]; then
  log "installing:$missing"
  # postfix is only used for /usr/sbin/smtp-sink in tests: install it without configuring a mail server
  echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections || true
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
fi
# deb-src for `apt-get source musl`: the same archive and suite as the
# machine's first binary source, so the build uses whatever mirror apt uses.
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
  uri=""; suite=""; keyring=""
  if ls /etc/apt/sources.list.d/*.sources >/dev/null 2>&1; then
    uri=$(grep -h -m1 '^URIs:' /etc/apt/sources.list.d/*.sources | head -1 | awk '{print $2}')
    suite=$(grep -h -m1 '^Suites:' /etc/apt/sources.list.d/*.sources | head -1 | awk '{print $2}')
    keyring=$(grep -h -m1 '^Signed-By:' /etc/apt/sources.list.d/*.sources | head -1 | awk '{print $2}')
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    read -r _ uri suite _ < <(grep -m1 '^deb ' /etc/apt/sources.list)
  fi
  [ -n "$uri" ] && [ -n "$suite" ] || { log "no apt source found to derive deb-src from"; exit 1; }
  log "adding a deb-src entry for $suite"
  { printf 'Types: deb-src\nURIs: %s\nSuites: %s\nComponents: main\n' "$uri" "$suite"
    [ -n "$keyring" ] && printf 'Signed-By: %s\n' "$keyring"; } \
    | $SUDO tee /etc/apt/sources.list.d/bartleby-deb-src.sources >/dev/null
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
fi
if command -v rustup >/dev/null; then
  rustup component list --installed 2>/dev/null | grep -q '^rust-src' || { log "rustup component add rust-src"; rustup component add rust-src; }
fi
