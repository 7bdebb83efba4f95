"""The built-in, seeded customer-support data set (the embedded default).

`write_builtin_dataset` writes JSONL files in TRL's standard formats:

- ``sft.jsonl``: ``prompt``, ``completion`` demonstrations by agents of mixed
  quality (some rude, vague, wrong or rambling), so the SFT model is a mediocre
  agent that RLHF can improve;
- ``preferences.jsonl``: ``prompt``, ``chosen``, ``rejected`` labelled by a
  noisy, length-biased rater;
- ``preferences_heldout.jsonl``: pairs on held-out prompts ordered by the gold
  judge itself (ties dropped), to measure reward-model accuracy;
- ``prompts.jsonl`` (PPO) and ``heldout_prompts.jsonl`` (evaluation): ``prompt``.

Held-out prompts never occur in any training file.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from rlhf.builtin import support
from rlhf.builtin.judge import GoldJudge, NoisyRater
from rlhf.data.formats import FILES


@dataclass(frozen=True)
class BuiltinSizes:
    """Row counts of the built-in data set."""

    sft: int = 2000
    preferences: int = 6000
    preferences_heldout: int = 500
    prompts: int = 2000
    heldout_prompts: int = 128
    heldout_fraction: float = 0.2
    """Share of each intent's distinct prompts reserved for held-out evaluation."""
    non_answer_fraction: float = 0.15
    """Share of training preference pairs whose second response is a polite non-answer (`sample_non_answer`)."""


@dataclass(frozen=True)
class Prompt:
    text: str
    intent: str
    item: str


def all_prompts(intent: str) -> list[Prompt]:
    """Every distinct prompt of an intent, in a fixed order."""
    out = []
    for request in support.REQUESTS[intent]:
        items = support.ITEMS if "{item}" in request else ("",)
        for item in items:
            for opener in support.OPENERS:
                for suffix in support.SUFFIXES:
                    body = request.format(item=item)
                    message = opener + body if opener else body[0].upper() + body[1:]
                    out.append(Prompt(support.format_prompt(message + suffix), intent, item))
    return out


def split_prompts(
    rng: random.Random, intents: tuple[str, ...], heldout_fraction: float
) -> tuple[dict[str, list[Prompt]], dict[str, list[Prompt]]]:
    """Per-intent (train, held-out) prompt lists with no overlap."""
    train, heldout = {}, {}
    for intent in intents:
        prompts = all_prompts(intent)
        rng.shuffle(prompts)
        n_held = max(1, int(len(prompts) * heldout_fraction))
        heldout[intent], train[intent] = prompts[:n_held], prompts[n_held:]
    return train, heldout


def sample_prompt(rng: random.Random, pool: dict[str, list[Prompt]]) -> Prompt:
    """Intent uniformly, then a prompt of that intent."""
    return rng.choice(pool[rng.choice(sorted(pool))])


def sample_response(rng: random.Random, prompt: Prompt) -> str:
    """A response by an agent of mixed quality (the demonstrators' distribution)."""
    parts: list[str] = []
    u = rng.random()
    if u < 0.45:
        parts.append(rng.choice(support.POLITE_OPENINGS))
    elif u > 0.8:
        parts.append(rng.choice(support.RUDE_OPENINGS))
    u = rng.random()
    if u < 0.55:
        answer_intent = prompt.intent
    elif u < 0.75:
        answer_intent = rng.choice([i for i in support.TRAIN_INTENTS if i != prompt.intent])
    else:
        answer_intent = ""
    if answer_intent:
        item = prompt.item or rng.choice(support.ITEMS)
        parts.append(rng.choice(support.ANSWERS[answer_intent]).format(item=item))
    else:
        parts.append(rng.choice(support.VAGUE_ANSWERS))
    parts.extend(rng.sample(support.FILLERS, rng.choice([0, 0, 1, 1, 2, 3])))
    if rng.random() < 0.5:
        parts.append(rng.choice(support.CLOSINGS))
    return " ".join(parts)


def sample_non_answer(rng: random.Random) -> str:
    """A polite reply that answers nothing (an opening, sometimes a closing): what a policy drifts to when
    politeness pays. Raters see it in preference pairs, so the reward model learns where it ranks."""
    parts = [rng.choice(support.POLITE_OPENINGS)]
    if rng.random() < 0.5:
        parts.append(rng.choice(support.CLOSINGS))
    return " ".join(parts)


def build_builtin_rows(seed: int = 0, sizes: BuiltinSizes = BuiltinSizes()) -> dict[str, list[dict]]:
    """All splits of the built-in data set as lists of rows (deterministic in seed)."""
    rng = random.Random(seed)
    train, heldout = split_prompts(rng, support.TRAIN_INTENTS, sizes.heldout_fraction)
    rater, judge = NoisyRater(), GoldJudge()

    sft = []
    for _ in range(sizes.sft):
        p = sample_prompt(rng, train)
        sft.append({"prompt": p.text, "completion": " " + sample_response(rng, p)})

    preferences = []
    for _ in range(sizes.preferences):
        p = sample_prompt(rng, train)
        a = sample_response(rng, p)
        b = sample_non_answer(rng) if rng.random() < sizes.non_answer_fraction else sample_response(rng, p)
        while b == a:
            b = sample_response(rng, p)
        chosen, rejected = rater.label(p.text, a, b, rng)
        preferences.append({"prompt": p.text, "chosen": " " + chosen, "rejected": " " + rejected})

    heldout_pairs = []
    while len(heldout_pairs) < sizes.preferences_heldout:
        p = sample_prompt(rng, heldout)
        a, b = sample_response(rng, p), sample_response(rng, p)
        sa, sb = judge.score(p.text, a), judge.score(p.text, b)
        if sa == sb:
            continue
        chosen, rejected = (a, b) if sa > sb else (b, a)
        heldout_pairs.append({"prompt": p.text, "chosen": " " + chosen, "rejected": " " + rejected})

    prompts = [{"prompt": sample_prompt(rng, train).text} for _ in range(sizes.prompts)]
    flat_heldout = [p for intent in sorted(heldout) for p in heldout[intent]]
    rng.shuffle(flat_heldout)
    # Balanced over intents: round-robin through the shuffled per-intent lists.
    by_intent = {i: [p for p in flat_heldout if p.intent == i] for i in sorted(heldout)}
    balanced = [p for group in zip(*by_intent.values()) for p in group]
    heldout_prompts = [{"prompt": p.text} for p in balanced[: sizes.heldout_prompts]]
    return {
        "sft": sft,
        "preferences": preferences,
        "preferences_heldout": heldout_pairs,
        "prompts": prompts,
        "heldout_prompts": heldout_prompts,
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_builtin_dataset(out_dir: str | Path, seed: int = 0, sizes: BuiltinSizes = BuiltinSizes()) -> dict[str, Path]:
    """Write every split as JSONL under out_dir; returns split name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in build_builtin_rows(seed, sizes).items():
        paths[split] = out / FILES[split]
        write_jsonl(paths[split], rows)
    return paths
