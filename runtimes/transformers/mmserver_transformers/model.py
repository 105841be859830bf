"""A loaded Hugging Face model: validation, padding-aware batching, compute, and the host tier.

This module imports torch and transformers at the top: it is imported only by
``TransformersRuntime.load``, on a worker thread and under ``IMPORT_LOCK``.

One request carries texts (BYTES ``text`` / ``text_input``, ``[N]`` or ``[N, 1]``) or token ids
(``input_ids`` ``[N, L]`` with an optional ``attention_mask``). A batch of requests is tokenized
without padding, every row is re-packed to its attended tokens and padded once for the whole batch
(on the right for encoders, on the left for generation), so a row's result does not depend on its
batch mates. Compute runs on the thread pool under ``torch.inference_mode()``.
"""

from __future__ import annotations

import copy
import gc
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteriaList,
)

from mmserver.embedding import INPUT_TOKENS, RETURN_INPUT_TOKENS, EmbeddingInputs, TextEmbedder, embedding_request
from mmserver.errors import InferenceError, InvalidInput, ModelLoadError, ModelNotReady
from mmserver.generation import GenerationChunk, GenerationRequest, SamplingParams, TextGenerator
from mmserver.checkpoint import max_positions, read_config, weight_files
from mmserver.memory import format_bytes
from mmserver.runtime import HOST, IMPORT_LOCK, LoadedModel, Placement, run_sync
from mmserver.spec import ModelSpec
from mmserver.token_inputs import IDS_INPUT, row_lengths, text_inputs
from mmserver.types import (
    InferInput,
    InferOutput,
    InferRequest,
    InferResponse,
    ModelMetadata,
    TensorSpec,
)

from .estimate import activation_allowance
from .gpu_cache import empty_gpu_caches
from .host_copy import HostCopy, park, release_later, unpark
from .options import (
    CLASSIFICATION,
    EMBEDDING,
    GENERATION,
    Options,
    dtype_for,
    v2_sampling,
)
from .stop_strings import StopStrings

log = logging.getLogger("mmserver_transformers")

TEXT_INPUTS = ("text", "text_input")
AUTO_CLASSES = {
    CLASSIFICATION: AutoModelForSequenceClassification,
    EMBEDDING: AutoModel,
    GENERATION: AutoModelForCausalLM,
}
#: a text longer than this many bytes per allowed token is refused without tokenizing it
MAX_BYTES_PER_TOKEN = 32
#: tokenizers without a limit report this (transformers' VERY_LARGE_INTEGER)
_UNLIMITED = 10**12
HEARTBEAT_S = 10.0

# Sampling draws from torch's global generator: a seeded request must not share it with another
# sampling call running at the same time, or its text would not be reproducible.
_SAMPLING_LOCK = threading.Lock()
#: the lowest temperature sampled with, as vLLM does, and the lowest repetition penalty (below
#: them, logits divided by either overflow float32 and sampling fails on inf/nan probabilities)
MIN_TEMPERATURE = MIN_REPETITION_PENALTY = 1e-2

transformers.utils.logging.disable_progress_bar()


# ----------------------------------------------------------------------------- loading


