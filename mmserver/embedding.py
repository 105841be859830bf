"""The text embedding contract: what the OpenAI embeddings route needs from a model.

A ``LoadedModel`` that embeds texts also derives from ``TextEmbedder``: it turns the route's
inputs (texts, or lists of token ids) into a V2 request of its own inputs whose one output is the
embedding, so the request runs through the model's queue and dynamic batching like any other.
The request asks (parameter ``return_num_input_tokens``, Triton's name) for the number of tokens
the model embedded, which its response carries as parameter ``num_input_tokens``, for the
answer's ``usage``: counted while the model tokenizes, not tokenized a second time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from .token_inputs import padded_ids
from .types import InferInput, InferRequest, RequestedOutput

#: what the route takes: texts, or lists of token ids
EmbeddingInputs = Sequence[str] | Sequence[Sequence[int]]
#: the request parameter that asks for the count, and the response parameter that holds it
RETURN_INPUT_TOKENS = "return_num_input_tokens"
INPUT_TOKENS = "num_input_tokens"


class TextEmbedder(ABC):
    """Mixin of a ``LoadedModel`` that embeds texts."""

    @property
    def embeds_text(self) -> bool:
        """Whether this model serves the embeddings route (a mixin class may host other tasks)."""
        return True

    @property
    @abstractmethod
    def embedding_size(self) -> int | None:
        """The width of one embedding, when the checkpoint says."""

    @abstractmethod
    def embedding_request(self, inputs: EmbeddingInputs) -> InferRequest:
        """A V2 request of this model's inputs that computes the embedding of every input, in
        order, as its one output ``[N, D]``, with ``RETURN_INPUT_TOKENS`` set: its response's
        parameter ``INPUT_TOKENS`` is the number of tokens embedded."""


def embedding_request(inputs: EmbeddingInputs, text_input: str, pad_id: int,
                      output: str = "embedding") -> InferRequest:
    """The V2 request of a model that takes texts as BYTES ``text_input`` and token ids as
    ``input_ids`` with ``attention_mask`` (right padded with ``pad_id``), for ``output`` with
    ``RETURN_INPUT_TOKENS`` set."""
    wanted = [RequestedOutput(output)]
    asked = {RETURN_INPUT_TOKENS: True}
    if all(isinstance(item, str) for item in inputs):
        texts = np.empty(len(inputs), dtype=object)
        texts[:] = [item.encode("utf-8") for item in inputs]  # type: ignore[union-attr]
        return InferRequest([InferInput(text_input, "BYTES", texts)], outputs=wanted, parameters=asked)
    return InferRequest(list(padded_ids(inputs, pad_id)), outputs=wanted, parameters=asked)  # type: ignore[arg-type]


def as_embedder(model: object) -> TextEmbedder | None:
    """``model`` as a text embedder, or None when it does not embed text."""
    if isinstance(model, TextEmbedder) and model.embeds_text:
        return model
    return None
