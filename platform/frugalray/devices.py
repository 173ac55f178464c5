"""Which hardware a stage runs on: this process, the Ray cluster, and the node types its autoscaler may add.

Every stage decides its device here, the way PEFT asks `import_utils` what is installed:

    cluster = cluster_devices()                       # running nodes + autoscaler node types
    placement = resolve_placement("auto", count=2, cluster=cluster, stage="finetune")
    placement.ray_resources()                         # {"GPU": 1.0, "CPU": 1.0} per worker
    log.info(placement.describe("bf16"))              # finetune: 2 workers on GPU (autoscaler: gpu_worker), bf16

Facts come from three places, each named in what is logged:
  * this process (`local_devices()`): CUDA devices, their bf16 support and memory, native bf16 on the
    CPU (AVX512-BF16/AMX), the devices bitsandbytes runs 4-bit layers on;
  * the running Ray nodes (`ray.nodes()`);
  * the node types the autoscaler may still launch, as the head sees them: the GCS's autoscaler
    `ClusterConfig` when one was reported (what Ray Data reads; in Ray 2.60 no Python autoscaler
    writes it, so it is usually empty), else the autoscaling config file: `ray up` writes it to the
    head as `~/ray_bootstrap_config.yaml`; `$FRUGALRAY_AUTOSCALER_CONFIG` names another (the KubeRay
    manifests point it at jobs/kuberay/autoscaler_node_types.yaml). Where a job can see none of these,
    `device: cuda` (with `device_memory`, or `accelerator`) says what to ask for.

The decisions (`resolve_placement`, `resolve_dtype`) are pure functions of those facts. Checks that need
the hardware itself run where the work was placed (`require_cuda`, called on the worker or engine).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from frugalray.config import ConfigError

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
AUTOSCALER_CONFIG_ENV = "FRUGALRAY_AUTOSCALER_CONFIG"
RAY_UP_BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
ACCELERATOR_PREFIX = "accelerator_type:"

# Memory per GPU of common Ray accelerator types (ray.util.accelerators names), for planning a job on a
# node type the autoscaler has not launched yet. A type not listed needs `device_memory` in the config.
ACCELERATOR_MEMORY_GIB: dict[str, float] = {
    "T4": 16, "V100": 16, "A10G": 24, "L4": 24, "A10": 24, "L40S": 48, "A40": 48, "A6000": 48,
    "A100": 40, "A100-40G": 40, "A100-80G": 80, "H100": 80, "H200": 141, "B200": 180,
}
# Pre-Ampere GPUs have no bf16 tensor cores (torch emulates it): auto picks float32 there.
ACCELERATORS_WITHOUT_BF16 = frozenset({"T4", "V100", "P100", "P4", "K80", "M60"})


class DeviceUnavailable(RuntimeError):
    """Work placed for a device (a GPU bundle) found no such device where it landed."""


# -- this process ---------------------------------------------------------------------------------

def cpu_has_native_bf16(cpuinfo: str) -> bool:
    """AVX512-BF16 or AMX in /proc/cpuinfo's flags (pure). On an AVX2-only CPU torch's bf16 matmul
    measured 1.4 GFLOP/s against 35 GFLOP/s fp32: a QLoRA step ran about 27x slower, vLLM-CPU decoded
    4.3x slower."""
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


@dataclass(frozen=True)
class LocalDevices:
    """What this process can compute on."""

    cuda_count: int = 0
    cuda_name: str | None = None
    cuda_memory_bytes: int | None = None  # total memory of device 0
    cuda_bf16: bool = False
    cpu_bf16: bool = False
    four_bit: frozenset[str] = frozenset()  # devices with bitsandbytes 4-bit kernels: cpu, cuda, xpu
    node_id: str | None = None  # the Ray node, when probed inside a Ray worker

    @property
    def cuda(self) -> bool:
        return self.cuda_count > 0

    def fast_bf16(self, device: str) -> bool:
        return self.cuda_bf16 if device == "cuda" else self.cpu_bf16

    def describe(self) -> str:
        gpu = (f"{self.cuda_count} x {self.cuda_name} ({self.cuda_memory_bytes / 2**30:.0f} GiB"
               f"{', bf16' if self.cuda_bf16 else ''})" if self.cuda else "no CUDA")
        return (f"{gpu}; CPU bf16 {'native' if self.cpu_bf16 else 'emulated'}; "
                f"4-bit on {sorted(self.four_bit) or 'nothing'}")


def four_bit_devices() -> frozenset[str]:
    """Devices ('cpu', 'cuda', 'xpu') on which this bitsandbytes installation runs 4-bit layers.

    bitsandbytes >= 0.46 runs on the CPU (torch-op kernels, plus its native CPU library when
    present); a GPU needs its native library for that GPU (a mock stands in when it is missing).
    """
    try:
        import torch
        from bitsandbytes import cextension
    except Exception:  # noqa: BLE001 - not installed or broken: no 4-bit anywhere
        return frozenset()
    devices = {"cpu"}
    native = not isinstance(getattr(cextension, "lib", None), cextension.ErrorHandlerMockBNBNativeLibrary)
    backend = getattr(cextension, "BNB_BACKEND", "CPU")
    if native and backend in ("CUDA", "ROCm") and torch.cuda.is_available():
        devices.add("cuda")
    if native and backend == "XPU":
        devices.add("xpu")
    return frozenset(devices)


def probe_local_devices(with_four_bit: bool = True) -> LocalDevices:
    """Ask torch (and bitsandbytes) what this process has. Without torch: a CPU-only answer."""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu_bf16 = cpu_has_native_bf16(fh.read())
    except OSError:
        cpu_bf16 = False
    node_id = None
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    except Exception as err:  # noqa: BLE001 - no Ray, or not inside a worker: no node id to report
        log.debug("no Ray node id here: %s", err)
    try:
        import torch
    except ImportError:
        return LocalDevices(cpu_bf16=cpu_bf16, node_id=node_id)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    name = memory = None
    bf16 = False
    if count:
        props = torch.cuda.get_device_properties(0)
        name, memory, bf16 = props.name, int(props.total_memory), bool(torch.cuda.is_bf16_supported())
    return LocalDevices(count, name, memory, bf16, cpu_bf16,
                        four_bit_devices() if with_four_bit else frozenset(), node_id)


@functools.cache
def local_devices() -> LocalDevices:
    """This process's devices, probed once."""
    return probe_local_devices()


