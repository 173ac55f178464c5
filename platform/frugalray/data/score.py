"""Score every row of a dataset by a reference model's perplexity, with Ray Data.

Flow: `load_records` (preflight + quarantine, in the driver, before any Ray work) ->
quarantine written as JSONL with reasons -> each shard's rows sorted by token count (so a batch pads little)
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
- `verifier`: for verifiable tasks, whether the response states the row's reference answer
  (`signals.answer_correct`, `generate.extract_answer` on both): `answer_correct` 1.0 / 0.0,
  null for a row without a reference. Needs `fields.answer` (the reference-answer column;
  a ConfigError otherwise). No model, 0 FLOPs. `select`'s `drop_wrong_answer` filters on it;
- `duplicates`: exact (normalized hash) and MinHash-LSH near duplicates with cluster ids
  (`signals.duplicate_clusters`): `dup_hash`, `dup_cluster`, `dup_cluster_size`, `dup_kind`.
  The signatures are a Ray Data map over the rows; clustering (needs every row) runs on the driver.

- `dynamics`: learning dynamics over a short proxy LoRA fine-tune (`data.dynamics`): the proxy
  trains as one Ray task (`LoraTrainingSession`) and saves adapters at `dynamics.checkpoints`
  (under `<output_path>_dynamics/`); the actors load every checkpoint as a PEFT adapter of one
  model copy and score each row under each: `el2n`, `dyn_loss_mean`, `dyn_loss_var`,
  `forgetting_events`, `dyn_acc_mean`;
- `influence`: LESS-style cosine between a row's randomly projected LoRA gradient and the mean
  projected gradient of the target set at `influence.target_path` (`data.influence`): `influence`.

Nothing lost: rows that fail validation (missing fields, empty, non-string, non-text,
undecodable, over `max_chars` characters or `max_tokens` tokens) go to the quarantine JSONL with
a `quarantine_reason`; `rows_in == rows_scored + rows_quarantined` is checked.

Resume: the output directory holds one Parquet file per shard of `shard_rows` consecutive
source rows (`shard-00000.parquet`, keyed by the row's position in the input, `source_index`),
each written to a temporary name and renamed when the shard's last row is scored, plus a
manifest with a fingerprint of the input rows and every setting that changes a score. A job
restarted on the same output with the same fingerprint scores only the missing shards; with a
different fingerprint (or `resume: false`) it starts over.

Each score column's scorer, model, settings and FLOPs go to a sidecar JSON next to the
output (`<output_path>_scores.json`, also read by `select` for its row accounting) and, per
scorer, into the ledger entry. The ledger entry counts what this run computed (resumed shards
are not charged twice); the sidecar counts what the whole output cost.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from frugalray.config import ConfigError, StrictModel
from frugalray.data.difficulty import PASS_RATE_COLUMNS, PassRateSettings
from frugalray.data.dynamics import DYNAMICS_COLUMNS, DynamicsSettings
from frugalray.data.influence import InfluenceSettings
from frugalray.examples.loaders import DEFAULT_MAX_CHARS, FieldMapping, load_records, write_quarantine
from frugalray.models import DEFAULT_MODEL

log = logging.getLogger(__name__)

SCORE_COLUMNS = ("perplexity", "mean_nll", "n_tokens", "n_loss_tokens")
ScorerName = Literal[
    "perplexity", "ifd", "grand", "heuristics", "verifier", "duplicates", "dynamics", "influence", "pass_rate",
]
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
MANIFEST_NAME = "_frugalray_score.json"
SHARD_COLUMN = "score_shard"
# Labelled positions whose logits are computed at once: 128 x a 49k vocabulary in fp32 is 24 MiB.
NLL_CHUNK_POSITIONS = 128
# Settings that change how fast rows are scored, never their scores: not part of the resume fingerprint.
_RUNTIME_FIELDS = {"batch_size", "num_actors", "num_cpus_per_actor", "torch_threads", "resume", "quarantine_path",
                   "output_path"}


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
    max_tokens: int | None = Field(
        default=None, ge=1,
        description="rows longer than this many tokens (chat template + response) are quarantined; None: truncate at max_length",
    )
    shard_rows: int = Field(default=256, ge=1, description="source rows per output shard: the unit a restart skips")
    resume: bool = Field(default=True, description="skip shards an earlier run with the same fingerprint finished")
    num_actors: int = Field(default=1, ge=1, description="scoring actors, each holding one model copy")
    num_cpus_per_actor: float = Field(default=1.0, gt=0)
    torch_threads: int | None = Field(
        default=None, ge=1, description="intra-op threads per actor; default: the node's cores / num_actors"
    )
    # float32 by default: on CPUs without native bf16 (AVX2 only) bf16 matmuls are emulated and slower.
    dtype: Literal["float32", "bfloat16"] = "float32"
    scorers: list[ScorerName] = Field(
        default_factory=lambda: ["perplexity"], min_length=1,
        description=("signals to compute: perplexity, ifd, grand, heuristics, verifier (needs fields.answer), duplicates, "
                     "dynamics, influence, pass_rate"),
    )
    grand: GrandSettings = Field(default_factory=GrandSettings)
    dedup: DedupSettings = Field(default_factory=DedupSettings)
    dynamics: DynamicsSettings = Field(default_factory=DynamicsSettings)
    influence: InfluenceSettings = Field(default_factory=InfluenceSettings)
    pass_rate: PassRateSettings = Field(default_factory=PassRateSettings)

    @model_validator(mode="after")
    def _unique_scorers(self) -> ScoreConfig:
        repeated = sorted({s for s in self.scorers if self.scorers.count(s) > 1})
        if repeated:
            raise ValueError(f"scorers: {repeated} listed more than once; list each scorer once")
        if "verifier" in self.scorers and self.fields.answer is None:
            raise ValueError(
                "fields.answer: the verifier scorer checks each response against the row's reference answer, but no "
                "reference-answer column is mapped; set fields.answer to the column holding it (e.g. answer) "
                "or remove verifier from scorers"
            )
        if "influence" in self.scorers and not self.influence.target_path:
            raise ValueError("influence.target_path: required by the influence scorer; name a small file of target examples")
        if self.max_tokens is not None and self.max_tokens > self.max_length:
            raise ValueError(f"max_tokens: {self.max_tokens} > max_length {self.max_length}; raise max_length or lower max_tokens")
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
    shards: int = 0
    shards_resumed: int = 0  # shards an earlier run had finished, not scored again
    rows_scored_now: int = 0  # rows this run scored (rows_scored minus the resumed ones)
    flops_now: float = 0.0  # what this run computed (the ledger entry); `flops` is the whole output's cost


_COLUMN_TYPES = {
    "perplexity": "float64", "mean_nll": "float64", "n_tokens": "int64", "n_loss_tokens": "int64",
    "ifd": "float64", "mean_nll_response_alone": "float64", "grand": "float64",
    "prompt_chars": "int64", "response_chars": "int64", "garbage_ratio": "float64",
    "repetition_ratio": "float64", "degenerate_reason": "string", "answer_correct": "float64",
    "el2n": "float64", "dyn_loss_mean": "float64", "dyn_loss_var": "float64", "forgetting_events": "int64",
    "dyn_acc_mean": "float64", "influence": "float64",
    "pass_rate": "float64", "difficulty_bucket": "string", "pass_gen_tokens": "int64",
}


class RowScorer:
    """Ray Data callable class: one tokenizer (and model, when a model signal is asked for) per
    actor, reused for every batch; computes every requested per-row signal of a batch.

    `dynamics`: {"checkpoints": [adapter dirs], "chunk_tokens": int}; `influence`:
    {"settings": InfluenceSettings fields, "targets": [[prompt, response], ...]};
    `answer_column`: the batch column holding the reference answers (`verifier`).
    """

    def __init__(
        self,
        model_path: str,
        max_length: int,
        dtype: str = "float32",
        torch_threads: int | None = None,
        scorers: tuple[str, ...] = ("perplexity",),
        grand: dict | None = None,
        dynamics: dict | None = None,
        influence: dict | None = None,
        answer_column: str | None = None,
    ):
        import torch

        from frugalray.models import load_causal_lm, load_tokenizer

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.scorers = tuple(scorers)
        self.answer_column = answer_column
        self.tokenizer = load_tokenizer(model_path)
        self.max_length = max_length
        self.pad_id = self.tokenizer.pad_token_id
        self.model = None
        self.fast_path = False
        if set(self.scorers) & {"perplexity", "ifd", "grand"}:
            self.model = load_causal_lm(model_path, dtype=dtype).eval()
        if set(self.scorers) & set(MODEL_SCORERS):
            from frugalray.models import load_config

            config = load_config(model_path)
            # The fast path applies the LM head to labelled positions only; models that post-process
            # logits (soft-capping) go through the full forward instead.
            self.fast_path = (
                not getattr(config, "final_logit_softcapping", None)
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
        if "dynamics" in self.scorers:
            from peft import PeftModel

            # One model copy; each proxy checkpoint is a named adapter switched per pass.
            paths = list(dynamics["checkpoints"])
            self.dyn_model = PeftModel.from_pretrained(
                load_causal_lm(model_path, dtype=dtype), paths[0], adapter_name="ckpt0"
            ).eval()
            for i, path in enumerate(paths[1:], start=1):
                self.dyn_model.load_adapter(path, adapter_name=f"ckpt{i}")
            self.dyn_names = [f"ckpt{i}" for i in range(len(paths))]
            self.dyn_chunk = int(dynamics.get("chunk_tokens", 512))
        if "influence" in self.scorers:
            from frugalray.data.influence import target_direction

            self.inf = InfluenceSettings(**influence["settings"])
            base = load_causal_lm(model_path, dtype=dtype).eval()
            if self.inf.adapter_path:
                from peft import PeftModel

                self.inf_model = PeftModel.from_pretrained(base, self.inf.adapter_path, is_trainable=True).eval()
            else:
                from peft import LoraConfig, get_peft_model

                torch.manual_seed(self.inf.seed)
                self.inf_model = get_peft_model(base, LoraConfig(
                    r=self.inf.lora_rank, lora_alpha=self.inf.lora_alpha, lora_dropout=0.0,
                    target_modules=self.inf.target_modules, task_type="CAUSAL_LM",
                )).eval()
            # Name order fixes which gradient entry meets which projection row, in every process.
            self.inf_params = [p for _, p in sorted(self.inf_model.named_parameters()) if p.requires_grad]
            targets = [self._tokenize(p, r) for p, r in influence["targets"]]
            self.inf_direction = target_direction(self._influence_features(targets))

    def _tokenize(self, prompt: str, response: str) -> dict:
        from frugalray.examples.formatting import tokenize_example

        return tokenize_example(self.tokenizer, prompt, response, self.max_length)

    def _positions(self, model, batch: dict):
        """Hidden states of every labelled next-token position, their targets, each one's row
        index, loss tokens per row, and the head that turns hidden states into logits."""
        from frugalray.examples.formatting import IGNORE_INDEX

        input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        targets = labels[:, 1:]  # position t predicts token t+1
        selected = targets != IGNORE_INDEX
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        if self.fast_path and hf.get_output_embeddings() is not None and hasattr(hf, "get_decoder"):
            hidden = hf.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            hidden, head = hidden[:, :-1][selected], hf.get_output_embeddings()
        else:
            hidden = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][selected]
            head = lambda x: x  # these are the logits already
        return hidden, targets[selected], selected.nonzero()[:, 0], selected.sum(dim=1).tolist(), head

    def _token_nll(self, batch: dict, model=None):
        """NLL of every labelled next-token position (a flat tensor) and its row index."""
        import torch
        import torch.nn.functional as F

        hidden, targets, row_of_token, n_loss, head = self._positions(model if model is not None else self.model, batch)
        # A chunk of positions at a time: the whole batch's float logits (positions x vocab) would be
        # hundreds of MiB, freshly mapped and page-faulted on every batch; a chunk's stay under glibc's
        # mmap threshold and their memory is reused (measured: a third less system time, same NLLs).
        nll = torch.cat([
            F.cross_entropy(head(hidden[i:i + NLL_CHUNK_POSITIONS]).float(), targets[i:i + NLL_CHUNK_POSITIONS],
                            reduction="none")
            for i in range(0, hidden.shape[0], NLL_CHUNK_POSITIONS)
        ]) if hidden.shape[0] else hidden.new_zeros(0, dtype=torch.float32)
        return nll, row_of_token, n_loss

    def _mean_nll(self, examples: list[dict]) -> tuple[list[float], list[int]]:
        import torch

        from frugalray.examples.formatting import pad_batch

        with torch.inference_mode():
            nll, row_of_token, n_loss = self._token_nll(pad_batch(examples, self.pad_id))
            sums = torch.zeros(len(examples), dtype=torch.float64).index_add_(0, row_of_token, nll.double())
        return [s / n if n else math.nan for s, n in zip(sums.tolist(), n_loss)], n_loss

    def _grad_norm(self, example: dict) -> float:
        import torch

        from frugalray.examples.formatting import pad_batch

        nll, _, n_loss = self._token_nll(pad_batch([example], self.pad_id))
        if not n_loss[0]:
            return math.nan
        grads = torch.autograd.grad(nll.mean(), self.lora_params)
        return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))

    def _dynamics(self, examples: list[dict]) -> list[dict]:
        import torch

        from frugalray.data.dynamics import summarize_dynamics, token_error_stats
        from frugalray.examples.formatting import pad_batch

        batch = pad_batch(examples, self.pad_id)
        per_ckpt = []
        with torch.inference_mode():
            for name in self.dyn_names:
                self.dyn_model.set_adapter(name)
                hidden, targets, row_of_token, _, head = self._positions(self.dyn_model, batch)
                per_ckpt.append(token_error_stats(hidden, head, targets, self.dyn_chunk))
        out = []
        for i in range(len(examples)):
            mine = row_of_token == i
            out.append(summarize_dynamics(
                [c[0][mine].tolist() for c in per_ckpt], [c[1][mine].tolist() for c in per_ckpt],
                [c[2][mine].tolist() for c in per_ckpt],
            ))
        return out

    def _influence_features(self, examples: list[dict]):
        """[rows, dim] projected LoRA gradients (a zero row where a row has no loss token)."""
        import torch

        from frugalray.examples.formatting import pad_batch
        from frugalray.data.influence import project

        n_params = sum(p.numel() for p in self.inf_params)
        grads = torch.zeros(len(examples), n_params, dtype=torch.float32)
        for i, example in enumerate(examples):
            nll, _, n_loss = self._token_nll(pad_batch([example], self.pad_id), model=self.inf_model)
            if n_loss[0]:
                flat = torch.autograd.grad(nll.mean(), self.inf_params)
                grads[i] = torch.cat([g.reshape(-1) for g in flat]).float()
        return project(grads, self.inf.dim, self.inf.seed)

    def score(self, prompts: list[str], responses: list[str], answers: list | None = None) -> dict[str, list]:
        """Every requested signal of each row, plus token counts. `answers`: each row's reference
        answer (None where it has none), for the verifier."""
        from frugalray.examples.formatting import IGNORE_INDEX

        examples = [self._tokenize(p, r) for p, r in zip(prompts, responses)]
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
                alone = [self._tokenize("", r) for r in responses]
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
        if "verifier" in self.scorers:
            from frugalray.data.signals import answer_correct

            references = answers if answers is not None else [None] * len(responses)
            out["answer_correct"] = [answer_correct(r, a) for r, a in zip(responses, references)]
        if "dynamics" in self.scorers:
            rows = self._dynamics(examples)
            for name in SCORER_COLUMNS["dynamics"]:
                out[name] = [row[name] for row in rows]
        if "influence" in self.scorers:
            from frugalray.data.influence import cosine_to

            out["influence"] = cosine_to(self._influence_features(examples), self.inf_direction)
        return out

    def __call__(self, batch):  # a pyarrow.Table: nested columns pass through untouched
        import pyarrow as pa

        answers = None
        if "verifier" in self.scorers and self.answer_column in batch.column_names:
            answers = batch.column(self.answer_column).to_pylist()
        scores = self.score(batch.column("prompt").to_pylist(), batch.column("response").to_pylist(), answers)
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


def dynamics_dir_for(output_path: str | Path) -> Path:
    return Path(str(output_path).rstrip("/") + "_dynamics")


def _row_flops(shape, n_tokens: list[int], lora_params: int = 0) -> float:
    from frugalray.budget.flops import forward_flops_per_token

    return float(sum(forward_flops_per_token(shape, context=n, lora_params=lora_params) * n for n in n_tokens))


def _train_flops(shape, n_tokens: list[int], lora_params: int) -> float:
    from frugalray.budget.flops import train_flops_per_token

    return float(sum(train_flops_per_token(shape, n, "lora", lora_params) * n for n in n_tokens))


def scorer_flops(
    cfg: ScoreConfig,
    shape,
    n_tokens: list[int],
    response_alone_tokens: list[int],
    proxy_flops: float = 0.0,
    target_tokens: list[int] | None = None,
    actors: int = 0,
    prompt_tokens: list[int] | None = None,
    gen_tokens: list[int] | None = None,
) -> dict[str, float]:
    """Analytic FLOPs of each scorer over rows of `n_tokens` tokens; signals that share a pass
    are charged to the first one. `proxy_flops`: the dynamics proxy fine-tune run for these rows;
    `target_tokens`/`actors`: the influence target set, whose gradients each started actor computes;
    `prompt_tokens`/`gen_tokens`: pass_rate's prompts and the tokens its k samples generated."""
    from frugalray.data.influence import projection_flops

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
        lora = shape.lora_params(cfg.dynamics.lora_rank, cfg.dynamics.target_modules)
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
        from frugalray.data.difficulty import pass_rate_flops

        flops["pass_rate"] = pass_rate_flops(shape, list(prompt_tokens or []), list(gen_tokens or []),
                                             cfg.pass_rate.max_tokens)
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
    if name == "verifier":
        return {"answer_column": cfg.fields.answer, "extract": "generate.extract_answer"}
    if name == "dynamics":
        return {**cfg.dynamics.model_dump(), "max_length": cfg.max_length, "dtype": cfg.dtype}
    if name == "influence":
        return {**cfg.influence.model_dump(mode="json"), "max_length": cfg.max_length, "dtype": cfg.dtype}
    if name == "pass_rate":
        return cfg.pass_rate.model_dump(mode="json")
    return {"max_length": cfg.max_length, "dtype": cfg.dtype}


