"""Multi-node on one machine: a head plus two worker nodes on loopback, stages submitted as Ray Jobs.

    python bench/multinode_demo.py           # score (2 actors) then finetune (2 FSDP workers), ~5-10 min

What a user with a real cluster sees, shown with three raylets on this machine
(`frugalray.local_cluster.LoopbackCluster`: `ray start --head` plus two `ray start --address`
nodes, each with its own ports and a `loopback_node_<name>` resource). Each stage goes in through
`frugalray submit` (the Ray Jobs SDK), exactly as against a remote cluster's dashboard address;
where its actors ran is read back from Ray's state API. The node-kill recovery of each stage is
asserted in tests/integration/test_multinode.py; this script shows the placement and the cost.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def submit(cluster, stage: str, config: str, run_dir: Path, sets: list[str],
           classes: tuple[str, ...]) -> tuple[str, float, dict[str, int]]:
    """Submit with `frugalray submit --no-wait`, then watch the job: (status, wall s, actors per node).

    Placement is sampled while the job runs: a finished job's actors can leave the state API's list.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    cmd = [sys.executable, "-m", "frugalray.cli", "submit", stage, "--config", config,
           "--address", cluster.dashboard, "--run-dir", str(run_dir), "--no-wait"]
    for item in sets:
        cmd += ["--set", item]
    started = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        print((proc.stdout + proc.stderr)[-3000:], file=sys.stderr)
        return f"NOT SUBMITTED (exit {proc.returncode})", time.time() - started, {}
    submission_id = proc.stdout.strip().splitlines()[-1]
    client = JobSubmissionClient(cluster.dashboard)
    seen: dict[str, str] = {}  # actor id -> node name
    while True:
        status = client.get_job_status(submission_id)
        try:
            seen.update(actor_nodes(cluster, classes))
        except Exception as err:  # noqa: BLE001 - the state API is busy; sample again
            print(f"state API: {err}", file=sys.stderr)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1.0)
    log = run_dir.with_suffix(".log")
    log.write_text(client.get_job_logs(submission_id))  # the whole job log: the first error is rarely the last
    if status != JobStatus.SUCCEEDED:
        print(f"{stage} {status}; its job log: {log}", file=sys.stderr)
    counts: dict[str, int] = {}
    for node in seen.values():
        counts[node] = counts.get(node, 0) + 1
    return str(status.value if hasattr(status, "value") else status), time.time() - started, counts


def actor_nodes(cluster, class_names: tuple[str, ...]) -> dict[str, str]:
    """actor id -> node name of the actors of these classes the state API lists now."""
    from ray.util.state import list_actors

    names = cluster.node_names_by_id()
    return {a.actor_id: names.get(a.node_id, "gone")
            for a in list_actors(address=cluster.dashboard, limit=10_000, detail=True, raise_on_missing_output=False)
            if any(c in (a.class_name or "") for c in class_names)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)

    from frugalray.benchmarking import print_table, write_result
    from frugalray.examples.generate import GenerateConfig, generate_tasks, write_rows
    from frugalray.local_cluster import LoopbackCluster
    from frugalray.models import DEFAULT_MODEL, resolve_model

    model = resolve_model(DEFAULT_MODEL)
    work = Path(tempfile.mkdtemp(prefix="multinode_demo-"))
    tasks = write_rows(generate_tasks(GenerateConfig(n_rows=32, seed=5, noise_rate=0.1)), work / "tasks.jsonl")
    started = time.time()
    cluster = LoopbackCluster(head_cpus=1, worker_cpus=(2, 2))
    rows, metrics = [], {}
    try:
        cluster.start(timeout_s=300)
        metrics["cluster_start_s"] = round(time.time() - started, 1)
        metrics["nodes"] = sorted(cluster.node_names_by_id().values())
        stages = [
            ("score", "jobs/configs/score.yaml", ("MapWorker",),
             [f"input_path={tasks}", f"output_path={work / 'scored'}", "num_actors=2", "num_cpus_per_actor=2",
              "batch_size=4", "max_length=64"]),
            ("finetune", "jobs/configs/finetune.yaml", ("RayTrainWorker",),
             [f"model={model}", f"data_path={tasks}", "method=lora", "lora_rank=4", "compute_dtype=float32",
              "cpu_threads=1", "batch_size=2", "seq_len=48", "eval_rows=0", "max_steps=4", "num_workers=2",
              "placement_strategy=SPREAD"]),
        ]
        for stage, config, classes, sets in stages:
            print(f"submitting {stage} ...", flush=True)
            status, wall, placement = submit(cluster, stage, config, work / stage, sets, classes)
            ledger = work / stage / "ledger.jsonl"
            flops = sum(json.loads(line)["flops"] for line in ledger.read_text().splitlines()) if ledger.exists() else None
            rows.append({"stage": stage, "status": status, "wall_s": wall, "actors_by_node": json.dumps(placement),
                         "nodes_used": len(placement), "flops": flops})
            metrics[f"{stage}_status"] = status
            metrics[f"{stage}_nodes_used"] = len(placement)
            metrics[f"{stage}_actors_by_node"] = placement
            metrics[f"{stage}_wall_s"] = round(wall, 1)
    finally:
        cluster.stop()
    config = {"cluster": "LoopbackCluster(head_cpus=1, worker_cpus=(2, 2)) on 127.0.0.1", "model": DEFAULT_MODEL,
              "submission": "frugalray submit STAGE --address <dashboard> (Ray Jobs SDK)",
              "note": "placement from ray.util.state.list_actors; node-kill recovery is tested in "
                      "tests/integration/test_multinode.py"}
    write_result("multinode_demo", config, metrics, {"score_nodes_used": ">= 2", "finetune_nodes_used": ">= 2"},
                 out_dir=args.out_dir)
    print_table(rows, ["stage", "status", "wall_s", "nodes_used", "actors_by_node", "flops"])
    return 0 if all(r["status"] == "SUCCEEDED" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
