"""`strategy: auto`: pick the selection strategy by a small proxy experiment under the real budget.

Which rows are "good" depends on the budget (Sorscher 2022: keep easy rows when little
can be kept, hard ones when much can), so no fixed rule is right. Instead, for each
candidate strategy (default: keep-easy = lowest perplexity, keep-hard = highest, the
middle band, stratified, random):

1. select under the same budget the user set (`select_rows`, same filters and dedup);
2. fine-tune a fresh LoRA on that subset for `proxy.max_steps` steps with the project's own
   training loop (`frugalray.train.loop.TrainingSession` on the one `auto.proxy` TrainingSpec,
   in process, same seed, same batch size, so every candidate gets the same number of steps);
3. evaluate on one held-out set: response loss, or exact-match accuracy of greedy answers
   for verifiable rows (an `answer` column).

The candidate with the best held-out metric wins (ties: the earlier candidate). Every FLOP
spent (training, evaluation, generation; `frugalray.budget.flops`) is returned so that
`select` records it in the ledger. The held-out set is `eval_path` when given (a clean set
of the task the user cares about, as LESS uses) or else `eval_rows` rows of the input drawn
at random (seeded) and kept out of every candidate's proxy training.

This is one seed of a tiny fine-tune: a small gap between candidates can be noise, and
the report says how large the gap is next to the untrained model's metric.

Where it runs (`auto_proxy_target`, from `auto.proxy.device`): in this process on its CPU for
`cpu`, as always; when the Ray cluster is known (Ray already up, as in a pipeline after `score`,
or joined for `device: cuda`) and gives a GPU, the whole experiment runs as one Ray task asking
for one GPU (`accelerator_type` when `auto.proxy.accelerator` names one), which checks CUDA is
there before training; with Ray not started, `auto` uses this process's GPU if it has one.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import Field, model_validator

from frugalray.budget.flops import forward_flops_per_token
from frugalray.config import ConfigError, StrictModel
from frugalray.data.ranking import select_rows
from frugalray.devices import (
    ClusterDevices,
    LocalDevices,
    Placement,
    cluster_devices,
    local_devices,
    require_cuda,
    resolve_dtype,
    resolve_placement,
    target_fast_bf16,
)
from frugalray.examples.answers import is_correct
from frugalray.examples.formatting import chat_prompt_text
from frugalray.examples.loaders import FieldMapping, _columns, load_records, read_rows
from frugalray.models import DEFAULT_MODEL, resolve_model
from frugalray.ray_utils import init_ray
from frugalray.train.loop import TrainingSession
from frugalray.train.spec import TrainingSpec, refuse_flat_training_keys

log = logging.getLogger(__name__)

CandidateStrategy = Literal["lowest", "highest", "random", "middle", "stratified", "weighted"]


class AutoCandidate(StrictModel):
    name: str | None = Field(default=None, description="label in the report; default: '<strategy> <score>'")
    strategy: CandidateStrategy
    score: str = "perplexity"
    weights: dict[str, float] | None = None

    def label(self) -> str:
        if self.name:
            return self.name
        if self.strategy == "random":
            return "random"
        if self.strategy == "weighted":
            return "weighted " + "+".join(f"{w:g}*{c}" for c, w in (self.weights or {}).items())
        return f"{self.strategy} {self.score}"


def _default_candidates() -> list[AutoCandidate]:
    return [
        AutoCandidate(name="keep-easy", strategy="lowest", score="perplexity"),
        AutoCandidate(name="keep-hard", strategy="highest", score="perplexity"),
        AutoCandidate(name="middle", strategy="middle", score="perplexity"),
        AutoCandidate(name="stratified", strategy="stratified", score="perplexity"),
        AutoCandidate(name="random", strategy="random"),
    ]


class AutoProxySpec(TrainingSpec):
    """Each candidate's proxy fine-tune: a `TrainingSpec` with the proxy's defaults (rank-8 LoRA on
    every linear, lr 1e-3, 4 steps of batch 4 at 128 tokens)."""

    method: Literal["lora", "qlora"] = Field(default="lora", description="lora: fp32, the fastest on a CPU")
    learning_rate: float = Field(1e-3, gt=0)
    max_steps: int = Field(4, ge=1, description="optimizer steps per candidate")


class AutoSettings(StrictModel):
    candidates: list[AutoCandidate] = Field(default_factory=_default_candidates, min_length=1)
    model: str | None = Field(default=None, description="model of the proxy fine-tunes; default: the default model")
    # Its seed also draws the held-out rows when eval_path is not given.
    proxy: AutoProxySpec = Field(default_factory=AutoProxySpec)
    eval_path: str | None = Field(default=None, description="held-out rows (.jsonl/.json/.parquet); default: sample the input")
    eval_rows: int = Field(default=16, ge=1, description="held-out rows evaluated")
    metric: Literal["loss", "accuracy"] = Field(
        default="loss", description="loss: held-out response NLL; accuracy: greedy exact match (needs an answer column)"
    )
    max_new_tokens: int = Field(default=8, ge=1, description="accuracy: tokens generated per held-out row")

    @model_validator(mode="before")
    @classmethod
    def _training_keys_moved(cls, data: Any) -> Any:
        return refuse_flat_training_keys(data, "auto", renamed={"proxy_steps": "max_steps"})


@dataclass
class CandidateResult:
    name: str
    strategy: str
    score: str | None
    kept: int
    kept_tokens: int
    train_rows: int
    steps: int = 0
    train_tokens: int = 0
    train_flops: float = 0.0
    eval_flops: float = 0.0
    eval_loss: float | None = None
    accuracy: float | None = None
    wall_s: float = 0.0
    skipped: str | None = None  # why a candidate could not run

    def metric(self, kind: str) -> float | None:
        return self.eval_loss if kind == "loss" else self.accuracy


@dataclass
class AutoOutcome:
    winner: AutoCandidate
    metric: str
    table: list[CandidateResult]
    untrained_eval_loss: float | None
    untrained_accuracy: float | None
    flops: float
    why: str
    heldout_rows: int
    heldout_source: str
    wall_s: float = 0.0
    proxy_over_one_epoch: float | None = None  # the proxy's FLOPs / one epoch of training on the winner's rows
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "winner": self.winner.label(),
            "winner_strategy": self.winner.strategy,
            "winner_score": self.winner.score,
            "metric": self.metric,
            "why": self.why,
            "untrained_eval_loss": self.untrained_eval_loss,
            "untrained_accuracy": self.untrained_accuracy,
            "flops": self.flops,
            "heldout_rows": self.heldout_rows,
            "heldout_source": self.heldout_source,
            "wall_s": round(self.wall_s, 2),
            "proxy_over_one_epoch": self.proxy_over_one_epoch,
            "candidates": [asdict(c) for c in self.table],
        }


def one_epoch_flops(result: CandidateResult) -> float | None:
    """Estimated FLOPs of one training epoch over a candidate's kept rows, at the training cost per
    token its proxy fine-tune measured (None when it did not train)."""
    if result.skipped or result.train_tokens <= 0 or result.train_flops <= 0:
        return None
    return result.kept_tokens * result.train_flops / result.train_tokens


def choose_winner(results: list[CandidateResult], metric: str) -> tuple[int, str]:
    """(index of the winning candidate, one sentence on why). Pure: lower loss / higher accuracy wins."""
    scored = [(i, r.metric(metric)) for i, r in enumerate(results) if r.metric(metric) is not None and math.isfinite(r.metric(metric))]
    if not scored:
        raise RuntimeError("strategy auto: no candidate produced a held-out metric; see the candidates' skip reasons")
    better = (lambda v: v) if metric == "loss" else (lambda v: -v)
    ranked = sorted(scored, key=lambda iv: (better(iv[1]), iv[0]))
    best_i, best_v = ranked[0]
    name = "held-out loss" if metric == "loss" else "held-out accuracy"
    why = f"{results[best_i].name} has the best {name} ({best_v:.4g})"
    if len(ranked) > 1:
        second_i, second_v = ranked[1]
        why += f"; runner-up {results[second_i].name} {second_v:.4g} (gap {abs(best_v - second_v):.3g})"
    rand = next((v for i, v in scored if results[i].strategy == "random"), None)
    if rand is not None and results[best_i].strategy != "random":
        why += f"; random {rand:.4g}"
    return best_i, why


def _heldout(rows: list[dict], settings: AutoSettings) -> tuple[list[dict], set[int], str]:
    """(held-out rows, input row indices kept out of proxy training, where they came from)."""
    if settings.eval_path:

        columns = _columns(read_rows(settings.eval_path, "auto.eval_path")[:64])
        fields = FieldMapping.prompt_response() if "prompt" in columns else FieldMapping()
        loaded = load_records(settings.eval_path, fields, path_field="auto.eval_path", fields_prefix="auto.fields")
        return loaded.rows[: settings.eval_rows], set(), settings.eval_path
    usable = [i for i, r in enumerate(rows) if r.get("prompt") is not None and r.get("response")]
    seed = settings.proxy.seed
    picked = random.Random(seed).sample(usable, min(settings.eval_rows, max(0, len(usable) - 1)))
    return [rows[i] for i in picked], set(picked), f"{len(picked)} input rows drawn at random (seed {seed})"


def _accuracy(session, rows: list[dict], max_new_tokens: int) -> tuple[float | None, float]:
    """Greedy exact-match accuracy on rows with an `answer`, and the FLOPs it cost."""
    import torch


    checkable = [r for r in rows if r.get("answer") not in (None, "")]
    if not checkable:
        return None, 0.0
    tok = session.tokenizer
    model = session.model
    model.eval()
    correct, flops = 0, 0.0
    with torch.no_grad():
        for row in checkable:
            ids = tok(chat_prompt_text(tok, row["prompt"]), add_special_tokens=False, return_tensors="pt")["input_ids"]
            ids = ids.to(session.device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
            new = out[0, ids.shape[1]:]
            total = int(out.shape[1])
            flops += forward_flops_per_token(session.shape, total, session.lora_params) * total
            correct += is_correct(tok.decode(new, skip_special_tokens=True), row)
    return correct / len(checkable), flops


def auto_proxy_target(spec: TrainingSpec, cluster: ClusterDevices | None,
                      here: LocalDevices | None = None) -> tuple[str, Placement | None]:
    """(device, placement) of the proxy experiment (pure): a placement means one Ray task with its
    resources; None means this process, on `device`.

    `cluster`: the Ray cluster and its autoscaler's node types, None when Ray is not up (then `auto`
    decides from this process, `here`). Raises ConfigError naming auto.proxy.* for a GPU that cannot come."""
    accelerator = spec.accelerator
    if spec.device == "cpu":
        if accelerator:
            raise ConfigError([(f"auto.proxy.accelerator: '{accelerator}' names a GPU but auto.proxy.device is 'cpu'; "
                               "drop accelerator or set device to auto or cuda")])
        return "cpu", None
    requested = "cuda" if accelerator else spec.device  # a named accelerator asks for a GPU
    if cluster is None:
        if requested == "cuda":  # the caller joins the cluster first; this is a programming error
            raise ValueError("auto_proxy_target: a GPU request needs the cluster")
        return ("cuda" if here is not None and here.cuda else "cpu"), None
    placement = resolve_placement(spec.device, count=1, cluster=cluster, stage="auto-select proxy",
                                  accelerator=accelerator, field_prefix="auto.proxy.",
                                  count_field="device")
    return placement.device, placement if placement.use_gpu else None


def _ray_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def run_auto_proxy(rows: list[dict[str, Any]], settings: AutoSettings, select_kwargs: dict[str, Any]) -> AutoOutcome:
    """Select with every candidate under the same budget, proxy-train on each subset, pick the best.

    `select_kwargs` are `select_rows`' budget, filter and dedup arguments (everything but
    score / strategy / weights), so every candidate faces the budget the final selection will.
    Runs here, or as one Ray task on a GPU (`auto_proxy_target`).
    """
    spec = settings.proxy
    cluster = None
    if spec.device == "cuda" or (spec.device == "auto" and (spec.accelerator or _ray_up())):
        init_ray()  # a no-op when Ray is up
        cluster = cluster_devices()
    device, placement = auto_proxy_target(spec, cluster, None if cluster is not None or spec.device == "cpu"
                                          else local_devices())
    if placement is None:
        log.info("auto-select proxy: in this process on %s", device.upper())
        if device == "cuda":
            require_cuda("auto-select proxy")
        return _run_auto_proxy(rows, settings, select_kwargs, device)
    import ray

    dtype = resolve_dtype(spec.compute_dtype, placement.device, fast_bf16=target_fast_bf16(placement))
    log.info("%s (%s)", placement.describe(dtype), placement.why)
    task = ray.remote(**placement.remote_options())(_auto_proxy_task)
    return ray.get(task.remote(rows, settings.model_dump(mode="json"), select_kwargs, placement.ray_resources()))


def _auto_proxy_task(rows: list[dict[str, Any]], settings: dict, select_kwargs: dict[str, Any],
                     placed_for: dict[str, float]) -> AutoOutcome:
    """The proxy experiment on the GPU this Ray task was placed for."""
    require_cuda("auto-select proxy", placed_for=placed_for)
    return _run_auto_proxy(rows, AutoSettings.model_validate(settings), select_kwargs, "cuda")


def _run_auto_proxy(rows: list[dict[str, Any]], settings: AutoSettings, select_kwargs: dict[str, Any],
                    device: str) -> AutoOutcome:
    from tqdm import tqdm


    started = time.time()
    model_path = resolve_model(settings.model or DEFAULT_MODEL, field="auto.model")
    heldout, held_idx, source = _heldout(rows, settings)
    if not heldout:
        raise RuntimeError("strategy auto: no held-out rows to compare candidates on; set auto.eval_path")
    held_ids = {id(rows[i]) for i in held_idx}
    spec = settings.proxy
    eval_rows = [{"prompt": r["prompt"], "response": r["response"]} for r in heldout]
    columns = {c for r in rows[:1000] for c in r}
    results: list[CandidateResult] = []
    total_flops = 0.0
    untrained_loss = untrained_acc = None
    for candidate in tqdm(settings.candidates, desc="auto: proxy fine-tunes"):
        t0 = time.time()
        needed = list(candidate.weights or {}) if candidate.strategy == "weighted" else (
            [] if candidate.strategy == "random" else [candidate.score])
        missing = [c for c in needed if c not in columns]
        name = candidate.label()
        if missing:
            results.append(CandidateResult(name, candidate.strategy, candidate.score, 0, 0, 0,
                                           skipped=f"column(s) {missing} not in the scored data"))
            continue
        sel = select_rows(rows, score=candidate.score, strategy=candidate.strategy, weights=candidate.weights,
                          **select_kwargs)
        train = [{"prompt": r["prompt"], "response": r["response"]} for r in sel.kept if id(r) not in held_ids]
        result = CandidateResult(name, candidate.strategy, None if candidate.strategy == "random" else candidate.score,
                                 len(sel.kept), sel.kept_tokens, len(train))
        if not train:
            result.skipped = "the budget keeps no row for this candidate"
            results.append(result)
            continue
        try:
            session = TrainingSession(spec, model_path, train, eval_rows, device=device if device != "cpu" else None)
        except ValueError as err:  # e.g. every response beyond seq_len
            result.skipped = str(err)
            results.append(result)
            continue
        if untrained_loss is None:  # the common starting point, measured once
            before = session.evaluate()
            if before is not None:
                untrained_loss = before.loss
                total_flops += before.flops
            if settings.metric == "accuracy":
                untrained_acc, gen_flops = _accuracy(session, heldout, settings.max_new_tokens)
                total_flops += gen_flops
        for _ in range(spec.max_steps):
            stats = session.step()
            result.steps += 1
            result.train_tokens += stats.tokens
            result.train_flops += stats.flops
        after = session.evaluate()
        if after is not None:
            result.eval_loss = after.loss
            result.eval_flops += after.flops
        if settings.metric == "accuracy":
            result.accuracy, gen_flops = _accuracy(session, heldout, settings.max_new_tokens)
            result.eval_flops += gen_flops
        result.wall_s = round(time.time() - t0, 2)
        total_flops += result.train_flops + result.eval_flops
        results.append(result)
        log.info("auto candidate %s: kept %d rows, eval loss %s, accuracy %s", name, result.kept,
                 result.eval_loss, result.accuracy)
        del session
    best, why = choose_winner(results, settings.metric)
    winner = settings.candidates[best]
    reference = untrained_loss if settings.metric == "loss" else untrained_acc
    if reference is not None:
        why += f"; untrained model {reference:.4g}"
    why += f" ({spec.max_steps} proxy steps x batch {spec.batch_size} per candidate, one seed)"
    # The proxy is paid out of the same compute as the training it selects for: say what it cost in
    # those units. In bench/data_downstream.py (5 candidates x 12 steps) it cost 1.5x training on all rows.
    epoch = one_epoch_flops(results[best])
    ratio = total_flops / epoch if epoch else None
    if ratio is not None:
        why += f"; the proxy cost {ratio:.2g}x one training epoch on the kept rows"
        if ratio > 1:
            log.warning("strategy auto: the proxy experiment cost %.2gx one training epoch on the rows it kept; "
                        "lower auto.proxy.max_steps or the number of candidates, or use a fixed strategy", ratio)
    return AutoOutcome(
        winner=winner, metric=settings.metric, table=results, untrained_eval_loss=untrained_loss,
        untrained_accuracy=untrained_acc, flops=total_flops, why=why, heldout_rows=len(heldout),
        heldout_source=source, wall_s=time.time() - started, proxy_over_one_epoch=ratio,
    )
