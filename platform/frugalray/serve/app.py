"""Build, deploy and stop the frugalray Serve application.

    cfg = ServeConfig(adapters={"adder": "runs/x/adapter"})
    base_url = deploy(cfg)            # needs Ray initialized (frugalray.ray_utils.init_ray)
    openai.OpenAI(base_url=base_url, api_key="unused").chat.completions.create(...)
    shutdown_app(cfg.app_name)

The application is two deployments: Ray Serve LLM's `LLMServer` running vLLM (base model
plus the adapters as static LoRA modules; frugalray.serve.engine checks its platform, and that each
adapter is in effect, whenever a replica starts) and the
frugalray ingress in front of it.

The engine's device comes from `frugalray.devices.resolve_placement` (`device`, `accelerator`,
`tensor_parallel_size`), decided against the running nodes and the autoscaler's node types:

    CPU engine:  bundles [{CPU: engine_cpus}], enforce_eager, VLLM_CPU_KVCACHE_SPACE (+ _NUM_OF_RESERVED_CPU)
    GPU engine:  tensor_parallel_size x {GPU: 1, CPU: 1} (+ accelerator_type), tensor_parallel_size,
                 CUDA graphs (no enforce_eager), no VLLM_CPU_* variables

and the ingress applies the vLLM-CPU workarounds only to a CPU engine (frugalray.serve.gate).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from frugalray.config import ConfigError
from frugalray.devices import ClusterDevices, Placement, resolve_placement
from frugalray.models import engine_dtype_default
from frugalray.ray_utils import init_ray, wait_for_placement, worker_env
from frugalray.serve.adapter_probe import ADAPTER_PROBE_KEY
from frugalray.serve.config import (
    DEFAULT_TENANT,
    ResolvedServe,
    ServeConfig,
    api_key_digest,
    budgeted_tenants,
    default_ledger_path,
    preflight,
    resolve_api_key,
)
from frugalray.serve.effort import effort_presets
from frugalray.serve.tenants import tenant_key_digests

log = logging.getLogger(__name__)


def base_url_for(cfg: ServeConfig) -> str:
    """The URL an OpenAI client takes as `base_url` (ends in /v1)."""
    prefix = cfg.route_prefix.rstrip("/")
    return f"http://{cfg.http_host}:{cfg.http_port}{prefix}/v1"


def serve_placement(cfg: ServeConfig, cluster: ClusterDevices | None = None) -> Placement:
    """Where the engine goes, from the config and what the cluster (and its autoscaler) can provide.

    Without a cluster to ask (Ray not initialized): `auto` is a CPU engine, as before devices were
    resolved, and `cuda` is taken at its word. `tensor_parallel_size` GPUs must fit one node.
    """
    tp = cfg.tensor_parallel_size
    if cluster is None:
        if cfg.device == "cuda":
            return Placement("serve", "cuda", 1, {"CPU": cfg.engine_cpus, "GPU": float(tp)}, cfg.accelerator,
                             why="asked for cuda (no Ray cluster to check)")
        if cfg.accelerator is not None or tp > 1:
            key = "accelerator" if cfg.accelerator is not None else "tensor_parallel_size"
            raise ConfigError([(f"{key}: needs a GPU engine, but device is 'auto' and there is no Ray cluster to "
                                "find one in; set device: cuda, or initialize Ray first")])
        return Placement("serve", "cpu", 1, {"CPU": cfg.engine_cpus},
                         why=f"{cfg.device} without a Ray cluster to ask: CPU")
    placement = resolve_placement(
        cfg.device, count=1, cluster=cluster, stage="serve", gpus_per_worker=float(tp),
        cpus_per_worker=cfg.engine_cpus, accelerator=cfg.accelerator, count_field="engine_cpus",
    )
    if not placement.use_gpu and tp > 1:
        # auto fell back to the CPU although tensor parallelism is GPU-only: never silently. (An
        # accelerator under auto is already a GPU request in resolve_placement.)
        raise ConfigError([(f"tensor_parallel_size: the engine needs {tp} x GPU on one node but neither the Ray "
                            f"cluster nor its autoscaler can provide it ({cluster.describe()}); drop "
                            "tensor_parallel_size for a CPU engine, or add such a GPU node type to the cluster config")])
    return placement


def resolve_serve_placement(cfg: ServeConfig) -> Placement:
    """`serve_placement` against the live cluster when Ray is initialized, from the config alone otherwise."""
    import ray

    from frugalray.devices import cluster_devices

    return serve_placement(cfg, cluster_devices() if ray.is_initialized() else None)


CPU_KV_BLOCK_TOKENS = 32


@dataclass(frozen=True)
class EnginePlan:
    """What the engine asks Ray and vLLM for on its placement (pure; `llm_config_for` wraps it)."""

    platform: str  # "cpu" or "cuda": also selects the ingress's vLLM-CPU workarounds
    bundles: list[dict[str, float]]
    accelerator_type: str | None
    engine_kwargs: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)


def engine_plan(cfg: ServeConfig, resolved: ResolvedServe, placement: Placement) -> EnginePlan:
    """Bundles, vLLM engine args and environment for an engine placed by `placement`.

    The operator's `engine_kwargs` win over every default here.
    """
    cuda = placement.use_gpu
    engine_kwargs: dict[str, Any] = {
        "max_model_len": cfg.max_model_len,
        # vLLM-CPU picks bf16, which an AVX2-only CPU emulates: 4x slower decoding than fp32. A GPU: vLLM's "auto".
        "dtype": engine_dtype_default(placement.device),
        # usage.prompt_tokens_details.cached_tokens: vLLM reports prefix-cache hits only when asked.
        "enable_prompt_tokens_details": True,
    }
    env = worker_env()
    if cuda:
        engine_kwargs["tensor_parallel_size"] = cfg.tensor_parallel_size
        # One GPU per tensor-parallel rank; vLLM's Ray executor puts one worker in each bundle.
        bundles = [{"GPU": 1.0, "CPU": 1.0} for _ in range(cfg.tensor_parallel_size)]
    else:
        # CUDA-graph capture does not exist on CPU; eager mode is what vLLM-CPU runs.
        engine_kwargs["enforce_eager"] = True
        # vLLM-CPU's default 128-token KV blocks cache only whole blocks, so a prompt under 128 tokens is
        # never served from the prefix cache and every adaptive round pays its prefill again (measured:
        # 0 cached tokens on every 43-token arithmetic prompt). 32 is the smallest size vLLM-CPU's
        # kernels are optimized for.
        engine_kwargs["block_size"] = CPU_KV_BLOCK_TOKENS
        bundles = [{"CPU": cfg.engine_cpus}]
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
        if cfg.engine_reserved_cpus is not None:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(cfg.engine_reserved_cpus)
    engine_kwargs.update(cfg.engine_kwargs)
    if resolved.adapters:
        # Static LoRA modules: vLLM loads them at start and serves each under its own name.
        # (Ray's LoraConfig only loads adapters from cloud storage.)
        # vLLM-CPU's LoRA ops pick each token's adapter as `stacked[index]`, and a base-model token's
        # index is -1: Python indexing makes that the LAST adapter slot. With every slot filled, a
        # base-model request batched beside adapter requests was answered by the last adapter (measured:
        # 4 of 4 base answers in the adapter's words). One spare slot, never filled, keeps index -1 on
        # zero weights. (vLLM's GPU kernels skip -1; the spare slot costs them one rank-r buffer.)
        engine_kwargs.update(
            enable_lora=True,
            max_lora_rank=cfg.max_lora_rank,
            max_loras=len(resolved.adapters) + (0 if cuda else 1),
            lora_modules=[{"name": a.name, "path": a.path} for a in resolved.adapters.values()],
        )
    return EnginePlan(placement.device, bundles, placement.accelerator if cuda else None, engine_kwargs, env)


def describe_engine(cfg: ServeConfig, resolved: ResolvedServe, placement: Placement) -> str:
    """The log line: "serve: 1 worker on GPU A10G (autoscaler: gpu_worker), auto, tensor_parallel_size 2"."""
    plan = engine_plan(cfg, resolved, placement)
    line = placement.describe(str(plan.engine_kwargs.get("dtype")))
    return line + (f", tensor_parallel_size {cfg.tensor_parallel_size}" if placement.use_gpu else "")


def _ray_accelerator_types() -> set[str]:
    from ray.llm._internal.serve.core.configs.llm_config import AcceleratorType

    return {t.value for t in AcceleratorType}


def llm_config_for(cfg: ServeConfig, resolved: ResolvedServe, placement: Placement | None = None):
    """Ray Serve LLM's config for the engine; without a placement, the one `serve_placement` gives without Ray."""
    from ray.serve.llm import LLMConfig

    plan = engine_plan(cfg, resolved, placement or serve_placement(cfg))
    bundles = plan.bundles
    accelerator_type = plan.accelerator_type
    if accelerator_type is not None and accelerator_type not in _ray_accelerator_types():
        # LLMConfig knows only Ray's own names; any other node label is asked for the same way Ray would.
        bundles = [{**b, f"accelerator_type:{accelerator_type}": 0.001} for b in bundles]
        accelerator_type = None
    return LLMConfig(
        model_loading_config={"model_id": cfg.model_name, "model_source": resolved.model_path},
        engine_kwargs=plan.engine_kwargs,
        placement_group_config={"bundles": bundles},
        accelerator_type=accelerator_type,
        runtime_env={"env_vars": plan.env},
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
        # Every engine replica checks its adapters when it starts (frugalray.serve.engine).
        experimental_configs={ADAPTER_PROBE_KEY: bool(resolved.adapters) and cfg.adapter_check_redeploys > 0},
    )


