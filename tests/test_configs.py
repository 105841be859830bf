"""The documented example settings file stays complete and valid."""

from pathlib import Path

import yaml

from mmserver.settings import Settings, load_settings

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "mmserver.yaml"


def test_example_settings_file_documents_every_setting_and_loads():
    documented = set(yaml.safe_load(EXAMPLE.read_text()))
    assert documented == set(Settings.model_fields) - {"config"}
    settings = load_settings(config=EXAMPLE)
    assert settings.port == 8080
    assert settings.max_request_bytes == 64 * 1024**2
