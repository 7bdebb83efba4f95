"""Benchmark: our PPO trainer against TRL 1.12's `trl.experimental.ppo.PPOTrainer`, side by side.

    PYTHONPATH=. .venv/bin/python bench/bench_ppo.py [--repeats 3] [--steps 30] [--batch-size 32] \
        [--mini-batch-size 16] [--epochs 2] [--response-length 48]        (or: make bench-ppo)

One invocation runs both trainers --repeats times (seeds 0, 1, ...), alternating
which goes first, each in a fresh process: ours in the project's venv
(bench/ppo_ours_worker.py), TRL in bench/.venv-trl12 (bench/ppo_trl_worker.py;
created here with pip if missing: torch==2.13.0, trl==1.12.*). Both start from
the same SFT checkpoint and reward model (bench/ppo_models.py, built once with
the project's stage functions) and use the same prompts, batch size, minibatch
size, PPO epochs, response length, temperature, learning rate and fixed KL
coefficient.

Reported, per seed and as median (min-max) over seeds:
- episodes/s and response tokens/s of the training loop (model loading excluded),
  and their ratio ours/TRL from the runs of the same seed (adjacent in time, so
  both saw the same machine load);
- the time split: generation, scoring (no-grad forwards) and update;
- reward gain in the same number of episodes: the reward model's mean score and
  the gold judge's mean score on the 128 held-out prompts (2 samples each, same
  sampling code and seed for every policy) of each final policy minus the SFT
  policy's.
Writes bench/results/ppo-<time>.json (and ppo-latest.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, WORK, git_commit, loadavg, machine, offline_env, summary, versions, write_result
from ppo_models import ensure_models

from rlhf.infra.env import MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD

TRL_VENV = ROOT / "bench" / ".venv-trl12"
TRL_REQUIREMENTS = ["torch==2.13.0", "trl==1.12.*"]
"""torch pinned: 2.13.0 is the local CPU wheel; a looser pin downloads a multi-GB CUDA build."""
SAME_ALLOCATOR = {
    "MALLOC_MMAP_THRESHOLD_": str(MALLOC_MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(MALLOC_TRIM_THRESHOLD),
}
"""Both workers get the malloc settings our stages set for themselves (rlhf/infra/env.py keep_freed_memory), through
glibc's own variables: the comparison is of the PPO code, not of the allocator."""


def ensure_trl_venv() -> Path:
    """bench/.venv-trl12 with TRL 1.12 (pip resolves the transformers it needs); its python."""
    python = TRL_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *TRL_REQUIREMENTS], check=True)
    return python


def trl_versions(python: Path) -> dict[str, str]:
    code = "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in ('trl', 'transformers', 'torch', 'accelerate')}))"
    return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)


def run_worker(impl: str, python: Path, paths: dict[str, str], args: argparse.Namespace, seed: int, out: Path) -> dict:
    """One timed run in a fresh process; its JSON line plus the load average around it."""
    script = ROOT / "bench" / f"ppo_{impl}_worker.py"
    cmd = [
        str(python),
        str(script),
        "--models",
        str(Path(paths["sft"]).parent),
        "--prompts",
        paths["prompts"],
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--mini-batch-size",
        str(args.mini_batch_size),
        "--epochs",
        str(args.epochs),
        "--response-length",
        str(args.response_length),
        "--kl-coef",
        str(args.kl_coef),
        "--learning-rate",
        str(args.learning_rate),
        "--seed",
        str(seed),
        "--out",
        str(out),
    ]
    if impl == "trl":
        cmd += ["--eval-prompts", paths["heldout_prompts"], "--critic", args.trl_critic]
    load_before = loadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=offline_env(**SAME_ALLOCATOR), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(process_s=time.perf_counter() - t0, load_before=load_before, load_after=loadavg())
    (out / "result.json").write_text(json.dumps(result, indent=2))  # kept even if a later run fails
    print(
        f"  {impl:5s} seed {seed}: {result['episodes_per_s']:.2f} episodes/s, {result['tokens_per_s']:.0f} tokens/s, "
        f"loop {result['wall_s']:.1f} s, load {load_before[0]:.1f}",
        flush=True,
    )
    return result


