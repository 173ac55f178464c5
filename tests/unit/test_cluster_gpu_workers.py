"""cluster.yaml and the KubeRay manifests agree with frugalray's device resolution: a CPU head, GPU worker
groups that start at zero, node types a job can read before any GPU node exists, and shipped configs that
leave every stage at `device: auto` so the autoscaler is asked for GPUs (no Ray needed)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from frugalray import pipeline
from frugalray.config import ConfigError
from frugalray.devices import (
    AUTOSCALER_CONFIG_ENV,
    ClusterDevices,
    NodeType,
    node_types_from_autoscaler_yaml,
    read_autoscaler_node_types,
    resolve_placement,
)
from frugalray.stages import load_stage_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
RAYJOB = REPO / "jobs" / "kuberay" / "rayjob.yaml"
RAYSERVICE = REPO / "serve" / "kuberay" / "rayservice.yaml"
KUBERAY_NODE_TYPES = REPO / "jobs" / "kuberay" / "autoscaler_node_types.yaml"
IMAGE_ROOT = "/app"  # where the manifests' image holds this repository


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _cluster_yaml_as_ray_up_writes_it() -> dict:
    """~/ray_bootstrap_config.yaml is cluster.yaml after Ray's own defaults are filled in."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(_load(CLUSTER_YAML))


def _head_only(cpus: float = 8) -> ClusterDevices:
    return ClusterDevices(running=(NodeType("head", {"CPU": cpus}, max_nodes=1, running=1),))


# -- cluster.yaml ----------------------------------------------------------------------------------

def test_cluster_yaml_head_is_cpu_and_gpu_workers_start_at_zero():
    config = _cluster_yaml_as_ray_up_writes_it()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu, "no GPU worker type"
    for name, t in gpu.items():
        assert t["min_workers"] == 0, f"{name}: GPU workers must be added on demand"
        assert t["resources"]["GPU"] == 1 and t["resources"]["CPU"] >= 1


def test_cluster_yaml_auto_asks_the_autoscaler_for_the_gpu_worker():
    """A job on the fresh cluster (head only) with device auto gets GPUs from gpu_worker, 24 GiB each (A10G)."""
    config = _cluster_yaml_as_ray_up_writes_it()
    types = node_types_from_autoscaler_yaml(config)
    assert [t.name for t in types] == ["gpu_worker"] and types[0].accelerator == "A10G"
    cluster = ClusterDevices(running=_head_only().running, autoscaler=tuple(types), autoscaler_source="test")
    placement = resolve_placement("auto", count=2, cluster=cluster, stage="finetune")
    assert placement.device == "cuda" and placement.needs_autoscaler and placement.node_type == "gpu_worker"
    assert placement.ray_resources() == {"CPU": 1.0, "GPU": 1.0}
    assert placement.device_memory_bytes == 24 * 2**30
    named = resolve_placement("auto", count=1, cluster=cluster, stage="score", accelerator="A10G")
    assert named.device == "cuda" and named.remote_options()["accelerator_type"] == "A10G"
    with pytest.raises(ConfigError, match="num_workers"):
        resolve_placement("cuda", count=5, cluster=cluster, stage="finetune")  # max_workers: 4


def test_without_the_gpu_worker_type_auto_stays_on_cpu_and_cuda_is_refused():
    """What the node types are for: without them the same fresh cluster looks GPU-less."""
    config = copy.deepcopy(_cluster_yaml_as_ray_up_writes_it())
    del config["available_node_types"]["gpu_worker"]
    cluster = ClusterDevices(running=_head_only().running, autoscaler=tuple(node_types_from_autoscaler_yaml(config)))
    assert resolve_placement("auto", count=1, cluster=cluster, stage="finetune").device == "cpu"
    with pytest.raises(ConfigError, match="device: 'cuda'"):
        resolve_placement("cuda", count=1, cluster=cluster, stage="finetune")


def test_cluster_yaml_head_start_names_the_config_jobs_read():
    config = _load(CLUSTER_YAML)
    assert any("--autoscaling-config=~/ray_bootstrap_config.yaml" in c for c in config["head_start_ray_commands"])


# -- KubeRay ---------------------------------------------------------------------------------------

def _cluster_spec(manifest: dict) -> dict:
    spec = manifest["spec"]
    return spec.get("rayClusterSpec") or spec["rayClusterConfig"]


def _quantity(text: str) -> float:
    return float(text[:-1]) / 1000 if str(text).endswith("m") else float(text)