def load_model(spec: ModelSpec, placement: Placement) -> TransformersModel:
    """Load ``spec``'s checkpoint onto ``placement.device`` (runs on a worker thread)."""
    folder = spec.artifact
    config = read_config(folder)
    parameters = spec.config.parameters
    options = Options.parse(parameters, config)
    device = placement.device
    if placement.is_gpu and not torch.cuda.is_available():
        raise ModelLoadError(f"placement {device} needs CUDA, which this torch build cannot use")
    dtype = dtype_for(device, parameters, config)
    if not weight_files(folder):
        raise ModelLoadError(f"no *.safetensors or pytorch_model.bin in {folder}")
    label = f"{spec.name}:{spec.version}"
    started = time.monotonic()
    log.info("model %s: loading %s (%s) as %s on %s", label, folder, options.task, dtype, device)
    with _Heartbeat(label, started):
        with IMPORT_LOCK:  # these import the model's and tokenizer's modules on first use
            hf_config = AutoConfig.from_pretrained(folder, local_files_only=True)
            model_class = _model_class(options.task, hf_config)
            padding_side = "left" if options.task == GENERATION else "right"
            try:
                tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, padding_side=padding_side)
            except (OSError, ValueError, TypeError) as exc:
                raise ModelLoadError(f"cannot load the tokenizer in {folder}: {exc}") from None
        model = model_class.from_pretrained(
            folder, config=hf_config, dtype=getattr(torch, dtype), local_files_only=True
        )
        model.eval()
        if placement.is_gpu:
            model.to(device)
            torch.cuda.synchronize(device)
    loaded = TransformersModel(model, tokenizer, options, config, device, dtype, label)
    log.info("model %s: loaded in %.1f s (%s)", label, time.monotonic() - started,
             ", ".join(f"{d} {n / 2**20:.1f} MiB" for d, n in loaded.memory().items()))
    return loaded


def _model_class(task: str, hf_config: Any) -> Any:
    """The concrete model class for the task (importing its module now, under the import lock)."""
    auto = AUTO_CLASSES[task]
    try:
        return auto._model_mapping[type(hf_config)]
    except (KeyError, AttributeError, ValueError) as exc:
        raise ModelLoadError(
            f"transformers has no {auto.__name__} for model type {hf_config.model_type!r} "
            f"(task {task}): {exc}"
        ) from None


class _Heartbeat:
    """Logs every few seconds while a long load runs."""

    def __init__(self, label: str, started: float) -> None:
        self.label, self.started = label, started
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"loading {label}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._done.wait(HEARTBEAT_S):
            log.info("model %s: still loading after %.0f s", self.label, time.monotonic() - self.started)


