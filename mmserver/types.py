"""The V2 / Open Inference Protocol data types, decoded: tensors are numpy arrays.

These are plain slotted dataclasses rather than pydantic models because they sit on the
hot path of every request; the codec validates the wire format before building them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from .errors import InvalidInput

Parameters = dict[str, Any]


@dataclass(slots=True)
class InferInput:
    """One input tensor of a request. ``data`` already has the declared shape."""

    name: str
    datatype: str
    data: np.ndarray
    parameters: Parameters = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape


@dataclass(slots=True)
class RequestedOutput:
    """An output the client asked for, with its per-output parameters (e.g. ``binary_data``)."""

    name: str
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    """A decoded inference request."""

    inputs: list[InferInput]
    outputs: list[RequestedOutput] = field(default_factory=list)
    id: str | None = None
    parameters: Parameters = field(default_factory=dict)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(out.name for out in self.outputs)

    def flag(self, name: str, default: bool = False) -> bool:
        """The boolean request parameter ``name``; ``InvalidInput`` when it is not true or false."""
        value = self.parameters.get(name, default)
        if type(value) is not bool:
            raise InvalidInput(f"parameter '{name}' is {value!r}; expected true or false")
        return value


@dataclass(slots=True)
class InferOutput:
    """One output tensor. ``datatype`` is derived from the array's dtype when left empty."""

    name: str
    data: np.ndarray
    datatype: str = ""
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class InferResponse:
    """The result for one request; the server fills in model name, version and id."""

    outputs: list[InferOutput]
    model_name: str = ""
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class TensorSpec:
    """Metadata of a model input or output; ``-1`` marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(slots=True)
class ModelMetadata:
    """What a loaded model declares about itself (the V2 model metadata minus name/versions)."""

    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parameters: Parameters = field(default_factory=dict)


class ModelState(str, Enum):
    """Model states as the V2 repository extension names them."""

    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
