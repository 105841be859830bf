"""Tests of mmserver.repository (and RuntimeRegistry) on repositories of real tiny models."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import joblib
import numpy as np
import pytest

from mmserver.errors import InvalidInput, ModelNotFound
from mmserver.repository import (
    MLSERVER_SETTINGS,
    MODEL_YAML,
    Repository,
    RepositoryModel,
    check_name,
    select_versions,
)
from mmserver.runtime import RuntimeRegistry
from mmserver.spec import ModelConfig


# ----------------------------------------------------------------------------- real models


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """Tiny real models, trained once per session: sklearn (joblib) and XGBoost (json, ubj)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from xgboost import XGBClassifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    folder = tmp_path_factory.mktemp("artifacts")

    logistic = LogisticRegression().fit(x, y)
    joblib.dump(logistic, folder / "logistic.joblib")
    forest = RandomForestClassifier(n_estimators=3, max_depth=2, random_state=0).fit(x, y)
    joblib.dump(forest, folder / "forest.joblib")
    booster = XGBClassifier(n_estimators=3, max_depth=2, n_jobs=1).fit(x, y)
    booster.save_model(folder / "xgb.json")
    booster.save_model(folder / "xgb.ubj")
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 32})
    )
    assert b'"learner"' in (folder / "xgb.json").read_bytes()[:4096]
    return {
        "logistic": folder / "logistic.joblib",
        "forest": folder / "forest.joblib",
        "xgb_json": folder / "xgb.json",
        "xgb_ubj": folder / "xgb.ubj",
        "hf_config": folder / "config.json",
    }


@pytest.fixture(scope="session")
def registry() -> RuntimeRegistry:
    return RuntimeRegistry.discover()


