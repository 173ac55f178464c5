"""The selection report: counts, removal reasons with example rows, histograms, Markdown.

`select` builds the report dict here (`selection_report`), adds its budget and auto
figures, and writes it as JSON, as Markdown (`markdown_report`) and as one PNG histogram
per score column (`write_histograms`: all rows vs kept).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Protocol

from frugalray.data.ranking import Selection, is_finite_number

# Numeric columns `score` may write; the report draws a histogram of each one present.
HISTOGRAM_COLUMNS = (
    "perplexity", "mean_nll", "ifd", "grand", "n_tokens", "garbage_ratio", "repetition_ratio", "response_chars",
)


class SelectionSettings(Protocol):
    """The settings a report records, read-only (`SelectConfig` has them): the report needs no config import."""

    @property
    def score(self) -> str: ...
    @property
    def strategy(self) -> str: ...
    @property
    def keep_fraction(self) -> float | None: ...
    @property
    def token_budget(self) -> int | None: ...
    @property
    def dedup(self) -> bool: ...
    @property
    def drop_degenerate(self) -> bool: ...
    @property
    def max_garbage_ratio(self) -> float | None: ...
    @property
    def drop_wrong_answer(self) -> bool: ...
    @property
    def weights(self) -> dict[str, float] | None: ...
    @property
    def curriculum(self) -> str | None: ...


def _score_range(rows: list[dict], score: str) -> dict[str, float | None]:
    values = [r[score] for r in rows if is_finite_number(r.get(score))]
    return {"min": min(values) if values else None, "max": max(values) if values else None}


def _drop_examples(selection: Selection, scores: list[str], per_reason: int = 3) -> dict[str, list[dict]]:
    examples: dict[str, list[dict]] = {}
    for row, reason in zip(selection.dropped, selection.drop_reasons or []):
        bucket = examples.setdefault(reason, [])
        if len(bucket) < per_reason:
            shown = {"id": row.get("id"), "prompt": str(row.get("prompt", ""))[:200], "response": str(row.get("response", ""))[:200]}
            shown.update({s: row.get(s) for s in dict.fromkeys([*scores, "dup_cluster", "noise_kind"]) if s in row})
            bucket.append(shown)
    return examples


def write_histograms(rows: list[dict], kept: list[dict], columns: list[str], stem: Path) -> list[str]:
    """One PNG per numeric score column: every scored row vs the kept ones."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    paths = []
    for column in columns:
        values = [r[column] for r in rows if is_finite_number(r.get(column))]
        if not values:
            continue
        kept_values = [r[column] for r in kept if is_finite_number(r.get(column))]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        bins = min(40, max(5, len(set(values))))
        ax.hist(values, bins=bins, alpha=0.5, label=f"all ({len(values)})")
        ax.hist(kept_values, bins=bins, range=(min(values), max(values)), alpha=0.7, label=f"kept ({len(kept_values)})")
        ax.set_xlabel(column)
        ax.set_ylabel("rows")
        ax.legend()
        fig.tight_layout()
        path = stem.parent / f"{stem.name}_hist_{column}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(str(path))
    return paths


def selection_report(
    rows: list[dict], selection: Selection, cfg: SelectionSettings, strategy: str | None = None, score: str | None = None,
    weights: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The report dict: counts, settings, score ranges, removal reasons with examples, labelled noise.

    `strategy`, `score` and `weights` are the ones used (auto: the winner's); `cfg` holds the configured ones.
    """
    score = score or cfg.score
    weights = weights if weights is not None else cfg.weights
    report: dict[str, Any] = {
        "rows_in": len(rows),
        "kept": len(selection.kept),
        "dropped": len(selection.dropped),
        "unscored_dropped": selection.unscored,
        "kept_tokens": selection.kept_tokens,
        "score": score,
        "strategy": strategy or cfg.strategy,
        "configured_strategy": cfg.strategy,
        "keep_fraction": cfg.keep_fraction,
        "token_budget": cfg.token_budget,
        "kept_score": _score_range(selection.kept, score),
        "dropped_score": _score_range(selection.dropped, score),
        "dedup": cfg.dedup,
        "drop_degenerate": cfg.drop_degenerate,
        "max_garbage_ratio": cfg.max_garbage_ratio,
        "drop_wrong_answer": cfg.drop_wrong_answer,
        "weights": weights,
        "curriculum": cfg.curriculum,
        "drop_reasons": selection.reason_counts(),
        "drop_examples": _drop_examples(
            selection, [score, *(weights or {}), "garbage_ratio", "degenerate_reason", "answer_correct", "n_tokens"]
        ),
    }
    if any("noise_kind" in r for r in rows):
        total = Counter(r.get("noise_kind", "none") for r in rows)
        dropped = Counter(r.get("noise_kind", "none") for r in selection.dropped)
        report["noise"] = {
            kind: {"in": total[kind], "dropped": dropped.get(kind, 0), "kept": total[kind] - dropped.get(kind, 0)}
            for kind in sorted(total)
        }
        noisy_in = sum(n for k, n in total.items() if k != "none")
        noisy_dropped = sum(n for k, n in dropped.items() if k != "none")
        report["noisy_dropped_fraction"] = noisy_dropped / noisy_in if noisy_in else None
    return report


def _md_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def markdown_report(report: dict[str, Any]) -> str:
    """The report as Markdown: counts, budgets, removal reasons with example rows, auto's table."""
    lines = [f"# Selection report: {report['strategy']} {report['score'] if report['strategy'] != 'random' else ''}", ""]
    source = report.get("source_rows_in")
    lines += [
        (f"- rows in: {source if source is not None else report['rows_in']}"
         f" = kept {report['kept']} + dropped {report['dropped']} + quarantined {report.get('quarantined', 0)}"),
        f"- kept tokens: {report['kept_tokens']}",
    ]
    for key in ("keep_fraction", "token_budget", "token_limit", "flop_budget", "train_flops"):
        if report.get(key) is not None:
            lines.append(f"- {key}: {_md_cell(report[key])}")
    lines += ["", "## Removed, and why", "", "| reason | rows |", "|---|---|"]
    lines += [f"| {reason} | {n} |" for reason, n in sorted(report["drop_reasons"].items())]
    for reason, examples in report["drop_examples"].items():
        lines += ["", f"### {reason}: examples", ""]
        columns = list(dict.fromkeys(k for ex in examples for k in ex))
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_md_cell(ex.get(c))[:80] for c in columns) + " |" for ex in examples]
    if "noise" in report:
        lines += ["", "## Labelled noise", "", "| noise kind | in | dropped | kept |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['in']} | {v['dropped']} | {v['kept']} |" for k, v in report["noise"].items()]
    auto = report.get("auto")
    if auto:
        lines += ["", "## strategy: auto", "", f"Winner: **{auto['winner']}**. {auto['why']}.", "",
                  f"Held-out: {auto['heldout_source']} ({auto['heldout_rows']} rows); proxy FLOPs {auto['flops']:.3e}.", "",
                  "| candidate | kept | kept tokens | steps | train FLOPs | eval loss | accuracy | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in auto["candidates"]:
            lines.append(
                f"| {c['name']} | {c['kept']} | {c['kept_tokens']} | {c['steps']} | {c['train_flops']:.3e} | "
                f"{_md_cell(c['eval_loss'])} | {_md_cell(c['accuracy'])} | {c['skipped'] or ''} |"
            )
    if report.get("histograms"):
        lines += ["", "## Histograms (all rows vs kept)", ""]
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in report["histograms"]]
    return "\n".join(lines) + "\n"
