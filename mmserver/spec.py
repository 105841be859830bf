"""What the repository knows about a model before it is loaded: its validated configuration.

``ModelConfig`` is the schema of our ``model.yaml``; MLServer's ``model-settings.json`` is mapped
onto it by the repository. ``ModelSpec`` is one servable (name, version, folder, runtime, config).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from .codec import DTYPES
from .sizes import Size
from .types import TensorSpec


class BatchingConfig(BaseModel):
    """Per-model dynamic batching; unset fields fall back to the server defaults."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = Field(None, ge=1, description="Rows per batch; 1 = no batching.")
    max_delay_ms: float | None = Field(None, ge=0, description="How long a batch may wait to fill.")
    max_queue: int | None = Field(None, ge=1, description="Queued requests before 429.")
    adaptive_fill: bool | None = Field(None, description="See the server setting.")
    preferred_batch_sizes: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _preferred_sizes_fit(self) -> BatchingConfig:
        wrong = [size for size in self.preferred_batch_sizes
                 if size < 1 or (self.max_batch_size is not None and size > self.max_batch_size)]
        if wrong:
            limit = f"from 1 to max_batch_size {self.max_batch_size}" if self.max_batch_size else "at least 1"
            raise ValueError(f"preferred_batch_sizes {wrong} must be {limit}")
        return self


class TensorConfig(BaseModel):
    """An input or output declared in the model's config (overrides what the runtime infers)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    datatype: str
    shape: list[int]

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"unknown datatype {value!r}")
        return value

    @field_validator("shape")
    @classmethod
    def _known_dimensions(cls, value: list[int]) -> list[int]:
        if any(dim < -1 for dim in value):
            raise ValueError(f"shape {value}: a dimension is a size from 0, or -1 for any size")
        return value

    def to_spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.datatype, tuple(self.shape))


#: strict: YAML's ``true`` or ``"2"`` is not a count
VersionPolicy = Literal["latest", "all"] | StrictInt | list[StrictInt | str]


class ModelConfig(BaseModel):
    """The schema of ``model.yaml``."""

    model_config = ConfigDict(extra="forbid")

    runtime: str | None = Field(None, description="Runtime name; detected from the files if unset.")
    uri: str | None = Field(None, description="Model file or folder inside the version folder.")
    versions: VersionPolicy = Field(
        "latest", description="Which versions to serve: latest, all, N newest, or a list."
    )
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    memory: Size | None = Field(None, description="Explicit size; overrides the prediction.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:[0-9]+)$",
                        description="auto (a GPU when the runtime can use one), cpu, cuda or cuda:N.")
    load: Literal["startup", "lazy"] = "startup"
    pinned: bool = Field(False, description="Never evicted to make room.")
    idle_unload_s: float | None = Field(None, gt=0, description="Evict after this many idle seconds.")
    timeout_s: float | None = Field(None, gt=0, description="Per-request inference deadline.")
    inputs: list[TensorConfig] | None = None
    outputs: list[TensorConfig] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict, description="Runtime options.")

    @field_validator("versions")
    @classmethod
    def _positive_count(cls, value: VersionPolicy) -> VersionPolicy:
        if isinstance(value, int) and value < 1:
            raise ValueError("a version count must be at least 1")
        if isinstance(value, list):
            versions = [str(v) for v in value]
            if not versions or not all(v.isdigit() for v in versions):
                raise ValueError(f"a version list names version numbers, at least one: got {value}")
            return versions
        return value


@dataclass(slots=True)
class ModelSpec:
    """One servable model version, as the repository found it."""

    name: str
    version: str
    path: Path
    runtime: str
    config: ModelConfig
    source: str
    #: (path, size, mtime) of its files: new files in the same folder make a different spec
    files: frozenset[tuple[str, int, int]] = frozenset()

    @property
    def artifact(self) -> Path:
        """The model file (or folder) the runtime should load."""
        return self.path / self.config.uri if self.config.uri else self.path
