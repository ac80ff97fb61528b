"""Typed, range-checked method options.

Each method declares its options as :class:`Option` objects; :func:`validate_options` checks the
user's keyword arguments against them (unknown names, types, ranges) before anything is touched,
and fills in defaults. Error messages name the method, the option, what was given and what is
accepted: ``tome: r must be an int >= 0 (got -1)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import OptionError


@dataclass(frozen=True)
class Option:
    """One option of a method.

    Attributes:
        name: keyword name.
        default: value used when the option is not given.
        accepted: what is accepted, in words (used in error messages and ``visattn methods``).
        check: returns the normalised value or raises ``ValueError``/``TypeError`` with no text
            needed; the message is built from ``accepted``.
        identity: the value at which the method reproduces the stock model (``None`` when the
            option does not take part in the identity setting).
        doc: one line of documentation.
        frameworks: the frameworks whose models read the option (empty: every framework the method supports);
            giving it for another framework's model is an error (:func:`check_scope`).
        strategies: the values of the method's ``strategy`` option that read it (empty: every strategy).
    """

    name: str
    default: Any
    accepted: str
    check: Callable[[Any], Any]
    identity: Any = None
    doc: str = ""
    frameworks: tuple[str, ...] = ()
    strategies: tuple[str, ...] = ()

    def scoped(self, *, frameworks: tuple[str, ...] = (), strategies: tuple[str, ...] = ()) -> Option:
        """This option, read only by models of ``frameworks`` and / or by the strategies ``strategies``."""
        return dataclasses.replace(self, frameworks=frameworks, strategies=strategies)

    def validate(self, method: str, value: Any) -> Any:
        try:
            return self.check(value)
        except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: an int too large for a float
            shown = repr(value)
            shown = shown if len(shown) <= 80 else f"{shown[:60]}... ({len(shown)} characters)"
            raise OptionError(f"{method}: {self.name} must be {self.accepted} (got {shown})") from exc


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def int_option(name: str, default: int | None, *, low: int | None = None, high: int | None = None,
               allow_none: bool = False, identity: Any = None, doc: str = "") -> Option:
    """An integer option in ``[low, high]`` (either bound may be open-ended)."""
    parts = ["an int"]
    if low is not None:
        parts.append(f">= {low}")
    if high is not None:
        parts.append(f"<= {high}")
    accepted = " ".join(parts) + (" or None" if allow_none else "")

    def check(v: Any) -> Any:
        if v is None and allow_none:
            return None
        if not _is_int(v):
            raise TypeError
        if (low is not None and v < low) or (high is not None and v > high):
            raise ValueError
        return v

    return Option(name, default, accepted, check, identity, doc)


def float_option(name: str, default: float | None, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, allow_none: bool = False, identity: Any = None,
                 doc: str = "") -> Option:
    """A real option in a range whose ends may be open, e.g. ``keep`` in (0, 1]; with ``allow_none``, ``None``
    too (for a default that the method chooses)."""
    if low is not None and high is not None:
        accepted = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        accepted = f"a number {'>' if low_open else '>='} {low}"
    elif high is not None:
        accepted = f"a number {'<' if high_open else '<='} {high}"
    else:
        accepted = "a number"
    if allow_none:
        accepted += " or None"

    def check(v: Any) -> float | None:
        if v is None and allow_none:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError
        v = float(v)
        if v != v:  # NaN
            raise ValueError
        if low is not None and (v < low or (low_open and v == low)):
            raise ValueError
        if high is not None and (v > high or (high_open and v == high)):
            raise ValueError
        return v

    return Option(name, default, accepted, check, identity, doc)


def bool_option(name: str, default: bool, *, identity: Any = None, doc: str = "") -> Option:
    def check(v: Any) -> bool:
        if not isinstance(v, bool):
            raise TypeError
        return v

    return Option(name, default, "True or False", check, identity, doc)


def choice_option(name: str, default: Any, choices: Sequence[Any], *, identity: Any = None,
                  doc: str = "") -> Option:
    accepted = "one of " + ", ".join(repr(c) for c in choices)

    def check(v: Any) -> Any:
        if v not in choices:
            raise ValueError
        return v

    return Option(name, default, accepted, check, identity, doc)


def layers_option(name: str, default: Any = None, *, doc: str = "") -> Option:
    """Layer selection: ``None`` (all layers), an int, or a sequence of distinct ints >= 0."""

    def check(v: Any) -> tuple[int, ...] | None:
        if v is None:
            return None
        if _is_int(v):
            v = (v,)
        if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
            raise TypeError
        if not all(_is_int(i) and i >= 0 for i in v) or len(set(v)) != len(v):
            raise ValueError
        return tuple(v)

    return Option(name, default, "None (all layers), an int >= 0 or a list of distinct ints >= 0",
                  check, None, doc)


def validate_options(method: str, options: Sequence[Option], given: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``given`` against ``options``; return every option's value, defaults filled in."""
    known = {o.name: o for o in options}
    unknown = sorted(set(given) - set(known))
    if unknown:
        accepted = ", ".join(sorted(known)) or "none"
        raise OptionError(f"{method}: unknown option(s) {', '.join(unknown)}; accepted: {accepted}")
    return {o.name: o.validate(method, given[o.name]) if o.name in given else o.default for o in options}


def check_scope(method: str, options: Sequence[Option], given: Mapping[str, Any], framework: str) -> None:
    """Refuse options that ``given`` names but the target does not read: an option of another framework's
    models, or one that the chosen ``strategy`` (given, or the default) ignores. Options left out are never
    refused, so defaults of other frameworks and strategies cost nothing."""
    declared = {o.name: o for o in options}
    foreign = [declared[n] for n in given if declared[n].frameworks and framework not in declared[n].frameworks]
    if foreign:
        owners = " and ".join(dict.fromkeys(f for o in foreign for f in o.frameworks))
        own = [o.name for o in options if not o.frameworks or framework in o.frameworks]
        names = ", ".join(o.name for o in foreign)
        raise OptionError(f"{method}: {names} {'is an option' if len(foreign) == 1 else 'are options'} for {owners} "
                          f"models, not {framework} models; {framework} options: {', '.join(own)}")
    if "strategy" in declared:
        strategy = given.get("strategy", declared["strategy"].default)
        unused = [n for n in given if declared[n].strategies and strategy not in declared[n].strategies]
        if unused:
            raise OptionError(f"{method}: strategy {strategy!r} does not use {', '.join(unused)}")