@pytest.fixture
def repo_root(tmp_path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    return root


@pytest.fixture
def repo(repo_root, registry) -> Repository:
    return Repository(repo_root, registry)


def put(artifacts, key: str, folder: Path, filename: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(artifacts[key], folder / filename))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def only_version(model: RepositoryModel):
    assert model.error is None, model.error
    assert list(model.versions) == ["1"]
    return model.versions["1"]


# ----------------------------------------------------------------------------- registry


def test_discover_finds_the_installed_runtimes(registry):
    assert {"sklearn", "xgboost"} <= set(registry.runtimes)
    assert registry.broken == {}
    assert registry.get("sklearn").name == "sklearn"
    assert registry.get("xgboost").name == "xgboost"
    assert type(registry.get("sklearn")).__name__ == "SKLearnRuntime"


def test_registry_get_missing_runtime(registry):
    with pytest.raises(LookupError) as info:
        registry.get("nosuch")
    message = str(info.value)
    assert "runtime 'nosuch' is not installed" in message
    assert "sklearn" in message and "xgboost" in message
    assert "runtimes/nosuch" in message


def test_registry_get_missing_runtime_when_none_installed():
    with pytest.raises(LookupError) as info:
        RuntimeRegistry({}).get("sklearn")
    assert "runtime 'sklearn' is not installed (installed: none)" in str(info.value)


def test_registry_get_broken_runtime_gives_the_import_failure():
    reason = "runtime plugin 'vllm' failed to import: No module named 'vllm'"
    with pytest.raises(LookupError) as info:
        RuntimeRegistry({}, {"vllm": reason}).get("vllm")
    assert str(info.value) == reason


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize("filename", ["model.joblib", "model.pkl", "estimator.pickle"])
def test_sklearn_detected_by_file_suffix(artifacts, repo, repo_root, filename):
    put(artifacts, "logistic", repo_root / "iris", filename)
    models = repo.scan()
    assert list(models) == ["iris"]
    spec = only_version(models["iris"])
    assert spec.runtime == "sklearn"
    assert spec.source == "detected"
    assert spec.name == "iris"
    assert spec.version == "1"
    assert spec.path == repo_root.resolve() / "iris"
    assert spec.artifact == spec.path
    assert spec.config == ModelConfig()
    assert models["iris"].served == ["1"]


def test_random_forest_detected_as_sklearn(artifacts, repo, repo_root):
    put(artifacts, "forest", repo_root / "forest", "forest.pkl")
    assert only_version(repo.scan()["forest"]).runtime == "sklearn"


@pytest.mark.parametrize("key, filename", [("xgb_json", "model.json"), ("xgb_json", "booster.json"),
                                           ("xgb_ubj", "model.ubj")])
def test_xgboost_detected_by_file(artifacts, repo, repo_root, key, filename):
    put(artifacts, key, repo_root / "cancer", filename)
    spec = only_version(repo.scan()["cancer"])
    assert spec.runtime == "xgboost"
    assert spec.source == "detected"


def test_unrelated_json_is_not_xgboost(artifacts, repo, repo_root):
    put(artifacts, "hf_config", repo_root / "bert", "config.json")
    put(artifacts, "logistic", repo_root / "iris", "model.joblib")
    models = repo.scan()
    bert = models["bert"]
    assert bert.versions == {}
    assert bert.served == []
    assert bert.error is not None
    assert "no installed runtime recognises the files ['config.json']" in bert.error
    assert f"installed runtimes: {', '.join(sorted(repo.registry.runtimes))}" in bert.error
    assert {"sklearn", "xgboost"} <= set(repo.registry.runtimes)
    assert "runtime:" in bert.error
    assert only_version(models["iris"]).runtime == "sklearn"


def test_unrelated_json_next_to_a_pickle_is_sklearn(artifacts, repo, repo_root):
    put(artifacts, "hf_config", repo_root / "pipe", "config.json")
    put(artifacts, "logistic", repo_root / "pipe", "model.joblib")
    assert only_version(repo.scan()["pipe"]).runtime == "sklearn"


def test_xgboost_wins_over_sklearn_when_both_match(artifacts, repo, repo_root):
    put(artifacts, "logistic", repo_root / "both", "model.joblib")
    put(artifacts, "xgb_ubj", repo_root / "both", "model.ubj")
    assert only_version(repo.scan()["both"]).runtime == "xgboost"


def test_empty_model_folder_is_an_error(repo, repo_root):
    (repo_root / "empty").mkdir()
    model = repo.scan()["empty"]
    assert model.error is not None
    assert "no installed runtime recognises the files []" in model.error


def test_registry_detect_directly(artifacts, registry, tmp_path):
    put(artifacts, "xgb_json", tmp_path / "x", "model.json")
    put(artifacts, "logistic", tmp_path / "s", "model.pkl")
    put(artifacts, "hf_config", tmp_path / "h", "config.json")
    assert registry.detect(tmp_path / "x") == "xgboost"
    assert registry.detect(tmp_path / "s") == "sklearn"
    assert registry.detect(tmp_path / "h") is None


@pytest.mark.parametrize("tokenizer", ["tokenizer.model", "spiece.model"])
def test_a_hugging_face_folder_with_a_sentencepiece_tokenizer_is_not_xgboost(artifacts, registry, tmp_path,
                                                                             tokenizer):
    # sentencepiece saves its tokenizers as *.model, one of XGBoost's suffixes
    folder = tmp_path / "albert"
    put(artifacts, "hf_config", folder, "config.json")
    (folder / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    (folder / tokenizer).write_bytes(b"\n\x0b\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")
    without_vllm = RuntimeRegistry({n: r for n, r in registry.runtimes.items() if n != "vllm"})
    assert without_vllm.detect(folder) == "transformers"
    put(artifacts, "xgb_ubj", tmp_path / "x", "model.model")  # still XGBoost's own suffix
    assert registry.detect(tmp_path / "x") == "xgboost"


# ----------------------------------------------------------------------------- versions


def make_versions(artifacts, folder: Path, versions: list[str]) -> None:
    for version in versions:
        put(artifacts, "logistic", folder / version, "model.joblib")


def test_numeric_version_folders_sorted_numerically(artifacts, repo, repo_root):
    make_versions(artifacts, repo_root / "iris", ["2", "10", "1"])
    (repo_root / "iris" / "notes").mkdir()  # not a version
    write(repo_root / "iris" / "README.md", "docs")
    model = repo.scan()["iris"]
    assert model.error is None
    assert list(model.versions) == ["1", "2", "10"]
    assert model.served == ["10"]  # latest by default
    for version, spec in model.versions.items():
        assert spec.version == version
        assert spec.path == repo_root.resolve() / "iris" / version
        assert spec.runtime == "sklearn"


@pytest.mark.parametrize(
    "policy, served",
    [("latest", ["10"]), ("all", ["10", "2", "1"]), ("2", ["10", "2"]), ("5", ["10", "2", "1"]),
     ("[1, 10]", ["10", "1"]), ("['2']", ["2"]), ("[7]", [])],
)
def test_version_policies_from_model_yaml(artifacts, repo, repo_root, policy, served):
    make_versions(artifacts, repo_root / "iris", ["1", "2", "10"])
    write(repo_root / "iris" / MODEL_YAML, f"versions: {policy}\n")
    model = repo.scan()["iris"]
    assert model.error is None
    assert list(model.versions) == ["1", "2", "10"]
    assert model.served == served


@pytest.mark.parametrize(
    "policy, served",
    [("latest", ["3"]), ("all", ["3", "2", "1"]), (1, ["3"]), (2, ["3", "2"]),
     (["1", "3"], ["3", "1"]), (["4"], [])],
)
def test_select_versions(policy, served):
    assert select_versions(["1", "2", "3"], policy) == served


def test_folder_without_version_subfolders_is_version_1(artifacts, repo, repo_root):
    put(artifacts, "xgb_ubj", repo_root / "flat", "model.ubj")
    (repo_root / "flat" / "v2").mkdir()  # not numeric: not a version
    model = repo.scan()["flat"]
    spec = only_version(model)
    assert spec.path == repo_root.resolve() / "flat"
    assert model.served == ["1"]


def test_version_folder_with_undetectable_files_is_an_error(artifacts, repo, repo_root):
    put(artifacts, "logistic", repo_root / "iris" / "1", "model.joblib")
    (repo_root / "iris" / "2").mkdir()
    model = repo.scan()["iris"]
    assert model.error is not None
    assert "no installed runtime recognises the files []" in model.error


def test_odd_digit_folder_name_does_not_break_the_scan(artifacts, repo, repo_root):
    put(artifacts, "logistic", repo_root / "good", "model.joblib")
    put(artifacts, "logistic", repo_root / "odd" / "²", "model.joblib")
    models = repo.scan()
    assert models["good"].error is None


# ----------------------------------------------------------------------------- model.yaml


def test_model_yaml_full(artifacts, repo, repo_root):
    folder = repo_root / "iris"
    make_versions(artifacts, folder, ["1", "2", "3"])
    write(folder / MODEL_YAML, """\
runtime: sklearn
uri: model.joblib
versions: 2
batching:
  max_batch_size: 8
  max_delay_ms: 2.5
  max_queue: 10
  preferred_batch_sizes: [4, 8]
memory: 1MiB
load: lazy
pinned: true
timeout_s: 1.5
inputs:
  - {name: x, datatype: FP32, shape: [-1, 4]}
outputs:
  - {name: predict, datatype: INT64, shape: [-1]}
parameters:
  nthread: 1
""")
    model = repo.scan()["iris"]
    assert model.error is None
    assert model.served == ["3", "2"]
    spec = model.versions["3"]
    assert spec.source == MODEL_YAML
    assert spec.runtime == "sklearn"
    assert spec.artifact == repo_root.resolve() / "iris" / "3" / "model.joblib"
    assert spec.artifact.is_file()
    config = spec.config
    assert config.versions == 2
    assert config.batching.max_batch_size == 8
    assert config.batching.max_delay_ms == 2.5
    assert config.batching.max_queue == 10
    assert config.batching.preferred_batch_sizes == [4, 8]
    assert config.memory == 1024**2
    assert config.load == "lazy"
    assert config.pinned is True
    assert config.timeout_s == 1.5
    assert [t.to_spec().to_json() for t in config.inputs] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 4]}
    ]
    assert config.outputs[0].to_spec().to_json() == {
        "name": "predict", "datatype": "INT64", "shape": [-1]
    }
    assert config.parameters == {"nthread": 1}


