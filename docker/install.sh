#!/bin/sh
# Install mailgate from a source tree into a fresh virtualenv: what docker/Dockerfile runs, and
# what tests/integration/test_container.py runs the same way outside a container engine.
# Usage: sh docker/install.sh SRC_DIR VENV_DIR
set -eu
src=$1
venv=$2
python3 -m venv "$venv"
"$venv/bin/pip" install --no-cache-dir --disable-pip-version-check -q "$src"
# the build tree is not needed at run time (the package is installed, not linked)
rm -rf "$src/build" "$src"/*.egg-info
