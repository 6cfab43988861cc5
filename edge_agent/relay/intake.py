"""Intake: an inspection message from the network, checked before the relay believes any of it.

The topic says which camera sent it (``<prefix>/<device_id>/inspection``; the broker's ACL ties that id to
the box's credentials); the payload is parsed with bounds (size, depth) and validated, and its
``device_id`` must be the topic's. ``MalformedMessage`` says what is wrong, in words.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

from edge_agent.messages import SCHEMA, InspectionMessage, PayloadError, is_valid_id, parse_json_object
from edge_agent.relay.limits import MESSAGE_LIMITS

MAX_INSPECTION_BYTES = MESSAGE_LIMITS["inspection"]
INSPECTION_LEAF = "inspection"
M = TypeVar("M", bound=BaseModel)


class MalformedMessage(ValueError):
    """A payload that is not an inspection message; the text says why."""


def parse_inspection(payload: bytes) -> InspectionMessage:
    """An inspection message from a payload; MalformedMessage names what is wrong.

    Fields a newer agent adds are ignored (same schema major version), so relays need not be upgraded
    in lock-step with the cameras.
    """
    return parse_versioned(
        payload, InspectionMessage, SCHEMA, MAX_INSPECTION_BYTES, ("device_id", "message_id"), MalformedMessage
    )


def parse_versioned(
    payload: bytes, model: type[M], schema: str, limit: int, ids: tuple[str, ...], error: type[ValueError]
) -> M:
    """A camera's message as ``model``: bounded parse, same schema major version (fields a newer agent adds
    are ignored), validated, and every field in ``ids`` usable in a topic or argv; ``error`` says what is wrong.
    """
    try:
        data = parse_json_object(payload, limit)
    except PayloadError as exc:
        raise error(str(exc)) from exc
    found = data.get("schema", schema)
    if not isinstance(found, str) or found.split("/")[0] != schema.split("/")[0] or found.split("/")[-1] != "1":
        raise error(f"schema {found!r} is not {schema!r}")
    known = {f.alias or name for name, f in model.model_fields.items()} | set(model.model_fields)
    try:
        message = model.model_validate({k: v for k, v in data.items() if k in known})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise error(problems) from exc
    for name in ids:
        if not is_valid_id(getattr(message, name)):
            raise error(f"{name} must match [A-Za-z0-9._-]{{1,64}} and start with a letter or digit")
    return message


def device_of_topic(topic: str) -> str:
    """The camera a topic belongs to: ``<prefix>/<device_id>/inspection``; MalformedMessage otherwise."""
    levels = topic.split("/")
    if len(levels) < 2 or levels[-1] != INSPECTION_LEAF or not is_valid_id(levels[-2]):
        raise MalformedMessage(f"topic {topic[:200]!r} is not <prefix>/<device_id>/{INSPECTION_LEAF}")
    return levels[-2]
