"""Budget core: FLOP accounting and the compute ledger."""

from frugalray.budget.flops import ModelShape, forward_flops_per_token, train_flops_per_token, train_step_flops
from frugalray.budget.ledger import ComputeLedger

__all__ = [
    "ComputeLedger",
    "ModelShape",
    "forward_flops_per_token",
    "train_flops_per_token",
    "train_step_flops",
]