def test_empty_model_yaml_means_defaults_and_detection(artifacts, repo, repo_root):
    put(artifacts, "xgb_json", repo_root / "cancer", "model.json")
    write(repo_root / "cancer" / MODEL_YAML, "")
    spec = only_version(repo.scan()["cancer"])
    assert spec.runtime == "xgboost"
    assert spec.source == MODEL_YAML
    assert spec.config == ModelConfig()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("runtime: sklearn\nfoo: 1\n", "bad/model.yaml: foo: Extra inputs are not permitted"),
        ("batching:\n  max_batch: 4\n", "bad/model.yaml: batching.max_batch: Extra inputs"),
        ("runtime: [sklearn\n", "bad/model.yaml is not valid YAML"),
        ("runtime: a\n  b: c\n", "bad/model.yaml is not valid YAML"),
        ("- sklearn\n- xgboost\n", "bad/model.yaml must be a mapping"),
        ("just text\n", "bad/model.yaml must be a mapping"),
        ("versions: 0\n", "bad/model.yaml: versions"),
        ("versions: newest\n", "bad/model.yaml: versions"),
        ("versions: true\n", "bad/model.yaml: versions"),
        ("versions: '2'\n", "bad/model.yaml: versions"),
        ("versions: []\n", "a version list names version numbers, at least one"),
        ("versions: [1, latest]\n", "a version list names version numbers, at least one"),
        ("batching: {preferred_batch_sizes: [0, 8]}\n", "preferred_batch_sizes [0] must be at least 1"),
        ("batching: {max_batch_size: 16, preferred_batch_sizes: [8, 32]}\n",
         "preferred_batch_sizes [32] must be from 1 to max_batch_size 16"),
        ("inputs: [{name: x, datatype: FP32, shape: [-7]}]\n", "a dimension is a size from 0, or -1"),
        ("batching: {max_batch_size: 0}\n", "bad/model.yaml: batching.max_batch_size"),
        ("batching: {max_delay_ms: -1}\n", "bad/model.yaml: batching.max_delay_ms"),
        ("load: sometimes\n", "bad/model.yaml: load"),
        ("timeout_s: 0\n", "bad/model.yaml: timeout_s"),
        ("memory: lots\n", "bad/model.yaml: memory"),
        ("pinned: perhaps\n", "bad/model.yaml: pinned"),
        ("inputs: [{name: x, datatype: FLOAT, shape: [4]}]\n", "unknown datatype 'FLOAT'"),
        ("inputs: [{name: x, datatype: FP32}]\n", "bad/model.yaml: inputs.0.shape"),
    ],
)
def test_model_yaml_errors_are_reported_per_model(artifacts, repo, repo_root, text, expected):
    put(artifacts, "logistic", repo_root / "bad", "model.joblib")
    write(repo_root / "bad" / MODEL_YAML, text)
    put(artifacts, "logistic", repo_root / "good", "model.joblib")
    write(repo_root / "good" / MODEL_YAML, "runtime: sklearn\n")
    models = repo.scan()
    assert sorted(models) == ["bad", "good"]
    bad = models["bad"]
    assert bad.error is not None
    assert expected in bad.error
    assert bad.versions == {}
    assert bad.served == []
    assert only_version(models["good"]).runtime == "sklearn"