def tenant_digests(cfg: ServeConfig) -> dict[str, str]:
    """API key digest -> tenant, read from the environment of the process that builds the app."""
    digests = tenant_key_digests(cfg.tenants, os.environ)
    key = resolve_api_key(cfg)
    if key is not None:
        if api_key_digest(key) in digests:
            owner = digests[api_key_digest(key)]
            raise ConfigError([(f"api_key_env: the same key as tenants.{owner}; give each its own key so "
                                "requests charge the right budget")])
        digests[api_key_digest(key)] = DEFAULT_TENANT
    return digests


def start_tenant_ledger(cfg: ServeConfig) -> str | None:
    """Start (or find) the app's tenant ledger when a tenant has a budget; its actor name for the ingress."""
    if not budgeted_tenants(cfg):
        return None
    from frugalray.serve.ledger_service import ledger_actor_name, start_ledger

    path = default_ledger_path(cfg)  # preflight (which build_app always runs) has opened it, naming a bad path
    # A live request ends by request_timeout_s; a reservation older than that lost its request.
    start_ledger(cfg.app_name, path, expiry_s=cfg.request_timeout_s + 60.0)
    log.info("tenant budgets %s held in %s", sorted(budgeted_tenants(cfg)), path)
    return ledger_actor_name(cfg.app_name)


