# Shared settings for the image build scripts (sourced, not run).
set -euo pipefail
IMAGE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOP=$(cd "$IMAGE_DIR/.." && pwd)
OUT=${OUT:-$IMAGE_DIR/out}
CACHE=${BARTLEBY_CACHE:-$HOME/.cache/bartleby}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
mkdir -p "$OUT" "$CACHE"
log() { printf '[image] %s\n' "$*" >&2; }
die() { printf '[image] ERROR: %s\n' "$*" >&2; exit 1; }
# sha256 of files and strings given as arguments (files by content, others literally)
hash_inputs() {
  local a
  for a in "$@"; do
    if [ -f "$a" ]; then printf 'F:%s\n' "$(basename "$a")"; cat "$a"; else printf 'S:%s\n' "$a"; fi
  done | sha256sum | cut -c1-16
}