def test_runtime_not_installed_still_gives_a_spec(artifacts, repo, repo_root, registry):
    put(artifacts, "logistic", repo_root / "future", "model.joblib")
    write(repo_root / "future" / MODEL_YAML, "runtime: nosuch\n")
    spec = only_version(repo.scan()["future"])
    assert spec.runtime == "nosuch"
    with pytest.raises(LookupError, match="runtime 'nosuch' is not installed"):
        registry.get(spec.runtime)


def test_model_yaml_runtime_overrides_detection(artifacts, repo, repo_root):
    put(artifacts, "xgb_ubj", repo_root / "m", "model.ubj")
    write(repo_root / "m" / MODEL_YAML, "runtime: sklearn\n")
    assert only_version(repo.scan()["m"]).runtime == "sklearn"


def test_model_yaml_with_undetectable_files_and_explicit_runtime(artifacts, repo, repo_root):
    put(artifacts, "hf_config", repo_root / "bert", "config.json")
    write(repo_root / "bert" / MODEL_YAML, "runtime: transformers\n")
    assert only_version(repo.scan()["bert"]).runtime == "transformers"


def test_model_yaml_wins_over_mlserver_settings(artifacts, repo, repo_root):
    folder = repo_root / "iris"
    put(artifacts, "logistic", folder, "model.joblib")
    write(folder / MODEL_YAML, "pinned: true\n")
    write(folder / MLSERVER_SETTINGS, json.dumps({"name": "other", "max_batch_size": 4}))
    models = repo.scan()
    assert list(models) == ["iris"]
    spec = only_version(models["iris"])
    assert spec.source == MODEL_YAML
    assert spec.config.pinned is True
    assert spec.config.batching.max_batch_size is None


