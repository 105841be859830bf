"""The OpenAPI 3 document of every route the server answers, served at ``GET /openapi.json``.

Each operation is declared here next to the schemas of its bodies; ``tests/test_openapi.py``
checks that the set of documented operations equals the set of routes the application really
serves, so neither can change without the other.
"""

from __future__ import annotations

from typing import Any

from .. import __version__
from ..codec import DTYPES
from . import embeddings, generate, openai

JSON = "application/json"

_ERROR = {"$ref": "#/components/schemas/Error"}
_PARAMETERS = {"type": "object", "additionalProperties": True}
_SHAPE = {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": 32}
_METADATA_SHAPE = {"type": "array", "items": {"type": "integer", "minimum": -1}}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "What is wrong, naming the input."}},
    },
    "RequestInput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "shape": _SHAPE,
            "datatype": {"type": "string", "enum": list(DTYPES)},
            "parameters": _PARAMETERS,
            "data": {"description": "Row-major tensor contents, flat or nested (absent when "
                                    "parameters.binary_data_size carries them in binary)."},
        },
    },
    "RequestOutput": {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string"}, "parameters": _PARAMETERS},
    },
    "InferenceRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": _PARAMETERS,
            "inputs": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/RequestInput"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestOutput"}},
        },
    },
    "ResponseOutput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": _SHAPE,
            "datatype": {"type": "string", "enum": list(DTYPES)},
            "parameters": _PARAMETERS,
            "data": {"type": "array"},
        },
    },
    "InferenceResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": _PARAMETERS,
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/ResponseOutput"}},
        },
    },
    "TensorMetadata": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {"name": {"type": "string"}, "datatype": {"type": "string"}, "shape": _METADATA_SHAPE},
    },
    "ModelMetadata": {
        "type": "object",
        "required": ["name", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMetadata"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMetadata"}},
            "parameters": _PARAMETERS,
        },
    },
    "ServerMetadata": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                       "extensions": {"type": "array", "items": {"type": "string"}}},
    },
    "Live": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
    "Ready": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}},
    "ModelReady": {
        "type": "object",
        "required": ["name", "ready"],
        "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
    },
    "IndexRequest": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
    "RepositoryIndex": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["name", "version", "state", "reason"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "state": {"type": "string", "enum": ["UNAVAILABLE", "LOADING", "READY", "UNLOADING"]},
                "reason": {"type": "string"},
                "memory_bytes": {"type": "object", "additionalProperties": {"type": "integer"}},
            },
        },
    },
    "LoadResult": {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string"}, "loaded": {"type": "boolean"},
                       "unloaded": {"type": "boolean"}},
    },
}


def _json(schema: str) -> dict[str, Any]:
    return {"content": {JSON: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): {"description": "Error", "content": {JSON: {"schema": _ERROR}}} for status in statuses}


def _path_parameters(path: str) -> list[dict[str, Any]]:
    names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]


def _operation(path: str, summary: str, ok: str | dict, errors: tuple[int, ...], body: str | None = None) -> dict:
    ok_response = {"description": "OK", **(_json(ok) if isinstance(ok, str) else ok)}
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": ok_response, **_errors(*errors)},
    }
    parameters = _path_parameters(path)
    if parameters:
        operation["parameters"] = parameters
    if body:
        operation["requestBody"] = {"required": body == "InferenceRequest", **_json(body)}
    return operation


MODEL = "/v2/models/{name}"
VERSIONED = MODEL + "/versions/{version}"
_INFER_ERRORS = (400, 401, 404, 408, 413, 415, 429, 500, 503, 504, 507)
_READY_MODEL = {"content": {JSON: {"schema": {"$ref": "#/components/schemas/ModelReady"}}}}

#: (method, path) -> (summary, success schema, error statuses, request body schema)
OPERATIONS: dict[tuple[str, str], tuple[str, str | dict, tuple[int, ...], str | None]] = {
    ("get", "/v2/health/live"): ("Server liveness", "Live", (), None),
    ("get", "/v2/health/ready"): ("Server readiness (503 while startup models load)", "Ready", (503,), None),
    ("get", "/v2"): ("Server metadata", "ServerMetadata", (401,), None),
    ("get", MODEL): ("Model metadata (default version)", "ModelMetadata", (401, 404, 503, 507), None),
    ("get", VERSIONED): ("Model metadata", "ModelMetadata", (401, 404, 503, 507), None),
    ("get", MODEL + "/ready"): ("Model readiness (503 when not ready)", _READY_MODEL, (401, 404, 503), None),
    ("get", VERSIONED + "/ready"): ("Model version readiness", _READY_MODEL, (401, 404, 503), None),
    ("post", MODEL + "/infer"): ("Inference (JSON, or binary tensor data)", "InferenceResponse",
                                 _INFER_ERRORS, "InferenceRequest"),
    ("post", VERSIONED + "/infer"): ("Inference on one version", "InferenceResponse", _INFER_ERRORS,
                                     "InferenceRequest"),
    ("post", "/v2/repository/index"): ("Every model version and its state", "RepositoryIndex",
                                       (400, 401, 408, 413, 415), "IndexRequest"),
    ("get", "/v2/repository/index"): ("Every model version and its state", "RepositoryIndex", (401,), None),
    ("post", "/v2/repository/models/{name}/load"): ("Read the model's folder and load it", "LoadResult",
                                                    (400, 401, 403, 404, 500, 507), None),
    ("post", "/v2/repository/models/{name}/unload"): ("Drain and unload a model", "LoadResult",
                                                      (400, 401, 403, 404), None),
    ("get", "/metrics"): ("Prometheus metrics", {"content": {"text/plain": {"schema": {"type": "string"}}}},
                          (401,), None),
    ("get", "/openapi.json"): ("This document", {"content": {JSON: {"schema": {"type": "object"}}}}, (401,), None),
}


def document(metrics: bool = True) -> dict[str, Any]:
    """The OpenAPI 3.0 document of the routes this server answers."""
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), (summary, ok, errors, body) in OPERATIONS.items():
        if path == "/metrics" and not metrics:
            continue
        paths.setdefault(path, {})[method] = _operation(path, summary, ok, errors, body)
    for (method, path), operation in {**generate.OPENAPI, **openai.OPENAPI, **embeddings.OPENAPI}.items():  # text routes
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.0.3",
        "info": {"title": "mmserver", "version": __version__,
                 "description": "KServe V2 / Open Inference Protocol REST API, with the binary "
                                "tensor data and model repository extensions."},
        "paths": paths,
        "components": {
            "schemas": {**SCHEMAS, **generate.OPENAPI_SCHEMAS, **openai.OPENAPI_SCHEMAS, **embeddings.OPENAPI_SCHEMAS},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
