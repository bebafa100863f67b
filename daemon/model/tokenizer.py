"""The model's tokenizer and chat template, read from a Hugging Face folder.

Wraps the ``tokenizers`` library directly (the daemon never imports transformers) and renders
chat templates the way transformers' ``apply_chat_template`` does, so the token layout of a
session matches what the model saw in training.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from livelm.daemon.model.piece_cache import PieceCache, unsupported_reason
from livelm.protocol.errors import InvalidRequest, ModelLoadError

log = logging.getLogger("livelm.tokenizer")
PIECE_CACHE_MAX_BATCH = 64  # larger batches go to the native batch encoder
# questions repeat (flash queries after every batch, dashboards polling the same text): their
# tokens are kept, which halves ``generate``'s host cost (about 60 of 120 µs per call)
TEXT_CACHE_ENTRIES = 1024
TEXT_CACHE_MAX_CHARS = 2048

# Named special tokens a template may read, as transformers passes them.
_SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_BOS_PROBE = "Hello world"
# Stands in for the user's text in chat_split; nothing a template does changes it.
_SENTINEL = "<<livelm-user-text-3f9c1a>>"


class ChatTemplateError(InvalidRequest):
    """The chat template is missing, refused the conversation, or failed to render."""


class Tokenizer:
    def __init__(
        self,
        backend: HFTokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        self._tok = backend
        self._encode_cached = functools.lru_cache(maxsize=TEXT_CACHE_ENTRIES)(self._encode_tuple)
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template
        self._template = _compile(chat_template) if chat_template is not None else None
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id: int | None = _prepended_token(backend)
        self.eos_ids: tuple[int, ...] = self._eos_ids()
        self.piece_cache: PieceCache | None = None  # see use_piece_cache

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer:
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{folder} has no tokenizer.json")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises plain Exception on a bad file
            raise ModelLoadError(f"cannot read {path}: {exc}") from exc
        config = _read_json(folder / "tokenizer_config.json")
        return cls(
            backend,
            chat_template=_find_chat_template(folder, config),
            special_tokens=_special_tokens(config),
        )

    # ---- tokens ------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in it are recognized, none are added.
        Short texts are remembered (a fresh list each call, so callers may change it)."""
        if len(text) <= TEXT_CACHE_MAX_CHARS:
            return list(self._encode_cached(text))
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_tuple(self, text: str) -> tuple[int, ...]:
        return tuple(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(
        self, texts: Sequence[str], *, literal_specials: bool = False
    ) -> list[list[int]]:
        """Token ids of each text, as ``encode`` gives them: through the piece cache (if on)
        for batches of up to PIECE_CACHE_MAX_BATCH texts, else with the native batch encoder.
        With ``literal_specials`` a special token's spelling in a text is encoded as the plain
        text it is, never as that token (the piece cache sends such texts to the whole
        encoder, so it serves both ways).

        Both are exact. The cache saves latency on the small pushes of a live feed; on bulk
        loads it is no faster (measured on the demo tokenizer: 114 against 104 µs per entry
        at 10,000 entries) and, being Python, holds the GIL the worker thread needs, while
        the native encoder releases it and runs on several cores."""
        whole = self._encode_whole_literal if literal_specials else self._encode_whole
        if self.piece_cache is not None and len(texts) <= PIECE_CACHE_MAX_BATCH:
            return self.piece_cache.encode_batch(texts, whole)
        return whole(texts)

    def _encode_whole(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def _encode_whole_literal(self, texts: Sequence[str]) -> list[list[int]]:
        encoded = self._literal_backend.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encoded]

    @functools.cached_property
    def _literal_backend(self) -> HFTokenizer:
        """A copy of the tokenizer that reads special tokens' spellings as text (made at first
        use: only sessions that ask for it pay its memory)."""
        backend = HFTokenizer.from_str(self._tok.to_str())
        backend.encode_special_tokens = True
        return backend

    @functools.cached_property
    def fingerprint(self) -> str:
        """Equal for two tokenizers exactly when they map text to the same ids (a hash of
        the whole definition): what a token journal is checked against."""
        return hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:32]

    def use_piece_cache(self, capacity: int) -> None:
        """Encode batches through a cache of up to ``capacity`` pieces (0 = off), where this
        tokenizer allows it exactly; where it does not, the log says why."""
        self.piece_cache = None
        if capacity == 0:
            log.info("token piece cache is off (token_cache_pieces: 0)")
            return
        reason = unsupported_reason(self._tok)
        cache = PieceCache(self._tok, capacity) if reason is None else None
        if cache is not None and not cache.matches_encode(self._encode_whole):
            reason = "a probe text encodes differently piece by piece"
        if reason is not None:
            log.warning("token piece cache is off: %s; entries are encoded whole", reason)
            return
        cache.hits = cache.misses = 0  # the probe is not traffic
        self.piece_cache = cache

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # ---- chat --------------------------------------------------------------------------
    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The chat template rendered over ``messages``, as transformers would render it."""
        if self._template is None:
            raise ChatTemplateError(
                'this model has no chat template; use template "raw" for its sessions'
            )
        # transformers drops None-valued keys first: templates handle a missing key better
        cleaned = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._template.render(
                messages=cleaned,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def chat_split(self, system_prompt: str) -> tuple[str, str]:
        """(text before the user's message, text after it up to the assistant's turn)."""
        rendered = self.render_chat(
            [{"role": "system", "content": system_prompt}, {"role": "user", "content": _SENTINEL}],
            add_generation_prompt=True,
        )
        count = rendered.count(_SENTINEL)
        if count != 1:
            raise ChatTemplateError(
                f"the chat template shows the user's message {count} times, so a session cannot"
                ' be split around it; use template "raw"'
            )
        prefix, suffix = rendered.split(_SENTINEL)
        return prefix, suffix

    def _eos_ids(self) -> tuple[int, ...]:
        eos = self.special_tokens.get("eos_token")
        if eos is None:
            return ()
        token_id = self._tok.token_to_id(eos)
        if token_id is None:
            raise ModelLoadError(
                f"eos_token {eos!r} of tokenizer_config.json is not in the vocabulary"
            )
        return (token_id,)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data


def _find_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    # a separate chat_template.jinja wins over the one in tokenizer_config.json, as in transformers
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ModelLoadError(
            f"chat_template in {folder} is neither a string nor a list of templates"
        )
    return template


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in _SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            found[name] = value
    return found


def _prepended_token(backend: HFTokenizer) -> int | None:
    """The token the post-processor puts in front of a text, found by encoding a probe."""
    plain = backend.encode(_BOS_PROBE, add_special_tokens=False).ids
    full = backend.encode(_BOS_PROBE, add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            break
    else:
        raise ModelLoadError("the tokenizer's post-processor changes the text's own tokens")
    if start == 0:
        return None
    if start > 1:
        raise ModelLoadError(
            f"the tokenizer's post-processor prepends {start} tokens; only a single BOS is supported"
        )
    return full[0]


# ---- Jinja ---------------------------------------------------------------------------------
class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}`` (marks assistant text in some templates): renders
    its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template refused the conversation: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters and non-ASCII text; templates expect plain JSON
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelLoadError(f"the chat template does not compile: {exc}") from exc
