"""Worker side of a BRANCH record: a new session that starts from another session's tokens.

The new session shares the source's computed KV up to the branch point (full blocks by
reference, a partial last block copied); whatever the source has not computed yet, and the
branch's own new tokens, are pending data of the new session.
"""

from __future__ import annotations

from livelm.daemon.engine.kv_manager import KVManager
from livelm.daemon.engine.sequence import SessionState


def branch_payload(keep: int, new_tokens: list[int]) -> list[int]:
    return [keep, *new_tokens]


def branch_session(
    kv: KVManager, source: SessionState, slot: int, payload: list[int]
) -> SessionState:
    keep, new_tokens = payload[0], payload[1:]
    tokens = source.tokens[:keep] + new_tokens
    branch = SessionState(tokens=tokens, slot=slot, opening_len=len(tokens))
    kv.fork(source, min(keep, source.num_computed), into=branch)
    return branch
