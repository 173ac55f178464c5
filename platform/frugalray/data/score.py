"""Score every row of a dataset by a reference model's perplexity, with Ray Data.

Flow: `load_records` (preflight + quarantine, in the driver, before any Ray work) ->
quarantine written as JSONL with reasons -> rows sorted by length (so a batch pads little)
-> `ray.data.from_items` -> `map_batches(PerplexityScorer)` on a fixed pool of actors, each
loading the tokenizer and model once -> Parquet. Columns added per row:

- `perplexity`: exp(mean NLL) over the response tokens (over all tokens when the row has
  no prompt), the same tokens training puts a loss on (`formatting.tokenize_example`);
- `mean_nll`, `n_tokens` (tokens of the whole text, after truncation), `n_loss_tokens`.

A row whose response is truncated away entirely (prompt longer than `max_length`) gets
`n_loss_tokens = 0` and a NaN perplexity; `select` never keeps those.

Only the labelled positions go through the LM head and the cross-entropy: on a 49k-token
vocabulary the logits of every position would dominate both time and memory.

FLOPs are analytic (`budget.flops.forward_flops_per_token` at each row's own length) and
recorded once, from the driver, to the run's ledger under stage "score".

`scorers` chooses the signals (default `["perplexity"]`, the columns above). One actor class,
`RowScorer`, computes all model signals of a row from one tokenization and as few passes as
the signals allow; `n_tokens` / `n_loss_tokens` are always written:
- `perplexity`: as above;
- `ifd`: instruction-following difficulty = mean NLL(response | prompt) / mean NLL(response
  alone) (Li et al. 2023). The conditional NLL is the perplexity pass (shared); the
  unconditional one is a second pass over the response tokens with nothing before them (so
  their first token is not predicted, as in the paper's code). Columns `ifd`, `mean_nll`,
  `mean_nll_response_alone`; NaN for rows without a prompt or with the response truncated;
- `grand`: GraNd-style L2 norm of the gradient of the row's mean response NLL w.r.t. fresh
  LoRA parameters (seeded; lora_B starts at zero, so the gradient w.r.t. lora_B is a seeded
  random projection of the full weight gradient and lora_A's is zero). One backward per row;
  column `grand`;
- `heuristics`: model-free text signals (`signals.heuristic_scores`): `prompt_chars`,
  `response_chars`, `garbage_ratio`, `repetition_ratio`, `degenerate_reason`;
- `duplicates`: exact (normalized hash) and MinHash-LSH near duplicates with cluster ids
  (`signals.duplicate_clusters`): `dup_hash`, `dup_cluster`, `dup_cluster_size`, `dup_kind`.
  The signatures are a Ray Data map over the rows; clustering (needs every row) runs on the driver.

Each score column's scorer, model, settings and FLOPs go to a sidecar JSON next to the
output (`<output_path>_scores.json`, also read by `select` for its row accounting) and, per
scorer, into the ledger entry.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from frugalray.config import ConfigError, StrictModel
from frugalray.data.loaders import DEFAULT_MAX_CHARS, FieldMapping, load_records, write_quarantine
from frugalray.models import DEFAULT_MODEL

log = logging.getLogger(__name__)

SCORE_COLUMNS = ("perplexity", "mean_nll", "n_tokens", "n_loss_tokens")
ScorerName = Literal["perplexity", "ifd", "grand", "heuristics", "duplicates"]
MODEL_SCORERS = ("perplexity", "ifd", "grand")
# Output columns of each scorer (n_tokens / n_loss_tokens are always written).
SCORER_COLUMNS: dict[str, tuple[str, ...]] = {
    "perplexity": ("perplexity", "mean_nll"),
    "ifd": ("ifd", "mean_nll", "mean_nll_response_alone"),
    "grand": ("grand",),
    "heuristics": ("prompt_chars", "response_chars", "garbage_ratio", "repetition_ratio", "degenerate_reason"),
    "duplicates": ("dup_hash", "dup_cluster", "dup_cluster_size", "dup_kind"),
}


class GrandSettings(StrictModel):
    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: float = Field(default=16.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    seed: int = Field(default=0, description="seeds the LoRA init, so norms are comparable across runs")


class DedupSettings(StrictModel):
    threshold: float = Field(default=0.7, gt=0.0, le=1.0, description="Jaccard similarity for near duplicates; 1: exact only")
    num_perm: int = Field(default=128, ge=8, le=1024, description="MinHash permutations")
    ngram: int = Field(default=3, ge=1, description="words per shingle")
    seed: int = 0


class ScoreConfig(StrictModel):
    model: str = Field(default=DEFAULT_MODEL, description="reference model: alias, local dir or HF id")
    input_path: str = Field(description=".jsonl/.json/.parquet file or dataset directory")
    output_path: str = Field(description="directory the scored rows are written to, as Parquet")
    quarantine_path: str | None = Field(
        default=None, description="JSONL of rows that could not be used; default: <output_path>_quarantine.jsonl"
    )
    fields: FieldMapping = Field(default_factory=FieldMapping)
    batch_size: int = Field(default=16, ge=1, description="rows per forward pass")
    max_length: int = Field(default=512, ge=8, description="tokens per row; longer rows are truncated")
    max_chars: int = Field(default=DEFAULT_MAX_CHARS, ge=1, description="longer rows are quarantined")
    num_actors: int = Field(default=1, ge=1, description="scoring actors, each holding one model copy")
    num_cpus_per_actor: float = Field(default=1.0, gt=0)
    torch_threads: int | None = Field(
        default=None, ge=1, description="intra-op threads per actor; default: the node's cores / num_actors"
    )
    # float32 by default: on CPUs without native bf16 (AVX2 only) bf16 matmuls are emulated and slower.
    dtype: Literal["float32", "bfloat16"] = "float32"
    scorers: list[ScorerName] = Field(
        default_factory=lambda: ["perplexity"], min_length=1,
        description="signals to compute: perplexity, ifd, grand, heuristics, duplicates",
    )
    grand: GrandSettings = Field(default_factory=GrandSettings)
    dedup: DedupSettings = Field(default_factory=DedupSettings)

    @model_validator(mode="after")
    def _unique_scorers(self) -> ScoreConfig:
        repeated = sorted({s for s in self.scorers if self.scorers.count(s) > 1})
        if repeated:
            raise ValueError(f"scorers: {repeated} listed more than once; list each scorer once")
        return self


class ScoreResult(BaseModel):
    rows_in: int
    rows_scored: int
    rows_quarantined: int
    rows_unscorable: int
    output_path: str
    quarantine_path: str | None
    tokens: int
    loss_tokens: int
    flops: float
    wall_s: float
    tokens_per_s: float
    median_perplexity: float | None
    quarantine_reasons: dict[str, int]
    scorers: list[str] = Field(default_factory=lambda: ["perplexity"])
    flops_by_scorer: dict[str, float] = Field(default_factory=dict)
    sidecar_path: str | None = None


_COLUMN_TYPES = {
    "perplexity": "float64", "mean_nll": "float64", "n_tokens": "int64", "n_loss_tokens": "int64",
    "ifd": "float64", "mean_nll_response_alone": "float64", "grand": "float64",
    "prompt_chars": "int64", "response_chars": "int64", "garbage_ratio": "float64",
    "repetition_ratio": "float64", "degenerate_reason": "string",
}


class RowScorer:
    """Ray Data callable class: one tokenizer (and model, when a model signal is asked for) per
    actor, reused for every batch; computes every requested per-row signal of a batch."""

    def __init__(
        self,
        model_path: str,
        max_length: int,
        dtype: str = "float32",
        torch_threads: int | None = None,
        scorers: tuple[str, ...] = ("perplexity",),
        grand: dict | None = None,
    ):
        import torch

        from frugalray.models import load_causal_lm, load_tokenizer

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.scorers = tuple(scorers)
        self.tokenizer = load_tokenizer(model_path)
        self.max_length = max_length
        self.pad_id = self.tokenizer.pad_token_id
        self.model = None
        if set(self.scorers) & set(MODEL_SCORERS):
            self.model = load_causal_lm(model_path, dtype=dtype).eval()
            # The fast path applies the LM head to labelled positions only; models that post-process
            # logits (soft-capping) go through the full forward instead.
            config = self.model.config
            self.fast_path = (
                self.model.get_output_embeddings() is not None
                and hasattr(self.model, "get_decoder")
                and not getattr(config, "final_logit_softcapping", None)
                and getattr(config, "logit_scale", None) in (None, 1, 1.0)
            )
        self.lora_params = []
        if "grand" in self.scorers:
            from peft import LoraConfig, get_peft_model

            settings = GrandSettings(**(grand or {}))
            torch.manual_seed(settings.seed)
            # Injected in place: with lora_B at zero every forward pass is unchanged, so the other
            # signals computed on `self.model` are those of the reference model.
            get_peft_model(self.model, LoraConfig(
                r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                target_modules=settings.target_modules, task_type="CAUSAL_LM",
            ))
            self.lora_params = [p for p in self.model.parameters() if p.requires_grad]

    def _token_nll(self, batch: dict):
        """NLL of every labelled next-token position (a flat tensor) and its row index."""
        import torch.nn.functional as F

        from frugalray.data.formatting import IGNORE_INDEX

        input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        targets = labels[:, 1:]  # position t predicts token t+1
        selected = targets != IGNORE_INDEX
        if self.fast_path:
            hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            logits = self.model.get_output_embeddings()(hidden[:, :-1][selected])
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][selected]
        nll = F.cross_entropy(logits.float(), targets[selected], reduction="none")
        return nll, selected.nonzero()[:, 0], selected.sum(dim=1).tolist()

    def _mean_nll(self, examples: list[dict]) -> tuple[list[float], list[int]]:
        import torch

        from frugalray.data.formatting import pad_batch

        with torch.inference_mode():
            nll, row_of_token, n_loss = self._token_nll(pad_batch(examples, self.pad_id))
            sums = torch.zeros(len(examples), dtype=torch.float64).index_add_(0, row_of_token, nll.double())
        return [s / n if n else math.nan for s, n in zip(sums.tolist(), n_loss)], n_loss

    def _grad_norm(self, example: dict) -> float:
        import torch

        from frugalray.data.formatting import pad_batch

        nll, _, n_loss = self._token_nll(pad_batch([example], self.pad_id))
        if not n_loss[0]:
            return math.nan
        grads = torch.autograd.grad(nll.mean(), self.lora_params)
        return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))

    def score(self, prompts: list[str], responses: list[str]) -> dict[str, list]:
        """Every requested signal of each row, plus token counts."""
        from frugalray.data.formatting import IGNORE_INDEX, tokenize_example

        examples = [tokenize_example(self.tokenizer, p, r, self.max_length) for p, r in zip(prompts, responses)]
        out: dict[str, list] = {
            "n_tokens": [len(e["input_ids"]) for e in examples],
            # Next-token positions with a label (the first token is never predicted).
            "n_loss_tokens": [sum(1 for t in e["labels"][1:] if t != IGNORE_INDEX) for e in examples],
        }
        if "perplexity" in self.scorers or "ifd" in self.scorers:
            mean_nll, _ = self._mean_nll(examples)
            out["mean_nll"] = mean_nll
            if "perplexity" in self.scorers:
                out["perplexity"] = [math.exp(m) if n else math.nan for m, n in zip(mean_nll, out["n_loss_tokens"])]
            if "ifd" in self.scorers:
                alone = [tokenize_example(self.tokenizer, "", r, self.max_length) for r in responses]
                alone_nll, _ = self._mean_nll(alone)
                out["mean_nll_response_alone"] = alone_nll
                out["ifd"] = [
                    c / a if p and n and math.isfinite(c) and a > 0 else math.nan
                    for c, a, p, n in zip(mean_nll, alone_nll, prompts, out["n_loss_tokens"])
                ]
        if "grand" in self.scorers:
            out["grand"] = [self._grad_norm(e) for e in examples]
        if "heuristics" in self.scorers:
            from frugalray.data.signals import heuristic_scores

            rows = [heuristic_scores(p, r) for p, r in zip(prompts, responses)]
            for name in SCORER_COLUMNS["heuristics"]:
                out[name] = [row[name] for row in rows]
        return out

    def __call__(self, batch):  # a pyarrow.Table: nested columns pass through untouched
        import pyarrow as pa

        scores = self.score(batch.column("prompt").to_pylist(), batch.column("response").to_pylist())
        for name, values in scores.items():
            column = pa.array(values, type=getattr(pa, _COLUMN_TYPES[name])())
            if name in batch.column_names:
                batch = batch.set_column(batch.column_names.index(name), name, column)
            else:
                batch = batch.append_column(name, column)
        return batch


# The name the foundation stage used: perplexity-only scoring is RowScorer's default.
PerplexityScorer = RowScorer


def _minhash_batch(batch: dict, num_perm: int, ngram: int, seed: int) -> dict:
    from frugalray.data.signals import minhash_signatures

    return {"row": batch["row"], "signature": minhash_signatures(list(batch["text"]), num_perm, ngram, seed)}


def add_duplicate_columns(rows: list[dict], settings: DedupSettings) -> None:
    """Annotate rows in place with dup_* columns; MinHash signatures are a Ray Data map."""
    import numpy as np
    import ray

    from frugalray.data.signals import duplicate_clusters, example_text

    texts = [example_text(r["prompt"], r["response"]) for r in rows]
    signatures = None
    if settings.threshold < 1.0 and len(rows) > 1:
        out = ray.data.from_items([{"row": i, "text": t} for i, t in enumerate(texts)]).map_batches(
            _minhash_batch, fn_kwargs={"num_perm": settings.num_perm, "ngram": settings.ngram, "seed": settings.seed},
            batch_format="numpy", batch_size=256,
        ).take_all()
        signatures = np.zeros((len(rows), settings.num_perm), dtype=np.uint64)
        for item in out:
            signatures[int(item["row"])] = item["signature"]
    infos = duplicate_clusters(texts, settings.threshold, settings.num_perm, settings.ngram, settings.seed, signatures)
    for row, info in zip(rows, infos):
        row.update(info.as_dict())
        # Cluster ids name the representative's position in the source data, not in this list.
        row["dup_cluster"] = int(rows[info.dup_cluster].get("source_index", info.dup_cluster))


def default_quarantine_path(output_path: str) -> str:
    return str(output_path).rstrip("/") + "_quarantine.jsonl"


def _row_flops(shape, n_tokens: list[int]) -> float:
    from frugalray.budget.flops import forward_flops_per_token

    return float(sum(forward_flops_per_token(shape, context=n) * n for n in n_tokens))


def scorer_flops(cfg: ScoreConfig, shape, n_tokens: list[int], response_alone_tokens: list[int]) -> dict[str, float]:
    """Analytic FLOPs of each scorer; signals that share a pass are charged to the first one."""
    from frugalray.budget.flops import train_flops_per_token

    flops: dict[str, float] = {}
    if "perplexity" in cfg.scorers:
        flops["perplexity"] = _row_flops(shape, n_tokens)
    if "ifd" in cfg.scorers:
        # The conditional pass is perplexity's when both run; the response-alone pass is IFD's own.
        shared = 0.0 if "perplexity" in cfg.scorers else _row_flops(shape, n_tokens)
        flops["ifd"] = shared + _row_flops(shape, response_alone_tokens)
    if "grand" in cfg.scorers:
        lora = shape.lora_params(cfg.grand.lora_rank, cfg.grand.target_modules)
        flops["grand"] = float(sum(train_flops_per_token(shape, n, "lora", lora) * n for n in n_tokens))
    for name in ("heuristics", "duplicates"):
        if name in cfg.scorers:
            flops[name] = 0.0  # no model: CPU string work, negligible next to a forward pass
    return flops


def sidecar_path_for(output_path: str | Path) -> Path:
    return Path(str(output_path).rstrip("/") + "_scores.json")


def _scorer_settings(cfg: ScoreConfig, name: str) -> dict:
    if name == "grand":
        return cfg.grand.model_dump()
    if name == "duplicates":
        return cfg.dedup.model_dump()
    if name == "heuristics":
        return {}
    return {"max_length": cfg.max_length, "dtype": cfg.dtype}


def run_score(cfg: ScoreConfig, run_dir: str | Path, ledger=None) -> ScoreResult:
    """Score `cfg.input_path` into Parquet at `cfg.output_path`; Ray must already be initialized."""
    import pyarrow.parquet as pq
    import ray

    from frugalray.budget.ledger import ComputeLedger
    from frugalray.models import model_shape, resolve_model

    start = time.time()
    # Preflight everything a user can get wrong before any Ray work starts.
    model_path = resolve_model(cfg.model, field="model")
    loaded = load_records(cfg.input_path, cfg.fields, max_chars=cfg.max_chars)
    quarantine_path = cfg.quarantine_path or default_quarantine_path(cfg.output_path)
    write_quarantine(loaded.quarantined, quarantine_path)
    if not loaded.rows:
        raise ConfigError(
            [
                (f"input_path: all {loaded.rows_in} rows of '{cfg.input_path}' were quarantined "
                f"({loaded.reasons()}); see {quarantine_path} and check `fields`")
            ]
        )

    threads = cfg.torch_threads or max(1, (os.cpu_count() or 1) // cfg.num_actors)
    output = Path(cfg.output_path)
    if output.exists():
        # Overwrite only what looks like an earlier scoring output, never an arbitrary directory.
        if output.is_dir() and all(p.suffix == ".parquet" for p in output.iterdir()):
            shutil.rmtree(output)
        else:
            raise ConfigError([f"output_path: '{output}' exists and is not an earlier scoring output; choose a new path"])

    rows = loaded.rows
    if "duplicates" in cfg.scorers:
        add_duplicate_columns(rows, cfg.dedup)
    # Similar lengths side by side, so a batch pads little.
    rows = sorted(rows, key=lambda r: len(r["prompt"]) + len(r["response"]))
    log.info("scoring %d rows (%s) with %s on %d actor(s)", len(rows), ", ".join(cfg.scorers), cfg.model, cfg.num_actors)
    from frugalray.ray_utils import init_ray

    init_ray()  # only now, after every check above passed (a no-op when Ray is already up)
    ds = ray.data.from_items(rows).map_batches(
        RowScorer,
        fn_constructor_kwargs={
            "model_path": model_path,
            "max_length": cfg.max_length,
            "dtype": cfg.dtype,
            "torch_threads": threads,
            "scorers": tuple(cfg.scorers),
            "grand": cfg.grand.model_dump(),
        },
        concurrency=cfg.num_actors,
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=cfg.num_cpus_per_actor,
    )
    ds.write_parquet(str(output))

    has_ppl = "perplexity" in cfg.scorers
    scored = pq.read_table(output, columns=["n_tokens", "n_loss_tokens"] + (["perplexity"] if has_ppl else [])).to_pydict()
    n_tokens = scored["n_tokens"]
    perplexities = sorted(p for p, n in zip(scored["perplexity"], scored["n_loss_tokens"]) if n) if has_ppl else []
    response_alone_tokens = []
    if "ifd" in cfg.scorers:  # the unconditional pass's lengths, counted on the driver (tokenizer only)
        from frugalray.data.formatting import tokenize_example
        from frugalray.models import load_tokenizer

        tokenizer = load_tokenizer(model_path)
        response_alone_tokens = [len(tokenize_example(tokenizer, "", r["response"], cfg.max_length)["input_ids"]) for r in rows]
    shape = model_shape(model_path)
    flops_by_scorer = scorer_flops(cfg, shape, n_tokens, response_alone_tokens)
    flops = float(sum(flops_by_scorer.values()))
    wall_s = time.time() - start
    result = ScoreResult(
        rows_in=loaded.rows_in,
        rows_scored=len(n_tokens),
        rows_quarantined=len(loaded.quarantined),
        rows_unscorable=sum(1 for n in scored["n_loss_tokens"] if n == 0),
        output_path=str(output),
        quarantine_path=str(quarantine_path),
        tokens=int(sum(n_tokens)),
        loss_tokens=int(sum(scored["n_loss_tokens"])),
        flops=flops,
        wall_s=round(wall_s, 3),
        tokens_per_s=round(sum(n_tokens) / wall_s, 1) if wall_s > 0 else 0.0,
        median_perplexity=perplexities[len(perplexities) // 2] if perplexities else None,
        quarantine_reasons=loaded.reasons(),
        scorers=list(cfg.scorers),
        flops_by_scorer=flops_by_scorer,
        sidecar_path=str(sidecar_path_for(output)),
    )
    scorers_meta = {
        name: {
            "columns": list(SCORER_COLUMNS[name]),
            "model": cfg.model if name in MODEL_SCORERS else None,
            "model_path": model_path if name in MODEL_SCORERS else None,
            "settings": _scorer_settings(cfg, name),
            "flops": flops_by_scorer[name],
        }
        for name in cfg.scorers
    }
    sidecar = {
        "output_path": str(output),
        "quarantine_path": str(quarantine_path),
        "rows_in": result.rows_in,
        "rows_scored": result.rows_scored,
        "rows_quarantined": result.rows_quarantined,
        "tokenizer": model_path,
        "scorers": scorers_meta,
        "columns": {col: name for name in cfg.scorers for col in SCORER_COLUMNS[name]},
        "flops": flops,
        "wall_s": result.wall_s,
    }
    sidecar_path_for(output).write_text(json.dumps(sidecar, indent=1))
    ledger = ledger or ComputeLedger(run_dir)
    ledger.record(
        "score",
        flops=flops,
        tokens=result.tokens,
        wall_s=wall_s,
        produced={"output_path": result.output_path, "quarantine_path": result.quarantine_path},
        model=cfg.model,
        rows_in=result.rows_in,
        rows_scored=result.rows_scored,
        rows_quarantined=result.rows_quarantined,
        scorers={name: {"flops": m["flops"], "settings": m["settings"]} for name, m in scorers_meta.items()},
    )
    log.info("scored %d rows (%d quarantined) in %.1fs", result.rows_scored, result.rows_quarantined, wall_s)
    return result
