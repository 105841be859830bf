"""OpenAI-compatible routes for the models that generate text, under ``/v1`` and KServe's
``/openai/v1``: ``GET /models`` (and ``/models/{id}``), ``POST /completions`` and
``POST /chat/completions`` (the prompt rendered by the tokenizer's chat template), with
``stream: true`` as server-sent events ending in ``data: [DONE]``.

OpenAI's defaults apply (completions: ``max_tokens`` 16; ``temperature`` 1); vLLM's extra
sampling parameters (``top_k``, ``ignore_eos``, ``min_tokens``, ``repetition_penalty``) are
accepted; anything else OpenAI defines but this server cannot honour (logprobs, tools, ...) and
any unknown field gets 400. Every error body is OpenAI's:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..codec import encode_json
from ..entry import ModelEntry
from ..errors import InvalidInput, MMServerError, ModelNotFound
from ..generation import (
    FINISH_LENGTH,
    GenerationChunk,
    GenerationRequest,
    InvalidParameter,
    SamplingParams,
    TextGenerator,
    check_room,
    generate_all,
    parse_sampling,
)
from ..manager import ModelManager
from ..runtime import run_sync
from .capability import EMBEDS_TEXT, GENERATES_TEXT, Capability, capable_entry
from .generate import (
    answer,
    answer_failure,
    before_deadline,
    error_event,
    gather_all,
    manager_of,
    open_generator,
    own_deadline,
    read_json,
    sse,
)
from .http import JSON, OPENAI_PREFIXES, openai_error_parts

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
#: sampling parameters both endpoints take (OpenAI's, then vLLM's extras)
SAMPLING = ("temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
            "top_k", "ignore_eos", "min_tokens", "repetition_penalty")
COMPLETION_FIELDS = frozenset({"model", "prompt", "max_tokens", "stream", "stream_options", "echo", "suffix",
                               "logprobs", "best_of", "logit_bias", "user", *SAMPLING})
CHAT_FIELDS = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options",
                         "logprobs", "top_logprobs", "logit_bias", "user", "tools", "tool_choice",
                         "parallel_tool_calls", "response_format", *SAMPLING})
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /completions (chat: as many as fit)
#: what a model listed in GET /models does
OPENAI_CAPABILITIES = (GENERATES_TEXT, EMBEDS_TEXT)
# ----------------------------------------------------------------------------- errors


def openai_errors(endpoint: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Any]]:
    """Answer every error of an endpoint with OpenAI's error body."""
    @functools.wraps(endpoint)
    async def wrapped(request: Request) -> Any:
        try:
            return await endpoint(request)
        except MMServerError as exc:
            status, headers, body = openai_error_parts(exc)
            return Response(body, status_code=status, headers=headers)
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.url.path)
            status, headers, body = openai_error_parts(MMServerError(f"internal server error: {type(exc).__name__}: {exc}"))
            return Response(body, status_code=500, headers=headers)
    return wrapped


# ----------------------------------------------------------------------------- models


def _model_card(entry: ModelEntry) -> dict[str, Any]:
    created = 0
    if entry.spec is not None:
        try:
            created = int(entry.spec.path.stat().st_mtime)
        except OSError:
            pass
    return {"id": entry.name, "object": "model", "created": created, "owned_by": "mmserver"}


def _served_models(manager: ModelManager) -> list[ModelEntry]:
    """The models an OpenAI route serves: those that generate or embed text."""
    entries = []
    for name in sorted({row["name"] for row in manager.index()}):
        try:
            entries.append(served_entry(manager, name))
        except ModelNotFound:
            continue
    return entries


def served_entry(manager: ModelManager, model: str) -> ModelEntry:
    """The entry of ``model`` if GET /models lists it: it generates or embeds text (told before
    it loads); else 404 ``model_not_found``, saying why (a missing model, one that does
    neither, one whose runtime cannot tell)."""
    reason = "it neither generates nor embeds text"
    for capability in OPENAI_CAPABILITIES:
        try:
            return openai_entry(manager, model, capability)
        except ModelNotFound:
            raise
        except InvalidInput:
            continue
        except MMServerError as exc:  # ModelNotReady: its runtime is not installed, so it cannot tell
            reason = exc.message
    raise ModelNotFound(f"the model '{model}' is not one of GET /v1/models: {reason}")


@openai_errors
async def list_models(request: Request) -> Response:
    cards = [_model_card(entry) for entry in _served_models(manager_of(request))]
    return Response(encode_json({"object": "list", "data": cards}), media_type=JSON)


