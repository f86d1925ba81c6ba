"""Projections derived from response models: a model's fields (by alias) are the output keys,
and each names the customer field of the same name (a nested model adds its source_prefix),
unless the field's annotation carries a :class:`service.store.rendering.Col` saying otherwise."""

from __future__ import annotations

import typing

from pydantic import BaseModel

from service.store.rendering import Col, Projection, Shape


def _nested_model(annotation: object) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def projection_of(model: type[BaseModel], prefix: str = "", skip: tuple[str, ...] = ()) -> Projection:
    out: dict[str, str | Col | Projection] = {}
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        key = info.serialization_alias or info.alias or name
        col = next((m for m in info.metadata if isinstance(m, Col)), None)
        nested = _nested_model(info.annotation)
        if col is not None:
            out[key] = col
        elif nested is not None:
            out[key] = projection_of(nested, prefix + getattr(nested, "source_prefix", ""))
        else:
            out[key] = prefix + name
    return out


def customer_shape(
    model: type[BaseModel],
    *,
    parent_key: str | None = None,
    subscriptions_key: str | None = None,
    subscription_model: type[BaseModel] | None = None,
    skip: tuple[str, ...] = (),
) -> Shape:
    sub_fields: Projection = projection_of(subscription_model) if subscription_model else {}
    nullable = tuple(k for k, v in sub_fields.items() if isinstance(v, dict))
    return Shape(
        fields=projection_of(model, skip=(*skip, *(k for k in (parent_key, subscriptions_key) if k))),
        parent_key=parent_key,
        subscriptions_key=subscriptions_key,
        subscription_fields=sub_fields,
        null_when_absent=nullable,
    )
