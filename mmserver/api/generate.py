"""Triton's generate extension for text generators, and the plumbing the generation routes share.

``POST /v2/models/{m}[/versions/{v}]/generate`` takes a flat JSON object: ``text_input`` and the
sampling parameters, at the top level or under ``parameters`` (``max_tokens``, ``temperature``,
``top_p``, ``top_k``, ``seed``, ``stop``, ...), and answers ``{"model_name", "model_version",
"text_output"}``. ``.../generate_stream`` answers the same objects as server-sent events, one per
piece of new text (the last one carries ``finish_reason``); the status waits for the first
event, so an error before it is the V2 ``{"error": ...}`` body with its status, and one after it
is the last event, ``{"error": ...}``. Triton's ``timeout`` parameter (microseconds) and the
``Request-Timeout`` header shorten the model's deadline, as on V2 inference.

Shared with the OpenAI routes (``api/openai.py``): finding a model that generates text (loading
a lazy one, and holding it in flight for the whole request), deadlines (of whole answers and of
streams: a deadline passed mid-stream ends the stream with an error event and aborts the
generation), request metrics, and an event-stream response that cancels the generation when the
client disconnects.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from ..codec import encode_json
from ..entry import ModelEntry
from ..errors import (
    ClientDisconnected,
    InferenceError,
    InferenceTimeout,
    InvalidInput,
    MMServerError,
)
from ..generation import (
    SAMPLING_KEYS,
    V2_ALIASES,
    GenerationRequest,
    InvalidParameter,
    TextGenerator,
    as_generator,
    check_room,
    generate_all,
    parse_sampling,
    refuse_unknown,
)
from ..manager import ModelManager
from ..metrics import outcome_of
from ..runtime import LoadedModel, run_sync
from .capability import GENERATES_TEXT, capable_entry
from .http import JSON, TIMEOUT_HEADER, read_json_body, request_deadline

log = logging.getLogger(__name__)
T = TypeVar("T")

#: flags of Triton's vLLM backend that change nothing here (the input is never echoed)
TRITON_FLAGS = frozenset({"exclude_input_in_output", "stream", "return_finish_reason",
                          "return_num_input_tokens", "return_num_output_tokens"})
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


# ----------------------------------------------------------------------------- shared plumbing


async def gather_all(calls: Iterable[Awaitable[T]]) -> list[T]:
    """The results of the calls, run together, in order; when one fails (or the caller is
    cancelled), the others are cancelled and awaited before the error goes on."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def manager_of(request: Request) -> ModelManager:
    return request.app.state.manager


async def read_json(request: Request) -> Any:
    """The request body as JSON, up to the server's ``max_request_bytes`` (400 when it is not)."""
    return await read_json_body(request, request.app.state.settings.max_request_bytes)


def generating_entry(manager: ModelManager, name: str, version: str | None = None) -> ModelEntry:
    """The entry of a model that generates text (400 for one that does not)."""
    return capable_entry(manager, name, version, GENERATES_TEXT)


async def hold_model(stack: AsyncExitStack, manager: ModelManager, entry: ModelEntry,
                     deadline: float | None) -> LoadedModel:
    """The model, loaded if need be and held in flight until ``stack`` closes; 504 once the
    request's own ``deadline`` or the model's ``timeout_s`` passes while it is still loading
    (the load goes on)."""
    return await stack.enter_async_context(manager.holding(entry, deadline))


async def open_generator(stack: AsyncExitStack, manager: ModelManager, entry: ModelEntry,
                         deadline: float | None) -> TextGenerator:
    """The model as a text generator, as ``hold_model`` holds it."""
    generator = as_generator(await hold_model(stack, manager, entry, deadline))
    if generator is None:
        raise InvalidInput(f"model '{entry.key}' does not generate text")
    return generator


def own_deadline(request: Request, timeout_us: Any = None) -> float | None:
    """The request's own deadline (``time.monotonic()``), as V2 inference reads it: Triton's
    ``timeout`` parameter in microseconds, or the ``Request-Timeout`` header in seconds."""
    return request_deadline(timeout_us, request.headers.get(TIMEOUT_HEADER))


