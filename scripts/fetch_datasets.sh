#!/usr/bin/env bash
# Fetch the icon and emoji sets from the npm registry (tagged SVGs, used as image-text data;
# see data/readers/icons.py). Each package is fetched with npm's ordinary client
# (`npm pack NAME@VERSION` in a temp folder) and unpacked into
#   ${SMART_GALLERY_DATA:-$HOME/.cache/smart-gallery/datasets}/<short-name>/
# with the tarball's leading `package/` folder stripped. A set already there is skipped.
#   bash scripts/fetch_datasets.sh                # all sets
#   bash scripts/fetch_datasets.sh tabler mdi     # only these short names
# Licences: tabler MIT, mdi Apache-2.0, phosphor MIT, game-icons CC BY 3.0,
# twemoji CC BY 4.0, noto Apache-2.0 (each package ships its licence file).
set -euo pipefail

DATA=${SMART_GALLERY_DATA:-$HOME/.cache/smart-gallery/datasets}

# short-name  package@version
SETS=(
  "tabler      @tabler/icons@3.51.0"
  "mdi         @mdi/svg@7.4.47"
  "phosphor    @phosphor-icons/core@2.1.1"
  "game-icons  @iconify-json/game-icons@1.2.4"
  "twemoji     @iconify-json/twemoji@1.2.5"
  "noto        @iconify-json/noto@1.2.9"
)

command -v npm >/dev/null || { echo "npm not found: install Node.js (e.g. sudo apt-get install npm)" >&2; exit 1; }

want=("$@")
wanted() {
  [ ${#want[@]} -eq 0 ] && return 0
  local w; for w in "${want[@]}"; do [ "$w" = "$1" ] && return 0; done
  return 1
}

mkdir -p "$DATA"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

for line in "${SETS[@]}"; do
  read -r short spec <<<"$line"
  wanted "$short" || continue
  dest="$DATA/$short"
  if [ -f "$dest/.fetched" ] && [ "$(cat "$dest/.fetched")" = "$spec" ]; then
    echo "[skip] $short: $spec already in $dest"
    continue
  fi
  echo "[fetch] $short: npm pack $spec"
  work="$tmp/$short"
  mkdir -p "$work"
  tarball=$(cd "$work" && npm pack --silent "$spec" | tail -n 1)
  [ -f "$work/$tarball" ] || { echo "npm pack $spec produced no tarball" >&2; exit 1; }
  rm -rf "$dest.partial"
  mkdir -p "$dest.partial"
  tar xzf "$work/$tarball" -C "$dest.partial" --strip-components=1
  echo "$spec" > "$dest.partial/.fetched"
  rm -rf "$dest"
  mv "$dest.partial" "$dest"
  echo "[done] $short -> $dest ($(du -sh "$dest" | cut -f1))"
done
