"""The OpenAPI document stays true to the routes the application serves, and is valid."""

from __future__ import annotations

import httpx
from openapi_spec_validator import validate

from mmserver.api import infer, openapi
from mmserver.api.app import create_app
from mmserver.runtime import RuntimeRegistry
from mmserver.settings import Settings


def served_operations(settings: Settings) -> set[tuple[str, str]]:
    app = create_app(settings, RuntimeRegistry({}))
    while not hasattr(app, "routes"):  # unwrap the ASGI wrappers down to the Starlette app
        app = app.app
    operations = {
        (method.lower(), route.path)
        for route in app.routes
        for method in route.methods
        if method != "HEAD"
    }
    for path in infer.PATHS:
        sample = path.replace("{name}", "m").replace("{version}", "1")
        assert infer.infer_target(sample) is not None, path
        operations.add(("post", path))
    return operations


def documented(doc: dict) -> set[tuple[str, str]]:
    return {(method, path) for path, item in doc["paths"].items() for method in item}


def test_every_route_is_documented_and_every_documented_route_exists(tmp_path):
    settings = Settings(model_repository=tmp_path)
    assert documented(openapi.document()) == served_operations(settings)
    without_metrics = Settings(model_repository=tmp_path, metrics=False)
    assert documented(openapi.document(metrics=False)) == served_operations(without_metrics)


def test_the_document_is_valid_openapi():
    validate(openapi.document())


def test_the_server_serves_the_document(server):
    response = httpx.get(f"{server.url}/openapi.json")
    assert response.status_code == 200
    assert response.json() == openapi.document()
