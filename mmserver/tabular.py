"""Shared base for row-wise numeric models (scikit-learn, XGBoost): feature matrices in, columns out.

A request carries either one ``[N, F]`` tensor or ``F`` per-column tensors of ``N`` rows (a
one-feature model's single ``[N]`` tensor is its one column). A batch
of requests is stacked into one matrix, predicted in one call on the thread pool, and split back.
Subclasses only implement ``predict(matrix, output_names) -> {name: array}``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import numpy as np

from .codec import DTYPES, concat_rows, split_rows
from .errors import InvalidInput
from .runtime import HOST, AdaptiveExecutor, LoadedModel
from .types import InferInput, InferOutput, InferRequest, InferResponse, ModelMetadata, TensorSpec

FEATURES_INPUT = "input-0"
FLOAT32_MAX = float(np.finfo(np.float32).max)


class TabularModel(LoadedModel):
    """A model that maps a float feature matrix to per-row outputs."""

    def __init__(
        self,
        *,
        platform: str,
        n_features: int | None,
        outputs: Sequence[TensorSpec],
        input_dtype: np.dtype,
        feature_names: Sequence[str] | None = None,
        host_bytes: int = 0,
        declared_inputs: Sequence[TensorSpec] | None = None,
        inline_allowed: bool = False,
        allow_nan: bool = False,
    ) -> None:
        self.n_features = n_features
        self.input_dtype = np.dtype(input_dtype)
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.host_bytes = host_bytes
        self._outputs = list(outputs)
        self._output_names = tuple(spec.name for spec in self._outputs)
        width = n_features if n_features is not None else -1
        self._inputs = list(declared_inputs or [
            TensorSpec(FEATURES_INPUT, _DATATYPE[self.input_dtype], (-1, width))
        ])
        self._platform = platform
        self.allow_nan = allow_nan
        self.executor = AdaptiveExecutor(inline_allowed)

    # -------------------------------------------------------------- contract

    def metadata(self) -> ModelMetadata:
        return ModelMetadata(platform=self._platform, inputs=self._inputs, outputs=self._outputs)

    def check_input(self, name: str, datatype: str) -> None:
        """Refuse an input from its header alone (``codec.InputCheck``): the features are numbers."""
        if datatype == "BYTES":
            raise InvalidInput(f"input '{name}' is BYTES but this model takes numeric features")

    def validate(self, request: InferRequest) -> None:
        for tensor in request.inputs:
            self.check_input(tensor.name, tensor.datatype)
            if tensor.data.dtype.kind == "f" and not np.isfinite(tensor.data).all():
                self._check_missing_values(tensor)
            if self.input_dtype == np.float32 and tensor.data.dtype == np.float64 and tensor.data.size:
                self._check_float32_range(tensor)
        for name in request.output_names:
            if name not in self._output_names:
                raise InvalidInput(
                    f"unknown output '{name}'; this model offers {', '.join(self._output_names)}"
                )
        self._matrix_shape(request)

    def rows(self, request: InferRequest) -> int:
        return self._matrix_shape(request)[0]

    async def infer(self, requests: list[InferRequest]) -> list[InferResponse]:
        matrices = [self._matrix(r) for r in requests]
        matrix = concat_rows(matrices)
        names = requests[0].output_names or self._output_names
        if matrix.shape[0]:
            columns = await self.executor.run(self.predict, matrix, names)
        else:  # estimators refuse zero rows; the answer is known without them
            columns = {spec.name: _empty(spec) for spec in self._outputs}
        counts = [m.shape[0] for m in matrices]
        per_output = {name: split_rows(columns[name], counts) for name in names}
        return [
            InferResponse(outputs=[InferOutput(name, per_output[name][i]) for name in names])
            for i in range(len(requests))
        ]

    async def unload(self) -> None:
        self.host_bytes = 0

    def memory(self) -> dict[str, int]:
        return {HOST: self.host_bytes}

    @abstractmethod
    def predict(self, matrix: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Compute the named outputs for every row of ``matrix`` (inline or on a worker thread)."""

    def _check_float32_range(self, tensor: InferInput) -> None:
        """The model computes in float32: a larger value would become infinity (as the library
        itself refuses it, so does the server)."""
        with np.errstate(invalid="ignore"):
            too_large = np.abs(tensor.data) > FLOAT32_MAX
        if too_large.any():
            raise InvalidInput(f"input '{tensor.name}' holds values beyond float32's range (±3.4e38), "
                               "in which this model computes")

    def _check_missing_values(self, tensor: InferInput) -> None:
        if np.isinf(tensor.data).any():
            raise InvalidInput(f"input '{tensor.name}' contains infinity")
        if not self.allow_nan:
            raise InvalidInput(
                f"input '{tensor.name}' contains NaN and this model does not accept missing values"
            )

    # -------------------------------------------------------------- matrices

    def _is_matrix(self, inputs: Sequence[InferInput]) -> bool:
        """One ``[N, F]`` tensor, rather than per-column ones (a lone ``[N]`` is a column when
        the model has one feature)."""
        return len(inputs) == 1 and not (self.n_features == 1 and inputs[0].data.ndim == 1)

    def _matrix_shape(self, request: InferRequest) -> tuple[int, int]:
        inputs = request.inputs
        if self._is_matrix(inputs):
            shape = inputs[0].data.shape
            if len(shape) != 2:
                raise InvalidInput(
                    f"input '{inputs[0].name}' has shape {list(shape)}; expected [rows, features]"
                    + (f" with {self.n_features} features" if self.n_features else "")
                )
            rows, width = shape
        else:
            first = inputs[0]
            if first.data.ndim not in (1, 2):
                raise InvalidInput(f"input '{first.name}' has shape {list(first.data.shape)}; per-column "
                                   "inputs must all be [rows] or [rows, 1]")
            rows = first.data.shape[0]
            for tensor in inputs:
                shape = tensor.data.shape
                if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] != rows:
                    raise InvalidInput(
                        f"input '{tensor.name}' has shape {list(shape)}; per-column inputs must "
                        f"all be [{rows}] or [{rows}, 1]"
                    )
            width = len(inputs)
        if self.n_features is not None and width != self.n_features:
            raise InvalidInput(f"the request has {width} features; the model expects {self.n_features}")
        return rows, width

    def _matrix(self, request: InferRequest) -> np.ndarray:
        inputs = request.inputs
        if self._is_matrix(inputs):
            return inputs[0].data.astype(self.input_dtype, copy=False)
        columns = [t.data.reshape(-1) for t in self._ordered_columns(request)]
        return np.column_stack(columns).astype(self.input_dtype, copy=False)

    def _ordered_columns(self, request: InferRequest):
        """Per-column inputs in the model's feature order when their names match the model's."""
        if self.feature_names and {t.name for t in request.inputs} == set(self.feature_names):
            by_name = {t.name: t for t in request.inputs}
            return [by_name[name] for name in self.feature_names]
        return request.inputs


_DATATYPE = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64"}


def _empty(spec: TensorSpec) -> np.ndarray:
    """A zero-row output of the declared datatype and width."""
    dtype = DTYPES[spec.datatype]
    return np.empty((0, *(max(d, 0) for d in spec.shape[1:])), dtype=dtype)
