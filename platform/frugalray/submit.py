"""`frugalray submit STAGE` and `frugalray jobs ...`: run a stage as a Ray Job through the Jobs SDK.

The stage's config is validated here first (a typo never costs a cluster round trip), then the
job's entrypoint is the same readable script a user would pass to `ray job submit`
(`python jobs/<stage>.py --config ...`), shipped with the repository as the runtime_env's
working_dir (on a loopback cluster, which shares this checkout, it runs in place instead). Logs stream back until the job ends; the exit status is the job's.

Secrets (the Serve API key, tokens) travel only as environment variable *names* the cluster
already has, or as runtime_env env_vars whose values are never printed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from frugalray.config import ConfigError
from frugalray.stages import STAGES, load_stage_config, submittable

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Never uploaded: environments, caches, VCS data and run outputs (which can be gigabytes).
UPLOAD_EXCLUDES = [".venv", ".git", "**/__pycache__", ".pytest_cache", ".hypothesis", "runs", "*.egg-info",
                   "bench/results/*.png"]

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
AGENT_WAIT_S = 180.0  # how long a submission waits for a just-started head's job agent
AGENT_RETRY_S = 5.0


def job_server_address(address: str | None) -> str:
    """Where the Jobs SDK should connect: explicit, else $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS, else loopback.

    An http(s) URL is the job server itself; a bare host:port is a cluster (GCS) address, which Ray's
    JobSubmissionClient resolves to that cluster's dashboard.
    """
    for candidate in (address, os.environ.get("RAY_API_SERVER_ADDRESS"), os.environ.get("RAY_ADDRESS")):
        if candidate:
            return candidate
    return DEFAULT_ADDRESS


def is_loopback(address: str) -> bool:
    host = urlparse(address if "://" in address else f"ray://{address}").hostname or ""
    return host in {"127.0.0.1", "localhost", "::1"}


def extra_requirements(extra: str, pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    """The pip requirements of one of frugalray's extras, read from pyproject.toml (one source of truth)."""
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    if extra not in extras:
        raise ConfigError([f"--extras: unknown extra {extra!r}; choose one of {sorted(extras)}"])
    return list(extras[extra])


def _looks_secret(name: str) -> bool:
    """HF_TOKEN, OPENAI_API_KEY, DB_PASSWORD, APIKEY: a word of the name ends with a marker.

    Matched per word, not anywhere in the name, so TOKENIZERS_PARALLELISM stays readable.
    """
    return any(word.endswith((m, m + "S")) for word in name.upper().split("_") for m in SECRET_MARKERS)


