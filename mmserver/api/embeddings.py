"""OpenAI's ``POST /embeddings`` (under ``/v1`` and KServe's ``/openai/v1``) for the models that
embed text (``mmserver.embedding``).

The request's inputs (a text, texts, token ids, or lists of token ids) become V2 requests of
the model's own inputs, at most the model's ``max_batch_size`` inputs each and at most
``PARTS_IN_FLIGHT`` of them queued at once, which run through the model's queue: requests from
many clients are batched together as V2 requests are. ``encoding_format`` is ``float`` (lists
of numbers) or ``base64`` (little-endian float32 bytes, what the official client asks for by
default).
``dimensions`` is taken only when it is the model's width: these models do not shorten their
embeddings. ``usage`` counts the tokens embedded, as the model reports them. Errors are OpenAI's
error body.
"""

from __future__ import annotations

import asyncio
import base64
import time
from contextlib import AsyncExitStack
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..codec import encode_json
from ..embedding import INPUT_TOKENS, EmbeddingInputs, as_embedder
from ..entry import ModelEntry
from ..errors import InferenceError, InvalidInput
from ..generation import InvalidParameter
from ..runtime import run_sync
from ..types import InferRequest, InferResponse
from .capability import EMBEDS_TEXT
from .generate import (
    failure_response,
    gather_all,
    hold_model,
    manager_of,
    openapi_operation,
    own_deadline,
    read_json,
    record,
    until_disconnected,
)
from .http import JSON, OPENAI_PREFIXES
from .openai import naming, openai_body, openai_entry, openai_errors

EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
ENCODINGS = ("float", "base64")
#: the most inputs one request may carry (OpenAI's own limit)
MAX_INPUTS = 2048
#: parts of one request queued at once (at most the model's max_queue: one request alone must
#: not fill its queue)
PARTS_IN_FLIGHT = 4
#: answers with up to this many numbers are encoded on the event loop
INLINE_ENCODE_FLOATS = 1 << 16


def _inputs(value: Any) -> EmbeddingInputs:
    """The inputs of an embeddings request: a string, a list of strings, a list of token ids or a
    list of lists of token ids, none of them empty."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(_is_token(t) for t in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise InvalidParameter("'input' must be a string, a list of strings, or (lists of) token ids", "input")
    if len(value) > MAX_INPUTS:
        raise InvalidParameter(f"'input' holds {len(value)} items; at most {MAX_INPUTS} per request", "input")
    if all(isinstance(item, str) for item in value):
        empty = next((i for i, item in enumerate(value) if not item), None)
        if empty is not None:
            raise InvalidParameter(f"input {empty} is an empty string", "input")
        return value
    if all(isinstance(row, list) and row and all(_is_token(t) for t in row) for row in value):
        return value
    raise InvalidParameter("'input' must be a string, a list of strings, or (lists of) token ids", "input")


def _is_token(value: Any) -> bool:
    """A token id: an integer from 0 that fits the models' int64 ids."""
    return type(value) is int and 0 <= value < 2**63


