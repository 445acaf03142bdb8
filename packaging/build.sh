#!/usr/bin/env bash
# Build the one-file regproxy binary with PyInstaller.
#
#   packaging/build.sh [DIST_DIR]        default DIST_DIR: ./dist (the binary is DIST_DIR/regproxy)
#
# Needs the runtime dependencies and PyInstaller in the Python it runs ($PYTHON, default
# python3): `pip install -e '.[build]'` installs both. REGPROXY_VERSION overrides the
# version baked into the binary (default: pyproject.toml's).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
python=${PYTHON:-python3}
dist=$(mkdir -p "${1:-$root/dist}" && cd "${1:-$root/dist}" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/regproxy-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

if ! "$python" -c 'import PyInstaller' 2>/dev/null; then
    echo "build.sh: PyInstaller is not installed for $python (pip install -e '.[build]')" >&2
    exit 2
fi

started=$(date +%s)
# the build runs from the work folder: nothing lands in the source tree
(cd "$work" && "$python" -m PyInstaller --noconfirm --clean --log-level WARN \
    --distpath "$dist" --workpath "$work/build" "$here/regproxy.spec")

binary="$dist/regproxy"
"$binary" --version
size=$(stat -c %s "$binary")
echo "built $binary: $((size / 1024 / 1024)) MiB ($size bytes) in $(( $(date +%s) - started )) s"
