"""Scoring for the data benchmarks that measure selection quality, not scoring speed.

`score_in_process` computes the same columns as the Ray Data scoring job
(`frugalray.data.score.run_score`) with the same operator class (`RowScorer`) and the same
duplicate clustering (`signals.duplicate_clusters`), in this process: these benchmarks then
run even where a Ray cluster cannot start (on this shared 2-core machine, under a load of
30+, the raylet repeatedly missed its fixed startup wait, ray-project/ray#65983). Scoring
throughput on Ray Data is measured by bench/data_throughput.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def score_in_process(input_path: Path, output_dir: Path, scorers: tuple[str, ...] = ("perplexity", "heuristics"),
                     dedup_threshold: float | None = 0.5, batch_size: int = 32, max_length: int = 128,
                     answer_column: str | None = "answer") -> dict:
    """Score `input_path` into `output_dir` (one Parquet file + the sidecar). The `verifier`
    scorer reads each row's reference answer from `answer_column` (`fields.answer` of the job)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from frugalray.examples.loaders import FieldMapping, load_records
    from frugalray.data.scoring_actor import RowScorer
    from frugalray.data.signals import duplicate_clusters, example_text
    from frugalray.models import DEFAULT_MODEL, resolve_model

    started = time.time()
    verify = "verifier" in scorers
    loaded = load_records(input_path, FieldMapping(answer=answer_column if verify else None))
    rows = loaded.rows
    scorer = RowScorer(resolve_model(DEFAULT_MODEL), max_length, torch_threads=os.cpu_count(), scorers=scorers,
                       answer_column=answer_column)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt"]) + len(rows[i]["response"]))
    for start in tqdm(range(0, len(order), batch_size), desc="scoring"):
        idx = order[start : start + batch_size]
        answers = [rows[i].get(answer_column) for i in idx] if verify else None
        out = scorer.score([rows[i]["prompt"] for i in idx], [rows[i]["response"] for i in idx], answers)
        for column, values in out.items():
            for i, v in zip(idx, values):
                rows[i][column] = v
    if dedup_threshold is not None:
        infos = duplicate_clusters([example_text(r["prompt"], r["response"]) for r in rows], dedup_threshold)
        for row, info in zip(rows, infos):
            row.update(info.as_dict())
            row["dup_cluster"] = int(rows[info.dup_cluster]["source_index"])
    output_dir.mkdir(parents=True, exist_ok=True)
    for row in rows:
        row.pop("messages", None)  # nested and unused by selection
    pq.write_table(pa.Table.from_pylist(rows), output_dir / "part-00000.parquet")
    # The sidecar `select` checks its row accounting against (rows_in = kept + dropped + quarantined).
    Path(str(output_dir) + "_scores.json").write_text(json.dumps(
        {"rows_in": loaded.rows_in, "rows_quarantined": len(loaded.quarantined), "scorers": list(scorers)}))
    return {"rows_in": loaded.rows_in, "rows_scored": len(rows), "rows_quarantined": len(loaded.quarantined),
            "quarantine_reasons": loaded.reasons(), "wall_s": time.time() - started}
