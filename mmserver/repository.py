"""Reads the model repository directory into model descriptions, without importing any framework.

Layout: ``REPO/<model>/[<version>/]<files>``. Numeric subfolders are versions; a model folder
without them is version ``1`` (or MLServer's ``parameters.version``). A model folder is described
by ``model.yaml`` (ours), else MLServer's ``model-settings.json``, else detection by file type.
A folder that cannot be understood becomes a ``RepositoryModel`` with an ``error`` and never
stops the others from being read.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import InvalidInput, ModelNotFound
from .runtime import RuntimeRegistry
from .spec import ModelConfig, ModelSpec

log = logging.getLogger(__name__)

MODEL_YAML = "model.yaml"
MLSERVER_SETTINGS = "model-settings.json"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
VERSION_PATTERN = re.compile(r"[0-9]{1,18}")
MLSERVER_IMPLEMENTATIONS = {
    "mlserver_sklearn.SKLearnModel": "sklearn",
    "mlserver_xgboost.XGBoostModel": "xgboost",
    "mlserver_huggingface.HuggingFaceRuntime": "transformers",
}


@dataclass(slots=True)
class RepositoryModel:
    """One model folder: its versions (all found) and which of them the version policy serves."""

    name: str
    folder: Path
    versions: dict[str, ModelSpec] = field(default_factory=dict)
    served: list[str] = field(default_factory=list)
    error: str | None = None
    served_policy: str | int | list[str] = "latest"


def check_name(name: str) -> str:
    """Refuse model names that could escape the repository or are not folder names."""
    if not NAME_PATTERN.fullmatch(name) or name in {".", ".."}:
        raise InvalidInput(
            f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' (max 128)"
        )
    return name


class Repository:
    """The model repository directory."""

    def __init__(self, root: Path, registry: RuntimeRegistry, root_model_name: str | None = None) -> None:
        self.root = root.resolve()
        self.registry = registry
        self.root_model_name = root_model_name

    def scan(self) -> dict[str, RepositoryModel]:
        """Read every model folder in the repository (or the repository folder itself, when it
        holds one model's files directly, as KServe lays out a single model)."""
        if not self.root.is_dir():
            raise InvalidInput(f"model repository {self.root} is not a directory")
        if self._holds_one_model():
            model = self._read_folder(self.root, self.root_model_name or self.root.name)
            return {model.name: model}
        models: dict[str, RepositoryModel] = {}
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            if not folder.resolve().is_relative_to(self.root):
                # refused outright: a link out of the repository is not a model (404, not 503)
                log.error("model folder %s/ points outside the model repository: ignored", folder.name)
                continue
            model = self._read_folder(folder)
            if model.name in models:
                # keyed by the folder (a name no model can have) so the first model keeps serving
                taken_by = models[model.name].folder.name
                model = RepositoryModel(
                    f"{folder.name}/", folder,
                    error=f"model name '{model.name}' is already used by {taken_by}/",
                )
            models[model.name] = model
        return models

    def read(self, name: str) -> RepositoryModel:
        """Re-read one model folder (for the repository API's load); 404 if it does not exist."""
        check_name(name)
        for model in self.scan().values():
            if model.name == name:
                return model
        raise ModelNotFound(f"model '{name}' is not in the repository")

    # ------------------------------------------------------------------ one folder

    def _holds_one_model(self) -> bool:
        """The root is one model when it has a model's files and no model folders (only
        numeric version folders, or none)."""
        for child in self.root.iterdir():
            if child.is_dir() and not child.name.startswith(".") and not VERSION_PATTERN.fullmatch(child.name):
                return False
        if (self.root / MODEL_YAML).is_file() or (self.root / MLSERVER_SETTINGS).is_file():
            return True
        return self.registry.detect(self.root) is not None

    def _read_folder(self, folder: Path, folder_name: str | None = None) -> RepositoryModel:
        folder_name = folder_name or folder.name
        try:
            check_name(folder_name)
            if not folder.resolve().is_relative_to(self.root):
                raise InvalidInput(f"{folder.name}/ points outside the model repository")
            name, config, source, fixed_version = self._describe(folder, folder_name)
            check_name(name)
            model = RepositoryModel(name, folder)
            for version, path in self._versions(folder, fixed_version).items():
                if config.uri and not (path / config.uri).resolve().is_relative_to(self.root):
                    raise InvalidInput(f"{folder.name}/: uri '{config.uri}' points outside the model repository")
                runtime = config.runtime or self.registry.detect(path)
                if runtime is None:
                    raise InvalidInput(self._undetected(path))
                artifact = path / config.uri if config.uri else path
                model.versions[version] = ModelSpec(name, version, path, runtime, config, source,
                                                    self._files_inside(artifact, folder))
            model.served = select_versions(list(model.versions), config.versions)
            model.served_policy = config.versions
            return model
        except (InvalidInput, OSError, ValueError, RuntimeError) as exc:
            # ValueError: a path with a NUL in it; RuntimeError: pathlib's "Symlink loop" (Python < 3.13)
            reason = exc.message if isinstance(exc, InvalidInput) else f"cannot read {folder}: {exc}"
            log.error("model folder %s/: %s", folder.name, reason)
            return RepositoryModel(folder_name, folder, error=reason)

    def _describe(self, folder: Path, name: str) -> tuple[str, ModelConfig, str, str | None]:
        """Name, config, where the config came from, and a version fixed by the config."""
        model_yaml = folder / MODEL_YAML
        if model_yaml.is_file():
            return name, _parse_model_yaml(model_yaml), MODEL_YAML, None
        settings = folder / MLSERVER_SETTINGS
        if settings.is_file():
            named, config, version = _parse_mlserver_settings(settings, name)
            return named, config, MLSERVER_SETTINGS, version
        return name, ModelConfig(), "detected", None

    def _versions(self, folder: Path, fixed_version: str | None) -> dict[str, Path]:
        numbered = {
            child.name: child
            for child in folder.iterdir()
            if child.is_dir() and VERSION_PATTERN.fullmatch(child.name)
        }
        for path in numbered.values():
            if not path.resolve().is_relative_to(self.root):
                raise InvalidInput(f"{folder.name}/{path.name}/ points outside the model repository")
        if numbered:
            return dict(sorted(numbered.items(), key=lambda item: int(item[0])))
        return {fixed_version or "1": folder}

    def _files_inside(self, artifact: Path, folder: Path) -> FileSignature:
        """The signature of a version's files (not those under names starting with '.'), read in
        the same walk that refuses a model whose files or folders link out of the repository: a
        runtime would read (for a pickle: run) what the link points at."""
        links = [artifact] if artifact.is_symlink() else []
        paths = []
        if artifact.is_dir():
            for parent, dirs, files in os.walk(artifact):  # (links to folders are listed, not entered)
                links.extend(Path(parent, n) for n in [*dirs, *files])  # hidden ones too: runtimes may read them
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                paths.extend(os.path.join(parent, f) for f in files if not f.startswith("."))
        else:
            paths.append(str(artifact))
        for link in links:
            if link.is_symlink() and not link.resolve().is_relative_to(self.root):
                relative = link.relative_to(folder) if link.is_relative_to(folder) else link.name
                raise InvalidInput(f"{folder.name}/{relative} points outside the model repository")
        return _signature(paths)

    def _undetected(self, path: Path) -> str:
        files = sorted(p.name for p in path.iterdir())[:10]
        installed = ", ".join(sorted(self.registry.runtimes)) or "none"
        return (
            f"no installed runtime recognises the files {files} (installed runtimes: {installed}); "
            f"name one with 'runtime:' in {MODEL_YAML}"
        )


FileSignature = frozenset[tuple[str, int, int]]


def files_of(path: Path) -> FileSignature:
    """(path, size, mtime) of ``path`` if it is a file, else of every file under it. Files and
    folders that vanish while it looks are left out: a later look sees the change."""
    if not path.is_dir():
        return _signature([str(path)])
    paths = []
    for folder, _, files in os.walk(path):  # (errors, such as a folder removed meanwhile, are skipped)
        paths.extend(os.path.join(folder, f) for f in files)
    return _signature(paths)


def _signature(paths: list[str]) -> FileSignature:
    """(path, size, mtime) of each file that still exists."""
    entries = []
    for name in paths:
        try:
            stat = os.stat(name)
        except (OSError, ValueError):
            continue
        entries.append((name, stat.st_size, stat.st_mtime_ns))
    return frozenset(entries)


def select_versions(found: list[str], policy: str | int | list[str]) -> list[str]:
    """The versions a policy serves, newest first. ``found`` is ordered oldest first."""
    newest_first = list(reversed(found))
    if policy == "all":
        return newest_first
    if policy == "latest":
        return newest_first[:1]
    if isinstance(policy, int):
        return newest_first[:policy]
    return [v for v in newest_first if v in policy]


def _parse_model_yaml(path: Path) -> ModelConfig:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidInput(f"{path.parent.name}/{MODEL_YAML} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidInput(f"{path.parent.name}/{MODEL_YAML} must be a mapping")
    return _validated(raw, f"{path.parent.name}/{MODEL_YAML}")


def _parse_mlserver_settings(path: Path, folder_name: str) -> tuple[str, ModelConfig, str | None]:
    where = f"{folder_name}/{MLSERVER_SETTINGS}"
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidInput(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidInput(f"{where} must be a JSON object")
    parameters = raw.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"{where}: 'parameters' must be an object")
    implementation = raw.get("implementation")
    runtime = MLSERVER_IMPLEMENTATIONS.get(implementation) if implementation else None
    if implementation and runtime is None:
        raise InvalidInput(
            f"{where}: MLServer implementation '{implementation}' has no mmserver runtime "
            f"(supported: {', '.join(MLSERVER_IMPLEMENTATIONS)})"
        )
    config: dict[str, Any] = {
        "runtime": runtime,
        "uri": parameters.get("uri"),
        "parameters": parameters.get("extra") or {},
        "batching": _mlserver_batching(raw, where),
    }
    for key in ("inputs", "outputs"):
        if raw.get(key):
            config[key] = raw[key]
    version = parameters.get("version")
    return str(raw.get("name") or folder_name), _validated(config, where), (
        str(version) if version else None
    )


def _mlserver_batching(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """MLServer's adaptive batching (max_batch_size, max_batch_time in seconds) in our terms."""
    size, delay = raw.get("max_batch_size"), raw.get("max_batch_time")
    if not size:
        return {}
    if type(size) is not int or not isinstance(delay, (int, float, type(None))):
        raise InvalidInput(f"{where}: max_batch_size must be an integer, max_batch_time a number")
    return {"max_batch_size": max(size, 1), "max_delay_ms": (delay or 0) * 1000.0}


def _validated(raw: dict[str, Any], where: str) -> ModelConfig:
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidInput(f"{where}: {problems}") from None
