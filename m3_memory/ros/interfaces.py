"""Interface types by name, and ROS messages to and from plain Python data (dicts, YAML)."""
from __future__ import annotations

import importlib

import numpy as np

# Sequences longer than this are summarised when printed (an Image's data would flood a terminal).
PRINT_MAX_SEQUENCE = 16


def import_interface(type_name: str):
    """`"m3_msgs/srv/Locate"` (or `"m3_msgs/Locate"` for a msg) → the generated Python class.

    Raises ValueError naming the expected form when the name is malformed, and ImportError saying which package to build
    when the interface package is not installed.
    """
    parts = type_name.strip("/").split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3 or parts[1] not in ("msg", "srv", "action") or not all(parts):
        raise ValueError(f"bad interface type {type_name!r}: expected PACKAGE/msg|srv|action/NAME")
    package, kind, name = parts
    try:
        module = importlib.import_module(f"{package}.{kind}")
    except ImportError as exc:
        raise ImportError(f"interface package {package!r} is not installed (build it, or run `make setup`)") from exc
    found = getattr(module, name, None)
    action, _, part = name.partition("_")
    if found is None and kind == "action" and part and hasattr(module, action):
        # An action's own topics and services are typed e.g. m3_msgs/action/Train_FeedbackMessage (the feedback
        # topic) or Train_SendGoal: classes of the action's generated module that the package does not export.
        found = getattr(importlib.import_module(getattr(module, action).__module__), name, None)
    if found is None:
        raise ImportError(f"{package}/{kind} has no interface named {name!r}")
    return found


def first_string_field(message) -> str | None:
    """Name of the message's first `string` field, or None."""
    for field, field_type in message.get_fields_and_field_types().items():
        if field_type == "string":
            return field
    return None


def fill_message(message, data):
    """Set `message`'s fields from `data` (a mapping of field name → value, nested for nested messages).

    A scalar `data` fills the first string field, so `"yellow bath duck"` is a valid Locate request. Unknown field names
    raise ValueError listing the valid ones.
    """
    if data is None:
        return message
    if not isinstance(data, dict):
        field = first_string_field(message)
        if field is None:
            raise ValueError(f"{type(message).__name__} has no string field to fill with {data!r}")
        setattr(message, field, _coerce("", str(data), field))
        return message
    fields = message.get_fields_and_field_types()
    for name, value in data.items():
        if name not in fields:
            raise ValueError(f"{type(message).__name__} has no field {name!r}; fields: {', '.join(fields)}")
        current = getattr(message, name)
        if hasattr(current, "get_fields_and_field_types"):
            fill_message(current, value)
        else:
            setattr(message, name, _coerce(current, value, name))
    return message


def _coerce(current, value, name: str = "field"):
    """Match a YAML value to the type the generated setter expects (float fields take ints); a value of another type
    is a ValueError naming the field (handed to the C layer it can abort the interpreter)."""
    expected = next((t for t in (bool, int, float, str) if type(current) is t), None)
    if expected is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} is text, got {value!r} ({type(value).__name__}): quote it")
        if "\x00" in value:
            raise ValueError(f"{name} contains a NUL character, which a ROS string cannot carry")
        return value
    if expected is bool and not isinstance(value, bool):
        raise ValueError(f"{name} is true or false, got {value!r}")
    if expected in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                     or (expected is int and not isinstance(value, int))):
        raise ValueError(f"{name} is {'an integer' if expected is int else 'a number'}, got {value!r}")
    if expected is float:
        return float(value)
    if isinstance(current, np.ndarray):
        return np.asarray(value, dtype=current.dtype)
    return value


def message_to_data(message, max_sequence: int | None = None):
    """Message → nested dict / list / scalars; sequences longer than `max_sequence` become a short summary string."""
    if hasattr(message, "get_fields_and_field_types"):
        return {name: message_to_data(getattr(message, name), max_sequence) for name in message.get_fields_and_field_types()}
    if isinstance(message, (list, tuple, np.ndarray, bytes, bytearray)) or type(message).__name__ == "array":
        items = list(message)
        if max_sequence is not None and len(items) > max_sequence:
            return f"<sequence of {len(items)} elements>"
        return [message_to_data(item, max_sequence) for item in items]
    if isinstance(message, np.generic):
        return message.item()
    return message
