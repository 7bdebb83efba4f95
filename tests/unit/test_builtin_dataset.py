"""The built-in data set: what the simulated raters are shown (rlhf/builtin/dataset.py)."""

from __future__ import annotations

import random

from rlhf.builtin import support
from rlhf.builtin.dataset import BuiltinSizes, build_builtin_rows, sample_non_answer
from rlhf.builtin.judge import GoldJudge

SMALL = BuiltinSizes(sft=50, preferences=2000, preferences_heldout=50, prompts=50, heldout_prompts=16)


def test_a_non_answer_is_polite_and_answers_nothing():
    rng = random.Random(0)
    for _ in range(50):
        reply = sample_non_answer(rng)
        assert support.answered_intents(reply) == set()
        assert any(marker in reply.lower() for marker in support.POLITE_MARKERS)


def test_raters_see_polite_non_answers_in_their_share_of_the_pairs():
    """The reward model learns where a bare polite opening ranks only if raters were shown some.

    Without them no preference pair contains a response that answers nothing politely and stops,
    and PPO finds that gap (docs/evaluation.md, issue 15).
    """
    rows = build_builtin_rows(0, SMALL)["preferences"]
    non_answers = [r for r in rows if any(_is_bare_non_answer(r[k]) for k in ("chosen", "rejected"))]
    share = len(non_answers) / len(rows)
    assert abs(share - SMALL.non_answer_fraction) < 0.03, share
    # Against an answer of the right intent the raters mostly reject the non-answer (gold 0.5 against 1.0-1.5).
    judge = GoldJudge()
    right = [
        r
        for r in non_answers
        if support.classify_intent(r["prompt"]) in support.answered_intents(r["chosen"] + r["rejected"])
        and judge.score(r["prompt"], _answer_of(r)) > judge.score(r["prompt"], _non_answer_of(r))
    ]
    lost = sum(_is_bare_non_answer(r["rejected"]) for r in right) / len(right)
    assert lost > 0.8, lost


def test_no_preference_pair_compares_a_response_with_itself():
    rows = build_builtin_rows(1, SMALL)["preferences"]
    assert all(r["chosen"] != r["rejected"] for r in rows)


def _is_bare_non_answer(text: str) -> bool:
    """An opening (and maybe a closing) with no answer, no vague answer and no filler."""
    rest = text.strip()
    for opening in support.POLITE_OPENINGS:
        if rest.startswith(opening):
            rest = rest[len(opening) :].strip()
            return rest == "" or rest in support.CLOSINGS
    return False


def _answer_of(row: dict) -> str:
    return row["rejected"] if _is_bare_non_answer(row["chosen"]) else row["chosen"]


def _non_answer_of(row: dict) -> str:
    return row["chosen"] if _is_bare_non_answer(row["chosen"]) else row["rejected"]


def test_prompt_halves_are_disjoint_and_cover_the_prompt_space():
    from rlhf.builtin import traffic
    from rlhf.builtin.dataset import all_prompts

    assert traffic.prompt_part("a") == 1  # zlib.crc32(b"a") = 0xe8b7be43, odd
    texts = [p.text for p in all_prompts("refund")]
    halves = [{t for t in texts if traffic.prompt_part(t) == part} for part in (0, 1)]
    assert halves[0].isdisjoint(halves[1]) and halves[0] | halves[1] == set(texts)
    rng = random.Random(0)
    drawn = [traffic.clean_prompt(rng, 1) for _ in range(200)] + [traffic.drifted_prompt("adversarial", rng, 1)]
    assert all(traffic.prompt_part(t) == 1 for t in drawn[:-1]) and traffic.prompt_part(drawn[-1]) == 1
    assert all(traffic.prompt_part(p) == 0 for p in [traffic.drifted_prompt("new_intent", rng, 0) for _ in range(50)])