async def before(start: Callable[[], Awaitable[T]], deadline: float | None, what: str) -> T:
    """``await start()``, cancelled once ``deadline`` (``time.monotonic()``; None: never) passes,
    and not started past it; then ``InferenceTimeout`` says that ``what`` did not happen."""
    if deadline is None:
        return await start()
    left = deadline - time.monotonic()
    if left > 0:  # (past it, an await that does not suspend, such as a chunk already waiting, is never cut)
        try:
            async with asyncio.timeout(left):
                return await start()
        except TimeoutError:
            pass
    raise InferenceTimeout(f"the request's deadline passed before {what}")


def before_deadline(stream: AsyncIterator[T], deadline: float | None) -> AsyncIterator[T]:
    """``stream`` (a generation's chunks) until ``deadline``; past it, the wait for the next item
    is cancelled, the stream closed (which aborts the generation) and ``InferenceTimeout`` raised."""
    return stream if deadline is None else _until(stream, deadline)


async def _until(stream: AsyncIterator[T], deadline: float) -> AsyncIterator[T]:
    try:
        while True:
            try:
                item = await before(functools.partial(anext, stream), deadline, "the generation finished")
            except StopAsyncIteration:
                return
            yield item
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def until_disconnected(work: Awaitable[T], receive: Receive, deadline: float | None = None) -> T:
    """Run ``work`` (after the body was read) but cancel it when the client disconnects (raising
    ``ClientDisconnected``) or once ``deadline`` (``time.monotonic()``) passes (raising
    ``InferenceTimeout``)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    timeout_s = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    if watcher in done:
        raise ClientDisconnected("the client disconnected; its generation was aborted")
    raise InferenceTimeout("the request's deadline passed before its answer was ready")


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream:
    """An ASGI response of server-sent events (already encoded): ``first``, the one the route
    waited for before answering (None if there was none), then the rest of ``events``. When the
    client disconnects, the iterator is cancelled and closed, which aborts the generation behind
    it; ``on_end`` is called once with the outcome (``success``, ``cancelled``, ``error``, or an
    ``ErrorEvent``'s)."""

    def __init__(self, first: bytes | None, events: AsyncIterator[bytes], on_end: Callable[[str], None],
                 cleanup: AsyncExitStack) -> None:
        self.first = first
        self.events = events
        self.on_end = on_end
        self.cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome = "error"
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            pump = asyncio.ensure_future(self._pump(send))
            watcher = asyncio.ensure_future(_wait_disconnect(receive))
            try:
                done, _ = await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watcher.cancel()
                if not pump.done():
                    pump.cancel()
                await asyncio.gather(pump, watcher, return_exceptions=True)
            if pump in done and not pump.cancelled() and pump.exception() is None:
                outcome = pump.result()
            elif pump.cancelled() or isinstance(pump.exception(), OSError):
                outcome = "cancelled"
            else:
                log.error("event stream failed: %r", pump.exception())
        except OSError:  # the connection broke while sending
            outcome = "cancelled"
        finally:
            try:
                await self.events.aclose()  # type: ignore[attr-defined]
            finally:
                await self.cleanup.aclose()
                self.on_end(outcome)

    async def _pump(self, send: Send) -> str:
        outcome = "success"

        async def send_event(event: bytes) -> None:
            nonlocal outcome
            if isinstance(event, ErrorEvent):
                outcome = event.outcome
            await send({"type": "http.response.body", "body": event, "more_body": True})

        if self.first is not None:
            await send_event(self.first)
        async for event in self.events:
            await send_event(event)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return outcome


class ErrorEvent(bytes):
    """A stream's last event, reporting an error after its first event (by then its status was
    sent), with the ``outcome`` the request records (``timeout`` for a deadline, say)."""

    outcome: str


def error_event(error: Exception, encode: Callable[[MMServerError], bytes]) -> ErrorEvent:
    """The event ``encode`` makes of ``error`` (one that is not an ``MMServerError`` is logged and
    reported as a failed generation)."""
    if not isinstance(error, MMServerError):
        log.error("generation failed mid-stream", exc_info=error)
        error = InferenceError(f"the generation failed: {type(error).__name__}: {error}")
    event = ErrorEvent(encode(error))
    event.outcome = outcome_of(error)
    return event


def sse(doc: Any) -> bytes:
    return b"data: " + encode_json(doc) + b"\n\n"


def record(entry: ModelEntry | None, started: float) -> Callable[[str], None]:
    """A callback recording one request's outcome in the model's metrics."""
    def done(outcome: str) -> None:
        if entry is not None:
            entry.metrics.request(outcome, time.perf_counter() - started)
    return done


def fail(entry: ModelEntry | None, started: float, error: BaseException) -> None:
    record(entry, started)(outcome_of(error) if isinstance(error, MMServerError) else "error")


# ----------------------------------------------------------------------------- the generate extension


async def answer(request: Request, entry: ModelEntry, started: float, stack: AsyncExitStack,
                 events: AsyncIterator[bytes] | None, work: Callable[[], Awaitable[T]],
                 document: Callable[[T], Any], deadline: float | None) -> Response:
    """The response of a generation route: the event stream ``events`` (which then owns
    ``stack``, the model's hold, and keeps to the deadline itself), or else ``document`` of what
    ``work`` returns, once it is done (cancelled if the client leaves or ``deadline`` passes)."""
    if events is not None:
        # The status waits for the first event: an error before it (a parameter the runtime
        # refuses, a full engine, the deadline) gets its own status and body, as without a stream.
        try:
            first = await until_disconnected(_first(events), request.receive)
        except BaseException:
            await events.aclose()  # type: ignore[attr-defined]
            raise
        return EventStream(first, events, record(entry, started), stack)
    try:
        result = await until_disconnected(work(), request.receive, deadline)
    finally:
        await stack.aclose()
    record(entry, started)("success")
    return Response(encode_json(document(result)), media_type=JSON)


async def _first(events: AsyncIterator[bytes]) -> bytes | None:
    return await anext(events, None)


async def answer_failure(entry: ModelEntry | None, started: float, stack: AsyncExitStack,
                         error: BaseException) -> Response:
    """Release the model, then ``failure_response``."""
    await stack.aclose()
    return failure_response(entry, started, error)


def failure_response(entry: ModelEntry | None, started: float, error: BaseException) -> Response:
    """Count the failure and re-raise it for the route's error body; a client that left gets an
    empty 499 (nobody reads it, but the access log shows why)."""
    fail(entry, started, error)
    if isinstance(error, ClientDisconnected):
        return Response(b"", status_code=499)
    raise error


def _generate_request(body: Any) -> tuple[str, dict[str, Any], str | None]:
    """``text_input``, the parameters (sampling, and Triton's ``timeout``) and the request id of a
    generate request."""
    if not isinstance(body, dict):
        raise InvalidInput("the generate request body must be a JSON object with 'text_input'")
    text = body.get("text_input")
    if isinstance(text, list) and len(text) == 1:
        text = text[0]
    if not isinstance(text, str):
        raise InvalidInput("'text_input' must be a string")
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be a JSON object")
    values = {k: v for k, v in body.items() if k not in ("text_input", "parameters", "id")}
    for key in set(values) & set(parameters):
        raise InvalidParameter(f"parameter '{key}' is given both at the top level and in 'parameters'", key)
    values.update(parameters)
    refuse_unknown(values, {*SAMPLING_KEYS, *V2_ALIASES, "timeout"}, "generate", TRITON_FLAGS)
    return text, values, request_id


async def generate(request: Request) -> Response:
    return await _generate(request, stream=False)


async def generate_stream(request: Request) -> Response:
    return await _generate(request, stream=True)


async def _generate(request: Request, stream: bool) -> Any:
    started = time.perf_counter()
    manager = manager_of(request)
    params = request.path_params
    entry = None
    stack = AsyncExitStack()
    try:
        entry = generating_entry(manager, params["name"], params.get("version"))
        text, values, request_id = _generate_request(await read_json(request))
        if values.get("stream") is True and not stream:
            raise InvalidParameter("'stream' is true: use the generate_stream route for a stream", "stream")
        # the model's timeout_s counts from now: a lazy load's wait is part of it
        deadline = manager.deadline(entry, own_deadline(request, values.pop("timeout", None)))
        generator = await open_generator(stack, manager, entry, deadline)
        sampling = parse_sampling(values, aliases=V2_ALIASES, defaults=generator.generation_defaults)
        if sampling.n != 1:
            raise InvalidParameter("parameter 'n' must be 1 on generate (one text_output)", "n")
        # (tokenizing a long prompt would hold up the event loop)
        check_room(sampling, await run_sync(generator.count_tokens, text), generator.max_model_len)
        job = GenerationRequest(text, sampling, request_id or "")
        head = {"model_name": entry.name, "model_version": entry.version}
        if request_id is not None:
            head["id"] = request_id
        events = _stream_events(generator, job, head, deadline) if stream else None
        return await answer(request, entry, started, stack, events, lambda: generate_all(generator, job),
                            lambda results: {**head, "text_output": results[0].text}, deadline)
    except BaseException as exc:
        return await answer_failure(entry, started, stack, exc)


async def _stream_events(generator: TextGenerator, job: GenerationRequest, head: dict[str, Any],
                         deadline: float | None = None) -> AsyncIterator[bytes]:
    """The stream's events until ``deadline``; an error before the first one is raised (the route
    answers it), one after it (the deadline too) is the last event."""
    stream = before_deadline(generator.generate(job), deadline)
    sent = False
    try:
        async for chunk in stream:
            doc = {**head, "text_output": chunk.text}
            if chunk.finish_reason is not None:
                doc["finish_reason"] = chunk.finish_reason
            if chunk.text or chunk.finish_reason is not None:
                yield sse(doc)
                sent = True
    except Exception as exc:
        if not sent:
            raise
        yield error_event(exc, lambda error: sse({"error": error.message}))
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


def routes() -> list[BaseRoute]:
    model, versioned = "/v2/models/{name}", "/v2/models/{name}/versions/{version}"
    return [
        Route(model + "/generate", generate, methods=["POST"]),
        Route(versioned + "/generate", generate, methods=["POST"]),
        Route(model + "/generate_stream", generate_stream, methods=["POST"]),
        Route(versioned + "/generate_stream", generate_stream, methods=["POST"]),
    ]


# ----------------------------------------------------------------------------- OpenAPI

def _path_parameters(path: str) -> list[dict[str, Any]]:
    names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]