def build_app(cfg: ServeConfig, resolved: ResolvedServe | None = None, placement: Placement | None = None):
    """The Serve application (not yet running). Runs the preflight and resolves the engine's placement
    (against the cluster when Ray is initialized) unless given them."""
    from ray import serve
    from ray.serve.llm import build_llm_deployment

    from frugalray.serve.engine import FrugalLLMServer  # Ray Serve LLM and vLLM at its top
    from frugalray.serve.ingress import FrugalIngress  # FastAPI and Ray at its top

    resolved = resolved or preflight(cfg)
    if placement is None:
        placement = resolve_serve_placement(cfg)
        log.info("%s", describe_engine(cfg, resolved, placement))
    llm_config = llm_config_for(cfg, resolved, placement)
    server = build_llm_deployment(llm_config, name_prefix=f"{cfg.app_name}-", deployment_cls=FrugalLLMServer)
    settings = {
        "model_name": cfg.model_name,
        "adapters": {name: a.lora_params for name, a in resolved.adapters.items()},
        "shape": resolved.shape,
        "model_path": resolved.model_path,
        "max_samples_ceiling": cfg.max_samples_ceiling,
        "max_tokens_ceiling": cfg.max_tokens_ceiling,
        "default_samples": cfg.default_samples,
        "default_max_tokens": cfg.default_max_tokens,
        "sample_temperature": cfg.sample_temperature,
        "default_adaptive_samples": cfg.default_adaptive_samples,
        "default_confidence": cfg.default_confidence,
        "default_round_size": cfg.default_round_size,
        "agreement_window": cfg.agreement_window,
        "stop_rule": cfg.stop_rule,
        # Only the keys' digests travel to the replicas (deployment args live in the controller):
        # digest -> tenant; the single api_key/api_key_env is the tenant "default".
        "tenant_digests": tenant_digests(cfg),
        "tenant_budgets": budgeted_tenants(cfg),
        "ledger": start_tenant_ledger(cfg),
        "request_timeout_s": cfg.request_timeout_s,
        "max_request_body_bytes": cfg.max_request_body_bytes,
        "effort_presets": effort_presets(cfg.reasoning_effort_presets, cfg.max_samples_ceiling)[0],
        # vLLM takes a per-request thinking_token_budget only from a model served with a reasoning parser.
        "reasoning_parser": cfg.engine_kwargs.get("reasoning_parser"),
        "cascade_escalate_to": cfg.cascade_escalate_to,
        "reward_model": cfg.reward_model,
        # which vLLM-CPU workarounds the ingress applies (frugalray.serve.gate.workarounds_for)
        "engine_platform": placement.device,
    }
    from ray.serve.config import BackpressureConfig

    ingress = serve.deployment(
        FrugalIngress,
        name=f"{cfg.app_name}-ingress",
        num_replicas=cfg.ingress_replicas,
        max_ongoing_requests=cfg.ingress_max_ongoing_requests,
        # A full queue: Serve's proxy answers 503 with Retry-After itself, before the ingress runs.
        max_queued_requests=cfg.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=cfg.retry_after_s),
        ray_actor_options={"num_cpus": cfg.ingress_cpus, "runtime_env": {"env_vars": worker_env()}},
    )
    return ingress.bind(server, settings)


