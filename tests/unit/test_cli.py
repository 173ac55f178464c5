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


# -- the stage registry: one list of stages for the CLI, `frugalray submit` and jobs/ --------------


def _console_script_help() -> str:
    """`frugalray --help` through the installed console script (or its entry point when not on disk)."""
    script = Path(sys.executable).with_name("frugalray")
    if script.is_file():
        cmd = [str(script), "--help"]
    else:
        cmd = [sys.executable, "-c", ("import sys; from importlib.metadata import entry_points; "
                                      "sys.argv = ['frugalray', '--help']; "
                                      "entry_points(group='console_scripts', name='frugalray')['frugalray'].load()()")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_python_dash_m_frugalray_is_the_frugalray_command():
    module = subprocess.run([sys.executable, "-m", "frugalray", "--help"], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert module.returncode == 0, module.stderr[-2000:]
    assert module.stdout == _console_script_help()
    assert module.stdout == run_cli("--help").stdout  # python -m frugalray.cli, too


def test_every_registered_stage_is_a_subcommand_and_a_submittable_one_a_submit_choice():
    from frugalray.stages import STAGES, submittable

    out = run_cli("--help").stdout
    for name in STAGES:
        assert f"    {name} " in out
    submit = run_cli("submit", "--help").stdout
    assert "{" + ",".join(submittable()) + "}" in submit


def test_top_level_help_imports_neither_torch_nor_ray():
    code = "\n".join([
        "import sys", "from frugalray.cli.main import main", "try:", "    main(['--help'])", "except SystemExit:",
        "    pass", "print('LOADED', [m for m in ('torch', 'ray', 'transformers', 'vllm', 'peft') if m in sys.modules])",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "LOADED []"


def test_stage_help_lists_the_config_keys_from_the_typed_config():
    import typing

    from frugalray.data.score import ScoreConfig
    from frugalray.tune.sweep import SweepConfig

    out = run_cli("score", "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ScoreConfig.model_fields:
        assert f"\n  {name}: " in out.stdout
    # the scorer names come from the config's Literal type, not from a YAML comment
    (scorer,) = typing.get_args(ScoreConfig.model_fields["scorers"].annotation)
    assert "list[{" + "|".join(typing.get_args(scorer)) + "}]" in out.stdout
    assert "\n  dynamics.checkpoints: " in out.stdout  # nested sections as section.field
    sweep = run_cli("sweep", "--help").stdout
    for name in SweepConfig.model_fields["finetune"].annotation.model_fields:
        assert f"\n  finetune.{name}: " in sweep
    assert "--resume RUN_DIR" in sweep and "--flop-caps" in sweep


def test_jobs_build_their_parsers_from_the_registry():
    """Every stage's jobs/ script takes the CLI subcommand's flags (less --address), and its --help lists
    the config's keys too."""
    import argparse

    from frugalray.cli.main import build_parser
    from frugalray.stages import STAGES, job_parser

    def options(parser: argparse.ArgumentParser) -> set[str]:
        return {o for action in parser._actions for o in action.option_strings}

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, stage in STAGES.items():
        assert options(subcommands[name]) == options(job_parser(name, "")) | {"--address"}, name
        assert f'job_parser("{name}", __doc__)' in (REPO / stage.script).read_text(), stage.script
    env = dict(os.environ, PYTHONPATH=str(REPO / "platform"))
    out = subprocess.run([sys.executable, "jobs/select_data.py", "--help"], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--run-dir RUN_DIR" in out.stdout and "(default: runs/data)" in out.stdout
    assert "\n  strategy: {" in out.stdout and "\n  auto.candidates[].strategy: " in out.stdout


def test_every_registry_entry_resolves():
    """Each stage's config class and run function import by their dotted paths, and its Ray Job script
    and example config exist (the serve loader is exercised by test_shipped_configs)."""
    from pydantic import BaseModel

    from frugalray.stages import STAGES, stage_for_script

    for name, stage in STAGES.items():
        assert issubclass(stage.config_class(), BaseModel), name
        assert callable(stage.run_function()), name
        assert (REPO / stage.script).is_file() and stage_for_script(stage.script) is stage
        assert (REPO / stage.example_config).is_file(), stage.example_config
