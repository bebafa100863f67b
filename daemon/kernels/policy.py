"""The kernel policy file: which candidates the dispatcher may, must or should bind.

```yaml
lock:   {decode_attention: triton.paged_decode}   # must be bound; startup fails if it cannot be
allow:  {prefill_attention: [triton, torch_sdpa]} # only these may be bound for that operation
deny:   [flex, "xformers*"]                       # never bound, for any operation
# or per operation:  deny: {sample: [triton]}
prefer: {rms_norm: [triton.rms_norm, torch_ref]}  # tried in this order before the default one
```

A pattern (in allow, deny, prefer) is a candidate name or a backend name, with shell-style
wildcards (``triton.*``, ``flash*``). A lock names one candidate exactly. An opt-in candidate
(``Candidate.opt_in``) is considered only where lock, allow or prefer gives its full name.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

from livelm.daemon.kernels.ops import OPERATIONS
from livelm.protocol.errors import ConfigError

SECTIONS = ("lock", "allow", "deny", "prefer")
_WILDCARDS = set("*?[")


@dataclass(frozen=True)
class Policy:
    lock: Mapping[str, str] = field(default_factory=dict)
    allow: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    deny: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # per operation
    deny_all: tuple[str, ...] = ()  # for every operation
    prefer: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = "built-in default (no policy file)"

    def refusal(self, op: str, name: str, backend: str) -> str | None:
        """Why the policy refuses this candidate, or None if it may be bound."""
        locked = self.lock.get(op)
        if locked is not None:
            return None if name == locked else f"policy: {op} is locked to {locked}"
        denied = _first_match(self.deny_all + self.deny.get(op, ()), name, backend)
        if denied is not None:
            return f"policy: denied by {denied!r}"
        allowed = self.allow.get(op)
        if allowed is not None and _first_match(allowed, name, backend) is None:
            return f"policy: not in the allow list {list(allowed)}"
        return None

    def names(self, op: str, name: str) -> bool:
        """Whether the policy names this candidate itself (no wildcard, no backend name) for
        the operation: what an opt-in candidate needs before it is checked or bound."""
        return (self.lock.get(op) == name or name in self.allow.get(op, ())
                or name in self.prefer.get(op, ()))

    def prefer_rank(self, op: str, name: str, backend: str) -> int:
        """Position of the first prefer pattern that matches; past the list when none does."""
        patterns = self.prefer.get(op, ())
        for rank, pattern in enumerate(patterns):
            if matches(pattern, name, backend):
                return rank
        return len(patterns)


def matches(pattern: str, name: str, backend: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(backend, pattern)


def _first_match(patterns: tuple[str, ...], name: str, backend: str) -> str | None:
    return next((p for p in patterns if matches(p, name, backend)), None)


# --- loading and validation ------------------------------------------------------------------


def load_policy(path: str | Path) -> Policy:
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"kernel policy file {str(path)!r} cannot be read: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"kernel policy file {str(path)!r} is not valid YAML: {exc}") from exc
    return parse_policy(data, f"kernel policy file {str(path)!r}")


def parse_policy(data: Any, source: str = "kernel policy") -> Policy:
    """Check and build a policy from parsed YAML (None, an empty file, is the default policy)."""
    if data is None:
        return Policy(source=source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping of {', '.join(SECTIONS)}")
    for key in data:
        if key not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {key!r}; {_suggest(key, SECTIONS)}")
    deny_all, deny = _deny(data.get("deny"), source)
    policy = Policy(
        lock=_lock(data.get("lock"), source),
        allow=_per_op(data.get("allow"), "allow", source),
        deny=deny,
        deny_all=deny_all,
        prefer=_per_op(data.get("prefer"), "prefer", source),
        source=source,
    )
    _check_locks(policy, source)
    return policy


def _lock(raw: Any, source: str) -> dict[str, str]:
    ops = _op_mapping(raw, "lock", source)
    for op, name in ops.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{source}: lock.{op} must be one candidate name, got {name!r}")
        if _WILDCARDS & set(name):
            raise ConfigError(f"{source}: lock.{op} must name one candidate exactly, not {name!r}")
    return {op: name.strip() for op, name in ops.items()}


def _per_op(raw: Any, section: str, source: str) -> dict[str, tuple[str, ...]]:
    ops = _op_mapping(raw, section, source)
    checked = {op: _patterns(value, f"{section}.{op}", source) for op, value in ops.items()}
    if section == "allow":
        for op, patterns in checked.items():
            if not patterns:
                raise ConfigError(f"{source}: allow.{op} is empty, which would refuse every kernel")
    return checked


def _deny(raw: Any, source: str) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    if isinstance(raw, list):
        return _patterns(raw, "deny", source), {}
    return (), _per_op(raw, "deny", source)


def _op_mapping(raw: Any, section: str, source: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: {section} must be a mapping of operation: value, got {type(raw).__name__}"
        )
    for op in raw:
        if op not in OPERATIONS:
            raise ConfigError(f"{source}: {section}: unknown operation {op!r}; {_suggest(op, OPERATIONS)}")
    return dict(raw)


def _patterns(raw: Any, where: str, source: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(p, str) and p.strip() for p in raw):
        raise ConfigError(f"{source}: {where} must be a list of names or patterns, got {raw!r}")
    return tuple(p.strip() for p in raw)


def _check_locks(policy: Policy, source: str) -> None:
    for op, name in policy.lock.items():
        backend = name.partition(".")[0]  # enough for the backend patterns a file would write
        denied = _first_match(policy.deny_all + policy.deny.get(op, ()), name, backend)
        if denied is not None:
            raise ConfigError(f"{source}: lock.{op} = {name!r} is also denied by {denied!r}")
        allowed = policy.allow.get(op)
        if allowed is not None and _first_match(allowed, name, backend) is None:
            raise ConfigError(f"{source}: lock.{op} = {name!r} is not in allow.{op} {list(allowed)}")


def _suggest(key: Any, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return "known: " + ", ".join(known)