def _encoded(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()


@openai_errors
async def embeddings(request: Request) -> Response:
    doc = openai_body(await read_json(request), EMBEDDING_FIELDS, "embeddings")
    inputs = _inputs(doc.get("input"))
    encoding = doc.get("encoding_format", "float")
    if encoding not in ENCODINGS:
        raise InvalidParameter(f"'encoding_format' must be one of {', '.join(ENCODINGS)}", "encoding_format")
    dimensions = doc.get("dimensions")
    if dimensions is not None and (type(dimensions) is not int or dimensions < 1):
        raise InvalidParameter("'dimensions' must be a positive integer", "dimensions")
    manager = manager_of(request)
    entry = openai_entry(manager, doc["model"], EMBEDS_TEXT)
    deadline = manager.deadline(entry, own_deadline(request))  # the model's timeout_s counts from now
    started = time.perf_counter()
    try:
        vectors, tokens = await _embed(request, entry, inputs, dimensions, deadline)
    except BaseException as exc:
        return failure_response(entry, started, exc)
    body = {"object": "list", "data": None, "model": entry.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    if vectors.size <= INLINE_ENCODE_FLOATS:
        content = _document(body, vectors, encoding)
    else:  # (megabytes of numbers would hold up the event loop)
        content = await run_sync(_document, body, vectors, encoding)
    record(entry, started)("success")
    return Response(content, media_type=JSON)


def _document(body: dict[str, Any], vectors: np.ndarray, encoding: str) -> bytes:
    data = [{"object": "embedding", "index": i, "embedding": _encoded(vector, encoding)}
            for i, vector in enumerate(vectors)]
    return encode_json({**body, "data": data})


async def _embed(request: Request, entry: ModelEntry, inputs: EmbeddingInputs, dimensions: int | None,
                 deadline: float | None) -> tuple[np.ndarray, int]:
    """The embeddings ``[N, D]`` of the inputs and the tokens embedded, before ``deadline`` (the
    request's own or the model's ``timeout_s`` from its arrival, whichever is sooner). The model
    is loaded if need be and held while the parts are made and checked; the parts then run
    through its queue as any V2 request does (not under the hold: an unload drains the queue but
    waits for every hold, so a part queued by a holder would wait for itself)."""
    manager = manager_of(request)
    async with AsyncExitStack() as stack:
        model = await hold_model(stack, manager, entry, deadline)
        embedder = as_embedder(model)
        if embedder is None:
            raise InvalidInput(f"model '{entry.key}' does not embed text")
        size = embedder.embedding_size
        if dimensions is not None and dimensions != size:
            raise InvalidParameter(f"'dimensions' {dimensions} is not supported: model '{entry.name}' embeds "
                                   f"into {size} dimensions and does not shorten its embeddings", "dimensions")
        batcher = entry.current().batcher
        assert batcher is not None  # held: ready, with its queue
        parts = [inputs[start:start + batcher.max_rows] for start in range(0, len(inputs), batcher.max_rows)]
        with naming("input"):  # a bad input is refused before any work starts
            requests = [embedder.embedding_request(part) for part in parts]
            for part_request in requests:
                model.validate(part_request)
        in_flight = asyncio.Semaphore(min(PARTS_IN_FLIGHT, batcher.policy.max_queue))

    async def run(part_request: InferRequest) -> InferResponse:
        async with in_flight:
            return await manager.infer(entry, part_request, deadline)

    work = gather_all(run(part_request) for part_request in requests)
    with naming("input"):
        responses = await until_disconnected(work, request.receive, deadline)
    vectors = [response.outputs[0].data for response in responses]
    for part, block, response in zip(parts, vectors, responses):
        if block.ndim != 2 or block.shape[0] != len(part) or type(response.parameters.get(INPUT_TOKENS)) is not int:
            raise InferenceError(f"model '{entry.key}' gave embeddings of shape {list(block.shape)} "
                                 f"for {len(part)} inputs, and {INPUT_TOKENS} "
                                 f"{response.parameters.get(INPUT_TOKENS)!r}")
    return np.concatenate(vectors), sum(response.parameters[INPUT_TOKENS] for response in responses)


def routes() -> list[BaseRoute]:
    return [Route(prefix + "/embeddings", embeddings, methods=["POST"]) for prefix in OPENAI_PREFIXES]


# ----------------------------------------------------------------------------- OpenAPI

OPENAPI_SCHEMAS: dict[str, Any] = {
    "EmbeddingRequest": {"type": "object", "required": ["model", "input"], "properties": {
        "model": {"type": "string"}, "input": {},
        "encoding_format": {"type": "string", "enum": list(ENCODINGS), "nullable": True},
        "dimensions": {"type": "integer", "minimum": 1, "nullable": True}, "user": {"type": "string"}}},
    "Embeddings": {"type": "object", "required": ["object", "data", "model", "usage"], "properties": {
        "object": {"type": "string"}, "model": {"type": "string"},
        "data": {"type": "array", "items": {"type": "object", "required": ["object", "index", "embedding"],
                                            "properties": {"object": {"type": "string"}, "index": {"type": "integer"},
                                                           "embedding": {}}}},
        "usage": {"type": "object", "properties": {"prompt_tokens": {"type": "integer"},
                                                   "total_tokens": {"type": "integer"}}}}},
}


def _openapi() -> dict[tuple[str, str], dict[str, Any]]:
    ok = {"content": {JSON: {"schema": {"$ref": "#/components/schemas/Embeddings"}}}}
    errors = (400, 401, 404, 408, 413, 415, 429, 500, 503, 504, 507)
    return {("post", prefix + "/embeddings"): openapi_operation(
        prefix + "/embeddings", "Embeddings of texts or token ids (OpenAI)", ok, errors, "OpenAIError",
        "EmbeddingRequest") for prefix in OPENAI_PREFIXES}


OPENAPI = _openapi()