def _group_resources(group: dict) -> dict[str, float]:
    """A worker group's Ray resources as KubeRay's autoscaler computes them: rayStartParams first,
    else the container's limits."""
    params = group.get("rayStartParams") or {}
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpus = _quantity(params.get("num-cpus", limits.get("cpu", "0")))
    gpus = _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", "0")))
    out = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    if "resources" in params:
        out.update({k: float(v) for k, v in yaml.safe_load(yaml.safe_load(params["resources"])).items()})
    return out


@pytest.mark.parametrize("path", [RAYJOB, RAYSERVICE], ids=lambda p: p.name)
def test_kuberay_gpu_group_autoscales_from_zero_on_a_cpu_head(path):
    spec = _cluster_spec(_load(path))
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpu_groups = [g for g in spec["workerGroupSpecs"] if _group_resources(g).get("GPU", 0) >= 1]
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0
        assert group["rayStartParams"]["num-gpus"] == limits["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("path", [RAYJOB, RAYSERVICE], ids=lambda p: p.name)
def test_kuberay_node_types_file_matches_the_worker_groups(path):
    """What $FRUGALRAY_AUTOSCALER_CONFIG tells the job is what the manifest's autoscaler can launch."""
    spec = _cluster_spec(_load(path))
    declared = {t.name: (t.resources, t.max_nodes) for t in node_types_from_autoscaler_yaml(_load(KUBERAY_NODE_TYPES))}
    groups = {g["groupName"]: (_group_resources(g), g["maxReplicas"]) for g in spec["workerGroupSpecs"]}
    assert declared == groups


def _runtime_env_vars(path: Path) -> list[dict[str, str]]:
    manifest = _load(path)
    if manifest["kind"] == "RayJob":
        return [yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])["env_vars"]]
    apps = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    return [app["runtime_env"]["env_vars"] for app in apps]


@pytest.mark.parametrize("path", [RAYJOB, RAYSERVICE], ids=lambda p: p.name)
def test_kuberay_jobs_are_told_where_the_node_types_are(path, monkeypatch):
    for env_vars in _runtime_env_vars(path):
        in_image = env_vars[AUTOSCALER_CONFIG_ENV]
        assert in_image.startswith(IMAGE_ROOT + "/")
        local = REPO / in_image[len(IMAGE_ROOT) + 1:]
        assert local == KUBERAY_NODE_TYPES
        # read as a job does when the GCS has no ClusterConfig (Ray not even initialized here)
        monkeypatch.setenv(AUTOSCALER_CONFIG_ENV, str(local))
        types, source = read_autoscaler_node_types()
        assert source and str(local) in source
        cluster = ClusterDevices(running=(NodeType("head", {"CPU": 0.0}, 1, 1),), autoscaler=tuple(types))
        assert resolve_placement("auto", count=1, cluster=cluster, stage="finetune").node_type == "gpu-workers"


# -- the configs they run --------------------------------------------------------------------------

def _pipeline_plan(path: Path, monkeypatch, tmp_path: Path):
    monkeypatch.setattr(pipeline, "resolve_model", lambda *args, **kwargs: None)
    return pipeline.StagePlan(load_stage_config("pipeline", path), tmp_path)


def test_pipeline_stages_run_by_the_cluster_use_device_auto(monkeypatch, tmp_path):
    """cluster.yaml's and the RayJob's pipeline: every stage that can use a GPU resolves device auto."""
    entry = _load(RAYJOB)["spec"]["entrypoint"].split()
    config = REPO / entry[entry.index("--config") + 1]
    assert config == REPO / "jobs" / "configs" / "pipeline.yaml"
    assert "jobs/configs/pipeline.yaml" in CLUSTER_YAML.read_text()
    plan = _pipeline_plan(config, monkeypatch, tmp_path)
    assert plan.finetune.device == "auto"
    assert plan.sweep.finetune.device == "auto"
    assert plan.score.device == "auto"
    assert plan.serve.device == "auto"


def test_serve_configs_use_device_auto():
    assert load_stage_config("serve", REPO / "serve" / "config.yaml").device == "auto"
    for app in yaml.safe_load(_load(RAYSERVICE)["spec"]["serveConfigV2"])["applications"]:
        assert app["args"]["device"] == "auto"


def test_node_types_file_is_not_read_without_the_env(monkeypatch):
    """Locally (no ray up, no env) nothing is claimed: the file is opt-in through the manifests."""
    monkeypatch.delenv(AUTOSCALER_CONFIG_ENV, raising=False)
    monkeypatch.setenv("HOME", os.devnull)
    types, source = read_autoscaler_node_types()
    assert (types, source) == ([], None)
