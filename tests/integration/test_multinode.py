"""Scale-out on one machine, for real: a head plus two worker nodes on loopback, each its own raylet.

Jobs go in through `frugalray submit` (the Jobs SDK), as on a real cluster; placement is read from
Ray's state API. A worker node is SIGKILLed mid-stage, like a lost machine, and a replacement node
joins (as an autoscaler would bring one). Per stage:
- score: the actors spread over both worker nodes; after a kill no row is lost or written twice.
- finetune: 2 FSDP workers (placement_strategy SPREAD) on two nodes; after a kill the worker group
  restarts from the last checkpoint (no step before it runs twice) and the run ends at max_steps.
- sweep: 3 concurrent trials span nodes; the trial on the killed node errors, its open FLOP hold
  stays charged against the cap (never reused), the others finish, the cap is never exceeded.
- serve: the vLLM engine replica and the ingress replica sit on different nodes; after the engine's
  node dies, Serve starts a replacement on the new node and requests succeed again.

One 3-node cluster serves the whole module (about 9 minutes on 2 busy cores, plus 5-10 for Serve:
a vLLM engine starts twice).

The session's shared `ray_cluster` is a different cluster: this module drives its own through the
job server only, so the pytest process stays a driver of one cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loopback_cluster():
    from frugalray.local_cluster import LoopbackCluster

    # A 1-CPU head (a 0-CPU head timed out in Ray 2.60's node startup here) and 2-CPU workers: a 2-CPU
    # scoring actor fits only on a worker node.
    cluster = LoopbackCluster(head_cpus=1, worker_cpus=(2, 2))
    try:
        cluster.start(timeout_s=300)
    except Exception:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


def _tasks(path: Path, n_rows: int) -> Path:
    from frugalray.examples.generate import GenerateConfig, generate_tasks, write_rows

    write_rows(generate_tasks(GenerateConfig(n_rows=n_rows, seed=11, noise_rate=0.1)), path)
    return path


def _submit(cluster, stage: str, config: str, run_dir: Path, sets: list[str], wait: bool = True):
    """`frugalray submit STAGE` against the loopback cluster's job server, as a user would run it."""
    cmd = [sys.executable, "-m", "frugalray.cli", "submit", stage, "--config", config,
           "--address", cluster.dashboard, "--run-dir", str(run_dir)]
    for item in sets:
        cmd += ["--set", item]
    if not wait:
        proc = subprocess.run(cmd + ["--no-wait"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        return proc.stdout.strip().splitlines()[-1]  # the submission id
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200, check=False)


def _submit_score(cluster, tasks: Path, out: Path, run_dir: Path, extra: list[str], wait: bool = True):
    sets = [f"input_path={tasks}", f"output_path={out}", "num_actors=2", "num_cpus_per_actor=2", "batch_size=4",
            "max_length=64", *extra]
    return _submit(cluster, "score", "jobs/configs/score.yaml", run_dir, sets, wait)


def _follow(cluster, submission_id: str, log_path: Path) -> str:
    from ray.job_submission import JobSubmissionClient

    from frugalray.submit import follow

    with open(log_path, "w") as log:
        return follow(JobSubmissionClient(cluster.dashboard), submission_id, out=log)


def _actor_nodes(cluster, class_names: tuple[str, ...], alive_only: bool = True) -> dict[str, str]:
    """actor id -> node name (head / workerN; "gone" for a dead node) of the actors of these classes."""
    from ray.util.state import list_actors

    names = cluster.node_names_by_id()
    actors = list_actors(address=cluster.dashboard, limit=10_000, detail=True, raise_on_missing_output=False)
    return {a.actor_id: names.get(a.node_id, "gone") for a in actors
            if any(c in (a.class_name or "") for c in class_names) and (a.state == "ALIVE" or not alive_only)}


def _wait_for(predicate, timeout_s: float, what: str, log_path: Path | None = None, poll_s: float = 0.5):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    tail = log_path.read_text()[-3000:] if log_path is not None and log_path.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def _scorer_actor_nodes(cluster) -> dict[str, str]:
    return _actor_nodes(cluster, ("MapWorker",), alive_only=False)


def _read_ids(out: Path) -> list[str]:
    ids: list[str] = []
    for shard in sorted(out.glob("shard-*.parquet")):
        ids += pq.read_table(shard, columns=["id"]).column("id").to_pylist()
    return ids


def test_scoring_actors_spread_across_worker_nodes(loopback_cluster, tmp_path):
    tasks = _tasks(tmp_path / "tasks.jsonl", 16)
    proc = _submit_score(loopback_cluster, tasks, tmp_path / "scored", tmp_path / "run", ["shard_rows=4"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    placement = _scorer_actor_nodes(loopback_cluster)
    assert len(placement) >= 2, placement
    assert set(placement.values()) == {"worker1", "worker2"}, placement  # both workers, never the 1-CPU head


def test_scoring_survives_a_worker_node_dying(loopback_cluster, tmp_path):
    tasks = _tasks(tmp_path / "tasks.jsonl", 64)
    out = tmp_path / "scored"
    run_dir = tmp_path / "run"
    submission_id = _submit_score(loopback_cluster, tasks, out, run_dir, ["shard_rows=4"], wait=False)

    # Kill worker1 once scoring is under way (a first shard is on disk), like a machine lost mid-stage.
    _wait_for(lambda: list(out.glob("shard-*.parquet")), 600, "a first scored shard")
    loopback_cluster.kill_node("worker1")
    replacement = loopback_cluster.add_worker(2)  # capacity comes back, as an autoscaler would bring it

    status = _follow(loopback_cluster, submission_id, tmp_path / "job.log")
    assert status == "SUCCEEDED", (tmp_path / "job.log").read_text()[-4000:]

    entry = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()][-1]
    ids = _read_ids(out)
    assert len(ids) == len(set(ids)), "a row was written twice"
    assert entry["rows_in"] == 64
    assert len(ids) + entry["rows_quarantined"] == 64, entry  # no row lost to the dead node
    assert replacement in loopback_cluster.node_names_by_id().values()


# --- Train: FSDP workers on two nodes, one node lost mid-run -----------------------------------------

TRAIN_STEPS = 6


def _checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has written under the run's storage (step_000002, ...)."""
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "ray_train").glob("*/step_*") if p.is_dir())


