"""Every Birdie objective configuration, and parsing them from config dicts or names.

    parse_objective({"family": "infilling", "mean_span": 3, "rate": 0.15, "length": 512})
    parse_objective("infilling.span3.mask15.len512")   # the same configuration
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field, TypeAdapter

from objective_server.objectives.autoencoding import Autoencoding
from objective_server.objectives.base import Example, Objective
from objective_server.objectives.copying import Copying
from objective_server.objectives.deshuffling import Deshuffling
from objective_server.objectives.infilling import Infilling
from objective_server.objectives.next_token import NextToken
from objective_server.objectives.prefix_lm import PrefixLM
from objective_server.objectives.selective_copying import SelectiveCopying

OBJECTIVE_CLASSES: dict[str, type[Objective]] = {
    cls.model_fields["family"].default: cls
    for cls in (NextToken, PrefixLM, Infilling, Copying, Deshuffling, Autoencoding,
                SelectiveCopying)
}
FAMILIES: tuple[str, ...] = tuple(OBJECTIVE_CLASSES)

ObjectiveConfig = Annotated[
    Union[NextToken, PrefixLM, Infilling, Copying, Deshuffling, Autoencoding, SelectiveCopying],
    Field(discriminator="family"),
]
_CONFIG_ADAPTER: TypeAdapter[Objective] = TypeAdapter(ObjectiveConfig)


def parse_objective(spec: dict | str) -> Objective:
    """An objective configuration from a dict with a `family` key and parameters, or a name.

    Raises ValueError (pydantic's ValidationError is one) for unknown families, unknown or
    out-of-range parameters and malformed names.
    """
    if isinstance(spec, str):
        family = spec.split(".", 1)[0]
        if family not in OBJECTIVE_CLASSES:
            raise ValueError(f"objective name {spec!r}: unknown family {family!r}; "
                             f"families are {', '.join(FAMILIES)}")
        return OBJECTIVE_CLASSES[family].from_name(spec)
    if isinstance(spec, dict):
        return _CONFIG_ADAPTER.validate_python(spec)
    raise ValueError(f"an objective is a dict or a name, got {type(spec).__name__}")


__all__ = [
    "FAMILIES",
    "OBJECTIVE_CLASSES",
    "Autoencoding",
    "Copying",
    "Deshuffling",
    "Example",
    "Infilling",
    "NextToken",
    "Objective",
    "ObjectiveConfig",
    "PrefixLM",
    "SelectiveCopying",
    "parse_objective",
]
