#!/usr/bin/env bash
# Create the virtual environment at .venv with the pinned dependencies of pyproject.toml.
#   bash scripts/setup.sh            # a real .venv in the checkout
# With SMART_GALLERY_VENV_CACHE=/some/dir the environment is built once per hash of
# pyproject.toml under that folder and .venv becomes a link to it (what CI does).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'

deps_hash=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -n "${SMART_GALLERY_VENV_CACHE:-}" ]; then
  target="$SMART_GALLERY_VENV_CACHE/venv-$deps_hash"
else
  target=".venv"
fi

if [ -f "$target/.deps-$deps_hash" ]; then
  echo "virtual environment up to date: $target"
else
  # Built where it will live: console scripts (chroma, torchrun, schemathesis...) get a #! line
  # naming this interpreter, so a venv must not be moved after pip ran. The marker file written
  # last is what makes a half-built environment (a crash, Ctrl+C) count as missing next time.
  rm -rf "$target" "$target.partial"
  "$PYTHON" -m venv "$target"
  "$target/bin/pip" install --quiet --upgrade pip "setuptools>=68"
  # Dependencies only (the checkout itself is linked in below, outside this cached step), so
  # one cached environment serves every clone. torch/torchvision come from this machine's local disk.
  "$target/bin/python" - <<'PY' > "$target/requirements.txt"
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["test"]))
PY
  "$target/bin/pip" install --quiet -r "$target/requirements.txt"
  touch "$target/.deps-$deps_hash"
fi

if [ "$target" != ".venv" ]; then
  rm -rf .venv
  ln -s "$target" .venv
fi

# The checkout itself, as an editable install without dependencies: `python -m serving`,
# `python -m training.train` ... then work from any folder, and .venv/bin gets the console
# scripts of pyproject.toml (smart-gallery, smart-gallery-serve, smart-gallery-reindex).
# Rewritten on every run, so an environment shared by several clones (the cache above) points
# at the clone whose setup.sh ran last; code run from a checkout's root folder still imports
# that checkout first.
if ! log=$(.venv/bin/python -m pip install --no-deps --no-build-isolation --editable . 2>&1); then
  echo "$log" >&2
  exit 1
fi
echo "this checkout is installed (editable) in $(readlink -f .venv)"
