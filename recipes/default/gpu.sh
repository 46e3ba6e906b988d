#!/usr/bin/env bash
# The default recipe on one GPU machine without network (README.md here, "GPU path").
#
#   bash recipes/default/gpu.sh receive   # GPU command 1, carrying runs/gpu-upload/one
#   bash recipes/default/gpu.sh run       # GPU command 2, carrying runs/gpu-upload/two, right after command 1
#   bash recipes/default/gpu.sh toy       # the whole path on this CPU with a tiny model
#
# It installs nothing: it runs this repository from its folder (PYTHONPATH) with the Python
# that holds torch ($PYTHON, else python3), and recipes/default/gpu.py checks the packages
# first. Output and a copy of this log go to $OUT (else runs/gpu/out).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "error: no $PY on this machine; set PYTHON to the Python that holds torch" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1
out="${OUT:-runs/gpu/out}"
mkdir -p "$out"
"$PY" recipes/default/gpu.py "$@" 2>&1 | tee -a "$out/gpu-${1:-help}.log"
exit "${PIPESTATUS[0]}"
