"""Every shipped config loads and validates against the typed config of the stage that runs it.

jobs/configs/*.yaml (the stage is the one whose command the file's opening comment names, looked
up in the stage registry), serve/config.yaml, and the frugalray configs inside the KubeRay
manifests. Only the schema is checked (pydantic): the models and data files the configs name
need not exist here. An unknown key anywhere, the pipeline's stage sections included, fails.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from frugalray import pipeline
from frugalray.config import ConfigError, parse_config
from frugalray.stages import STAGES, Stage, config_from_args, job_parser, load_stage_config, stage_for_script

REPO = Path(__file__).resolve().parents[2]
JOB_CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
SERVE_CONFIG = REPO / "serve" / "config.yaml"
RAYJOB = REPO / "jobs" / "kuberay" / "rayjob.yaml"
RAYSERVICE = REPO / "serve" / "kuberay" / "rayservice.yaml"
UNKNOWN = "surely_not_a_key"


def header(path: Path) -> str:
    """The comment block a shipped YAML opens with (it names the command that runs the file)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def stage_of(path: Path) -> Stage:
    """The registered stage whose command the YAML's opening comment names."""
    text = header(path)
    for script in re.findall(r"jobs/\w+\.py", text):
        if (stage := stage_for_script(script)) is not None:
            return stage
    for name in re.findall(r"\bfrugalray (\w+)", text):
        if name in STAGES:
            return STAGES[name]
    raise AssertionError(f"{path.name}: its opening comment names no registered stage's command:\n{text}")


def validate(stage: Stage, path: Path, monkeypatch, tmp_path: Path, overrides: list[str] | None = None) -> Any:
    """Load `path` as the stage's config; a pipeline's stage sections are validated as the pipeline does."""
    cfg = load_stage_config(stage.name, path, overrides)
    if stage.nests_stages:
        # StagePlan types every section (score, select, ...) with the paths that connect them; the
        # model is not resolved here (it may not be prepared on this machine), so its check is skipped.
        monkeypatch.setattr(pipeline, "resolve_model", lambda *args, **kwargs: None)
        pipeline.StagePlan(cfg, tmp_path)
    return cfg


def with_unknown_key(path: Path, tmp_path: Path, section: str | None = None) -> Path:
    """A copy of a job YAML with UNKNOWN added at its top level, or inside `section`."""
    data = yaml.safe_load(path.read_text())
    if section is None:
        data[UNKNOWN] = 1
    else:
        data[section] = {**(data.get(section) or {}), UNKNOWN: 1}
    out = tmp_path / f"{section or 'top'}_{path.name}"
    out.write_text(yaml.safe_dump(data))
    return out


# -- jobs/configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_config_validates_against_its_stage(path, monkeypatch, tmp_path):
    stage = stage_of(path)
    cfg = validate(stage, path, monkeypatch, tmp_path)
    assert isinstance(cfg, stage.config_class())
    assert (REPO / stage.script).is_file()


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_config_with_an_unknown_key_fails(path, monkeypatch, tmp_path):
    stage = stage_of(path)
    with pytest.raises(ConfigError, match=f"{UNKNOWN}: unknown key"):
        validate(stage, with_unknown_key(path, tmp_path), monkeypatch, tmp_path)
    # The pipeline's stage sections reject an unknown key too, naming it as section.key.
    sections = [s for s in STAGES if stage.nests_stages and isinstance(yaml.safe_load(path.read_text()).get(s), dict)]
    for section in sections:
        with pytest.raises(ConfigError, match=rf"{section}\.{UNKNOWN}: unknown key"):
            validate(stage, with_unknown_key(path, tmp_path, section), monkeypatch, tmp_path)
    assert not stage.nests_stages or sections, f"{path.name}: a pipeline config with no stage section"


def test_every_stage_ships_its_example_config():
    shipped = {p.relative_to(REPO).as_posix() for p in [*JOB_CONFIGS, SERVE_CONFIG]}
    for stage in STAGES.values():
        assert stage.example_config in shipped, f"{stage.name}: {stage.example_config} is not shipped"
        assert (REPO / stage.script).is_file(), f"{stage.name}: no {stage.script}"


# -- serve/config.yaml -----------------------------------------------------------------------------


def test_serve_config_validates():
    serve = STAGES["serve"]
    cfg = load_stage_config("serve", SERVE_CONFIG)  # what `frugalray serve` / jobs/serve.py read
    assert isinstance(cfg, serve.config_class())
    for i, app in enumerate(yaml.safe_load(SERVE_CONFIG.read_text())["applications"]):
        parse_config(serve.config_class(), app.get("args") or {}, f"applications[{i}].args")


def test_serve_config_with_an_unknown_key_fails(tmp_path):
    data = yaml.safe_load(SERVE_CONFIG.read_text())
    data["applications"][0]["args"][UNKNOWN] = 1
    broken = tmp_path / "config.yaml"
    broken.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=f"{UNKNOWN}: unknown key"):
        load_stage_config("serve", broken)


# -- the KubeRay manifests -------------------------------------------------------------------------


def test_rayjob_entrypoint_parses_and_its_config_validates(monkeypatch, tmp_path):
    args = shlex.split(yaml.safe_load(RAYJOB.read_text())["spec"]["entrypoint"])
    assert args[0] == "python"
    stage = stage_for_script(args[1])
    assert stage is not None, f"{args[1]} is not a registered stage's script"
    # the entrypoint's flags are the job script's own (from the registry), --set overrides included
    parsed = job_parser(stage.name, "").parse_args(args[2:])
    monkeypatch.chdir(REPO)
    cfg = config_from_args(stage.name, parsed)
    assert isinstance(cfg, stage.config_class())
    validate(stage, REPO / parsed.config, monkeypatch, tmp_path, parsed.overrides)


def test_rayservice_args_validate_and_reject_an_unknown_key():
    serve_cls = STAGES["serve"].config_class()
    apps = yaml.safe_load(yaml.safe_load(RAYSERVICE.read_text())["spec"]["serveConfigV2"])["applications"]
    for i, app in enumerate(apps):
        parse_config(serve_cls, app["args"], f"serveConfigV2 applications[{i}].args")
        with pytest.raises(ConfigError, match=f"{UNKNOWN}: unknown key"):
            parse_config(serve_cls, {**app["args"], UNKNOWN: 1}, "serveConfigV2")
