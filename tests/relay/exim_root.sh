#!/usr/bin/env bash
# Exim as a real sending peer for tests/relay/test_exim.py, side by side with Postfix.
#
# Debian makes exim4 and postfix conflict as packages, so Exim is not installed: its packages
# are fetched with `apt-get download` and unpacked with `dpkg -x` into a private root, cached
# under ~/.cache/bartleby/exim-<version>. Libraries the binary needs and the machine lacks
# (found with ldd; on bookworm: libidn12) are fetched and unpacked the same way.
#
# Debian's exim is built with EXIM_USER=Debian-exim, looked up by name at start (exim exits
# with 'failed to find uid for user name "Debian-exim"' without it, and refuses uid 0 for it).
# No system user is created: the wrapper `exim` in the cache runs the binary in a private mount
# namespace (unshare -m) where /etc/passwd and /etc/group are bind-mounted copies with a
# Debian-exim entry (uid/gid 64011). The machine's files are untouched.
#
# Prints the cache directory; its `exim` wrapper takes exim's own arguments (in the wrapper's
# namespace the binary is /tmp/bartleby-exim-root/usr/sbin/exim4: use that as exim_path).
# Fails (non-zero, reason on stderr) when the packages cannot be fetched or the binary
# does not run: the suite then fails, it does not skip.
set -euo pipefail

die() { echo "exim_root: $*" >&2; exit 1; }
command -v apt-get >/dev/null || die "apt-get not found: need a Debian machine"
command -v unshare >/dev/null || die "unshare (util-linux) not found"

ver=$(apt-cache policy exim4-daemon-light 2>/dev/null | awk '/Candidate:/ {print $2}')
[[ -n "$ver" && "$ver" != "(none)" ]] || die "no candidate for exim4-daemon-light (apt-get update?)"
dir="$HOME/.cache/bartleby/exim-$ver"

if [[ -x "$dir/exim" ]] && "$dir/exim" -C "$dir/empty.conf" -bV >/dev/null 2>&1; then
    echo "$dir"; exit 0
fi

rm -rf "$dir.tmp"
mkdir -p "$dir.tmp/debs" "$dir.tmp/root"
cd "$dir.tmp/debs"
# apt's _apt user cannot write to root's cache: download to a world-writable scratch dir.
dl=$(mktemp -d); chmod 777 "$dl"
(cd "$dl" && apt-get download -q exim4-base exim4-daemon-light >/dev/null) \
    || die "apt-get download exim4-base exim4-daemon-light failed"
mv "$dl"/*.deb .
for f in *.deb; do dpkg -x "$f" ../root; done
bin="$dir.tmp/root/usr/sbin/exim4"
[[ -x "$bin" ]] || die "no usr/sbin/exim4 in the unpacked packages"
# The packaged binary is setuid root: on its re-exec (exim_path, -Mc) the loader would ignore
# LD_LIBRARY_PATH (secure execution). The tests run it as root; the private copy needs no bit.
chmod u-s,g-s "$bin"
libdir="$dir.tmp/root/usr/lib/x86_64-linux-gnu"

# Missing libraries: map each 'libfoo.so.N => not found' to its package, fetch, unpack, retry.
for _ in 1 2 3; do
    missing=$(LD_LIBRARY_PATH="$libdir" ldd "$bin" | awk '/not found/ {print $1}')
    [[ -z "$missing" ]] && break
    pkgs=()
    for lib in $missing; do
        # The package is named after the soname: libidn.so.12 -> libidn12.
        p=$(echo "$lib" | sed -E 's/\.so\.([0-9]+).*/\1/; s/^(lib[a-z0-9+_-]*[a-z])([0-9]+)$/\1\2/')
        apt-cache show "$p" >/dev/null 2>&1 || p=$(echo "$lib" | sed -E 's/\.so\.([0-9]+).*/-\1/')
        apt-cache show "$p" >/dev/null 2>&1 || die "$lib is missing and no package $p provides it"
        pkgs+=("$p")
    done
    (cd "$dl" && apt-get download -q "${pkgs[@]}" >/dev/null) || die "apt-get download ${pkgs[*]} failed"
    mv "$dl"/*.deb .
    for p in "${pkgs[@]}"; do dpkg -x "$p"_*.deb ../root; done
done
rmdir "$dl"
missing=$(LD_LIBRARY_PATH="$libdir" ldd "$bin" | awk '/not found/ {print $1}')
[[ -z "$missing" ]] || die "libraries still missing: $missing"

{ cat /etc/passwd; echo 'Debian-exim:x:64011:64011:exim (bartleby tests):/nonexistent:/usr/sbin/nologin'; } > "$dir.tmp/passwd"
{ cat /etc/group; echo 'Debian-exim:x:64011:'; } > "$dir.tmp/group"
: > "$dir.tmp/empty.conf"
cat > "$dir.tmp/exim" <<'WRAP'
#!/bin/sh
# Runs the private exim with its libraries and a Debian-exim user, in a private mount namespace.
# Exim re-executes itself (exim_path) after dropping to the exim uid, which cannot enter /root:
# the private root is bind-mounted (in the namespace only) on /tmp/bartleby-exim-root.
d=$(dirname "$(readlink -f "$0")")
m=/tmp/bartleby-exim-root
mkdir -p "$m" && chmod 755 "$m"
exec unshare -m sh -c 'd=$1; m=$2; shift 2; mount --bind "$d/passwd" /etc/passwd && mount --bind "$d/group" /etc/group &&
  mount --bind -o ro "$d/root" "$m" &&
  LD_LIBRARY_PATH="$m/usr/lib/x86_64-linux-gnu" exec "$m/usr/sbin/exim4" "$@"' sh "$d" "$m" "$@"
WRAP
chmod 755 "$dir.tmp/exim"
"$dir.tmp/exim" -C "$dir.tmp/empty.conf" -bV >/dev/null 2>"$dir.tmp/bV.err" \
    || die "the unpacked exim does not run: $(cat "$dir.tmp/bV.err")"
rm -rf "$dir"
mv "$dir.tmp" "$dir"
echo "$dir"
