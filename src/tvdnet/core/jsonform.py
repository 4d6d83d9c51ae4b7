"""Any msgpack value a member may send, as JSON without loss (how `tvdnet node` prints).

JSON has strings for keys, no bytes, no extension types and no NaN; msgpack has all of
them. A value maps to JSON as itself where JSON can say it, and otherwise as a one-key
object whose key starts with "$":

    bytes                      {"$bytes": "<base64>"}
    a map whose keys are not   {"$map": [[key, value], ...]}   (in the map's order)
      all strings, or that has
      a key starting with "$"
    an extension type          {"$ext": [code, "<base64>"]}    (a msgpack Timestamp too: -1)
    NaN, inf, -inf             {"$float": "nan" | "inf" | "-inf"}

So a JSON object whose only key starts with "$" is always one of these forms, and
`from_json(to_json(v)) == v` for every value (NaN aside, which equals nothing).
A value nested deeper than `MAX_DEPTH` raises `ValueError` instead of exhausting the
interpreter's stack; the caller reports it.
"""

from __future__ import annotations

import base64
import math
from typing import Any, Final

import msgpack

__all__ = ["MAX_DEPTH", "from_json", "to_json"]

MAX_DEPTH: Final = 200


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def to_json(value: Any, depth: int = 0) -> Any:
    """`value` (as msgpack decodes it) in a form `json.dumps` takes, losing nothing."""
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": _b64(bytes(value))}
    if isinstance(value, msgpack.Timestamp):
        return {"$ext": [-1, _b64(value.to_bytes())]}
    if isinstance(value, msgpack.ExtType):  # a named tuple: before tuples
        return {"$ext": [value.code, _b64(value.data)]}
    if isinstance(value, list | tuple):
        return [to_json(item, depth + 1) for item in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: to_json(v, depth + 1) for k, v in value.items()}
        return {"$map": [[to_json(k, depth + 1), to_json(v, depth + 1)] for k, v in value.items()]}
    raise ValueError(f"not a msgpack value: {type(value).__name__}")


def from_json(value: Any) -> Any:
    """The msgpack value `to_json` made `value` from."""
    if isinstance(value, list):
        return [from_json(item) for item in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == "$bytes":
            return base64.b64decode(inner, validate=True)
        if tag == "$map":
            return {from_json(k): from_json(v) for k, v in inner}
        if tag == "$ext":
            code, data = inner
            raw = base64.b64decode(data, validate=True)
            return msgpack.Timestamp.from_bytes(raw) if code == -1 else msgpack.ExtType(code, raw)
        if tag == "$float":
            return float(inner)
    return {k: from_json(v) for k, v in value.items()}
