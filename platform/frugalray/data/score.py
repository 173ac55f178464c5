"""The scoring stage: every row of a dataset scored with the signals `scorers` asks for, on a Ray
Data actor pool, into Parquet shards a killed run resumes.

`run_score` reads top to bottom:
1. validate and load, in the driver, before any Ray work: the model, the rows (`load_records`:
   preflight + quarantine), the influence target set. Rows that fail validation (missing fields,
   empty, non-string, non-text, undecodable, over `max_chars` characters or `max_tokens` tokens)
   go to the quarantine JSONL with a `quarantine_reason`. Then, joining Ray, place the actors
   (`place_scorers`): CPU or GPU from `device` and the cluster (the autoscaler's node types
   included, `frugalray.devices`), `num_gpus` each, and the compute dtype that follows the device
   (`dtype: auto`: bf16 on GPUs and bf16-native CPUs, else float32). The resolved dtype is what the
   resume fingerprint, the actors, the sidecar and the ledger see;
2. set up: the output directory, keeping the shards an earlier run with the same input and
   settings finished (`score_shards`), and duplicate clusters over every row;
3. run: the dynamics proxy fine-tune, then the missing shards' rows (sorted by token count
   within each shard, so a batch pads little) through `map_batches(RowScorer)` on a fixed pool of
   actors (`scoring_actor`, which documents each model signal's columns) and, for pass_rate,
   through `PassRateScorer` (`data.difficulty`); each shard is written when its last row is in;
4. save: every shard read back, `rows_in == rows_scored + rows_quarantined` checked, FLOPs
   charged (`score_flops`), each score column's scorer, model, settings and FLOPs written to a
   sidecar JSON next to the output (`<output_path>_scores.json`, also read by `select` for its
   row accounting);
5. record: the ledger entry (stage "score") with the same, per scorer. It counts what this run
   computed (resumed shards are not charged twice); the sidecar counts what the whole output cost.

Scorers the recipe runs itself rather than the actor:
- `duplicates`: exact (normalized hash) and MinHash-LSH near duplicates with cluster ids
  (`signals.duplicate_clusters`): `dup_hash`, `dup_cluster`, `dup_cluster_size`, `dup_kind`.
  The signatures are a Ray Data map over the rows; clustering (needs every row) runs on the driver;
- `dynamics`' proxy: a short LoRA fine-tune (`data.dynamics.proxy_finetune`) as one Ray task,
  saving adapters at `dynamics.checkpoints` under `<output_path>_dynamics/`, which the actors
  load to score every row under each checkpoint.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from frugalray.budget.ledger import ComputeLedger
from frugalray.config import ConfigError, StrictModel
from frugalray.data.difficulty import PassRateScorer, PassRateSettings
from frugalray.data.dynamics import DynamicsSettings, checkpoint_dir, proxy_finetune
from frugalray.data.influence import InfluenceSettings
from frugalray.data.score_columns import COLUMN_TYPES, MODEL_SCORERS, SCORER_COLUMNS, ScorerName
from frugalray.data.score_flops import scored_rows_flops
from frugalray.data.score_shards import (
    SHARD_COLUMN,
    dynamics_dir_for,
    pending_items,
    plan_shards,
    prepare_output,
    score_fingerprint,
    write_shards_as_finished,
)
from frugalray.data.scoring_actor import GrandSettings, RowScorer
from frugalray.data.signals import duplicate_clusters, example_text, minhash_signatures
from frugalray.devices import (
    ClusterDevices,
    Placement,
    cluster_devices,
    resolve_dtype,
    resolve_placement,
    target_fast_bf16,
)
from frugalray.examples.formatting import tokenize_example
from frugalray.examples.loaders import DEFAULT_MAX_CHARS, FieldMapping, load_records, write_quarantine
from frugalray.models import DEFAULT_MODEL, load_tokenizer, model_shape, resolve_model
from frugalray.ray_utils import init_ray, reserve_target

log = logging.getLogger(__name__)


# -- config ----------------------------------------------------------------------------------------


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
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description=(
        "where the scoring actors run; auto: GPUs when the running nodes or the autoscaler's node types can give "
        "every actor num_gpus (CPU when no scorer runs a model), else CPU; cuda: GPUs (refused before launch "
        "when the cluster can never provide them)"))
    accelerator: str | None = Field(default=None, description=(
        "GPU model to ask Ray for (its accelerator_type, e.g. A10G, L4, A100-80G); null: any GPU"))
    num_gpus: float | None = Field(default=None, gt=0, le=8, description=(
        "GPUs per scoring actor when on GPU; a fraction packs actors onto one GPU (0.25: four per GPU); "
        "null: 1. Needs a GPU in the cluster or its autoscaler"))
    capacity_timeout_s: float = Field(default=900.0, gt=0, description=(
        "seconds to wait for the autoscaler to add the nodes the actors need before failing"))
    # On CPUs without native bf16 (AVX2 only) bf16 matmuls are emulated and slower: auto picks float32 there.
    dtype: Literal["auto", "float32", "bfloat16"] = Field(default="auto", description=(
        "scoring model dtype; auto: bfloat16 on GPUs (Ampere and later) and on CPUs with AVX512-BF16/AMX, "
        "else float32; an explicit value is what runs"))
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
        problems = gpu_field_problems(self.device, self.num_gpus, self.accelerator)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def gpu_field_problems(device: str, num_gpus: float | None, accelerator: str | None) -> list[str]:
    """The scoring actors' GPU settings that contradict `device` or Ray (pure; the config validator's)."""
    problems = []
    if device == "cpu" and num_gpus is not None:
        problems.append(f"num_gpus: {num_gpus:g} GPU per actor but device is 'cpu'; drop num_gpus or set device "
                        "to auto or cuda")
    if device == "cpu" and accelerator:
        problems.append(f"accelerator: '{accelerator}' names a GPU but device is 'cpu'; drop accelerator or set "
                        "device to auto or cuda")
    if num_gpus is not None and num_gpus > 1 and num_gpus != int(num_gpus):
        # Ray schedules fractions of one GPU, or whole GPUs: 1.5 cannot be placed.
        problems.append(f"num_gpus: {num_gpus:g}; Ray takes a fraction below 1 or a whole number of GPUs "
                        "(e.g. 0.5 or 2)")
    return problems


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


def default_quarantine_path(output_path: str) -> str:
    return str(output_path).rstrip("/") + "_quarantine.jsonl"


def sidecar_path_for(output_path: str | Path) -> Path:
    return Path(str(output_path).rstrip("/") + "_scores.json")


# -- the recipe ------------------------------------------------------------------------------------


def run_score(cfg: ScoreConfig, run_dir: str | Path, ledger: ComputeLedger | None = None) -> ScoreResult:
    """Score `cfg.input_path` into Parquet shards at `cfg.output_path`; resumes a killed run."""
    start = time.time()
    # 1. Validate and load: everything a user can get wrong fails here, before any Ray work starts.
    inputs = load_inputs(cfg)
    # Then join Ray and place the actors: the dtype follows their device and is part of what resumes a run.
    placed = place_scorers(cfg)
    cfg = placed.cfg
    # 2. Set up the output: shards an earlier run with the same input and settings finished are kept.
    plan = plan_output(cfg, inputs)
    # 3. Run the scorers over the missing shards; each shard is written as soon as its last row is in.
    now = score_pending(cfg, inputs, plan, placed)
    # 4. Save: account for every row, and for what the output and this run cost.
    scored = read_scored(cfg, inputs, plan.output)
    flops_total, flops_now = charge_flops(cfg, inputs, scored, now)
    wall_s = time.time() - start
    result = score_result(cfg, inputs, plan, now, scored, flops_total, flops_now, wall_s)
    write_sidecar(cfg, inputs, result, now.proxy)
    # 5. Record what this run computed in the run's ledger.
    record_ledger(ledger or ComputeLedger(run_dir), cfg, result, now, flops_now, wall_s)
    log.info("scored %d rows (%d now, %d shards resumed; %d quarantined) in %.1fs",
             result.rows_scored, result.rows_scored_now, result.shards_resumed, result.rows_quarantined, wall_s)
    return result


# -- 1. validate and load --------------------------------------------------------------------------


@dataclass
class ScoreInputs:
    """The validated input of a scoring run."""

    model_path: str
    tokenizer: Callable[[], Any]  # the model's tokenizer, loaded on the first call
    rows_in: int
    rows: list[dict]  # the rows to score
    quarantined: list[dict]
    quarantine_path: str
    quarantine_reasons: dict[str, int]
    targets: list[list[str]]  # influence's target set: [prompt, response] pairs


def load_inputs(cfg: ScoreConfig) -> ScoreInputs:
    """Resolve the model, load and check the rows, quarantine the unusable ones (written at once,
    so the file is there to read even when every row fails)."""
    model_path = resolve_model(cfg.model, field="model")
    loaded = load_records(cfg.input_path, cfg.fields, max_chars=cfg.max_chars)
    targets = _load_targets(cfg) if "influence" in cfg.scorers else []
    if "pass_rate" in cfg.scorers and cfg.pass_rate.answer_column not in loaded.columns:
        raise ConfigError([
            (f"pass_rate.answer_column: column '{cfg.pass_rate.answer_column}' not in the dataset "
             f"(columns: {', '.join(loaded.columns)}); pass_rate needs each row's verifiable answer")
        ])
    # Loaded only when needed: importing transformers costs the driver ~10 s on 2 cores.
    tokenizer = functools.cache(functools.partial(load_tokenizer, model_path))
    rows, quarantined = loaded.rows, list(loaded.quarantined)
    if cfg.max_tokens is not None:
        rows, over = quarantine_over_length(rows, tokenizer(), cfg.max_tokens)
        quarantined += over
    reasons = _reason_counts(quarantined)
    quarantine_path = cfg.quarantine_path or default_quarantine_path(cfg.output_path)
    write_quarantine(sorted(quarantined, key=lambda q: q["source_index"]), quarantine_path)
    if not rows:
        raise ConfigError([
            (f"input_path: all {loaded.rows_in} rows of '{cfg.input_path}' were quarantined "
             f"({reasons}); see {quarantine_path} and check `fields`")
        ])
    return ScoreInputs(model_path=model_path, tokenizer=tokenizer, rows_in=loaded.rows_in, rows=rows,
                       quarantined=quarantined, quarantine_path=quarantine_path, quarantine_reasons=reasons,
                       targets=targets)


def _load_targets(cfg: ScoreConfig) -> list[list[str]]:
    inf = cfg.influence
    loaded = load_records(inf.target_path, inf.target_fields or cfg.fields, max_chars=cfg.max_chars,
                          path_field="influence.target_path", fields_prefix="influence.target_fields")
    if not loaded.rows:
        raise ConfigError([(f"influence.target_path: no usable rows in '{inf.target_path}' "
                           f"({loaded.reasons()}); check influence.target_fields")])
    return [[r["prompt"], r["response"]] for r in loaded.rows[: inf.max_target_rows]]


def quarantine_over_length(rows: list[dict], tokenizer, max_tokens: int) -> tuple[list[dict], list[dict]]:
    """(rows within `max_tokens` tokens, rows over it with a `too long` quarantine reason).

    Counts the tokens training would see (chat template + response + end-of-turn), untruncated."""
    kept, over = [], []
    for row in rows:
        n = len(tokenize_example(tokenizer, row["prompt"], row["response"], max_length=10**9)["input_ids"])
        if n > max_tokens:
            quarantined = {k: v for k, v in row.items() if k not in ("prompt", "response")}
            over.append({**quarantined, "quarantine_reason": f"too long: {n} tokens > max_tokens {max_tokens}"})
        else:
            kept.append(row)
    return kept, over


def _reason_counts(quarantined: list[dict]) -> dict[str, int]:
    """Quarantined rows by reason kind (the text before the first colon)."""
    counts: dict[str, int] = {}
    for q in quarantined:
        kind = q["quarantine_reason"].split(":", 1)[0]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


# -- 1b. place the actors --------------------------------------------------------------------------

# Scorers `RowScorer` runs a model for (pass_rate has its own vLLM actors, the others are text only).
ACTOR_MODEL_SCORERS = tuple(s for s in MODEL_SCORERS if s != "pass_rate")


@dataclass
class ScorerPlacements:
    """Where each part of a scoring run goes, and the config with its dtype resolved for that device."""

    cfg: ScoreConfig  # `dtype` resolved ("auto" never reaches an actor, the fingerprint or the sidecar)
    scorers: Placement  # the RowScorer actor pool
    pass_rate: Placement | None = None  # the PassRateScorer (vLLM) actor pool
    proxy: Placement | None = None  # the dynamics proxy fine-tune task


def scorer_placement(cfg: ScoreConfig, cluster: ClusterDevices) -> Placement:
    """CPU or GPU for the `num_actors` scoring actors (pure), or ConfigError naming the field.

    auto: GPUs when every actor can get `num_gpus` (running or from the autoscaler); CPU when no scorer
    runs a model (a GPU would sit idle) unless `num_gpus` or `accelerator` asks for one. `num_gpus`
    where no GPU can ever come is refused, naming it."""
    requested = cfg.device
    if requested == "auto" and cfg.num_gpus is None and not cfg.accelerator and not set(cfg.scorers) & set(ACTOR_MODEL_SCORERS):
        requested = "cpu"
    placement = resolve_placement(
        requested, count=cfg.num_actors, cluster=cluster, stage="score", gpus_per_worker=cfg.num_gpus or 1.0,
        cpus_per_worker=cfg.num_cpus_per_actor, accelerator=cfg.accelerator, count_field="num_actors",
    )
    if cfg.num_gpus is not None and not placement.use_gpu:
        raise ConfigError([(
            f"num_gpus: {cfg.num_gpus:g} GPU per scoring actor, but neither the Ray cluster nor its autoscaler can "
            f"give {cfg.num_actors} actor(s) that ({cluster.describe()}); drop num_gpus to score on CPU, lower "
            "num_actors, or add a GPU node type to the cluster config"
        )])
    return placement


def pass_rate_placement(cfg: ScoreConfig, cluster: ClusterDevices) -> Placement | None:
    """The pass-rate actors (one vLLM engine each, a whole GPU on GPU), or None without pass_rate (pure)."""
    if "pass_rate" not in cfg.scorers:
        return None
    s = cfg.pass_rate
    return resolve_placement(
        s.device, count=cfg.num_actors, cluster=cluster, stage="pass-rate",
        gpus_per_worker=1.0, cpus_per_worker=cfg.num_cpus_per_actor, accelerator=s.accelerator,
        device_field="pass_rate.device", count_field="num_actors",
    )


def proxy_placement(cfg: ScoreConfig, cluster: ClusterDevices) -> Placement | None:
    """The dynamics proxy fine-tune (one task, a whole GPU on GPU) from its TrainingSpec's device, or
    None without dynamics (pure)."""
    if "dynamics" not in cfg.scorers:
        return None
    spec = cfg.dynamics.proxy
    accelerator = spec.accelerator
    if spec.device == "cpu" and accelerator:
        raise ConfigError([(f"dynamics.proxy.accelerator: '{accelerator}' names a GPU but dynamics.proxy.device is "
                           "'cpu'; drop accelerator or set device to auto or cuda")])
    return resolve_placement(
        spec.device, count=1, cluster=cluster, stage="dynamics proxy",
        cpus_per_worker=cfg.num_cpus_per_actor, accelerator=accelerator, device_field="dynamics.proxy.device",
        count_field="num_cpus_per_actor",
    )


def scoring_dtype(cfg: ScoreConfig, placement: Placement) -> str:
    """The scorers' model dtype: an explicit one as given; auto follows the device the actors are placed
    on (bf16 on GPUs but pre-Ampere accelerator types, and on AVX512-BF16/AMX CPUs; else float32)."""
    return resolve_dtype(cfg.dtype, placement.device, fast_bf16=target_fast_bf16(placement))


def scorer_resources(placement: Placement) -> dict[str, Any]:
    """What one actor of a Ray Data pool (or the proxy task) asks for: `num_cpus`, plus `num_gpus` and
    `accelerator_type` on GPU (map_batches and ray.remote take the same keywords)."""
    return placement.remote_options()


def place_scorers(cfg: ScoreConfig, cluster: ClusterDevices | None = None) -> ScorerPlacements:
    """Join Ray and decide each part's device from the cluster and its autoscaler; log the decisions.

    Nothing waits for nodes here (`ray_utils.reserve_target` does, only when there is work to run)."""
    if cluster is None:
        init_ray()  # after every config and data check passed (a no-op when Ray is already up)
        cluster = cluster_devices()
    scorers = scorer_placement(cfg, cluster)
    dtype = scoring_dtype(cfg, scorers)
    placed = ScorerPlacements(cfg.model_copy(update={"dtype": dtype}), scorers, pass_rate_placement(cfg, cluster),
                              proxy_placement(cfg, cluster))
    log.info("%s (%s)", scorers.describe(dtype), scorers.why)
    if placed.pass_rate is not None:
        engine_dtype = cfg.pass_rate.engine_kwargs.get("dtype", "auto" if placed.pass_rate.use_gpu else None)
        log.info("%s (%s)", placed.pass_rate.describe(engine_dtype and f"vLLM dtype {engine_dtype}"),
                 placed.pass_rate.why)
    if placed.proxy is not None:
        proxy_dtype = resolve_dtype(cfg.dynamics.proxy.compute_dtype, placed.proxy.device,
                                    fast_bf16=target_fast_bf16(placed.proxy))
        log.info("%s (%s)", placed.proxy.describe(proxy_dtype), placed.proxy.why)
    return placed


# -- 2. set up the output --------------------------------------------------------------------------


@dataclass
class ShardPlan:
    output: Path
    shards: dict[int, list[dict]]  # shard index -> its rows
    pending: list[int]  # the shards this run scores; the others an earlier run finished
    schema: Any  # the pyarrow schema every shard is written with


def plan_output(cfg: ScoreConfig, inputs: ScoreInputs) -> ShardPlan:
    """Prepare the output directory (resuming a matching earlier run), add the duplicate columns,
    and split the rows into shards."""
    output = Path(cfg.output_path)
    done = prepare_output(output, score_fingerprint(cfg, inputs.model_path, inputs.rows), cfg.resume)
    if "duplicates" in cfg.scorers:
        # Ray Data would otherwise start (or join any) Ray by itself; join the configured cluster first.
        init_ray()
        add_duplicate_columns(inputs.rows, cfg.dedup)  # needs every row; cheap, so recomputed on a restart
    shards = plan_shards(inputs.rows, cfg.shard_rows)
    pending = [k for k in shards if k not in done]
    schema = output_schema(inputs.rows, cfg)
    log.info("scoring %d rows in %d shard(s), %d already done (%s) with %s on %d actor(s)", len(inputs.rows),
             len(shards), len(shards) - len(pending), ", ".join(cfg.scorers), cfg.model, cfg.num_actors)
    return ShardPlan(output=output, shards=shards, pending=pending, schema=schema)


def _minhash_batch(batch: dict, num_perm: int, ngram: int, seed: int) -> dict:
    return {"row": batch["row"], "signature": minhash_signatures(list(batch["text"]), num_perm, ngram, seed)}


def add_duplicate_columns(rows: list[dict], settings: DedupSettings) -> None:
    """Annotate rows in place with dup_* columns; MinHash signatures are a Ray Data map."""
    import numpy as np
    import ray

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
            fields.append(pa.field(name, getattr(pa, COLUMN_TYPES[name])()))
            have.add(name)
    return pa.schema(fields)


# -- 3. run the scorers ----------------------------------------------------------------------------


@dataclass
class ScoredNow:
    """What this run scored (resumed shards excluded), in the order the shards were written."""

    proxy: dict  # the dynamics proxy run: flops, tokens, losses, checkpoints, reused
    actors: int = 0  # scoring actors started
    n_tokens: list[int] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # pass_rate only, in the tables' order
    gen_tokens: list[int] = field(default_factory=list)  # pass_rate only, lined up with `prompts`


def score_pending(cfg: ScoreConfig, inputs: ScoreInputs, plan: ShardPlan, placed: ScorerPlacements) -> ScoredNow:
    """Train the dynamics proxy (or reuse its checkpoints), stream the pending shards' rows
    through the actor pools and write each shard as soon as it is complete."""
    if not plan.pending:
        return ScoredNow(proxy=_earlier_proxy(cfg, plan.output))
    init_ray()  # only now, after every check above passed (a no-op when Ray is already up)
    threads = cfg.torch_threads or max(1, (os.cpu_count() or 1) // cfg.num_actors)
    proxy = (_proxy_checkpoints(cfg, inputs.model_path, inputs.rows, threads, placed.proxy)
             if "dynamics" in cfg.scorers else _no_proxy())
    for placement in (placed.scorers, placed.pass_rate):
        if placement is not None:
            reserve_target(placement, timeout_s=cfg.capacity_timeout_s)
    now = ScoredNow(proxy=proxy, actors=min(cfg.num_actors, len(plan.pending)))
    ds = _scoring_dataset(cfg, inputs, plan, proxy, threads, placed)
    expected = {k: len(plan.shards[k]) for k in plan.pending}
    blocks = ds.iter_batches(batch_size=None, batch_format="pyarrow")
    for k, table in write_shards_as_finished(blocks, expected, plan.output, plan.schema):
        now.n_tokens += table.column("n_tokens").to_pylist()
        if "pass_rate" in cfg.scorers:  # in the table's order, so prompts and samples line up
            now.gen_tokens += table.column("pass_gen_tokens").to_pylist()
            now.prompts += table.column("prompt").to_pylist()
        now.rows += plan.shards[k]
    return now


def _no_proxy() -> dict:
    return {"flops": 0.0, "tokens": 0, "losses": [], "checkpoints": [], "reused": True}


def _earlier_proxy(cfg: ScoreConfig, output: Path) -> dict:
    """Nothing left to score: report the proxy an earlier run trained for this output, if any."""
    proxy = _no_proxy()
    record = dynamics_dir_for(output) / "proxy.json"
    if "dynamics" in cfg.scorers and record.is_file():
        proxy.update(json.loads(record.read_text()))
    return proxy


def _proxy_checkpoints(cfg: ScoreConfig, model_path: str, rows: list[dict], threads: int, placement: Placement) -> dict:
    """The dynamics proxy fine-tune's checkpoints: reused when a resumed run already saved them
    all (`prepare_output` clears them whenever it starts over), else trained now as one Ray task
    on `placement`'s device (charged to this run)."""
    import ray

    root = dynamics_dir_for(cfg.output_path)
    wanted = [checkpoint_dir(root, step) for step in cfg.dynamics.checkpoints]
    record = root / "proxy.json"
    if record.is_file() and all((d / "adapter_config.json").is_file() for d in wanted):
        log.info("dynamics: reusing proxy checkpoints in %s", root)
        return {**json.loads(record.read_text()), "checkpoints": [str(d) for d in wanted], "reused": True}
    shutil.rmtree(root, ignore_errors=True)
    train = [{"prompt": r["prompt"], "response": r["response"]} for r in rows]
    if cfg.dynamics.train_rows is not None and cfg.dynamics.train_rows < len(train):
        train = random.Random(cfg.dynamics.proxy.seed).sample(train, cfg.dynamics.train_rows)
    reserve_target(placement, timeout_s=cfg.capacity_timeout_s)
    task = ray.remote(**scorer_resources(placement))(proxy_finetune)
    out = ray.get(task.remote(model_path, train, cfg.dynamics.model_dump(), cfg.max_length, str(root), threads,
                              device=placement.device, placed_for=placement.ray_resources()))
    record.write_text(json.dumps({k: out[k] for k in ("flops", "tokens", "losses")}))
    return {**out, "reused": False}


