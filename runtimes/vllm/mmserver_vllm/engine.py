"""One vLLM engine per model: start, generation or embedding (the pooling runner), V2 inference,
host tier (sleep mode), crash detection, clean shutdown, and vLLM's Prometheus metrics kept per
model.

This module imports vllm (and torch) at the top: ``VllmRuntime.load`` imports it on a worker
thread under ``IMPORT_LOCK``. The engine runs in child processes (vLLM's engine core and its
worker); they are recorded when the engine starts and are always ended by ``unload``, which the
manager calls on eviction, on repository changes, when the engine is found dead, and when the
server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Hashable, Iterable
from typing import Any

# Set before vLLM reads them: the engine's processes talk over loopback only, and report nothing.
for _key, _value in {"VLLM_HOST_IP": "127.0.0.1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(_key, _value)
# vLLM's sampler imports FlashInfer on CUDA unless told not to, and FlashInfer is an optional
# package: without it every engine would fail to start (its own sampler works without)
if importlib.util.find_spec("flashinfer") is None:
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from prometheus_client import REGISTRY  # noqa: E402
from prometheus_client.metrics_core import Metric  # noqa: E402
from vllm import PoolingParams  # noqa: E402
from vllm import SamplingParams as VllmSamplingParams  # noqa: E402
from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: E402
from vllm.sampling_params import RequestOutputKind  # noqa: E402
from vllm.v1.engine.async_llm import AsyncLLM  # noqa: E402
from vllm.v1.metrics.loggers import PrometheusStatLogger  # noqa: E402

from mmserver.embedding import (  # noqa: E402
    INPUT_TOKENS,
    RETURN_INPUT_TOKENS,
    EmbeddingInputs,
    TextEmbedder,
    embedding_request,
)
from mmserver.errors import (  # noqa: E402
    InferenceError,
    InvalidInput,
    ModelLoadError,
    ModelNotReady,
    Overloaded,
)
from mmserver.generation import (  # noqa: E402
    FINISH_ABORT,
    PROTOCOL_PARAMETERS,
    GenerationChunk,
    GenerationRequest,
    InvalidParameter,
    SamplingParams,
    TextGenerator,
    check_room,
    generate_all,
    parse_v2_sampling,
    refuse_unknown,
)
from mmserver.runtime import BatchingMode, LoadedModel, Placement, run_sync  # noqa: E402
from mmserver.spec import ModelSpec  # noqa: E402
from mmserver.token_inputs import IDS_INPUT, MASK_INPUT, id_rows, row_lengths, text_inputs  # noqa: E402
from mmserver.types import InferInput, InferOutput, InferRequest, InferResponse, ModelMetadata, TensorSpec  # noqa: E402

from .options import EMBEDDING, GENERATION, Options  # noqa: E402

try:  # vLLM's request errors have their own classes in newer releases
    from vllm.exceptions import GracefulHTTPError, VLLMClientError  # noqa: E402
except ImportError:  # pragma: no cover - older vLLM (0.26, the GPU image's): its request errors are ValueErrors
    class GracefulHTTPError(Exception):  # type: ignore[no-redef]
        """Stands in for newer releases' admission-control error, which older ones never raise."""

    VLLMClientError = ValueError  # type: ignore[misc,assignment]
from vllm.v1.engine.exceptions import EngineDeadError  # noqa: E402

log = logging.getLogger("mmserver_vllm")

TEXT_INPUTS = ("text_input", "text", "prompt")
TEXT_OUTPUT = "text_output"
EMBEDDING_OUTPUT = "embedding"
#: what an embedding engine is asked for
EMBED = PoolingParams(task="embed")
#: V2 parameter spellings of the transformers runtime, accepted here too
SHUTDOWN_TIMEOUT_S = 10.0
KILL_WAIT_S = 3.0
#: how long a cancelled load waits for its engine's start to end before it kills the engine's processes
ABANDONED_START_WAIT_S = 60.0
WATCH_INTERVAL_S = 0.5
HEARTBEAT_S = 10.0
#: a text prompt with more characters than max_model_len times this many times its vocabulary's
#: longest token is refused untokenized (normalizers and pre-tokenizers may drop characters)
PROMPT_CHARS_MARGIN = 2
#: token ids that ``count_tokens`` keeps for the ``generate`` call of the same prompt (a few:
#: the requests between the two; a miss only costs tokenizing again)
COUNTED_KEEP = 16

if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
    log.warning("VLLM_CPU_KVCACHE_SPACE is set: it silently overrides every model's kv_cache_memory_bytes")

# ----------------------------------------------------------------------------- metrics