# --- quarantine by length ----------------------------------------------------------------------


def quarantine_over_length(rows: list[dict], tokenizer, max_tokens: int) -> tuple[list[dict], list[dict]]:
    """(rows within `max_tokens` tokens, rows over it with a `too long` quarantine reason).

    Counts the tokens training would see (chat template + response + end-of-turn), untruncated."""
    from frugalray.examples.formatting import tokenize_example

    kept, over = [], []
    for row in rows:
        n = len(tokenize_example(tokenizer, row["prompt"], row["response"], max_length=10**9)["input_ids"])
        if n > max_tokens:
            quarantined = {k: v for k, v in row.items() if k not in ("prompt", "response")}
            over.append({**quarantined, "quarantine_reason": f"too long: {n} tokens > max_tokens {max_tokens}"})
        else:
            kept.append(row)
    return kept, over


# --- shards and resume -------------------------------------------------------------------------


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def _length_key(tokenizer, max_length: int):
    """Sort key for batching: the row's token count as the scorer will see it (characters without a tokenizer)."""
    from frugalray.examples.formatting import tokenize_example

    if tokenizer is None:
        return lambda r: len(r["prompt"]) + len(r["response"])
    return lambda r: len(tokenize_example(tokenizer, r["prompt"], r["response"], max_length)["input_ids"])


