#!/usr/bin/env bash
# Installs what the tests and the image build need on a fresh Debian machine,
# non-interactively, from Debian's packages and Rust's package registry only. Idempotent:
# a second run only checks.
set -euo pipefail

PKGS=(swaks postfix chromium qemu-system-x86 qemu-user linux-source-6.1 syslinux syslinux-common
      extlinux isolinux mtools e2fsprogs dosfstools xorriso fdisk cpio xz-utils bc flex bison
      libelf-dev libssl-dev gcc-multilib binutils python3 make dpkg-dev w3m lynx pflogsumm
      libnet-ssleay-perl libio-socket-ssl-perl)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Postfix is only a tool box here (smtp-sink, smtp-source, the benchmark's
    # private instance): no system mail configuration.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# Postfix's package may start a system instance; the tests never need it.
command -v postfix >/dev/null && { postfix status >/dev/null 2>&1 && postfix stop >/dev/null 2>&1 || true; }

command -v cargo >/dev/null || { echo "setup: cargo (rustup) is required" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q '^rust-src' || rustup component add rust-src
# Exim as a test peer: unpacked into a private root (exim4 conflicts with postfix), cached.
"$(dirname "$0")/relay/exim_root.sh" >/dev/null
echo "setup: ok"
