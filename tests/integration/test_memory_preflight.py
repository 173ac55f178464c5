"""A training config predicted not to fit is refused before any Ray work, naming the fields and the fix.

The CLI cases run `frugalray` in a subprocess whose RAY_ADDRESS points where nothing listens:
had a command tried to start or join Ray first, it would fail with a connection error
instead of the memory error asserted here. No Ray cluster is started by these tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from frugalray.config import ConfigError
from frugalray.train.memory_estimate import GiB, MiB, estimate_memory, model_arch
from frugalray.train.memory_plan import memory_problems, setup_from_config

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS="127.0.0.1:1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "frugalray.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def finetune_cfg(tmp_path: Path, **changes):
    from frugalray.train.finetune import FinetuneConfig

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+1?", "response": str(i + 1)}) + "\n" for i in range(12)))
    fields = {"data_path": str(data), "method": "lora", "batch_size": 8, "seq_len": 256, "max_steps": 2}
    fields.update(changes)
    return FinetuneConfig(**fields)


def test_memory_problems_names_fields_and_fix(default_model_path, tmp_path):
    cfg = finetune_cfg(tmp_path)
    est = estimate_memory(model_arch(default_model_path), setup_from_config(cfg, num_workers=cfg.num_workers))
    assert memory_problems(cfg, default_model_path, device_memory=est.peak_bytes + MiB) == []
    problems = memory_problems(cfg, default_model_path, device_memory=int(est.peak_bytes * 0.7))
    assert len(problems) == 1
    text = problems[0]
    assert "batch_size" in text and "method" in text and "exceeds" in text
    assert "fix: set" in text  # e.g. gradient_checkpointing: true / batch_size: 4 / method: qlora


def test_plan_memory_cli_refuses_finetune_config_without_ray(default_model_path, tmp_path):
    cfg = finetune_cfg(tmp_path)
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = run_cli("plan-memory", "--config", str(path), "--device-memory", "1.3GiB", "--device", "cpu")
    assert proc.returncode == 3, proc.stderr
    assert "does NOT fit" in proc.stdout and "fix: set" in proc.stdout
    assert "chosen:" in proc.stdout  # the plan below shows a combination that fits
    assert "Ray" not in proc.stderr and "Connection" not in proc.stderr
    ok = run_cli("plan-memory", "--config", str(path), "--device-memory", "24GiB", "--device", "cpu")
    assert ok.returncode == 0, ok.stderr
    assert "chosen:" in ok.stdout


def test_plan_memory_cli_plans_and_explains(default_model_path):
    proc = run_cli("plan-memory", "--model", default_model_path, "--device-memory", "2GiB", "--seq-len", "512",
                   "--global-batch", "16", "--world-size", "2", "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)["plan"]
    assert plan["best"]["peak_bytes"] <= 2 * GiB
    fitting = [c for c in plan["candidates"] if c["fits"]]
    assert fitting and fitting[0]["rel_step_s"] == min(c["rel_step_s"] for c in fitting)
    nothing = run_cli("plan-memory", "--model", default_model_path, "--device-memory", "100MiB", "--seq-len", "512",
                      "--global-batch", "16", "--device", "cpu")
    assert nothing.returncode == 3
    assert "nothing fits" in nothing.stdout and "device memory:" in nothing.stdout


def test_finetune_preflight_refuses_before_ray(default_model_path, tmp_path, monkeypatch):
    """`run_finetune`'s preflight asks the planner (frugalray.train.memory_plan.memory_problems) first."""
    import ray

    from frugalray.train import finetune

    cfg = finetune_cfg(tmp_path)
    monkeypatch.setattr("frugalray.train.memory_plan.available_device_memory",
                        lambda world=1, device=None: (200 * MiB, "cpu"))
    was_up = ray.is_initialized()
    with pytest.raises(ConfigError) as err:
        finetune.run_finetune(cfg, tmp_path / "run")
    assert "exceeds" in str(err.value) and "batch_size" in str(err.value)
    assert ray.is_initialized() == was_up