_PROMETHEUS_LOCK = threading.Lock()
#: the models whose engines' metrics are exported (by id: two engines may serve one label
#: while a version rolls over)
_LIVE: dict[int, VllmModel] = {}


class _CapturedPrometheus(PrometheusStatLogger):
    """vLLM's Prometheus logger, with its collectors taken out of the global registry.

    vLLM registers its metrics in prometheus_client's global registry and unregisters every
    ``vllm:`` collector there when the next engine starts. Each engine's collectors are moved
    out of it as soon as they exist (under a lock, as engines may start in two threads): the
    logger goes on updating them, and ``collect_metrics`` exports them per model."""

    def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
        self.collectors: list[Any] = []
        with _PROMETHEUS_LOCK:
            super().__init__(vllm_config, engine_indexes)
            self._capture()

    def log_engine_initialized(self) -> None:
        """vLLM registers ``vllm:cache_config_info`` here, once the engine has started."""
        with _PROMETHEUS_LOCK:
            super().log_engine_initialized()
            self._capture()

    def _capture(self) -> None:
        """Move the ``vllm:`` collectors just registered into this engine's (under the lock)."""
        found = [c for c in list(REGISTRY._collector_to_names)  # noqa: SLF001
                 if str(getattr(c, "_name", "")).startswith("vllm:")]
        for collector in found:
            REGISTRY.unregister(collector)
        self.collectors.extend(found)


def collect_metrics() -> Iterable[Metric]:
    """Every live engine's vLLM metrics, one family per name, labelled with the model's name
    and version (vLLM's own ``model_name`` label is the served name, which is the same)."""
    families: dict[str, Metric] = {}
    for model in list(_LIVE.values()):
        for collector in model.collectors:
            for metric in collector.collect():
                family = families.get(metric.name)
                if family is None:
                    family = families[metric.name] = Metric(metric.name, metric.documentation, metric.type)
                for sample in metric.samples:
                    labels = {**sample.labels, "model_name": model.name, "model_version": model.version}
                    family.samples.append(sample._replace(labels=labels))
    return list(families.values())


# ----------------------------------------------------------------------------- loading


async def load_model(spec: ModelSpec, placement: Placement, declared: int | None) -> VllmModel:
    """Start ``spec``'s engine on ``placement`` (in a thread: it takes tens of seconds)."""
    options = Options.parse(spec.artifact, placement.device, spec.config.parameters, declared)
    label = f"{spec.name}:{spec.version}" if spec.version else spec.name
    args = _engine_args(spec, options)
    log.info("model %s: starting a vLLM engine on %s (%s, KV cache %d MiB, max_model_len %d, "
             "max_num_seqs %d%s)", label, placement.device, options.run_dtype, options.kv_cache_bytes >> 20,
             options.max_model_len, options.max_num_seqs, ", eager" if options.enforce_eager else "")
    start = _EngineStart(args, placement, label)
    try:
        engine, processes = await run_sync(start.run)
    except asyncio.CancelledError:  # a load timeout or the server stopping: the engine must not outlive it
        await run_sync(start.abandon)
        raise
    try:
        tokenizer, longest = await run_sync(_load_tokenizer, spec)
        model = VllmModel(engine, processes, tokenizer, longest, options, spec, placement)
        if options.task == EMBEDDING:
            await model._warm_up()  # noqa: SLF001 - it also measures the embeddings' width
    except BaseException:
        await run_sync(_shutdown, engine, processes, label)
        raise
    _LIVE[id(model)] = model
    return model


def _engine_args(spec: ModelSpec, options: Options) -> AsyncEngineArgs:
    folder = str(spec.artifact)
    values: dict[str, Any] = {
        "model": folder,
        "tokenizer": folder,
        "served_model_name": spec.name,
        "dtype": options.dtype,
        "enforce_eager": options.enforce_eager,
        "kv_cache_memory_bytes": options.kv_cache_bytes,
        "max_model_len": options.max_model_len,
        "max_num_seqs": options.max_num_seqs,
        "trust_remote_code": options.trust_remote_code,
        "disable_log_stats": False,  # the Prometheus metrics need the stats
    }
    if options.seed is not None:
        values["seed"] = options.seed
    if options.task == EMBEDDING:
        values["runner"] = "pooling"  # vLLM pools a decoder's last hidden state (its default for them)
    if options.is_gpu:
        values["enable_sleep_mode"] = True
        # vLLM refuses to start when the device has less free memory than this share of it;
        # the KV cache is sized by kv_cache_memory_bytes, so ask for no more than the footprint
        total = _gpu_total(options.device)
        if total:
            values["gpu_memory_utilization"] = min(0.9, max(0.02, options.footprint() / total))
    values.update(options.engine_args)
    try:
        return AsyncEngineArgs(**values)
    except TypeError as exc:
        raise ModelLoadError(f"vLLM does not take these engine arguments: {exc}") from None


