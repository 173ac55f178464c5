"""The temperature a compute-budget request samples at (pure Python): one stated rule, no silent substitution.

- `greedy` decodes at temperature 0.0, whatever the request says (the strategy is the choice).
- The sampling strategies (every other one: self_consistency, adaptive_consistency, best_of_n,
  cascade's samples after it escalates, auto):
  - no `temperature` in the request: the operator's `sample_temperature`;
  - `temperature` > 0: that temperature, as given;
  - `temperature: 0`: refused (HTTP 400 naming `temperature`): greedy samples are all the same
    decode, so there would be nothing to vote over, and quietly sampling hotter instead would
    answer a different request than the one sent.

The temperature used is reported in the response's `usage.frugalray.temperature`.
"""

from __future__ import annotations

from frugalray.serve.validation import RequestError


def sampling_temperature(strategy: str, requested: float | None, sample_temperature: float) -> float:
    """The temperature a budgeted request's samples are drawn at, or a 400 naming `temperature`."""
    if strategy == "greedy":
        return 0.0
    if requested is None:
        return float(sample_temperature)
    if requested <= 0:
        raise RequestError(
            f"temperature: 0 gives every sample the same greedy decode, so compute_budget.strategy "
            f"'{strategy}' would have nothing to vote over; omit temperature (this server then samples "
            f"at {sample_temperature:g}), set it above 0, or use compute_budget.strategy 'greedy'",
            param="temperature")
    return float(requested)
