"""`frugalray` command line: one subcommand per stage, plus the end-to-end pipeline.

Every stage subcommand takes the same YAML config its Ray Job entrypoint in jobs/ takes,
validates it completely before starting any Ray work, and records what it spent in the
run directory's compute ledger.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from frugalray.config import ConfigError
from frugalray.stages import (
    STAGES,
    StageParser,
    add_stage_subparser,
    load_stage_config,
    run_stage,
    submittable,
)

EPILOG = """examples:
  frugalray model prepare                      # convert the embedded default model once
  frugalray data generate --out runs/data/tasks.jsonl --n-rows 200 --noise-rate 0.2
  frugalray score --config jobs/configs/score.yaml --run-dir runs/mine
  frugalray pipeline --config jobs/configs/pipeline.yaml
  frugalray serve --config serve/config.yaml   # OpenAI-compatible API on 127.0.0.1:8000
  frugalray ledger runs/pipeline               # FLOPs spent per stage
  frugalray report runs/pipeline               # runs/pipeline/report.md with plots
  frugalray submit pipeline --config jobs/configs/pipeline.yaml --address http://127.0.0.1:8265
  frugalray jobs status raysubmit_...          # also: logs [--follow], stop, list
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="frugalray",
        description="Train and serve language models on Ray under explicit FLOP, memory and data budgets.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # StageParser: a stage's --help ends with the keys its config accepts
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=StageParser)

    model = sub.add_parser("model", help="prepare models (the embedded default is converted once to HF format)")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    prep = model_sub.add_parser("prepare", help="resolve a model; convert the embedded default into the cache")
    prep.add_argument("name", nargs="?", default=None,
                      help="'smollm2-135m-instruct' (default), a local HF model directory or an HF model id")
    prep.add_argument("--force", action="store_true", help="convert again even when already prepared")

    data = sub.add_parser("data", help="built-in verifiable tasks of graded difficulty")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    gen = data_sub.add_parser("generate", help="write generated tasks (optionally with labelled noise)")
    gen.add_argument("--config", default=None, help="YAML with GenerateConfig fields (flags override it)")
    gen.add_argument("--out", default=None, help="output .jsonl or .parquet")
    gen.add_argument("--n-rows", type=int, default=None)
    gen.add_argument("--max-digits", type=int, default=None, help="operands have 1..N digits (N <= 3)")
    gen.add_argument("--families", default=None, help="comma-separated task families")
    gen.add_argument("--noise-rate", type=float, default=None, help="fraction of rows made noisy (labelled)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--response-style", choices=["number", "worked"], default=None,
                     help="number: the bare answer (default); worked: '23 + 58 = 81', which small models learn from")

    for name in STAGES:  # score, select, finetune, sweep, serve, pipeline: flags from frugalray.stages
        add_stage_subparser(sub, name)

    from frugalray.cli.plan_memory import add_plan_memory_parser

    add_plan_memory_parser(sub)  # frugalray plan-memory (the memory planner)

    ledger = sub.add_parser("ledger", help="print the FLOPs a run spent, per stage")
    ledger.add_argument("run_dir")

    submit = sub.add_parser(
        "submit", help="run a stage as a Ray Job (Jobs SDK): config validated here, repo uploaded, logs streamed",
        description="Validate STAGE's config locally, submit `python jobs/<stage>.py --config ...` with this "
                    "repository as the runtime_env working_dir, stream its logs, and exit with the job's status "
                    "(0 = SUCCEEDED). Relative --run-dir is made absolute for a loopback cluster; on a remote "
                    "cluster point it at shared storage.")
    submit.add_argument("stage", choices=submittable())
    submit.add_argument("--config", required=True, help="the stage's YAML (inside this repository)")
    submit.add_argument("--run-dir", default=None, help="the job's output directory")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable)")
    submit.add_argument("--address", default=None,
                        help="job server, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS, "
                             "$RAY_ADDRESS, then http://127.0.0.1:8265)")
    submit.add_argument("--extras", default=None, help="also pip-install frugalray's extra (cpu|gpu) in the job")
    submit.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for the job (values of *KEY*/*TOKEN* names are never logged)")
    submit.add_argument("--no-wait", action="store_true", help="print the submission id and return at once")

    jobs = sub.add_parser("jobs", help="status / logs / stop / list of submitted Ray Jobs")
    jobs.add_argument("action", choices=["status", "logs", "stop", "list"])
    jobs.add_argument("submission_id", nargs="?", help="the id `frugalray submit` printed (not for list)")
    jobs.add_argument("--address", default=None, help="job server (as for submit)")
    jobs.add_argument("--follow", action="store_true", help="logs: stream until the job ends")

    report = sub.add_parser("report", help="write RUN_DIR/report.md with plots: FLOPs by stage, data kept/dropped, "
                                           "loss vs FLOPs, sweep frontier, serving accuracy vs compute")
    report.add_argument("run_dir", help="a run directory holding ledger.jsonl (e.g. runs/pipeline)")
    report.add_argument("--no-plots", action="store_true", help="Markdown tables only")
    return parser


def _print_result(result) -> None:
    data = result.model_dump() if hasattr(result, "model_dump") else getattr(result, "__dict__", result)
    print(json.dumps(data, indent=2, default=str))


def cmd_model_prepare(args) -> int:
    from frugalray.models import DEFAULT_MODEL, EMBEDDED_MODELS, prepare_model, resolve_model

    name = args.name or DEFAULT_MODEL
    if args.force and name in EMBEDDED_MODELS:
        print(prepare_model(name, force=True))
    else:
        print(resolve_model(name, field="name"))
    return 0


def cmd_data_generate(args) -> int:
    from frugalray.config import parse_config, read_yaml
    from frugalray.examples.generate import GenerateConfig, generate_tasks, write_rows

    data = read_yaml(args.config) if args.config else {}
    flags = {"output_path": args.out, "n_rows": args.n_rows, "max_digits": args.max_digits,
             "noise_rate": args.noise_rate, "seed": args.seed, "response_style": args.response_style,
             "families": args.families.split(",") if args.families else None}
    data.update({k: v for k, v in flags.items() if v is not None})
    cfg = parse_config(GenerateConfig, data, args.config or "command line")
    rows = generate_tasks(cfg)
    path = write_rows(rows, cfg.output_path)
    noisy = sum(r["noise_kind"] != "none" for r in rows)
    print(f"wrote {len(rows)} rows ({noisy} with labelled noise) to {path}")
    return 0


def cmd_stage(args) -> int:
    """`frugalray <stage>`: validate the config, run the stage, print its result as JSON."""
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    run_dir = Path(args.run_dir or f"runs/{args.command}")
    _print_result(run_stage(args.command, args, run_dir))
    return 0


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def serve_until_stopped(stop: Callable[[], None], ready: str) -> int:
    """Print `ready`, block until Ctrl-C or SIGTERM, then `stop()` and return 0.

    Process managers and Kubernetes stop a service with SIGTERM; under Ray's own handler it died with
    a fatal-signal trace ("*** SIGTERM received ... clock_nanosleep") and left the app behind. Installed
    after Ray started, so it replaces Ray's handler in this driver, and before `ready` is printed.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        print(ready, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt as why:
        print(f"{str(why) or 'SIGINT'}: shutting down", flush=True)
        stop()
        return 0


def cmd_serve(args) -> int:
    """Deploy the first application of a Serve config file and keep it up until Ctrl-C or SIGTERM."""
    from frugalray.serve.app import deploy, shutdown_app

    cfg = load_stage_config("serve", args.config, args.overrides)
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    url = deploy(cfg)  # validates the adapters and model, then joins or starts Ray

    def stop() -> None:
        shutdown_app(cfg.app_name)
        print(f"serve app {cfg.app_name!r} deleted", flush=True)

    return serve_until_stopped(
        stop, f"serving {cfg.model_name} {sorted(cfg.adapters)} at {url} (OpenAI API); Ctrl-C or SIGTERM stops")


def cmd_pipeline(args) -> int:
    from frugalray.pipeline import run_pipeline, summary_exit_code

    cfg = load_stage_config("pipeline", args.config, args.overrides)
    return summary_exit_code(run_pipeline(cfg, run_dir=args.run_dir, address=args.address))


def cmd_ledger(args) -> int:
    from frugalray.budget.ledger import ComputeLedger

    ledger = ComputeLedger(args.run_dir)
    totals = ledger.totals_by_stage()
    if not totals:
        print(f"no ledger at {ledger.path}", file=sys.stderr)
        return 1
    print(f"{'stage':<12} {'FLOPs':>12} {'tokens':>10} {'wall s':>8}")
    for stage, t in totals.items():
        print(f"{stage:<12} {t['flops']:>12.3e} {int(t['tokens']):>10} {t['wall_s']:>8.1f}")
    print(f"{'total':<12} {ledger.total_flops():>12.3e}")
    return 0


def cmd_submit(args) -> int:
    from frugalray.submit import exit_code, plan_submission, submit

    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError([f"--env: {item!r} is not NAME=VALUE"])
        env[name] = value
    plan = plan_submission(args.stage, args.config, args.overrides, args.run_dir, args.address,
                           extras=args.extras, env=env)
    print(f"submitting {args.stage} to {plan.address}: {plan.entrypoint}", file=sys.stderr)
    submission_id, status = submit(plan, wait=not args.no_wait)
    print(f"job {submission_id}: {status}", file=sys.stderr)
    if args.no_wait:
        print(submission_id)
        return 0
    return exit_code(status)


def cmd_jobs(args) -> int:
    from frugalray import submit as jobs_api

    if args.action == "list":
        for job in jobs_api.list_jobs(args.address):
            print(f"{job['submission_id']:<28} {job['status']:<10} {job['stage']:<9} {job['entrypoint']}")
        return 0
    if not args.submission_id:
        raise ConfigError([f"submission_id: `frugalray jobs {args.action}` needs the id `frugalray submit` printed"])
    if args.action == "status":
        print(json.dumps(jobs_api.job_status(args.address, args.submission_id), indent=2, default=str))
        return 0
    if args.action == "logs":
        status = jobs_api.job_logs(args.address, args.submission_id, follow_logs=args.follow)
        return jobs_api.exit_code(status) if args.follow else 0
    print(f"job {args.submission_id}: {jobs_api.stop_job(args.address, args.submission_id)}")
    return 0


def cmd_report(args) -> int:
    from frugalray.report import write_report

    try:
        path = write_report(args.run_dir, plots=not args.no_plots)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(f"report written to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        if args.command == "model":
            return cmd_model_prepare(args)
        if args.command == "data":
            return cmd_data_generate(args)
        if args.command == "plan-memory":
            from frugalray.cli.plan_memory import cmd_plan_memory

            return cmd_plan_memory(args)
        # A stage without a handler of its own runs through the registry (cmd_stage).
        handler = {"serve": cmd_serve, "pipeline": cmd_pipeline, "ledger": cmd_ledger,
                   "report": cmd_report, "submit": cmd_submit, "jobs": cmd_jobs}.get(args.command)
        if handler is None and args.command in STAGES:
            handler = cmd_stage
        return handler(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
