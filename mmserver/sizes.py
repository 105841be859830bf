"""Byte sizes as operators write them (``8GiB``, ``1.5 MB``, ``4096``), parsed strictly.

pydantic's ``ByteSize`` reads only a leading number and unit and drops the rest, so ``90%`` would
be 90 bytes and ``1e-1`` an exabyte. ``Size`` first requires the whole text to be one number
and one unit, then lets ``ByteSize`` convert it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, ByteSize, TypeAdapter, ValidationError

SIZE_TEXT = re.compile(r"\s*\d+(\.\d+)?\s*[A-Za-z]*\s*")
_BYTE_SIZE = TypeAdapter(ByteSize)


def parse_size(value: Any) -> int:
    """Bytes from a non-negative int or a text like ``64MiB``; ValueError naming the value otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    problem = f"{value!r} is not a size: expected a byte count or a number and unit like 64MiB"
    if not isinstance(value, str) or not SIZE_TEXT.fullmatch(value):
        raise ValueError(problem)
    try:
        return int(_BYTE_SIZE.validate_python(value.strip()))
    except ValidationError:
        raise ValueError(f"{problem} (units: B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)") from None


#: a byte count in a settings or model.yaml field
Size = Annotated[int, BeforeValidator(parse_size)]
