"""The text generation contract: what the OpenAI and Triton-generate routes need from a model.

A ``LoadedModel`` that generates text also derives from ``TextGenerator``: it streams
``GenerationChunk``s for a ``GenerationRequest`` (an async iterator; closing it or cancelling the
task that iterates it aborts the generation in the engine), counts tokens, reports why each
sequence stopped, and renders chat messages with its tokenizer's chat template.

Sampling parameters are validated here, once for every route family, by ``parse_sampling``:
errors are ``InvalidParameter`` (a 400 that names the parameter, which the OpenAI routes put in
their error body's ``param``). ``IncrementalText`` turns growing token lists into text deltas for
runtimes whose engine does not do that itself (stop strings, incomplete UTF-8 held back).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInput

#: why a sequence stopped (OpenAI's ``finish_reason`` values, plus ``abort``)
FINISH_STOP = "stop"  # end-of-sequence token or a stop string
FINISH_LENGTH = "length"  # max_tokens reached, or the model's context is full
FINISH_ABORT = "abort"  # the engine dropped it (client gone, server stopping)

MAX_STOP_SEQUENCES = 16
MAX_N = 16


class InvalidParameter(InvalidInput):
    """A request parameter is out of range or of the wrong type (400); ``param`` names it."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to generate, validated. ``temperature == 0`` is greedy decoding."""

    max_tokens: int | None = None  # None: as many as the context leaves room for
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(slots=True)
class GenerationRequest:
    """One prompt (text, or token ids) and how to continue it."""

    prompt: str | list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    #: add the tokenizer's special tokens (BOS) to a text prompt; chat templates carry their own
    add_special_tokens: bool = True