def redact(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """A copy safe to log: env var values whose names look secret are replaced."""
    shown = dict(runtime_env)
    env = shown.get("env_vars")
    if env:
        shown["env_vars"] = {k: ("***" if _looks_secret(k) else v) for k, v in env.items()}
    return shown


@dataclass
class SubmitPlan:
    stage: str
    entrypoint: str
    runtime_env: dict[str, Any]
    address: str


def plan_submission(
    stage: str,
    config: str,
    overrides: list[str] | None = None,
    run_dir: str | None = None,
    address: str | None = None,
    working_dir: str | Path = REPO_ROOT,
    extras: str | None = None,
    env: dict[str, str] | None = None,
) -> SubmitPlan:
    """Validate the stage's config locally and build the entrypoint and runtime_env. Pure, no network."""
    import shlex

    if stage not in submittable():
        raise ConfigError([f"STAGE: unknown stage {stage!r}; choose one of {sorted(submittable())}"])
    script = STAGES[stage].script  # the documented Ray Job entrypoint
    working_dir = Path(working_dir).resolve()
    config_path = Path(config).resolve()
    if not config_path.is_file():
        raise ConfigError([(f"--config: {config} does not exist; pass a YAML file such as "
                            f"{STAGES[stage].example_config}")])
    try:
        relative_config = config_path.relative_to(working_dir)
    except ValueError:
        raise ConfigError([f"--config: {config} is outside the uploaded working dir {working_dir}; "
                           "move it under that directory (e.g. jobs/configs/) so the job can read it"]) from None
    # The same validation the job runs, so a bad field fails here, naming the field.
    load_stage_config(stage, config_path, overrides or [])

    server = job_server_address(address)
    args = ["python", script, "--config", str(relative_config)]
    if run_dir is not None:
        # On this machine's own cluster an absolute run dir keeps outputs where the user looks for them;
        # on a remote cluster a relative one lands in the job's working dir copy (use shared storage instead).
        run_path = Path(run_dir)
        args += ["--run-dir", str(run_path.resolve()) if is_loopback(server) else run_dir]
    for item in overrides or []:
        args += ["--set", item]
    env_vars = {"PYTHONPATH": "platform", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    if is_loopback(server):
        # This machine's own cluster shares the checkout: run in place rather than through a GCS
        # package. (Ray 2.60 lost an uploaded working_dir package mid-job on long-lived local test
        # clusters: "Failed to download runtime_env file package gcs://...".)
        entrypoint = f"cd {shlex.quote(str(working_dir))} && {shlex.join(args)}"
        runtime_env: dict[str, Any] = {"env_vars": env_vars}
    else:
        entrypoint = shlex.join(args)
        # The uploaded source wins over whatever frugalray version the cluster has installed.
        runtime_env = {"working_dir": str(working_dir), "excludes": UPLOAD_EXCLUDES, "env_vars": env_vars}
    if extras:
        runtime_env["pip"] = extra_requirements(extras)
    return SubmitPlan(stage, entrypoint, runtime_env, server)


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(plan: SubmitPlan, wait: bool = True, out=sys.stdout) -> tuple[str, str]:
    """Submit; if `wait`, stream logs until the job ends. Returns (submission_id, final or current status)."""
    # The uploaded working dir is pinned in the GCS only for this long before the job takes its own
    # reference (Ray's default 600 s); a job queued behind others on a busy cluster can outlive it and
    # then lose its package mid-run (ray-project/ray#23423). An hour covers a long queue.
    os.environ.setdefault("RAY_RUNTIME_ENV_TEMPORARY_REFERENCE_EXPIRATION_S", "3600")
    client = _client(plan.address)
    submission_id = _submit_when_agent_ready(client, plan)
    log.info("submitted %s as %s to %s: %s (runtime_env %s)", plan.stage, submission_id, plan.address,
             plan.entrypoint, redact(plan.runtime_env))
    if not wait:
        return submission_id, str(client.get_job_status(submission_id))
    return submission_id, follow(client, submission_id, out)


def agent_not_ready(err: Exception) -> bool:
    """The Jobs API's answer while the head's job agent has not registered yet (a just-started cluster)."""
    return "No available agent to submit job" in str(err)


def _submit_when_agent_ready(client, plan: SubmitPlan, agent_wait_s: float = AGENT_WAIT_S) -> str:
    # A head that has just come up (`ray up`, `ray start --head`, a KubeRay pod) answers 500 "No available
    # agent" until its dashboard agent registers, tens of seconds on a loaded node; Ray says to try again.
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return client.submit_job(entrypoint=plan.entrypoint, runtime_env=plan.runtime_env,
                                     metadata={"frugalray_stage": plan.stage})
        except RuntimeError as err:
            left = deadline - time.monotonic()
            if not agent_not_ready(err) or left <= 0:
                if agent_not_ready(err):
                    raise RuntimeError(
                        f"{plan.address}: the cluster's job agent did not come up in {agent_wait_s:.0f}s; "
                        "check `ray status` and the head's dashboard_agent.log") from err
                raise
            log.warning("%s: the head's job agent is not up yet; retrying for %.0fs more", plan.address, left)
            time.sleep(min(AGENT_RETRY_S, max(left, 0.1)))


def follow(client, submission_id: str, out=sys.stdout) -> str:
    """Stream a job's logs until it ends; return its final status name."""

    async def tail():
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as err:  # the log stream can drop (e.g. a proxy timeout); the status still tells
        log.warning("log stream for %s ended early (%s); polling its status", submission_id, err)
    while True:
        status = _status_name(client.get_job_status(submission_id))
        if status in TERMINAL:
            return status
        time.sleep(1.0)


def _status_name(status) -> str:
    return getattr(status, "value", str(status))


def exit_code(status: str) -> int:
    return 0 if status == "SUCCEEDED" else 1


def job_status(address: str | None, submission_id: str) -> dict[str, Any]:
    info = _client(job_server_address(address)).get_job_info(submission_id)
    return {"submission_id": submission_id, "status": _status_name(info.status), "message": info.message,
            "entrypoint": info.entrypoint, "start_time": info.start_time, "end_time": info.end_time}


def job_logs(address: str | None, submission_id: str, follow_logs: bool = False, out=sys.stdout) -> str:
    client = _client(job_server_address(address))
    if follow_logs:
        return follow(client, submission_id, out)
    out.write(client.get_job_logs(submission_id))
    return _status_name(client.get_job_status(submission_id))


def stop_job(address: str | None, submission_id: str, wait_s: float = 60.0) -> str:
    client = _client(job_server_address(address))
    client.stop_job(submission_id)
    deadline = time.time() + wait_s
    while time.time() < deadline:
        status = _status_name(client.get_job_status(submission_id))
        if status in TERMINAL:
            return status
        time.sleep(0.5)
    return _status_name(client.get_job_status(submission_id))


def list_jobs(address: str | None) -> list[dict[str, Any]]:
    jobs = _client(job_server_address(address)).list_jobs()
    return [{"submission_id": j.submission_id, "status": _status_name(j.status),
             "stage": (j.metadata or {}).get("frugalray_stage", ""), "entrypoint": j.entrypoint} for j in jobs]