def _job_logs(cluster, submission_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(cluster.dashboard).get_job_logs(submission_id)[-4000:]
    except Exception as err:  # noqa: BLE001 - only for a failure message
        return f"(job logs unavailable: {err})"


def test_training_spreads_over_nodes_and_resumes_from_the_last_checkpoint_after_a_node_dies(
    loopback_cluster, default_model_path, tmp_path
):
    from test_finetune_fsdp import write_rows as write_train_rows

    data = write_train_rows(tmp_path / "train.jsonl", 12)
    run_dir = tmp_path / "run"
    sets = [f"model={default_model_path}", f"data_path={data}", "method=lora", "lora_rank=4", "lora_alpha=8",
            "compute_dtype=float32", "cpu_threads=1", "batch_size=2", "seq_len=48", "eval_rows=0",
            "learning_rate=0.001", f"max_steps={TRAIN_STEPS}", "checkpoint_every=1", "max_failures=3",
            "num_workers=2", "placement_strategy=SPREAD"]
    submission_id = _submit(loopback_cluster, "finetune", "jobs/configs/finetune.yaml", run_dir, sets, wait=False)

    # Both workers up and a checkpoint past step 1 on disk: then lose a node that holds a worker.
    try:
        _wait_for(lambda: len(_checkpoint_steps(run_dir)) >= 2, 600, "two checkpoints")
    except AssertionError:
        raise AssertionError("no checkpoints in time:\n" + _job_logs(loopback_cluster, submission_id)) from None
    # Asked again until both workers are listed: a busy state API can answer with a partial list.
    def both_workers():
        listed = _actor_nodes(loopback_cluster, ("RayTrainWorker",))
        return listed if len(listed) >= 2 else None

    placement = _wait_for(both_workers, 120, "both train workers listed alive")
    # The latest checkpoint directory may still be being written; the one before it is complete.
    committed = _checkpoint_steps(run_dir)[-2]
    print("\ntrain workers on:", placement, "checkpoints:", _checkpoint_steps(run_dir))
    assert len(placement) == 2 and len(set(placement.values())) == 2, placement  # one worker per node
    victim = min(n for n in placement.values() if n != "head")
    loopback_cluster.kill_node(victim)
    loopback_cluster.add_worker(2)

    status = _follow(loopback_cluster, submission_id, tmp_path / "job.log")
    assert status == "SUCCEEDED", (tmp_path / "job.log").read_text()[-4000:]

    records = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    attempts = list(dict.fromkeys(r["attempt"] for r in records))
    by_attempt = {a: [r["step"] for r in records if r["attempt"] == a] for a in attempts}
    print("steps per attempt:", by_attempt)
    assert len(attempts) >= 2, by_attempt  # the node loss restarted the worker group
    last = by_attempt[attempts[-1]]
    assert last == list(range(last[0], TRAIN_STEPS + 1)), by_attempt  # the last attempt ran to the end
    resumed_after = last[0] - 1  # the checkpoint the last attempt loaded
    assert resumed_after >= committed >= 1, (by_attempt, committed)  # not from scratch: from the last checkpoint
    counts = {s: sum(1 for r in records if r["step"] == s) for s in range(1, TRAIN_STEPS + 1)}
    assert all(counts[s] == 1 for s in range(1, resumed_after + 1)), counts  # nothing before it ran twice
    assert all(counts[s] >= 1 for s in counts), counts

    (entry,) = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()
                if json.loads(line)["stage"] == "finetune"]
    assert entry["steps"] == TRAIN_STEPS and entry["restarts"] == len(attempts) - 1
    assert entry["repeated_steps"] == sum(counts.values()) - TRAIN_STEPS  # lost steps are charged, once
    lost = [n for n in _actor_nodes(loopback_cluster, ("RayTrainWorker",), alive_only=False).values() if n == "gone"]
    assert lost, "no train worker ran on the killed node"