@openai_errors
async def get_model(request: Request) -> Response:
    entry = served_entry(manager_of(request), request.path_params["model"])
    return Response(encode_json(_model_card(entry)), media_type=JSON)


@contextlib.contextmanager
def naming(param: str) -> Iterator[None]:
    """Errors about the request's input that name no parameter (a runtime refusing a prompt's
    token ids, an input too long) name ``param`` in OpenAI's error body."""
    try:
        yield
    except InvalidParameter as exc:
        # the runtimes name a text they refuse (too long) 'prompt': the route's own field here
        if exc.param == "prompt" and param != "prompt":
            raise InvalidParameter(exc.message, param) from exc
        raise  # InvalidParameter names its own
    except InvalidInput as exc:
        if type(exc) is not InvalidInput:  # the others keep their status
            raise
        raise InvalidParameter(exc.message, param) from exc


def openai_entry(manager: ModelManager, model: Any, capability: Capability = GENERATES_TEXT) -> ModelEntry:
    """The entry of the request's ``model`` (``name`` or ``name:version``), one that can do what
    the route needs."""
    if not isinstance(model, str) or not model:
        raise InvalidParameter("'model' must be the name of a model (see GET /v1/models)", "model")
    try:
        return capable_entry(manager, model, None, capability)
    except ModelNotFound:
        name, _, version = model.rpartition(":")
        if name and version:  # name:version picks a version
            try:
                return capable_entry(manager, name, version, capability)
            except ModelNotFound:
                pass
        raise ModelNotFound(f"the model '{model}' does not exist (see GET /v1/models)") from None


# ----------------------------------------------------------------------------- requests


def openai_body(doc: Any, fields: frozenset[str], endpoint: str) -> dict[str, Any]:
    """The request's JSON object, every field known, the model named (400 otherwise), without
    its null fields: as in OpenAI's API, a field that is null takes its default."""
    if not isinstance(doc, dict):
        raise InvalidParameter(f"the {endpoint} request body must be a JSON object")
    unknown = sorted(set(doc) - fields)
    if unknown:
        raise InvalidParameter(f"unrecognized request argument supplied: {unknown[0]}", unknown[0])
    doc = {key: value for key, value in doc.items() if value is not None}
    if "model" not in doc:
        raise InvalidParameter("you must provide a model parameter", "model")
    return doc


def _unsupported(doc: dict[str, Any], key: str, allowed: Callable[[Any], bool], what: str) -> None:
    if key in doc and not allowed(doc[key]):
        raise InvalidParameter(f"'{key}' is not supported by this server ({what})", key)


def _sampling(doc: dict[str, Any], max_tokens: Any) -> SamplingParams:
    values = {k: doc[k] for k in SAMPLING if k in doc}
    values["max_tokens"] = max_tokens
    params = parse_sampling(values)
    if params.n > 1 and params.greedy:
        raise InvalidParameter("n > 1 needs sampling (temperature above 0): greedy choices are all alike", "n")
    if "best_of" in doc and doc["best_of"] != params.n:
        raise InvalidParameter("'best_of' must equal 'n' (or be left out)", "best_of")
    return params


def _stream_flags(doc: dict[str, Any]) -> tuple[bool, bool]:
    stream = doc.get("stream", False)
    if type(stream) is not bool:
        raise InvalidParameter("'stream' must be true or false", "stream")
    options = doc.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise InvalidParameter("'stream_options' is only allowed when 'stream' is true", "stream_options")
    include_usage = options.get("include_usage") if isinstance(options, dict) else None
    if include_usage is None:  # absent or null: the default
        include_usage = False
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"} \
            or type(include_usage) is not bool:
        raise InvalidParameter("'stream_options' takes {\"include_usage\": true|false}", "stream_options")
    return stream, include_usage