def cuda_available() -> bool:
    return local_devices().cuda


def has_fast_bf16() -> bool:
    """Native bf16 matmuls here: a CUDA device with bf16, or a CPU with AVX512-BF16 / AMX."""
    here = local_devices()
    return here.cuda_bf16 if here.cuda else here.cpu_bf16


def cuda_missing(stage: str, node: LocalDevices, placed_for: dict[str, float] | None = None) -> DeviceUnavailable:
    """The error for GPU work that landed on `node` (probed there) and found no CUDA device."""
    return DeviceUnavailable(
        f"CUDA not available on node {node.node_id or '?'}: {stage} was placed there for a GPU "
        f"({placed_for or {'GPU': 1}}) but torch on that node sees no CUDA device ({node.describe()}). "
        "Install a CUDA build of torch and the NVIDIA driver on that node type, or set device: cpu"
    )


def require_cuda(stage: str, placed_for: dict[str, float] | None = None) -> LocalDevices:
    """Called where GPU work landed (a Train worker, a scoring actor, an engine): refuse to run on a CPU.

    Ray places work by the resources a node advertises; a node that advertises `GPU` but whose torch
    sees no CUDA device (a driver problem, a CPU-only torch, a mislabelled node) would otherwise train
    or score on its CPU, slowly and silently.
    """
    here = probe_local_devices(with_four_bit=False)
    if not here.cuda:
        raise cuda_missing(f"{stage} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})",
                           here, placed_for)
    return here


