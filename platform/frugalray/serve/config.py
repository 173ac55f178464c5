"""The serving stage's config and its filesystem preflight (run before any Ray work)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from frugalray.config import ConfigError, StrictModel, apply_overrides, parse_config, read_yaml
from frugalray.models import DEFAULT_MODEL, model_shape, resolve_model
from frugalray.serve.effort import effort_presets
from frugalray.serve.tenants import (
    ENV_NAME_PATTERN,
    NAME_PATTERN,
    TenantConfig,
    tenant_key_digests,
    tenant_name_problems,
)
from frugalray.serve.tenants import key_digest as api_key_digest  # noqa: F401 - where callers have found it

DEFAULT_TENANT = "default"  # the tenant of the single api_key/api_key_env (or of a server without keys)


class ServeConfig(StrictModel):
    """One served base model (plus optional LoRA adapters) behind the frugalray ingress."""

    model: str = Field(DEFAULT_MODEL, description="model alias, local HF dir or HF id (resolve_model)")
    model_name: str = Field(DEFAULT_MODEL, description="the id clients send as `model`")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="served adapter name -> local PEFT adapter directory"
    )
    max_lora_rank: int = Field(16, ge=1, le=512)

    app_name: str = "frugalray"
    route_prefix: str = "/"
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    # The key itself should come from the environment (`api_key_env`), never from a YAML file
    # that lands in logs and repositories; `api_key` stays for programmatic use and is kept out of repr.
    api_key: str | None = Field(None, repr=False,
                                description="when set, requests need `Authorization: Bearer <key>`")
    api_key_env: str | None = Field(
        None, description="name of an environment variable (on the deploying process) holding the API key"
    )

    # Tenants: each its own key (read from an environment variable) and an optional budget per rolling
    # window, held by one SQLite ledger for every ingress replica (frugalray.serve.tenant_ledger). The single
    # api_key/api_key_env above is the tenant "default", without a budget.
    tenants: dict[str, TenantConfig] = Field(
        default_factory=dict, description="tenant name -> {api_key_env, budget: {flops, completion_tokens, window_s}}")
    ledger_path: str | None = Field(
        None, description="SQLite file of the tenants' spend (kept across restarts); default "
                          "runs/serve/<app_name>-tenants.sqlite under the deploying process's working directory. "
                          "On Kubernetes, a path on a persistent volume")
    ingress_replicas: int = Field(1, ge=1, le=64, description="ingress replicas (they share one tenant ledger)")

    # Robustness: admission control and deadlines (HTTP 503 + Retry-After, 504).
    ingress_max_ongoing_requests: int = Field(64, ge=1, description="requests one ingress replica serves at once")
    max_queued_requests: int = Field(
        256, ge=-1, description="requests Serve's proxy queues for the ingress before answering 503; -1 = no limit"
    )
    retry_after_s: float = Field(1.0, ge=0.0, le=3600.0, description="Retry-After (s) sent with a 503")
    request_timeout_s: float = Field(
        300.0, gt=0.0, le=86400.0, description="a request still running after this many seconds gets HTTP 504"
    )
    max_request_body_bytes: int = Field(
        4 * 2**20, ge=4096, le=2**30, description="a request body over this many bytes gets HTTP 413"
    )
    # Escalation and scoring targets (served names: model_name or an adapter name).
    cascade_escalate_to: str | None = Field(
        None, description="cascade escalates its sampling to this served model/adapter by default"
    )
    reward_model: str | None = Field(
        None, description="served model/adapter best_of_n scores samples with (compute_budget.score_with)"
    )

    # Operator ceilings: a request asking for more gets HTTP 400 naming the param.
    max_samples_ceiling: int = Field(16, ge=1, le=256)
    default_samples: int = Field(1, ge=1, description="samples when compute_budget omits max_samples")
    sample_temperature: float = Field(
        0.7, gt=0.0, le=2.0, description="temperature of the sampling strategies when the request sets none "
        "(temperature 0 with a sampling strategy is a 400 naming temperature)"
    )
    # Defaults of the adaptive strategies (compute_budget.strategy adaptive_consistency,
    # best_of_n, cascade, auto; see frugalray.serve.stopping) when the request omits them.
    default_adaptive_samples: int | None = Field(
        None, ge=1, description="max_samples of the adaptive strategies when omitted; None = the ceiling"
    )
    default_confidence: float = Field(0.95, gt=0.0, le=1.0, description="stopping threshold")
    default_round_size: int = Field(4, ge=1, description="samples per engine request in a round")
    agreement_window: int = Field(
        0, ge=0, description="adaptive_consistency also stops when this many samples in a row agree; 0 = off"
    )
    stop_rule: Literal["beta", "dirichlet"] = Field(
        "beta", description="posterior of the leading answer: exact Beta (leader vs runner-up) or Dirichlet MC"
    )
    reasoning_effort_presets: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="compute_budget preset per reasoning_effort level (none, minimal, low, medium, high, xhigh, "
                    "max), each replacing that level's default (frugalray.serve.effort.DEFAULT_EFFORT_PRESETS)")
    max_tokens_ceiling: int = Field(512, ge=1)
    default_max_tokens: int = Field(128, ge=1, description="max_tokens when the request sets none")

    # Engine sizing (vLLM): small by default so a shared 24 GiB machine keeps room.
    # Every engine replica probes its adapters when it starts (frugalray.serve.adapter_probe): one whose
    # next-token distribution equals the base model's is not applied (seen intermittently on vLLM-CPU),
    # so the replica refuses to start (Serve retries it) and deploy() redeploys up to this many times,
    # then fails loudly rather than serve the base model under the adapter's name. 0 turns the probe off.
    adapter_check_redeploys: int = Field(2, ge=0, le=5)
    max_model_len: int = Field(2048, ge=64)
    kv_cache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE (GiB) on CPU")
    engine_cpus: float = Field(1.0, gt=0.0, description="CPUs of a CPU engine's bundle (a GPU engine: 1 per GPU)")
    engine_reserved_cpus: int | None = Field(
        None, ge=0,
        description="VLLM_CPU_NUM_OF_RESERVED_CPU: cores vLLM-CPU keeps off its model threads for its scheduler "
                    "(None: vLLM's default, one core per engine; 0 on a 2-core box gives the model both cores, "
                    "1.6x the tokens/s measured here, at the cost of contention with Ray's own processes)")
    ingress_cpus: float = Field(0.25, gt=0.0)
    # Where the engine runs (frugalray.devices.resolve_placement, decided when the app is built).
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="engine device: auto = GPU when the cluster or its autoscaler can provide "
                            "tensor_parallel_size GPUs on one node, else CPU; cuda refuses to build without one")
    accelerator: str | None = Field(
        None, description="Ray accelerator type the GPU engine asks for (e.g. A10G, L4, A100); needs a GPU device")
    tensor_parallel_size: int = Field(
        1, ge=1, le=64, description="GPUs one engine shards the model over (one {GPU: 1, CPU: 1} bundle each); "
                                    "CPU engines use 1")
    capacity_timeout_s: float = Field(
        900.0, gt=0, description="seconds deploy waits for the cluster (its autoscaler) to provide a GPU engine's "
                                 "or an autoscaled node's resources before refusing")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra vLLM engine args, e.g. {dtype: bfloat16}"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        problems = []
        if not NAME_PATTERN.match(self.model_name):
            problems.append(f"model_name: '{self.model_name}' must be letters, digits, '.', '_' or '-'")
        for name in self.adapters:
            if not NAME_PATTERN.match(name) or name == self.model_name:
                problems.append(
                    f"adapters.{name}: adapter names must be letters, digits, '.', '_' or '-' "
                    "and differ from model_name"
                )
        served = {self.model_name, *self.adapters}
        for key in ("cascade_escalate_to", "reward_model"):
            target = getattr(self, key)
            if target is not None and target not in served:
                problems.append(f"{key}: '{target}' is not served here; use one of {sorted(served)}")
        if self.api_key is not None and self.api_key_env is not None:
            problems.append("api_key: set either api_key or api_key_env (preferred), not both")
        if self.api_key_env is not None and not ENV_NAME_PATTERN.match(self.api_key_env):
            problems.append(f"api_key_env: '{self.api_key_env}' is not an environment variable name")
        if not self.route_prefix.startswith("/"):
            problems.append(f"route_prefix: '{self.route_prefix}' must start with '/'")
        if self.default_samples > self.max_samples_ceiling:
            problems.append(
                f"default_samples: {self.default_samples} exceeds max_samples_ceiling "
                f"{self.max_samples_ceiling}; lower it or raise the ceiling"
            )
        if self.default_adaptive_samples is not None and self.default_adaptive_samples > self.max_samples_ceiling:
            problems.append(
                f"default_adaptive_samples: {self.default_adaptive_samples} exceeds max_samples_ceiling "
                f"{self.max_samples_ceiling}; lower it or raise the ceiling"
            )
        if self.default_max_tokens > self.max_tokens_ceiling:
            problems.append(
                f"default_max_tokens: {self.default_max_tokens} exceeds max_tokens_ceiling "
                f"{self.max_tokens_ceiling}"
            )
        if self.max_tokens_ceiling >= self.max_model_len:
            problems.append(
                f"max_tokens_ceiling: {self.max_tokens_ceiling} leaves no room for the prompt within "
                f"max_model_len {self.max_model_len}; lower it or raise max_model_len"
            )
        if self.device == "cpu" and self.accelerator is not None:
            problems.append(f"accelerator: '{self.accelerator}' names a GPU but device is 'cpu'; "
                            "drop accelerator or use device cuda/auto")
        if self.device == "cpu" and self.tensor_parallel_size > 1:
            problems.append(f"tensor_parallel_size: {self.tensor_parallel_size} shards over GPUs but device is "
                            "'cpu'; use 1, or device cuda/auto")
        if "tensor_parallel_size" in self.engine_kwargs:
            problems.append("engine_kwargs.tensor_parallel_size: set tensor_parallel_size instead (it sizes the "
                            "engine's GPU bundles too); remove it")
        reserved = {"model", "served_model_name", "enable_lora", "max_lora_rank", "lora_modules"}
        for key in sorted(reserved & set(self.engine_kwargs)):
            problems.append(f"engine_kwargs.{key}: set by frugalray from model/adapters; remove it")
        problems += effort_presets(self.reasoning_effort_presets, self.max_samples_ceiling)[1]
        problems += tenant_name_problems(self.tenants)
        if DEFAULT_TENANT in self.tenants and (self.api_key or self.api_key_env):
            problems.append(f"tenants.{DEFAULT_TENANT}: the single api_key/api_key_env is the tenant "
                            f"'{DEFAULT_TENANT}'; rename this tenant or drop api_key_env")
        if problems:
            # ValueError inside a validator becomes a pydantic error; parse_config reports it.
            raise ValueError("; ".join(problems))
        return self


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str
    rank: int
    target_modules: list[str] | str
    lora_params: int = 0


@dataclass
class ResolvedServe:
    """What preflight found on disk: the model path, its shape, the adapters."""

    model_path: str
    shape: Any  # frugalray.budget.flops.ModelShape
    adapters: dict[str, AdapterInfo] = field(default_factory=dict)


def read_adapter(name: str, path: str, max_rank: int) -> tuple[AdapterInfo | None, list[str]]:
    """Check one PEFT adapter directory; return it or the problems naming `adapters.<name>`."""
    where = f"adapters.{name}"
    p = Path(path).expanduser()
    if not p.is_dir():
        return None, [f"{where}: '{path}' is not a directory; point it at a saved PEFT adapter"]
    cfg_file = p / "adapter_config.json"
    if not cfg_file.is_file():
        fix = "save one with `model.save_pretrained(dir)` on a PEFT model"
        return None, [f"{where}: '{path}' has no adapter_config.json, so it is not a PEFT adapter; {fix}"]
    if not any((p / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        return None, [f"{where}: '{path}' has no adapter_model.safetensors/.bin weights"]
    try:
        adapter_cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        return None, [f"{where}: adapter_config.json is not valid JSON ({err})"]
    if str(adapter_cfg.get("peft_type", "LORA")).upper() != "LORA":
        return None, [f"{where}: peft_type {adapter_cfg.get('peft_type')!r} is not LORA; vLLM serves LoRA only"]
    rank = int(adapter_cfg.get("r", 0))
    if rank < 1 or rank > max_rank:
        return None, [f"{where}: LoRA rank {rank} is outside 1..max_lora_rank ({max_rank}); raise max_lora_rank"]
    targets = adapter_cfg.get("target_modules") or "all-linear"
    return AdapterInfo(name=name, path=str(p.resolve()), rank=rank, target_modules=targets), []


def default_ledger_path(cfg: ServeConfig) -> Path:
    return Path(cfg.ledger_path or f"runs/serve/{cfg.app_name}-tenants.sqlite").expanduser().resolve()


def open_ledger(cfg: ServeConfig):
    """The tenant ledger at `ledger_path` (frugalray.serve.tenant_ledger); a missing directory or an
    unwritable file is refused naming the path, except that the default's runs/serve/ is made."""
    from frugalray.serve.tenant_ledger import TenantLedger

    path = default_ledger_path(cfg)
    if cfg.ledger_path is None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return TenantLedger(path)


