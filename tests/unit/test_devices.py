"""Device resolution (frugalray.devices): which hardware each stage asks Ray for, decided without Ray."""

from __future__ import annotations

import pytest

from frugalray.config import ConfigError
from frugalray.devices import (
    ClusterDevices,
    LocalDevices,
    NodeType,
    cpu_has_native_bf16,
    cuda_missing,
    node_types_from_autoscaler_yaml,
    node_types_from_cluster_config,
    resolve_dtype,
    resolve_placement,
    target_fast_bf16,
)

CPU_HEAD = NodeType("head", {"CPU": 8.0}, max_nodes=1, running=1)
GPU_NODE = NodeType("n1", {"CPU": 4.0, "GPU": 1.0, "accelerator_type:A10G": 1.0}, max_nodes=1, running=1)
GPU_TYPE = NodeType("gpu_worker", {"CPU": 4.0, "GPU": 1.0, "accelerator_type:A10G": 1.0}, max_nodes=2)

SHIPPED_STYLE_YAML = {
    "max_workers": 4,
    "head_node_type": "head",
    "available_node_types": {
        "head": {"resources": {"CPU": 8}, "max_workers": 0},
        "gpu_worker": {"resources": {"CPU": 4, "GPU": 1, "accelerator_type:A10G": 1}, "min_workers": 0,
                       "max_workers": 2},
        "cpu_worker": {"resources": {"CPU": 16}, "min_workers": 0, "max_workers": 10},
    },
}