# -- the cluster ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeType:
    """A kind of node: running ones (`running` of them) or one the autoscaler may launch (up to `max_nodes`)."""

    name: str
    resources: dict[str, float]
    max_nodes: int  # how many of this type can exist at once (running ones included)
    running: int = 0

    @property
    def gpus(self) -> float:
        return float(self.resources.get("GPU", 0))

    @property
    def accelerator(self) -> str | None:
        names = [k[len(ACCELERATOR_PREFIX):] for k in self.resources if k.startswith(ACCELERATOR_PREFIX)]
        return names[0] if names else None

    def fits(self, per_worker: dict[str, float]) -> int:
        """Workers of `per_worker` resources one node of this type holds."""
        counts = [math.floor(self.resources.get(k, 0) / v + 1e-9) for k, v in per_worker.items() if v > 0]
        return min(counts) if counts else 0


@dataclass(frozen=True)
class ClusterDevices:
    running: tuple[NodeType, ...] = ()  # one entry per alive node
    autoscaler: tuple[NodeType, ...] = ()  # node types the autoscaler may launch
    autoscaler_source: str | None = None  # where the node types were read, None: no autoscaler seen

    def capacity(self, per_worker: dict[str, float]) -> tuple[int, int, str | None]:
        """(workers the running nodes hold, more the autoscaler could add, the first node type it would use)."""
        now = sum(n.fits(per_worker) for n in self.running)
        later, first = 0, None
        for node_type in self.autoscaler:
            # the running nodes of this type are already counted above
            launchable = max(0, node_type.max_nodes - node_type.running)
            per_node = node_type.fits(per_worker)
            if launchable and per_node:
                later += launchable * per_node
                first = first or node_type.name
        return now, later, first

    def total(self, resource: str) -> float:
        return sum(n.resources.get(resource, 0) for n in self.running)

    def describe(self) -> str:
        types = ", ".join(f"{t.name} {t.resources} x<={t.max_nodes}" for t in self.autoscaler) or "none"
        return (f"{len(self.running)} running node(s) with {self.total('GPU'):g} GPU, {self.total('CPU'):g} CPU; "
                f"autoscaler node types ({self.autoscaler_source or 'no autoscaler seen'}): {types}")


def _resources(mapping: Any) -> dict[str, float]:
    return {str(k): float(v) for k, v in dict(mapping or {}).items()}


def node_types_from_cluster_config(config: Any) -> list[NodeType]:
    """The autoscaler's `ClusterConfig` protobuf (`ray._private.state.state.get_cluster_config()`)."""
    out = []
    for group in getattr(config, "node_group_configs", []) or []:
        max_count = int(group.max_count)
        if max_count == 0:
            continue
        out.append(NodeType(group.name, _resources(group.resources), max_nodes=10**6 if max_count < 0 else max_count))
    return out


def node_types_from_autoscaler_yaml(config: dict[str, Any]) -> list[NodeType]:
    """`available_node_types` of a cluster-launcher / autoscaler config (`cluster.yaml`), minus the head."""
    head = config.get("head_node_type")
    global_max = int(config.get("max_workers", 10**6))
    out = []
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        max_nodes = min(int(spec.get("max_workers", global_max)), global_max)
        if max_nodes > 0:
            out.append(NodeType(name, _resources(spec.get("resources")), max_nodes=max_nodes))
    return out


def autoscaler_config_path(explicit: str | None = None) -> Path | None:
    for candidate in (explicit, os.environ.get(AUTOSCALER_CONFIG_ENV), RAY_UP_BOOTSTRAP_CONFIG):
        if candidate and Path(candidate).expanduser().is_file():
            return Path(candidate).expanduser()
    return None


