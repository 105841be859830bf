"""Tests of mmserver.settings (precedence, validation) and of the command line built on it."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmserver.cli import POSITIONAL, build_parser, main
from mmserver.errors import InvalidInput
from mmserver.settings import Settings, load_settings

FLAGS = {name: f"--{name.replace('_', '-')}" for name in Settings.model_fields if name != POSITIONAL}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No MMSERVER_* variable from the outside, and a working directory without stray files."""
    for key in list(os.environ):
        if key.upper().startswith("MMSERVER_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def yaml_file(tmp_path: Path, text: str, name: str = "mmserver.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def invalid_settings(**overrides) -> str:
    with pytest.raises(InvalidInput) as info:
        load_settings(**overrides)
    return info.value.message


# ----------------------------------------------------------------------------- precedence


def test_defaults():
    settings = load_settings()
    assert settings.model_repository == Path("model-repo")
    assert settings.config is None
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.log_level == "info"
    assert settings.access_log is False
    assert settings.max_batch_size == 32
    assert settings.max_delay_ms == 0.0
    assert settings.max_queue == 1024
    assert settings.max_request_bytes == 64 * 1024**2
    assert settings.load_concurrency == 2
    assert settings.infer_threads == 8


def test_yaml_file_given_by_config(tmp_path):
    path = yaml_file(tmp_path, """\
model_repository: /srv/models
host: 0.0.0.0
port: 9000
log_level: debug
access_log: true
max_batch_size: 4
max_delay_ms: 2.5
max_queue: 7
max_request_bytes: 1MiB
load_concurrency: 3
infer_threads: 2
""")
    settings = load_settings(config=path)
    assert settings.config == path
    assert settings.model_repository == Path("/srv/models")
    assert settings.host == "0.0.0.0"
    assert settings.port == 9000
    assert settings.log_level == "debug"
    assert settings.access_log is True
    assert settings.max_batch_size == 4
    assert settings.max_delay_ms == 2.5
    assert settings.max_queue == 7
    assert settings.max_request_bytes == 1024**2
    assert settings.load_concurrency == 3
    assert settings.infer_threads == 2


def test_yaml_file_given_by_environment(tmp_path, monkeypatch):
    path = yaml_file(tmp_path, "port: 9001\nhost: 10.0.0.1\n")
    monkeypatch.setenv("MMSERVER_CONFIG", str(path))
    settings = load_settings()
    assert settings.port == 9001
    assert settings.host == "10.0.0.1"
    assert settings.config == path


def test_environment_beats_yaml(tmp_path, monkeypatch):
    path = yaml_file(tmp_path, "port: 9000\nhost: 0.0.0.0\nmax_queue: 5\n")
    monkeypatch.setenv("MMSERVER_PORT", "9100")
    monkeypatch.setenv("MMSERVER_ACCESS_LOG", "true")
    settings = load_settings(config=path)
    assert settings.port == 9100  # env
    assert settings.access_log is True  # env, not in the file
    assert settings.host == "0.0.0.0"  # file
    assert settings.max_queue == 5  # file
    assert settings.infer_threads == 8  # default


def test_a_kubernetes_service_link_in_mmserver_port_is_not_the_port(tmp_path, monkeypatch):
    # Kubernetes gives every pod of a namespace with a Service named mmserver MMSERVER_PORT=tcp://...
    monkeypatch.setenv("MMSERVER_PORT", "tcp://10.96.0.12:8080")
    assert load_settings(config=yaml_file(tmp_path, "port: 9000\n")).port == 9000  # file
    assert load_settings().port == 8080  # default
    monkeypatch.setenv("MMSERVER_PORT", "tcp://")  # (not a service link: refused as any bad port)
    with pytest.raises(InvalidInput, match="port"):
        load_settings()


def test_cli_beats_environment_and_yaml(tmp_path, monkeypatch):
    path = yaml_file(tmp_path, "port: 9000\nhost: 0.0.0.0\nmax_queue: 5\n")
    monkeypatch.setenv("MMSERVER_PORT", "9100")
    monkeypatch.setenv("MMSERVER_MAX_QUEUE", "6")
    settings = load_settings(config=path, port=9200, host="127.0.0.2")
    assert settings.port == 9200  # cli over env and file
    assert settings.host == "127.0.0.2"  # cli over file
    assert settings.max_queue == 6  # env over file
    assert settings.max_batch_size == 32  # default


def test_cli_config_beats_environment_config(tmp_path, monkeypatch):
    from_env = yaml_file(tmp_path, "port: 1111\n", "env.yaml")
    from_cli = yaml_file(tmp_path, "port: 2222\n", "cli.yaml")
    monkeypatch.setenv("MMSERVER_CONFIG", str(from_env))
    settings = load_settings(config=str(from_cli))
    assert settings.port == 2222
    assert settings.config == from_cli


def test_environment_without_yaml(monkeypatch):
    monkeypatch.setenv("MMSERVER_MODEL_REPOSITORY", "/data/repo")
    monkeypatch.setenv("MMSERVER_LOG_LEVEL", "warning")
    monkeypatch.setenv("MMSERVER_MAX_DELAY_MS", "1.5")
    settings = load_settings()
    assert settings.model_repository == Path("/data/repo")
    assert settings.log_level == "warning"
    assert settings.max_delay_ms == 1.5


def test_empty_yaml_file_means_defaults(tmp_path):
    settings = load_settings(config=yaml_file(tmp_path, ""))
    assert settings.port == 8080
    assert settings.host == "127.0.0.1"


# ----------------------------------------------------------------------------- errors


def test_unknown_yaml_key(tmp_path):
    message = invalid_settings(config=yaml_file(tmp_path, "port: 9000\nbogus_key: 1\n"))
    assert message == "invalid settings: bogus_key: Extra inputs are not permitted"


def test_unknown_init_key():
    assert "invalid settings: bogus: Extra inputs are not permitted" == invalid_settings(bogus=1)


@pytest.mark.parametrize(
    "text, field, reason",
    [
        ("port: 70000\n", "port", "less than or equal to 65535"),
        ("port: -1\n", "port", "greater than or equal to 0"),
        ("port: eighty\n", "port", "valid integer"),
        ("log_level: loud\n", "log_level", "'debug', 'info', 'warning' or 'error'"),
        ("max_batch_size: 0\n", "max_batch_size", "greater than or equal to 1"),
        ("max_delay_ms: -1\n", "max_delay_ms", "greater than or equal to 0"),
        ("max_queue: 0\n", "max_queue", "greater than or equal to 1"),
        ("max_request_bytes: lots\n", "max_request_bytes", "'lots' is not a size"),
        ("max_request_bytes: 0\n", "max_request_bytes", "greater than 0"),  # every body would be a 413
        ("max_request_bytes: 0KiB\n", "max_request_bytes", "greater than 0"),
        ("access_log: maybe\n", "access_log", "valid boolean"),
        ("infer_threads: 1.5\n", "infer_threads", "valid integer"),
    ],
)
def test_bad_yaml_values(tmp_path, text, field, reason):
    message = invalid_settings(config=yaml_file(tmp_path, text))
    assert message.startswith(f"invalid settings: {field}: ")
    assert reason in message


def test_several_bad_values_are_all_reported(tmp_path):
    message = invalid_settings(config=yaml_file(tmp_path, "port: 70000\nmax_queue: 0\n"))
    assert "port:" in message and "max_queue:" in message


@pytest.mark.parametrize(
    "variable, value, field",
    [("MMSERVER_PORT", "abc", "port"), ("MMSERVER_LOG_LEVEL", "verbose", "log_level"),
     ("MMSERVER_MAX_REQUEST_BYTES", "big", "max_request_bytes"),
     ("MMSERVER_ACCESS_LOG", "sometimes", "access_log")],
)
def test_bad_environment_values(monkeypatch, variable, value, field):
    monkeypatch.setenv(variable, value)
    assert invalid_settings().startswith(f"invalid settings: {field}: ")


def test_bad_cli_value():
    assert invalid_settings(max_batch_size="many").startswith("invalid settings: max_batch_size: ")


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert invalid_settings(config=missing) == f"settings file {missing} does not exist"


def test_missing_config_file_from_environment(tmp_path, monkeypatch):
    missing = tmp_path / "nope.yaml"
    monkeypatch.setenv("MMSERVER_CONFIG", str(missing))
    assert invalid_settings() == f"settings file {missing} does not exist"


def test_config_that_is_a_directory(tmp_path):
    assert invalid_settings(config=tmp_path) == f"settings file {tmp_path} does not exist"


def test_yaml_syntax_error_is_invalid_input(tmp_path):
    path = yaml_file(tmp_path, "port: [9000\n")
    with pytest.raises(InvalidInput, match="mmserver.yaml"):
        load_settings(config=path)


def test_yaml_nested_too_deep_is_invalid_input(tmp_path):
    path = yaml_file(tmp_path, "cors_origins: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(InvalidInput, match="mmserver.yaml is not valid YAML"):
        load_settings(config=path)


def test_yaml_that_is_not_a_mapping_is_invalid_input(tmp_path):
    path = yaml_file(tmp_path, "- port\n- 9000\n")
    with pytest.raises(InvalidInput):
        load_settings(config=path)


# ----------------------------------------------------------------------------- byte sizes


@pytest.mark.parametrize(
    "value, expected",
    [("64MiB", 64 * 1024**2), ("1KiB", 1024), ("1KB", 1000), ("2 GiB", 2 * 1024**3),
     ("1.5MiB", int(1.5 * 1024**2)), ("123", 123), (4096, 4096)],
)
def test_max_request_bytes_sizes(value, expected):
    assert load_settings(max_request_bytes=value).max_request_bytes == expected


def test_max_request_bytes_from_environment_and_yaml(tmp_path, monkeypatch):
    path = yaml_file(tmp_path, "max_request_bytes: 10MiB\n")
    assert load_settings(config=path).max_request_bytes == 10 * 1024**2
    monkeypatch.setenv("MMSERVER_MAX_REQUEST_BYTES", "64MiB")
    assert load_settings(config=path).max_request_bytes == 64 * 1024**2



@pytest.mark.parametrize("value", ["90%", "0,9", "0.9.", "1/2", "1e-1", "8GiB-1", "64 MiB extra", "5 foo", "", True, -1])
def test_sizes_must_be_one_number_and_one_unit(value):
    # pydantic's ByteSize alone reads a leading number and unit and drops the rest
    # ("90%" -> 90 bytes, "1e-1" -> an exabyte); nothing of the kind may pass
    for field in ("max_request_bytes", "memory_margin"):
        assert invalid_settings(**{field: value}).startswith(f"invalid settings: {field}: ")


@pytest.mark.parametrize(
    "value, expected",
    [("40GiB", 40 * 1024**3), (" 8 gib ", 8 * 1024**3), (1024, 1024), ("1024", 1024),
     ("0.9", 0.9), (".5", 0.5), ("1.0", 1.0), (0.25, 0.25), ("90%", 0.9), ("12.5 %", 0.125), ("100%", 1.0)],
)
def test_memory_budget_as_size_fraction_or_percent(value, expected):
    settings = load_settings(host_memory_budget=value, gpu_memory_budget=value)
    assert settings.host_memory_budget == expected and settings.gpu_memory_budget == expected
    assert type(settings.host_memory_budget) is type(expected)


@pytest.mark.parametrize(
    "value, reason",
    [("0%", "(0, 1]"), ("150%", "(0, 1]"), ("2.0", "(0, 1]"), ("0.0", "(0, 1]"), ("5.", "(0, 1]"),
     ("90 percent", "is not a size"), ("1e-1", "is not a size"), ("0.9GiB-", "is not a size"), (True, "is not a size")],
)
def test_bad_memory_budgets_are_refused(value, reason):
    message = invalid_settings(host_memory_budget=value)
    assert message.startswith("invalid settings: host_memory_budget: ")
    assert reason in message


def test_model_yaml_memory_is_parsed_as_strictly(tmp_path):
    from mmserver.spec import ModelConfig

    assert ModelConfig(memory="1.5GiB").memory == int(1.5 * 1024**3)
    with pytest.raises(ValueError, match="is not a size"):
        ModelConfig(memory="2GB of weights")


# ----------------------------------------------------------------------------- command line


def serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices["serve"]


def test_parser_has_a_flag_for_every_setting():
    serve = serve_parser()
    by_dest = {a.dest: a for a in serve._actions}
    for name, flag in FLAGS.items():
        assert name in by_dest, f"no flag for setting {name}"
        assert flag in by_dest[name].option_strings
        assert f"MMSERVER_{name.upper()}" in by_dest[name].help
        assert Settings.model_fields[name].description.replace("%", "%%") in by_dest[name].help
    positional = by_dest[POSITIONAL]
    assert positional.option_strings == []
    assert positional.nargs == "?"
    assert set(by_dest) == {*FLAGS, POSITIONAL, "help"}


def test_parser_passes_only_the_given_flags(tmp_path):
    args = vars(build_parser().parse_args(
        ["serve", str(tmp_path), "--port", "9000", "--access-log", "--max-request-bytes", "1MiB"]
    ))
    assert args.pop("run").__name__ == "serve_command"
    assert args == {
        "command": "serve",
        "model_repository": str(tmp_path),
        "port": "9000",
        "access_log": True,
        "max_request_bytes": "1MiB",
    }
    args = vars(build_parser().parse_args(["serve", "--no-access-log"]))
    assert args["access_log"] is False
    assert "model_repository" not in args


def test_parsed_flags_go_through_load_settings(tmp_path):
    args = vars(build_parser().parse_args(
        ["serve", str(tmp_path), "--port", "9000", "--max-delay-ms", "1.5",
         "--max-request-bytes", "1MiB", "--log-level", "error"]
    ))
    for key in ("run", "command"):
        args.pop(key)
    settings = load_settings(**args)
    assert settings.model_repository == tmp_path
    assert settings.port == 9000
    assert settings.max_delay_ms == 1.5
    assert settings.max_request_bytes == 1024**2
    assert settings.log_level == "error"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MMSERVER_")}
    env["COLUMNS"] = "200"
    return subprocess.run([sys.executable, "-m", "mmserver", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def test_help():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout
    assert "--version" in result.stdout


def test_serve_help_mentions_every_flag():
    result = run_cli("serve", "--help")
    assert result.returncode == 0, result.stderr
    for name, flag in FLAGS.items():
        assert flag in result.stdout
        assert f"MMSERVER_{name.upper()}" in result.stdout
    assert "--no-access-log" in result.stdout
    assert "MODEL_REPOSITORY" in result.stdout


def test_main_with_missing_repository(capsys):
    assert main(["serve", "/nonexistent"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == "mmserver: model repository /nonexistent is not a directory"


def test_main_with_bad_flag_value(capsys, tmp_path):
    assert main(["serve", str(tmp_path), "--port", "eighty"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmserver: invalid settings: port: ")


def test_main_with_missing_config_file(capsys, tmp_path):
    missing = tmp_path / "absent.yaml"
    assert main(["serve", str(tmp_path), "--config", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"mmserver: settings file {missing} does not exist"


@pytest.mark.parametrize("token", ["s3cret\n", "  s3cret  "])
def test_the_auth_token_is_stripped_like_the_file(monkeypatch, token):
    # a Kubernetes secret made with --from-file ends in a newline no header can carry
    monkeypatch.setenv("MMSERVER_AUTH_TOKEN", token)
    assert load_settings().bearer_token == "s3cret"


@pytest.mark.parametrize("token", ["", " \n"])
def test_an_empty_auth_token_is_refused(capsys, tmp_path, monkeypatch, token):
    monkeypatch.setenv("MMSERVER_AUTH_TOKEN", token)
    assert main(["serve", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "mmserver: the auth token is empty"


def test_an_unreadable_auth_token_file_is_a_message_not_a_traceback(capsys, tmp_path):
    missing = tmp_path / "token"
    assert main(["serve", str(tmp_path), "--auth-token-file", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmserver: cannot read auth token file {missing}: ")
    assert "No such file" in err and "Traceback" not in err


@pytest.mark.parametrize("certfile, keyfile", [("absent", "garbage"), ("garbage", "absent"), ("garbage", "garbage")])
def test_missing_or_bad_tls_files_are_a_message_not_a_traceback(capsys, tmp_path, certfile, keyfile):
    (tmp_path / "garbage").write_text("not a certificate")
    assert main(["serve", str(tmp_path), "--tls-certfile", str(tmp_path / certfile),
                 "--tls-keyfile", str(tmp_path / keyfile)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmserver: cannot use the TLS certificate "), err


def test_main_without_command_prints_help(capsys):
    assert main([]) == 2
    assert "serve" in capsys.readouterr().out


def test_an_unreadable_config_file_is_a_message_not_a_traceback(capsys, tmp_path, monkeypatch):
    # a Kubernetes secret mounted with defaultMode 0400 is root's: the image's UID 1000 cannot read it
    path = yaml_file(tmp_path, "port: 9000\n")
    read_text = Path.read_text

    def refuse(self: Path, *args, **kwargs) -> str:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refuse)
    assert main(["serve", str(tmp_path), "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmserver: cannot read settings file {path}: "), err
    assert "Permission denied" in err
