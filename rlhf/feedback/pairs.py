"""Rankings and production feedback as preference pairs in TRL's format, with provenance.

Pure functions over plain records (no models, no files):

- ``ranking_pairs``: a rater's ordering of k responses to one prompt becomes up to k(k-1)/2 pairs
  ``(prompt, chosen, rejected)``, one per pair of responses with different ranks. Equal ranks are a tie
  and give no pair (a tie says neither is preferred). A ranking marked *all bad* gives no pairs: the
  rater judged none of the responses acceptable, and a preference among unacceptable answers would
  teach the reward model to reward the least bad of them.
- ``production_pairs``: thumbs up and thumbs down on responses to the same or an equivalent prompt
  (``prompt_key``: case, punctuation and spacing ignored) become (up, down) pairs.

Every pair carries the same provenance fields (``PROVENANCE``): who rated it, when, which model version
wrote the responses, which prompt, where it came from and which batch it belongs to.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

Source = Literal["ranking", "production"]
PROVENANCE: tuple[str, ...] = ("rater", "time", "model_version", "prompt_id", "source", "batch")
"""The provenance columns every feedback pair carries beside TRL's prompt, chosen and rejected."""


@dataclass(frozen=True)
class Ranking:
    """One rater's ordering of the k responses shown for one prompt."""

    prompt_id: str
    prompt: str
    responses: tuple[str, ...]
    ranks: tuple[int, ...]
    """ranks[i]: the place of responses[i], 1 = best; equal ranks are a tie."""
    rater: str
    time: str
    """ISO 8601 UTC time of the rating."""
    model_version: str
    """The registered version (``models:/<name>/<version>``) that sampled the responses."""
    batch: str
    all_bad: bool = False
    """The rater found no response acceptable: recorded, but gives no pairs."""
    response_versions: tuple[str, ...] | None = None
    """The version that wrote each response when they differ (champion vs challenger); None: ``model_version``."""

    def __post_init__(self) -> None:
        k = len(self.responses)
        if self.response_versions is not None and len(self.response_versions) != k:
            raise ValueError(f"prompt {self.prompt_id}: {len(self.response_versions)} versions for {k} responses")
        if k < 2:
            raise ValueError(f"prompt {self.prompt_id}: a ranking needs at least 2 responses, got {k}")
        if len(self.ranks) != k:
            raise ValueError(
                f"prompt {self.prompt_id}: {len(self.ranks)} ranks for {k} responses: give one rank per response"
            )
        bad = [r for r in self.ranks if not 1 <= r <= k]
        if bad:
            raise ValueError(
                f"prompt {self.prompt_id}: ranks {bad} are outside 1..{k}: rank each response 1 (best) to {k}"
            )


@dataclass(frozen=True)
class FeedbackPair:
    """A preference pair in TRL's format with its provenance."""

    prompt: str
    chosen: str
    rejected: str
    rater: str
    time: str
    model_version: str
    prompt_id: str
    source: Source
    batch: str

    def row(self) -> dict[str, str]:
        return asdict(self)


def ranking_pairs(ranking: Ranking) -> list[FeedbackPair]:
    """Every pair of responses the ranking orders (better first), in index order; ties and all-bad give none."""
    if ranking.all_bad:
        return []
    pairs = []
    k = len(ranking.responses)
    for i in range(k):
        for j in range(i + 1, k):
            if ranking.ranks[i] == ranking.ranks[j] or ranking.responses[i] == ranking.responses[j]:
                continue  # a tie, or the same text sampled twice: no preference
            better, worse = (i, j) if ranking.ranks[i] < ranking.ranks[j] else (j, i)
            version = ranking.model_version
            if ranking.response_versions is not None:  # chosen's version, or chosen/rejected when they differ
                vb, vw = ranking.response_versions[better], ranking.response_versions[worse]
                version = vb if vb == vw else f"{vb}/{vw}"
            pairs.append(
                FeedbackPair(
                    prompt=ranking.prompt,
                    chosen=ranking.responses[better],
                    rejected=ranking.responses[worse],
                    rater=ranking.rater,
                    time=ranking.time,
                    model_version=version,
                    prompt_id=ranking.prompt_id,
                    source="ranking",
                    batch=ranking.batch,
                )
            )
    return pairs


_NOT_WORD = re.compile(r"[^\w]+")


