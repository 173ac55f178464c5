"""The main job submitted with `ray job submit` to a `ray start --head` cluster on loopback.

This is the end-to-end test of the whole pipeline on the embedded default (tiny sizes):
generate -> score (Ray Data) -> select -> sweep (Ray Tune, QLoRA recipes under a FLOP cap) ->
finetune (Ray Train, QLoRA, the sweep's winner) -> serve (Ray Serve LLM + vLLM) and query, then the
summary with its verdict, and the ledger.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from frugalray.budget.ledger import ComputeLedger

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_pipeline_via_ray_job_submit(ray_cluster, served_model, tmp_path):
    run_dir = tmp_path / "pipeline-run"
    # One Serve proxy per cluster: the job's app (its own name and route prefix) joins it.
    port = served_model["config"].http_port
    pipeline = shlex.join([
        "python", "jobs/pipeline.py", "--config", "jobs/configs/pipeline_small.yaml",
        "--run-dir", str(run_dir), "--set", f"serve.http_port={port}",
    ])
    cmd = [
        str(Path(sys.executable).parent / "ray"), "job", "submit",
        "--address", ray_cluster["dashboard"],
        # The cluster shares this checkout, so the job runs in place (see frugalray.submit on why a
        # working_dir package is avoided on long-lived local clusters). `ray job submit` quotes each
        # argument, so the `cd ... &&` goes to one shell as a single script.
        "--", "bash", "-c", f"cd {shlex.quote(str(REPO))} && {pipeline}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "succeeded" in out, out[-3000:]
    assert "frugalray pipeline summary" in out

    summary = json.loads((run_dir / "summary.json").read_text())
    ledger = ComputeLedger(run_dir)
    stages = ledger.totals_by_stage()
    assert {"generate", "score", "select", "finetune", "sweep", "serve"} <= set(stages)
    assert summary["ledger_matches_stages"], summary["ledger_mismatches"]
    assert summary["ledger_total_flops"] == pytest.approx(sum(s["flops"] for s in stages.values()))
    # data: nothing lost
    assert summary["rows_kept"] + summary["rows_dropped"] == summary["rows_in"]
    # the sweep's promise
    assert 0 < summary["sweep_flops_spent"] <= summary["sweep_flop_cap"]
    # the served model answered the same held-out questions before and after fine-tuning; at 3 steps
    # this run cannot show learning (test_qlora_learning does): it checks the verdict is computed and said
    assert summary["heldout_n"] == 8
    paired = summary["heldout_paired"]
    assert paired["n"] == 8 and paired["mean_a"] == summary["heldout_accuracy_after"]
    assert paired["mean_b"] == summary["heldout_accuracy_before"]
    assert paired["ci_low"] <= paired["diff"] <= paired["ci_high"]
    assert f"VERDICT: {summary['verdict']['line']}" in out
    # sweep -> finetune -> serve: the sweep searched the served method and the adapter used its winner
    recipe = summary["served_recipe"]
    assert recipe["method"] == "qlora" and recipe["source"] == "sweep winner"
    assert recipe["learning_rate"] == summary["sweep_best_config"]["learning_rate"]
    stage_order = [e["stage"] for e in ledger.entries()]
    assert stage_order.index("sweep") < stage_order.index("finetune") < stage_order.index("serve")
    assert summary["served_usage"]["samples"] >= summary["served_answers"].__len__()
    assert Path(summary["adapter_path"]).joinpath("adapter_config.json").is_file()
    # The main job ends by writing its report; its totals are the ledger's.
    report = (run_dir / "report.md").read_text()
    assert "Stage totals vs ledger total: OK" in report
    assert f"**{summary['ledger_total_flops']:.3e}**" in report
    assert (run_dir / "report_flops_by_stage.png").is_file() and (run_dir / "report_serving.png").is_file()
    assert summary["finetune_curve"]["flops"][-1] > 0