def evaluate(policy_dirs: dict[str, str], paths: dict[str, str], response_length: int, samples: int, seed: int) -> dict:
    """Mean reward-model and gold-judge score of each policy on the held-out prompts."""
    from rlhf.infra.env import quiet_defaults

    quiet_defaults()
    import torch

    from models.generation import decode_responses, sample
    from models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from models.reward import score_token_ids
    from rlhf.builtin.judge import GoldJudge

    tokenizer = load_tokenizer(paths["sft"])
    reward_model = load_reward_model(paths["reward"], tokenizer.pad_token_id).eval()
    judge = GoldJudge()
    prompts = [json.loads(x)["prompt"] for x in Path(paths["heldout_prompts"]).read_text().splitlines() if x.strip()]
    prompts = [p for p in prompts for _ in range(samples)]
    out = {}
    for name, path in policy_dirs.items():
        policy = load_causal_lm(path).eval()
        torch.manual_seed(seed)
        rm, gold, length = [], [], []
        for i in range(0, len(prompts), 64):
            batch = prompts[i : i + 64]
            rollout = sample(policy, tokenizer, batch, response_length, 1.0)
            with torch.no_grad():
                rm += score_token_ids(
                    reward_model, rollout.input_ids, rollout.attention_mask, tokenizer.pad_token_id
                ).tolist()
            gold += [judge.score(p, r) for p, r in zip(batch, decode_responses(tokenizer, rollout))]
            length += rollout.lengths.tolist()
        out[name] = {
            "rm_score": sum(rm) / len(rm),
            "gold_score": sum(gold) / len(gold),
            "length": sum(length) / len(length),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(WORK / "ppo"), help="models, data and final policies")
    parser.add_argument("--repeats", type=int, default=3, help="seeds 0..repeats-1, each trainer once per seed")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mini-batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--response-length", type=int, default=48)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--eval-samples", type=int, default=2, help="responses per held-out prompt in the evaluation")
    parser.add_argument("--sft-steps", type=int, default=120)
    parser.add_argument("--reward-steps", type=int, default=160)
    parser.add_argument(
        "--trl-critic",
        choices=("reward_model", "sft"),
        default="reward_model",
        help="where TRL's value model starts: the reward model (TRL's example, the default) or the SFT trunk with a "
        "zero head, which knows nothing at first, as our value head (docs/benchmarks.md: what the reward gap is)",
    )
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="only score the final policies already under <work>/runs/*/policy (bench/results/ppo-eval-*.json)",
    )
    args = parser.parse_args()

    work = Path(args.work).resolve()
    if args.evaluate_only:
        paths = ensure_models(work, args.sft_steps, args.reward_steps)
        policies = {
            "sft": paths["sft"],
            **{d.name: str(d / "policy") for d in sorted((work / "runs").glob("*")) if (d / "policy").exists()},
        }
        scores = evaluate(policies, paths, args.response_length, args.eval_samples, seed=1234)
        gains = {
            k: {
                "rm_gain": v["rm_score"] - scores["sft"]["rm_score"],
                "gold_gain": v["gold_score"] - scores["sft"]["gold_score"],
            }
            for k, v in scores.items()
            if k != "sft"
        }
        path = write_result(
            "ppo-eval",
            {
                "machine": machine(),
                "commit": git_commit(),
                "load_at_end": loadavg(),
                "scores": scores,
                "gains": gains,
                "eval_samples": args.eval_samples,
            },
        )
        print(json.dumps({"scores": scores, "gains": gains}, indent=2))
        print(f"wrote {path}")
        return
    trl_python = ensure_trl_venv()
    paths = ensure_models(work, args.sft_steps, args.reward_steps)
    print(f"models: {Path(paths['sft']).parent}, TRL venv: {TRL_VENV}", flush=True)

    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    policies = {"sft": paths["sft"]}
    for seed in range(args.repeats):
        order = ["ours", "trl"] if seed % 2 == 0 else ["trl", "ours"]
        for impl in order:
            out = work / "runs" / f"{impl}-seed{seed}"
            python = trl_python if impl == "trl" else Path(sys.executable)
            runs[impl].append(run_worker(impl, python, paths, args, seed, out))
            policies[f"{impl}-seed{seed}"] = str(out / "policy")

    print("evaluating the final policies on held-out prompts", flush=True)
    t0 = time.perf_counter()
    scores = evaluate(policies, paths, args.response_length, args.eval_samples, seed=1234)
    eval_s = time.perf_counter() - t0
    for impl in runs:
        for run in runs[impl]:
            name = f"{impl}-seed{run['seed']}"
            run["heldout"] = scores[name]
            run["rm_gain"] = scores[name]["rm_score"] - scores["sft"]["rm_score"]
            run["gold_gain"] = scores[name]["gold_score"] - scores["sft"]["gold_score"]
            first, last = run["scores"][:3], run["scores"][-3:]
            run["train_score_gain"] = sum(last) / len(last) - sum(first) / len(first)

    def agg(impl: str, key: str) -> dict:
        return summary([r[key] for r in runs[impl]])

    ratios = {
        key: summary([o[key] / t[key] for o, t in zip(runs["ours"], runs["trl"])])
        for key in ("episodes_per_s", "tokens_per_s")
    }
    result = {
        "machine": machine(),
        "commit": git_commit(),
        "load_at_end": loadavg(),
        "versions": {
            "ours": versions("torch", "transformers", "trl", "accelerate"),
            "trl_venv": trl_versions(trl_python),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "work"},
        "models": json.loads(Path(paths["info"]).read_text()),
        "sft_heldout": scores["sft"],
        "eval_s": eval_s,
        "ratio_ours_over_trl": ratios,
        "summary": {
            impl: {
                key: agg(impl, key)
                for key in (
                    "episodes_per_s",
                    "tokens_per_s",
                    "wall_s",
                    "generation_s",
                    "scoring_s",
                    "update_s",
                    "rm_gain",
                    "gold_gain",
                    "train_score_gain",
                )
            }
            for impl in runs
        },
        "runs": runs,
    }
    path = write_result("ppo", result)
    s = result["summary"]
    print(f"\nmedian (min-max) over {args.repeats} seeds, {args.steps} steps x {args.batch_size} episodes:")
    for impl in runs:
        print(
            f"  {impl:5s} {s[impl]['episodes_per_s']['median']:.2f} episodes/s, {s[impl]['tokens_per_s']['median']:.0f} tokens/s, "
            f"held-out RM gain {s[impl]['rm_gain']['median']:+.3f}, gold gain {s[impl]['gold_gain']['median']:+.3f}"
        )
    r = ratios["episodes_per_s"]
    print(f"  ratio ours/TRL episodes/s: {r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}); load at end {loadavg()}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