# --- Tune: trials on three nodes' CPUs, one node lost mid-sweep, the FLOP cap holds --------------------

TRIALS, TRIAL_STEPS = 3, 4


def test_a_sweep_that_loses_a_node_finishes_within_its_flop_cap(loopback_cluster, default_model_path, tmp_path):
    from test_sweep_restore import write_sum_rows

    from frugalray.config import load_config
    from frugalray.tune.budget import FlopReservations, read_journal
    from frugalray.tune.sweep import STATE_FILE, SweepConfig, preflight_sweep, trial_cost_bounds

    rows = write_sum_rows(tmp_path / "train.jsonl", 12)
    sets = [f"finetune.model={default_model_path}", f"finetune.data_path={rows}", "finetune.method=lora",
            "finetune.lora_rank=4", "finetune.batch_size=2", "finetune.seq_len=48", "finetune.eval_rows=2",
            "finetune.cpu_threads=1", "finetune.compute_dtype=float32",
            "search_space={learning_rate: [0.003, 0.0003, 0.00001]}", "flop_caps=null", "steps_per_report=1",
            f"max_steps_per_trial={TRIAL_STEPS}", f"max_concurrent_trials={TRIALS}", "scheduler=fifo"]
    # The cap pays for the 12 chunk upper bounds the trials want (and a bit): a trial that dies
    # must neither push the sweep over it nor free its hold for others.
    probe = load_config(SweepConfig, REPO / "jobs" / "configs" / "sweep.yaml", sets + ["flop_cap=1.0e+18"])
    data, shape, _ = preflight_sweep(probe)
    step, evaluation = trial_cost_bounds(probe.finetune, shape, len(data.eval_rows))
    cap = (TRIALS * TRIAL_STEPS + 0.5) * (step + evaluation)
    run_dir = tmp_path / "run"
    submission_id = _submit(loopback_cluster, "sweep", "jobs/configs/sweep.yaml", run_dir,
                            sets + [f"flop_cap={cap!r}"], wait=False)

    trial_classes = ("ImplicitFunc", "sweep_trial")

    def every_live_trial_mid_chunk():
        """The alive trials' nodes, once every alive trial has settled a chunk and has more to run.

        A trial reserves its next chunk right after it settles one, so each of them then holds FLOPs.
        (Tune's own result files reach the run dir only when it syncs, so progress is read from the
        budget journal, which is written before each answer; trial ids come from its settle tags.)
        """
        if not (run_dir / STATE_FILE).exists():
            return None
        journal = run_dir / json.loads((run_dir / STATE_FILE).read_text())["journal"]
        settles: dict[str, int] = {}
        reserves = 0
        for e in read_journal(journal):
            if e["op"] == "settle":
                trial_id = e["tag"].rsplit(":", 1)[0]
                settles[trial_id] = settles.get(trial_id, 0) + 1
            elif e["op"] == "reserve":
                reserves += 1
        running = [t for t, n in settles.items() if n < TRIAL_STEPS]
        # ... and each of them holds its next chunk right now (not between a settle and the next reserve),
        # so the node killed next takes an open hold with it.
        holding = reserves - sum(settles.values()) == len(running)
        alive = list(_actor_nodes(loopback_cluster, trial_classes).values())
        if alive and holding and len(running) == len(alive) and any(n != "head" for n in alive):
            return alive, settles
        return None

    try:
        alive, settles = _wait_for(every_live_trial_mid_chunk, 600, "every live trial mid-run")
    except AssertionError:
        raise AssertionError("no trial mid-run in time:\n" + _job_logs(loopback_cluster, submission_id)) from None
    on_workers = [n for n in alive if n != "head"]
    victim = max(set(on_workers), key=on_workers.count)
    killed_trials = on_workers.count(victim)
    print("\ntrials alive on:", alive, "chunks settled:", settles, "killing", victim)
    loopback_cluster.kill_node(victim)
    loopback_cluster.add_worker(2)

    status = _follow(loopback_cluster, submission_id, tmp_path / "job.log")
    job_log = (tmp_path / "job.log").read_text()
    assert status == "SUCCEEDED", job_log[-4000:]
    print(job_log[-1500:])

    # Tune placed the 3 one-CPU trials at once (max_concurrent_trials=3): no node has 3 CPUs (1 CPU head,
    # 2 CPU workers), so they ran on at least two nodes. Every trial actor counts, dead ones included.
    from ray.util.state import list_actors

    trial_node_ids = {a.node_id for a in list_actors(address=loopback_cluster.dashboard, limit=10_000, detail=True,
                                                     raise_on_missing_output=False)
                      if any(c in (a.class_name or "") for c in trial_classes)}
    assert len(trial_node_ids) >= 2, trial_node_ids

    state = json.loads((run_dir / STATE_FILE).read_text())
    events = read_journal(run_dir / state["journal"])
    # Replay the journal: at no moment did open holds plus settled spend pass the cap.
    pot = FlopReservations(cap)
    for e in events:
        if e["op"] == "reserve":
            pot.reserved += e["flops"]
        elif e["op"] == "settle":
            pot.settle(e["reserved"], e["spent"])
        assert pot.reserved <= cap * (1 + 1e-9), (e, pot.snapshot())
    open_holds = pot.reserved - pot.spent  # chunks of trials that died with their node
    (entry,) = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()
                if json.loads(line)["stage"] == "sweep"]
    print("ledger:", {k: entry[k] for k in ("flops", "flop_cap", "trials", "trials_failed", "trials_stopped_by_cap")},
          "open holds:", open_holds)
    assert entry["trials"] == TRIALS
    assert 1 <= entry["trials_failed"] <= killed_trials, (entry, killed_trials)  # only the dead node's trials
    assert entry["flops"] == pytest.approx(pot.spent)
    assert entry["flops"] + open_holds <= cap * (1 + 1e-9)  # lost chunks stay charged against the cap
    assert open_holds > 0  # a trial killed mid-chunk left its hold open: never handed back for reuse
    assert entry["flops_held_open"] == pytest.approx(open_holds)  # and the ledger says so
    histories = json.loads((run_dir / "histories.json").read_text())
    finished = [h for h in histories if h["step"] and h["step"][-1] == TRIAL_STEPS]
    assert len(finished) + entry["trials_failed"] + entry["trials_stopped_by_cap"] >= TRIALS, histories


