"""Bad input is rejected before any Ray work starts, with one message naming the field and the fix.

Each case runs the real `frugalray` CLI in a subprocess whose RAY_ADDRESS points at a port
where nothing listens: had the command tried to start or join Ray before validating, it
would fail with a connection error instead of the config error asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS="127.0.0.1:1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "frugalray.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture()
def tasks(tmp_path) -> Path:
    path = tmp_path / "tasks.jsonl"
    rows = [{"id": str(i), "instruction": f"What is {i} + 1?", "input": "", "response": str(i + 1)} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_help_lists_every_stage():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("model", "data", "score", "select", "finetune", "sweep", "serve", "pipeline", "ledger", "report"):
        assert command in out.stdout


def test_unknown_key_is_named_with_a_suggestion(tmp_path, tasks):
    cfg = write_yaml(tmp_path / "ft.yaml", {"data_path": str(tasks), "lora_rnak": 4})
    out = run_cli("finetune", "--config", cfg)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "lora_rnak: unknown key" in out.stderr and "did you mean 'lora_rank'" in out.stderr


def test_missing_data_file_is_named(tmp_path):
    cfg = write_yaml(tmp_path / "ft.yaml", {"data_path": str(tmp_path / "nope.jsonl")})
    out = run_cli("finetune", "--config", cfg)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "data_path" in out.stderr and "nope.jsonl" in out.stderr


def test_dataset_missing_the_mapped_field(tmp_path, tasks):
    cfg = write_yaml(
        tmp_path / "score.yaml",
        {"input_path": str(tasks), "output_path": str(tmp_path / "scored"), "fields": {"response": "output"}},
    )
    out = run_cli("score", "--config", cfg)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "fields.response" in out.stderr and "'output'" in out.stderr


def test_model_that_is_not_available_offline(tmp_path, tasks):
    cfg = write_yaml(tmp_path / "ft.yaml", {"data_path": str(tasks), "model": "some-org/not-downloaded"})
    out = run_cli("finetune", "--config", cfg)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "model" in out.stderr and "offline" in out.stderr


def test_flop_cap_below_one_training_step(tmp_path, tasks):
    cfg = write_yaml(
        tmp_path / "sweep.yaml",
        {"finetune": {"data_path": str(tasks), "eval_rows": 2}, "flop_cap": 1.0e6},
    )
    out = run_cli("sweep", "--config", cfg)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "flop_cap" in out.stderr and "at least" in out.stderr


def test_pipeline_reports_every_problem_at_once(tmp_path):
    out = run_cli(
        "pipeline", "--config", "jobs/configs/pipeline_small.yaml",
        "--set", "finetune.lora_rank=0", "--set", "select.keep_fraction=2", "--set", "model=./no/such/dir",
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "finetune.lora_rank" in out.stderr
    assert "select.keep_fraction" in out.stderr
    assert "model: './no/such/dir'" in out.stderr


def test_data_generate_writes_labelled_noise(tmp_path):
    out_path = tmp_path / "t.jsonl"
    out = run_cli("data", "generate", "--out", str(out_path), "--n-rows", "20", "--noise-rate", "0.25", "--seed", "3")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert len(rows) == 20
    assert sum(r["noise_kind"] != "none" for r in rows) == 5
    worked = run_cli("data", "generate", "--out", str(tmp_path / "w.jsonl"), "--n-rows", "4",
                     "--response-style", "worked")
    assert worked.returncode == 0, worked.stderr[-2000:]
    assert all(" = " in json.loads(line)["response"] for line in (tmp_path / "w.jsonl").read_text().splitlines())


def test_serve_job_rejects_a_missing_adapter_before_ray():
    env = dict(os.environ, RAY_ADDRESS="127.0.0.1:1", HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "jobs/serve.py", "--config", "serve/config.yaml", "--set", "adapters.mine=/no/such/adapter"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "adapters.mine" in out.stderr and "PEFT adapter" in out.stderr
