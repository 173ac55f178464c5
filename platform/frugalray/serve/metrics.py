"""What the ingress served, as Prometheus metrics through `ray.serve.metrics` (on Ray's metrics endpoint).

Ray prefixes each name with `ray_` and adds the Serve tags (application, deployment, replica); ours
are model, strategy and tenant. Counters sum over requests that got a 2xx; `frugalray_errors` counts
the rest by status. The figures come from the response's `usage` (frugalray.serve.usage), so the
metrics and what clients were told are the same numbers.
"""

from __future__ import annotations

from typing import Any

from frugalray.serve.usage import usage_extension

TAGS = ("model", "strategy", "tenant")
SAMPLE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
FLOP_BUCKETS = [10.0**e for e in range(8, 17)]


def request_figures(usage: dict[str, Any] | None) -> dict[str, float]:
    """The counted figures of one answered request (pure): samples, completion tokens, FLOPs, early stop,
    escalation. A response without usage (a stream) counts as one sample with unknown tokens."""
    usage = usage or {}
    spent = usage_extension(usage)
    return {
        "samples": float(spent.get("samples", 1)),
        "completion_tokens": float(usage.get("completion_tokens") or 0),
        "flops": float(spent.get("flops") or 0.0),
        "early_stops": float(bool(spent.get("stopped_early"))),
        "escalations": float(bool(spent.get("escalated"))),
    }


class ServingMetrics:
    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        def counter(name: str, what: str):
            return Counter(f"frugalray_{name}", description=what, tag_keys=TAGS)

        self.requests = counter("requests", "requests answered with a 2xx")
        self.counters = {
            "samples": counter("samples", "samples drawn from the engine"),
            "completion_tokens": counter("completion_tokens", "completion tokens generated, summed over samples"),
            "flops": counter("flops", "forward FLOPs served (frugalray.budget.flops)"),
            "early_stops": counter("early_stops", "adaptive requests that stopped before their sample budget"),
            "escalations": counter("escalations", "cascade requests that escalated to sampling"),
        }
        self.samples_per_request = Histogram("frugalray_samples_per_request", description="samples per request",
                                             boundaries=SAMPLE_BUCKETS, tag_keys=TAGS)
        self.flops_per_request = Histogram("frugalray_flops_per_request", description="forward FLOPs per request",
                                           boundaries=FLOP_BUCKETS, tag_keys=TAGS)
        self.errors = Counter("frugalray_errors", description="requests answered with an error status",
                              tag_keys=("status", "tenant"))

    def answered(self, model: str, tenant: str, usage: dict[str, Any] | None) -> None:
        spent = usage_extension(usage)
        tags = {"model": model, "strategy": str(spent.get("strategy") or "plain"), "tenant": tenant}
        figures = request_figures(usage)
        self.requests.inc(1, tags)
        for name, counter in self.counters.items():
            if figures[name]:
                counter.inc(figures[name], tags)
        self.samples_per_request.observe(figures["samples"], tags)
        if figures["flops"]:
            self.flops_per_request.observe(figures["flops"], tags)

    def failed(self, status: int, tenant: str) -> None:
        self.errors.inc(1, {"status": str(status), "tenant": tenant})