# --- Serve: an engine replica and the ingress on different nodes; the engine's node dies ---------------

SERVE_APP = "frugalray-multinode"


def _serve_replicas(cluster, alive_only: bool = True) -> dict[str, tuple[str, str]]:
    """actor id -> (deployment, node name) of this app's Serve replicas (class ServeReplica:<app>:<deployment>)."""
    from ray.util.state import list_actors

    names = cluster.node_names_by_id()
    actors = list_actors(address=cluster.dashboard, limit=10_000, detail=True, raise_on_missing_output=False)
    prefix = f"ServeReplica:{SERVE_APP}:"
    return {a.actor_id: ((a.class_name or "")[len(prefix):], names.get(a.node_id, "gone")) for a in actors
            if (a.class_name or "").startswith(prefix) and (a.state == "ALIVE" or not alive_only)}


def _serve_app_status(cluster) -> dict:
    """Serve's own view (the dashboard's REST API): app status and each deployment's replica states."""
    import httpx

    try:
        apps = httpx.get(f"{cluster.dashboard}/api/serve/applications/", timeout=30).json()["applications"]
    except Exception as err:  # noqa: BLE001 - the dashboard can be busy; the caller asks again
        return {"status": f"unavailable ({type(err).__name__})", "deployments": {}}
    app = apps.get(SERVE_APP) or {}
    return {"status": app.get("status"),
            "deployments": {name: (d.get("status"), sorted(r.get("state") for r in d.get("replicas") or []))
                            for name, d in (app.get("deployments") or {}).items()}}


