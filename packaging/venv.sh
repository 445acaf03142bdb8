#!/bin/sh
# Make ./.venv for the README's set-up commands, on a fresh machine with Python 3.11+.
#
# Why a script: Debian and Ubuntu refuse `pip install` outside a virtual environment
# (PEP 668), and they ship venv's pip bootstrap (ensurepip) in a package of its own,
# python3-venv, that a fresh install lacks. This installs that package when it is
# missing (as root, or through sudo), then creates the environment. An existing .venv
# with pip is kept.
set -eu
if [ -x .venv/bin/pip ]; then
    exit 0
fi
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "regproxy needs Python 3.11 or later as python3 (found: $(python3 --version 2>&1))" >&2
    exit 1
fi
if python3 -m venv .venv >/dev/null 2>&1; then
    exit 0
fi
rm -rf .venv
# ensurepip is missing: Debian/Ubuntu's python3-venv brings it
if [ "$(id -u)" = 0 ]; then
    as_root=""
elif command -v sudo >/dev/null 2>&1; then
    as_root="sudo"
else
    echo "python3 -m venv failed: install python3-venv (apt-get install python3-venv) as root" >&2
    exit 1
fi
echo "installing python3-venv (Python's venv lacks pip here)" >&2
$as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
python3 -m venv .venv
