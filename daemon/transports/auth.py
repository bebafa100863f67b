"""API-key checks of the message transports (a ``hello``'s ``api_key``, or an upgrade header)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping


class KeyCheck:
    """The configured API keys; with none, every client is let in."""

    def __init__(self, api_keys: list[str]) -> None:
        self._keys = [key.encode() for key in api_keys]

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def matches(self, given: str | None) -> bool:
        if given is None:
            return False
        candidate = given.strip().encode()
        # compare against every key so timing does not reveal which one matched
        results = [hmac.compare_digest(candidate, key) for key in self._keys]
        return any(results)

    def headers_match(self, headers: Mapping[str, str]) -> bool:
        """``Authorization: Bearer KEY`` or ``x-api-key: KEY``, as on the HTTP routes: either
        one may hold the key (Anthropic's SDK sends ``x-api-key`` beside a proxy's bearer)."""
        auth = headers.get("Authorization", "")
        bearer = auth[7:] if auth[:7].lower() == "bearer " else None
        return self.matches(bearer) or self.matches(headers.get("x-api-key"))