def _chat(base_url: str, timeout: float) -> str:
    """One tiny chat request; "200" when it answered with content, else the status code or error class."""
    import httpx

    try:
        resp = httpx.post(f"{base_url}/v1/chat/completions", timeout=timeout,
                          json={"model": "smollm2-135m-instruct", "max_tokens": 2, "temperature": 0,
                                "messages": [{"role": "user", "content": "What is 3 + 4?"}]})
    except httpx.HTTPError as err:
        return type(err).__name__
    if resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"]:
        return "200"
    return str(resp.status_code)


def test_serve_replicas_spread_over_nodes_and_the_engine_is_replaced_after_its_node_dies(
    loopback_cluster, default_model_path, tmp_path
):
    """Deploy the frugalray app as a Ray Job (it outlives the job), lose the engine's node, get it back.

    The engine replica asks for 2 CPUs (Ray Serve LLM merges the replica actor's CPU into the engine's
    `engine_cpus=1` bundle): only a worker node has them, and it then has none left for the 0.25-CPU
    ingress, so the two replicas sit on different nodes by construction.
    Serve's HTTP proxy runs on the head only (as serve/config.yaml says): with the default
    EveryNode, each node holding a replica would start a proxy on the same loopback port.
    """
    from frugalray.local_cluster import free_port
    from frugalray.submit import SubmitPlan, submit

    cluster = loopback_cluster
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    sets = [f"model={default_model_path}", f"app_name={SERVE_APP}", f"http_port={port}", "engine_cpus=1",
            "max_model_len=512", "max_tokens_ceiling=64", "default_max_tokens=16", "kv_cache_gib=1"]
    entrypoint = (f"cd {REPO} && serve start --proxy-location HeadOnly --http-host 127.0.0.1 --http-port {port} && "
                  "python jobs/serve.py --config serve/config.yaml " + " ".join(f"--set {s}" for s in sets))
    plan = SubmitPlan("serve", entrypoint, {"env_vars": {"PYTHONPATH": "platform", "HF_HUB_OFFLINE": "1",
                                                         "TOKENIZERS_PARALLELISM": "false"}}, cluster.dashboard)
    try:
        from ray.job_submission import JobSubmissionClient

        start = time.time()
        submission_id, _ = submit(plan, wait=False)
        jobs = JobSubmissionClient(cluster.dashboard)
        # The job returns once the engine answers; a replica that cannot be placed would keep it waiting.
        try:
            status = _wait_for(lambda: (s := str(getattr(jobs.get_job_status(submission_id), "value", "")))
                               in ("SUCCEEDED", "FAILED", "STOPPED") and s, 480, "the serve job", poll_s=2)
        except AssertionError:
            logs = _job_logs(cluster, submission_id)
            jobs.stop_job(submission_id)
            raise AssertionError("serve job did not finish in time:\n" + logs) from None
        assert status == "SUCCEEDED", _job_logs(cluster, submission_id)
        deploy_s = time.time() - start

        # Placement, from Ray's state API: the engine on a worker node, the ingress elsewhere.
        replicas = _serve_replicas(cluster)
        engines = {a: node for a, (dep, node) in replicas.items() if not dep.endswith("-ingress")}
        ingresses = {a: node for a, (dep, node) in replicas.items() if dep.endswith("-ingress")}
        print(f"\nserve app up in {deploy_s:.0f}s; replicas: {replicas}")
        assert len(engines) == 1 and len(ingresses) == 1, replicas
        ((engine_id, victim),) = engines.items()
        assert victim.startswith("worker"), replicas
        assert len({node for _, node in replicas.values()}) >= 2, replicas
        assert _chat(base_url, timeout=120) == "200"  # the job exited; the app keeps answering

        # Lose the engine's node; a replacement node brings the 2 CPUs back (as an autoscaler would).
        loopback_cluster.kill_node(victim)
        killed_at = time.time()
        outage: list[tuple[float, str]] = []
        outage.append((0.0, _chat(base_url, timeout=15)))  # what a client sees right after the loss
        replacement = cluster.add_worker(2)
        joined_s = time.time() - killed_at

        deadline = killed_at + 420
        while time.time() < deadline:
            outcome = _chat(base_url, timeout=15)
            outage.append((round(time.time() - killed_at, 1), outcome))
            if outcome == "200":
                break
            time.sleep(2)
        recovered_s = time.time() - killed_at
        seen = {}
        for t, outcome in outage:
            seen.setdefault(outcome, []).append(t)
        print(f"killed {victim} (engine replica {engine_id}); {replacement} joined after {joined_s:.0f}s; "
              f"answers again after {recovered_s:.0f}s; client outcomes (seconds after the kill): {seen}")
        assert outage[-1][1] == "200", f"no answer within {deadline - killed_at:.0f}s of the kill: {seen}"
        assert outage[0][1] != "200"  # the loss was visible: the dead node's engine did not answer

        # Serve replaced the engine replica on a live node; the dead one is recorded on the dead node.
        after = _serve_replicas(cluster, alive_only=False)
        new_engines = {a: node for a, (dep, node) in after.items()
                       if not dep.endswith("-ingress") and a != engine_id and node != "gone"}
        print("replicas after:", after, "serve status:", _serve_app_status(cluster))
        assert after[engine_id][1] == "gone", after
        assert new_engines and all(node != victim for node in new_engines.values()), after
        status_now = _wait_for(lambda: (s := _serve_app_status(cluster))["status"] == "RUNNING" and s, 120,
                               "Serve to report the app RUNNING")
        assert len(status_now["deployments"]) == 2, status_now
        assert all(health == "HEALTHY" and states == ["RUNNING"]
                   for health, states in status_now["deployments"].values()), status_now
    finally:
        # Serve (controller, proxy and the app) goes, so the module's later tests get the CPUs back.
        import httpx

        try:
            httpx.delete(f"{cluster.dashboard}/api/serve/applications/", timeout=120)
            _wait_for(lambda: not _serve_replicas(cluster), 120, "the Serve replicas to stop")
        except Exception as err:  # noqa: BLE001 - best effort; the module's cluster is torn down anyway
            print(f"serve teardown: {err}")
