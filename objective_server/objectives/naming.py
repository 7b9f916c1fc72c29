"""Names of objective configurations: `family.token.token...`, readable, URL-safe, reversible.

Each configuration class lists its name fields in order (`NameField`s); `format_name` writes the
name from the field values and `parse_name` reads the field values back, so that
`parse_objective(o.name) == o` for every configuration. Decimal points are written `p`
(`span2p5`, `mask12p5`) because `.` separates tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Literal

from pydantic import AfterValidator

from objective_server.objectives.base import Objective

# How a field's value is written in its token (after the field's prefix).
Kind = Literal["int", "number", "percent", "flag", "word", "range"]

_NUMBER = r"\d+(?:p\d+)?"
_VALUE_PATTERN: dict[str, str] = {
    "int": r"\d+",
    "number": _NUMBER,
    "percent": _NUMBER,
    "flag": "",
    "word": r"[a-z]+",
    "range": r"\d+to\d+",
}

# Numbers are written with up to 4 decimals, rates and fractions as percents (so 6 decimals);
# fields keep their values at that precision so that names read back to exactly the same float.
NUMBER_DECIMALS = 4
FRACTION_DECIMALS = NUMBER_DECIMALS + 2


@dataclass(frozen=True)
class NameField:
    """One token of a name: `prefix` followed by the value of model field `field`."""

    field: str
    prefix: str
    kind: Kind
    # Leave the token out when the value equals the field's default (flags: when False).
    omit_default: bool = False

    def pattern(self) -> re.Pattern[str]:
        return re.compile(re.escape(self.prefix) + "(" + _VALUE_PATTERN[self.kind] + ")")


def _format_number(x: float) -> str:
    text = f"{x:.{NUMBER_DECIMALS}f}".rstrip("0").rstrip(".")
    return text.replace(".", "p")


def _parse_number(text: str) -> float:
    value = float(text.replace("p", "."))
    return int(value) if value.is_integer() else value


def _format_value(kind: Kind, value: Any) -> str:
    if kind == "int":
        return str(int(value))
    if kind == "number":
        return _format_number(float(value))
    if kind == "percent":
        return _format_number(float(value) * 100)
    if kind == "flag":
        return ""
    if kind == "word":
        return str(value)
    low, high = value
    return f"{int(low)}to{int(high)}"


def _parse_value(kind: Kind, text: str) -> Any:
    if kind == "int":
        return int(text)
    if kind == "number":
        return _parse_number(text)
    if kind == "percent":
        return round(float(text.replace("p", ".")) / 100, FRACTION_DECIMALS)
    if kind == "flag":
        return True
    if kind == "word":
        return text
    low, high = text.split("to")
    return (int(low), int(high))


def format_name(family: str, fields: tuple[NameField, ...], values: dict[str, Any],
                defaults: dict[str, Any]) -> str:
    tokens = [family]
    for f in fields:
        value = values[f.field]
        if f.kind == "flag" and not value:
            continue
        if f.omit_default and value == defaults.get(f.field):
            continue
        tokens.append(f.prefix + _format_value(f.kind, value))
    return ".".join(tokens)


def parse_name(name: str, fields: tuple[NameField, ...]) -> dict[str, Any]:
    """Field values read from the tokens after the family; omitted tokens are left out."""
    tokens = name.split(".")[1:]
    values: dict[str, Any] = {}
    i = 0
    for f in fields:
        match = f.pattern().fullmatch(tokens[i]) if i < len(tokens) else None
        if match is None:
            if f.kind == "flag" or f.omit_default:
                continue
            expected = f"{f.prefix}<{f.kind}>"
            found = tokens[i] if i < len(tokens) else "the end of the name"
            raise ValueError(f"objective name {name!r}: expected {expected!r}, found {found!r}")
        values[f.field] = _parse_value(f.kind, match.group(1))
        i += 1
    if i < len(tokens):
        raise ValueError(f"objective name {name!r}: unexpected token(s) {tokens[i:]}")
    return values


# A pydantic validator: a number kept to the precision its name shows.
rounded_number = AfterValidator(lambda x: round(float(x), NUMBER_DECIMALS))


def rounded_fraction(low: float, high: float, high_inclusive: bool = False):
    """A pydantic validator: a fraction in (low, high) (or (low, high]), kept to 6 decimals."""

    def check(x: float) -> float:
        x = round(float(x), FRACTION_DECIMALS)
        inside = low < x <= high if high_inclusive else low < x < high
        if not inside:
            bracket = "]" if high_inclusive else ")"
            raise ValueError(f"must lie in ({low}, {high}{bracket} (to 6 decimals), got {x}")
        return x

    return AfterValidator(check)


class NamedObjective(Objective):
    """An objective whose name is written from, and read back into, its fields (`name_fields`)."""

    name_fields: ClassVar[tuple[NameField, ...]]

    @cached_property
    def name(self) -> str:
        defaults = {key: info.default for key, info in type(self).model_fields.items()}
        return format_name(self.family, self.name_fields, self.__dict__, defaults)

    @classmethod
    def from_name(cls, name: str) -> "NamedObjective":
        return cls(**parse_name(name, cls.name_fields))
