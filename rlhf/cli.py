"""`rlhf`: the command-line entry point, the top layer (run the pipeline, validate data,
one process of a launched training stage).

Errors the user can fix are printed as one line naming the fix, with exit status 2;
anything else is a bug and keeps its traceback. Commands import what they run inside
their function, so `rlhf --help` answers without loading torch, Prefect or MLflow.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rlhf.config import ConfigError
from rlhf.infra.env import quiet_defaults

UI_HINT = """\
Open the results:
  MLflow UI:  make mlflow-ui   then http://127.0.0.1:5000  (runs, metrics, checkpoints, registry)
  Prefect UI: make prefect-ui  then http://127.0.0.1:4200  (flow runs, task states, artifacts)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="Orchestrated RLHF pipeline")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the training pipeline (validate, SFT, reward model, PPO, evaluate, register)")
    run.add_argument("--config", help="YAML config file (see configs/); defaults run the CPU demo")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one option, e.g. --set ppo.steps=10 (repeatable)",
    )
    run.add_argument("--data", help="data folder (shortcut for --set data.source=DIR)")
    run.add_argument("--base-model", help="Hugging Face name or local path of the base model")

    validate = sub.add_parser("validate", help="validate a data file without training")
    validate.add_argument("path", help="JSON, JSONL, CSV or Parquet file")
    validate.add_argument("--kind", required=True, choices=["sft", "preference", "prompt", "traffic"])
    validate.add_argument("--config", help="YAML config file whose validation thresholds to use")
    validate.add_argument("--tokenizer", help="tokenizer name or path for the token-length bounds (skipped without)")
    validate.add_argument("--report-dir", help="also write the GX result (JSON) and Data Docs (HTML) here")
    stage = sub.add_parser(
        "train-stage", help="one process of a training stage started by torchrun/accelerate launch (tasks/launch.py)"
    )
    stage.add_argument("stage", choices=["sft", "reward", "ppo"])
    stage.add_argument("spec", help="JSON file written by tasks.launch.launch_stage")
    stage.add_argument("result", help="where rank 0 writes the stage's result (JSON)")
    return parser


def run_stage(stage: str, spec: dict[str, Any]) -> Any:
    """Run a training stage from its launch spec in this process of the group; rank 0 logs
    (into ``spec['run_id']`` when set; PPO opens its own run). The stages' functions are
    imported here, at the top layer, so tasks/launch.py never imports what it launches."""
    from contextlib import nullcontext

    import mlflow

    from rlhf.config import PipelineConfig
    from rlhf.infra import distributed
    from tasks.ppo import train_ppo_worker
    from tasks.reward import train_reward
    from tasks.sft import train_sft

    stage_function = {"sft": train_sft, "reward": train_reward, "ppo": train_ppo_worker}[stage]
    cfg = PipelineConfig.model_validate(spec["config"])
    mlflow.set_tracking_uri(spec["tracking_uri"])
    logs_here = distributed.is_main_process() and spec["run_id"]
    with mlflow.start_run(run_id=spec["run_id"]) if logs_here else nullcontext():
        return stage_function(cfg, **spec["args"])


def cmd_train_stage(args: argparse.Namespace) -> int:
    """One process of a launched training stage: join the group, run the stage, rank 0 writes the result."""
    import json
    from pathlib import Path

    import torch.distributed as dist

    from rlhf.infra import distributed

    if not distributed.launched_by_torchrun():
        raise ConfigError(
            "rlhf train-stage runs inside a launcher with WORLD_SIZE > 1: set distributed.num_processes and "
            "let `rlhf run` start it, or start it with torchrun / accelerate launch"
        )
    spec = json.loads(Path(args.spec).read_text())
    distributed.init_process_group()
    try:
        out = run_stage(args.stage, spec)
        if distributed.is_main_process():
            Path(args.result).write_text(json.dumps(out))
        distributed.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from rlhf.builtin.task import resolve_data_paths
    from rlhf.config import load_config

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.source={args.data}")
    if args.base_model:
        overrides.append(f"model.base_model={args.base_model}")
    cfg = load_config(args.config, overrides)
    if not cfg.data.is_builtin:  # fail on a bad data path before the flow starts
        resolve_data_paths(cfg.data, cfg.output_dir, cfg.seed)
    from rlhf.infra.tracking import check_tracking_store

    check_tracking_store()  # and on an unreachable tracking store, before Prefect starts

    from flows.pipeline import rlhf_pipeline
    from tasks.evaluate import format_table

    result = rlhf_pipeline(cfg)
    print("\nEvaluation on held-out prompts (PPO policy vs the SFT policy it started from):")
    print(format_table(result.metrics, cfg.ppo.kl_target))
    print(f"\nRegistered {result.model_uri} (MLflow parent run {result.parent_run_id})")
    print(promotion_summary(result.promotion))
    print(UI_HINT)
    return 0


def promotion_summary(outcome: Any) -> str:
    """Each promotion gate's verdict, the outcome, and how to serve the champion (or what refused it)."""
    lines = [f"\nPromotion of {outcome.model_name} v{outcome.version}:"]
    lines += [f"  {'pass' if g.passed else 'FAIL'}  {g.name:<22} {g.detail}" for g in outcome.gates]
    if outcome.promoted or outcome.status == "champion":
        lines += [
            f"v{outcome.version} is champion (previous: {outcome.previous_champion or 'none'}). Serve it:",
            f"  mlflow models serve -m models:/{outcome.model_name}@champion --env-manager local -h 127.0.0.1 -p 5001",
        ]
    else:
        lines += [
            f"v{outcome.version} was not promoted: {'; '.join(outcome.reasons)}",
            f"The champion is {('v' + outcome.champion) if outcome.champion else 'not set yet'}; docs/evaluation.md explains each gate.",
        ]
    return "\n".join(lines)


def cmd_validate(args: argparse.Namespace) -> int:
    from rlhf.config import load_config
    from tasks.validate import validate_command

    cfg = load_config(args.config)
    return validate_command(
        args.path,
        args.kind,
        cfg.validation,
        tokenizer_path=args.tokenizer,
        report_dir=args.report_dir,
        trust_remote_code=cfg.model.trust_remote_code,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_defaults()
    from rlhf.data.loading import DataError
    from rlhf.infra.integrity import CheckpointCorrupted
    from rlhf.infra.tracking import TrackingUnavailable
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