class _TokenCounter:
    """Counts tokens with its own copy of the tokenizer (fast tokenizers refuse to be used from two
    threads at once while the worker thread encodes a batch; this copy is never changed after it
    is made, so any number of threads may read it). A fast tokenizer encodes through
    ``encode_batch``, which lets go of the GIL, so that a long prompt tokenized on a worker
    thread does not hold up the event loop."""

    def __init__(self, tokenizer: Any) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_str(backend.to_str())
            self._fast.no_truncation()
            self._fast.no_padding()
            self._slow = None
        else:
            self._fast = None
            self._slow = copy.deepcopy(tokenizer)

    def count(self, texts: list[str]) -> list[int]:
        if self._fast is not None:
            return [len(e.ids) for e in self._fast.encode_batch(texts, add_special_tokens=True)]
        return [len(ids) for ids in self._slow(texts, add_special_tokens=True)["input_ids"]]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._fast is not None:
            return list(self._fast.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
        return list(self._slow(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        if self._fast is not None:
            return self._fast.decode(list(ids), skip_special_tokens=True)
        return self._slow.decode(list(ids), skip_special_tokens=True)


# ----------------------------------------------------------------------------- the model


class TransformersModel(LoadedModel, TextGenerator, TextEmbedder):
    """A loaded classification, embedding or generation model (an embedding model also serves
    ``mmserver.embedding``; a generation model streams text through ``mmserver.generation``: see
    ``streaming.py``)."""

    def __init__(self, model: Any, tokenizer: Any, options: Options, config: dict[str, Any],
                 device: str, dtype: str, label: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.options = options
        self.task = options.task
        self.device = device
        self.dtype = dtype
        self.label = label
        self.threads = options.threads
        self._lock = threading.Lock()  # compute, offload, restore and unload never overlap
        self._offloaded = False
        self._host: HostCopy | None = None  # the host tier's buffer while offloaded
        self._gpu = device.startswith("cuda")
        # On a GPU, torch's caching allocator keeps what a batch's activations took: the model
        # holds this much device memory beyond its weights (the estimate's allowance)
        self.workspace = activation_allowance(config, self.task, dtype) if self._gpu else 0

        if tokenizer.pad_token_id is None:  # e.g. GPT-2 and Llama tokenizers: pad with eos (masked anyway)
            fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
            tokenizer.pad_token = fallback
        self.vocab_size = int(getattr(model.config, "vocab_size", 0) or len(tokenizer))
        self.pad_id = self._padding_id(model.config, int(tokenizer.pad_token_id))
        if self.task == GENERATION:
            tokenizer.truncation_side = "left"  # keep the end of a prompt that is too long

        positions = max_positions(config)
        if positions:
            positions -= _position_offset(model)
        limits = [n for n in (positions, tokenizer.model_max_length) if n and n < _UNLIMITED]
        self.limit: int | None = min(limits) if limits else None
        self._counter = _TokenCounter(tokenizer)
        self._n_special = self._counter.count([""])[0]

        if self.task == CLASSIFICATION:
            id2label = getattr(model.config, "id2label", None) or {}
            n_labels = int(getattr(model.config, "num_labels", len(id2label)))
            self.labels = np.empty(n_labels, dtype=object)
            self.labels[:] = [str(id2label.get(i, i)).encode() for i in range(n_labels)]
            out_specs = [TensorSpec("scores", "FP32", (-1, n_labels)), TensorSpec("label", "BYTES", (-1,))]
        elif self.task == EMBEDDING:
            hidden = getattr(model.config, "hidden_size", None) or -1
            out_specs = [TensorSpec("embedding", "FP32", (-1, hidden))]
        else:
            out_specs = [TensorSpec("text_output", "BYTES", (-1,)), TensorSpec("output_ids", "INT64", (-1, -1))]
            self.generation_config = copy.deepcopy(model.generation_config)
            self.generation_config.pad_token_id = self.pad_id
            eos = self.generation_config.eos_token_id
            if eos is None:
                eos = tokenizer.eos_token_id
            self.eos_ids = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}
            self.default_do_sample = bool(self.generation_config.do_sample)
        self._outputs = out_specs
        self._output_names = tuple(spec.name for spec in out_specs)
        self._memory = self._measure()

    # -------------------------------------------------------------- metadata

    def metadata(self) -> ModelMetadata:
        parameters: dict[str, Any] = {
            "task": self.task, "dtype": self.dtype, "device": self.device,
            "inputs": "text or text_input (BYTES [N] or [N, 1]), or input_ids (INT64 [N, L]) with an "
                      "optional attention_mask",
        }
        if self.limit is not None:
            parameters["max_tokens"] = self.limit
        return ModelMetadata(
            platform="transformers",
            inputs=[TensorSpec("text", "BYTES", (-1,))],
            outputs=list(self._outputs),
            parameters=parameters,
        )

    # -------------------------------------------------------------- text generation contract

    @property
    def generates_text(self) -> bool:
        return self.task == GENERATION

    @property
    def max_model_len(self) -> int | None:
        return self.limit

    @property
    def generation_defaults(self) -> dict[str, Any]:
        if self.task != GENERATION:
            return {}
        return {"max_tokens": self.options.max_new_tokens, "temperature": 1.0 if self.default_do_sample else 0.0}

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        from .streaming import stream_generation

        return stream_generation(self, request)

    def count_tokens(self, prompt: str | list[int], add_special_tokens: bool = True) -> int:
        if isinstance(prompt, list):
            return len(prompt)
        if self._counter is None:
            raise ModelNotReady(f"model {self.label} is unloaded")
        return len(self._counter.encode(prompt, add_special_tokens))

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        template = getattr(self.tokenizer, "chat_template", None) if self.tokenizer is not None else None
        if self.task != GENERATION or not template:
            raise InvalidInput(f"model {self.label} has no chat template; use /v1/completions")
        try:  # rendering only (jinja): no tokenizer state is touched
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - errors raised by the template itself
            raise InvalidInput(f"the chat template of model {self.label} rejects these messages: {exc}") from None

    # -------------------------------------------------------------- text embedding contract

    @property
    def embeds_text(self) -> bool:
        return self.task == EMBEDDING

    @property
    def embedding_size(self) -> int | None:
        width = self._outputs[0].shape[-1] if self.task == EMBEDDING else -1
        return width if width > 0 else None

    def embedding_request(self, inputs: EmbeddingInputs) -> InferRequest:
        return embedding_request(inputs, TEXT_INPUTS[0], self.pad_id)

    # -------------------------------------------------------------- validation (event loop)

    def validate(self, request: InferRequest) -> None:
        for name in request.output_names:
            if name not in self._output_names:
                raise InvalidInput(
                    f"unknown output '{name}'; this {self.task} model offers {', '.join(self._output_names)}"
                )
        kind, primary, mask = self._layout(request)
        truncation = self._truncation(request)
        request.flag(RETURN_INPUT_TOKENS)
        if self.task == EMBEDDING:
            request.flag("normalize")
        gen = self._generation(request) if self.task == GENERATION else None
        room = self._room(gen)
        if kind == "text":
            self._check_texts(primary, room, truncation)
        else:
            self._check_ids(primary, mask, room)

    def _layout(self, request: InferRequest) -> tuple[str, InferInput, InferInput | None]:
        """Which inputs the request uses: ("text", texts, None) or ("ids", input_ids, mask)."""
        given = text_inputs(request, TEXT_INPUTS)
        if given.texts is not None:
            return "text", given.texts, None
        assert given.ids is not None
        return "ids", given.ids, given.mask

    def _truncation(self, request: InferRequest) -> bool:
        return request.flag("truncation", self.options.truncation)

    def _generation(self, request: InferRequest) -> SamplingParams:
        return v2_sampling(request.parameters, self.generation_defaults, self.limit)

    def _room(self, gen: SamplingParams | None) -> int | None:
        """The most tokens a prompt row may have."""
        if self.limit is None or gen is None:
            return self.limit
        assert gen.max_tokens is not None  # the model's default fills it in
        return self.limit - gen.max_tokens

    def _check_texts(self, tensor: InferInput, room: int | None, truncation: bool) -> None:
        raw = tensor.data.reshape(-1)
        long_rows: list[int] = []
        for i, item in enumerate(raw):
            try:
                item.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"input '{tensor.name}': text {i} is not valid UTF-8") from None
            if not item and not self._n_special:
                raise InvalidInput(f"input '{tensor.name}': text {i} is empty")
            # a token covers at least one byte (one more for a tokenizer's leading-space marker)
            if room is not None and not truncation and len(item) + self._n_special + 1 > room:
                long_rows.append(i)
        if not long_rows:
            return
        for i in long_rows:
            if len(raw[i]) > MAX_BYTES_PER_TOKEN * room:
                raise InvalidInput(self._too_long(tensor.name, i, f"{len(raw[i])} bytes", room))
        counts = self._counter.count([raw[i].decode("utf-8") for i in long_rows])
        for i, count in zip(long_rows, counts):
            if count > room:
                raise InvalidInput(self._too_long(tensor.name, i, f"{count} tokens", room))

    def _check_ids(self, ids: InferInput, mask: InferInput | None, room: int | None) -> None:
        lengths = row_lengths(ids, mask, self.vocab_size)
        if room is not None and lengths.size and lengths.max() > room:
            row = int(np.argmax(lengths))
            raise InvalidInput(self._too_long(IDS_INPUT, row, f"{int(lengths[row])} tokens", room, ids=True))

    def _too_long(self, name: str, row: int, size: str, room: int, ids: bool = False) -> str:
        what = "row" if ids else "text"
        limit = f"the model takes at most {room} tokens"
        if self.task == GENERATION and self.limit is not None:
            limit += f" ({self.limit} positions minus max_new_tokens {self.limit - room})"
        hint = "" if ids else "; send a shorter text or set parameters.truncation: true"
        return f"input '{name}': {what} {row} is {size} long and {limit}{hint}"

    # -------------------------------------------------------------- batching

    def rows(self, request: InferRequest) -> int:
        return int(self._layout(request)[1].data.shape[0])

    def batch_key(self, request: InferRequest) -> Hashable:
        """Requests of one batch share inputs, outputs and generation settings, and lengths of
        the same power of two (so short texts are not padded to long ones)."""
        kind, primary, mask = self._layout(request)
        if kind == "text":
            longest = max((len(t) for t in primary.data.reshape(-1)), default=0)
            layout: tuple[Any, ...] = ("text", longest.bit_length())
        else:
            layout = ("ids", mask is not None, int(primary.data.shape[1]).bit_length())
        gen = self._generation(request) if self.task == GENERATION else None
        # a seeded sampling request runs alone: its random draws must not depend on batch mates
        alone = id(request) if gen is not None and not gen.greedy and gen.seed is not None else None
        return layout, request.output_names, gen, alone

    # -------------------------------------------------------------- compute (thread pool)

    async def infer(self, requests: list[InferRequest]) -> list[InferResponse]:
        return await run_sync(self._infer_batch, requests)

    def _infer_batch(self, requests: list[InferRequest]) -> list[InferResponse]:
        with self._lock:
            if self.model is None:
                raise ModelNotReady(f"model {self.label} is unloaded")
            if self._offloaded:
                raise ModelNotReady(f"model {self.label} is offloaded to host memory; restore it first")
            if torch.get_num_threads() != self.threads:  # torch's thread count is per calling thread
                torch.set_num_threads(self.threads)
            names = requests[0].output_names or self._output_names
            rows, counts = self._token_rows(requests)
            gen = self._generation(requests[0]) if self.task == GENERATION else None
            if not rows:
                results = self._empty()
            else:
                with torch.inference_mode():
                    if self.task == CLASSIFICATION:
                        results = self._classify(rows)
                    elif self.task == EMBEDDING:
                        results = self._embed(rows)
                    else:
                        results = self._generate(rows, gen)
            responses = self._split(requests, results, counts, names)
        self._report_input_tokens(requests, responses, rows, counts)
        return responses

    @staticmethod
    def _report_input_tokens(requests: list[InferRequest], responses: list[InferResponse],
                             rows: list[list[int]], counts: list[int]) -> None:
        """The tokens each request's rows took, for the requests that ask
        (``return_num_input_tokens``, as Triton's vLLM backend names it)."""
        start = 0
        for request, response, count in zip(requests, responses, counts):
            if request.parameters.get(RETURN_INPUT_TOKENS) is True:
                response.parameters[INPUT_TOKENS] = sum(len(row) for row in rows[start:start + count])
            start += count

    def _token_rows(self, requests: list[InferRequest]) -> tuple[list[list[int]], list[int]]:
        """Every row of the batch as its list of attended token ids, and the rows per request."""
        rows: list[list[int]] = []
        counts: list[int] = []
        kind = self._layout(requests[0])[0]
        if kind == "text":
            texts: list[str] = []
            for request in requests:
                tensor = self._layout(request)[1]
                items = [t.decode("utf-8") for t in tensor.data.reshape(-1)]
                texts.extend(items)
                counts.append(len(items))
            if texts:
                rows = self._tokenize(texts, requests, counts)
        else:
            for request in requests:
                _, ids, mask = self._layout(request)
                keep = mask.data.astype(bool) if mask is not None else np.ones(ids.data.shape, bool)
                rows.extend(row[k].astype(np.int64).tolist() for row, k in zip(ids.data, keep))
                counts.append(ids.data.shape[0])
        return rows, counts

    def _tokenize(self, texts: list[str], requests: list[InferRequest], counts: list[int]) -> list[list[int]]:
        gen = self._generation(requests[0]) if self.task == GENERATION else None
        room = self._room(gen)
        truncation = room is not None and any(self._truncation(r) for r in requests)
        encoded = self.tokenizer(texts, add_special_tokens=True, padding=False, truncation=truncation,
                                 max_length=room if truncation else None)["input_ids"]
        for index, ids in enumerate(encoded):  # validate() already refused these; this is a backstop
            if not ids or (room is not None and len(ids) > room):
                request = requests[_owner(index, counts)]
                name = self._layout(request)[1].name
                row = index - sum(counts[: _owner(index, counts)])
                size = f"{len(ids)} tokens"
                raise InvalidInput(f"input '{name}': text {row} is empty" if not ids
                                   else self._too_long(name, row, size, room))
        return encoded

    def _padding_id(self, config: Any, tokenizer_pad: int) -> int:
        """The id batches are padded with. A decoder classifier (Llama, GPT-2) scores each row's
        last token that is not its config's ``pad_token_id``, so a classifier pads with that id
        when it is a token; otherwise the config is given the tokenizer's (padding is masked for
        every other use)."""
        configured = getattr(config, "pad_token_id", None)
        if self.task == CLASSIFICATION and type(configured) is int and 0 <= configured < self.vocab_size:
            return configured
        if configured is None or self.task == CLASSIFICATION:
            config.pad_token_id = tokenizer_pad
        return tokenizer_pad

    def _padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One [B, L] batch: right padding for encoders, left padding for generation."""
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        left = self.task == GENERATION
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = row
            mask[i, span] = 1
        return (torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device))

    def _classify(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        ids, mask = self._padded(rows)
        logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        scores = torch.softmax(logits, dim=-1).cpu().numpy()
        return {"scores": scores, "label": self.labels.take(scores.argmax(axis=1))}

    def _embed(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        ids, mask = self._padded(rows)
        hidden = self.model(input_ids=ids, attention_mask=mask)[0].float()
        if self.options.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.options.pooling == "last":
            last = mask.sum(dim=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return {"embedding": pooled.cpu().numpy()}

    def _generate(self, rows: list[list[int]], gen: SamplingParams) -> dict[str, Any]:
        ids, mask = self._padded(rows)
        assert gen.max_tokens is not None
        config = self.generation_config_for(gen, gen.max_tokens)
        eos = set() if gen.ignore_eos else self.eos_ids
        watch = StopStrings(len(rows), ids.shape[1], gen.stop, eos, self._decode, gen.min_tokens) if gen.stop else None
        one_per_row = getattr(config, "num_beams", None) in (None, 1)  # beam candidates are rows too
        extra: dict[str, Any] = {}
        if watch is not None and one_per_row:
            extra["stopping_criteria"] = StoppingCriteriaList([watch])
        if config.repetition_penalty not in (None, 1.0):  # transformers' own would penalize the padding
            penalty = _RowRepetitionPenalty(config.repetition_penalty, (mask == 0).sum(dim=1))
            extra["logits_processor"] = LogitsProcessorList([penalty])
            config.repetition_penalty = 1.0
        out = self.run_generate(config, gen.seed, input_ids=ids, attention_mask=mask, **extra)
        finished = []
        for index, row in enumerate(out[:, ids.shape[1]:].cpu().tolist()):
            tokens = row[:next((i for i, t in enumerate(row) if t in eos), len(row))]
            finished.append(watch.finish(index, tokens) if watch is not None else (tokens, self._decode(tokens)))
        return {"text_output": [text.encode("utf-8") for _, text in finished],
                "output_ids": [tokens for tokens, _ in finished]}

    def generation_config_for(self, params: SamplingParams, max_tokens: int) -> Any:
        """The checkpoint's ``GenerationConfig`` with a request's sampling parameters applied
        (V2 batches and streamed sequences alike)."""
        config = copy.deepcopy(self.generation_config)
        config.max_new_tokens = max_tokens
        config.max_length = None
        config.min_new_tokens = params.min_tokens or None
        if params.repetition_penalty != 1.0:
            config.repetition_penalty = max(params.repetition_penalty, MIN_REPETITION_PENALTY)
        if params.ignore_eos:  # (None would be refilled from the model's own generation config)
            config.eos_token_id = []
        if params.greedy:  # sampling settings of the checkpoint's generation_config do not apply
            config.do_sample = False
            config.temperature = config.top_p = config.top_k = None
        else:
            config.do_sample = True
            config.temperature = max(params.temperature, MIN_TEMPERATURE)
            config.top_p = params.top_p
            config.top_k = params.top_k  # 0 is off (None would be refilled with the checkpoint's or 50)
        return config

    def run_generate(self, config: Any, seed: int | None, **inputs: Any) -> torch.Tensor:
        """``model.generate`` (the caller holds the model's lock); sampling holds
        ``_SAMPLING_LOCK`` and seeds torch's generator first."""
        if not config.do_sample:
            return self.model.generate(generation_config=config, **inputs)
        with _SAMPLING_LOCK:
            if seed is not None:
                torch.manual_seed(seed)
            return self.model.generate(generation_config=config, **inputs)

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def _empty(self) -> dict[str, Any]:
        """The results of a batch without rows (every request has N = 0)."""
        widths = {spec.name: max(spec.shape[-1], 0) for spec in self._outputs}
        return {
            "scores": np.zeros((0, widths.get("scores", 0)), np.float32), "label": np.empty(0, object),
            "embedding": np.zeros((0, widths.get("embedding", 0)), np.float32),
            "text_output": [], "output_ids": [],
        }

    def _split(self, requests: list[InferRequest], results: dict[str, Any], counts: list[int],
               names: Sequence[str]) -> list[InferResponse]:
        responses = []
        start = 0
        for request, count in zip(requests, counts):
            part = slice(start, start + count)
            start += count
            outputs = []
            for name in names:
                value = results[name][part]
                if name == "embedding" and request.flag("normalize", self.options.normalize) and count:
                    norms = np.linalg.norm(value, axis=1, keepdims=True)
                    value = value / np.maximum(norms, 1e-12)
                if name == "text_output":
                    array = np.empty(count, dtype=object)
                    array[:] = value
                    kind, given, _ = self._layout(request)  # [N, 1] texts are answered [N, 1]
                    outputs.append(InferOutput(name, array.reshape(given.data.shape) if kind == "text" else array,
                                               "BYTES"))
                elif name == "output_ids":
                    width = max((len(r) for r in value), default=0)
                    array = np.full((count, width), -1, dtype=np.int64)
                    for i, row in enumerate(value):
                        array[i, : len(row)] = row
                    outputs.append(InferOutput(name, array, "INT64"))
                elif name == "label":
                    outputs.append(InferOutput(name, value, "BYTES"))
                else:
                    outputs.append(InferOutput(name, np.ascontiguousarray(value, dtype=np.float32), "FP32"))
            responses.append(InferResponse(outputs=outputs))
        if start != sum(counts):
            raise InferenceError(f"the batch produced {start} rows for {sum(counts)}")
        return responses

    # -------------------------------------------------------------- memory and host tier

    def memory(self) -> dict[str, int]:
        return dict(self._memory)

    def _tensors(self) -> Iterator[torch.Tensor]:
        """Every parameter and buffer once (tied weights are one tensor)."""
        seen: set[int] = set()
        for tensor in itertools.chain(self.model.parameters(), self.model.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield tensor

    def _measure(self) -> dict[str, int]:
        """Bytes of parameters and buffers per device, counting shared storage once, plus the
        activation workspace while on a GPU."""
        totals: dict[str, int] = {}
        seen: set[tuple[str, int]] = set()
        for tensor in self._tensors():
            device = HOST if tensor.device.type == "cpu" else str(tensor.device)
            key = (device, tensor.data_ptr())
            if tensor.numel() and key in seen:
                continue
            seen.add(key)
            totals[device] = totals.get(device, 0) + tensor.numel() * tensor.element_size()
        if self.workspace and not self._offloaded:
            totals[self.device] = totals.get(self.device, 0) + self.workspace
        return totals

    @property
    def can_offload(self) -> bool:
        return self._gpu and self.model is not None

    async def offload(self) -> None:
        if not self.can_offload:
            raise TypeError(f"model {self.label} is not on a GPU: it has no host tier")
        await run_sync(self._offload)

    def _offload(self) -> None:
        with self._lock:
            if self._offloaded or self.model is None:
                return
            started = time.perf_counter()
            host = self._host = park(list(self._tensors()), page_lock=True)
            gc.collect()
            empty_gpu_caches(torch)
            self._offloaded = True
            self._memory = self._measure()
            log.info("model %s: offloaded to %s host memory (%s) in %.3f s", self.label,
                     "page-locked" if host.locked else "pageable", format_bytes(host.nbytes),
                     time.perf_counter() - started)

    async def restore(self, placement: Placement) -> None:
        if not placement.is_gpu:
            raise TypeError(f"model {self.label} restores onto a GPU, not {placement.device}")
        await run_sync(self._restore, placement.device)

    def _restore(self, device_name: str) -> None:
        with self._lock:
            if self.model is None:
                raise ModelNotReady(f"model {self.label} is unloaded")
            if not self._offloaded:
                if device_name == self.device:
                    return
                raise ModelNotReady(f"model {self.label} is on {self.device}; offload it before moving it")
            started = time.perf_counter()
            assert self._host is not None
            unpark(list(self._tensors()), self._host, torch.device(device_name))
            self._release_host_copy(wait=False)  # freeing it is not part of the swap-in
            self.device = device_name
            self._offloaded = False
            self._memory = self._measure()
            log.info("model %s: restored onto %s in %.3f s", self.label, device_name,
                     time.perf_counter() - started)

    def _release_host_copy(self, wait: bool) -> None:
        """Free the host tier's buffer: now, or (``wait=False``) on a background thread."""
        if self._host is not None:
            if wait:
                self._host.release()
            else:
                release_later(self._host)
            self._host = None

    async def unload(self) -> None:
        await run_sync(self._unload)

    def _unload(self) -> None:
        with self._lock:
            if self.model is None:
                return
            # Free the storage even if module objects outlive this (the server freezes long-lived
            # objects out of the garbage collector, so reference cycles would keep them).
            for tensor in self._tensors():
                tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
            self._release_host_copy(wait=True)
            self.model = None
            self.tokenizer = None
            self._counter = None
            self._memory = {}
        gc.collect()
        if self._gpu and torch.cuda.is_available():
            empty_gpu_caches(torch)
        log.info("model %s: unloaded", self.label)


class _RowRepetitionPenalty(LogitsProcessor):
    """transformers' repetition penalty over each row's own tokens: a batch's left padding (the
    first ``padding[row]`` positions) is left out, so a row is penalized as it is alone."""

    def __init__(self, penalty: float, padding: torch.Tensor) -> None:
        self.penalty = penalty
        self.padding = padding

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        padding = self.padding.repeat_interleave(input_ids.shape[0] // self.padding.shape[0])  # beams
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # a padding position stands for the row's last token, which the row holds anyway
        ids = torch.where(positions >= padding[:, None], input_ids, input_ids[:, -1:])
        score = torch.gather(scores, 1, ids)
        score = torch.where(score < 0, score * self.penalty, score / self.penalty)
        return scores.scatter(1, ids, score)


def _position_offset(model: Any) -> int:
    """Positions a model's embeddings never use: RoBERTa-style models number tokens from
    ``padding_idx + 1``, so ``max_position_embeddings`` is that many more than they can take."""
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    if type(padding_idx) is int and hasattr(embeddings, "position_embeddings"):
        return padding_idx + 1
    return 0


def _owner(index: int, counts: list[int]) -> int:
    """The request that row ``index`` of the batch belongs to."""
    for request, end in enumerate(itertools.accumulate(counts)):
        if index < end:
            return request
    raise IndexError(index)

