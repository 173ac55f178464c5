"""bench/gpu_check.sh on a machine without CUDA: its CPU smoke runs every check's code path with a tiny
random model, without Ray or vLLM (the CUDA machine it is written for has neither), and writes a
gpu_check.json that lists every check with a well-formed status. Plus the script's pure helpers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.sh"
# The CUDA machine has neither: importing either during the check is a bug there.
BLOCKED = ("ray", "vllm")
BLOCKER = f"""
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is blocked: the GPU check machine has no such package")
        return None
sys.meta_path.insert(0, _Blocked())
"""


def _load_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_module()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    """One CPU-smoke run of the shell script (about 30 s on 2 cores), Ray and vLLM made unimportable."""
    try:
        import torch
    except ImportError:
        pytest.skip("no torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real checks, not the CPU smoke")
    out = tmp_path_factory.mktemp("gpu_check")
    site = tmp_path_factory.mktemp("blocker")
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(site), str(REPO / "platform"), os.environ.get("PYTHONPATH", "")])}
    env.pop("OUT", None)
    committed = REPO / "bench" / "results" / "gpu_check.json"
    before = committed.stat().st_mtime_ns if committed.exists() else None
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=240, cwd=REPO, check=False)
    path = out / "gpu_check.json"
    assert path.is_file(), f"no gpu_check.json (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    after = committed.stat().st_mtime_ns if committed.exists() else None
    return {"result": json.loads(path.read_text()), "stdout": proc.stdout, "stderr": proc.stderr,
            "rc": proc.returncode, "committed_result_untouched": before == after}


def test_smoke_lists_every_check_with_a_status(smoke):
    result = smoke["result"]
    checks = result["metrics"]["checks"]
    assert list(checks) == list(gpu_check.CHECKS)
    for check in checks.values():
        gpu_check.status_kind(check["status"])  # raises on a malformed status
    assert result["config"]["mode"] == "cpu-smoke"
    assert result["metrics"]["checks_failed"] == 0 and smoke["rc"] == 0, smoke["stderr"][-3000:]
    assert sum(result["metrics"][k] for k in ("checks_ok", "checks_failed", "checks_skipped")) == len(checks)


def test_smoke_checks_the_device_module_and_skips_cuda_checks(smoke):
    checks = smoke["result"]["metrics"]["checks"]
    devices = checks["devices"]
    assert devices["status"] == "ok", devices["status"]
    assert devices["placement_auto"]["device"] == "cpu"
    assert "CUDA not available on node" in devices["require_cuda"]
    assert "device:" in devices["resolve_cuda_without_gpu"]
    for name in ("memory_planner", "fsdp_parity", "qlora_gradient_guard"):
        assert checks[name]["status"] == "skipped: no CUDA"
        gpu_check.status_kind(checks[name]["cpu_smoke"]["status"])


def test_smoke_runs_the_planner_and_qlora_guard_paths_on_the_cpu(smoke):
    checks = smoke["result"]["metrics"]["checks"]
    memory = checks["memory_planner"]["cpu_smoke"]
    assert memory["status"] == "ok", memory["status"]
    for name in ("lora", "full", "lora-gc"):
        entry = memory["configs"][name]
        assert entry["predicted_peak_bytes"] > 0 and len(entry["losses"]) == 3
        assert entry["batch_width"] == entry["spec"]["seq_len"], "rows fill seq_len, as the planner assumes"
    guard = checks["qlora_gradient_guard"]["cpu_smoke"]
    if "bitsandbytes" in guard["status"]:
        pytest.skip(guard["status"])
    assert guard["status"] == "ok", guard["status"]
    assert guard["guard"].startswith("refused") and guard["zero_lora_B_grads"] == 0


def test_smoke_fsdp_matches_one_process_on_the_cpu(smoke):
    fsdp = smoke["result"]["metrics"]["checks"]["fsdp_parity"]["cpu_smoke"]
    for method in ("lora", "full"):
        result = fsdp["methods"][method]
        assert result["backend"] == "gloo" and result["device"] == "cpu"
        assert result["parity_ok"], result.get("error") or (result["max_abs_loss_diff"], result["max_abs_grad_norm_diff"])
    assert fsdp["status"] == "ok", fsdp["status"]


def test_smoke_never_writes_bench_results(smoke):
    assert smoke["committed_result_untouched"]


# -- pure helpers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("status,kind", [("ok", "ok"), ("failed: x", "failed"), ("skipped: no CUDA", "skipped")])
def test_status_kind(status, kind):
    assert gpu_check.status_kind(status) == kind


@pytest.mark.parametrize("status", ["okay", "failed", "skipped:", "ok: fine", "", "passed"])
def test_status_kind_refuses_malformed(status):
    with pytest.raises(ValueError, match="malformed"):
        gpu_check.status_kind(status)


def test_summarize_counts_each_kind():
    checks = {"a": gpu_check.ok(), "b": gpu_check.failed("x"), "c": gpu_check.skipped("no CUDA"), "d": gpu_check.ok()}
    assert gpu_check.summarize(checks) == {"checks_ok": 2, "checks_failed": 1, "checks_skipped": 1}


def test_parity_tolerance_and_lengths():
    assert gpu_check.parity([1.0, 2.0], [1.0005, 2.0], 1e-3, 0.0) == (True, pytest.approx(5e-4))
    assert gpu_check.parity([1.0, 2.0], [1.0, 2.1], 1e-3, 1e-3)[0] is False
    assert gpu_check.parity([1.0, 2.0], [1.0], 1e-3, 1e-3)[0] is False
    assert gpu_check.parity([], [], 1e-3, 1e-3)[0] is False


def test_compare_parity_catches_halved_gradients():
    """Adam is invariant to a gradient's scale, so equal losses can hide averaged-instead-of-summed gradients."""
    ref = {"losses": [5.0, 4.9, 4.8], "grad_norms": [0.6, 0.64, 0.4]}
    halved = {"losses": [5.0, 4.9, 4.8], "grad_norms": [0.3, 0.32, 0.2]}
    assert gpu_check.compare_parity(ref, ref, "lora")["parity_ok"]
    assert not gpu_check.compare_parity(ref, halved, "lora")["parity_ok"]


def test_plain_makes_device_facts_json_ready():
    from frugalray.devices import LocalDevices

    facts = gpu_check.plain(LocalDevices(four_bit=frozenset({"cuda", "cpu"})))
    assert facts["four_bit"] == ["cpu", "cuda"]
    json.dumps(facts)


def test_default_out_dir_never_bench_results_without_cuda(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    scratch = gpu_check.default_out_dir(cuda=False)
    assert scratch != REPO / "bench" / "results" and scratch.is_dir()
    scratch.rmdir()
    assert gpu_check.default_out_dir(cuda=True) == REPO / "bench" / "results"
    monkeypatch.setenv("OUT", "/tmp/device-out")
    assert gpu_check.default_out_dir(cuda=False) == Path("/tmp/device-out")
