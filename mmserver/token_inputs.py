"""The V2 inputs of a model that reads text, checked alike by every runtime that takes them:
texts (BYTES ``[N]`` or ``[N, 1]``) under one of the model's text input names, or token ids
(``input_ids``, integers ``[N, L]``) with an optional ``attention_mask`` of 0 and 1 of the same
shape, whose ones mark each row's tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInput
from .types import InferInput, InferRequest

IDS_INPUT, MASK_INPUT = "input_ids", "attention_mask"


@dataclass(frozen=True, slots=True)
class TextInputs:
    """What a request sends: ``texts``, or ``ids`` with an optional ``mask``."""

    texts: InferInput | None = None
    ids: InferInput | None = None
    mask: InferInput | None = None


def text_inputs(request: InferRequest, text_names: Sequence[str]) -> TextInputs:
    """The request's texts or token ids, their types and shapes checked (``InvalidInput``)."""
    texts = ids = mask = None
    for tensor in request.inputs:
        if tensor.name in text_names:
            if texts is not None:
                raise InvalidInput(f"inputs '{texts.name}' and '{tensor.name}' both carry texts; send one")
            texts = tensor
        elif tensor.name == IDS_INPUT:
            ids = tensor
        elif tensor.name == MASK_INPUT:
            mask = tensor
        else:
            raise InvalidInput(
                f"input '{tensor.name}' is not an input of this model; it takes '{text_names[0]}' (BYTES [N]) "
                f"or '{IDS_INPUT}' (INT64 [N, L]) with an optional '{MASK_INPUT}'"
            )
    if texts is not None:
        if ids is not None or mask is not None:
            other = ids if ids is not None else mask
            raise InvalidInput(f"input '{other.name}' cannot be combined with the texts of input '{texts.name}'")
        if texts.datatype != "BYTES":
            raise InvalidInput(f"input '{texts.name}' is {texts.datatype}; texts must be BYTES")
        shape = texts.data.shape
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
            raise InvalidInput(f"input '{texts.name}' has shape {list(shape)}; expected [N] or [N, 1]")
        return TextInputs(texts=texts)
    if ids is None:
        if mask is None:
            raise InvalidInput(f"this model takes '{text_names[0]}' (BYTES [N]) or '{IDS_INPUT}' (INT64 [N, L])")
        raise InvalidInput(f"input '{MASK_INPUT}' needs '{IDS_INPUT}' beside it")
    if ids.data.dtype.kind not in "iu":
        raise InvalidInput(f"input '{IDS_INPUT}' is {ids.datatype}; token ids must be integers (INT64)")
    if ids.data.ndim != 2:
        raise InvalidInput(f"input '{IDS_INPUT}' has shape {list(ids.data.shape)}; expected [N, L]")
    if mask is not None:
        if mask.data.dtype.kind not in "iub":
            raise InvalidInput(f"input '{MASK_INPUT}' is {mask.datatype}; expected INT64 (or BOOL)")
        if mask.data.shape != ids.data.shape:
            raise InvalidInput(
                f"input '{MASK_INPUT}' has shape {list(mask.data.shape)}; it must match "
                f"'{IDS_INPUT}' {list(ids.data.shape)}"
            )
    return TextInputs(ids=ids, mask=mask)


def row_lengths(ids: InferInput, mask: InferInput | None, vocab_size: int) -> np.ndarray:
    """The number of tokens of every row, once the ids are checked to lie in the vocabulary, the
    mask to hold 0 and 1 only and no row to be empty (``InvalidInput``)."""
    data = ids.data
    if data.size and (data.min() < 0 or data.max() >= vocab_size):
        raise InvalidInput(f"input '{IDS_INPUT}': token ids must be in [0, {vocab_size})")
    if mask is not None and mask.data.size and not np.isin(mask.data, (0, 1)).all():
        raise InvalidInput(f"input '{MASK_INPUT}' must hold 0 and 1 only")
    lengths = mask.data.astype(np.int64).sum(axis=1) if mask is not None else np.full(data.shape[0], data.shape[1])
    if lengths.size and lengths.min() == 0:
        raise InvalidInput(f"input '{IDS_INPUT}': row {int(np.argmin(lengths))} has no tokens")
    return lengths


def id_rows(ids: InferInput, mask: InferInput | None) -> list[list[int]]:
    """Every row's token ids (those its mask marks)."""
    if mask is None:
        return ids.data.tolist()
    keep = mask.data.astype(bool)
    return [row[marked].tolist() for row, marked in zip(ids.data, keep)]


def padded_ids(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[InferInput, InferInput]:
    """``input_ids`` and ``attention_mask`` tensors of rows of token ids, right padded."""
    width = max(len(row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return InferInput(IDS_INPUT, "INT64", ids), InferInput(MASK_INPUT, "INT64", mask)
