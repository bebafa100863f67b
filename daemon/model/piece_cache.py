"""Entry tokenization in O(1) per piece: the tokens of each pre-tokenized piece, kept in a dict.

A text is normalized, split by the tokenizer's own pre-tokenizer, and each piece's tokens are
looked up, encoding only unseen pieces with the tokenizer's model alone. Hugging Face
tokenizers runs these same steps (the model never merges across pieces), so the result equals
``encode`` by construction, given three things:

- no added (special) token occurs in the text: those are split out before normalizing, so a
  text holding one (raw or normalized) is encoded the ordinary way;
- nothing else in the pipeline changes ids or is random: checked once, ``unsupported_reason``;
- a probe of typical texts encodes the same both ways (a last check at load time).

The dict is bounded: when it holds ``capacity`` pieces it is cleared. Each piece is then one
dict read, and threads encoding at once (the event loop and executor threads) need no lock.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence

from tokenizers import Tokenizer as HFTokenizer

_PROBES = (
    "AAPL 2024-03-01 09:30 o=187.25 h=188.10 l=186.90 c=187.95 v=1200345\n",
    '{"px":101.5,"qty":3,"side":"buy","sym":"BTC-USD"}\n',
    "The market opened higher;  rates   fell\tsharply.\n",
    "Café 東京 🚀 ≤ 12345678901234567890\n",
)

EncodeBatch = Callable[[list[str]], list[list[int]]]


def unsupported_reason(backend: HFTokenizer) -> str | None:
    """Why the piece cache cannot match ``encode`` exactly for this tokenizer, or None."""
    if backend.pre_tokenizer is None:
        return "the tokenizer has no pre-tokenizer, so a whole entry would be one piece"
    if getattr(backend.model, "dropout", None):
        return "the tokenizer's BPE dropout makes encoding random"
    if backend.truncation is not None or backend.padding is not None:
        return "the tokenizer has truncation or padding set"
    return None


class PieceCache:
    def __init__(self, backend: HFTokenizer, capacity: int) -> None:
        self._normalizer = backend.normalizer
        self._pre_tokenizer = backend.pre_tokenizer
        self._model = backend.model
        self._added = _added_token_pattern(backend)
        self._pieces: dict[str, list[int]] = {}
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._count_lock = threading.Lock()

    def encode_batch(self, texts: Sequence[str], encode_whole: EncodeBatch) -> list[list[int]]:
        """Token ids of each text; texts holding an added token go to ``encode_whole``."""
        out: list[list[int] | None] = []
        whole: list[int] = []  # indexes of texts encoded the ordinary way
        hits = misses = 0
        for text in texts:
            normalized = self._normalize(text)
            if self._holds_added_token(text, normalized):
                whole.append(len(out))
                out.append(None)
                continue
            ids: list[int] = []
            for piece, _ in self._pre_tokenizer.pre_tokenize_str(normalized):
                tokens = self._pieces.get(piece)
                if tokens is None:
                    misses += 1
                    tokens = self._learn(piece)
                else:
                    hits += 1
                ids += tokens
            out.append(ids)
        if whole:
            for i, ids in zip(whole, encode_whole([texts[i] for i in whole]), strict=True):
                out[i] = ids
        with self._count_lock:
            self.hits += hits
            self.misses += misses
        return out  # type: ignore[return-value]  # every None was filled above

    def matches_encode(self, encode_whole: EncodeBatch) -> bool:
        """The load-time probe: typical texts encode the same both ways."""
        probes = list(_PROBES)
        return self.encode_batch(probes, encode_whole) == encode_whole(probes)

    def _normalize(self, text: str) -> str:
        return text if self._normalizer is None else self._normalizer.normalize_str(text)

    def _holds_added_token(self, text: str, normalized: str) -> bool:
        if self._added is None:
            return False
        return bool(self._added.search(text) or self._added.search(normalized))

    def _learn(self, piece: str) -> list[int]:
        tokens = [t.id for t in self._model.tokenize(piece)]
        if len(self._pieces) >= self.capacity:
            self._pieces.clear()
        self._pieces[piece] = tokens
        return tokens


def _added_token_pattern(backend: HFTokenizer) -> re.Pattern[str] | None:
    """Matches any added token's text, as written or normalized."""
    texts = {t.content for t in backend.get_added_tokens_decoder().values() if t.content}
    if backend.normalizer is not None:
        texts |= {backend.normalizer.normalize_str(t) for t in texts} - {""}
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))