# ----------------------------------------------------------------------------- MLServer settings


def test_mlserver_settings_mapping(artifacts, repo, repo_root):
    folder = repo_root / "mls-folder"
    put(artifacts, "logistic", folder, "classifier.joblib")
    write(folder / MLSERVER_SETTINGS, json.dumps({
        "name": "renamed",
        "implementation": "mlserver_sklearn.SKLearnModel",
        "max_batch_size": 16,
        "max_batch_time": 0.5,
        "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, 4],
                    "parameters": {"content_type": "np"}}],
        "outputs": [{"name": "predict", "datatype": "INT64", "shape": [-1]}],
        "parameters": {"uri": "./classifier.joblib", "version": "v0.1.0", "extra": {"k": 1}},
    }))
    models = repo.scan()
    assert list(models) == ["renamed"]
    model = models["renamed"]
    assert model.error is None
    assert model.folder == repo_root.resolve() / "mls-folder"
    assert list(model.versions) == ["v0.1.0"]
    assert model.served == ["v0.1.0"]
    spec = model.versions["v0.1.0"]
    assert spec.name == "renamed"
    assert spec.version == "v0.1.0"
    assert spec.runtime == "sklearn"
    assert spec.source == MLSERVER_SETTINGS
    assert spec.config.uri == "./classifier.joblib"
    assert spec.artifact.resolve() == (folder / "classifier.joblib").resolve()
    assert spec.config.batching.max_batch_size == 16
    assert spec.config.batching.max_delay_ms == 500.0
    assert spec.config.parameters == {"k": 1}
    assert [t.to_spec().to_json() for t in spec.config.inputs] == [
        {"name": "input-0", "datatype": "FP32", "shape": [-1, 4]}
    ]
    assert [t.to_spec().to_json() for t in spec.config.outputs] == [
        {"name": "predict", "datatype": "INT64", "shape": [-1]}
    ]
    assert repo.read("renamed").versions["v0.1.0"].runtime == "sklearn"


def test_mlserver_numeric_version_and_xgboost(artifacts, repo, repo_root):
    folder = repo_root / "cancer"
    put(artifacts, "xgb_json", folder, "model.json")
    write(folder / MLSERVER_SETTINGS, json.dumps({
        "implementation": "mlserver_xgboost.XGBoostModel",
        "max_batch_size": 4,
        "parameters": {"version": 3},
    }))
    model = repo.scan()["cancer"]
    assert model.error is None
    assert list(model.versions) == ["3"]
    spec = model.versions["3"]
    assert spec.runtime == "xgboost"
    assert spec.config.batching.max_batch_size == 4
    assert spec.config.batching.max_delay_ms == 0.0  # no max_batch_time
    assert spec.config.uri is None


def test_mlserver_without_implementation_is_detected(artifacts, repo, repo_root):
    folder = repo_root / "iris"
    put(artifacts, "logistic", folder, "model.joblib")
    write(folder / MLSERVER_SETTINGS, json.dumps({"name": "iris"}))
    spec = only_version(repo.scan()["iris"])
    assert spec.runtime == "sklearn"
    assert spec.source == MLSERVER_SETTINGS
    assert spec.config.batching.max_batch_size is None


