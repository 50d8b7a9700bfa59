"""Query parameters of the dashboard's API, each checked once: a bad one is a 400 that says what was expected.

Framework-free: the server hands over the request's ``(name, value)`` pairs; every endpoint names the parameters it
takes, so a misspelt one (``?point=10``) is refused instead of silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["TOKEN_PARAM", "ApiError", "Query"]

TOKEN_PARAM = "token"  # accepted by every endpoint (checked by the server's guard, never by the handlers)
MAX_VALUE_LENGTH = 1000
MAX_ITEMS = 64


class ApiError(Exception):
    """A request the API cannot answer: ``status`` is the HTTP status, ``message`` says why and what to send."""

    def __init__(self, status: int, message: str, *, parameter: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.parameter = parameter

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.message, "status": self.status, "parameter": self.parameter}


class Query:
    """The query parameters of one request.

    Args:
        items: ``(name, value)`` pairs in the order of the URL (a name may repeat).
        allowed: the names this endpoint takes (``token`` is always allowed).

    Raises:
        ApiError: 400 for a parameter the endpoint does not take, or a value too long to be meant.
    """

    def __init__(self, items: Iterable[tuple[str, str]], *, allowed: Sequence[str]) -> None:
        self._values: dict[str, list[str]] = {}
        known = set(allowed) | {TOKEN_PARAM}
        for name, value in items:
            if name not in known:
                takes = ", ".join(sorted(allowed)) or "no parameters"
                raise ApiError(400, f"unknown query parameter {name!r}; this endpoint takes: {takes}", parameter=name)
            if len(value) > MAX_VALUE_LENGTH:
                raise ApiError(
                    400,
                    f"query parameter {name!r} is {len(value)} characters long; at most {MAX_VALUE_LENGTH} are read",
                    parameter=name,
                )
            self._values.setdefault(name, []).append(value)

    def has(self, name: str) -> bool:
        """Whether the request gives ``name``."""
        return name in self._values

    def _one(self, name: str) -> str | None:
        values = self._values.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise ApiError(400, f"query parameter {name!r} given {len(values)} times; give it once", parameter=name)
        return values[0]

    def integer(self, name: str, default: int | None, *, low: int, high: int) -> int | None:
        """An integer in ``[low, high]`` (``default`` when absent)."""
        text = self._one(name)
        if text is None:
            return default
        try:
            value = int(text.strip())
        except ValueError:
            raise ApiError(
                400, f"query parameter {name!r} must be an integer in [{low}, {high}], got {text!r}", parameter=name
            ) from None
        if not low <= value <= high:
            raise ApiError(
                400, f"query parameter {name!r} must be in [{low}, {high}], got {value}", parameter=name
            ) from None
        return value

    def number(self, name: str, default: float, *, low: float, high: float) -> float:
        """A finite number in ``[low, high]`` (``default`` when absent)."""
        text = self._one(name)
        if text is None:
            return default
        try:
            value = float(text.strip())
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high):
            raise ApiError(
                400, f"query parameter {name!r} must be a number in [{low:g}, {high:g}], got {text!r}", parameter=name
            )
        return value

    def choice(self, name: str, default: str, choices: Sequence[str]) -> str:
        """One of ``choices`` (``default`` when absent)."""
        text = self._one(name)
        if text is None:
            return default
        if text not in choices:
            raise ApiError(
                400, f"query parameter {name!r} must be one of {list(choices)}, got {text!r}", parameter=name
            )
        return text

    def names(self, name: str, *, choices: Sequence[str] | None = None) -> list[str] | None:
        """Comma-separated names, also from repeated parameters (``None`` when absent, ``[]`` when given empty);
        each one of ``choices`` if given, without duplicates, at most ``MAX_ITEMS``."""
        values = self._values.get(name)
        if values is None:
            return None
        out: list[str] = []
        for text in values:
            if not text.strip():
                continue  # `?metrics=`: none
            for item in text.split(","):
                item = item.strip()
                if not item:
                    raise ApiError(
                        400,
                        f"query parameter {name!r} holds an empty name in {text!r}; separate names with ','",
                        parameter=name,
                    )
                if choices is not None and item not in choices:
                    raise ApiError(
                        400,
                        f"query parameter {name!r}: unknown name {item!r}; expected any of {list(choices)}",
                        parameter=name,
                    )
                if item not in out:
                    out.append(item)
        if len(out) > MAX_ITEMS:
            raise ApiError(400, f"query parameter {name!r} names {len(out)} items; at most {MAX_ITEMS}", parameter=name)
        return out
