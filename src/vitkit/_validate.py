"""The one validator for enumerated choices, used by every package (configs, transforms, explain, the CLI)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, get_args


def choices(options: Any) -> tuple[Any, ...]:
    """The allowed values of a `Literal[...]` type, or of any iterable of values (e.g. a CLI's `choices=`)."""
    allowed = get_args(options)
    if allowed:
        return allowed
    if isinstance(options, Iterable) and not isinstance(options, (str, bytes)):
        return tuple(options)
    raise TypeError(f"expected a Literal[...] type or a collection of values, got {options!r}")


def check_choice(name: str, value: Any, options: Any) -> None:
    """Raise a ValueError naming `value` and the allowed set when it is not one of `options`.

    Args:
        name: the setting's name as the user wrote it (e.g. "pool", "head_fusion").
        value: what was given.
        options: a `Literal[...]` type or a collection of allowed values.
    """
    allowed = choices(options)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(repr(a) for a in allowed)}")
