"""Command line: ``mmserver serve [MODEL_REPOSITORY] [--host H] [--port P] [--config FILE] ...``.

Every flag of ``serve`` is generated from a field of ``Settings``, so each setting has exactly
one flag, one ``MMSERVER_*`` variable and one YAML key, with the same help text.
"""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .errors import InvalidInput
from .settings import Settings, load_settings

POSITIONAL = "model_repository"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmserver",
        description="Multi-model inference server (KServe V2 / Open Inference Protocol).",
    )
    parser.add_argument("--version", action="version", version=f"mmserver {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve every model in a repository directory",
        description="Serve every model in MODEL_REPOSITORY over HTTP. Each flag can also be set "
        "with its MMSERVER_* environment variable or in the YAML file given by --config; "
        "precedence: flag > environment > file > default.",
    )
    for name, field in Settings.model_fields.items():
        help_text = f"{field.description} [env MMSERVER_{name.upper()}; default: {field.default}]"
        help_text = help_text.replace("%", "%%")  # argparse formats help strings with %
        if name == POSITIONAL:
            serve.add_argument(name, nargs="?", default=argparse.SUPPRESS, metavar="MODEL_REPOSITORY",
                               help=help_text)
        elif field.annotation is bool:
            serve.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS,
                               action=argparse.BooleanOptionalAction, help=help_text)
        else:
            serve.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS,
                               metavar=name.split("_")[-1].upper(), help=help_text)
    serve.set_defaults(run=serve_command)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def serve_command(overrides: dict[str, Any]) -> int:
    import uvicorn

    from .api.app import create_app
    from .api.protocol import http_protocol

    settings = load_settings(**overrides)
    configure_logging(settings.log_level)
    if not settings.model_repository.is_dir():
        raise InvalidInput(f"model repository {settings.model_repository} is not a directory")
    if (settings.tls_certfile is None) != (settings.tls_keyfile is None):
        raise InvalidInput("HTTPS needs both --tls-certfile and --tls-keyfile")
    if settings.tls_certfile is not None and settings.tls_keyfile is not None:
        _check_tls_files(settings.tls_certfile, settings.tls_keyfile)
    scheme = "https" if settings.tls_certfile else "http"
    logging.getLogger("mmserver").info(
        "serving %s on %s://%s:%d%s", settings.model_repository.resolve(), scheme, settings.host,
        settings.port, " (bearer token required)" if settings.bearer_token else "",
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="auto",
        http=http_protocol(settings.request_read_timeout_s),
        ws="none",  # no WebSocket routes: an upgrade request is plain HTTP (api/protocol.py)
        access_log=settings.access_log,
        log_config=None,
        log_level=settings.log_level,
        limit_concurrency=settings.max_connections + 1,  # uvicorn counts the connection asking
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=30,
        ssl_certfile=settings.tls_certfile,
        ssl_keyfile=settings.tls_keyfile,
    )
    return 0


def _check_tls_files(certfile: Path, keyfile: Path) -> None:
    """Load the certificate and key once here, so a missing or wrong file is a message, not
    uvicorn's traceback."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInput(f"cannot use the TLS certificate {certfile} with the key {keyfile}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    run = args.pop("run", None)
    args.pop("command", None)
    if run is None:
        parser.print_help()
        return 2
    try:
        return run(args)
    except InvalidInput as exc:
        print(f"mmserver: {exc.message}", file=sys.stderr)
        return 2