class _EngineStart:
    """One engine's start (``run``, on a worker thread), and the end of what it started when the
    load that waits for it is cancelled (``abandon``): whoever awaits the cancelled load knows
    that no process of the engine is left."""

    def __init__(self, args: AsyncEngineArgs, placement: Placement, label: str) -> None:
        self.args, self.placement, self.label = args, placement, label
        self._config: Any = None  # the VllmConfig that vLLM starts the engine core processes with
        self._result: tuple[AsyncLLM, list[Any]] | None = None  # a start that ended before the cancel
        self._running = self._abandoned = False
        self._ended = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> tuple[AsyncLLM, list[Any]]:
        """Create the engine and record its processes; an engine that starts once its load was
        abandoned is shut down here."""
        with self._lock:
            if self._abandoned:  # cancelled before this thread began
                raise ModelLoadError(f"model {self.label}: the load was cancelled")
            self._running = True
        try:
            result = self._start()
            with self._lock:
                abandoned = self._abandoned
                if not abandoned:
                    self._result = result
            if abandoned:
                _shutdown(*result, self.label)
                raise ModelLoadError(f"model {self.label}: the load was cancelled while its engine started")
            return result
        finally:
            self._ended.set()

    def abandon(self) -> None:
        """End what the start started, for a cancelled load (on a worker thread): shut down an
        engine that has started, wait up to ``ABANDONED_START_WAIT_S`` for one that still starts
        (``run`` shuts it down), and kill the processes of a start that does not end by then."""
        with self._lock:
            self._abandoned = True
            result, self._result = self._result, None
        if result is not None:
            _shutdown(*result, self.label)
        elif self._running and not self._ended.wait(ABANDONED_START_WAIT_S):
            log.warning("model %s: the vLLM engine of a cancelled load is still starting after %.0f s; "
                        "killing its processes", self.label, ABANDONED_START_WAIT_S)
            _end_processes(self._started_processes(), self.label, 0.0)

    def _start(self) -> tuple[AsyncLLM, list[Any]]:
        started = time.monotonic()
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(HEARTBEAT_S):
                log.info("model %s: vLLM engine still starting after %.0f s", self.label, time.monotonic() - started)

        threading.Thread(target=heartbeat, name=f"starting {self.label}", daemon=True).start()
        try:
            with _visible_gpu(self.placement):
                self._config = self.args.create_engine_config()
                engine = AsyncLLM.from_vllm_config(self._config, stat_loggers=[_CapturedPrometheus],
                                                   disable_log_stats=False)
        except Exception as exc:
            raise ModelLoadError(f"the vLLM engine did not start: {type(exc).__name__}: {exc}") from exc
        finally:
            done.set()
        processes = _engine_processes(engine)
        log.info("model %s: vLLM engine ready in %.1f s (processes %s)", self.label, time.monotonic() - started,
                 ", ".join(str(p.pid) for p in processes) or "none")
        return engine, processes

    def _started_processes(self) -> list[Any]:
        """The processes of the engine while it starts: vLLM's engine core client, still under
        construction, holds our config and, once they run, the engine core processes."""
        if self._config is not None:
            for holder in gc.get_referrers(self._config):  # the client, or its attributes' dict
                attributes = holder if isinstance(holder, dict) else getattr(holder, "__dict__", None)
                if isinstance(attributes, dict) and (found := _core_processes(attributes.get("resources"))):
                    return found
        return []


_GPU_ENV_LOCK = threading.Lock()


class _visible_gpu:  # noqa: N801 - a context manager used like a function
    """Show the engine only its GPU while its processes spawn (they inherit the environment)."""

    def __init__(self, placement: Placement) -> None:
        self.device = placement.device if placement.is_gpu else None
        self.saved: str | None = None

    def __enter__(self) -> None:
        if self.device is None:
            return
        _GPU_ENV_LOCK.acquire()
        self.saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        index = int(self.device.split(":")[1]) if ":" in self.device else 0
        visible = [d.strip() for d in self.saved.split(",")] if self.saved else None
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if visible else str(index)

    def __exit__(self, *exc: object) -> None:
        if self.device is None:
            return
        if self.saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = self.saved
        _GPU_ENV_LOCK.release()


