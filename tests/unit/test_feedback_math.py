"""Rankings -> pairs, production thumbs -> pairs, and rater agreement, on hand-worked numbers."""

from __future__ import annotations

import math

import pytest

from rlhf.feedback.agreement import krippendorff_alpha, pairwise_agreement, ranking_units
from rlhf.feedback.pairs import (
    PROVENANCE,
    Ranking,
    Rated,
    deduplicate,
    production_pairs,
    prompt_id,
    ranking_pairs,
    replay_pairs,
)


def ranking(ranks, all_bad=False, responses=("a", "b", "c", "d")):
    return Ranking(
        "p1",
        "Customer: hi\nAgent:",
        tuple(responses),
        tuple(ranks),
        "ann",
        "2026-12-04T00:00:00+00:00",
        "models:/rlhf-policy/3",
        "label-1",
        all_bad,
    )


def test_a_strict_ranking_gives_k_k_minus_1_over_2_pairs_better_first():
    pairs = ranking_pairs(ranking((2, 1, 4, 3)))  # b > a > d > c
    assert len(pairs) == 4 * 3 // 2
    assert [(p.chosen, p.rejected) for p in pairs] == [
        ("b", "a"),
        ("a", "c"),
        ("a", "d"),
        ("b", "c"),
        ("b", "d"),
        ("d", "c"),
    ]
    row = pairs[0].row()
    assert set(PROVENANCE) <= set(row) and row["source"] == "ranking" and row["prompt_id"] == "p1"
    assert row["model_version"] == "models:/rlhf-policy/3" and row["rater"] == "ann"


def test_ties_give_no_pair_and_all_bad_gives_none():
    # a = b (1), c = d (3): 6 comparisons minus the 2 ties
    pairs = ranking_pairs(ranking((1, 1, 3, 3)))
    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "c"), ("a", "d"), ("b", "c"), ("b", "d")]
    assert ranking_pairs(ranking((1, 2, 3, 4), all_bad=True)) == []
    assert ranking_pairs(ranking((1, 1, 1, 1))) == []
    # the same text sampled twice is no preference either
    assert len(ranking_pairs(ranking((1, 2, 3, 4), responses=("a", "a", "c", "d")))) == 5


def test_a_bad_ranking_says_what_to_fix():
    with pytest.raises(ValueError, match="one rank per response"):
        ranking((1, 2, 3))
    with pytest.raises(ValueError, match=r"outside 1\.\.4"):
        ranking((0, 1, 2, 3))


def test_production_thumbs_pair_up_with_down_on_equivalent_prompts():
    rows = [
        Rated("Where is my lamp?", "on the way", 1.0, "2026-01-01T00:00:00", "3"),
        Rated("where is my LAMP", "no idea", 0.0, "2026-01-01T00:05:00", "3"),
        Rated("Where is my lamp ?", "go away", 0.0, "2026-01-01T00:03:00", "2"),
        Rated("Where is my lamp?", "meh", 0.5, "2026-01-01T00:01:00", "3"),  # not a thumb
        Rated("I forgot my password.", "reset link sent", 1.0, "2026-01-01T00:02:00", "3"),  # no thumbs down: no pair
    ]
    pairs = production_pairs(rows, "traffic-0001")
    assert [(p.chosen, p.rejected, p.time, p.model_version) for p in pairs] == [
        ("on the way", "no idea", "2026-01-01T00:05:00", "3"),
        ("on the way", "go away", "2026-01-01T00:03:00", "3/2"),
    ]
    assert {p.prompt_id for p in pairs} == {prompt_id("where is my lamp")} and pairs[0].rater == "production"
    assert len(production_pairs(rows, "b", max_pairs_per_prompt=1)) == 1


def test_deduplicate_keeps_the_first_of_a_pair_in_either_order():
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "b", "rejected": "a"},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
    ]
    kept, dropped = deduplicate(rows)
    assert kept == [rows[0], rows[2]] and dropped == 1


# Hand-worked: two prompts of k=3 responses.
#   p1: A [1,2,3], B [1,3,2]                  verdicts (0,1),(0,2),(1,2): A -,-,-  B -,-,+  -> 2 of 3 agree
#   p2: A [1,1,3], B [2,1,3], C [1,2,3]       A 0,-,-  B +,-,-  C -,-,-  -> AB 2, AC 2, BC 2 of 9
# pairwise agreement = (2 + 6) / (3 + 9) = 2/3.
RANKINGS = {
    "p1": {"A": [1, 2, 3], "B": [1, 3, 2]},
    "p2": {"A": [1, 1, 3], "B": [2, 1, 3], "C": [1, 2, 3]},
}


# Krippendorff units (one per response): [1,1] [2,3] [3,2] [1,2,1] [1,1,2] [3,3,3].
# Coincidences (pairs weighted 1/(m_u - 1)): o11 = 2+1+1 = 4, o12 = o21 = 1+1 = 2, o23 = o32 = 1+1 = 2, o33 = 6/2 = 3;
# n1 = 6, n2 = 4, n3 = 5, n = 15 pairable values.
#   nominal:  D_o = 8/15, D_e = 2(24+30+20)/(15*14) = 148/210          -> alpha = 1 - 28/37 = 9/37
#   interval: D_o = 8/15 (all observed disagreements 1 apart),
#             D_e = 2(24*1 + 20*1 + 30*4)/210 = 328/210                  -> alpha = 1 - 14/41 = 27/41
#   ordinal:  d2(1,2) = (6+4-5)^2 = 25, d2(2,3) = (4+5-4.5)^2 = 20.25, d2(1,3) = (15-5.5)^2 = 90.25;
#             D_o = (4*25 + 4*20.25)/15 = 181/15, D_e = 2(24*25 + 20*20.25 + 30*90.25)/210 = 7425/210
#             -> alpha = 1 - 181*210/(15*7425) = 4891/7425
def test_pairwise_agreement_hand_worked():
    share, comparisons = pairwise_agreement(RANKINGS)
    assert comparisons == 12
    assert share == pytest.approx(2 / 3, abs=1e-12)
    assert pairwise_agreement({"p": {"A": [1, 2]}}) == (None, 0)  # one rater: nothing to compare


