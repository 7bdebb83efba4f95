"""One timed PPO run of TRL 1.12's `trl.experimental.ppo.PPOTrainer`; run by bench/bench_ppo.py in bench/.venv-trl12.

    bench/.venv-trl12/bin/python bench/ppo_trl_worker.py --models outputs/bench/ppo/models --prompts P \
        --steps 30 --batch-size 32 --mini-batch-size 16 --epochs 2 --response-length 48 --seed 0 --out DIR

Imports only TRL's venv (torch, transformers, trl, datasets), never the project.
Same SFT checkpoint as policy and frozen reference, same reward model; TRL's PPO
needs a separate value model, an AutoModelForSequenceClassification: it starts
from the reward model checkpoint, as in TRL's own PPO example. Our reward model
is already saved as that class (GPT2ForSequenceClassification, num_labels=1,
scored at the last non-pad token, EOS appended), so no conversion is needed.

Settings chosen to match bench/ppo_ours_worker.py: fixed KL coefficient, constant
learning rate, AdamW eps 1e-5 and weight decay 0.01, fp32, no gradient
checkpointing, one optimizer step per minibatch (per_device_train_batch_size =
batch size, num_mini_batches = batch / minibatch, no gradient accumulation), no
reward whitening, no sample generations. Times ``trainer.train()``; prints one
JSON line like the other worker's. The generation and scoring times come from
wrappers on the policy's ``generate`` and forward hooks on the reference, value
and reward models (no-grad calls only); update = the rest.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument(
        "--eval-prompts", default=None, help="TRL requires an eval dataset (unused: no sample generations)"
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mini-batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--response-length", type=int, default=48)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument(
        "--critic",
        choices=("reward_model", "sft"),
        default="reward_model",
        help="the value model's start: the reward model (TRL's example) or the SFT trunk with a zero head, which "
        "knows nothing at first, as ours",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    t_import = time.perf_counter()
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    transformers.utils.logging.set_verbosity_error()
    import_s = time.perf_counter() - t_import

    t_load = time.perf_counter()
    transformers.set_seed(args.seed)
    models = Path(args.models)
    sft_dir, rm_dir = str(models / "sft"), str(models / "reward")
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    tokenizer.padding_side = "left"  # TRL generates from left-padded queries
    policy = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32)
    ref_policy = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, dtype=torch.float32)
    critic_dir = rm_dir if args.critic == "reward_model" else sft_dir
    value_model = AutoModelForSequenceClassification.from_pretrained(critic_dir, num_labels=1, dtype=torch.float32)
    if args.critic == "sft":
        torch.nn.init.zeros_(value_model.score.weight)

    def tokenized(path: str) -> Dataset:
        prompts = [json.loads(line)["prompt"] for line in Path(path).read_text().splitlines() if line.strip()]
        ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        return Dataset.from_dict({"input_ids": ids})

    train = tokenized(args.prompts)
    evaluation = tokenized(args.eval_prompts or args.prompts)

    # Measurement hooks: generated tokens and generation time; no-grad forwards of ref/value/reward.
    counters = {"tokens": 0, "generation_s": 0.0, "scoring_s": 0.0}
    inner_generate = policy.generate
    eos = tokenizer.eos_token_id

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        out = inner_generate(*a, **kw)
        counters["generation_s"] += time.perf_counter() - t
        response = out.sequences[:, kw["input_ids"].shape[1] :]
        is_eos = response == eos
        ended = is_eos.any(1)
        first = torch.where(
            ended, is_eos.float().argmax(1) + 1, torch.full_like(ended, response.shape[1], dtype=torch.long)
        )
        counters["tokens"] += int(first.sum())
        return out

    policy.generate = timed_generate
    starts: dict[int, float] = {}

    def pre(module, _inputs):
        if not torch.is_grad_enabled():
            starts[id(module)] = time.perf_counter()

    def post(module, _inputs, _output):
        if id(module) in starts:
            counters["scoring_s"] += time.perf_counter() - starts.pop(id(module))

    for module in (ref_policy, reward_model.transformer, reward_model.score, value_model.transformer):
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    class Collect(TrainerCallback):
        def __init__(self):
            self.logs: list[dict] = []

        def on_log(self, _args, _state, _control, logs=None, **kwargs):
            if logs and "objective/scores" in logs:
                self.logs.append(dict(logs))

    collect = Collect()
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        config = PPOConfig(
            output_dir=tmp,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            seed=args.seed,
            data_seed=args.seed,
            dataloader_num_workers=0,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            num_mini_batches=args.batch_size // args.mini_batch_size,
            num_ppo_epochs=args.epochs,
            total_episodes=args.steps * args.batch_size,
            local_rollout_forward_batch_size=args.batch_size,
            response_length=args.response_length,
            stop_token="eos",
            temperature=1.0,
            missing_eos_penalty=1.0,
            kl_coef=args.kl_coef,
            kl_estimator="k1",
            cliprange=0.2,
            cliprange_value=0.2,
            vf_coef=0.1,
            gamma=1.0,
            lam=0.95,
            whiten_rewards=False,
            learning_rate=args.learning_rate,
            lr_scheduler_type="constant",
            adam_epsilon=1e-5,
            weight_decay=0.01,
            num_sample_generations=0,
        )
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=policy,
            ref_model=ref_policy,
            reward_model=reward_model,
            train_dataset=train,
            value_model=value_model,
            eval_dataset=evaluation,
            callbacks=[collect],
        )
        trainer.remove_callback(transformers.PrinterCallback)
        load_s = time.perf_counter() - t_load

        t0 = time.perf_counter()
        trainer.train()
        wall_s = time.perf_counter() - t0

    if args.out:
        out = Path(args.out) / "policy"
        policy.save_pretrained(out, safe_serialization=True)
        tokenizer.padding_side = "right"
        tokenizer.save_pretrained(out)
    episodes = args.steps * args.batch_size
    print(
        json.dumps(
            {
                "impl": "trl",
                "trl_version": trl.__version__,
                "transformers_version": transformers.__version__,
                "seed": args.seed,
                "steps": args.steps,
                "episodes": episodes,
                "tokens": counters["tokens"],
                "wall_s": wall_s,
                "episodes_per_s": episodes / wall_s,
                "tokens_per_s": counters["tokens"] / wall_s,
                "import_s": import_s,
                "load_s": load_s,
                "torch_threads": torch.get_num_threads(),
                "generation_s": counters["generation_s"],
                "scoring_s": counters["scoring_s"],
                "update_s": wall_s - counters["generation_s"] - counters["scoring_s"],
                "scores": [log["objective/scores"] for log in collect.logs],
                "kl": [log["objective/kl"] for log in collect.logs],
            }
        )
    )


if __name__ == "__main__":
    main()
