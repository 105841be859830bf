"""The KServe V2 / Open Inference Protocol REST routes, with the binary tensor data and
model repository extensions."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .. import __version__
from ..codec import encode_json
from ..errors import InvalidInput
from ..manager import ModelManager
from .http import JSON, read_json_body

INDEX_BODY_LIMIT = 4096
EXTENSIONS = ["binary_tensor_data", "model_repository"]


def json_response(doc: object, status: int = 200) -> Response:
    return Response(encode_json(doc), status_code=status, media_type=JSON)


def _manager(request: Request) -> ModelManager:
    return request.app.state.manager


# ----------------------------------------------------------------------------- health & metadata


async def live(request: Request) -> Response:
    return json_response({"live": True})


async def ready(request: Request) -> Response:
    reason = _manager(request).unready_reason()
    if reason is None:
        return json_response({"ready": True})
    return json_response({"ready": False, "reason": reason}, 503)


async def server_metadata(request: Request) -> Response:
    return json_response({"name": "mmserver", "version": __version__, "extensions": EXTENSIONS})


async def model_metadata(request: Request) -> Response:
    params = request.path_params
    return json_response(_manager(request).metadata(params["name"], params.get("version")))


async def model_ready(request: Request) -> Response:
    params = request.path_params
    is_ready = _manager(request).is_ready(params["name"], params.get("version"))
    return json_response({"name": params["name"], "ready": is_ready}, 200 if is_ready else 503)


# ----------------------------------------------------------------------------- repository extension


async def repository_index(request: Request) -> Response:
    """Every model version; with body ``{"ready": true}`` only the ready ones."""
    options = await read_json_body(request, INDEX_BODY_LIMIT, "the index request body")
    rows = _manager(request).index()
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("ready", False), bool):
            raise InvalidInput("the index request body takes one option: {\"ready\": true|false}")
        if options.get("ready"):
            rows = [row for row in rows if row["state"] == "READY"]
    return json_response(rows)


async def repository_load(request: Request) -> Response:
    await _manager(request).load(request.path_params["name"])
    return json_response({"name": request.path_params["name"], "loaded": True})


async def repository_unload(request: Request) -> Response:
    await _manager(request).unload(request.path_params["name"])
    return json_response({"name": request.path_params["name"], "unloaded": True})


def routes() -> list[BaseRoute]:
    """Every V2 route but inference, which ``infer.InferenceRoute`` serves ahead of these."""
    model = "/v2/models/{name}"
    versioned = model + "/versions/{version}"
    return [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route(model, model_metadata, methods=["GET"]),
        Route(versioned, model_metadata, methods=["GET"]),
        Route(model + "/ready", model_ready, methods=["GET"]),
        Route(versioned + "/ready", model_ready, methods=["GET"]),
        Route("/v2/repository/index", repository_index, methods=["POST", "GET"]),
        Route("/v2/repository/models/{name}/load", repository_load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", repository_unload, methods=["POST"]),
    ]
