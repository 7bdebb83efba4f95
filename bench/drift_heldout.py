"""Drift detection measured out of sample: thresholds calibrated on one half, rates measured on the other.

    export MLFLOW_DISABLE_TELEMETRY=true PYTHONPATH=.
    W=/tmp/bench/drift-heldout
    python bench/drift_heldout.py --work $W stack --overopt /tmp/bench/overopt   # or no stack: a small champion
    python bench/drift_heldout.py --work $W rows        # baseline and row pools (two processes may share the work)
    python bench/drift_heldout.py --work $W calibrate   # bench/results/drift_calibration.json
    python bench/drift_heldout.py --work $W evaluate    # bench/results/drift_*.json
    python bench/drift_heldout.py --work $W report      # markdown tables, docs/images/drift_sensitivity.png

1. The champion: work/stack/{policy,reference,reward} (``stack`` links bench/overoptimization.py's checkpoints
   there), else bench/drift_detection.py's small champion (SFT 120 steps, reward model 160, PPO 10; built once
   per --work folder); and its baseline, computed as the register stage does (tasks.baseline.compute_baseline
   on the data set's held-out and PPO prompts, seed 0).
2. Row pools, sampled FRESH from the champion: a *calibration* split (sampling seed 11, prompts from half 0 of
   the prompt space, rlhf.builtin.traffic.prompt_part) and an *evaluation* split (seed 22, half 1): no prompt
   and no sample is shared between them or with the baseline's samples. Every row's features (tokens, intent,
   embedding, reward-model score, length, NLL, refusal, violation, gold; a sampled KL(champion || reference)
   on a share of the rows) are computed once with the monitor's own feature functions
   (rlhf/drift/features.py), so a window costs only its tests.
3. An evaluation window takes rows no other window of its figure (or cell) has taken (Disjoint): the windows
   a rate rests on are independent samples of the policy, as the Wilson intervals assume. It subsamples them
   as tasks.monitor.window_features does (embedding_rows, kl_prompts, scored_rows), draws simulated feedback
   (30% of rows, thumbs up with probability sigmoid(gold / 0.5)), and goes through the monitor's tests and
   diagnosis (rlhf.drift.signals.compute_signals, rlhf.drift.diagnosis.diagnose). A figure gets as many
   windows as its pools hold (windows_that_fit), up to the number asked for.

``calibrate`` reads only calibration-split clean windows (drawn at random from one 2000-row pool: they
overlap); ``evaluate`` only evaluation-split windows with the thresholds ``calibrate`` wrote.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
IMAGES = ROOT / "docs" / "images"
CALIBRATION_FILE = RESULTS / "drift_calibration.json"
SPLITS = {"calibration": {"seed": 11, "part": 0}, "evaluation": {"seed": 22, "part": 1}}
SHARES = (0.02, 0.05, 0.1, 0.2, 0.3)
SIZES = (100, 500, 2000)
FEEDBACK_RATE = 0.3
QUANTILE = 0.99
"""Calibration rule: an effect floor is this quantile of the effect over clean calibration windows."""
FLOOR_ROWS = 1000
"""Window size of the clean calibration windows the effect floors come from."""
MIN_FLOOR = 1e-6
"""A floor the rule puts at or below 0 (a drop that clean windows never show) becomes this: no effect floor."""
CUSUM_DRIFT = 2.0
"""CUSUM reference value k, set before any evaluation: between the score's null mean (<= 1) and the score at
which the window test alarms (-ln 0.01 = 4.6)."""
CUSUM_ARL0 = 100.0
"""CUSUM false-alarm target: mean windows between false alarms under no drift (the window test's 1%)."""

# Kinds the simulator does not name: the monitor has no signal made for them.
UNNAMED = ("register_shift", "truncated_responses", "templated_responses")
TEXTING = (
    ("I want", "i want"),
    ("I would like", "i'd like"),
    ("please", "pls"),
    ("Please", "pls"),
    ("Thank you.", "thx"),
    ("Thanks.", "thx"),
    ("you", "u"),
    ("my", "my"),
    ("cannot", "cant"),
    ("I ", "i "),
)
TEMPLATES = (
    " Thank you for contacting us. An agent will get back to you shortly.",
    " Thank you for your message. We will reply within 24 hours.",
    " Your request has been received. Reference number 0000.",
)


def register_shift(prompt: str, rng: random.Random) -> str:
    """The customer message rewritten as a hurried text: lower case, no greeting, abbreviations, no full stops."""
    from rlhf.builtin import support

    text = support.customer_message(prompt)
    for opener in sorted(support.OPENERS, key=len, reverse=True):
        if opener and text.startswith(opener):
            text = text[len(opener) :]
            break
    for old, new in TEXTING:
        text = text.replace(old, new)
    text = text.replace(".", "").replace(",", "").lower()
    return support.format_prompt(text + rng.choice(("", " asap", " !!", " ??", " now")))


@dataclass
class Rows:
    """Per-row features of one pool (one kind of one split), in row order."""

    prompts: list[str]
    responses: list[str]
    token_ids: list[list[int]]
    intents: list[str]
    lengths: np.ndarray
    embeddings: np.ndarray  # (N, H)
    kl: np.ndarray
    rm: np.ndarray
    response_lengths: np.ndarray
    nll: np.ndarray
    refusal: np.ndarray
    violation: np.ndarray
    gold: np.ndarray

    def __len__(self) -> int:
        return len(self.prompts)


def setup(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
    sys.path.insert(0, str(ROOT / "bench"))
    from rlhf.infra.env import quiet_defaults

    quiet_defaults()
    import torch

    torch.set_num_threads(1)


def champion_and_baseline(work: Path):
    """The champion's models and a baseline with per-prompt token ids (computed once, kept in work/baseline).

    With work/stack/{policy,reference,reward} (checkpoint folders in Hugging Face layout) those are the
    champion, its reference and reward model; otherwise bench/drift_detection.py's small champion is
    trained and registered in work/mlflow.db.
    """
    from rlhf.builtin.task import SUPPORT_TASK, resolve_data_paths
    from rlhf.config import MonitorConfig, load_config
    from rlhf.drift.profile import Baseline
    from tasks.baseline import compute_baseline, read_prompts
    from tasks.monitor import MonitorModels, load_models

    cfg = load_config(None, ["seed=0"])
    stack = work / "stack"
    if (stack / "policy").is_dir():
        from models.loading import load_causal_lm, load_reward_model, load_tokenizer

        tokenizer = load_tokenizer(str(stack / "reference"), False)
        models = MonitorModels(
            None,  # type: ignore[arg-type]  # no registry: the bench reads lineage.version nowhere
            None,  # type: ignore[arg-type]
            tokenizer,
            load_causal_lm(str(stack / "policy")).eval(),
            load_causal_lm(str(stack / "reference")).eval(),
            load_reward_model(str(stack / "reward"), tokenizer.pad_token_id).eval(),
        )
    else:
        from drift_detection import MODEL_NAME, build_champion

        build_champion(work, 10)
        models = load_models(MonitorConfig(registered_model=MODEL_NAME))
    folder = work / "baseline"
    if (folder / "profile.json").exists():
        models.baseline = Baseline.load(folder)
        return models
    paths = resolve_data_paths(cfg.data, work, cfg.seed)
    t0 = time.perf_counter()
    models.baseline = compute_baseline(
        models.policy,
        models.reference,
        models.reward_model,
        models.tokenizer,
        read_prompts([paths["heldout_prompts"], paths["prompts"]]),
        max_new_tokens=cfg.ppo.max_new_tokens,
        temperature=cfg.ppo.temperature,
        task=SUPPORT_TASK,
        seed=0,
    )
    models.baseline.save(folder)
    print(f"baseline in {time.perf_counter() - t0:.0f} s", flush=True)
    return models


def build_rows(models, kind: str, n: int, seed: int, part: int, clean: Rows | None, kl_every: int = 1) -> Rows:
    """Sample n rows of a kind from the champion and compute their features (the monitor's functions).

    KL(champion || reference) is sampled on every `kl_every`-th row only (nan elsewhere): a window measures it on
    64 of its prompts (kl_prompts), so most rows never need it, and it is a third of a row's cost. The other rows'
    own answers are the same draw (sample_responses at the same temperature) without the two log-prob passes.
    """
    import torch

    from rlhf.builtin import traffic
    from rlhf.builtin.task import SUPPORT_TASK
    from rlhf.drift.features import (
        embed_prompts,
        max_sequence_length,
        prompt_features,
        response_features,
        sample_kl,
        sample_responses,
    )

    gen = models.baseline.profile["generation"]
    mnt, temp = int(gen["max_new_tokens"]), float(gen["temperature"])
    tok, policy = models.tokenizer, models.policy
    rng = random.Random(seed)
    torch.manual_seed(seed)
    room = max_sequence_length(policy, tok)
    # 1. prompts of the kind, in one half of the prompt space, leaving room for a response
    prompts: list[str] = []
    while len(prompts) < n:
        if kind == "register_shift":
            prompt = register_shift(traffic.clean_prompt(rng, part), rng)  # type: ignore[arg-type]
        else:
            base = kind if kind in traffic.DRIFT_KINDS else "clean"
            prompt = traffic.drifted_prompt(base, rng, part)  # type: ignore[arg-type]
        if len(tok(prompt, add_special_tokens=False)["input_ids"]) + mnt <= room:
            prompts.append(prompt)
    # 2. the champion's own sample on each prompt (its KL to the reference on every kl_every-th row)
    with_kl = list(range(0, n, kl_every))
    own_kl, kl_values = sample_kl(policy, models.reference, tok, [prompts[j] for j in with_kl], mnt, temp, 64)
    kl = np.full(n, np.nan)
    kl[with_kl] = kl_values
    needs_own = kind not in ("degraded_policy", "reward_hacking", "templated_responses")
    without = [j for j in range(n) if j % kl_every]
    own_rest = sample_responses(policy, tok, [prompts[j] for j in without], mnt, temp, 64) if needs_own else []
    own = [""] * n
    for j, r in zip(with_kl, own_kl):
        own[j] = r
    for j, r in zip(without, own_rest):
        own[j] = r
    if kind == "degraded_policy":
        served = sample_responses(policy, tok, prompts, mnt, 1.6, 64)
    elif kind == "reward_hacking":
        assert clean is not None
        pairs = traffic._hacking_pairs(
            models.reward_model, tok, prompts, list(zip(clean.prompts, clean.responses)), rng, 64
        )
        served = [r for _, r in pairs]
    elif kind == "truncated_responses":  # a serving config that cuts generation at 6 tokens
        served = [tok.decode(tok(r, add_special_tokens=False)["input_ids"][:6]) or r for r in own]
    elif kind == "templated_responses":  # a fallback template served instead of the model
        served = [rng.choice(TEMPLATES) for _ in prompts]
    else:
        served = own
    # 3. features, as the monitor computes them
    pf = prompt_features(tok, prompts, SUPPORT_TASK)
    rf = response_features(policy, models.reward_model, tok, prompts, served, SUPPORT_TASK, 64)
    return Rows(
        prompts,
        served,
        pf.token_ids or [],
        pf.intents,
        pf.lengths,
        embed_prompts(models.reference, tok, prompts, 64),
        kl,
        rf.rm_scores,
        rf.lengths,
        rf.nll,
        rf.refusal,
        rf.violation,
        rf.gold if rf.gold is not None else np.full(len(prompts), np.nan),
    )


def concat_rows(parts: list[Rows]) -> Rows:
    """One pool of several chunks, in chunk order."""
    out = {}
    for name in Rows.__dataclass_fields__:
        values = [getattr(r, name) for r in parts]
        out[name] = np.concatenate(values) if isinstance(values[0], np.ndarray) else [x for v in values for x in v]
    return Rows(**out)


def row_jobs(args) -> list[tuple[str, str, int, int, int, int]]:
    """(split, kind, chunk, rows, seed, kl_every) of every chunk the pools are made of, in the order they are built.

    The calibration split is one chunk of clean rows, KL on every row (its windows overlap: the floors are
    quantiles of 100 windows of 1000 rows drawn from it). The evaluation split's pools are big enough that the
    windows of one figure never share a row (see Disjoint); they are built in chunks so that two processes can
    share the work and a stopped run keeps what it finished.
    """
    from rlhf.builtin import traffic

    named = [k for k in traffic.DRIFT_KINDS if k != "clean" and (not args.kinds or k in args.kinds.split(","))]
    kinds = {
        "clean": 0,
        **{k: 1 + i for i, k in enumerate(traffic.DRIFT_KINDS[1:])},
        **{k: 10 + i for i, k in enumerate(UNNAMED)},
    }
    jobs = [("calibration", "clean", 0, args.calibration_clean, SPLITS["calibration"]["seed"] * 1000, 1)]

    def evaluation(kind: str, total: int, chunk: int, kl_every: int) -> list:
        base = SPLITS["evaluation"]["seed"] * 100_000 + 1000 * kinds[kind]
        return [
            ("evaluation", kind, c, min(chunk, total - c * chunk), base + c, kl_every)
            for c in range(math.ceil(total / chunk))
        ]

    clean = evaluation("clean", args.evaluation_clean, args.chunk, args.clean_kl_every)
    drifted = {k: evaluation(k, args.drift_rows, args.drift_chunk, args.drift_kl_every) for k in named}
    # clean rows first: every figure needs them (reward_hacking's candidates come from the first clean chunk)
    jobs += clean[:4]
    # then the kinds the monitor sees least well (response side), so a stopped run has measured those
    hardest = sorted(named, key=lambda k: k not in ("reward_hacking", "degraded_policy"))
    jobs += [drifted[k][0] for k in hardest]
    jobs += [job for chunks in drifted.values() for job in chunks[1:]]
    for kind in UNNAMED:
        jobs += evaluation(kind, args.unnamed_rows, args.drift_chunk, args.drift_kl_every)
    return jobs + clean[4:]


def chunk_path(work: Path, split: str, kind: str, chunk: int) -> Path:
    return work / "pools" / split / f"{kind}-{chunk:03d}.pkl"


def cmd_stack(args, work: Path) -> None:
    """work/stack/{policy,reference,reward}: links to bench/overoptimization.py's checkpoints (its PPO step --step)."""
    source = Path(args.overopt).resolve()
    stack, ppo = json.loads((source / "stack.json").read_text()), json.loads((source / "ppo.json").read_text())
    if str(args.step) not in ppo["checkpoints"]:
        raise SystemExit(
            f"{source}/ppo.json has no checkpoint of step {args.step}: pick one of {list(ppo['checkpoints'])}"
        )
    uris = {
        "policy": ppo["checkpoints"][str(args.step)],
        "reference": stack["sft"]["uri"],
        "reward": stack["reward"]["uri"],
    }
    (work / "stack").mkdir(parents=True, exist_ok=True)
    for name, uri in uris.items():
        link = work / "stack" / name
        link.unlink(missing_ok=True)
        link.symlink_to(uri.removeprefix("file://"))
        print(f"{link} -> {uri}")


def cmd_rows(args, work: Path) -> None:
    """Build every missing chunk; a chunk another live process has claimed is left to it."""
    models = champion_and_baseline(work)
    for split, kind, chunk, n, seed, kl_every in row_jobs(args):
        path = chunk_path(work, split, kind, chunk)
        claim = path.with_suffix(".claim")
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(claim.read_text() or 0), 0)
                continue  # a live process builds it
            except (OSError, ValueError):
                claim.unlink(missing_ok=True)  # its process is gone: build it here
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        clean = load_pool(work, split, "clean", first_chunk_only=True) if kind == "reward_hacking" else None
        t0 = time.perf_counter()
        rows = build_rows(models, kind, n, seed, SPLITS[split]["part"], clean, kl_every)
        path.with_suffix(".tmp").write_bytes(pickle.dumps(rows))
        path.with_suffix(".tmp").rename(path)
        claim.unlink(missing_ok=True)
        print(f"{split} {kind} chunk {chunk}: {n} rows in {time.perf_counter() - t0:.0f} s", flush=True)


# ---------------------------------------------------------------------------- windows


def load_pool(work: Path, split: str, kind: str, first_chunk_only: bool = False) -> Rows:
    paths = sorted((work / "pools" / split).glob(f"{kind}-[0-9][0-9][0-9].pkl"))
    if not paths:
        raise SystemExit(
            f"no {split} rows of {kind} in {work}/pools: run `python bench/drift_heldout.py --work {work} rows` first"
        )
    return concat_rows([pickle.loads(p.read_bytes()) for p in (paths[:1] if first_chunk_only else paths)])


def load_pools(work: Path, split: str) -> dict[str, Rows]:
    kinds = sorted({p.name.rsplit("-", 1)[0] for p in (work / "pools" / split).glob("*-[0-9][0-9][0-9].pkl")})
    if "clean" not in kinds:
        raise SystemExit(
            f"no {split} rows in {work}/pools: run `python bench/drift_heldout.py --work {work} rows` first"
        )
    return {kind: load_pool(work, split, kind) for kind in kinds}


def draw(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    """n row indices of a pool of `size`: without replacement when n <= size."""
    return rng.choice(size, n, replace=n > size)


class Disjoint:
    """Rows for the windows of one figure (or one cell of a figure), no row used twice.

    Each pool is shuffled once (seeded); every window takes the next unused rows. A window of n rows with d
    drifted needs min(n, kl_prompts) rows that carry a KL sample: how many of them are drifted is drawn from
    the hypergeometric distribution, so the KL rows are a uniform subset of the window's rows, as the monitor's
    own subsample is. A figure that needs more rows than a pool has stops with the rows it needs.
    """

    def __init__(self, pools: dict[str, Rows], seed: int, scope: str):
        self.pools, self.scope = pools, scope
        self.rng = np.random.default_rng(seed)
        self.kl: dict[str, list[int]] = {}
        self.plain: dict[str, list[int]] = {}
        self.used: Counter = Counter()

    def _queues(self, kind: str) -> tuple[list[int], list[int]]:
        if kind not in self.kl:
            if kind not in self.pools:
                raise SystemExit(f"no rows of {kind}: run `bench/drift_heldout.py rows` with it in the plan")
            order = self.rng.permutation(len(self.pools[kind]))
            has = np.isfinite(self.pools[kind].kl)[order]
            self.kl[kind], self.plain[kind] = order[has].tolist(), order[~has].tolist()
        return self.kl[kind], self.plain[kind]

    def take(self, kind: str, n: int, with_kl: int) -> list[int]:
        kl, plain = self._queues(kind)
        rest = n - with_kl
        if len(kl) < with_kl or len(kl) + len(plain) < n:
            raise SystemExit(
                f"{self.scope}: the {kind} pool ({len(self.pools[kind])} rows, {int(np.isfinite(self.pools[kind].kl).sum())} "
                f"with KL) is used up after {self.used[kind]} rows; windows that share no row need more: build a "
                "bigger pool (`rows --evaluation-clean / --drift-rows / --unnamed-rows`) or ask for fewer windows"
            )
        out = [kl.pop() for _ in range(with_kl)]
        from_plain = min(rest, len(plain))
        out += [plain.pop() for _ in range(from_plain)] + [kl.pop() for _ in range(rest - from_plain)]
        self.used[kind] += n
        return out

    def picks(self, kind: str, share: float, n: int, kl_prompts: int) -> tuple[list[tuple[str, int]], int]:
        """(kind, row) of a window: its KL rows first (their count is the second value), then the others."""
        n_drift = 0 if kind == "clean" else int(round(share * n))
        m = min(n, kl_prompts)
        d_kl = int(self.rng.hypergeometric(n_drift, n - n_drift, m)) if 0 < n_drift < n else (m if n_drift == n else 0)
        drift = self.take(kind, n_drift, d_kl) if n_drift else []
        clean = self.take("clean", n - n_drift, m - d_kl)
        picks = [(kind, j) for j in drift[:d_kl]] + [("clean", j) for j in clean[: m - d_kl]]
        picks += [(kind, j) for j in drift[d_kl:]] + [("clean", j) for j in clean[m - d_kl :]]
        return picks, m


def windows_that_fit(pools: dict[str, Rows], kind: str, share: float, n: int, kl_prompts: int, wanted: int) -> int:
    """How many of `wanted` windows the pools hold without a row in two of them (KL rows counted at their most)."""
    n_drift = 0 if kind == "clean" else int(round(share * n))
    m = min(n, kl_prompts)
    limits = [wanted, len(pools["clean"]) // (n - n_drift), int(np.isfinite(pools["clean"].kl).sum()) // m]
    if n_drift:
        limits += [len(pools[kind]) // n_drift, int(np.isfinite(pools[kind].kl).sum()) // min(m, n_drift)]
    return min(limits)


def random_picks(rng: np.random.Generator, pools: dict[str, Rows], kind: str, share: float, n: int):
    """(kind, row) of a window drawn at random from the pools (rows may recur across windows: calibration)."""
    n_drift = 0 if kind == "clean" else int(round(share * n))
    picks = [(kind, int(j)) for j in draw(rng, len(pools[kind]), n_drift)]
    return picks + [("clean", int(j)) for j in draw(rng, len(pools["clean"]), n - n_drift)]


def window(
    pools: dict[str, Rows],
    kind: str,
    share: float,
    n: int,
    seed: int,
    cfg,
    gold: bool = True,
    rows: Disjoint | None = None,
):
    """WindowFeatures of one window and the injected kind's row count.

    With `rows` the window takes unused rows of its figure (Disjoint); without, it draws them at random
    (without replacement within the window while the pool is large enough).
    """
    from rlhf.builtin.judge import feedback_probability
    from rlhf.drift.features import PromptFeatures, ResponseFeatures
    from rlhf.drift.signals import WindowFeatures

    rng = np.random.default_rng(seed)
    n_drift = 0 if kind == "clean" else int(round(share * n))
    if rows is None:
        picks, with_kl = random_picks(rng, pools, kind, share, n), None
    else:
        picks, with_kl = rows.picks(kind, share, n, cfg.kl_prompts)
    order = rng.permutation(n)
    picks = [picks[j] for j in order]

    def col(name: str) -> np.ndarray:
        return np.array([getattr(pools[k], name)[j] for k, j in picks])

    token_ids = [pools[k].token_ids[j] for k, j in picks]
    counts = Counter(t for ids in token_ids for t in ids)
    prompts = PromptFeatures(
        {str(t): c for t, c in counts.items()}, [pools[k].intents[j] for k, j in picks], col("lengths"), token_ids
    )
    # as tasks.monitor.window_features: embeddings and KL of random subsets, responses of up to scored_rows
    embedded = rng.choice(n, min(n, cfg.embedding_rows), replace=False)
    kl_rows = rng.choice(n, min(n, cfg.kl_prompts), replace=False)
    if with_kl is not None:  # the rows that carry a KL sample: a uniform subset of the window (Disjoint.picks)
        kl_rows = np.flatnonzero(order < with_kl)
    scored = np.sort(rng.choice(n, min(n, cfg.scored_rows), replace=False))
    golds = col("gold")
    responses = ResponseFeatures(
        col("rm")[scored],
        col("response_lengths")[scored],
        col("nll")[scored],
        col("refusal")[scored].astype(bool),
        col("violation")[scored].astype(bool),
        golds[scored] if gold else None,
    )
    has = rng.random(n) < FEEDBACK_RATE
    thumbs = rng.random(n) < np.array([feedback_probability(g) for g in golds])
    feedback = thumbs[has].astype(float) if gold else np.zeros(0)
    kl = col("kl")[kl_rows]
    assert np.isfinite(kl).all(), "a KL row without a KL sample"
    return WindowFeatures(prompts, col("embeddings")[embedded], responses, kl, feedback, scored.tolist()), n_drift


def no_gold(baseline):
    """The baseline as a deployment without a gold judge or feedback would have it."""
    from rlhf.drift.profile import Baseline

    profile = json.loads(json.dumps(baseline.profile))
    profile["responses"].update({"gold": None, "gold_summary": None, "feedback_positive_rate": None})
    return Baseline(profile, baseline.embeddings)


def analyse(baseline, features, cfg, seed: int) -> dict:
    """The monitor's tests and diagnosis of one window, reduced to what the tables need."""
    from rlhf.drift.diagnosis import diagnose
    from rlhf.drift.signals import compute_signals

    _, signals = compute_signals(baseline, features, cfg.thresholds, cfg.permutations, seed)
    d = diagnose(signals)
    tested = [s.pvalue for s in signals if s.pvalue is not None and s.name != "rm_gold_gap"]
    return {
        "alert": d.cause is not None,
        "cause": d.cause,
        "breached": list(d.breached),
        "min_p": float(min(tested)),
        "tests": len(tested),
        "effects": {s.name: float(s.value) for s in signals},
    }


def monitor_config(thresholds: dict | None = None):
    from rlhf.config import MonitorConfig

    return MonitorConfig(thresholds=thresholds or {})


def wilson(k: int, n: int) -> list[float]:
    from rlhf.drift.stats import wilson_interval

    return list(wilson_interval(k, n))


# ---------------------------------------------------------------------------- calibration


def cmd_calibrate(args, work: Path) -> None:
    """Effect floors from clean calibration windows; alpha by policy; CUSUM threshold from the null bound."""
    from rlhf.config import DriftThresholds
    from rlhf.drift.stats import cusum, upper_quantile

    models = champion_and_baseline(work)
    pools = load_pools(work, "calibration")
    cfg = monitor_config()
    effects: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for i in range(args.calibration_windows):
        features, _ = window(pools, "clean", 0.0, FLOOR_ROWS, 1_000_000 + i, cfg)
        for name, value in analyse(models.baseline, features, cfg, 1_000_000 + i)["effects"].items():
            effects.setdefault(name, []).append(value)
    seconds = time.perf_counter() - t0
    defaults = DriftThresholds()
    chosen, reasons = {}, {}
    for name, values in effects.items():
        if name == "rm_gold_gap":  # a diagnosis qualifier, not a test: kept at its default
            continue
        floor = upper_quantile(np.array(values), QUANTILE)
        chosen[name] = max(round(float(floor), 6), MIN_FLOOR)
        reasons[name] = (
            f"{QUANTILE:.0%} quantile of the effect over {len(values)} clean calibration windows of {FLOOR_ROWS} rows"
            + (f" ({floor:.3g}, raised to {MIN_FLOOR:g}: the p-value alone decides)" if floor < MIN_FLOOR else "")
        )
    chosen["alpha"] = defaults.alpha
    reasons["alpha"] = "policy: family-wise (Holm) level of each window's tests = the window-level false-alarm rate"
    chosen["rm_gold_gap"] = defaults.rm_gold_gap
    reasons["rm_gold_gap"] = "default (0.5 baseline standard deviations): qualifies a breached quality signal"
    # CUSUM on x_t = -ln(min(1, m * p_min)): under no drift P(x_t > u) <= exp(-u), so Exp(1) scores bound it.
    rng = np.random.default_rng(7)
    grid = np.arange(2.0, 12.01, 0.25)
    arl = []
    for h in grid:
        runs = []
        for _ in range(400):
            _, first = cusum(rng.exponential(1.0, 2000), CUSUM_DRIFT, float(h))
            runs.append(2000 if first is None else first + 1)
        arl.append(float(np.mean(runs)))
    h = float(grid[np.argmax(np.array(arl) >= CUSUM_ARL0)])
    out = {
        "thresholds": chosen,
        "reasons": reasons,
        "rule": f"effect floor = {QUANTILE} quantile (inverted CDF) of the signal's effect on clean calibration "
        f"windows of {FLOOR_ROWS} rows; breach = effect >= floor and Holm-adjusted p < alpha",
        "cusum": {
            "score": "x_t = -ln(min(1, m * p_min)), m tests, p_min the window's smallest p-value",
            "drift": CUSUM_DRIFT,
            "threshold": h,
            "reason": f"smallest h on a 0.25 grid whose mean run length to a false alarm is >= {CUSUM_ARL0:g} "
            "windows under the Exp(1) bound of the score (400 simulated sequences, seed 7)",
            "arl0_grid": dict(zip([float(x) for x in grid], arl)),
        },
        "calibration_windows": args.calibration_windows,
        "split": SPLITS["calibration"],
        "pool_rows": {k: len(v) for k, v in pools.items()},
        "effects_summary": {
            k: {"median": float(np.median(v)), "q99": float(upper_quantile(np.array(v), 0.99)), "max": float(max(v))}
            for k, v in effects.items()
        },
        "seconds": seconds,
        "command": "PYTHONPATH=. python bench/drift_heldout.py --work /tmp/bench/drift-heldout calibrate",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    CALIBRATION_FILE.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["thresholds"], indent=1), f"CUSUM h={h}", flush=True)


# ---------------------------------------------------------------------------- evaluation


def calibrated() -> tuple[dict, dict]:
    if not CALIBRATION_FILE.exists():
        raise SystemExit(f"{CALIBRATION_FILE} is missing: run `calibrate` first")
    cal = json.loads(CALIBRATION_FILE.read_text())
    return cal["thresholds"], cal["cusum"]


def rate(records: list[dict]) -> dict:
    k, n = sum(r["alert"] for r in records), len(records)
    return {"alerts": k, "windows": n, "rate": k / n, "wilson95": wilson(k, n)}


def merge(name: str, key, new: list[dict], extra: dict) -> None:
    """Write records into bench/results/<name>, replacing those with the same key and keeping the others."""
    path = RESULTS / name
    old = json.loads(path.read_text())["cells"] if path.exists() else []
    keys = {key(c) for c in new}
    cells = [c for c in old if key(c) not in keys] + new
    save(name, {"cells": cells, **extra})


def cmd_evaluate(args, work: Path) -> None:
    from rlhf.builtin import traffic

    thresholds, cusum_cfg = calibrated()
    cfg = monitor_config(thresholds)
    models = champion_and_baseline(work)
    pools = load_pools(work, "evaluation")
    if len(pools["clean"]) < args.clean_pool:
        raise SystemExit(
            f"the clean evaluation pool has {len(pools['clean'])} rows, --clean-pool asks for {args.clean_pool}: "
            "let `rows` finish (or lower --clean-pool)"
        )
    pools["clean"] = Rows(**{k: getattr(pools["clean"], k)[: args.clean_pool] for k in Rows.__dataclass_fields__})
    base, base_ng = models.baseline, no_gold(models.baseline)
    stages = set(args.only.split(",")) if args.only else {"false_alarms", "sensitivity", "ramp", "unnamed"}
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch 1 thread, nice 19, shared"
    named = [k for k in traffic.DRIFT_KINDS if k != "clean"]
    subset = args.kinds.split(",") if args.kinds else named
    sizes = [int(x) for x in args.sizes.split(",")]
    pool_rows = {k: len(v) for k, v in pools.items()}
    provenance = {
        "disjoint": True,
        "pool_rows": pool_rows,
        "command": " ".join(["evaluate", *sys.argv[sys.argv.index("evaluate") + 1 :]]),
    }
    seed = 2_000_000

    def run(kind: str, share: float, n: int, s: int, rows: Disjoint, gold: bool = True) -> dict:
        features, n_drift = window(pools, kind, share, n, s, cfg, gold, rows)
        out = analyse(base if gold else base_ng, features, cfg, s)
        out.update(kind=kind, share=share, rows=n, seed=s, drifted_rows=n_drift, expected=traffic.CAUSES.get(kind))
        return out

    if "false_alarms" in stages:
        counts = {500: args.clean_windows, 100: args.clean_windows_100, 2000: args.clean_windows_2000}
        cells = []
        # with the gold judge and feedback at every size; without (the deployed model's signals only) at 500 rows
        for n, gold in [(n, True) for n in sizes] + ([(500, False)] if 500 in sizes else []):
            t0 = time.perf_counter()
            s0 = seed + 100_000 + 10_000 * SIZES.index(n) if gold else seed + 95_000_000
            rows = Disjoint(pools, s0, f"false alarms at {n} rows" + ("" if gold else " without gold"))
            wanted = counts[n] if gold else args.clean_windows_nogold
            count = windows_that_fit(pools, "clean", 0.0, n, cfg.kl_prompts, wanted)
            records = [run("clean", 0.0, n, s0 + i, rows, gold) for i in range(count)]
            cells.append(
                {
                    "rows": n,
                    "gold": gold,
                    **rate(records),
                    "signals": Counter(s for r in records for s in r["breached"]),
                    "min_p": [r["min_p"] for r in records],
                    "tests": records[0]["tests"],
                    "clean_rows_used": rows.used["clean"],
                    "seconds": time.perf_counter() - t0,
                    **provenance,
                }
            )
            print(f"clean {n} gold={gold}: {cells[-1]['alerts']}/{count} alarms", flush=True)
        # a measurement with disjoint windows does not replace one whose windows share rows: both are reported
        merge(
            "drift_false_alarms.json",
            lambda c: (c["rows"], c.get("gold", True), bool(c.get("disjoint"))),
            cells,
            {"machine": machine},
        )

    if "sensitivity" in stages:
        counts = {500: args.windows, 100: args.windows_100, 2000: args.windows_2000}
        cells = []
        for kind in subset:
            for n in sizes:
                for share in [float(x) for x in args.shares.split(",")]:
                    t0 = time.perf_counter()
                    s0 = seed + 1_000_000 * (named.index(kind) + 1) + 1000 * SIZES.index(n) + 100 * SHARES.index(share)
                    rows = Disjoint(pools, s0, f"sensitivity {kind}, {n} rows, share {share}")
                    count = windows_that_fit(pools, kind, share, n, cfg.kl_prompts, counts[n])
                    records = [run(kind, share, n, s0 + i, rows) for i in range(count)]
                    right = sum(r["cause"] == r["expected"] for r in records if r["alert"])
                    cells.append(
                        {
                            "kind": kind,
                            "rows": n,
                            "share": share,
                            **rate(records),
                            "diagnosis_correct": right,
                            "causes": Counter(r["cause"] or "none" for r in records),
                            "signals": Counter(s for r in records for s in r["breached"]),
                            "rows_used": dict(rows.used),
                            "seconds": time.perf_counter() - t0,
                            **provenance,
                        }
                    )
                    c = cells[-1]
                    print(f"{kind} {n} {share}: {c['alerts']}/{c['windows']}, diag {right}", flush=True)
        merge("drift_sensitivity.json", lambda c: (c["kind"], c["rows"], c["share"]), cells, {"machine": machine})

    if "ramp" in stages:
        from rlhf.drift.stats import cusum

        t0 = time.perf_counter()
        ramps = []
        steps = args.ramp_windows
        for kind in subset:
            for rep in range(args.ramp_repeats):
                rows = Disjoint(pools, seed + 50_000_000 + 100_000 * named.index(kind) + 100 * rep, f"ramp of {kind}")
                shares = [args.ramp_to * t / (steps - 1) for t in range(steps)]  # from 0 (clean)
                records = [
                    run(kind, sh, 500, seed + 50_000_000 + 100_000 * named.index(kind) + 100 * rep + t, rows)
                    for t, sh in enumerate(shares)
                ]
                first = next((t for t, r in enumerate(records) if r["alert"]), None)
                scores = [-math.log(min(1.0, r["tests"] * r["min_p"])) for r in records]
                _, first_cusum = cusum(np.array(scores), cusum_cfg["drift"], cusum_cfg["threshold"])
                ramps.append(
                    {
                        "kind": kind,
                        "repeat": rep,
                        "shares": shares,
                        "first_alert": first,
                        "first_cusum": first_cusum,
                        "alerts": [r["alert"] for r in records],
                        "scores": scores,
                    }
                )
                print(f"ramp {kind} {rep}: window test {first}, CUSUM {first_cusum}", flush=True)
        # CUSUM false alarms: the clean 500-row windows of the false-alarm stage, as one long sequence
        save(
            "drift_ramp.json",
            {
                "ramps": ramps,
                "windows": steps,
                "to_share": args.ramp_to,
                "rows": 500,
                "seconds": time.perf_counter() - t0,
                **provenance,
            },
        )

    if "unnamed" in stages:
        t0 = time.perf_counter()
        cells = []
        for gold in (True, False):
            for kind in [*UNNAMED, *named]:
                if gold and kind not in UNNAMED:
                    continue
                for share in (0.1, 0.3):
                    s0 = (
                        seed
                        + 90_000_000
                        + 100_000 * [*UNNAMED, *named].index(kind)
                        + 1000 * int(gold)
                        + int(100 * share)
                    )
                    rows = Disjoint(pools, s0, f"{kind} at share {share}")
                    count = windows_that_fit(pools, kind, share, 500, cfg.kl_prompts, args.unnamed_windows)
                    records = [run(kind, share, 500, s0 + i, rows, gold) for i in range(count)]
                    cells.append(
                        {
                            "kind": kind,
                            "gold": gold,
                            "share": share,
                            **rate(records),
                            "causes": Counter(r["cause"] or "none" for r in records),
                            "signals": Counter(s for r in records for s in r["breached"]),
                        }
                    )
                    print(f"unnamed gold={gold} {kind} {share}: {cells[-1]['alerts']}", flush=True)
        save(
            "drift_unnamed.json",
            {
                "cells": cells,
                "seconds": time.perf_counter() - t0,
                **provenance,
            },
        )


def save(name: str, data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(data, indent=1, default=float) + "\n")


def plot_sensitivity(cells: list[dict]) -> None:
    """Detection rate against drifted share, one panel per kind, one line per window size, Wilson bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(c["kind"] for c in cells))
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True, sharey=True)
    for ax, kind in zip(axes.flat, kinds):
        for n in SIZES:
            cs = [c for c in cells if c["kind"] == kind and c["rows"] == n]
            x = [c["share"] for c in cs]
            style = {100: ("o", "-"), 500: ("s", "--"), 2000: ("^", ":")}[n]  # lines that coincide stay visible
            ax.plot(x, [c["rate"] for c in cs], marker=style[0], ls=style[1], label=f"{n} rows")
            ax.fill_between(x, [c["wilson95"][0] for c in cs], [c["wilson95"][1] for c in cs], alpha=0.15)
        ax.axhline(0.95, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(SHARES, [f"{s:g}" for s in SHARES])
        ax.set_title(kind)
        ax.set_ylim(-0.02, 1.02)
    for ax in axes[1]:
        ax.set_xlabel("drifted share of the window")
    for ax in axes[:, 0]:
        ax.set_ylabel("detection rate (95% Wilson)")
    axes[0, 0].legend(loc="lower right")
    fig.tight_layout()
    IMAGES.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMAGES / "drift_sensitivity.png", dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------- report


def pct(rate_: float) -> str:
    return f"{100 * rate_:.1f}%"


def cell(c: dict) -> str:
    lo, hi = c["wilson95"]
    return f"{c['alerts']}/{c['windows']} ({pct(c['rate'])}; {pct(lo)}-{pct(hi)})"


def provenance(c: dict) -> str:
    """Rows a figure used and whether its windows share any."""
    if not c.get("disjoint"):
        return f"shared: drawn at random from a {c['pool_rows']['clean']}-row clean pool"
    used = c.get("clean_rows_used") or c.get("rows_used", {}).get("clean")
    return f"{used:,} clean rows, disjoint" if used else "disjoint"


def provenance_of(cells: list[dict]) -> str:
    kinds = {bool(c.get("disjoint")) for c in cells}
    if kinds == {True}:
        return "no row is in two windows of one cell"
    if kinds == {False}:
        return "windows of a cell share rows (drawn at random from finite pools)"
    return (
        "no row is in two windows of one cell, except in cells marked * (windows drawn from finite pools, sharing rows)"
    )


def cmd_report(args, work: Path) -> None:
    """Markdown tables of the committed results (bench/results/drift_*.json), for docs/monitoring.md."""
    from rlhf.builtin import traffic
    from rlhf.config import DriftThresholds

    out: list[str] = []
    cal = json.loads(CALIBRATION_FILE.read_text())
    defaults = DriftThresholds().model_dump()
    out += ["| threshold | calibrated | why |", "|---|---|---|"]
    for name, value in cal["thresholds"].items():
        out.append(f"| `{name}` | {value:.4g} | {cal['reasons'][name]} |")
    out += [
        "",
        f"CUSUM: drift {cal['cusum']['drift']}, threshold {cal['cusum']['threshold']}: {cal['cusum']['reason']}",
        "",
    ]
    del defaults
    fa_path = RESULTS / "drift_false_alarms.json"
    if fa_path.exists():
        fa = sorted(
            json.loads(fa_path.read_text())["cells"],
            key=lambda c: (not c.get("gold", True), c["rows"], not c.get("disjoint")),
        )
        out += [
            "| rows | gold judge and feedback | clean windows | rows (disjoint?) | alarms | false-alarm rate (95% Wilson) | signals that breached |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in fa:
            sig = ", ".join(f"{k} ({v})" for k, v in r["signals"].items()) or "none"
            out.append(
                f"| {r['rows']} | {'yes' if r.get('gold', True) else 'no'} | {r['windows']} | {provenance(r)} | "
                f"{r['alerts']} | {pct(r['rate'])} ({pct(r['wilson95'][0])}-{pct(r['wilson95'][1])}) | {sig} |"
            )
        out.append("")
        # the CUSUM over the clean 500-row windows taken as one sequence, restarted after each alarm
        r500 = max((r for r in fa if r["rows"] == 500 and r.get("gold", True)), key=lambda r: r["windows"])
        scores = [-math.log(min(1.0, r500["tests"] * p)) for p in r500["min_p"]]
        alarms, total = 0, 0.0
        for x in scores:
            total = max(0.0, total + x - cal["cusum"]["drift"])
            if total >= cal["cusum"]["threshold"]:
                alarms, total = alarms + 1, 0.0
        lo, hi = wilson(alarms, len(scores))
        out += [
            f"CUSUM over the {len(scores)} clean 500-row windows ({provenance(r500)}) in order "
            f"(restarted after each alarm): {alarms} alarms "
            f"({pct(alarms / len(scores))} of windows; {pct(lo)}-{pct(hi)}); score mean {np.mean(scores):.2f} "
            f"(the Exp(1) bound: 1), share of scores > 2: {np.mean(np.array(scores) > 2):.1%} (bound: {math.exp(-2):.1%}).",
            "",
        ]
    sens_path = RESULTS / "drift_sensitivity.json"
    if sens_path.exists():
        cells = json.loads(sens_path.read_text())["cells"]
        order = [k for k in traffic.DRIFT_KINDS if k != "clean"]
        cells.sort(key=lambda c: (order.index(c["kind"]), c["rows"], c["share"]))
        plot_sensitivity(cells)
        for n in SIZES:
            cs = [c for c in cells if c["rows"] == n]
            out += [
                f"Windows of {n} rows: alerts / windows (rate; 95% Wilson interval); {provenance_of(cs)}",
                "",
            ]
            out += ["| kind | " + " | ".join(f"share {s:g}" for s in SHARES) + " |", "|---" * (len(SHARES) + 1) + "|"]
            for kind in dict.fromkeys(c["kind"] for c in cells):
                row = [
                    cell(c) + ("" if c.get("disjoint") else " *")
                    for s in SHARES
                    for c in cs
                    if c["kind"] == kind and c["share"] == s
                ]
                out.append(f"| {kind} | " + " | ".join(row) + " |")
            out.append("")
        # diagnosis confusion on detected windows, 500 rows, share >= 0.1
        causes = ["input_shift", "policy_drift", "reward_model_blind_spot"]
        out += [
            "Diagnosis of detected 500-row windows at drifted share >= 0.1 (rows: injected kind; columns: diagnosed "
            "cause); " + provenance_of([c for c in cells if c["rows"] == 500 and c["share"] >= 0.1]),
            "",
        ]
        out += ["| injected kind (cause) | " + " | ".join(causes) + " | correct |", "|---" * (len(causes) + 2) + "|"]
        total_right = total = 0
        for kind in dict.fromkeys(c["kind"] for c in cells):
            cs = [c for c in cells if c["kind"] == kind and c["rows"] == 500 and c["share"] >= 0.1]
            counts = Counter()
            for c in cs:
                counts.update({k: v for k, v in c["causes"].items() if k != "none"})
            det = sum(counts.values())
            right = counts[traffic.CAUSES[kind]]
            total_right, total = total_right + right, total + det
            lo, hi = wilson(right, det) if det else (0.0, 1.0)
            shared = "" if all(c.get("disjoint") for c in cs) else " *"
            out.append(
                f"| {kind} ({traffic.CAUSES[kind]}){shared} | "
                + " | ".join(str(counts[c]) for c in causes)
                + f" | {right}/{det} ({pct(right / max(det, 1))}; {pct(lo)}-{pct(hi)}) |"
            )
        lo, hi = wilson(total_right, total)
        out += ["", f"All kinds: {total_right}/{total} correct ({pct(total_right / total)}; {pct(lo)}-{pct(hi)}).", ""]
    ramp_path = RESULTS / "drift_ramp.json"
    if ramp_path.exists():
        ramp = json.loads(ramp_path.read_text())
        out += [
            f"Ramp: drifted share rising linearly from 0 to {ramp['to_share']:g} over {ramp['windows']} windows of "
            f"{ramp['rows']} rows (window k has share {ramp['to_share']:g} (k - 1) / {ramp['windows'] - 1}); "
            "windows until the first alert, counting the clean first window as 1; "
            + (
                "no row is in two windows of one ramp (two ramps may share rows)"
                if ramp.get("disjoint")
                else "windows share rows"
            ),
            "",
            "| kind | ramps | window test: median windows to first alert (range; missed) | CUSUM: median (range; missed) |",
            "|---|---|---|---|",
        ]
        for kind in dict.fromkeys(r["kind"] for r in ramp["ramps"]):
            rs = [r for r in ramp["ramps"] if r["kind"] == kind]

            def summary(key: str, rs=rs) -> str:
                hits = [r[key] + 1 for r in rs if r[key] is not None]
                missed = len(rs) - len(hits)
                if not hits:
                    return f"none ({missed} missed)"
                return f"{np.median(hits):g} ({min(hits)}-{max(hits)}; {missed} missed)"

            out.append(f"| {kind} | {len(rs)} | {summary('first_alert')} | {summary('first_cusum')} |")
        out.append("")
    un_path = RESULTS / "drift_unnamed.json"
    if un_path.exists():
        un = json.loads(un_path.read_text())
        out += [
            "| kind | gold judge and feedback | share | alerts (rate; 95% Wilson) | diagnosed causes | signals that breached |",
            "|---|---|---|---|---|---|",
        ]
        for c in un["cells"]:
            causes_ = ", ".join(f"{k} {v}" for k, v in c["causes"].items())
            top = ", ".join(f"{k} ({v})" for k, v in sorted(c["signals"].items(), key=lambda x: -x[1])[:4]) or "none"
            out.append(
                f"| {c['kind']} | {'yes' if c['gold'] else 'no'} | {c['share']:g} | {cell(c)} | {causes_} | {top} |"
            )
        out += ["", "no row is in two windows of one cell" if un.get("disjoint") else "windows of a cell share rows"]
        if "clean_without_gold" in un:
            out += ["", f"Clean 500-row windows without gold or feedback: {cell(un['clean_without_gold'])}.", ""]
    print("\n".join(out))


def cmd_timing(args, work: Path) -> None:
    """Seconds of the monitor's tests alone (compute_signals) on clean evaluation windows of 500-10,000 rows."""
    from rlhf.drift.profile import Baseline
    from rlhf.drift.signals import compute_signals

    cfg = monitor_config(calibrated()[0])
    pools, base = load_pools(work, "evaluation"), Baseline.load(work / "baseline")
    for n in (500, 2000, 10000):
        features, _ = window(pools, "clean", 0.0, n, 7, cfg, rows=Disjoint(pools, 7, "timing"))
        seconds = []
        for r in range(3):
            t0 = time.perf_counter()
            compute_signals(base, features, cfg.thresholds, cfg.permutations, r)
            seconds.append(time.perf_counter() - t0)
        print(f"{n} rows: compute_signals {', '.join(f'{t:.2f}' for t in seconds)} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="outputs/bench/drift-heldout", help="folder of the champion and row pools")
    sub = parser.add_subparsers(dest="command", required=True)
    rows = sub.add_parser("rows", help="build the champion, its baseline and both splits' row pools")
    rows.add_argument("--calibration-clean", type=int, default=2000)
    rows.add_argument("--evaluation-clean", type=int, default=150_000, help="300 disjoint clean windows of 500 rows")
    rows.add_argument("--chunk", type=int, default=5000, help="clean rows per chunk file")
    rows.add_argument("--clean-kl-every", type=int, default=6, help="KL sampled on every k-th clean row")
    rows.add_argument("--drift-rows", type=int, default=3000, help="rows per named drift kind")
    rows.add_argument("--unnamed-rows", type=int, default=1500, help="rows per unnamed kind")
    rows.add_argument("--drift-chunk", type=int, default=2000)
    rows.add_argument("--kinds", default=None, help="comma-separated named drift kinds to build (default all)")
    rows.add_argument("--drift-kl-every", type=int, default=2)
    st = sub.add_parser("stack", help="link bench/overoptimization.py's checkpoints as the champion")
    st.add_argument("--overopt", required=True, help="--out folder of bench/overoptimization.py")
    st.add_argument("--step", type=int, default=5, help="PPO checkpoint step used as the policy")
    cal = sub.add_parser("calibrate", help="effect floors and the CUSUM threshold from calibration windows")
    cal.add_argument("--calibration-windows", type=int, default=100)
    ev = sub.add_parser("evaluate", help="false alarms, sensitivity, ramp, unnamed kinds on the evaluation split")
    ev.add_argument("--only", default=None, help="comma-separated: false_alarms,sensitivity,ramp,unnamed")
    ev.add_argument("--clean-pool", type=int, default=150_000, help="clean evaluation rows to use (the first ones)")
    ev.add_argument("--sizes", default="500,100,2000", help="window sizes of false_alarms and sensitivity")
    ev.add_argument("--shares", default=",".join(f"{x:g}" for x in SHARES), help="drifted shares of sensitivity")
    ev.add_argument("--clean-windows", type=int, default=300, help="clean 500-row windows")
    ev.add_argument("--clean-windows-100", type=int, default=300, help="clean 100-row windows")
    ev.add_argument("--clean-windows-2000", type=int, default=75, help="clean 2000-row windows")
    ev.add_argument("--clean-windows-nogold", type=int, default=100, help="clean 500-row windows without gold")
    ev.add_argument("--windows", type=int, default=40, help="windows per cell at 500 rows")
    ev.add_argument("--windows-100", type=int, default=40, help="windows per cell at 100 rows")
    ev.add_argument("--windows-2000", type=int, default=10, help="windows per cell at 2000 rows")
    ev.add_argument("--ramp-windows", type=int, default=12)
    ev.add_argument("--ramp-to", type=float, default=0.1)
    ev.add_argument("--ramp-repeats", type=int, default=10)
    ev.add_argument("--unnamed-windows", type=int, default=20)
    ev.add_argument("--kinds", default=None, help="comma-separated named kinds for sensitivity and ramp (default all)")
    sub.add_parser("report", help="markdown tables of bench/results/drift_*.json")
    sub.add_parser("timing", help="seconds of the monitor's tests per window, 500-10,000 rows")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    setup(work)
    commands = {
        "stack": cmd_stack,
        "rows": cmd_rows,
        "calibrate": cmd_calibrate,
        "evaluate": cmd_evaluate,
        "report": cmd_report,
        "timing": cmd_timing,
    }
    commands[args.command](args, work)


if __name__ == "__main__":
    main()
