#!/usr/bin/env bash
# GPU check, for a session that is lent a CUDA machine (well under 10 minutes):
#   bash bench/gpu_check.sh            # results in $OUT (if set) else bench/results/gpu_check.json
# 1. memory planner validation: `python bench/train_memory.py --quick` when that benchmark exists;
# 2. FSDP2 QLoRA parity on CUDA (NCCL): QLoRA under FSDP (2 ranks with >= 2 GPUs, else FSDP on
#    1 rank) vs the single-process loop without FSDP, same data/seed/global batch, 20 steps,
#    bf16 compute; per-step losses and the max difference go into the JSON.
# Needs a Python with torch (CUDA), transformers, peft, bitsandbytes and the frugalray sources;
# the model is $FRUGALRAY_MODEL (a local HF directory) or the embedded default.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
python_ok=$($PY -c "import frugalray" 2>/dev/null && echo yes || echo no)
[ "$python_ok" = yes ] || export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee "$RESULTS/gpu_check_nvidia_smi.txt"

planner_rc=skipped
if [ -f bench/train_memory.py ]; then
  timeout 300 $PY bench/train_memory.py --quick 2>&1 | tail -40 | tee "$RESULTS/gpu_check_train_memory.log"
  planner_rc=${PIPESTATUS[0]}
  [ -f bench/results/train_memory.json ] && cp bench/results/train_memory.json "$RESULTS/train_memory_gpu.json" 2>/dev/null
fi

timeout 360 $PY - "$RESULTS" "$planner_rc" <<'PYEOF' 2>&1 | tail -60
import json, os, sys, tempfile, time
import torch, torch.distributed as dist, torch.multiprocessing as mp

RESULTS, PLANNER_RC = sys.argv[1], sys.argv[2]
STEPS, ROWS = 20, 16

def cfg_for(batch):
    from frugalray.train.spec import TrainingSpec
    return TrainingSpec(method="qlora", lora_rank=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                        compute_dtype="bfloat16", learning_rate=3e-4, max_steps=STEPS, batch_size=batch,
                        seq_len=64, seed=0)

def rows():
    return [{"prompt": f"What is {i % 7 + 1} + {i % 5 + 2}?",
             "response": f"{i % 7 + 1} plus {i % 5 + 2} is {i % 7 + i % 5 + 3}." + " Done." * (i % 3)} for i in range(ROWS)]

def model_path():
    from frugalray.models import resolve_model
    return resolve_model(os.environ.get("FRUGALRAY_MODEL", "smollm2-135m-instruct"))

def worker(rank, world, path, port, out):
    from frugalray.train.loop import TrainingSession
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    s = TrainingSession(cfg_for(4 // world), path, rows(), [], rank, world, device=f"cuda:{rank}", fsdp=True)
    losses = [s.step().loss for _ in range(STEPS)]
    if rank == 0:
        json.dump({"losses": losses, "peak_bytes": torch.cuda.max_memory_allocated()}, open(out, "w"))
    dist.destroy_process_group()

def main():
    from frugalray.train.loop import TrainingSession
    result = {"planner_validation_rc": PLANNER_RC, "gpus": torch.cuda.device_count(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        path = model_path()
        t0 = time.time()
        single = TrainingSession(cfg_for(4), path, rows(), [], device="cuda:0")
        torch.cuda.reset_peak_memory_stats()
        ref = [single.step().loss for _ in range(STEPS)]
        result["single_peak_bytes"] = torch.cuda.max_memory_allocated()
        del single; torch.cuda.empty_cache()
        world = 2 if torch.cuda.device_count() >= 2 else 1
        out = os.path.join(tempfile.mkdtemp(), "fsdp.json")
        mp.spawn(worker, args=(world, path, 29561, out), nprocs=world)
        got = json.load(open(out))
        diffs = [abs(a - b) for a, b in zip(ref, got["losses"])]
        result.update(world_size=world, single_losses=ref, fsdp_losses=got["losses"], max_abs_diff=max(diffs),
                      fsdp_peak_bytes_rank0=got["peak_bytes"], seconds=time.time() - t0,
                      tolerance="|diff| <= 0.05 + 5% (bf16 compute)",
                      parity_ok=all(d <= 0.05 + 0.05 * abs(a) for d, a in zip(diffs, ref)))
        for i, (a, b) in enumerate(zip(ref, got["losses"]), 1):
            print(f"step {i:2d} single {a:.5f} fsdp {b:.5f} diff {b - a:+.2e}")
    except Exception as err:  # report what broke instead of dying silently
        import traceback
        result["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    from frugalray.benchmarking import write_result
    metrics = {k: result.get(k) for k in ("max_abs_diff", "single_peak_bytes", "fsdp_peak_bytes_rank0", "seconds")}
    write_result("gpu_check", {"steps": STEPS, "rows": ROWS, "method": "qlora", "world_size": result.get("world_size")},
                 {**metrics, "parity_ok": 1.0 if result.get("parity_ok") else 0.0, "detail": result},
                 {"parity_ok": ">= 1"}, RESULTS)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("losses")}, indent=1, default=str))

if __name__ == "__main__":
    main()
PYEOF
echo "gpu_check done: $RESULTS/gpu_check.json"
