#!/usr/bin/env bash
# Create .venv and install ovss with every extra the tests exercise (faiss, Ray, the web app, selenium).
# Idempotent: a second run only checks.
# torch is pinned to the CPU wheel available here; an unpinned torch pulls a multi-GB CUDA build.
# Never add torchvision, timm or open_clip: beside this torch they break transformers and diffusers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,faiss,ray,web]"
.venv/bin/python -c "import ovss, torch, diffusers, transformers; print('ovss', ovss.__version__, '| torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)"