def test_mlserver_numeric_version_folders_are_kept(artifacts, repo, repo_root):
    folder = repo_root / "iris"
    make_versions(artifacts, folder, ["1", "2"])
    write(folder / MLSERVER_SETTINGS, json.dumps({"parameters": {"version": "9"}}))
    model = repo.scan()["iris"]
    assert list(model.versions) == ["1", "2"]
    assert model.served == ["2"]


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"implementation": "mlserver_lightgbm.LightGBMModel"},
         "MLServer implementation 'mlserver_lightgbm.LightGBMModel' has no mmserver runtime"),
        ({"implementation": "my_package.MyModel"}, "has no mmserver runtime"),
        ("{not json", "bad/model-settings.json is not valid JSON"),
        ([1, 2], "bad/model-settings.json must be a JSON object"),
        ({"parameters": [1]}, "bad/model-settings.json: 'parameters' must be an object"),
        ({"max_batch_size": "8"}, "max_batch_size must be an integer"),
        ({"max_batch_size": 8, "max_batch_time": "1s"}, "max_batch_time a number"),
        ({"max_batch_size": 8, "max_batch_time": -1}, "batching.max_delay_ms"),
        ({"inputs": [{"name": "x", "datatype": "FLOAT32", "shape": [1]}]},
         "unknown datatype 'FLOAT32'"),
        ({"name": "../escape"}, "invalid model name '../escape'"),
    ],
)
def test_mlserver_settings_errors(artifacts, repo, repo_root, settings, expected):
    put(artifacts, "logistic", repo_root / "bad", "model.joblib")
    text = settings if isinstance(settings, str) else json.dumps(settings)
    write(repo_root / "bad" / MLSERVER_SETTINGS, text)
    put(artifacts, "logistic", repo_root / "good", "model.joblib")
    models = repo.scan()
    assert models["bad"].error is not None
    assert expected in models["bad"].error
    assert models["bad"].versions == {}
    assert only_version(models["good"]).runtime == "sklearn"


def test_mlserver_unsupported_implementation_lists_the_supported_ones(artifacts, repo, repo_root):
    put(artifacts, "logistic", repo_root / "bad", "model.joblib")
    write(repo_root / "bad" / MLSERVER_SETTINGS,
          json.dumps({"implementation": "mlserver_mllib.MLlibModel"}))
    error = repo.scan()["bad"].error
    assert "mlserver_sklearn.SKLearnModel" in error
    assert "mlserver_xgboost.XGBoostModel" in error


def test_duplicate_model_name_is_reported(artifacts, repo, repo_root):
    put(artifacts, "logistic", repo_root / "a", "model.joblib")
    write(repo_root / "a" / MLSERVER_SETTINGS, json.dumps({"name": "shared"}))
    put(artifacts, "logistic", repo_root / "b", "model.joblib")
    write(repo_root / "b" / MLSERVER_SETTINGS, json.dumps({"name": "shared"}))
    models = repo.scan()
    assert models["shared"].folder.name == "a"
    assert models["shared"].error is None
    assert models["b/"].error == "model name 'shared' is already used by a/"


def test_duplicate_name_does_not_drop_the_first_model(artifacts, repo, repo_root):
    put(artifacts, "logistic", repo_root / "a", "model.joblib")
    write(repo_root / "a" / MLSERVER_SETTINGS, json.dumps({"name": "b"}))
    put(artifacts, "logistic", repo_root / "b", "model.joblib")
    models = repo.scan()
    assert any(m.folder.name == "a" and m.error is None for m in models.values())


# ----------------------------------------------------------------------------- names and layout


@pytest.mark.parametrize(
    "name",
    ["..", ".", "/", "a/b", "../iris", "%2F", "..%2F..", "a%2Fb", "a\\b", "", " ", "a b",
     ".hidden", "-lead", "_lead", "a" * 129, "iris\x00", "modèle", "a:b"],
)
def test_check_name_refuses(name):
    with pytest.raises(InvalidInput) as info:
        check_name(name)
    assert f"invalid model name {name!r}" in info.value.message


@pytest.mark.parametrize("name", ["iris", "A", "model-1.0_x", "a" * 128, "7", "a..b"])
def test_check_name_accepts(name):
    assert check_name(name) == name


def test_check_name_refuses_trailing_newline():
    with pytest.raises(InvalidInput):
        check_name("iris\n")


@pytest.mark.parametrize("folder_name", ["bad name", "-lead", "modèle", "a%2Fb"])
def test_invalid_folder_names_are_errors(artifacts, repo, repo_root, folder_name):
    put(artifacts, "logistic", repo_root / folder_name, "model.joblib")
    put(artifacts, "logistic", repo_root / "good", "model.joblib")
    models = repo.scan()
    assert sorted(models) == sorted([folder_name, "good"])
    assert models[folder_name].versions == {}
    assert f"invalid model name {folder_name!r}" in models[folder_name].error
    assert models["good"].error is None


