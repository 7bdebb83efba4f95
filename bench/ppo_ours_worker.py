"""One timed PPO run of the project's trainer (rlhf/ppo/trainer.py); run by bench/bench_ppo.py.

    PYTHONPATH=. python bench/ppo_ours_worker.py --models outputs/bench/ppo/models --prompts P \
        --steps 30 --batch-size 32 --mini-batch-size 16 --epochs 2 --response-length 48 --seed 0 \
        --out DIR

Loads the SFT policy (with a fresh value head), the frozen reference and the
reward model as tasks/ppo.py does, then times ``PPOTrainer.step`` over --steps
iterations: the trainer alone, without the stage's MLflow logging (that cost is
measured by bench/bench_pipeline.py). Saves the final policy to DIR/policy and
prints one JSON line: wall time, episodes, response tokens, per-step scores and
the trainer's own timing split.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="folder with sft/ and reward/ (bench/ppo_models.py)")
    parser.add_argument("--prompts", required=True, help="prompts.jsonl")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mini-batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--response-length", type=int, default=48)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--normalize-reward", action="store_true", help="the project's default; off to match TRL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="save the final policy to OUT/policy")
    args = parser.parse_args()

    t_import = time.perf_counter()
    from rlhf.infra.env import quiet_defaults

    quiet_defaults()
    import torch

    from models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from models.policy import PolicyWithValueHead
    from rlhf.config import PPOConfig
    from rlhf.ppo.trainer import PPOTrainer

    import_s = time.perf_counter() - t_import
    t_load = time.perf_counter()
    models = Path(args.models)
    sft_dir, rm_dir = str(models / "sft"), str(models / "reward")
    tokenizer = load_tokenizer(sft_dir)
    torch.manual_seed(args.seed)
    policy = PolicyWithValueHead(load_causal_lm(sft_dir))
    ref_model = load_causal_lm(sft_dir)
    reward_model = load_reward_model(rm_dir, tokenizer.pad_token_id)
    prompts = [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    cfg = PPOConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        mini_batch_size=args.mini_batch_size,
        ppo_epochs=args.epochs,
        max_new_tokens=args.response_length,
        temperature=1.0,
        learning_rate=args.learning_rate,
        lr_schedule="constant",  # as the TRL worker's lr_scheduler_type (ours defaults to linear since issue 21)
        kl_control="fixed",
        kl_coef=args.kl_coef,
        kl_horizon=max(1000, args.batch_size),
        normalize_reward=args.normalize_reward,
        missing_eos_penalty=1.0,
        ent_coef=0.0,  # TRL 1.12's PPOTrainer has no entropy bonus (ours defaults to 0.1)
    )
    if cfg.value_head_init == "reward_model":  # as the stage starts a fresh value head (tasks/ppo.py build_trainer)
        policy.init_value_head_from(reward_model)
    trainer = PPOTrainer(cfg, policy, ref_model, reward_model, tokenizer, prompts, args.seed)
    load_s = time.perf_counter() - t_load

    steps = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        t = time.perf_counter()
        m = trainer.step().metrics
        steps.append(
            {
                "step_s": time.perf_counter() - t,
                "tokens": m["response/length_mean"] * args.batch_size,
                "scores": m["objective/scores"],
                "kl": m["objective/kl"],
                "generation_s": m["timing/generation_s"],
                "scoring_s": m["timing/scoring_s"],
                "update_s": m["timing/update_s"],
            }
        )
    wall_s = time.perf_counter() - t0
    if args.out:
        out = Path(args.out) / "policy"
        policy.lm.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    episodes = args.steps * args.batch_size
    tokens = sum(s["tokens"] for s in steps)
    print(
        json.dumps(
            {
                "impl": "ours",
                "seed": args.seed,
                "steps": args.steps,
                "episodes": episodes,
                "tokens": round(tokens),
                "wall_s": wall_s,
                "episodes_per_s": episodes / wall_s,
                "tokens_per_s": tokens / wall_s,
                "import_s": import_s,
                "load_s": load_s,
                "torch_threads": torch.get_num_threads(),
                "generation_s": sum(s["generation_s"] for s in steps),
                "scoring_s": sum(s["scoring_s"] for s in steps),
                "update_s": sum(s["update_s"] for s in steps),
                "scores": [s["scores"] for s in steps],
                "kl": [s["kl"] for s in steps],
                "step_s": [s["step_s"] for s in steps],
            }
        )
    )


if __name__ == "__main__":
    main()