@pytest.mark.parametrize(("level", "expected"), [("nominal", 9 / 37), ("interval", 27 / 41), ("ordinal", 4891 / 7425)])
def test_krippendorff_alpha_hand_worked(level, expected):
    units = ranking_units(RANKINGS)
    assert units == [[1, 1], [2, 3], [3, 2], [1, 2, 1], [1, 1, 2], [3, 3, 3]]
    assert krippendorff_alpha(units, level) == pytest.approx(expected, abs=1e-12)


# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the example with 4 observers, 12 units and
# missing values: alpha = 0.743 nominal, 0.815 ordinal, 0.849 interval (published to 3 decimals).
KRIPPENDORFF_2011 = [
    [1, 1, 1],
    [2, 2, 3, 2],
    [3, 3, 3, 3],
    [3, 3, 3, 3],
    [2, 2, 2, 2],
    [1, 2, 3, 4],
    [4, 4, 4, 4],
    [1, 1, 2, 1],
    [2, 2, 2, 2],
    [5, 5, 5],
    [1, 1],
    [3],
]


@pytest.mark.parametrize(("level", "expected"), [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)])
def test_krippendorff_alpha_matches_the_published_example(level, expected):
    assert krippendorff_alpha(KRIPPENDORFF_2011, level) == pytest.approx(expected, abs=5e-4)


def test_krippendorff_alpha_is_none_when_undefined_and_one_when_perfect():
    assert krippendorff_alpha([[1], [2]]) is None  # nothing pairable
    assert krippendorff_alpha([[2, 2], [2, 2]]) is None  # no expected disagreement
    assert krippendorff_alpha([[1, 1], [2, 2], [3, 3]], "ordinal") == pytest.approx(1.0, abs=1e-12)
    assert not math.isnan(krippendorff_alpha([[1, 2], [2, 1]], "nominal"))


def test_the_simulated_raters_ranking_orders_each_pair_as_the_bradley_terry_rater_does():
    import random

    from rlhf.builtin.judge import NoisyRater

    rater, rng, n = NoisyRater(), random.Random(0), 20_000
    prompt = "Customer: I want a refund for my lamp.\nAgent:"
    a = " Your refund is approved and will reach your card in five days."
    b = " I am sorry for the trouble. Your refund is approved and will reach your card in five days."
    wins = sum(rater.rank(prompt, [a, b, " Please contact our support team."], rng)[0] < 3 for _ in range(10)) == 10
    assert wins  # the vague answer is never above both answers here (p ~ 1e-6 per draw)
    share = sum(rater.rank(prompt, [a, b], rng) == (1, 2) for _ in range(n)) / n
    # 4 standard errors of a 20,000-draw share around P = 0.0773
    assert share == pytest.approx(rater.prob_prefers_a(prompt, a, b), abs=4 * (0.0773 * 0.9227 / n) ** 0.5)


def test_champion_vs_challenger_pairs_name_the_version_of_each_response():
    from datetime import UTC, datetime

    from rlhf.feedback.batches import batch_name
    from tasks.label import LabelItem, mix_items

    v1, v2 = "models:/rlhf-policy/1", "models:/rlhf-policy/2"
    mixed = mix_items(
        [LabelItem("p", "Customer: hi\nAgent:", ("a1", "a2", "a3", "a4"))],
        [LabelItem("p", "Customer: hi\nAgent:", ("b1", "b2", "b3", "b4"))],
        (v1, v2),
        4,
        0,
    )
    (item,) = mixed
    assert sorted(item.responses) == ["a1", "a2", "b1", "b2"]  # half from each, in a shuffled order
    assert all(v == (v1 if r.startswith("a") else v2) for r, v in zip(item.responses, item.versions))
    ranks = tuple(1 if r.startswith("a") else 2 for r in item.responses)  # both a's tied first, both b's second
    r = Ranking(
        "p", item.prompt, item.responses, ranks, "ann", "t", f"{v1} vs {v2}", "b", response_versions=item.versions
    )
    pairs = ranking_pairs(r)
    assert len(pairs) == 4 and {p.model_version for p in pairs} == {f"{v1}/{v2}"}
    assert (
        batch_name("label", f"{v1} vs {v2}", datetime(2026, 12, 4, tzinfo=UTC))
        == "label-20261204T000000000000Z-v1-vs-v2"
    )


def test_replay_repeats_each_feedback_pair_replay_times_and_nothing_else():
    base = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "c", "rejected": "d"}]
    on_policy = [{"prompt": "r", "chosen": "e", "rejected": "f"}, {"prompt": "s", "chosen": "g", "rejected": "h"}]
    # the validated file may hold a feedback pair in either order; it still counts as that pair
    rows = [*base, on_policy[0], {"prompt": "s", "chosen": "h", "rejected": "g"}]
    replayed, feedback_rows = replay_pairs(rows, on_policy, 3)
    count = lambda r: sum(x == r for x in replayed)  # noqa: E731
    assert [count(r) for r in rows] == [1, 1, 3, 3]
    assert len(replayed) == 2 + 2 * 3 and feedback_rows == 6
    assert replayed[: len(rows)] == rows  # the validated rows first, in order
    assert replay_pairs(rows, on_policy, 1) == (rows, 2)
    with pytest.raises(ValueError, match="feedback.replay >= 1"):
        replay_pairs(rows, on_policy, 0)