def plan_shards(rows: list[dict], shard_rows: int) -> dict[int, list[dict]]:
    """Rows grouped by `source_index // shard_rows`: a row's shard depends on its place in the
    input only, so a restart over the same input plans the same shards."""
    shards: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        shards[int(row["source_index"]) // shard_rows].append(row)
    return dict(sorted(shards.items()))


def score_fingerprint(cfg: ScoreConfig, model_path: str, rows: list[dict]) -> str:
    """Hash of every setting that changes a score and of the rows themselves."""
    digest = hashlib.sha256()
    settings = cfg.model_dump(mode="json", exclude=_RUNTIME_FIELDS)
    digest.update(json.dumps({"settings": settings, "model_path": model_path}, sort_keys=True).encode())
    for row in rows:
        digest.update(json.dumps([row["source_index"], row["id"], row["prompt"], row["response"]]).encode())
    return digest.hexdigest()


def _is_scoring_output(path: Path) -> bool:
    return all(
        p.is_file() and (p.suffix == ".parquet" or p.name == MANIFEST_NAME or p.name.startswith("."))
        for p in path.iterdir()
    )


def prepare_output(output: Path, fingerprint: str, resume: bool) -> set[int]:
    """Make `output` ready; return the shard indices an earlier matching run already finished."""
    if output.exists():
        # Touch only what looks like an earlier scoring output, never an arbitrary directory.
        if not (output.is_dir() and _is_scoring_output(output)):
            raise ConfigError([f"output_path: '{output}' exists and is not an earlier scoring output; choose a new path"])
        manifest = output / MANIFEST_NAME
        if resume and manifest.is_file() and json.loads(manifest.read_text()).get("fingerprint") == fingerprint:
            for leftover in output.glob(".*"):  # a shard being written when the last run died
                leftover.unlink()
            done = {int(p.name[len("shard-"):-len(".parquet")]) for p in output.glob("shard-*.parquet")}
            log.info("resuming %s: %d finished shard(s) kept", output, len(done))
            return done
        log.info("replacing earlier scoring output %s (%s)", output,
                 "resume: false" if not resume else "different input or settings")
        shutil.rmtree(output)
    shutil.rmtree(dynamics_dir_for(output), ignore_errors=True)  # a proxy run belongs to its output
    output.mkdir(parents=True)
    (output / MANIFEST_NAME).write_text(json.dumps({"fingerprint": fingerprint, "created": time.time()}))
    return set()


def write_shard(output: Path, index: int, table) -> Path:
    """Write one finished shard atomically: a temporary file, then a rename."""
    import pyarrow.parquet as pq

    final = output / shard_name(index)
    tmp = output / f".{final.name}.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return final


def output_schema(rows: list[dict], cfg: ScoreConfig):
    """One Arrow schema for every shard: the input columns (types inferred over all rows) plus
    the score columns, so the shards read back as one table."""
    import pyarrow as pa

    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    table = pa.Table.from_pydict({c: [row.get(c) for row in rows] for c in columns})
    fields = [f for f in table.schema if f.name != SHARD_COLUMN]
    have = {f.name for f in fields}
    for name in ("n_tokens", "n_loss_tokens", *(c for s in cfg.scorers if s != "duplicates" for c in SCORER_COLUMNS[s])):
        if name not in have:
            fields.append(pa.field(name, getattr(pa, _COLUMN_TYPES[name])()))
            have.add(name)
    return pa.schema(fields)


# --- the stage -----------------------------------------------------------------------------------


def _load_targets(cfg: ScoreConfig) -> list[list[str]]:
    from frugalray.examples.loaders import load_records

    inf = cfg.influence
    loaded = load_records(inf.target_path, inf.target_fields or cfg.fields, max_chars=cfg.max_chars,
                          path_field="influence.target_path", fields_prefix="influence.target_fields")
    if not loaded.rows:
        raise ConfigError([(f"influence.target_path: no usable rows in '{inf.target_path}' "
                           f"({loaded.reasons()}); check influence.target_fields")])
    return [[r["prompt"], r["response"]] for r in loaded.rows[: inf.max_target_rows]]


def _proxy_checkpoints(cfg: ScoreConfig, model_path: str, rows: list[dict], threads: int) -> dict:
    """The dynamics proxy fine-tune's checkpoints: reused when a resumed run already saved them
    all (`prepare_output` clears them whenever it starts over), else trained now as one Ray task
    (charged to this run)."""
    import random

    import ray

    from frugalray.data.dynamics import checkpoint_dir, proxy_finetune

    root = dynamics_dir_for(cfg.output_path)
    wanted = [checkpoint_dir(root, step) for step in cfg.dynamics.checkpoints]
    record = root / "proxy.json"
    if record.is_file() and all((d / "adapter_config.json").is_file() for d in wanted):
        log.info("dynamics: reusing proxy checkpoints in %s", root)
        return {**json.loads(record.read_text()), "checkpoints": [str(d) for d in wanted], "reused": True}
    shutil.rmtree(root, ignore_errors=True)
    train = [{"prompt": r["prompt"], "response": r["response"]} for r in rows]
    if cfg.dynamics.train_rows is not None and cfg.dynamics.train_rows < len(train):
        train = random.Random(cfg.dynamics.seed).sample(train, cfg.dynamics.train_rows)
    task = ray.remote(num_cpus=cfg.num_cpus_per_actor)(proxy_finetune)
    out = ray.get(task.remote(model_path, train, cfg.dynamics.model_dump(), cfg.max_length, str(root), threads))
    record.write_text(json.dumps({k: out[k] for k in ("flops", "tokens", "losses")}))
    return {**out, "reused": False}


def run_score(cfg: ScoreConfig, run_dir: str | Path, ledger=None) -> ScoreResult:
    """Score `cfg.input_path` into Parquet shards at `cfg.output_path`; resumes a killed run."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray

    from frugalray.budget.ledger import ComputeLedger
    from frugalray.examples.formatting import tokenize_example
    from frugalray.models import load_tokenizer, model_shape, resolve_model

    start = time.time()
    # 1. Preflight everything a user can get wrong before any Ray work starts.
    model_path = resolve_model(cfg.model, field="model")
    loaded = load_records(cfg.input_path, cfg.fields, max_chars=cfg.max_chars)
    targets = _load_targets(cfg) if "influence" in cfg.scorers else []
    if "pass_rate" in cfg.scorers and cfg.pass_rate.answer_column not in loaded.columns:
        raise ConfigError([
            (f"pass_rate.answer_column: column '{cfg.pass_rate.answer_column}' not in the dataset "
            f"(columns: {', '.join(loaded.columns)}); pass_rate needs each row's verifiable answer")
        ])
    @functools.cache
    def tokenizer():  # only when needed: importing transformers costs the driver ~10 s on 2 cores
        return load_tokenizer(model_path)

    rows = loaded.rows
    quarantined = list(loaded.quarantined)
    if cfg.max_tokens is not None:
        rows, over = quarantine_over_length(rows, tokenizer(), cfg.max_tokens)
        quarantined += over
    quarantine_reasons: dict[str, int] = {}
    for q in quarantined:
        kind = q["quarantine_reason"].split(":", 1)[0]
        quarantine_reasons[kind] = quarantine_reasons.get(kind, 0) + 1
    quarantine_path = cfg.quarantine_path or default_quarantine_path(cfg.output_path)
    write_quarantine(sorted(quarantined, key=lambda q: q["source_index"]), quarantine_path)
    if not rows:
        raise ConfigError([
            (f"input_path: all {loaded.rows_in} rows of '{cfg.input_path}' were quarantined "
            f"({quarantine_reasons}); see {quarantine_path} and check `fields`")
        ])

    # 2. The output: shards an earlier run with the same input and settings finished are kept.
    output = Path(cfg.output_path)
    done = prepare_output(output, score_fingerprint(cfg, model_path, rows), cfg.resume)
    threads = cfg.torch_threads or max(1, (os.cpu_count() or 1) // cfg.num_actors)
    if "duplicates" in cfg.scorers:
        from frugalray.ray_utils import init_ray

        # Ray Data would otherwise start (or join any) Ray by itself; join the configured cluster first.
        init_ray()
        add_duplicate_columns(rows, cfg.dedup)  # needs every row; cheap, so recomputed on a restart
    shards = plan_shards(rows, cfg.shard_rows)
    pending = [k for k in shards if k not in done]
    schema = output_schema(rows, cfg)
    log.info("scoring %d rows in %d shard(s), %d already done (%s) with %s on %d actor(s)",
             len(rows), len(shards), len(shards) - len(pending), ", ".join(cfg.scorers), cfg.model, cfg.num_actors)

    # 3. Score the missing shards on the actor pool; write each shard as soon as its last row is in.
    proxy = {"flops": 0.0, "tokens": 0, "losses": [], "checkpoints": [], "reused": True}
    record = dynamics_dir_for(output) / "proxy.json"
    if "dynamics" in cfg.scorers and not pending and record.is_file():  # nothing to score: report the old proxy
        proxy.update(json.loads(record.read_text()))
    scored_now_tokens: list[int] = []
    scored_now_rows: list[dict] = []
    scored_now_gen: list[int] = []
    scored_now_prompts: list[str] = []
    if pending:
        from frugalray.ray_utils import init_ray

        init_ray()  # only now, after every check above passed (a no-op when Ray is already up)
        if "dynamics" in cfg.scorers:
            proxy = _proxy_checkpoints(cfg, model_path, rows, threads)
        # Similar token counts side by side within a shard, so a batch pads little. Sorting by characters
        # instead left a quarter of every batch padding on Alpaca (tokens / padded tokens 0.77 vs 0.93).
        sort_key = _length_key(tokenizer() if set(cfg.scorers) & set(MODEL_SCORERS) else None, cfg.max_length)
        items = [{**row, SHARD_COLUMN: k} for k in pending for row in sorted(shards[k], key=sort_key)]
        ds = ray.data.from_items(items).map_batches(
            RowScorer,
            fn_constructor_kwargs={
                "model_path": model_path,
                "max_length": cfg.max_length,
                "dtype": cfg.dtype,
                "torch_threads": threads,
                "scorers": tuple(cfg.scorers),
                "grand": cfg.grand.model_dump(),
                "dynamics": {"checkpoints": proxy["checkpoints"], "chunk_tokens": cfg.dynamics.chunk_tokens},
                "influence": {"settings": cfg.influence.model_dump(mode="json"), "targets": targets},
                "answer_column": cfg.fields.answer,
            },
            concurrency=cfg.num_actors,
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            num_cpus=cfg.num_cpus_per_actor,
        )
        if "pass_rate" in cfg.scorers:
            from frugalray.data.difficulty import PassRateScorer

            # A second actor pool, each actor owning one vLLM engine, streaming after the first.
            ds = ds.map_batches(
                PassRateScorer,
                fn_constructor_kwargs={"model_path": model_path, "settings": cfg.pass_rate.model_dump()},
                concurrency=cfg.num_actors, batch_size=cfg.batch_size, batch_format="pyarrow",
                num_cpus=cfg.num_cpus_per_actor,
            )
        expected = {k: len(shards[k]) for k in pending}
        buffers: dict[int, list] = defaultdict(list)
        received: dict[int, int] = defaultdict(int)
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            shard_of_row = block.column(SHARD_COLUMN)
            for k in sorted(set(shard_of_row.to_pylist())):
                part = block.filter(pc.equal(shard_of_row, k))
                buffers[k].append(part)
                received[k] += part.num_rows
                if received[k] == expected[k]:
                    table = pa.concat_tables(buffers.pop(k), promote_options="permissive")
                    table = table.drop_columns([SHARD_COLUMN]).select(schema.names).cast(schema)
                    write_shard(output, k, table)
                    scored_now_tokens += table.column("n_tokens").to_pylist()
                    if "pass_rate" in cfg.scorers:  # in the table's order, so prompts and samples line up
                        scored_now_gen += table.column("pass_gen_tokens").to_pylist()
                        scored_now_prompts += table.column("prompt").to_pylist()
                    scored_now_rows += shards[k]
                    log.info("shard %d written (%d rows)", k, table.num_rows)
        if buffers:
            raise RuntimeError(f"scoring ended with incomplete shards {sorted(buffers)}; rerun to resume")

    # 4. Account for every row, and for what the output and this run cost.
    wanted = ["n_tokens", "n_loss_tokens"] + (["perplexity"] if "perplexity" in cfg.scorers else [])
    wanted += ["pass_gen_tokens", "prompt"] if "pass_rate" in cfg.scorers else []
    scored = pq.read_table(output, columns=wanted).to_pydict()
    n_tokens = scored["n_tokens"]
    if len(n_tokens) + len(quarantined) != loaded.rows_in:
        raise RuntimeError(
            f"row accounting: read {loaded.rows_in} rows but scored {len(n_tokens)} + quarantined {len(quarantined)}; "
            f"'{output}' is incomplete"
        )
    perplexities = (
        sorted(p for p, n in zip(scored["perplexity"], scored["n_loss_tokens"]) if n) if "perplexity" in cfg.scorers else []
    )

    def alone_tokens(some_rows: list[dict]) -> list[int]:  # IFD's unconditional pass, counted by the tokenizer
        if "ifd" not in cfg.scorers:
            return []
        return [len(tokenize_example(tokenizer(), "", r["response"], cfg.max_length)["input_ids"]) for r in some_rows]

    target_tokens = [len(tokenize_example(tokenizer(), p, r, cfg.max_length)["input_ids"]) for p, r in targets]

    def prompt_tokens(prompts: list[str]) -> list[int]:  # pass_rate's prompts (chat template)
        from frugalray.examples.formatting import chat_prompt_text

        return [len(tokenizer()(chat_prompt_text(tokenizer(), p), add_special_tokens=False)["input_ids"]) for p in prompts]

    shape = model_shape(model_path)
    actors_started = min(cfg.num_actors, len(pending)) if pending else 0
    flops_now_by_scorer = scorer_flops(cfg, shape, scored_now_tokens, alone_tokens(scored_now_rows),
                                       proxy_flops=0.0 if proxy["reused"] else float(proxy["flops"]), target_tokens=target_tokens,
                                       actors=actors_started, prompt_tokens=prompt_tokens(scored_now_prompts),
                                       gen_tokens=scored_now_gen)
    # The output's cost: every row scored once, the proxy trained once, the target set once per actor.
    proxy_total = float(proxy["flops"])  # what the proxy run cost, whichever run trained it
    flops_by_scorer = scorer_flops(cfg, shape, n_tokens, alone_tokens(rows), proxy_flops=proxy_total,
                                   target_tokens=target_tokens, actors=max(1, cfg.num_actors),
                                   prompt_tokens=prompt_tokens(scored.get("prompt", [])),
                                   gen_tokens=scored.get("pass_gen_tokens"))
    flops = float(sum(flops_by_scorer.values()))
    flops_now = float(sum(flops_now_by_scorer.values()))
    wall_s = time.time() - start
    result = ScoreResult(
        rows_in=loaded.rows_in,
        rows_scored=len(n_tokens),
        rows_quarantined=len(quarantined),
        rows_unscorable=sum(1 for n in scored["n_loss_tokens"] if n == 0),
        output_path=str(output),
        quarantine_path=str(quarantine_path),
        tokens=int(sum(n_tokens)),
        loss_tokens=int(sum(scored["n_loss_tokens"])),
        flops=flops,
        wall_s=round(wall_s, 3),
        tokens_per_s=round(sum(scored_now_tokens) / wall_s, 1) if wall_s > 0 else 0.0,
        median_perplexity=perplexities[len(perplexities) // 2] if perplexities else None,
        quarantine_reasons=quarantine_reasons,
        scorers=list(cfg.scorers),
        flops_by_scorer=flops_by_scorer,
        sidecar_path=str(sidecar_path_for(output)),
        shards=len(shards),
        shards_resumed=len(shards) - len(pending),
        rows_scored_now=len(scored_now_tokens),
        flops_now=flops_now,
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
    if "dynamics" in cfg.scorers:
        scorers_meta["dynamics"]["proxy"] = {
            "flops": proxy_total, "steps": cfg.dynamics.checkpoints,
            "checkpoints": [f"step-{step:05d}" for step in cfg.dynamics.checkpoints],
            "losses": proxy["losses"], "trained_now": not proxy["reused"],
            "checkpoint_dir": str(dynamics_dir_for(output)),
        }
    if "influence" in cfg.scorers:
        scorers_meta["influence"]["target_rows"] = len(targets)
    sidecar = {
        "output_path": str(output),
        "quarantine_path": str(quarantine_path),
        "rows_in": result.rows_in,
        "rows_scored": result.rows_scored,
        "rows_quarantined": result.rows_quarantined,
        "quarantine_reasons": quarantine_reasons,
        "tokenizer": model_path,
        "scorers": scorers_meta,
        "columns": {col: name for name in cfg.scorers for col in SCORER_COLUMNS[name]},
        "flops": flops,
        "proxy_flops": proxy_total,
        "shards": result.shards,
        "shard_rows": cfg.shard_rows,
        "wall_s": result.wall_s,
    }
    sidecar_path_for(output).write_text(json.dumps(sidecar, indent=1))
    ledger = ledger or ComputeLedger(run_dir)
    ledger.record(
        "score",
        flops=flops_now,
        tokens=int(sum(scored_now_tokens)),
        wall_s=wall_s,
        produced={"output_path": result.output_path, "quarantine_path": result.quarantine_path},
        model=cfg.model,
        rows_in=result.rows_in,
        rows_scored=result.rows_scored,
        rows_scored_now=result.rows_scored_now,
        rows_quarantined=result.rows_quarantined,
        shards=result.shards,
        shards_resumed=result.shards_resumed,
        scorers={name: {"flops": flops_now_by_scorer[name], "settings": m["settings"]} for name, m in scorers_meta.items()},
    )
    log.info("scored %d rows (%d now, %d shards resumed; %d quarantined) in %.1fs",
             result.rows_scored, result.rows_scored_now, result.shards_resumed, result.rows_quarantined, wall_s)
    return result
