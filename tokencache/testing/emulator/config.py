"""EmulatorConfig: the knobs that shape token responses (lifetime, latency, injected failures).

An injected failure answers ``failure_status``: 500 (``internal_failure``) by default, 429 or
403 for Google's two ways of saying "rate limit exceeded", with a ``Retry-After`` header when
``retry_after`` is set.

It is a plain dataclass shared with the handler threads, changed in place by ``POST /config``
or by a test between requests, so every value is checked before any is applied: a bad update
changes nothing and says which field is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["EmulatorConfig"]

# name -> (accepted types, minimum, maximum); bool is refused separately since it is an int.
_CONFIG_RULES: dict[str, tuple[tuple[type[float], ...], float, float]] = {
    "lifetime": ((int,), 1, float("inf")),
    "latency": ((int, float), 0.0, 3600.0),
    "failure_rate": ((int, float), 0.0, 1.0),
    "fail_next": ((int,), 0, float("inf")),
    "failure_status": ((int,), 400, 599),
    "retry_after": ((int,), 0, 86400),
}


@dataclass
class EmulatorConfig:
    """Knobs that shape token responses; mutable while the server runs."""

    lifetime: int = 3600
    latency: float = 0.0
    failure_rate: float = 0.0
    fail_next: int = 0
    failure_status: int = 500
    """HTTP status of an injected failure: 500, or 429/403 for a rate-limited answer."""
    retry_after: int = 0
    """Seconds sent as ``Retry-After`` with an injected failure (0: no header)."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            _check_config_field(name, value)

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply a partial update; every field is checked first so a bad one changes nothing."""
        for name, value in changes.items():
            _check_config_field(name, value)
        for name, value in changes.items():
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        """The config as the JSON that /config returns."""
        return asdict(self)


def _check_config_field(name: str, value: Any) -> None:
    """Raise ValueError naming the field when a config value is unknown, mistyped or out of range."""
    rule = _CONFIG_RULES.get(name)
    if rule is None:
        raise ValueError(f"unknown config field {name!r}")
    kinds, low, high = rule
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"{name} must be a number{' (integer)' if kinds == (int,) else ''}")
    if not low <= value <= high:  # also refuses NaN
        raise ValueError(f"{name} must be between {low} and {high}")
