"""Server settings. Precedence: command line > environment (``MMSERVER_*``) > YAML file > defaults.

The YAML file is named by ``--config`` or ``MMSERVER_CONFIG``; ``configs/mmserver.yaml`` documents
every key. The command-line flags are generated from the fields below, so the two cannot drift.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import InvalidInput
from .sizes import Size, parse_size


class Settings(BaseSettings):
    """Every server setting, with its default and the help text the CLI shows."""

    model_config = SettingsConfigDict(env_prefix="MMSERVER_", extra="forbid")

    model_repository: Path = Field(
        Path("model-repo"), description="Directory holding one folder per model."
    )
    config: Path | None = Field(None, description="YAML settings file (see configs/mmserver.yaml).")
    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 for all).")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port for the API and /metrics.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log verbosity."
    )
    access_log: bool = Field(False, description="Log one line per HTTP request (costs throughput).")
    model_control_mode: Literal["watch", "explicit", "none"] = Field(
        "watch",
        description="watch: follow the repository folder (and allow the load/unload API); "
        "explicit: change models only through the load/unload API; none: neither.",
    )
    repository_poll: bool = Field(
        False, description="Poll the repository instead of using file system events (network mounts)."
    )
    repository_settle_s: float = Field(
        2.0, gt=0, description="A changed model folder is read once its files stay unchanged this long."
    )
    model_name: str | None = Field(
        None,
        description="Name of the model when the repository folder itself holds one model's files "
        "(KServe's single-model layout); default: the folder's name.",
    )
    max_batch_size: int = Field(
        32,
        ge=1,
        description="Default rows per batch for models that allow dynamic batching "
        "(1 turns batching off); model.yaml or model-settings.json override it per model.",
    )
    max_delay_ms: float = Field(
        0.0,
        ge=0,
        description="Default time the first request of a batch may wait for more rows, in ms. "
        "0 batches only what is already queued, so a lone client never waits.",
    )
    adaptive_fill: bool = Field(
        True,
        description="With no max_delay, wait briefly (at most twice the model's recent batch "
        "time, 5 ms cap) for as many requests as the previous batch held, so closed-loop clients "
        "batch fully; a lone client never waits.",
    )
    max_queue: int = Field(
        1024, ge=1, description="Default bound on queued requests per model; beyond it: 429."
    )
    max_request_bytes: Size = Field(
        64 * 1024**2,
        gt=0,
        description="Largest request body accepted (bytes or sizes like 64MiB); beyond it: 413.",
    )
    strict_readiness: bool = Field(
        True,
        description="/v2/health/ready answers 503 until every model meant to load at startup has "
        "loaded (one that failed keeps it 503 until it loads or its folder goes); off: ready once "
        "the startup loading is done, whatever its outcome. Judged until the server is first ready.",
    )
    load_concurrency: int = Field(
        2, ge=1, description="How many models load at the same time."
    )
    gpu_memory_budget: int | float | None = Field(
        None,
        description="Memory the models may use on each GPU: bytes, a size like 40GiB, or a "
        "fraction of the GPU like 0.9 or 90%; never more than other processes leave (NVML) minus the "
        "margin. Unset: all of that.",
    )
    host_memory_budget: int | float | None = Field(
        0.7,
        description="Memory the models may use in host RAM (CPU models and the host tier of "
        "evicted GPU models): bytes, a size, or a fraction of the host (or container) memory.",
    )
    memory_margin: Size = Field(
        256 * 1024**2, description="Headroom kept free on every device (allocator slack)."
    )
    idle_unload_s: float | None = Field(
        None, gt=0, description="Evict a model unused for this many seconds (model.yaml may override)."
    )
    metrics: bool = Field(True, description="Record request metrics and serve them at /metrics.")
    triton_metrics: bool = Field(
        False, description="Also export Triton's metric names (nv_inference_*, nv_gpu_memory_*)."
    )
    auth_token: SecretStr | None = Field(
        None, description="Require 'Authorization: Bearer <token>' on every route but /v2/health/*."
    )
    auth_token_file: Path | None = Field(None, description="Read the bearer token from this file.")
    auth_metrics: bool = Field(False, description="Require the token on /metrics too.")
    tls_certfile: Path | None = Field(None, description="Serve HTTPS with this certificate (PEM).")
    tls_keyfile: Path | None = Field(None, description="The private key of --tls-certfile (PEM).")
    cors_origins: str | None = Field(
        None, description="Comma-separated origins allowed by CORS ('*' for any); unset: CORS off."
    )
    max_connections: int = Field(
        2048, ge=1,
        description="Most connections (and requests in progress) served at once; one more gets 503 (the health "
        "probes excepted).",
    )
    keep_alive_s: float = Field(5.0, gt=0, description="Close idle keep-alive connections after this long.")
    request_read_timeout_s: float = Field(
        30.0, gt=0,
        description="A request's head and body must arrive within this long of its first byte (else 408).",
    )
    load_timeout_s: float = Field(
        600.0, gt=0, description="A model load that takes longer is abandoned; the model is unavailable."
    )
    infer_timeout_s: float | None = Field(
        None, gt=0, description="Default per-request deadline (queue + compute) for models without timeout_s."
    )
    infer_threads: int = Field(
        8, ge=1, description="Threads that run synchronous model code off the event loop."
    )

    @property
    def bearer_token(self) -> str | None:
        """The token to require, from --auth-token or --auth-token-file, without surrounding
        whitespace (a secret mounted from a file often ends in a newline no header can carry)."""
        if self.auth_token is not None:
            token, origin = self.auth_token.get_secret_value(), "the auth token"
        elif self.auth_token_file is not None:
            origin = f"auth token file {self.auth_token_file}"
            try:
                token = self.auth_token_file.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise InvalidInput(f"cannot read {origin}: {exc}") from None
        else:
            return None
        token = token.strip()
        if not token:
            raise InvalidInput(f"{origin} is empty")
        return token

    @field_validator("gpu_memory_budget", "host_memory_budget", mode="before")
    @classmethod
    def _memory_amount(cls, value: Any) -> int | float | None:
        """``0.9`` or ``90%`` (a fraction: has a point or a percent sign) or a size (``40GiB``,
        ``1073741824``)."""
        if value is None or isinstance(value, float):
            return _fraction(value) if isinstance(value, float) else None
        text = str(value).strip() if isinstance(value, str) else ""
        if PERCENT.fullmatch(text):
            return _fraction(float(text[:-1]) / 100)
        if FRACTION.fullmatch(text):
            return _fraction(float(text))
        return parse_size(value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        environment = ServiceLinkFreeEnvironment(settings_cls)
        config_file = init_settings.init_kwargs.get("config") or environment().get("config")
        if not config_file:
            return init_settings, environment
        if not Path(config_file).is_file():
            raise InvalidInput(f"settings file {config_file} does not exist")
        return init_settings, environment, YamlFileSource(settings_cls, Path(config_file))


FRACTION = re.compile(r"\d*\.\d+|\d+\.")
PERCENT = re.compile(r"\d+(\.\d+)?\s*%")


def _fraction(value: float) -> float:
    if not 0 < value <= 1:
        raise ValueError(f"a memory fraction must be in (0, 1], got {value}")
    return value


#: what Kubernetes puts in ``<SERVICE>_PORT`` for every Service of a pod's namespace
SERVICE_LINK = re.compile(r"tcp://.+:\d+")


class ServiceLinkFreeEnvironment(EnvSettingsSource):
    """The ``MMSERVER_*`` environment, less an ``MMSERVER_PORT`` that Kubernetes set: a namespace
    with a Service named ``mmserver`` gives every pod ``MMSERVER_PORT=tcp://<ip>:<port>``."""

    def __call__(self) -> dict[str, Any]:
        values = super().__call__()
        if isinstance(values.get("port"), str) and SERVICE_LINK.fullmatch(values["port"]):
            del values["port"]
        return values


class YamlFileSource(PydanticBaseSettingsSource):
    """Settings from a YAML mapping; a file that is not one is reported, not raised raw."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        super().__init__(settings_cls)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise InvalidInput(f"cannot read settings file {path}: {exc}") from None
        except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidInput(f"settings file {path} is not valid YAML: {exc}") from None
        if data is not None and not isinstance(data, dict):
            raise InvalidInput(f"settings file {path} must be a mapping of setting: value")
        self.data: dict[str, Any] = data or {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the given (command-line) overrides, the environment and the YAML file."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidInput(f"invalid settings: {problems}") from None