def _scoring_dataset(cfg: ScoreConfig, inputs: ScoreInputs, plan: ShardPlan, proxy: dict, threads: int,
                     placed: ScorerPlacements):
    """The pending rows through `RowScorer`'s actor pool (and `PassRateScorer`'s, for pass_rate), each
    actor asking Ray for its placement's CPUs and GPUs."""
    import ray

    tokenizer = inputs.tokenizer() if set(cfg.scorers) & set(MODEL_SCORERS) else None
    ds = ray.data.from_items(pending_items(plan.shards, plan.pending, tokenizer, cfg.max_length)).map_batches(
        RowScorer,
        fn_constructor_kwargs={
            "model_path": inputs.model_path,
            "max_length": cfg.max_length,
            "dtype": cfg.dtype,
            "torch_threads": threads,
            "scorers": tuple(cfg.scorers),
            "grand": cfg.grand.model_dump(),
            "dynamics": {"checkpoints": proxy["checkpoints"], "chunk_tokens": cfg.dynamics.chunk_tokens},
            "influence": {"settings": cfg.influence.model_dump(mode="json"), "targets": inputs.targets},
            "answer_column": cfg.fields.answer,
            "device": placed.scorers.device,
            "placed_for": placed.scorers.ray_resources(),
        },
        concurrency=cfg.num_actors,
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        **scorer_resources(placed.scorers),
    )
    if placed.pass_rate is not None:
        # A second actor pool, each actor owning one vLLM engine, streaming after the first.
        ds = ds.map_batches(
            PassRateScorer,
            fn_constructor_kwargs={"model_path": inputs.model_path, "settings": cfg.pass_rate.model_dump(),
                                   "device": placed.pass_rate.device, "placed_for": placed.pass_rate.ray_resources()},
            concurrency=cfg.num_actors, batch_size=cfg.batch_size, batch_format="pyarrow",
            **scorer_resources(placed.pass_rate),
        )
    return ds