@dataclass(slots=True)
class GenerationChunk:
    """New output of one sequence (``index`` of ``n``) since its previous chunk."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int  # tokens generated so far for this sequence
    finish_reason: str | None = None  # set on the sequence's last chunk
    stop_reason: str | int | None = None  # the stop string (or token) that ended it, if any

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class TextGenerator(ABC):
    """Mixin of a ``LoadedModel`` that generates text."""

    @property
    def generates_text(self) -> bool:
        """Whether this model serves the generation routes (a mixin class may host other tasks)."""
        return True

    @property
    def max_model_len(self) -> int | None:
        """The most tokens, prompt and output together, one sequence may hold."""
        return None

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """Sampling parameters (``SAMPLING_KEYS``) the model's configuration sets for requests
        that leave them out, on the V2 routes (the OpenAI routes keep OpenAI's defaults)."""
        return {}

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the output of every sequence; every sequence ends with one chunk whose
        ``finish_reason`` is set. Closing the iterator aborts what is still running.
        Raises ``InvalidInput`` for prompts the model cannot take (too long, empty)."""

    @abstractmethod
    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """The prompt for a conversation, rendered by the tokenizer's chat template with the
        generation prompt appended; ``InvalidInput`` when the model has no template or the
        template rejects the messages."""

    @abstractmethod
    def count_tokens(self, prompt: str | list[int], add_special_tokens: bool = True) -> int:
        """How many tokens a prompt takes."""


def as_generator(model: object) -> TextGenerator | None:
    """``model`` as a text generator, or None when it does not generate text."""
    if isinstance(model, TextGenerator) and model.generates_text:
        return model
    return None


async def generate_all(generator: TextGenerator, request: GenerationRequest) -> list[Completion]:
    """Run a request to its end and gather every sequence (ordered by index)."""
    results: dict[int, Completion] = {}
    stream = generator.generate(request)
    try:
        async for chunk in stream:
            done = results.setdefault(chunk.index, Completion(chunk.index))
            done.add(chunk)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    return [results[i] for i in sorted(results)]


@dataclass(slots=True)
class Completion:
    """A finished sequence, gathered from its chunks."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def add(self, chunk: GenerationChunk) -> None:
        self.text += chunk.text
        self.token_ids.extend(chunk.token_ids)
        self.prompt_tokens = chunk.prompt_tokens
        self.completion_tokens = chunk.completion_tokens
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
            self.stop_reason = chunk.stop_reason


# ----------------------------------------------------------------------------- parameters

#: every parameter ``parse_sampling`` reads, by our name
SAMPLING_KEYS = (
    "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "ignore_eos", "min_tokens",
    "presence_penalty", "frequency_penalty", "repetition_penalty",
)


def parse_sampling(
    values: Mapping[str, Any],
    *,
    aliases: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> SamplingParams:
    """Validate sampling parameters from a request. ``aliases`` maps other spellings to ours
    (``max_new_tokens`` -> ``max_tokens``); keys that are not sampling parameters are left alone
    (the caller decides whether they are allowed). ``None`` values mean "the default"."""
    picked: dict[str, tuple[str, Any]] = {}  # our name -> (the request's name, value)
    for key, value in values.items():
        ours = (aliases or {}).get(key, key)
        if ours not in SAMPLING_KEYS or value is None:
            continue
        if ours in picked:
            raise InvalidParameter(f"parameters '{picked[ours][0]}' and '{key}' mean the same; send one", key)
        picked[ours] = (key, value)
    for key, value in (defaults or {}).items():
        if key not in picked and value is not None:
            picked[key] = (key, value)

    out: dict[str, Any] = {}
    for ours, (name, value) in picked.items():
        out[ours] = _CHECKS[ours](name, value)
    return SamplingParams(**out)


#: V2 spellings of sampling parameters (the transformers runtime's ``max_new_tokens``)
V2_ALIASES = {"max_new_tokens": "max_tokens"}
#: request parameters of V2 inference that the server reads itself (deadline, binary outputs) or
#: that Triton's clients send for features this server does not have (priorities, sequences):
#: they are no sampling parameters, and no runtime refuses them
PROTOCOL_PARAMETERS = frozenset({"timeout", "binary_data_output", "priority", "sequence_id",
                                 "sequence_start", "sequence_end"})


def refuse_unknown(given: Iterable[str], takes: set[str], who: str, passed: frozenset[str] = frozenset()) -> None:
    """``InvalidParameter`` naming the first parameter (in sorted order) of ``given`` that is
    neither one ``who`` takes nor one it lets ``passed`` without listing it."""
    unknown = sorted(set(given) - takes - passed)
    if unknown:
        raise InvalidParameter(f"unknown parameter '{unknown[0]}'; {who} takes {', '.join(sorted(takes))}",
                               unknown[0])


def parse_v2_sampling(
    parameters: Mapping[str, Any], defaults: Mapping[str, Any], flags: frozenset[str] = frozenset()
) -> SamplingParams:
    """The sampling parameters of a V2 inference request on a generation model, validated as the
    generate route validates them (``parse_sampling``, ``defaults`` for what the request leaves
    out), plus ``do_sample``: false is greedy whatever the temperature, true samples (at
    temperature 1 unless one is given). Parameters other than these, the runtime's own ``flags``
    and the protocol's are refused (``InvalidParameter``), and so is ``n`` other than 1."""
    refuse_unknown(parameters, {*SAMPLING_KEYS, *V2_ALIASES, "do_sample", *flags}, "a generation model",
                   PROTOCOL_PARAMETERS)
    values = dict(parameters)
    do_sample = values.pop("do_sample", None)
    if do_sample is not None and type(do_sample) is not bool:
        raise InvalidParameter(f"parameter 'do_sample' is {do_sample!r}; expected true or false", "do_sample")
    if do_sample is False:
        values["temperature"] = 0.0
    elif do_sample and values.get("temperature") is None:
        values["temperature"] = 1.0
    params = parse_sampling(values, aliases=V2_ALIASES, defaults=defaults)
    if do_sample and params.greedy:
        raise InvalidParameter("parameter 'do_sample' is true but temperature is 0 (greedy)", "do_sample")
    if params.n != 1:
        raise InvalidParameter("parameter 'n' must be 1 on V2 inference (one text_output per text)", "n")
    return params


def _int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if type(value) is not int or value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidParameter(f"parameter '{name}' is {value!r}; expected an integer {bound}", name)
    return value


def _float(name: str, value: Any, low: float, high: float | None, *, open_low: bool = False) -> float:
    ok = type(value) in (int, float) and math.isfinite(value)
    if ok:
        ok = value > low if open_low else value >= low
        ok = ok and (high is None or value <= high)
    if not ok:
        left = "(" if open_low else "["
        right = f"{high:g}]" if high is not None else "inf)"
        raise InvalidParameter(f"parameter '{name}' is {value!r}; expected a number in {left}{low:g}, {right}", name)
    return float(value)


def _bool(name: str, value: Any) -> bool:
    if type(value) is not bool:
        raise InvalidParameter(f"parameter '{name}' is {value!r}; expected true or false", name)
    return value


def _stop(name: str, value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise InvalidParameter(f"parameter '{name}' must be a non-empty string or a list of them", name)
    if len(items) > MAX_STOP_SEQUENCES:
        raise InvalidParameter(f"parameter '{name}' has {len(items)} sequences; at most {MAX_STOP_SEQUENCES}", name)
    return tuple(items)


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "max_tokens": lambda n, v: _int(n, v, 1),
    "temperature": lambda n, v: _float(n, v, 0.0, 2.0),
    "top_p": lambda n, v: _float(n, v, 0.0, 1.0, open_low=True),
    "top_k": lambda n, v: _int(n, v, -1) if v != -1 else 0,
    "seed": lambda n, v: _int(n, v, 0, 2**63 - 1),
    "stop": _stop,
    "n": lambda n, v: _int(n, v, 1, MAX_N),
    "ignore_eos": _bool,
    "min_tokens": lambda n, v: _int(n, v, 0),
    "presence_penalty": lambda n, v: _float(n, v, -2.0, 2.0),
    "frequency_penalty": lambda n, v: _float(n, v, -2.0, 2.0),
    "repetition_penalty": lambda n, v: _float(n, v, 0.0, None, open_low=True),
}


def check_room(params: SamplingParams, prompt_tokens: int, limit: int | None) -> int | None:
    """The ``max_tokens`` to run with: the request's, or what the context leaves; raises
    ``InvalidParameter`` when the prompt (plus ``max_tokens``) does not fit ``limit``, or when
    ``min_tokens`` asks for more than that ``max_tokens``."""
    if prompt_tokens < 1:
        raise InvalidParameter("the prompt is empty (it tokenizes to nothing)", "prompt")
    max_tokens = params.max_tokens
    if limit is not None:
        if prompt_tokens >= limit:
            raise InvalidParameter(
                f"the prompt has {prompt_tokens} tokens; this model takes at most {limit} tokens in all, "
                f"prompt and output together", "prompt")
        room = limit - prompt_tokens
        for name, asked in (("max_tokens", max_tokens or 0), ("min_tokens", params.min_tokens)):
            if asked > room:
                raise InvalidParameter(
                    f"{name} is {asked}, but the prompt has {prompt_tokens} tokens and this model takes at "
                    f"most {limit} in all: at most {room} for this prompt", name)
        if max_tokens is None:
            max_tokens = room
    if max_tokens is not None and params.min_tokens > max_tokens:
        raise InvalidParameter(f"min_tokens is {params.min_tokens}, more than max_tokens ({max_tokens})",
                               "min_tokens")
    return max_tokens


# ----------------------------------------------------------------------------- text deltas


class IncrementalText:
    """Text deltas from a sequence's growing token ids, for engines that do not detokenize
    incrementally: decodes the whole sequence each time (outputs are short), holds back a tail
    that is an incomplete UTF-8 character (decoded as U+FFFD) or that could start a stop string,
    and cuts the text before the first stop string that appears. As vLLM does, stop strings are
    looked for only once the sequence is longer than ``min_tokens``: text handed out before then
    is never searched again."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: tuple[str, ...] = (),
                 min_tokens: int = 0) -> None:
        self.decode = decode
        self.stop = stop
        self.min_tokens = min_tokens
        self.sent = 0  # characters of the decoded text already handed out
        self.text = ""
        self.matched: str | None = None

    def push(self, token_ids: Sequence[int]) -> str:
        """The new text once the sequence is ``token_ids``; after a stop string matched
        (``matched``), nothing more."""
        if self.matched is not None:
            return ""
        self.text = self.decode(token_ids)
        hit = self._first_stop() if len(token_ids) > self.min_tokens else None
        if hit is not None:
            position, self.matched = hit
            return self._take(position)
        safe = len(self.text)
        while safe > self.sent and self.text[safe - 1] == "\ufffd":
            safe -= 1
        for stop in self.stop:  # a tail that may grow into a stop string waits
            for size in range(min(len(stop) - 1, safe - self.sent), 0, -1):
                if self.text[safe - size:safe] == stop[:size]:
                    safe -= size
                    break
        return self._take(safe)

    def flush(self) -> str:
        """The text still held back, at the end of the sequence."""
        if self.matched is not None:
            return ""
        return self._take(len(self.text))

    def _first_stop(self) -> tuple[int, str] | None:
        found: tuple[int, str] | None = None
        for stop in self.stop:  # held-back tails make every stop string start after what was sent
            position = self.text.find(stop, self.sent)
            if position >= 0 and (found is None or position < found[0]):
                found = (position, stop)
        return found

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        delta = self.text[self.sent:end]
        self.sent = end
        return delta
