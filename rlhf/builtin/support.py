"""The built-in customer-support task: intents, prompt and response templates.

Everything here is deterministic text; `builtin.py` samples data sets from it and
`judge.py` scores responses against it. A prompt is the text the policy sees,
already formatted (``"Customer: ...\\nAgent:"``), so a user's own data in TRL's
prompt/completion format goes through the same code unchanged.
"""

from __future__ import annotations

import re

from rlhf.data.formats import PROMPT_PREFIX, PROMPT_SUFFIX

# The intents of the default training distribution. "warranty" is known to the judge
# but absent from training data: the drift simulator uses it as a new intent.
TRAIN_INTENTS: tuple[str, ...] = ("refund", "shipping", "password", "cancel")
ALL_INTENTS: tuple[str, ...] = (*TRAIN_INTENTS, "warranty")

ITEMS: tuple[str, ...] = (
    "headphones",
    "blender",
    "jacket",
    "phone case",
    "lamp",
    "backpack",
    "kettle",
    "monitor",
)
OPENERS: tuple[str, ...] = (
    "",
    "Hi, ",
    "Hello, ",
    "Hey there, ",
    "Good morning, ",
    "Dear support, ",
    "Excuse me, ",
)
SUFFIXES: tuple[str, ...] = (
    "",
    " Thanks.",
    " Please help.",
    " It is urgent.",
    " I need help today.",
    " Thank you.",
)

REQUESTS: dict[str, tuple[str, ...]] = {
    "refund": (
        "I want a refund for my {item}.",
        "can I get my money back for the {item}?",
        "the {item} I bought is broken and I would like a refund.",
        "please refund my order of the {item}.",
    ),
    "shipping": (
        "where is my {item}?",
        "my {item} has not arrived yet.",
        "when will my order of the {item} ship?",
        "can you track my package with the {item}?",
    ),
    "password": (
        "I forgot my password.",
        "I cannot log in to my account.",
        "how do I reset my password?",
        "my account is locked after too many attempts.",
    ),
    "cancel": (
        "I want to cancel my subscription.",
        "please stop my monthly plan.",
        "how do I cancel my membership?",
        "I no longer want the premium plan.",
    ),
    "warranty": (
        "is my {item} still under warranty?",
        "the {item} stopped working, does the guarantee cover it?",
    ),
}

# The answer that resolves each intent. The judge recognises an answer by its key
# phrases (ANSWER_KEYS), so paraphrases count and a wrong intent's answer is caught.
ANSWERS: dict[str, tuple[str, ...]] = {
    "refund": (
        "I have started a refund for your {item} and the money will be back in five days.",
        "Your refund is approved and will reach your card in five days.",
    ),
    "shipping": (
        "Your {item} is on the way and will arrive in two days.",
        "I checked the tracking and your package will arrive in two days.",
    ),
    "password": (
        "I sent a reset link to your email and it works for one hour.",
        "You can reset your password with the link in your email.",
    ),
    "cancel": (
        "Your subscription is cancelled and you will not be charged again.",
        "I have cancelled your plan and no more charges will be made.",
    ),
    "warranty": ("Your {item} is covered by the warranty and we will replace it for free.",),
}
ANSWER_KEYS: dict[str, tuple[str, ...]] = {
    "refund": ("refund",),
    "shipping": ("will arrive", "on the way"),
    "password": ("reset",),
    "cancel": ("cancelled", "charges", "charged"),
    "warranty": ("warranty",),
}
PROMPT_KEYS: dict[str, tuple[str, ...]] = {
    "refund": ("refund", "money back"),
    "shipping": ("where is", "arrived", "ship", "track"),
    "password": ("password", "log in", "locked"),
    "cancel": ("cancel", "stop my", "no longer want"),
    "warranty": ("warranty", "guarantee"),
}

VAGUE_ANSWERS: tuple[str, ...] = (
    "Please contact our support team.",
    "I am not sure, please try again later.",
)
POLITE_OPENINGS: tuple[str, ...] = (
    "I am sorry for the trouble.",
    "Thank you for reaching out.",
    "Happy to help with that.",
)
RUDE_OPENINGS: tuple[str, ...] = (
    "That is not my problem.",
    "Read the manual next time.",
)
CLOSINGS: tuple[str, ...] = (
    "Is there anything else I can help with?",
    "Have a nice day.",
)
FILLERS: tuple[str, ...] = (
    "We value every customer.",
    "Our company was founded many years ago.",
    "We always try our best.",
    "Please read our policies on the website.",
    "Have you seen our newsletter?",
)
POLITE_MARKERS: tuple[str, ...] = ("sorry", "thank you", "happy to help", "anything else", "nice day")
RUDE_MARKERS: tuple[str, ...] = ("not my problem", "read the manual")


def format_prompt(message: str) -> str:
    """Wrap a customer message in the prompt format the policy is trained on."""
    return f"{PROMPT_PREFIX}{message}{PROMPT_SUFFIX}"


def customer_message(prompt: str) -> str:
    """The customer's message inside a formatted prompt (the prompt itself if unformatted)."""
    text = prompt
    if text.startswith(PROMPT_PREFIX):
        text = text[len(PROMPT_PREFIX) :]
    if text.endswith(PROMPT_SUFFIX):
        text = text[: -len(PROMPT_SUFFIX)]
    return text


def classify_intent(prompt: str) -> str:
    """Intent of a customer message by key phrases; ``"other"`` when none matches."""
    text = customer_message(prompt).lower()
    for intent in ALL_INTENTS:
        if any(_has_phrase(text, key) for key in PROMPT_KEYS[intent]):
            return intent
    return "other"


def answered_intents(response: str) -> set[str]:
    """The intents whose answer a response gives (possibly several, possibly none)."""
    text = response.lower()
    return {i for i in ALL_INTENTS if any(_has_phrase(text, k) for k in ANSWER_KEYS[i])}


def _has_phrase(text: str, phrase: str) -> bool:
    """Whole-word phrase match ("ship" must not match "membership")."""
    return re.search(rf"\b{re.escape(phrase)}\b", text) is not None


def words(text: str) -> list[str]:
    """Lower-case word tokens, punctuation dropped."""
    return re.findall(r"[a-z0-9']+", text.lower())
