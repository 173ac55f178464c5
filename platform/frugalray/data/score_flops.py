"""FLOPs of the scoring stage, per scorer: analytic (`budget.flops` at each row's own length).

`score.run_score` charges them twice: what this run computed (the ledger entry; resumed shards
are not charged again) and what the whole output cost (the sidecar).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from frugalray.budget.flops import ModelShape, forward_flops_per_token, train_flops_per_token
from frugalray.data.difficulty import pass_rate_flops
from frugalray.data.influence import projection_flops
from frugalray.examples.formatting import chat_prompt_text, tokenize_example


def _row_flops(shape: ModelShape, n_tokens: list[int], lora_params: int = 0) -> float:
    return float(sum(forward_flops_per_token(shape, context=n, lora_params=lora_params) * n for n in n_tokens))


def _train_flops(shape: ModelShape, n_tokens: list[int], lora_params: int) -> float:
    return float(sum(train_flops_per_token(shape, n, "lora", lora_params) * n for n in n_tokens))


def scorer_flops(
    cfg,
    shape: ModelShape,
    n_tokens: list[int],
    response_alone_tokens: list[int],
    proxy_flops: float = 0.0,
    target_tokens: list[int] | None = None,
    actors: int = 0,
    prompt_tokens: list[int] | None = None,
    gen_tokens: list[int] | None = None,
) -> dict[str, float]:
    """Analytic FLOPs of each scorer of `cfg` (a `ScoreConfig`) over rows of `n_tokens` tokens;
    signals that share a pass are charged to the first one. `proxy_flops`: the dynamics proxy
    fine-tune run for these rows; `target_tokens`/`actors`: the influence target set, whose
    gradients each started actor computes; `prompt_tokens`/`gen_tokens`: pass_rate's prompts and
    the tokens its k samples generated."""
    flops: dict[str, float] = {}
    if "perplexity" in cfg.scorers:
        flops["perplexity"] = _row_flops(shape, n_tokens)
    if "ifd" in cfg.scorers:
        # The conditional pass is perplexity's when both run; the response-alone pass is IFD's own.
        shared = 0.0 if "perplexity" in cfg.scorers else _row_flops(shape, n_tokens)
        flops["ifd"] = shared + _row_flops(shape, response_alone_tokens)
    if "grand" in cfg.scorers:
        flops["grand"] = _train_flops(shape, n_tokens, shape.lora_params(cfg.grand.lora_rank, cfg.grand.target_modules))
    for name in ("heuristics", "verifier", "duplicates"):
        if name in cfg.scorers:
            flops[name] = 0.0  # no model: CPU string work, negligible next to a forward pass
    if "dynamics" in cfg.scorers:
        lora = shape.lora_params(cfg.dynamics.proxy.lora_rank, cfg.dynamics.proxy.target_modules)
        flops["dynamics"] = proxy_flops + len(cfg.dynamics.checkpoints) * _row_flops(shape, n_tokens, lora)
    if "influence" in cfg.scorers:
        inf = cfg.influence
        lora = shape.lora_params(inf.lora_rank, inf.target_modules)
        per_row_projection = projection_flops(lora, inf.dim)
        targets = list(target_tokens or [])
        flops["influence"] = (
            _train_flops(shape, n_tokens, lora) + per_row_projection * len(n_tokens)
            + actors * (_train_flops(shape, targets, lora) + per_row_projection * len(targets))
        )
    if "pass_rate" in cfg.scorers:
        flops["pass_rate"] = pass_rate_flops(shape, list(prompt_tokens or []), list(gen_tokens or []),
                                             cfg.pass_rate.max_tokens)
    return flops


# -- scored rows -----------------------------------------------------------------------------------


def scored_rows_flops(
    cfg,
    shape: ModelShape,
    tokenizer: Callable[[], Any],
    n_tokens: list[int],
    rows: list[dict],
    prompts: list[str],
    gen_tokens: list[int] | None,
    proxy_flops: float,
    targets: list[list[str]],
    actors: int,
) -> dict[str, float]:
    """`scorer_flops` of scored rows, counting the tokens only some scorers pass over: IFD's
    response-alone pass over `rows`, influence's `targets` ([prompt, response] pairs) and
    pass_rate's chat `prompts`. `tokenizer` loads the tokenizer on its first call, made only when
    such a count is needed."""
    target_tokens = [len(tokenize_example(tokenizer(), p, r, cfg.max_length)["input_ids"]) for p, r in targets]
    alone = (
        [len(tokenize_example(tokenizer(), "", r["response"], cfg.max_length)["input_ids"]) for r in rows]
        if "ifd" in cfg.scorers else []
    )
    prompt_tokens = [len(tokenizer()(chat_prompt_text(tokenizer(), p), add_special_tokens=False)["input_ids"])
                     for p in prompts]
    return scorer_flops(cfg, shape, n_tokens, alone, proxy_flops=proxy_flops, target_tokens=target_tokens,
                        actors=actors, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens)