def openapi_operation(path: str, summary: str, ok: dict[str, Any], errors: tuple[int, ...], error_schema: str,
                      body: str) -> dict[str, Any]:
    """One OpenAPI operation taking a JSON body (used by ``api/openapi.py``)."""
    error = {"description": "Error", "content": {JSON: {"schema": {"$ref": f"#/components/schemas/{error_schema}"}}}}
    return {
        "summary": summary,
        "parameters": _path_parameters(path),
        "requestBody": {"required": True, "content": {JSON: {"schema": {"$ref": f"#/components/schemas/{body}"}}}},
        "responses": {"200": {"description": "OK", **ok}, **{str(s): error for s in errors}},
    }


OPENAPI_SCHEMAS: dict[str, Any] = {
    "GenerateRequest": {
        "type": "object",
        "required": ["text_input"],
        "properties": {
            "text_input": {"type": "string"},
            "id": {"type": "string"},
            "parameters": {"type": "object", "additionalProperties": True,
                           "description": "Sampling parameters: " + ", ".join(SAMPLING_KEYS)
                           + "; and Triton's timeout (microseconds)"},
        },
        "additionalProperties": True,
        "description": "Sampling parameters may also be given at the top level.",
    },
    "GenerateResponse": {
        "type": "object",
        "required": ["model_name", "text_output"],
        "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                       "id": {"type": "string"}, "text_output": {"type": "string"},
                       "finish_reason": {"type": "string"}},
    },
}
_GENERATE_ERRORS = (400, 401, 404, 408, 413, 415, 429, 500, 503, 504, 507)
_GENERATE_OK = {"content": {JSON: {"schema": {"$ref": "#/components/schemas/GenerateResponse"}}}}
_STREAM_OK = {"content": {"text/event-stream": {"schema": {
    "type": "string", "description": "Events 'data: <GenerateResponse>' with the new text of each step."}}}}
OPENAPI: dict[tuple[str, str], dict[str, Any]] = {
    ("post", path): openapi_operation(path, summary, ok, _GENERATE_ERRORS, "Error", "GenerateRequest")
    for path, summary, ok in (
        ("/v2/models/{name}/generate", "Text generation (Triton's generate extension)", _GENERATE_OK),
        ("/v2/models/{name}/versions/{version}/generate", "Text generation on one version", _GENERATE_OK),
        ("/v2/models/{name}/generate_stream", "Streamed text generation (server-sent events)", _STREAM_OK),
        ("/v2/models/{name}/versions/{version}/generate_stream", "Streamed text generation on one version",
         _STREAM_OK),
    )
}
