"""The scoring stage's vocabulary: each scorer's name, the columns it writes and their Arrow types.

One table that the config (`score.ScoreConfig`), the actor (`scoring_actor.RowScorer`), the
output schema and `select` all read, so a scorer's columns are named in one place.
"""

from __future__ import annotations

from typing import Literal

from frugalray.data.difficulty import PASS_RATE_COLUMNS
from frugalray.data.dynamics import DYNAMICS_COLUMNS

ScorerName = Literal[
    "perplexity", "ifd", "grand", "heuristics", "verifier", "duplicates", "dynamics", "influence", "pass_rate",
]
# Scorers that run a model (and so need the tokenizer and the model's shape).
MODEL_SCORERS = ("perplexity", "ifd", "grand", "dynamics", "influence", "pass_rate")
# Output columns of each scorer (n_tokens / n_loss_tokens are always written).
SCORER_COLUMNS: dict[str, tuple[str, ...]] = {
    "perplexity": ("perplexity", "mean_nll"),
    "ifd": ("ifd", "mean_nll", "mean_nll_response_alone"),
    "grand": ("grand",),
    "heuristics": ("prompt_chars", "response_chars", "garbage_ratio", "repetition_ratio", "degenerate_reason"),
    "verifier": ("answer_correct",),
    "duplicates": ("dup_hash", "dup_cluster", "dup_cluster_size", "dup_kind"),
    "dynamics": DYNAMICS_COLUMNS,
    "influence": ("influence",),
    "pass_rate": PASS_RATE_COLUMNS,
}
# Arrow type (a `pyarrow` factory name) of every column a scoring actor writes.
COLUMN_TYPES = {
    "perplexity": "float64", "mean_nll": "float64", "n_tokens": "int64", "n_loss_tokens": "int64",
    "ifd": "float64", "mean_nll_response_alone": "float64", "grand": "float64",
    "prompt_chars": "int64", "response_chars": "int64", "garbage_ratio": "float64",
    "repetition_ratio": "float64", "degenerate_reason": "string", "answer_correct": "float64",
    "el2n": "float64", "dyn_loss_mean": "float64", "dyn_loss_var": "float64", "forgetting_events": "int64",
    "dyn_acc_mean": "float64", "influence": "float64",
    "pass_rate": "float64", "difficulty_bucket": "string", "pass_gen_tokens": "int64",
}