def _gpu_total(device: str) -> int | None:
    """Total memory of a GPU through NVML (never through torch: no CUDA context in the server)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        index = int(device.split(":")[1]) if ":" in device else 0
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            index = int(visible.split(",")[index])
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).total)
    except Exception:  # noqa: BLE001 - no NVML: leave vLLM's default
        return None


def _engine_processes(engine: AsyncLLM) -> list[Any]:
    """The engine's processes: vLLM's engine core processes (multiprocessing objects) and every
    process below them (its workers), as psutil objects."""
    return _core_processes(getattr(getattr(engine, "engine_core", None), "resources", None))


def _core_processes(resources: Any) -> list[Any]:
    """The engine core processes that an engine core client's ``resources`` record, and every
    process below them."""
    manager = getattr(resources, "engine_manager", None)
    cores = list(getattr(manager, "processes", []) or [])
    found: list[Any] = list(cores)
    for core in cores:
        try:
            found.extend(psutil.Process(core.pid).children(recursive=True))
        except psutil.Error:
            pass
    return found


def _alive(process: Any) -> bool:
    if isinstance(process, psutil.Process):
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
    return process.is_alive()


def _shutdown(engine: AsyncLLM, processes: list[Any], label: str) -> None:
    """Shut the engine down and make sure every one of its processes has ended (runs on a
    worker thread; the caller must not use the engine any more)."""
    started = time.monotonic()
    try:
        try:
            engine.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
        except TypeError:  # older vLLM: no timeout argument
            engine.shutdown()
    except Exception as exc:  # noqa: BLE001 - the processes are ended below anyway
        log.warning("model %s: vLLM engine shutdown raised %s: %s", label, type(exc).__name__, exc)
    _end_processes(processes, label, KILL_WAIT_S)
    gc.collect()
    log.info("model %s: vLLM engine shut down in %.1f s", label, time.monotonic() - started)


def _end_processes(processes: list[Any], label: str, grace_s: float) -> None:
    """Wait up to ``grace_s`` for the processes to exit, then kill those that have not; reaps
    them all (no zombie remains)."""
    deadline = time.monotonic() + grace_s
    for process in processes:
        if isinstance(process, psutil.Process):
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except psutil.TimeoutExpired:
                log.warning("model %s: killing engine process %d", label, process.pid)
                process.kill()
                try:
                    process.wait(KILL_WAIT_S)
                except psutil.Error:
                    pass
            except psutil.Error:
                pass
        else:  # a multiprocessing child: join it, so that no zombie remains
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("model %s: killing engine process %d", label, process.pid)
                process.kill()
                process.join(KILL_WAIT_S)


def _load_tokenizer(spec: ModelSpec) -> tuple[Any, int]:
    """A tokenizer of our own (chat templates, token counts), apart from the engine's, which vLLM
    uses from its own threads; and the most characters one of its tokens spells (byte-level
    vocabularies spell a byte a character: an upper bound on the characters a token stands for)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(spec.artifact), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer in {spec.artifact}: {exc}") from None
    return tokenizer, max((len(token) for token in tokenizer.get_vocab()), default=1)


# ----------------------------------------------------------------------------- the model