def read_autoscaler_node_types(config_path: str | None = None) -> tuple[list[NodeType], str | None]:
    """Node types the autoscaler may launch, and where they were read (needs Ray initialized for the GCS)."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception as err:  # noqa: BLE001 - no GCS access (Ray not up, a client): try the file
        log.debug("no autoscaler ClusterConfig from the GCS: %s", err)
        config = None
    if config is not None and config.node_group_configs:
        return node_types_from_cluster_config(config), "GCS ClusterConfig"
    path = autoscaler_config_path(config_path)
    if path is not None:
        import yaml

        return node_types_from_autoscaler_yaml(yaml.safe_load(path.read_text()) or {}), f"autoscaler config {path}"
    return [], None


def cluster_devices(config_path: str | None = None) -> ClusterDevices:
    """The running Ray nodes and the autoscaler's node types (Ray must be initialized)."""
    import ray

    types, source = read_autoscaler_node_types(config_path)
    alive = [n for n in ray.nodes() if n.get("Alive")]
    running = []
    for node in alive:
        resources = _resources({k: v for k, v in node["Resources"].items() if not k.startswith("node:")})
        running.append(NodeType(node["NodeID"][:12], resources, max_nodes=1, running=1))
    # A launched node counts against its type's max: match running nodes to types by their resources.
    counted = []
    for node_type in types:
        same = sum(1 for n in running if all(n.resources.get(k, 0) >= v for k, v in node_type.resources.items()
                                             if k in ("CPU", "GPU") or k.startswith(ACCELERATOR_PREFIX)))
        counted.append(NodeType(node_type.name, node_type.resources, node_type.max_nodes, same))
    return ClusterDevices(tuple(running), tuple(counted), source)


# -- decisions (pure) -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    """Where a stage's `count` workers go and what each asks Ray for."""

    stage: str
    device: Literal["cpu", "cuda"]
    count: int
    per_worker: dict[str, float]
    accelerator: str | None = None
    node_type: str | None = None  # the autoscaler node type that will host them (None: running nodes)
    needs_autoscaler: bool = False  # not all of them fit on the running nodes
    device_memory_bytes: int | None = None  # per GPU, when the accelerator type says
    why: str = ""

    @property
    def use_gpu(self) -> bool:
        return self.device == "cuda"

    def ray_resources(self) -> dict[str, float]:
        """Per-worker resources, `accelerator_type:X` included (Ray's way of naming a GPU model)."""
        res = dict(self.per_worker)
        if self.accelerator:
            res[f"{ACCELERATOR_PREFIX}{self.accelerator}"] = 0.001
        return res

    def remote_options(self) -> dict[str, Any]:
        """`num_cpus` / `num_gpus` / `accelerator_type` for `ray.remote(...)`, actor pools and map_batches."""
        opts: dict[str, Any] = {"num_cpus": self.per_worker.get("CPU", 0)}
        if self.use_gpu:
            opts["num_gpus"] = self.per_worker.get("GPU", 1)
        if self.accelerator:
            opts["accelerator_type"] = self.accelerator
        return opts

    def describe(self, dtype: str | None = None) -> str:
        unit = "worker" if self.count == 1 else "workers"
        where = (f"autoscaler: {self.node_type}" if self.needs_autoscaler and self.node_type
                 else "running nodes")
        kind = "GPU" if self.use_gpu else "CPU"
        accel = f" {self.accelerator}" if self.accelerator else ""
        return f"{self.stage}: {self.count} {unit} on {kind}{accel} ({where}){', ' + dtype if dtype else ''}"


