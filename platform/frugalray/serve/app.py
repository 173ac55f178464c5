"""Build, deploy and stop the frugalray Serve application.

    cfg = ServeConfig(adapters={"adder": "runs/x/adapter"})
    base_url = deploy(cfg)            # needs Ray initialized (frugalray.ray_utils.init_ray)
    openai.OpenAI(base_url=base_url, api_key="unused").chat.completions.create(...)
    shutdown_app(cfg.app_name)

The application is two deployments: Ray Serve LLM's `LLMServer` running vLLM (base model
plus the adapters as static LoRA modules) and the frugalray ingress in front of it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from frugalray.models import engine_dtype_default
from frugalray.ray_utils import init_ray, worker_env
from frugalray.serve.config import ResolvedServe, ServeConfig, api_key_digest, preflight, resolve_api_key

log = logging.getLogger(__name__)


def base_url_for(cfg: ServeConfig) -> str:
    """The URL an OpenAI client takes as `base_url` (ends in /v1)."""
    prefix = cfg.route_prefix.rstrip("/")
    return f"http://{cfg.http_host}:{cfg.http_port}{prefix}/v1"


def llm_config_for(cfg: ServeConfig, resolved: ResolvedServe):
    from ray.serve.llm import LLMConfig

    engine_kwargs: dict[str, Any] = {
        # CUDA-graph capture does not exist on CPU; eager mode is what vLLM-CPU runs.
        "enforce_eager": True,
        "max_model_len": cfg.max_model_len,
        # vLLM-CPU picks bf16, which an AVX2-only CPU emulates: 4x slower decoding than fp32.
        "dtype": engine_dtype_default(),
        **cfg.engine_kwargs,
    }
    if resolved.adapters:
        # Static LoRA modules: vLLM loads them at start and serves each under its own name.
        # (Ray's LoraConfig only loads adapters from cloud storage.)
        engine_kwargs.update(
            enable_lora=True,
            max_lora_rank=cfg.max_lora_rank,
            max_loras=max(1, len(resolved.adapters)),
            lora_modules=[{"name": a.name, "path": a.path} for a in resolved.adapters.values()],
        )
    env = {**worker_env(), "VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib)}
    if cfg.engine_reserved_cpus is not None:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(cfg.engine_reserved_cpus)
    return LLMConfig(
        model_loading_config={"model_id": cfg.model_name, "model_source": resolved.model_path},
        engine_kwargs=engine_kwargs,
        placement_group_config={"bundles": [{"CPU": cfg.engine_cpus}]},
        runtime_env={"env_vars": env},
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
    )


def build_app(cfg: ServeConfig, resolved: ResolvedServe | None = None):
    """The Serve application (not yet running). Runs the preflight unless given its result."""
    from ray import serve
    from ray.serve.llm import build_llm_deployment

    from frugalray.serve.ingress import FrugalIngress  # FastAPI and Ray at its top

    resolved = resolved or preflight(cfg)
    server = build_llm_deployment(llm_config_for(cfg, resolved), name_prefix=f"{cfg.app_name}-")
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
        # Only the key's digest travels to the replica (deployment args live in the controller).
        "api_key_sha256": api_key_digest(key) if (key := resolve_api_key(cfg)) else None,
        "request_timeout_s": cfg.request_timeout_s,
        "cascade_escalate_to": cfg.cascade_escalate_to,
        "reward_model": cfg.reward_model,
    }
    from ray.serve.config import BackpressureConfig

    ingress = serve.deployment(
        FrugalIngress,
        name=f"{cfg.app_name}-ingress",
        num_replicas=1,
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
    serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port})
    url = base_url_for(cfg)
    for attempt in range(cfg.adapter_check_redeploys + 1):
        start = time.time()
        serve.run(build_app(cfg, resolved), name=cfg.app_name, route_prefix=cfg.route_prefix)
        log.info("serve app %r up in %.1fs at %s", cfg.app_name, time.time() - start, url)
        inert = inert_adapters(url, cfg)
        if not inert:
            break
        log.warning("adapter(s) %s answer exactly like the base model: vLLM is not applying them "
                    "(attempt %d); redeploying", inert, attempt + 1)
        serve.delete(cfg.app_name, _blocking=True)
    else:
        raise RuntimeError(
            f"adapters {inert} had no effect on the served model after {cfg.adapter_check_redeploys + 1} "
            "deployments (their next-token log-probabilities equal the base model's); check that they are "
            "trained (a fresh PEFT adapter is a no-op) or set adapter_check_redeploys: 0 to serve them anyway"
        )
    if blocking:
        while True:
            time.sleep(3600)
    return url


ADAPTER_PROBE = "The capital of France is"


def inert_adapters(base_url: str, cfg: ServeConfig) -> list[str]:
    """Adapters whose top next-token log-probabilities equal the base model's on a probe prompt."""
    if not cfg.adapters or cfg.adapter_check_redeploys == 0:
        return []
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=resolve_api_key(cfg) or "unused", timeout=120, max_retries=2)

    def top_logprobs(model: str) -> dict[str, float]:
        resp = client.completions.create(model=model, prompt=ADAPTER_PROBE, max_tokens=1, temperature=0, logprobs=5)
        return dict(resp.choices[0].logprobs.top_logprobs[0])

    base = top_logprobs(cfg.model_name)
    inert = []
    for name in cfg.adapters:
        tuned = top_logprobs(name)
        same_tokens = set(tuned) == set(base)
        if same_tokens and all(abs(tuned[t] - base[t]) < 1e-4 for t in base):
            inert.append(name)
    return inert


def shutdown_app(app_name: str) -> None:
    """Delete one application (the engine and its ingress); Serve itself keeps running."""
    from ray import serve

    serve.delete(app_name, _blocking=True)