def prompt_key(prompt: str) -> str:
    """What makes two prompts equivalent here: the same words, ignoring case, punctuation and spacing."""
    return " ".join(_NOT_WORD.sub(" ", prompt.lower()).split())


def prompt_id(prompt: str) -> str:
    """A short stable id of a prompt's equivalence class (sha256 of ``prompt_key``)."""
    return hashlib.sha256(prompt_key(prompt).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Rated:
    """One production response with its user's feedback (1.0 thumbs up, 0.0 thumbs down)."""

    prompt: str
    response: str
    feedback: float
    time: str
    model_version: str


def production_pairs(rows: Iterable[Rated], batch: str, max_pairs_per_prompt: int = 16) -> list[FeedbackPair]:
    """(thumbs-up, thumbs-down) pairs of responses to equivalent prompts (``prompt_key``).

    Only feedback of exactly 1 or 0 counts (values in between are not a thumb). Each thumbs-up response is paired
    with each thumbs-down response of the same prompt class, in row order, at most ``max_pairs_per_prompt`` per
    class (a popular prompt would otherwise dominate); a pair whose two texts are equal is skipped. The pair's
    prompt is the thumbs-up row's; its time the later of the two, its model version the chosen response's
    (``chosen/rejected`` when they differ); the rater is ``production`` (users are anonymous).
    """
    if max_pairs_per_prompt < 1:
        raise ValueError(f"max_pairs_per_prompt={max_pairs_per_prompt}: give 1 or more")
    up: dict[str, list[Rated]] = {}
    down: dict[str, list[Rated]] = {}
    for row in rows:
        if row.feedback == 1.0:
            up.setdefault(prompt_key(row.prompt), []).append(row)
        elif row.feedback == 0.0:
            down.setdefault(prompt_key(row.prompt), []).append(row)
    pairs = []
    for key, good in up.items():
        made = 0
        for g in good:
            for b in down.get(key, []):
                if made == max_pairs_per_prompt:
                    break
                if g.response == b.response:
                    continue
                version = (
                    g.model_version if g.model_version == b.model_version else f"{g.model_version}/{b.model_version}"
                )
                pairs.append(
                    FeedbackPair(
                        prompt=g.prompt,
                        chosen=g.response,
                        rejected=b.response,
                        rater="production",
                        time=max(g.time, b.time),
                        model_version=version,
                        prompt_id=prompt_id(g.prompt),
                        source="production",
                        batch=batch,
                    )
                )
                made += 1
    return pairs


def pair_key(prompt: str, chosen: str, rejected: str) -> tuple[str, str, str]:
    """The identity of a pair for deduplication: the prompt and the unordered two responses (a pair labelled both
    ways by two raters is one comparison; the validation gate refuses such duplicates)."""
    a, b = sorted((chosen, rejected))
    return (prompt, a, b)


def deduplicate(rows: Sequence[dict]) -> tuple[list[dict], int]:
    """(rows without repeats of an earlier row's ``pair_key``, how many were dropped); the first one wins."""
    seen: set[tuple[str, str, str]] = set()
    kept = []
    for row in rows:
        key = pair_key(row["prompt"], row["chosen"], row["rejected"])
        if key in seen:
            continue
        seen.add(key)
        kept.append(row)
    return kept, len(rows) - len(kept)


def replay_pairs(rows: Sequence[dict], feedback: Sequence[dict], replay: int) -> tuple[list[dict], int]:
    """(``rows`` with each row that is a ``feedback`` pair (same ``pair_key``) repeated ``replay`` times in all,
    the copies appended in order; how many rows that is in all). ``replay`` 1 returns the rows unchanged.

    Replaying after the validation gate (which refuses repeated pairs) makes a reward model trained for a fixed
    number of steps draw the on-policy pairs ``replay`` times as often as the others: the same as weighting their
    loss ``replay`` times, without a weighted loss in each trainer."""
    if replay < 1:
        raise ValueError(f"replay must be at least 1 (1 = no replay), got {replay}: set feedback.replay >= 1")
    keys = {pair_key(r["prompt"], r["chosen"], r["rejected"]) for r in feedback}
    replayed = [r for r in rows if pair_key(r["prompt"], r["chosen"], r["rejected"]) in keys]
    return [*rows, *(dict(r) for _ in range(replay - 1) for r in replayed)], len(replayed) * replay