def resolve_placement(
    requested: Device,
    *,
    count: int,
    cluster: ClusterDevices,
    stage: str,
    gpus_per_worker: float = 1.0,
    cpus_per_worker: float = 1.0,
    accelerator: str | None = None,
    field_prefix: str = "",
    device_field: str = "device",
    count_field: str = "num_workers",
    accelerator_field: str = "accelerator",
) -> Placement:
    """Decide CPU or GPU for `count` workers and what each asks Ray for, or raise ConfigError naming the field.

    auto: GPUs when the running nodes or the autoscaler's node types can hold one per worker, else CPU
    (with an `accelerator`: cuda). cuda: GPUs, or refused before launch when neither the cluster nor its autoscaler can ever provide them.
    """
    p = field_prefix
    asked = f"{device_field}: 'cuda'"
    if requested == "auto" and accelerator:
        requested = "cuda"  # a named GPU model is a request for a GPU: never a silent CPU fallback
        asked = f"{accelerator_field}: '{accelerator}'"
    gpu_worker = {"CPU": cpus_per_worker, "GPU": gpus_per_worker}
    if accelerator:
        gpu_worker[f"{ACCELERATOR_PREFIX}{accelerator}"] = 0.001
    gpu_now, gpu_later, gpu_type = cluster.capacity(gpu_worker)
    want_gpu = requested == "cuda" or (requested == "auto" and gpu_now + gpu_later >= count)
    if requested == "cpu" and accelerator:
        raise ConfigError([f"{p}{accelerator_field}: '{accelerator}' names a GPU but {p}{device_field} is 'cpu'; "
                           "drop accelerator or use device cuda/auto"])
    if want_gpu:
        if gpu_now + gpu_later == 0:
            raise ConfigError([
                f"{p}{asked} but neither the Ray cluster nor its autoscaler can provide a GPU"
                f"{' of type ' + accelerator if accelerator else ''} ({cluster.describe()}); "
                + ("drop accelerator or name one a node type has, " if asked.startswith(accelerator_field)
                   else "use device 'cpu' or 'auto', ")
                + f"or add such a GPU node type to the cluster config (set ${AUTOSCALER_CONFIG_ENV} when the job "
                "cannot see it)"
            ])
        if gpu_now + gpu_later < count:
            raise ConfigError([
                f"{p}{count_field}: {count} {stage} workers need {count} x {gpu_worker} but the cluster can hold "
                f"at most {gpu_now + gpu_later} ({gpu_now} on running nodes, {gpu_later} more the autoscaler "
                f"could add); lower {count_field} or raise the GPU node type's max_workers"
            ])
        needs_autoscaler = gpu_now < count
        memory = None
        if accelerator and accelerator in ACCELERATOR_MEMORY_GIB:
            memory = int(ACCELERATOR_MEMORY_GIB[accelerator] * 2**30)
        if memory is None and needs_autoscaler:
            target = next((t for t in cluster.autoscaler if t.name == gpu_type), None)
            accel = target.accelerator if target else None
            if accel in ACCELERATOR_MEMORY_GIB:
                memory = int(ACCELERATOR_MEMORY_GIB[accel] * 2**30)
        why = ("asked for cuda" if requested == "cuda" else
               f"auto: {gpu_now} GPU worker slot(s) running, {gpu_later} more from the autoscaler")
        return Placement(stage, "cuda", count, {"CPU": cpus_per_worker, "GPU": gpus_per_worker}, accelerator,
                         gpu_type if needs_autoscaler else None, needs_autoscaler, memory, why)
    cpu_worker = {"CPU": cpus_per_worker}
    cpu_now, cpu_later, cpu_type = cluster.capacity(cpu_worker)
    if cpu_now + cpu_later < count:
        raise ConfigError([
            f"{p}{count_field}: {count} {stage} workers need {count * cpus_per_worker:g} CPUs but the Ray cluster "
            f"can hold {cpu_now + cpu_later} such workers ({cluster.describe()}); lower {count_field} or add nodes"
        ])
    needs_autoscaler = cpu_now < count
    why = "asked for cpu" if requested == "cpu" else "auto: no GPU for every worker, running or launchable"
    return Placement(stage, "cpu", count, cpu_worker, None, cpu_type if needs_autoscaler else None,
                     needs_autoscaler, None, why)


def resolve_dtype(requested: str, device: str, *, fast_bf16: bool) -> str:
    """A compute dtype for `device`: auto -> bfloat16 where it is native, else float32; explicit values stay."""
    if requested != "auto":
        return requested
    return "bfloat16" if fast_bf16 else "float32"


def target_fast_bf16(placement: Placement, here: LocalDevices | None = None) -> bool:
    """Whether the placement's device has native bf16, decided for the target, not this driver.

    GPU: yes unless the accelerator type is pre-Ampere (T4, V100); CPU: this process's CPU when the
    work runs on running nodes like it (the head's CPU stands for the cluster's; set the dtype when
    worker CPUs differ).
    """
    if placement.use_gpu:
        return placement.accelerator not in ACCELERATORS_WITHOUT_BF16
    return (here or local_devices()).cpu_bf16