# -- 4. save ---------------------------------------------------------------------------------------


def read_scored(cfg: ScoreConfig, inputs: ScoreInputs, output: Path) -> dict[str, list]:
    """The columns the summary needs, read back from every shard; fails unless every row of the
    input was either scored or quarantined."""
    import pyarrow.parquet as pq

    wanted = ["n_tokens", "n_loss_tokens"] + (["perplexity"] if "perplexity" in cfg.scorers else [])
    wanted += ["pass_gen_tokens", "prompt"] if "pass_rate" in cfg.scorers else []
    scored = pq.read_table(output, columns=wanted).to_pydict()
    if len(scored["n_tokens"]) + len(inputs.quarantined) != inputs.rows_in:
        raise RuntimeError(
            f"row accounting: read {inputs.rows_in} rows but scored {len(scored['n_tokens'])} + quarantined "
            f"{len(inputs.quarantined)}; '{output}' is incomplete"
        )
    return scored


def charge_flops(
    cfg: ScoreConfig, inputs: ScoreInputs, scored: dict[str, list], now: ScoredNow,
) -> tuple[dict[str, float], dict[str, float]]:
    """FLOPs per scorer of (the whole output, this run). The output's cost: every row scored once,
    the proxy trained once, the target set once per actor; this run's: the rows it scored, the
    proxy if it trained it, the target set once per actor it started."""
    shape = model_shape(inputs.model_path)
    flops_now = scored_rows_flops(
        cfg, shape, inputs.tokenizer, now.n_tokens, now.rows, now.prompts, now.gen_tokens,
        proxy_flops=0.0 if now.proxy["reused"] else float(now.proxy["flops"]), targets=inputs.targets,
        actors=now.actors,
    )
    flops_total = scored_rows_flops(
        cfg, shape, inputs.tokenizer, scored["n_tokens"], inputs.rows, scored.get("prompt", []),
        scored.get("pass_gen_tokens"), proxy_flops=float(now.proxy["flops"]), targets=inputs.targets,
        actors=max(1, cfg.num_actors),
    )
    return flops_total, flops_now


