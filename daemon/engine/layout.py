"""A session's token layout: what opens the context, and what closes each question.

raw:  [BOS if the tokenizer prepends one] + enc(prompt) ... entries ... + enc(question)
chat: the model's chat template rendered with the prompt as system message and a sentinel
      user message, split at the sentinel: the part before opens the session, entries go
      inside the user turn, and a question is followed by the part after.
"""

from __future__ import annotations

from dataclasses import dataclass

from livelm.daemon.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class Layout:
    opening: list[int]
    question_suffix: list[int]


def build_layout(tokenizer: Tokenizer, template: str, prompt: str) -> Layout:
    if template == "raw":
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        return Layout(opening=bos + tokenizer.encode(prompt), question_suffix=[])
    prefix, suffix = tokenizer.chat_split(prompt)
    return Layout(opening=tokenizer.encode(prefix), question_suffix=tokenizer.encode(suffix))
