"""Classification queries (``choices``): which choices are valid, and the reply's probabilities.

Each choice is scored by the log-probability the model gives its tokens as the answer, right
after the question; the reply's ``probs`` are those scores normalised over the choices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from livelm.daemon.engine.admission import BlockBudget
from livelm.protocol.errors import InvalidRequest
from livelm.protocol.messages import GenerateRequest

MAX_CHOICE_TOKENS = 32


@dataclass(frozen=True)
class Choices:
    texts: tuple[str, ...]
    tokens: tuple[tuple[int, ...], ...]

    @property
    def longest(self) -> int:
        return max(len(t) for t in self.tokens)

    @property
    def single_token(self) -> bool:
        return self.longest == 1

    def first_tokens(self) -> list[int]:
        return [t[0] for t in self.tokens]


def parse_choices(
    req: GenerateRequest, encode: Callable[[str], list[int]], max_choices: int
) -> Choices:
    """The request's choices, tokenized; InvalidRequest says what is wrong with them."""
    texts = req.choices or []
    if not 2 <= len(texts) <= max_choices:
        raise InvalidRequest(f"choices takes 2 to {max_choices} strings, got {len(texts)}")
    _refuse_sampling_fields(req)
    seen_texts: dict[str, int] = {}
    for i, text in enumerate(texts):
        if not text:
            raise InvalidRequest(f"choices[{i}] is empty")
        if text in seen_texts:
            raise InvalidRequest(f"choices[{i}] repeats choices[{seen_texts[text]}] ({text!r})")
        seen_texts[text] = i
    tokens = tuple(tuple(encode(text)) for text in texts)
    seen_tokens: dict[tuple[int, ...], int] = {}
    for i, ids in enumerate(tokens):
        if not ids or len(ids) > MAX_CHOICE_TOKENS:
            raise InvalidRequest(
                f"choices[{i}] takes {len(ids)} tokens; a choice takes 1 to {MAX_CHOICE_TOKENS}"
            )
        if ids in seen_tokens:
            raise InvalidRequest(
                f"choices[{i}] and choices[{seen_tokens[ids]}] are the same tokens "
                f"({texts[i]!r} and {texts[seen_tokens[ids]]!r}), so they cannot be told apart"
            )
        seen_tokens[ids] = i
    return Choices(tuple(texts), tokens)


def _refuse_sampling_fields(req: GenerateRequest) -> None:
    mixed = [
        name
        for name, is_set in (
            ("temperature", req.temperature != 0.0),
            ("top_p", req.top_p != 1.0),
            ("top_k", req.top_k != 0),
            ("seed", req.seed is not None),
            ("stop", bool(req.stop)),
        )
        if is_set
    ]
    if mixed:
        raise InvalidRequest(
            f"{', '.join(mixed)} cannot be combined with choices: a classification scores "
            "every choice and samples nothing"
        )


def scoring_blocks(budget: BlockBudget, choices: Choices) -> int:
    """KV blocks the forks of multi-token choices may take: each copies the question's partial
    last block and writes its tokens but the last."""
    return sum(budget.blocks_for(len(t) - 1) + 1 for t in choices.tokens if len(t) > 1)


def normalised(logprobs: list[float]) -> list[float]:
    """Probabilities of the choices relative to each other (a softmax over their log-probs)."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights]
