"""Model preparation (idempotent, safe against a killed conversion) and name resolution."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from frugalray.config import ConfigError
from frugalray.models import DEFAULT_MODEL, is_prepared, prepare_model, prepared_dir, resolve_model


def test_prepare_is_idempotent(default_model_path):
    weights = Path(default_model_path) / "model.safetensors"
    before = weights.stat().st_mtime_ns
    start = time.time()
    assert prepare_model(DEFAULT_MODEL) == Path(default_model_path)
    assert time.time() - start < 2, "a prepared model must not be converted again"
    assert weights.stat().st_mtime_ns == before


def test_killed_conversion_leaves_no_half_cache(tmp_path, monkeypatch):
    home = tmp_path / "home"
    env = dict(os.environ, FRUGALRAY_HOME=str(home))
    proc = subprocess.Popen(
        [sys.executable, "-c", "from frugalray.models import prepare_model; prepare_model()"],
        env=env,
        start_new_session=True,
    )
    # Kill it while the conversion is under way (a temp dir exists), not before.
    deadline = time.time() + 60
    while time.time() < deadline and not list((home / "models").glob(".smollm2-135m-instruct.tmp-*")):
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    monkeypatch.setenv("FRUGALRAY_HOME", str(home))
    assert not is_prepared(DEFAULT_MODEL)
    assert not prepared_dir(DEFAULT_MODEL).exists(), "the target appears only when complete"
    path = prepare_model(DEFAULT_MODEL)
    assert is_prepared(DEFAULT_MODEL)
    assert (path / "model.safetensors").stat().st_size > 400e6
    assert (path / "tokenizer.json").is_file()


def test_local_dir_and_hf_id_pass_through(default_model_path, monkeypatch):
    assert resolve_model(default_model_path) == str(Path(default_model_path).resolve())
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("not a model!", "neither the embedded default"),
        ("", "empty"),
        ("HuggingFaceTB/does-not-exist-here", "offline"),
    ],
)
def test_bad_model_names_are_rejected_naming_the_field(name, expected, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        resolve_model(name, field="finetune.model")
    assert "finetune.model" in str(err.value)
    assert expected in str(err.value)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model(str(tmp_path), field="model")


def test_model_shape_from_config_json_matches_autoconfig(default_model_path, tmp_path):
    from frugalray.budget.flops import ModelShape
    from frugalray.models import load_config, model_shape

    assert model_shape(default_model_path) == ModelShape.from_hf_config(load_config(default_model_path))
    # A config.json that does not name every dimension directly goes through AutoConfig.
    raw = json.loads((Path(default_model_path) / "config.json").read_text())
    del raw["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert model_shape(str(tmp_path)).d_ff == load_config(str(tmp_path)).intermediate_size