def _prompts(value: Any) -> list[str | list[int]]:
    """The prompts of a completions request: a string, a list of strings, a list of token ids or
    a list of lists of token ids."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(type(t) is int for t in value):
            return [list(value)]
        if all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in value):
            return [list(p) for p in value]
    raise InvalidParameter("'prompt' must be a string, a list of strings, or (lists of) token ids", "prompt")


def _messages(value: Any) -> list[dict[str, Any]]:
    """Chat messages with their content as text (content parts of type text are joined)."""
    if not isinstance(value, list) or not value:
        raise InvalidParameter("'messages' must be a non-empty list of messages", "messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidParameter(f"messages[{i}] must be an object with a 'role'", "messages")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidParameter(f"messages[{i}].content: only text parts are supported", "messages")
                parts.append(part["text"])
            content = "".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InvalidParameter(f"messages[{i}].content must be a string or a list of text parts", "messages")
        clean = {"role": message["role"], "content": content}
        if isinstance(message.get("name"), str):
            clean["name"] = message["name"]
        messages.append(clean)
    return messages


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ----------------------------------------------------------------------------- completions


@openai_errors
async def completions(request: Request) -> Any:
    doc = openai_body(await read_json(request), COMPLETION_FIELDS, "completions")
    _unsupported(doc, "suffix", lambda v: v == "", "no insertion")
    _unsupported(doc, "logprobs", lambda v: v == 0 or v is False, "no log probabilities")
    _unsupported(doc, "logit_bias", lambda v: v == {}, "no logit bias")
    echo = doc.get("echo", False)
    if type(echo) is not bool:
        raise InvalidParameter("'echo' must be true or false", "echo")
    prompts = _prompts(doc.get("prompt"))
    if echo and any(not isinstance(p, str) for p in prompts):
        raise InvalidParameter("'echo' needs text prompts", "echo")
    stream, include_usage = _stream_flags(doc)
    max_tokens = doc.get("max_tokens", COMPLETIONS_MAX_TOKENS)
    params = _sampling(doc, max_tokens)
    jobs = [GenerationRequest(p, params) for p in prompts]
    echoes = [p if echo else "" for p in prompts]
    return await _run(request, doc["model"], jobs, stream, include_usage, _CompletionFormat(echoes))


@openai_errors
async def chat_completions(request: Request) -> Any:
    doc = openai_body(await read_json(request), CHAT_FIELDS, "chat completions")
    _unsupported(doc, "logprobs", lambda v: v is False, "no log probabilities")
    _unsupported(doc, "top_logprobs", lambda v: v == 0, "no log probabilities")
    _unsupported(doc, "logit_bias", lambda v: v == {}, "no logit bias")
    _unsupported(doc, "tools", lambda v: v == [], "no tool calls")
    _unsupported(doc, "tool_choice", lambda v: v == "none", "no tool calls")
    _unsupported(doc, "response_format", lambda v: isinstance(v, dict) and v.get("type") == "text",
                 "text responses only")
    messages = _messages(doc.get("messages"))
    if "max_tokens" in doc and "max_completion_tokens" in doc:
        raise InvalidParameter("send one of 'max_tokens' and 'max_completion_tokens'", "max_tokens")
    max_tokens = doc.get("max_completion_tokens", doc.get("max_tokens"))
    stream, include_usage = _stream_flags(doc)
    params = _sampling(doc, max_tokens)
    jobs = [GenerationRequest("", params, add_special_tokens=False)]  # the prompt: the template's
    return await _run(request, doc["model"], jobs, stream, include_usage, _ChatFormat(), messages)


async def _run(request: Request, model: Any, jobs: list[GenerationRequest], stream: bool, include_usage: bool,
               fmt: _Format, messages: list[dict[str, Any]] | None = None) -> Any:
    """Load (if need be) and hold the model, check every prompt, then answer in one body or as
    a stream."""
    started = time.perf_counter()
    manager = manager_of(request)
    entry = openai_entry(manager, model)
    deadline = manager.deadline(entry, own_deadline(request))  # the model's timeout_s counts from now
    stack = AsyncExitStack()
    try:
        generator = await open_generator(stack, manager, entry, deadline)
        with naming("prompt" if messages is None else "messages"):
            if messages is not None:
                jobs = [GenerationRequest(generator.chat_prompt(messages), job.params, add_special_tokens=False)
                        for job in jobs]
            for job in jobs:  # (tokenizing a long prompt would hold up the event loop)
                size = await run_sync(generator.count_tokens, job.prompt, job.add_special_tokens)
                if isinstance(job.prompt, list) and not job.prompt:
                    raise InvalidParameter("the prompt is empty", "prompt")
                check_room(job.params, size, generator.max_model_len)
            fmt.start(entry.name, jobs[0].params.n)
            for i, job in enumerate(jobs):
                job.request_id = f"{fmt.id}-{i}"
            events = _events(generator, jobs, fmt, include_usage, deadline) if stream else None
            return await answer(request, entry, started, stack, events,
                                lambda: gather_all(generate_all(generator, job) for job in jobs), fmt.whole, deadline)
    except BaseException as exc:
        return await answer_failure(entry, started, stack, exc)


async def _events(generator: TextGenerator, jobs: list[GenerationRequest], fmt: _Format,
                  include_usage: bool, deadline: float | None = None) -> AsyncIterator[bytes]:
    """The stream: the prompts one after the other (choice index = prompt * n + sequence), until
    ``deadline``. An error before the first event is raised (the route answers it); one after it
    (the deadline too) is the last event before ``[DONE]``."""
    prompt_tokens = completion_tokens = 0
    sent = False
    try:
        for p, job in enumerate(jobs):
            counted: dict[int, int] = {}
            prompt_counted = 0
            stream = before_deadline(generator.generate(job), deadline)
            try:
                async for chunk in stream:
                    index = p * job.params.n + chunk.index
                    prompt_counted = chunk.prompt_tokens
                    counted[chunk.index] = chunk.completion_tokens
                    for doc in fmt.chunk(index, chunk):
                        if include_usage:
                            doc["usage"] = None
                        yield sse(doc)
                        sent = True
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
            prompt_tokens += prompt_counted
            completion_tokens += sum(counted.values())
        if include_usage:
            yield sse({**fmt.head(), "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    except Exception as exc:
        if not sent:
            raise
        yield error_event(exc, lambda error: b"data: " + openai_error_parts(error)[2] + b"\n\n")
    yield DONE


# ----------------------------------------------------------------------------- response formats


class _Format(ABC):
    object_whole = object_chunk = ""
    prefix = ""

    def start(self, model: str, n: int) -> None:
        self.model = model
        self.n = n
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.started: set[int] = set()

    def head(self, whole: bool = False) -> dict[str, Any]:
        return {"id": self.id, "object": self.object_whole if whole else self.object_chunk,
                "created": self.created, "model": self.model}

    def whole(self, results: list[list[Any]]) -> dict[str, Any]:
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for p, sequences in enumerate(results):
            prompt_tokens += sequences[0].prompt_tokens if sequences else 0
            for seq in sequences:
                completion_tokens += seq.completion_tokens
                choices.append(self.choice(p, p * self.n + seq.index, seq))
        return {**self.head(whole=True), "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}

    @abstractmethod
    def choice(self, prompt: int, index: int, seq: Any) -> dict[str, Any]:
        """One choice of a whole (non-streamed) answer."""

    @abstractmethod
    def chunk(self, index: int, chunk: GenerationChunk) -> list[dict[str, Any]]:
        """The stream events for one generated chunk."""


def _finish(reason: str | None) -> str | None:
    """OpenAI knows stop and length; an aborted sequence ends as length (it was cut)."""
    if reason is None or reason in ("stop", FINISH_LENGTH):
        return reason
    return FINISH_LENGTH if reason == "abort" else "stop"


class _CompletionFormat(_Format):
    object_whole = object_chunk = "text_completion"
    prefix = "cmpl"

    def __init__(self, echoes: list[str]) -> None:
        self.echoes = echoes

    def choice(self, prompt: int, index: int, seq: Any) -> dict[str, Any]:
        return {"index": index, "text": self.echoes[prompt] + seq.text, "logprobs": None,
                "finish_reason": _finish(seq.finish_reason)}

    def chunk(self, index: int, chunk: GenerationChunk) -> list[dict[str, Any]]:
        text = chunk.text
        if index not in self.started:
            self.started.add(index)
            text = self.echoes[index // self.n] + text
        if not text and chunk.finish_reason is None:
            return []
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": _finish(chunk.finish_reason)}
        return [{**self.head(), "choices": [choice]}]


class _ChatFormat(_Format):
    object_whole, object_chunk = "chat.completion", "chat.completion.chunk"
    prefix = "chatcmpl"

    def choice(self, prompt: int, index: int, seq: Any) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": seq.text}, "logprobs": None,
                "finish_reason": _finish(seq.finish_reason)}

    def chunk(self, index: int, chunk: GenerationChunk) -> list[dict[str, Any]]:
        docs = []
        if index not in self.started:
            self.started.add(index)
            docs.append({**self.head(), "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
        if chunk.text:
            docs.append({**self.head(), "choices": [{"index": index, "delta": {"content": chunk.text},
                                                     "logprobs": None, "finish_reason": None}]})
        if chunk.finish_reason is not None:
            docs.append({**self.head(), "choices": [{"index": index, "delta": {}, "logprobs": None,
                                                     "finish_reason": _finish(chunk.finish_reason)}]})
        return docs


def routes() -> list[BaseRoute]:
    out: list[BaseRoute] = []
    for prefix in OPENAI_PREFIXES:
        out += [
            Route(prefix + "/models", list_models, methods=["GET"]),
            Route(prefix + "/models/{model}", get_model, methods=["GET"]),
            Route(prefix + "/completions", completions, methods=["POST"]),
            Route(prefix + "/chat/completions", chat_completions, methods=["POST"]),
        ]
    return out


# ----------------------------------------------------------------------------- OpenAPI

_OBJECT = {"type": "object", "additionalProperties": True}
OPENAPI_SCHEMAS: dict[str, Any] = {
    "OpenAIError": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": "string", "nullable": True}, "code": {"type": "string", "nullable": True}}}},
    },
    "OpenAIModel": {
        "type": "object",
        "required": ["id", "object"],
        "properties": {"id": {"type": "string"}, "object": {"type": "string"}, "created": {"type": "integer"},
                       "owned_by": {"type": "string"}},
    },
    "OpenAIModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"type": "string"},
                       "data": {"type": "array", "items": {"$ref": "#/components/schemas/OpenAIModel"}}},
    },
    "CompletionRequest": {"type": "object", "required": ["model", "prompt"], "properties": {
        "model": {"type": "string"}, "prompt": {}, "max_tokens": {"type": "integer"},
        "temperature": {"type": "number"}, "top_p": {"type": "number"}, "n": {"type": "integer"},
        "stop": {}, "seed": {"type": "integer"}, "stream": {"type": "boolean"}, "stream_options": _OBJECT}},
    "ChatCompletionRequest": {"type": "object", "required": ["model", "messages"], "properties": {
        "model": {"type": "string"}, "messages": {"type": "array", "items": _OBJECT},
        "max_tokens": {"type": "integer"}, "max_completion_tokens": {"type": "integer"},
        "temperature": {"type": "number"}, "top_p": {"type": "number"}, "n": {"type": "integer"},
        "stop": {}, "seed": {"type": "integer"}, "stream": {"type": "boolean"}, "stream_options": _OBJECT}},
    "Completion": {"type": "object", "required": ["id", "object", "choices"], "properties": {
        "id": {"type": "string"}, "object": {"type": "string"}, "created": {"type": "integer"},
        "model": {"type": "string"}, "choices": {"type": "array", "items": _OBJECT}, "usage": _OBJECT}},
}


def _openapi() -> dict[tuple[str, str], dict[str, Any]]:
    from .generate import openapi_operation

    def ok(schema: str, stream: bool = False) -> dict[str, Any]:
        content: dict[str, Any] = {JSON: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
        if stream:
            content["text/event-stream"] = {"schema": {"type": "string",
                                                       "description": "Chunks as 'data: {...}', then 'data: [DONE]'."}}
        return {"content": content}

    error = {"description": "Error", "content": {JSON: {"schema": {"$ref": "#/components/schemas/OpenAIError"}}}}
    operations: dict[tuple[str, str], dict[str, Any]] = {}
    errors = (400, 401, 404, 408, 413, 415, 429, 500, 503, 504, 507)
    for prefix in OPENAI_PREFIXES:
        operations[("get", prefix + "/models")] = {
            "summary": "The models that generate or embed text (OpenAI)", "responses": {"200": {
                "description": "OK", **ok("OpenAIModelList")}, "401": error}}
        operations[("get", prefix + "/models/{model}")] = {
            "summary": "One model (OpenAI)",
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "OK", **ok("OpenAIModel")}, "400": error, "401": error,
                          "404": error}}
        operations[("post", prefix + "/completions")] = openapi_operation(
            prefix + "/completions", "Text completion (OpenAI)", ok("Completion", True), errors, "OpenAIError",
            "CompletionRequest")
        operations[("post", prefix + "/chat/completions")] = openapi_operation(
            prefix + "/chat/completions", "Chat completion, the prompt rendered by the model's chat template "
            "(OpenAI)", ok("Completion", True), errors, "OpenAIError", "ChatCompletionRequest")
    for operation in operations.values():
        if not operation.get("parameters"):
            operation.pop("parameters", None)
    return operations


OPENAPI = _openapi()
