"""The generation routes' plumbing (``api/openai.py``, ``api/generate.py``) around a runtime's
stream: errors before and after the first event, and prompts generated together.

``ScriptedGenerator`` is a fake: it stands in for a runtime's ``TextGenerator`` (the
transformers and vLLM runtimes are exercised through HTTP in their own test files), so that a
stream can fail at a chosen point and its closing can be observed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import pytest

from mmserver.api import generate, openai
from mmserver.errors import InferenceTimeout, InvalidInput
from mmserver.api.generate import gather_all
from mmserver.entry import ModelEntry
from mmserver.generation import GenerationChunk, GenerationRequest, SamplingParams, TextGenerator, generate_all
from mmserver.manager import ModelManager
from mmserver.runtime import RuntimeRegistry
from mmserver.settings import Settings
from mmserver.spec import ModelConfig, ModelSpec


class ScriptedGenerator(TextGenerator):
    """Streams ``chunks`` pieces of text per prompt, ``delay`` seconds apart; a prompt equal to
    ``refused`` fails before its first chunk, and ``fail_after`` chunks in, every prompt raises
    ``crash``. ``ends`` records how each stream ended: finished, or closed early."""

    def __init__(self, chunks: int = 3, delay: float = 0.0, refused: str | None = None,
                 fail_after: int | None = None, crash: Exception | None = None) -> None:
        self.chunks, self.delay, self.refused = chunks, delay, refused
        self.fail_after, self.crash = fail_after, crash
        self.ends: dict[str, str] = {}

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        return self._stream(request)

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        prompt = str(request.prompt)
        if prompt == self.refused:
            raise InvalidInput(f"prompt {prompt!r} is refused")
        end = "closed early"
        try:
            for i in range(self.chunks):
                if i == self.fail_after and self.crash is not None:
                    raise self.crash
                await asyncio.sleep(self.delay)
                yield GenerationChunk(0, f"{prompt}{i} ", (i,), 1, i + 1, "length" if i == self.chunks - 1 else None)
            end = "finished"
        finally:
            self.ends[prompt] = end

    def chat_prompt(self, messages: list[dict]) -> str:
        return "chat"

    def count_tokens(self, prompt: str | list[int], add_special_tokens: bool = True) -> int:
        return 1


def jobs(*prompts: str) -> list[GenerationRequest]:
    return [GenerationRequest(p, SamplingParams(max_tokens=16)) for p in prompts]


async def collect(events: AsyncIterator[bytes]) -> list[bytes]:
    return [event async for event in events]


def completion_format() -> openai._CompletionFormat:
    fmt = openai._CompletionFormat(["", ""])
    fmt.start("m", 1)
    return fmt


def test_when_one_prompt_fails_the_others_are_cancelled_before_the_error_goes_on():
    generator = ScriptedGenerator(chunks=50, delay=0.01, refused="bad")

    async def run() -> None:
        with pytest.raises(InvalidInput, match="refused"):
            await gather_all(generate_all(generator, job) for job in jobs("good", "bad"))
        assert generator.ends == {"good": "closed early"}  # not left generating after the 400

    asyncio.run(run())


def test_prompts_generated_together_each_get_their_whole_answer():
    generator = ScriptedGenerator(chunks=3)
    results = asyncio.run(gather_all(generate_all(generator, job) for job in jobs("a", "b")))
    assert [r[0].text for r in results] == ["a0 a1 a2 ", "b0 b1 b2 "]
    assert generator.ends == {"a": "finished", "b": "finished"}


@pytest.mark.parametrize("stream", ["openai", "v2"])
def test_an_error_before_the_first_event_is_raised_for_the_route_to_answer(stream):
    generator = ScriptedGenerator(refused="bad")
    if stream == "openai":
        events = openai._events(generator, jobs("bad"), completion_format(), include_usage=False)
    else:
        events = generate._stream_events(generator, jobs("bad")[0], {"model_name": "m"})
    with pytest.raises(InvalidInput, match="refused"):
        asyncio.run(collect(events))


@pytest.mark.parametrize("crash", [InvalidInput("the engine refused it"), RuntimeError("engine bug")])
def test_an_error_after_the_first_event_is_the_last_event_and_the_openai_stream_still_ends_with_done(crash):
    generator = ScriptedGenerator(chunks=3, fail_after=1, crash=crash)
    events = asyncio.run(collect(openai._events(generator, jobs("p"), completion_format(), include_usage=False)))
    assert events[-1] == openai.DONE
    assert json.loads(events[0][len(b"data: "):])["choices"][0]["text"] == "p0 "
    error = json.loads(events[-2][len(b"data: "):])["error"]
    assert str(crash) in error["message"] and error["type"] == ("invalid_request_error" if isinstance(
        crash, InvalidInput) else "server_error")

    v2_events = asyncio.run(collect(generate._stream_events(
        ScriptedGenerator(chunks=3, fail_after=1, crash=crash), jobs("p")[0], {"model_name": "m"})))
    assert json.loads(v2_events[0][len(b"data: "):])["text_output"] == "p0 "
    assert str(crash) in json.loads(v2_events[-1][len(b"data: "):])["error"]
    expected = "invalid" if isinstance(crash, InvalidInput) else "error"
    assert events[-2].outcome == v2_events[-1].outcome == expected  # what the request's metrics record


def streams(generator: ScriptedGenerator, deadline: float) -> dict[str, AsyncIterator[bytes]]:
    """The OpenAI and the V2 stream of the prompt "p", to ``deadline``."""
    return {"openai": openai._events(generator, jobs("p"), completion_format(), include_usage=False, deadline=deadline),
            "v2": generate._stream_events(generator, jobs("p")[0], {"model_name": "m"}, deadline)}


@pytest.mark.parametrize("stream", ["openai", "v2"])
def test_a_deadline_passing_mid_stream_ends_it_with_an_error_event_and_aborts_the_generation(stream):
    generator = ScriptedGenerator(chunks=100, delay=0.01)

    async def run() -> list[bytes]:
        return await collect(streams(generator, time.monotonic() + 0.1)[stream])

    started = time.monotonic()
    events = asyncio.run(run())
    assert time.monotonic() - started < 0.5
    assert generator.ends == {"p": "closed early"}  # the generation stopped at the deadline
    if stream == "openai":
        assert events[-1] == openai.DONE
        events = events[:-1]
    docs = [json.loads(event[len(b"data: "):]) for event in events]
    assert len(docs) > 2 and all("error" not in doc for doc in docs[:-1])
    assert isinstance(events[-1], generate.ErrorEvent) and events[-1].outcome == "timeout"
    assert not any(isinstance(event, generate.ErrorEvent) for event in events[:-1])
    error = docs[-1]["error"]
    if stream == "openai":
        assert error["code"] == "timeout" and error["type"] == "server_error"
        error = error["message"]
    assert error == "the request's deadline passed before the generation finished"


@pytest.mark.parametrize("stream", ["openai", "v2"])
def test_a_deadline_passing_before_the_first_event_is_raised_for_the_route_to_answer_504(stream):
    generator = ScriptedGenerator(chunks=3, delay=1.0)

    async def run() -> None:
        with pytest.raises(InferenceTimeout, match="deadline passed"):
            await collect(streams(generator, time.monotonic() + 0.05)[stream])

    asyncio.run(run())
    assert generator.ends == {"p": "closed early"}


@pytest.mark.parametrize("last, outcome", [(None, "success"), (InferenceTimeout("deadline"), "timeout"),
                                           (RuntimeError("engine bug"), "error")])
def test_an_event_stream_records_the_outcome_of_its_last_event(last, outcome):
    async def events() -> AsyncIterator[bytes]:
        yield generate.sse({"text_output": "a"})
        if last is not None:
            yield generate.error_event(last, lambda error: generate.sse({"error": error.message}))

    sent: list[dict] = []
    ended: list[str] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        await asyncio.Event().wait()  # the client stays connected
        return {}

    async def run() -> None:
        stream = generate.EventStream(None, events(), ended.append, contextlib.AsyncExitStack())
        await stream({"type": "http"}, receive, send)

    asyncio.run(run())
    assert ended == [outcome]
    assert sent[0]["status"] == 200 and sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert len(sent) == (3 if last is None else 4)


def test_a_stream_without_a_deadline_is_the_generators_own():
    chunks = ScriptedGenerator().generate(jobs("p")[0])
    assert generate.before_deadline(chunks, None) is chunks


@pytest.mark.parametrize("model_s, server_s, own_s, expected_s", [
    (None, None, None, None), (None, None, 2.0, 2.0), (None, 3.0, None, 3.0), (1.0, 3.0, None, 1.0),
    (1.0, 3.0, 0.5, 0.5), (1.0, None, 2.0, 1.0),
])
def test_the_deadline_is_the_models_timeout_or_the_servers_shortened_by_the_requests_own(model_s, server_s, own_s,
                                                                                         expected_s, tmp_path):
    manager = ModelManager(Settings(model_repository=tmp_path, infer_timeout_s=server_s), RuntimeRegistry({}),
                           devices={})
    spec = ModelSpec("m", "1", tmp_path, "none", ModelConfig(timeout_s=model_s), "model.yaml")
    now = time.monotonic()
    deadline = manager.deadline(ModelEntry("m", "1", spec), None if own_s is None else now + own_s)
    if expected_s is None:
        assert deadline is None
    else:
        assert now + expected_s <= deadline < now + expected_s + 0.1
