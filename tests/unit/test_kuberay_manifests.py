"""The KubeRay RayJob / RayService examples: structure as the ray.io/v1 CRDs define it, and their payloads
(the job's entrypoint and config, the Serve app's args) valid for frugalray itself."""

import copy
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from frugalray.config import parse_config
from frugalray.serve.config import ServeConfig
from frugalray.stages import load_stage_config, stage_for_script

REPO = Path(__file__).resolve().parents[2]
RAYJOB = REPO / "jobs" / "kuberay" / "rayjob.yaml"
RAYSERVICE = REPO / "serve" / "kuberay" / "rayservice.yaml"

_CONTAINER = {
    "type": "object", "required": ["name", "image", "resources"],
    "properties": {"resources": {"type": "object", "required": ["requests", "limits"]}},
}
_POD_TEMPLATE = {
    "type": "object", "required": ["spec"],
    "properties": {"spec": {"type": "object", "required": ["containers"],
                            "properties": {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER}}}},
}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_CLUSTER_SPEC = {
    "type": "object", "required": ["headGroupSpec", "workerGroupSpecs"],
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"], "additionalProperties": False,
                          "properties": {"rayStartParams": _STRING_MAP, "template": _POD_TEMPLATE,
                                         "serviceType": {"type": "string"}}},
        "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["groupName", "rayStartParams", "template", "maxReplicas"],
            "additionalProperties": False,
            "properties": {"groupName": {"type": "string"}, "replicas": {"type": "integer", "minimum": 0},
                           "minReplicas": {"type": "integer", "minimum": 0},
                           "maxReplicas": {"type": "integer", "minimum": 1},
                           "rayStartParams": _STRING_MAP, "template": _POD_TEMPLATE}}},
    },
}
_METADATA = {"type": "object", "required": ["name"]}
RAYJOB_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": _METADATA,
        "spec": {"type": "object", "required": ["entrypoint", "rayClusterSpec"], "additionalProperties": False,
                 "properties": {"entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"},
                                "shutdownAfterJobFinishes": {"type": "boolean"},
                                "ttlSecondsAfterFinished": {"type": "integer"},
                                "activeDeadlineSeconds": {"type": "integer"}, "backoffLimit": {"type": "integer"},
                                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
                                "rayClusterSpec": _CLUSTER_SPEC}},
    },
}
RAYSERVICE_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayService"}, "metadata": _METADATA,
        "spec": {"type": "object", "required": ["serveConfigV2", "rayClusterConfig"], "additionalProperties": False,
                 "properties": {"serveConfigV2": {"type": "string"}, "rayClusterConfig": _CLUSTER_SPEC,
                                "upgradeStrategy": {"type": "object"}}},
    },
}


def _load(path):
    return yaml.safe_load(path.read_text())


def test_rayjob_structure_and_entrypoint():
    manifest = _load(RAYJOB)
    jsonschema.validate(manifest, RAYJOB_SCHEMA)
    args = shlex.split(manifest["spec"]["entrypoint"])
    assert args[0] == "python" and (REPO / args[1]).is_file()
    stage = stage_for_script(args[1])
    assert stage is not None and stage.submit
    load_stage_config(stage.name, REPO / args[args.index("--config") + 1])  # the config the job will read is valid
    runtime_env = yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])
    assert set(runtime_env) <= {"working_dir", "env_vars", "pip", "py_modules"}
    head = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_rayservice_structure_and_serve_args():
    manifest = _load(RAYSERVICE)
    jsonschema.validate(manifest, RAYSERVICE_SCHEMA)
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    app = serve_config["applications"][0]
    module, _, attr = app["import_path"].partition(":")
    assert (REPO / (module.replace(".", "/") + ".py")).is_file() and attr == "build"
    cfg = parse_config(ServeConfig, app["args"], "serveConfigV2 applications[0].args")
    assert cfg.http_port == serve_config["http_options"]["port"]
    # Secrets come from a Kubernetes Secret, never inline in the manifest.
    text = RAYSERVICE.read_text()
    assert "secretKeyRef" in text and "sk-" not in text


@pytest.mark.parametrize("path,schema", [(RAYJOB, RAYJOB_SCHEMA), (RAYSERVICE, RAYSERVICE_SCHEMA)])
def test_schema_catches_a_misspelt_field(path, schema):
    broken = copy.deepcopy(_load(path))
    spec = broken["spec"]
    cluster_key = "rayClusterSpec" if "rayClusterSpec" in spec else "rayClusterConfig"
    spec[cluster_key]["workerGroupSpecs"][0]["maxReplica"] = spec[cluster_key]["workerGroupSpecs"][0].pop("maxReplicas")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_serve_args_typo_is_caught():
    app = yaml.safe_load(_load(RAYSERVICE)["spec"]["serveConfigV2"])["applications"][0]
    args = dict(app["args"], max_sample_ceiling=4)
    from frugalray.config import ConfigError

    with pytest.raises(ConfigError, match="max_sample_ceiling"):
        parse_config(ServeConfig, args, "serveConfigV2")
