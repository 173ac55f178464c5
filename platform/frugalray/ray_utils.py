"""Connecting to Ray the same way from the CLI, jobs and tests."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# A 2-core laptop needs more *logical* CPUs than cores, or Serve's ingress replica and
# Ray Data's actor pools wait forever behind the engine's CPU bundle.
DEFAULT_LOCAL_CPUS = 8
# Passed to every worker so that nothing reaches for a model hub at run time on an offline box.
WORKER_ENV_KEYS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "FRUGALRAY_HOME")


def worker_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in WORKER_ENV_KEYS if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # glibc keeps freed activation buffers in its heap by default (peak RSS +45% over live tensors for
    # QLoRA at seq 512, bench/train_memory.py). Serving blocks of 16 MiB and up (the logits) from mmap
    # returns the biggest ones. A 128 KiB threshold kept RSS on the planner's prediction but made every
    # activation a fresh mmap: a LoRA step took 3.1 s instead of 1.7 s (16 MiB: 1.8 s). Speed wins by
    # default; bench/train_memory.py sets 128 KiB itself to validate the planner.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", os.environ.get("MALLOC_MMAP_THRESHOLD_", str(16 * 2**20)))
    return env


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join `address` (or $RAY_ADDRESS, as inside `ray job submit`), else start a local cluster."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": worker_env()}
    if address:
        # Workers of an existing cluster inherit the environment `ray start` had (and a
        # submitted job's own runtime_env); layering another one here would fight it.
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        cpus = num_cpus or max(DEFAULT_LOCAL_CPUS, os.cpu_count() or 1)
        log.info("starting a local Ray cluster with %d logical CPUs", cpus)
        # address="local": always a fresh cluster, never silently another user's one on this machine.
        ray.init(address="local", num_cpus=cpus, runtime_env=runtime_env, include_dashboard=False)


def wait_for_placement(placement, *, timeout_s: float, strategy: str = "PACK", probe: bool = True):
    """Reserve `placement`'s workers in a placement group (the autoscaler launches what is missing), saying
    so every few seconds, and refuse after `timeout_s` instead of hanging. With `probe`, run
    `devices.probe_local_devices` in the first bundle: the target node's devices, as it sees them.

    Returns that node's `LocalDevices` (None without `probe`). The group is removed before returning;
    the nodes it brought stay up for the autoscaler's idle timeout, long enough for the stage to start.
    """
    import time

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from frugalray.devices import probe_local_devices

    bundles = [placement.ray_resources() for _ in range(placement.count)]
    group = placement_group(bundles, strategy=strategy, name=f"frugalray-{placement.stage}-capacity")
    started = time.time()
    try:
        while True:
            ready, _ = ray.wait([group.ready()], timeout=min(10.0, timeout_s))
            waited = time.time() - started
            if ready:
                break
            if waited >= timeout_s:
                raise TimeoutError(
                    f"{placement.stage}: {placement.count} x {bundles[0]} not placed after {waited:.0f}s "
                    f"({'the autoscaler has not added ' + placement.node_type if placement.node_type else 'no node freed them'}); "
                    "check `ray status` for failed launches or quota, or raise capacity_timeout_s"
                )
            log.warning("%s: waiting for the autoscaler to add %d x %s%s (%.0fs of %.0fs)", placement.stage,
                        placement.count, bundles[0], f" ({placement.node_type})" if placement.node_type else "",
                        waited, timeout_s)
        if waited > 1:
            log.info("%s: resources placed after %.0fs", placement.stage, waited)
        if not probe:
            return None
        remote = ray.remote(probe_local_devices).options(
            **placement.remote_options(),
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0),
        )
        return ray.get(remote.remote(), timeout=max(60.0, timeout_s))
    finally:
        remove_placement_group(group)


def reserve_target(placement, *, timeout_s: float, strategy: str = "PACK"):
    """For GPU work, or work the running nodes cannot hold: wait until Ray can place it (the autoscaler
    adds nodes), probe the node it lands on, and refuse a node placed for a GPU whose torch sees no CUDA
    (`devices.cuda_missing`): otherwise the stage would run on that node's CPU, or fail deep inside
    NCCL setup. Returns that node's `LocalDevices`; None for CPU work the running nodes already hold."""
    from frugalray.devices import cuda_missing

    if not (placement.use_gpu or placement.needs_autoscaler):
        return None
    node = wait_for_placement(placement, timeout_s=timeout_s, strategy=strategy)
    if placement.use_gpu and not node.cuda:
        raise cuda_missing(placement.stage, node, placement.ray_resources())
    return node
