#!/usr/bin/env bash
# GPU check: what one CUDA machine can check of frugalray's GPU path, in one run (about 3-5 minutes on
# an H100; hard limit 9 minutes). The checks are in bench/gpu_check.py, whose docstring says what each does:
#   devices               frugalray.devices' answers on CUDA (probe, bf16, 4-bit, placement, dtype, require_cuda)
#   memory_planner        the planner's predicted peak vs torch.cuda.max_memory_allocated: lora, full, lora+ckpt
#                         (and qlora when bitsandbytes runs 4-bit on CUDA there)
#   fsdp_parity           FSDP2 with 2 processes sharing the one GPU (NCCL, else gloo, reason recorded)
#                         vs one process: per-step loss and gradient norm
#   qlora_gradient_guard  QLoRA keeps its gradients after an evaluation on CUDA (needs bitsandbytes)
# Result: bench/results/gpu_check.json (or $OUT/gpu_check.json when $OUT is set, or --out DIR), every
# check with a status "ok", "failed: why" or "skipped: why". Exit status 1 when a check failed.
#
# How to run it on any CUDA machine, from a copy of this repository (no install, nothing fetched there):
#   bash bench/gpu_check.sh                 # needs python3 with torch (CUDA), transformers, peft, accelerate,
#                                           # pyyaml, psutil, pydantic; PYTHON=... picks another interpreter
# The sources are found through PYTHONPATH=platform when frugalray is not installed. A machine without
# pydantic (or bitsandbytes, for the QLoRA parts) takes wheels carried in $GPU_CHECK_WHEELS (default
# .whl, ignored by git), made on a machine that can fetch them (~44 MiB together, Python 3.12, x86-64):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
#       typing-inspection==0.4.5 bitsandbytes==0.50.2
# (match pydantic / pydantic_core to `pip list` here; leave bitsandbytes out to skip the QLoRA parts.)
# The script installs them with pip --no-index --target into a temporary directory, never into the system.
# The model: $FRUGALRAY_MODEL (a local HF directory) if set, else the embedded default if it resolves, else
# random weights with the embedded default's architecture (the planner and FSDP need shapes, not weights).
#
# Without CUDA (this repository's CI machine): `bash bench/gpu_check.sh --cpu-smoke --out /tmp/x` runs
# the same code paths on the CPU with a tiny random model (~1 minute on 2 cores); each CUDA check is then
# "skipped: no CUDA" with a `cpu_smoke` entry. A run without CUDA never writes bench/results unless --out says so.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
$PY -c "import frugalray" 2>/dev/null || export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"

WHEELS=${GPU_CHECK_WHEELS:-.whl}
if ! $PY -c "import pydantic" 2>/dev/null || { ! $PY -c "import bitsandbytes" 2>/dev/null && ls "$WHEELS"/bitsandbytes-*.whl >/dev/null 2>&1; }; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    SITE=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
    echo "[gpu_check] installing carried wheels from $WHEELS into $SITE"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl \
      || echo "[gpu_check] pip could not install the carried wheels; the checks that need them will say so"
    export PYTHONPATH="$SITE:$PYTHONPATH"
  elif ! $PY -c "import pydantic" 2>/dev/null; then
    echo "[gpu_check] pydantic is missing and no wheels are in $WHEELS: see this script's header" >&2
  fi
fi

timeout 540 $PY bench/gpu_check.py "$@"
rc=$?
[ $rc -eq 124 ] && echo "[gpu_check] stopped after 540 s: gpu_check.json was not written" >&2
exit $rc