def budgeted_tenants(cfg: ServeConfig) -> dict[str, dict[str, Any]]:
    """tenant -> its budget (as a dict), for the tenants that have one."""
    return {name: t.budget.model_dump() for name, t in cfg.tenants.items() if t.budget is not None}


def resolve_api_key(cfg: ServeConfig) -> str | None:
    """The configured API key: `api_key`, or the value of the environment variable `api_key_env`."""
    if cfg.api_key_env is not None:
        value = os.environ.get(cfg.api_key_env)
        if not value:
            problem = (f"api_key_env: environment variable {cfg.api_key_env} is not set (or empty); "
                       "export it before deploying, or drop api_key_env to serve without a key")
            raise ConfigError([problem])
        return value
    return cfg.api_key or None


def preflight(cfg: ServeConfig) -> ResolvedServe:
    """Resolve the model and check every adapter; raise one ConfigError listing all problems."""
    problems: list[str] = []
    try:
        resolve_api_key(cfg)
    except ConfigError as err:
        problems.extend(err.problems)
    try:
        tenant_key_digests(cfg.tenants, os.environ)
    except ConfigError as err:
        problems.extend(err.problems)
    if budgeted_tenants(cfg):
        try:
            open_ledger(cfg).close()
        except ConfigError as err:
            problems.extend(err.problems)
    model_path = None
    try:
        model_path = resolve_model(cfg.model, field="model")
    except ConfigError as err:
        problems.extend(err.problems)
    adapters: dict[str, AdapterInfo] = {}
    for name, path in cfg.adapters.items():
        info, found = read_adapter(name, path, cfg.max_lora_rank)
        problems.extend(found)
        if info is not None:
            adapters[name] = info
    if problems:
        raise ConfigError(problems)
    shape = model_shape(model_path)
    for name, info in list(adapters.items()):
        targets = info.target_modules
        if isinstance(targets, str) and targets != "all-linear":
            targets = [targets]
        try:
            n = shape.lora_params(info.rank, targets)
        except ValueError:
            n = 0  # unusual target names (e.g. a regex): FLOPs then omit the small LoRA term
        adapters[name] = AdapterInfo(info.name, info.path, info.rank, info.target_modules, n)
    return ResolvedServe(model_path=model_path, shape=shape, adapters=adapters)


def load_serve_config(path: str, overrides: list[str] | None = None) -> ServeConfig:
    """The `args:` of the first application in a Serve config file (serve/config.yaml) as a ServeConfig."""
    apps = read_yaml(path).get("applications") or [{}]
    data = apply_overrides(dict(apps[0].get("args") or {}), overrides)
    return parse_config(ServeConfig, data, f"{path} applications[0].args")