def test_cpu_flags_decide_native_bf16():
    assert cpu_has_native_bf16("processor: 0\nflags\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_has_native_bf16("flags : sse avx2 amx_bf16 amx_tile\n")
    assert not cpu_has_native_bf16("flags : sse avx2 avx512f avx512bw\n")


def test_autoscaler_yaml_lists_worker_types_capped_by_the_cluster_max():
    types = {t.name: t for t in node_types_from_autoscaler_yaml(SHIPPED_STYLE_YAML)}
    assert set(types) == {"gpu_worker", "cpu_worker"}  # the head is not something to launch
    assert types["gpu_worker"].gpus == 1 and types["gpu_worker"].accelerator == "A10G"
    assert types["gpu_worker"].max_nodes == 2 and types["cpu_worker"].max_nodes == 4


def test_gcs_cluster_config_is_read_from_ray_s_own_protobuf():
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add()
    group.name, group.min_count, group.max_count = "gpu-group", 0, 3
    group.resources["GPU"], group.resources["CPU"] = 1, 8
    none = config.node_group_configs.add()
    none.name, none.max_count = "disabled", 0
    unlimited = config.node_group_configs.add()
    unlimited.name, unlimited.max_count = "cpu-group", -1
    unlimited.resources["CPU"] = 4
    types = {t.name: t for t in node_types_from_cluster_config(config)}
    assert set(types) == {"gpu-group", "cpu-group"}
    assert types["gpu-group"].max_nodes == 3 and types["gpu-group"].gpus == 1
    assert types["cpu-group"].max_nodes > 1000


def test_auto_takes_a_gpu_the_autoscaler_can_still_launch():
    cluster = ClusterDevices(running=(CPU_HEAD,), autoscaler=(GPU_TYPE,), autoscaler_source="test")
    placement = resolve_placement("auto", count=2, cluster=cluster, stage="finetune")
    assert placement.use_gpu and placement.needs_autoscaler and placement.node_type == "gpu_worker"
    assert placement.ray_resources() == {"CPU": 1.0, "GPU": 1.0}
    assert placement.device_memory_bytes == 24 * 2**30  # A10G, from the node type's accelerator
    assert placement.describe("bfloat16") == "finetune: 2 workers on GPU (autoscaler: gpu_worker), bfloat16"


def test_auto_stays_on_cpu_without_any_gpu_and_says_so():
    cluster = ClusterDevices(running=(CPU_HEAD,))
    placement = resolve_placement("auto", count=2, cluster=cluster, stage="finetune")
    assert not placement.use_gpu and placement.ray_resources() == {"CPU": 1.0}
    assert placement.remote_options() == {"num_cpus": 1.0}
    assert placement.describe("float32") == "finetune: 2 workers on CPU (running nodes), float32"


def test_running_gpus_are_used_before_the_autoscaler():
    cluster = ClusterDevices(running=(CPU_HEAD, GPU_NODE), autoscaler=(GPU_TYPE,))
    one = resolve_placement("auto", count=1, cluster=cluster, stage="score", gpus_per_worker=0.5)
    assert one.use_gpu and not one.needs_autoscaler and one.node_type is None
    assert one.remote_options() == {"num_cpus": 1.0, "num_gpus": 0.5}
    three = resolve_placement("auto", count=3, cluster=cluster, stage="finetune")
    assert three.needs_autoscaler and three.node_type == "gpu_worker"


def test_auto_with_too_few_gpus_falls_back_to_cpu_but_cuda_is_refused_naming_the_count():
    cluster = ClusterDevices(running=(CPU_HEAD, GPU_NODE))
    assert not resolve_placement("auto", count=2, cluster=cluster, stage="finetune").use_gpu
    with pytest.raises(ConfigError) as err:
        resolve_placement("cuda", count=2, cluster=cluster, stage="finetune")
    assert err.value.problems[0].startswith("num_workers: 2 finetune workers need 2 x")


def test_cuda_without_any_gpu_anywhere_is_refused_before_launch_naming_the_field():
    cluster = ClusterDevices(running=(CPU_HEAD,), autoscaler=(NodeType("cpu", {"CPU": 16.0}, 4),),
                             autoscaler_source="autoscaler config /x.yaml")
    with pytest.raises(ConfigError) as err:
        resolve_placement("cuda", count=1, cluster=cluster, stage="score", field_prefix="score.")
    (problem,) = err.value.problems
    assert problem.startswith("score.device: 'cuda' but neither the Ray cluster nor its autoscaler can provide a GPU")
    assert "use device 'cpu'" in problem and "autoscaler config /x.yaml" in problem


def test_an_accelerator_type_must_exist_and_is_asked_for():
    cluster = ClusterDevices(running=(CPU_HEAD,), autoscaler=(GPU_TYPE,))
    placement = resolve_placement("cuda", count=1, cluster=cluster, stage="serve", accelerator="A10G")
    assert placement.remote_options() == {"num_cpus": 1.0, "num_gpus": 1.0, "accelerator_type": "A10G"}
    assert placement.ray_resources()["accelerator_type:A10G"] > 0
    with pytest.raises(ConfigError) as err:
        resolve_placement("cuda", count=1, cluster=cluster, stage="serve", accelerator="H100")
    assert "GPU of type H100" in err.value.problems[0]
    with pytest.raises(ConfigError) as err:
        resolve_placement("cpu", count=1, cluster=cluster, stage="serve", accelerator="A10G")
    assert err.value.problems[0].startswith("accelerator:")


def test_a_world_size_beyond_every_cpu_is_refused():
    cluster = ClusterDevices(running=(CPU_HEAD,))
    assert resolve_placement("cpu", count=8, cluster=cluster, stage="finetune").count == 8
    with pytest.raises(ConfigError) as err:
        resolve_placement("cpu", count=16, cluster=cluster, stage="finetune")
    assert err.value.problems[0].startswith("num_workers: 16 finetune workers need 16 CPUs")


def test_dtype_follows_the_target_device_and_explicit_values_are_kept():
    cluster = ClusterDevices(running=(CPU_HEAD,), autoscaler=(GPU_TYPE,))
    gpu = resolve_placement("cuda", count=1, cluster=cluster, stage="score")
    t4 = resolve_placement("cuda", count=1, cluster=ClusterDevices(
        autoscaler=(NodeType("t4", {"CPU": 4.0, "GPU": 1.0, "accelerator_type:T4": 1.0}, 1),)),
        stage="score", accelerator="T4")
    avx2 = LocalDevices(cpu_bf16=False)
    cpu = resolve_placement("cpu", count=1, cluster=cluster, stage="score")
    assert resolve_dtype("auto", "cuda", fast_bf16=target_fast_bf16(gpu, avx2)) == "bfloat16"
    assert resolve_dtype("auto", "cuda", fast_bf16=target_fast_bf16(t4, avx2)) == "float32"  # no bf16 on a T4
    assert resolve_dtype("auto", "cpu", fast_bf16=target_fast_bf16(cpu, avx2)) == "float32"
    assert resolve_dtype("auto", "cpu", fast_bf16=target_fast_bf16(cpu, LocalDevices(cpu_bf16=True))) == "bfloat16"
    assert resolve_dtype("bfloat16", "cpu", fast_bf16=False) == "bfloat16"
    assert resolve_dtype("float32", "cuda", fast_bf16=True) == "float32"


def test_missing_cuda_on_the_node_is_a_named_error():
    err = cuda_missing("finetune", LocalDevices(node_id="abc123"), {"GPU": 1.0})
    assert str(err).startswith("CUDA not available on node abc123: finetune was placed there for a GPU")