def deploy(cfg: ServeConfig, blocking: bool = False) -> str:
    """Start Serve's HTTP proxy (if not running) and deploy; returns the OpenAI base URL.

    Assumes Ray is initialized. Waits until the engine is up (about a minute on CPU).
    Only one Serve instance runs per cluster: if Serve is already up on another port, the
    proxy keeps that port.
    """
    from ray import serve

    resolved = preflight(cfg)  # config problems surface before any Ray work
    init_ray()
    placement = resolve_serve_placement(cfg)  # device: cuda without any GPU is refused here, naming the field
    log.info("%s", describe_engine(cfg, resolved, placement))
    if placement.use_gpu or placement.needs_autoscaler:
        # Say so while the autoscaler adds the node, and refuse after capacity_timeout_s instead of letting
        # serve.run wait forever. No device probe: the engine checks vLLM's platform where it lands.
        wait_for_placement(placement, timeout_s=cfg.capacity_timeout_s, probe=False)
    serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port})
    url = base_url_for(cfg)
    for attempt in range(cfg.adapter_check_redeploys + 1):
        start = time.time()
        try:
            # An engine replica whose adapters answer like the base model refuses to start; Serve retries it.
            serve.run(build_app(cfg, resolved, placement), name=cfg.app_name, route_prefix=cfg.route_prefix)
            break
        except RuntimeError as err:
            if "answer exactly like the base model" not in str(err) or attempt == cfg.adapter_check_redeploys:
                raise
            log.warning("engine refused inert adapters (deployment %d of %d); redeploying: %s", attempt + 1,
                        cfg.adapter_check_redeploys + 1, err)
            serve.delete(cfg.app_name, _blocking=True)
    log.info("serve app %r up in %.1fs at %s", cfg.app_name, time.time() - start, url)
    if blocking:
        while True:
            time.sleep(3600)
    return url


def shutdown_app(app_name: str) -> None:
    """Delete one application (the engine and its ingress) and stop its tenant ledger (its file stays);
    Serve itself keeps running."""
    from ray import serve

    from frugalray.serve.ledger_service import stop_ledger

    serve.delete(app_name, _blocking=True)
    stop_ledger(app_name)
