"""Streamed text generation for the transformers runtime's generation task (the
``mmserver.generation.TextGenerator`` contract, behind the OpenAI and generate routes).

One sequence at a time runs ``model.generate`` on the thread pool, under the model's lock (so it
never overlaps a V2 batch, an offload or an unload), with a streamer that hands every new token
to the event loop as it is produced. Text deltas come from ``IncrementalText`` (stop strings,
incomplete UTF-8 held back), decoded with the event loop's own copy of the tokenizer. Closing
the stream sets a flag that a stopping criterion checks after every token: the generation stops
at its next step. ``n`` sequences run one after the other (each with its own seed offset).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from mmserver.errors import InferenceError, InvalidInput, MMServerError, ModelNotReady
from mmserver.generation import (
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationChunk,
    GenerationRequest,
    IncrementalText,
    SamplingParams,
    check_room,
)

from .options import check_supported

if TYPE_CHECKING:
    from .model import TransformersModel


class _Streamer(BaseStreamer):
    """Hands each new token to the event loop; the first ``put`` is the prompt, skipped."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[tuple[str, Any]]) -> None:
        self.loop, self.queue = loop, queue
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        tokens = [int(t) for t in value.reshape(-1).tolist()]
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ("tokens", tokens))

    def end(self) -> None:
        pass


class _Cancelled(StoppingCriteria):
    def __init__(self, flag: threading.Event) -> None:
        self.flag = flag

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device)


async def stream_generation(model: TransformersModel, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
    """The ``generate`` of a transformers generation model."""
    if not model.generates_text:
        raise InvalidInput(f"model {model.label} ({model.task}) does not generate text")
    counter = model._counter  # noqa: SLF001 - the event loop's tokenizer copy
    if counter is None:
        raise ModelNotReady(f"model {model.label} is unloaded")
    params = request.params
    check_supported(params)
    if isinstance(request.prompt, list):
        ids = list(request.prompt)
        if any(type(t) is not int or not 0 <= t < model.vocab_size for t in ids):
            raise InvalidInput(f"the prompt's token ids must be integers in [0, {model.vocab_size})")
    else:
        ids = counter.encode(request.prompt, request.add_special_tokens)
    max_tokens = check_room(params, len(ids), model.limit) or model.options.max_new_tokens
    for index in range(params.n):
        seed = None if params.seed is None else params.seed + index
        async for chunk in _one_sequence(model, ids, params, max_tokens, index, seed):
            yield chunk


async def _one_sequence(model: TransformersModel, ids: list[int], params: SamplingParams, max_tokens: int,
                        index: int, seed: int | None) -> AsyncIterator[GenerationChunk]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    cancel = threading.Event()
    counter = model._counter  # noqa: SLF001
    job = loop.run_in_executor(None, _generate, model, ids, params, max_tokens, seed, cancel,
                               _Streamer(loop, queue))
    job.add_done_callback(lambda done: (done.exception(), queue.put_nowait(("done", done))))
    text = IncrementalText(lambda tokens: counter.decode(tokens), params.stop, params.min_tokens)
    eos = set() if params.ignore_eos else model.eos_ids
    generated: list[int] = []  # every token, the end-of-sequence one included (it is counted)
    visible: list[int] = []
    ended_by_eos = False
    try:
        while True:
            kind, value = await queue.get()
            if kind == "done":
                error = value.exception()
                if error is not None:
                    if isinstance(error, MMServerError):
                        raise error
                    raise InferenceError(f"model {model.label} failed: {type(error).__name__}: {error}")
                reason = FINISH_STOP if ended_by_eos or len(generated) < max_tokens else FINISH_LENGTH
                yield GenerationChunk(index, text.flush(), (), len(ids), len(generated), reason)
                return
            if ended_by_eos:
                continue
            new = []
            for token in value:
                new.append(token)
                if token in eos:
                    ended_by_eos = True
                    break
                visible.append(token)
            generated.extend(new)
            delta = text.push(visible)
            if text.matched is not None:  # a stop string: the sequence ends here
                cancel.set()
                yield GenerationChunk(index, delta, tuple(new), len(ids), len(generated), FINISH_STOP, text.matched)
                return
            if delta or new:
                yield GenerationChunk(index, delta, tuple(new), len(ids), len(generated))
    finally:
        cancel.set()  # a closed stream stops the generation at its next token


def _generate(model: TransformersModel, ids: list[int], params: SamplingParams, max_tokens: int,
              seed: int | None, cancel: threading.Event, streamer: _Streamer) -> None:
    """Run on the thread pool: one sequence through ``model.generate``."""
    with model._lock:  # noqa: SLF001 - never overlaps a batch, an offload or an unload
        if model.model is None:
            raise ModelNotReady(f"model {model.label} is unloaded")
        if model._offloaded:  # noqa: SLF001
            raise ModelNotReady(f"model {model.label} is offloaded to host memory; restore it first")
        if cancel.is_set():
            return
        if torch.get_num_threads() != model.threads:
            torch.set_num_threads(model.threads)
        config = model.generation_config_for(params, max_tokens)
        inputs = torch.tensor([ids], dtype=torch.long, device=model.device)
        with torch.inference_mode():
            model.run_generate(config, seed, input_ids=inputs, attention_mask=torch.ones_like(inputs),
                               streamer=streamer, stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]))
