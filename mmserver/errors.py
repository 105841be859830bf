"""Typed errors and the one table that maps them to HTTP status codes.

Every error raised on purpose anywhere in the server is an ``MMServerError``; its message is
written for the client and ends up verbatim in the ``{"error": ...}`` body.
"""

from __future__ import annotations


class MMServerError(Exception):
    """Base of every error the server reports to a client."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidInput(MMServerError):
    """The request is malformed or does not fit the model."""


class UnsupportedMediaType(InvalidInput):
    """The request body comes in an encoding (``Content-Encoding``) the server cannot decode."""


class ModelNotFound(MMServerError):
    """No such model or version in the repository."""


class ModelNotReady(MMServerError):
    """The model exists but cannot serve now (loading, unloaded, or failed to load)."""


class ModelLoadError(MMServerError):
    """Loading a model failed (broken files, missing runtime, runtime raised)."""


class Overloaded(MMServerError):
    """The model's queue is full; the client should retry later."""


class PayloadTooLarge(MMServerError):
    """The request body exceeds the configured limit."""


class InsufficientMemory(MMServerError):
    """The model does not fit in the memory budget even after evicting what can be evicted."""


class InferenceError(MMServerError):
    """The model raised while computing a batch."""


class InferenceTimeout(MMServerError):
    """The request's deadline passed before its result was ready."""


class ClientDisconnected(MMServerError):
    """The client went away before its request ran; nothing is sent back."""


class Unauthorized(MMServerError):
    """Missing or wrong credentials."""


class Forbidden(MMServerError):
    """The server's settings do not allow this operation."""


class RouteNotFound(MMServerError):
    """No route matches the URL."""


class MethodNotAllowed(MMServerError):
    """The route exists but not for this HTTP method; ``allow`` lists the methods it takes."""

    def __init__(self, message: str, allow: str) -> None:
        super().__init__(message)
        self.allow = allow


HTTP_STATUS: dict[type[MMServerError], int] = {
    InvalidInput: 400,
    Unauthorized: 401,
    Forbidden: 403,
    ModelNotFound: 404,
    RouteNotFound: 404,
    MethodNotAllowed: 405,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    Overloaded: 429,
    ClientDisconnected: 499,
    InferenceError: 500,
    ModelLoadError: 500,
    ModelNotReady: 503,
    InferenceTimeout: 504,
    InsufficientMemory: 507,
}


def http_status(error: MMServerError) -> int:
    """The HTTP status for an error, looked up along its class hierarchy."""
    for cls in type(error).__mro__:
        status = HTTP_STATUS.get(cls)
        if status is not None:
            return status
    return 500
