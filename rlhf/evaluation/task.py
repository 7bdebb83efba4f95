"""What evaluation and monitoring may know about a task beyond its data: ``TaskKnowledge``.

The library never asks which task it runs on. A task that knows more than its data
(the built-in support task: intents, a rule-based gold judge) hands the library a
``TaskKnowledge``; with a user's data there is none (``None``), and the task-specific
checks, intent signals and gold scores are simply absent. The built-in task's instance
is ``rlhf.builtin.support.SUPPORT_TASK``; the stages (tasks/) choose it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TaskKnowledge:
    """A task's own checks of prompts and responses, and its gold judge where it has one."""

    name: str
    classify_intent: Callable[[str], str]
    """Prompt -> the intent the customer asks about ("other" when none is recognised)."""
    answered_intents: Callable[[str], set[str]]
    """Response -> the intents it gives an answer to (empty: a non-answer, a refusal)."""
    rude_markers: tuple[str, ...]
    """Lower-case phrases that make a response rude."""
    gold_score: Callable[[str, str], float] | None = None
    """(prompt, response) -> the gold judge's reward; None when the task has no gold judge."""
    feedback_probability: Callable[[float], float] | None = None
    """Gold reward -> probability of a thumbs-up (the simulated users' feedback model)."""

    def answers_intent(self, prompt: str, response: str) -> bool:
        """Whether the response answers the prompt's intent and no other (False for an unrecognised prompt)."""
        intent = self.classify_intent(prompt)
        return intent != "other" and self.answered_intents(response) == {intent}

    def without_gold(self) -> TaskKnowledge:
        """The same checks with no gold judge (a run told not to use it)."""
        return replace(self, gold_score=None, feedback_probability=None)
