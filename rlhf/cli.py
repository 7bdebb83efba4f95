"""`rlhf`: the command-line entry point (run the pipeline, validate data).

Errors the user can fix are printed as one line naming the fix, with exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from rlhf.env import quiet_defaults

UI_HINT = """\
Open the results:
  MLflow UI:  make mlflow-ui   then http://127.0.0.1:5000  (runs, metrics, checkpoints, registry)
  Prefect UI: make prefect-ui  then http://127.0.0.1:4200  (flow runs, task states, artifacts)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="Orchestrated RLHF pipeline")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the training pipeline (validate, SFT, reward model, PPO, evaluate, register)")
    run.add_argument("--config", help="YAML config file (see configs/); defaults run the CPU demo")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one option, e.g. --set ppo.steps=10 (repeatable)")
    run.add_argument("--data", help="data folder (shortcut for --set data.source=DIR)")
    run.add_argument("--base-model", help="Hugging Face name or local path of the base model")

    validate = sub.add_parser("validate", help="validate a data file without training")
    validate.add_argument("path", help="JSON, JSONL, CSV or Parquet file")
    validate.add_argument("--kind", required=True, choices=["sft", "preference", "prompt", "traffic"])
    validate.add_argument("--config", help="YAML config file whose validation thresholds to use")
    validate.add_argument("--tokenizer", help="tokenizer name or path for the token-length bounds (skipped without)")
    validate.add_argument("--report-dir", help="also write the GX result (JSON) and Data Docs (HTML) here")
    stage = sub.add_parser(
        "train-stage", help="one process of a training stage started by torchrun/accelerate launch (rlhf/launch.py)"
    )
    stage.add_argument("stage", choices=["sft", "reward", "ppo"])
    stage.add_argument("spec", help="JSON file written by rlhf.launch.launch_stage")
    stage.add_argument("result", help="where rank 0 writes the stage's result (JSON)")
    return parser


def cmd_train_stage(args: argparse.Namespace) -> int:
    from rlhf.launch import run_stage_worker

    return run_stage_worker(args.stage, args.spec, args.result)


def cmd_run(args: argparse.Namespace) -> int:
    from rlhf.config import load_config
    from rlhf.data.loading import resolve_data_paths

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.source={args.data}")
    if args.base_model:
        overrides.append(f"model.base_model={args.base_model}")
    cfg = load_config(args.config, overrides)
    if cfg.data.source != "builtin":  # fail on a bad data path before the flow starts
        resolve_data_paths(cfg.data, cfg.output_dir, cfg.seed)
    from rlhf.tracking import check_tracking_store

    check_tracking_store()  # and on an unreachable tracking store, before Prefect starts

    from flows.pipeline import rlhf_pipeline

    from tasks.evaluate import format_table

    result = rlhf_pipeline(cfg)
    print("\nEvaluation on held-out prompts (PPO policy vs the SFT policy it started from):")
    print(format_table(result.metrics, cfg.ppo.kl_target))
    print(f"\nRegistered {result.model_uri} (MLflow parent run {result.parent_run_id})")
    print(UI_HINT)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from rlhf.config import load_config
    from tasks.validate import validate_command

    cfg = load_config(args.config)
    return validate_command(
        args.path, args.kind, cfg.validation, tokenizer_path=args.tokenizer, report_dir=args.report_dir
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_defaults()
    from rlhf.config import ConfigError
    from rlhf.data.loading import DataError
    from rlhf.integrity import CheckpointCorrupted
    from rlhf.tracking import TrackingUnavailable
    from tasks.validate import ValidationFailed

    try:
        return {"run": cmd_run, "validate": cmd_validate, "train-stage": cmd_train_stage}[args.command](args)
    except (ConfigError, DataError, ValidationFailed, TrackingUnavailable, CheckpointCorrupted) as e:
        print(f"rlhf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlhf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