def test_symlinked_model_folder_outside_the_repository(artifacts, repo, repo_root, tmp_path):
    outside = tmp_path / "outside" / "model"
    put(artifacts, "logistic", outside, "model.joblib")
    os.symlink(outside, repo_root / "escape", target_is_directory=True)
    put(artifacts, "logistic", repo_root / "good", "model.joblib")
    models = repo.scan()
    assert "escape" not in models  # refused outright: not a model of this repository
    assert models["good"].error is None


def test_symlinked_version_folder_outside_the_repository(artifacts, repo, repo_root, tmp_path):
    outside = tmp_path / "outside" / "v"
    put(artifacts, "logistic", outside, "model.joblib")
    put(artifacts, "logistic", repo_root / "iris" / "1", "model.joblib")
    os.symlink(outside, repo_root / "iris" / "2", target_is_directory=True)
    model = repo.scan()["iris"]
    assert model.error == "iris/2/ points outside the model repository"
    assert model.versions == {}


@pytest.mark.parametrize("where", ["iris/model.joblib", "iris/1/model.joblib", "iris/1/weights/model.joblib",
                                   "iris/.model.joblib"])  # (the runtimes find hidden model files too)
def test_a_model_file_linked_out_of_the_repository_is_refused_before_it_is_read(artifacts, repo, repo_root, tmp_path, where):
    # a pickle is code: the link's target would run when the runtime loads it
    outside = tmp_path / "outside" / "model.joblib"
    put(artifacts, "logistic", outside.parent, outside.name)
    link = repo_root / where
    link.parent.mkdir(parents=True)
    os.symlink(outside, link)
    if "weights" in where:  # a file in a sub-folder of the version
        write(repo_root / "iris" / "model.yaml", "runtime: sklearn\n")
    model = repo.scan()["iris"]
    assert model.error == f"iris/{where.removeprefix('iris/')} points outside the model repository"
    assert model.versions == {}


def test_a_folder_inside_a_version_linked_out_of_the_repository_is_refused(artifacts, repo, repo_root, tmp_path):
    outside = tmp_path / "outside" / "tokenizer"
    outside.mkdir(parents=True)
    put(artifacts, "logistic", repo_root / "iris" / "1", "model.joblib")
    os.symlink(outside, repo_root / "iris" / "1" / "tokenizer", target_is_directory=True)
    assert repo.scan()["iris"].error == "iris/1/tokenizer points outside the model repository"


@pytest.mark.parametrize("links", [{"loop": "loop"}, {"a": "b", "b": "a"}, {"2": "2"}])
def test_a_symlink_loop_in_a_model_folder_is_that_models_reason_not_a_failed_scan(artifacts, repo, repo_root, links):
    put(artifacts, "logistic", repo_root / "bad", "model.joblib")
    for name, target in links.items():
        os.symlink(target, repo_root / "bad" / name)
    put(artifacts, "logistic", repo_root / "good", "model.joblib")
    models = repo.scan()  # pathlib's resolve() raises RuntimeError on a loop (Python 3.11, 3.12; not 3.13)
    assert models["bad"].error is None or "Symlink loop" in models["bad"].error
    assert only_version(models["good"]).runtime == "sklearn"


def test_symlink_inside_the_repository_is_allowed(artifacts, repo, repo_root):
    put(artifacts, "logistic", repo_root / "iris", "model.joblib")
    os.symlink(repo_root / "iris", repo_root / "alias", target_is_directory=True)
    os.symlink(repo_root / "iris" / "model.joblib", repo_root / "iris" / "same.joblib")
    models = repo.scan()
    assert sorted(models) == ["alias", "iris"]
    assert only_version(models["alias"]).runtime == "sklearn"


def test_hidden_folders_and_plain_files_are_skipped(artifacts, repo, repo_root):
    put(artifacts, "logistic", repo_root / "iris", "model.joblib")
    put(artifacts, "logistic", repo_root / ".hidden", "model.joblib")
    (repo_root / ".git" / "objects").mkdir(parents=True)
    write(repo_root / "README.md", "models")
    shutil.copy(artifacts["logistic"], repo_root / "stray.joblib")
    os.symlink(repo_root / "nowhere", repo_root / "dangling")
    assert list(repo.scan()) == ["iris"]


def test_scan_of_missing_root(registry, tmp_path):
    with pytest.raises(InvalidInput, match="is not a directory"):
        Repository(tmp_path / "missing", registry).scan()


