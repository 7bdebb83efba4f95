"""The parts of our PPO loop that issue 21's third round changed, each timed against what it replaced.

    PYTHONPATH=.:bench python bench/ppo_parts.py [--repeats 7]

On bench/bench_ppo.py's models and prompts (built if missing), one process, the alternatives interleaved
(ABAB...) so that a change of load hits both; medians over --repeats:
- sampler: ``torch.multinomial`` over a (32, V) softmax (what ``generate()`` draws with) against
  ``models.generation.draw`` (inverse CDF, float64), microseconds per draw;
- decode: ``models.generation.sample`` of 32 prompts x 48 tokens with the value head, at ``COMPACT_AT`` 2
  (ended rows stay in the batch until the last ends) and at several shares; the same tokens for every share
  (each row draws its own uniform), seconds per batch;
- scoring: the frozen reference and reward model over a rollout of 32 in one padded batch against
  ``SCORING_CHUNKS`` length-sorted trimmed chunks, milliseconds per rollout;
- optimizer: one AdamW step over the policy and value head, torch's CPU default (a Python loop over
  tensors), foreach, and fused, milliseconds per step.
Writes bench/results/ppo-parts-<UTC>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from _common import WORK, git_commit, loadavg, machine, summary, write_result
from ppo_models import ensure_models


def timed(fn: Callable[[], object], inner: int) -> float:
    """Seconds per call of ``fn``, over ``inner`` calls."""
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, inner: int) -> dict[str, dict]:
    """Each variant timed ``repeats`` times, variants alternating; summaries of seconds per call."""
    for fn in variants.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, inner))
    return {name: summary(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(WORK / "ppo"), help="bench/bench_ppo.py's models and data")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import torch

    from models import generation
    from models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from models.policy import PolicyWithValueHead
    from rlhf.config import PPOConfig
    from rlhf.ppo import trainer as ppo_trainer

    paths = ensure_models(Path(args.work), 120, 160)
    tokenizer = load_tokenizer(paths["sft"])
    torch.manual_seed(0)
    policy = PolicyWithValueHead(load_causal_lm(paths["sft"]))
    reward_model = load_reward_model(paths["reward"], tokenizer.pad_token_id)
    prompts = [json.loads(x)["prompt"] for x in Path(paths["prompts"]).read_text().splitlines() if x.strip()]
    batches = [prompts[32 * b : 32 * b + 32] for b in range(4)]
    results: dict[str, dict] = {}

    # Sampler: one draw for a batch of 32 over the vocabulary.
    logprobs = torch.log_softmax(3 * torch.randn(32, len(tokenizer)), -1)
    results["sampler_s"] = interleaved(
        {
            "multinomial": lambda: torch.multinomial(logprobs.exp(), 1),
            "inverse_cdf": lambda: generation.draw(logprobs, generation.uniforms(32, logprobs.device)),
        },
        args.repeats,
        inner=200,
    )

    # Decode: the same four batches (seeded) at each share; tokens do not depend on it.
    def decode_at(share: float) -> Callable[[], object]:
        def run() -> None:
            generation.COMPACT_AT = share
            for b, batch in enumerate(batches):
                torch.manual_seed(b)
                generation.sample(policy.lm, tokenizer, batch, 48, 1.0, policy.value_head)

        return run

    default_share = generation.COMPACT_AT
    results["decode_s_per_4_batches"] = interleaved(
        {f"compact_at_{share:g}": decode_at(share) for share in (2.0, 0.5, default_share, 0.125)}, args.repeats, 1
    )
    generation.COMPACT_AT = default_share
    torch.manual_seed(0)
    rollouts = [generation.sample(policy.lm, tokenizer, batch, 48, 1.0, policy.value_head) for batch in batches]

    # Scoring: the trainer's own method, with one chunk (one padded batch) and with the default.
    cfg = PPOConfig(batch_size=32, mini_batch_size=16, max_new_tokens=48, kl_horizon=1000)
    trainer = ppo_trainer.PPOTrainer(cfg, policy, load_causal_lm(paths["sft"]), reward_model, tokenizer, prompts, 0)
    default_chunks = ppo_trainer.SCORING_CHUNKS

    def score_in(chunks: int) -> Callable[[], object]:
        def run() -> None:
            ppo_trainer.SCORING_CHUNKS = chunks
            with torch.no_grad():
                for rollout in rollouts:
                    trainer._score_frozen(rollout, slice(None))

        return run

    results["scoring_s_per_4_rollouts"] = interleaved(
        {f"chunks_{n}": score_in(n) for n in sorted({1, default_chunks, 4})}, args.repeats, 1
    )
    ppo_trainer.SCORING_CHUNKS = default_chunks

    # Optimizer: one step over every trained tensor with stand-in gradients.
    params = [p for p in policy.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizers = {
        "default": torch.optim.AdamW(params, lr=1e-9, eps=1e-5),
        "foreach": torch.optim.AdamW(params, lr=1e-9, eps=1e-5, foreach=True),
        "fused": torch.optim.AdamW(params, lr=1e-9, eps=1e-5, fused=True),
    }
    results["adamw_step_s"] = interleaved({k: opt.step for k, opt in optimizers.items()}, args.repeats, inner=50)

    lengths = torch.cat([r.lengths for r in rollouts]).float()
    out = write_result(
        "ppo-parts",
        {
            "machine": machine(),
            "commit": git_commit(),
            "load_at_end": loadavg(),
            "torch_threads": torch.get_num_threads(),
            "rollout_lengths": {"mean": lengths.mean().item(), "max_new_tokens": 48, "batch": 32},
            "results": results,
        },
    )
    for part, variants in results.items():
        base = statistics.median(next(iter(variants.values()))["values"])
        for name, s in variants.items():
            print(f"{part:26s} {name:16s} {s['median'] * 1e3:9.3f} ms  ({s['median'] / base:.2f}x the first)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