def score_result(
    cfg: ScoreConfig, inputs: ScoreInputs, plan: ShardPlan, now: ScoredNow, scored: dict[str, list],
    flops_by_scorer: dict[str, float], flops_now_by_scorer: dict[str, float], wall_s: float,
) -> ScoreResult:
    n_tokens = scored["n_tokens"]
    perplexities = (
        sorted(p for p, n in zip(scored["perplexity"], scored["n_loss_tokens"]) if n) if "perplexity" in cfg.scorers else []
    )
    return ScoreResult(
        rows_in=inputs.rows_in,
        rows_scored=len(n_tokens),
        rows_quarantined=len(inputs.quarantined),
        rows_unscorable=sum(1 for n in scored["n_loss_tokens"] if n == 0),
        output_path=str(plan.output),
        quarantine_path=str(inputs.quarantine_path),
        tokens=int(sum(n_tokens)),
        loss_tokens=int(sum(scored["n_loss_tokens"])),
        flops=float(sum(flops_by_scorer.values())),
        wall_s=round(wall_s, 3),
        tokens_per_s=round(sum(now.n_tokens) / wall_s, 1) if wall_s > 0 else 0.0,
        median_perplexity=perplexities[len(perplexities) // 2] if perplexities else None,
        quarantine_reasons=inputs.quarantine_reasons,
        scorers=list(cfg.scorers),
        flops_by_scorer=flops_by_scorer,
        sidecar_path=str(sidecar_path_for(plan.output)),
        shards=len(plan.shards),
        shards_resumed=len(plan.shards) - len(plan.pending),
        rows_scored_now=len(now.n_tokens),
        flops_now=float(sum(flops_now_by_scorer.values())),
    )


def _scorer_settings(cfg: ScoreConfig, name: str) -> dict:
    if name == "grand":
        return cfg.grand.model_dump()
    if name == "duplicates":
        return cfg.dedup.model_dump()
    if name == "heuristics":
        return {}
    if name == "verifier":
        return {"answer_column": cfg.fields.answer, "extract": "answers.extract_answer"}
    if name == "dynamics":
        return {**cfg.dynamics.model_dump(), "max_length": cfg.max_length, "dtype": cfg.dtype}
    if name == "influence":
        return {**cfg.influence.model_dump(mode="json"), "max_length": cfg.max_length, "dtype": cfg.dtype}
    if name == "pass_rate":
        return cfg.pass_rate.model_dump(mode="json")
    return {"max_length": cfg.max_length, "dtype": cfg.dtype}


def write_sidecar(cfg: ScoreConfig, inputs: ScoreInputs, result: ScoreResult, proxy: dict) -> None:
    """`<output_path>_scores.json`: each scorer's columns, model, settings and FLOPs over the whole output."""
    scorers_meta = {
        name: {
            "columns": list(SCORER_COLUMNS[name]),
            "model": cfg.model if name in MODEL_SCORERS else None,
            "model_path": inputs.model_path if name in MODEL_SCORERS else None,
            "settings": _scorer_settings(cfg, name),
            "flops": result.flops_by_scorer[name],
        }
        for name in cfg.scorers
    }
    if "dynamics" in cfg.scorers:
        scorers_meta["dynamics"]["proxy"] = {
            "flops": float(proxy["flops"]), "steps": cfg.dynamics.checkpoints,
            "checkpoints": [f"step-{step:05d}" for step in cfg.dynamics.checkpoints],
            "losses": proxy["losses"], "trained_now": not proxy["reused"],
            "checkpoint_dir": str(dynamics_dir_for(result.output_path)),
        }
    if "influence" in cfg.scorers:
        scorers_meta["influence"]["target_rows"] = len(inputs.targets)
    sidecar = {
        "output_path": result.output_path,
        "quarantine_path": result.quarantine_path,
        "rows_in": result.rows_in,
        "rows_scored": result.rows_scored,
        "rows_quarantined": result.rows_quarantined,
        "quarantine_reasons": result.quarantine_reasons,
        "tokenizer": inputs.model_path,
        "scorers": scorers_meta,
        "columns": {col: name for name in cfg.scorers for col in SCORER_COLUMNS[name]},
        "flops": result.flops,
        "proxy_flops": float(proxy["flops"]),
        "shards": result.shards,
        "shard_rows": cfg.shard_rows,
        "wall_s": result.wall_s,
    }
    sidecar_path_for(result.output_path).write_text(json.dumps(sidecar, indent=1))


# -- 5. record -------------------------------------------------------------------------------------


def record_ledger(
    ledger: ComputeLedger, cfg: ScoreConfig, result: ScoreResult, now: ScoredNow, flops_now_by_scorer: dict[str, float],
    wall_s: float,
) -> None:
    """The ledger entry: what this run computed (resumed shards are not charged again)."""
    ledger.record(
        "score",
        flops=result.flops_now,
        tokens=int(sum(now.n_tokens)),
        wall_s=wall_s,
        produced={"output_path": result.output_path, "quarantine_path": result.quarantine_path},
        model=cfg.model,
        rows_in=result.rows_in,
        rows_scored=result.rows_scored,
        rows_scored_now=result.rows_scored_now,
        rows_quarantined=result.rows_quarantined,
        shards=result.shards,
        shards_resumed=result.shards_resumed,
        scorers={name: {"flops": flops_now_by_scorer[name], "settings": _scorer_settings(cfg, name)} for name in cfg.scorers},
    )
