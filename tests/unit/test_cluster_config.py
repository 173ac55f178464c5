"""cluster.yaml is a real Ray cluster-launcher config: checked with Ray's own schema and defaults."""

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


def _load():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_ray_validation():
    config = prepare_config(_load())
    validate_config(config)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types)
    assert any("frugalray" in c and "[gpu]" in c for c in config["setup_commands"])
    # The dashboard / job server must not be bound to a public interface.
    assert all("--dashboard-host=0.0.0.0" not in c for c in config["head_start_ray_commands"])


def test_ray_validation_would_catch_a_broken_config():
    broken = copy.deepcopy(_load())
    broken["available_node_types"]["gpu_worker"]["node_confg"] = broken["available_node_types"]["gpu_worker"].pop(
        "node_config"
    )
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(broken))
