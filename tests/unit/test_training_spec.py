"""One typed training spec: FinetuneConfig is a TrainingSpec (its YAML stays flat), the curation
proxies nest one under `proxy` with their own defaults, and the flat keys they used to take are
refused with the new place named (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from frugalray.config import ConfigError, load_config, parse_config
from frugalray.data.auto_select import AutoSettings
from frugalray.data.dynamics import DynamicsSettings
from frugalray.train.finetune import FinetuneConfig
from frugalray.train.spec import TrainingSpec

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


def test_finetune_config_is_a_training_spec_with_flat_keys():
    cfg = load_config(FinetuneConfig, CONFIGS / "finetune.yaml")
    assert isinstance(cfg, TrainingSpec)
    assert set(TrainingSpec.model_fields) < set(FinetuneConfig.model_fields)
    assert cfg.training_spec().model_dump() == {k: v for k, v in cfg.model_dump().items() if k in TrainingSpec.model_fields}


def test_with_values_validates():
    spec = TrainingSpec()
    assert spec.with_values(learning_rate=1e-3).learning_rate == 1e-3
    with pytest.raises(ValueError):
        spec.with_values(learning_rate=-1.0)


def test_the_dynamics_proxy_keeps_its_former_defaults():
    # What proxy_session_config built by hand before the proxy became a TrainingSpec (seq_len and
    # max_steps come from the score's max_length and max(checkpoints)); unlisted keys were the loop's defaults.
    settings = DynamicsSettings()
    spec = settings.proxy.with_values(max_steps=max(settings.checkpoints), seq_len=512)
    former = {"method": "lora", "seed": 0, "batch_size": 4, "seq_len": 512, "lora_rank": 4, "lora_alpha": 8.0,
              "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "learning_rate": 1e-3,
              "compute_dtype": "float32", "max_steps": 4, "lr_scheduler": "constant", "warmup_steps": 0,
              "optimizer": "adamw", "weight_decay": 0.0, "max_grad_norm": 1.0, "grad_accum_steps": 1,
              "gradient_checkpointing": False, "data_order": "shuffle", "length_bucketing": False}
    assert {k: getattr(spec, k) for k in former} == former
    # It crosses to the proxy's Ray task as a dict and is re-validated there unchanged.
    assert DynamicsSettings.model_validate(settings.model_dump()) == settings


def test_the_auto_proxy_keeps_its_former_defaults():
    spec = AutoSettings().proxy
    former = {"method": "lora", "lora_rank": 8, "lora_alpha": 16.0, "target_modules": "all-linear",
              "learning_rate": 1e-3, "max_steps": 4, "batch_size": 4, "seq_len": 128, "seed": 0,
              "compute_dtype": "auto", "lora_dropout": 0.0, "lr_scheduler": "constant", "max_grad_norm": 1.0}
    assert {k: getattr(spec, k) for k in former} == former
    assert parse_config(AutoSettings, {"proxy": {"learning_rate": 5e-3}}).proxy.lora_rank == 8  # the proxy's defaults


@pytest.mark.parametrize(("cls", "data", "says"), [
    (AutoSettings, {"learning_rate": 1e-3}, "auto.learning_rate moved to auto.proxy.learning_rate"),
    (AutoSettings, {"proxy_steps": 2}, "auto.proxy_steps moved to auto.proxy.max_steps"),
    (DynamicsSettings, {"lora_rank": 2, "seed": 1},
     ("dynamics.lora_rank moved to dynamics.proxy.lora_rank; dynamics.seed moved to dynamics.proxy.seed")),
    (DynamicsSettings, {"proxy": {"max_steps": 8}}, "dynamics.proxy.max_steps: set by dynamics.checkpoints"),
    (DynamicsSettings, {"proxy": {"seq_len": 64}}, "dynamics.proxy.seq_len: set by the score's max_length"),
    (AutoSettings, {"proxy": {"method": "full"}}, "proxy.method"),
])
def test_flat_proxy_keys_are_refused_naming_the_new_place(cls, data, says):
    with pytest.raises(ConfigError) as err:
        parse_config(cls, data)
    assert says in str(err.value)


def test_the_shipped_auto_config_nests_its_proxy():
    from frugalray.data.select import SelectConfig

    cfg = load_config(SelectConfig, CONFIGS / "select_auto.yaml")
    assert (cfg.auto.proxy.max_steps, cfg.auto.proxy.batch_size) == (4, 4)