def test_read_one_model(artifacts, repo, repo_root):
    make_versions(artifacts, repo_root / "iris", ["1", "2"])
    put(artifacts, "xgb_ubj", repo_root / "cancer", "model.ubj")
    model = repo.read("cancer")
    assert model.name == "cancer"
    assert only_version(model).runtime == "xgboost"
    assert repo.read("iris").served == ["2"]


def test_read_unknown_model(artifacts, repo, repo_root):
    put(artifacts, "logistic", repo_root / "iris", "model.joblib")
    with pytest.raises(ModelNotFound) as info:
        repo.read("nosuch")
    assert "model 'nosuch' is not in the repository" in info.value.message


def test_read_refuses_hidden_names_but_not_dotted_ones(artifacts, repo, repo_root):
    put(artifacts, "logistic", repo_root / "x.hidden", "model.joblib")
    put(artifacts, "logistic", repo_root / ".secret", "model.joblib")
    with pytest.raises(InvalidInput):
        repo.read(".secret")
    assert repo.read("x.hidden").error is None


@pytest.mark.parametrize("name", ["..", "../repo", "a/b", "%2F"])
def test_read_refuses_bad_names(repo, name):
    with pytest.raises(InvalidInput, match="invalid model name"):
        repo.read(name)


def test_read_sees_changes_on_disk(artifacts, repo, repo_root):
    put(artifacts, "logistic", repo_root / "iris" / "1", "model.joblib")
    assert repo.read("iris").served == ["1"]
    put(artifacts, "logistic", repo_root / "iris" / "2", "model.joblib")
    assert repo.read("iris").served == ["2"]


# ----------------------------------------------------------------------------- what tells files apart


def test_a_versions_spec_changes_with_its_files_and_not_with_hidden_ones(artifacts, repo, repo_root):
    put(artifacts, "logistic", repo_root / "m" / "1", "model.joblib")
    before = repo.scan()["m"].versions["1"]
    assert before.files and repo.scan()["m"].versions["1"] == before  # nothing changed: the same spec
    write(repo_root / "m" / "1" / ".lock", "x")  # hidden files (tool state) do not count
    assert repo.scan()["m"].versions["1"] == before
    put(artifacts, "forest", repo_root / "m" / "1", "model.joblib")  # new files, same folder
    assert repo.scan()["m"].versions["1"] != before


@pytest.mark.parametrize(("name", "content"), [
    ("model.yaml", "# mod\xe8le\nruntime: sklearn\n".encode("latin-1")),  # saved by a Latin-1 editor
    ("model.yaml", b'runtime: sklearn\nuri: "model\\0.joblib"\n'),  # a NUL in the uri
    ("model-settings.json", json.dumps({"parameters": {"uri": "m\u0000.joblib"}}).encode()),
    ("model.yaml", ("parameters: {a: " + "[" * 3000 + "]" * 3000 + "}\n").encode()),  # nested too deep
    ("model-settings.json", ('{"parameters": {"extra": {"a": ' + "[" * 100000 + "]" * 100000 + "}}}").encode()),
])
def test_a_config_that_cannot_be_read_is_that_models_reason_not_a_failed_scan(artifacts, repo, repo_root,
                                                                               name, content):
    put(artifacts, "logistic", repo_root / "bad", "model.joblib")
    (repo_root / "bad" / name).write_bytes(content)
    put(artifacts, "logistic", repo_root / "good", "model.joblib")
    models = repo.scan()
    assert models["bad"].error and models["good"].error is None


def test_the_files_of_a_folder_removed_while_they_are_listed_are_left_out(tmp_path, monkeypatch):
    from mmserver import repository

    for version in ("1", "2"):
        write(tmp_path / "m" / version / "model.joblib", "x")
    walk = os.walk

    def racing_walk(top, *args, **kwargs):  # the operator's rm -rf m/2 completes mid-walk
        for i, step in enumerate(walk(top, *args, **kwargs)):
            if i == 1:
                shutil.rmtree(tmp_path / "m" / ("2" if step[0].endswith("1") else "1"))
            yield step

    monkeypatch.setattr(repository.os, "walk", racing_walk)
    files = repository.files_of(tmp_path / "m")
    assert len(files) == 1 and next(iter(files))[0].endswith("model.joblib")