class VllmModel(LoadedModel, TextGenerator, TextEmbedder):
    """A running vLLM engine: a text generator, or with ``task: embedding`` a text embedder."""

    batching = BatchingMode.INTERNAL  # continuous batching in the engine; the server caps concurrency

    def __init__(self, engine: AsyncLLM, processes: list[Any], tokenizer: Any, longest_token: int,
                 options: Options, spec: ModelSpec, placement: Placement) -> None:
        self.engine: AsyncLLM | None = engine
        self.processes = processes
        self.tokenizer = tokenizer
        self.options = options
        self.name, self.version = spec.name, spec.version
        self.label = f"{spec.name}:{spec.version}" if spec.version else spec.name
        self.device = placement.device
        self.asleep = False
        self.failure: str | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._use_renderer = True
        logger_manager = getattr(engine, "logger_manager", None)
        loggers = getattr(logger_manager, "stat_loggers", []) or []
        self.collectors = [c for lg in loggers if isinstance(lg, _CapturedPrometheus) for c in lg.collectors]
        # vLLM may shorten max_model_len to what the KV cache holds
        config = getattr(engine, "model_config", None)
        self._max_len = int(getattr(config, "max_model_len", 0) or options.max_model_len)
        self._max_chars = self._max_len * longest_token * PROMPT_CHARS_MARGIN
        self._counted: dict[tuple[str, bool], list[int]] = {}  # (text, add_special_tokens) -> ids
        self._counted_lock = threading.Lock()
        self._width: int | None = None  # of an embedding, measured by the warm-up
        self._memory = self._measure()

    # -------------------------------------------------------------- metadata and memory

    @property
    def generates_text(self) -> bool:
        return self.options.task == GENERATION

    @property
    def embeds_text(self) -> bool:
        return self.options.task == EMBEDDING

    @property
    def embedding_size(self) -> int | None:
        return self._width

    @property
    def max_model_len(self) -> int | None:
        return self._max_len

    @property
    def generation_defaults(self) -> dict[str, Any]:
        return {"max_tokens": self.options.max_tokens, "temperature": self.options.temperature}

    def metadata(self) -> ModelMetadata:
        parameters = {
            "task": self.options.task, "device": self.device, "dtype": self.options.run_dtype,
            "max_model_len": self._max_len, "max_num_seqs": self.options.max_num_seqs,
            "kv_cache_memory_bytes": self.options.kv_cache_bytes,
        }
        if self.options.task == EMBEDDING:
            return ModelMetadata(
                platform="vllm",
                inputs=[TensorSpec(TEXT_INPUTS[0], "BYTES", (-1,)), TensorSpec(IDS_INPUT, "INT64", (-1, -1)),
                        TensorSpec(MASK_INPUT, "INT64", (-1, -1))],
                outputs=[TensorSpec(EMBEDDING_OUTPUT, "FP32", (-1, self._width or -1))],
                parameters={**parameters, "inputs": f"'{TEXT_INPUTS[0]}', or '{IDS_INPUT}' with an optional "
                                                    f"'{MASK_INPUT}'"},
            )
        return ModelMetadata(
            platform="vllm",
            inputs=[TensorSpec(TEXT_INPUTS[0], "BYTES", (-1,))],
            outputs=[TensorSpec(TEXT_OUTPUT, "BYTES", (-1,))],
            parameters={
                **parameters,
                "generation": "sampling parameters max_tokens (or max_new_tokens), temperature, top_p, "
                              "top_k, seed, stop, ignore_eos, min_tokens, presence_penalty, "
                              "frequency_penalty, repetition_penalty",
            },
        )

    def memory(self) -> dict[str, int]:
        return dict(self._memory)

    def _measure(self) -> dict[str, int]:
        """What the engine holds now; reads its processes' smaps (milliseconds each), so async
        code runs it on a worker thread."""
        return self.options.measured(self._resident(), self.asleep) if self.engine is not None else {}

    def _resident(self) -> int:
        """The PSS of the engine's processes, in bytes."""
        total = 0
        for process in self.processes:
            try:
                total += psutil.Process(process.pid).memory_full_info().pss
            except (psutil.Error, AttributeError):
                pass
        return total

    # -------------------------------------------------------------- V2 inference

    def validate(self, request: InferRequest) -> None:
        """The cheap checks; ``infer`` tokenizes (on a worker thread) and checks the room."""
        if self.options.task == EMBEDDING:
            self._embedding_prompts(request)
            return
        self._v2_params(request)
        for text in self._texts(request):
            self._check_length(text)

    def rows(self, request: InferRequest) -> int:
        if self.options.task == EMBEDDING:
            return len(self._embedding_prompts(request))
        return len(self._texts(request))

    def batch_key(self, request: InferRequest) -> Hashable:
        return id(request)  # never merged: the engine batches by itself

    def _texts(self, request: InferRequest) -> list[str]:
        for name in request.output_names:
            if name != TEXT_OUTPUT:
                raise InvalidInput(f"unknown output '{name}'; this model offers '{TEXT_OUTPUT}'")
        if len(request.inputs) != 1 or request.inputs[0].name not in TEXT_INPUTS:
            names = ", ".join(f"'{t.name}'" for t in request.inputs) or "none"
            raise InvalidInput(f"this model takes one input 'text_input' (BYTES [N] or [N, 1]); got {names}")
        tensor = request.inputs[0]
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"input '{tensor.name}' is {tensor.datatype}; texts must be BYTES")
        shape = tensor.data.shape
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
            raise InvalidInput(f"input '{tensor.name}' has shape {list(shape)}; expected [N] or [N, 1]")
        return _decoded(tensor)

    def _v2_params(self, request: InferRequest) -> SamplingParams:
        return parse_v2_sampling(request.parameters, self.generation_defaults)

    async def infer(self, requests: list[InferRequest]) -> list[InferResponse]:
        if self.options.task == EMBEDDING:
            return [await self._embed_one(request) for request in requests]
        return [await self._infer_one(request) for request in requests]

    async def _infer_one(self, request: InferRequest) -> InferResponse:
        texts = self._texts(request)
        params = self._v2_params(request)
        prompts = [await run_sync(self._encode, text, True) for text in texts]
        for ids in prompts:  # every text fits before any runs
            check_room(params, len(ids), self._max_len)
        results = await asyncio.gather(*(
            generate_all(self, GenerationRequest(ids, params, request.id or "")) for ids in prompts
        ))
        array = np.empty(len(texts), dtype=object)
        array[:] = [r[0].text.encode("utf-8") for r in results]
        shape = request.inputs[0].data.shape
        return InferResponse([InferOutput(TEXT_OUTPUT, array.reshape(shape), "BYTES")])

    # -------------------------------------------------------------- embedding

    def embedding_request(self, inputs: EmbeddingInputs) -> InferRequest:
        return embedding_request(inputs, TEXT_INPUTS[0], pad_id=0)

    def _embedding_prompts(self, request: InferRequest) -> list[str] | list[list[int]]:
        """The texts, or rows of token ids, of a V2 request to an embedding model, checked
        untokenized."""
        for name in request.output_names:
            if name != EMBEDDING_OUTPUT:
                raise InvalidInput(f"unknown output '{name}'; this model offers '{EMBEDDING_OUTPUT}'")
        refuse_unknown(request.parameters, {RETURN_INPUT_TOKENS}, "an embedding model", PROTOCOL_PARAMETERS)
        request.flag(RETURN_INPUT_TOKENS)
        given = text_inputs(request, TEXT_INPUTS)
        if given.texts is not None:
            texts = _decoded(given.texts)
            for text in texts:
                self._check_length(text)
            return texts
        assert given.ids is not None
        lengths = row_lengths(given.ids, given.mask, self._vocab_size())
        if lengths.size and lengths.max() > self._max_len:
            row = int(lengths.argmax())
            raise InvalidInput(f"input '{IDS_INPUT}': row {row} has {int(lengths[row])} tokens; this model embeds "
                               f"at most {self._max_len}")
        return id_rows(given.ids, given.mask)

    async def _embed_one(self, request: InferRequest) -> InferResponse:
        prompts = self._embedding_prompts(request)
        if prompts and isinstance(prompts[0], str):
            rows = await run_sync(lambda: [self._encode(text, True) for text in prompts])
        else:
            rows = prompts
        for i, ids in enumerate(rows):
            if len(ids) > self._max_len:
                raise InvalidInput(f"input '{request.inputs[0].name}': text {i} has {len(ids)} tokens; this model "
                                   f"embeds at most {self._max_len}")
        vectors = await asyncio.gather(*(self._embed(ids, request.id or "") for ids in rows))
        parameters = {INPUT_TOKENS: sum(len(ids) for ids in rows)} if request.flag(RETURN_INPUT_TOKENS) else {}
        block = np.stack(vectors) if vectors else np.zeros((0, self._width or 0), dtype=np.float32)
        return InferResponse([InferOutput(EMBEDDING_OUTPUT, block, "FP32")], parameters=parameters)

    async def _embed(self, ids: list[int], request_id: str) -> np.ndarray:
        """The embedding of one prompt, float32 ``[D]``."""
        engine = self._awake_engine()
        request_id = f"{request_id or 'embed'}-{uuid.uuid4().hex[:16]}"
        prompt = await self._engine_input(engine, ids)
        last = None
        stream = engine.encode(prompt, EMBED, request_id)
        async with contextlib.aclosing(self._outputs(engine, stream, request_id)) as outputs:
            async for output in outputs:
                last = output
        if last is None:
            raise InferenceError(f"model {self.label}: its vLLM engine gave no embedding")
        return last.outputs.data.float().cpu().numpy()

    # -------------------------------------------------------------- generation

    def count_tokens(self, prompt: str | list[int], add_special_tokens: bool = True) -> int:
        """Tokenizes a text, and keeps the ids of one that fits for ``generate``."""
        if isinstance(prompt, list):
            return len(prompt)
        ids = self._encode(prompt, add_special_tokens)
        if len(ids) < self._max_len:
            with self._counted_lock:
                self._counted[(prompt, add_special_tokens)] = ids
                while len(self._counted) > COUNTED_KEEP:
                    del self._counted[next(iter(self._counted))]
        return len(ids)

    async def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids: those ``count_tokens`` kept, else tokenized on a worker thread
        (a long prompt takes seconds); token prompts are checked against the vocabulary."""
        prompt = request.prompt
        if isinstance(prompt, list):
            size = self._vocab_size()
            if any(type(t) is not int or not 0 <= t < size for t in prompt):
                raise InvalidInput(f"the prompt's token ids must be integers in [0, {size})")
            return prompt
        with self._counted_lock:
            ids = self._counted.pop((prompt, request.add_special_tokens), None)
        return ids if ids is not None else await run_sync(self._encode, prompt, request.add_special_tokens)

    def _vocab_size(self) -> int:
        vocab = getattr(self.tokenizer, "vocab_size", None)
        return max(len(self.tokenizer), vocab or 0) if self.tokenizer is not None else 0

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise ModelNotReady(f"model {self.label} is unloaded")
        self._check_length(text)
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _check_length(self, text: str) -> None:
        """Refuse, untokenized, a text with more characters than the model's tokens can spell."""
        if len(text) > self._max_chars:
            raise InvalidParameter(
                f"the prompt has {len(text)} characters; this model takes at most {self._max_len} tokens in "
                f"all, which spell at most {self._max_chars} characters", "prompt")

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise ModelNotReady(f"model {self.label} is unloaded")
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidInput(f"model {self.name} has no chat template; use /v1/completions")
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - jinja errors raised by the template itself
            raise InvalidInput(f"the chat template of model {self.name} rejects these messages: {exc}") from None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        engine = self._awake_engine()
        params = request.params
        ids = await self._prompt_ids(request)
        max_tokens = check_room(params, len(ids), self._max_len)
        if params.n > 1 and params.greedy:
            raise InvalidParameter("n > 1 needs sampling (temperature above 0): greedy sequences are all alike", "n")
        sampling = self._sampling(params, max_tokens)
        request_id = f"{request.request_id or 'gen'}-{uuid.uuid4().hex[:16]}"
        prompt = await self._engine_input(engine, ids)
        counts = [0] * params.n
        stream = engine.generate(prompt, sampling, request_id)
        async with contextlib.aclosing(self._outputs(engine, stream, request_id)) as outputs:
            async for output in outputs:
                for out in output.outputs:
                    counts[out.index] += len(out.token_ids)
                    reason = out.finish_reason
                    yield GenerationChunk(
                        out.index, out.text, tuple(out.token_ids), len(ids), counts[out.index],
                        finish_reason=FINISH_ABORT if reason == "abort" else reason,
                        stop_reason=out.stop_reason,
                    )

    async def _outputs(self, engine: AsyncLLM, stream: AsyncIterator[Any],
                       request_id: str) -> AsyncGenerator[Any, None]:
        """The outputs of one engine request, vLLM's errors turned into ours; a request left
        before its end (closed early, cancelled) is aborted in the engine."""
        finished = False
        try:
            async for output in stream:
                finished = output.finished
                yield output
        except EngineDeadError:
            raise ModelNotReady(f"model {self.label}: {self.failure or 'its vLLM engine is dead'}") from None
        except GracefulHTTPError as exc:
            raise Overloaded(f"model {self.label}: {exc}", retry_after=1.0) from None
        except (VLLMClientError, ValueError) as exc:
            raise InvalidInput(f"model {self.label} refused the request: {exc}") from None
        except Exception as exc:
            if self.failure is not None or engine.errored:
                raise ModelNotReady(f"model {self.label}: {self.failure or 'its vLLM engine is dead'}") from None
            raise InferenceError(f"model {self.label} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            await stream.aclose()  # on an early exit, vLLM's generator aborts the request
            if not finished and not engine.errored:
                try:
                    await engine.abort(request_id)
                except Exception:  # noqa: BLE001 - already gone
                    pass

    def _sampling(self, params: SamplingParams, max_tokens: int | None) -> VllmSamplingParams:
        """vLLM's sampling parameters; values that vLLM refuses are a 400."""
        try:
            return VllmSamplingParams(
                n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                seed=params.seed, stop=list(params.stop) or None, max_tokens=max_tokens,
                ignore_eos=params.ignore_eos, min_tokens=params.min_tokens,
                presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                repetition_penalty=params.repetition_penalty, output_kind=RequestOutputKind.DELTA,
            )
        except (VLLMClientError, ValueError) as exc:
            raise InvalidParameter(f"model {self.label} refused the sampling parameters: {exc}",
                                   getattr(exc, "parameter", None)) from None

    def _awake_engine(self) -> AsyncLLM:
        engine = self.engine
        if engine is None:
            raise ModelNotReady(f"model {self.label} is unloaded")
        if self.failure is not None:
            raise ModelNotReady(f"model {self.label}: {self.failure}")
        if self.asleep:
            raise ModelNotReady(f"model {self.label} is asleep in host memory; it wakes on the next request")
        return engine

    async def _engine_input(self, engine: AsyncLLM, ids: list[int]) -> Any:
        """The prompt as the engine takes it: rendered by vLLM's renderer where it has one
        (raw prompts are deprecated there), else a token prompt."""
        renderer = getattr(engine, "renderer", None) if self._use_renderer else None
        render = getattr(renderer, "render_cmpl_async", None)
        if render is not None:
            try:
                (rendered,) = await render([{"prompt_token_ids": ids}])
                return rendered
            except (AttributeError, TypeError) as exc:
                log.info("model %s: vLLM's renderer is not usable here (%s); sending token prompts",
                         self.label, exc)
                self._use_renderer = False
        return {"prompt_token_ids": ids}

    async def _warm_up(self) -> None:
        """One one-token generation (or embedding, which measures its width), so that the first
        real request is not slow."""
        prompt = [self.tokenizer.bos_token_id or 0] if self.tokenizer is not None else [0]
        if self.options.task == EMBEDDING:
            self._width = int((await self._embed(prompt, "warm-up")).shape[-1])
            return
        warm = GenerationRequest(prompt, SamplingParams(max_tokens=1, temperature=0.0), "warm-up")
        await generate_all(self, warm)

    # -------------------------------------------------------------- failures

    def watch(self, on_failure: Callable[[str], None]) -> None:
        if self._watchdog is None and self.engine is not None:
            self._watchdog = asyncio.get_running_loop().create_task(
                self._watch(on_failure), name=f"watch {self.label}")

    async def _watch(self, on_failure: Callable[[str], None]) -> None:
        while self.engine is not None:
            await asyncio.sleep(WATCH_INTERVAL_S)
            reason = self._dead_reason()
            if reason is not None and self.engine is not None:
                self.failure = reason
                on_failure(reason)
                return

    def _dead_reason(self) -> str | None:
        for process in self.processes:
            if not _alive(process):
                code = getattr(process, "exitcode", None)
                if code is None and isinstance(process, psutil.Process):
                    kind = "worker"
                else:
                    kind = "engine core"
                how = f" with code {code}" if code is not None else ""
                return f"its vLLM {kind} process (pid {process.pid}) exited{how}"
        engine = self.engine
        if engine is not None and engine.errored:
            return f"its vLLM engine stopped: {engine.dead_error}"
        return None

    # -------------------------------------------------------------- host tier (CUDA sleep mode)

    @property
    def can_offload(self) -> bool:
        return self.options.is_gpu and self.engine is not None and not self.asleep and self.failure is None

    async def offload(self) -> None:
        engine = self._awake_engine()
        if not self.options.is_gpu:
            raise TypeError(f"model {self.label} runs on the CPU: vLLM has no sleep mode there")
        started = time.perf_counter()
        await engine.sleep(level=self.options.sleep_level)
        self.asleep = True
        self._memory = await run_sync(self._measure)
        log.info("model %s: vLLM engine asleep (level %d) in %.3f s", self.label, self.options.sleep_level,
                 time.perf_counter() - started)

    async def restore(self, placement: Placement) -> None:
        engine = self.engine
        if engine is None:
            raise ModelNotReady(f"model {self.label} is unloaded")
        if placement.device != self.device:
            raise ModelNotReady(f"model {self.label}'s engine lives on {self.device}; it cannot wake on "
                                f"{placement.device}")
        if not self.asleep:
            return
        started = time.perf_counter()
        await engine.wake_up()
        if self.options.sleep_level == 2:
            log.warning("model %s: woke from sleep level 2: its weights must be reloaded", self.label)
        self.asleep = False
        woke = time.perf_counter()
        await self._warm_up()
        self._memory = await run_sync(self._measure)
        log.info("model %s: vLLM engine awake in %.3f s, warm-up %.3f s", self.label, woke - started,
                 time.perf_counter() - woke)

    # -------------------------------------------------------------- unloading

    async def unload(self) -> None:
        engine = self.engine
        if engine is None:
            return
        self.engine = None
        if self._watchdog is not None:
            self._watchdog.cancel()
        _LIVE.pop(id(self), None)
        await run_sync(_shutdown, engine, self.processes, self.label)
        self.tokenizer = None
        self._counted.clear()
        self._memory = {}


def _decoded(tensor: InferInput) -> list[str]:
    """The texts of a BYTES tensor (``InvalidInput`` for one that is not UTF-8)."""
    texts = []
    for i, item in enumerate(tensor.data.reshape(-1)):
        try:
            texts.append(item.decode("utf-8") if isinstance(item, bytes) else str(item))
        except UnicodeDecodeError:
            raise InvalidInput(f"input '{tensor.name}': text {i} is not valid UTF-8") from None
    return texts
