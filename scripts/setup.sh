#!/usr/bin/env bash
# Create .venv and install the kit. Safe to run again: it only installs what is missing.
#   KIT_TORCH_SPEC   the torch requirement installed before the rest (default torch==2.13.0)
#   KIT_DEV=1        also install the test tools
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip

# torch goes first so that the range in requirements.txt is already met and pip does not
# pull a second, multi-gigabyte build.
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "${KIT_TORCH_SPEC:-torch==2.13.0}"
fi

if [ "${KIT_DEV:-0}" = "1" ]; then
  python -m pip install --quiet -r requirements-dev.txt
else
  python -m pip install --quiet -r requirements.txt
fi
