"""Pydantic models derived from the message definitions in `protocol`, for the daemons.

`protocol` defines every message once, as a dataclass whose fields carry their limits; this
module builds, lazily and once per class, the pydantic model with the same fields, types and
limits (strict: no coercion; unknown fields refused), and `install` makes `protocol.decode`
validate with them in this process. A message that passes is then built as its dataclass, so
every caller gets the same type whichever way it was checked. The command line never imports
this module (an import-linter contract in pyproject.toml): pydantic would double its start-up.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from opsbay_mqtt import protocol
from opsbay_mqtt.protocol import Message, Rule

_RECORDS: dict[type, tuple[tuple[str, type], ...]] = {}  # protocol.record_fields, once per class
_CONFIG = ConfigDict(extra="forbid", strict=True, frozen=True, defer_build=True)


_MODELS: dict[type, type[BaseModel]] = {}


def model(cls: type) -> type[BaseModel]:
    """The pydantic model of a message or record class (built once, when first needed)."""
    built = _MODELS.get(cls)
    if built is None:
        built = _MODELS[cls] = _build_model(cls)
    return built


def _build_model(cls: type) -> type[BaseModel]:
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    spec: dict[str, Any] = {}
    for name, hint in protocol.hints(cls).items():
        f = defaults[name]
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = Field(default_factory=f.default_factory)
        else:
            default = ...
        spec[name] = (_pydantic(hint), default)
    return create_model(cls.__name__, __config__=_CONFIG, **spec)


def _pydantic(hint: Any) -> Any:
    """The same type for pydantic: records become their models, rules become `Field`s."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        inner, *rules = typing.get_args(hint)
        extra: list[Any] = []
        for rule in rules:
            assert isinstance(rule, Rule)
            if rule.field:
                extra.append(Field(**rule.field))
            if rule.check is not None:
                extra.append(AfterValidator(rule.check))
        return Annotated[(_pydantic(inner), *extra)]
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return model(hint)
    if origin in (typing.Union, types.UnionType):
        return functools.reduce(lambda a, b: a | b, (_pydantic(a) for a in typing.get_args(hint)))
    if origin is Literal or origin is None:
        return hint
    return origin[tuple(_pydantic(a) for a in typing.get_args(hint))]


def validate(cls: type[Message], body: dict[str, Any]) -> Message:
    """Check `body` with pydantic, then build it as its dataclass (a ValueError if not)."""
    model(cls).model_validate(body)
    return _build(cls, body)  # type: ignore[no-any-return]


def _build(cls: type, data: dict[str, Any]) -> Any:
    """A checked body as its dataclass: the records it holds built too."""
    values = dict(data)
    holding = _RECORDS.get(cls)
    if holding is None:
        holding = _RECORDS[cls] = protocol.record_fields(cls)
    for name, hint in holding:
        value = values.get(name)
        if isinstance(value, dict):
            values[name] = _build(hint, value)
        elif isinstance(value, list):
            values[name] = [_build(hint, x) for x in value]
    return cls(**values)


def install() -> None:
    """Validate messages with pydantic in this process (the coordinator and the worker)."""
    protocol.validate_message = validate
