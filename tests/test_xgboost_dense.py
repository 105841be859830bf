"""The XGBoost runtime's C API path (one proxy DMatrix per model) answers exactly what
``Booster.inplace_predict`` does, for every objective, batch size and missing value."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xgboost as xgb
from xgboost.core import XGBoostError

from mmserver_xgboost import XGBoostModel
from mmserver_xgboost.dense import ROWS_PER_THREAD, dense_predictor

FEATURES = 9


def _data(rows: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(rows, FEATURES)).astype(np.float32)
    x[::5, 2] = np.nan
    return x


def _train(objective: str, **params) -> xgb.Booster:
    x = _data(400, 0)
    signal = np.nan_to_num(x[:, 0]) + x[:, 1] * x[:, 3]
    if objective.startswith("multi:"):
        label, params = np.digitize(signal, [-1.0, 0.0, 1.0]), {"num_class": 4, **params}
    elif objective.startswith("binary:"):
        label = signal > 0
    else:
        label = signal
    return xgb.train({"objective": objective, "max_depth": 4, "nthread": 1, **params},
                     xgb.DMatrix(x, label=label), num_boost_round=30)


OBJECTIVES = ["binary:logistic", "binary:logitraw", "multi:softprob", "multi:softmax", "reg:squarederror"]


@pytest.fixture(scope="module", params=OBJECTIVES)
def booster(request):
    return _train(request.param)


@pytest.mark.parametrize("rows", [1, 7, 64, 300, 1000])
def test_the_c_api_path_is_bit_identical_to_inplace_predict(booster, rows):
    predictor = dense_predictor(booster, threads=2)
    assert predictor is not None
    try:
        matrix = _data(rows, seed=rows)
        ours = predictor(matrix)
        own = booster.inplace_predict(matrix, validate_features=False)
        assert ours.dtype == own.dtype and ours.shape == own.shape
        np.testing.assert_array_equal(ours, own)
    finally:
        predictor.close()


def _threads(booster: xgb.Booster) -> int:
    return int(json.loads(booster.save_config())["learner"]["generic_param"]["nthread"])


def test_small_batches_use_one_thread_and_large_ones_the_configured_count():
    booster = _train("binary:logistic")
    predictor = dense_predictor(booster, threads=3)
    assert predictor is not None
    predictor(_data(ROWS_PER_THREAD - 1, 1))
    assert _threads(booster) == 1
    predictor(_data(2 * ROWS_PER_THREAD, 2))
    assert _threads(booster) == 2
    predictor(_data(100 * ROWS_PER_THREAD, 3))
    assert _threads(booster) == 3
    predictor.close()
    predictor.close()  # a second close is harmless


def test_the_runtime_uses_the_c_api_path_and_answers_as_the_classifier_does():
    x = _data(300, 4)
    classifier = xgb.XGBClassifier(n_estimators=20, max_depth=3, n_jobs=1).fit(x, np.nan_to_num(x[:, 0]) > 0)
    model = XGBoostModel(classifier.get_booster(), host_bytes=0, threads=2)
    assert model._dense is not None
    rows = _data(50, 5)
    result = model.predict(rows, ["predict", "predict_proba"])
    np.testing.assert_array_equal(result["predict"], classifier.predict(rows))
    np.testing.assert_array_equal(result["predict_proba"], classifier.predict_proba(rows))


def test_an_early_stopped_classifier_answers_with_its_best_rounds_as_the_classifier_does(tmp_path):
    from mmserver_xgboost import _load

    x = _data(400, 6)
    y = np.nan_to_num(x[:, 0]) + np.random.default_rng(0).normal(size=400) > 0
    classifier = xgb.XGBClassifier(n_estimators=200, early_stopping_rounds=5, learning_rate=0.3, n_jobs=1)
    classifier.fit(x[:300], y[:300], eval_set=[(x[300:], y[300:])], verbose=False)
    assert classifier.best_iteration + 1 < classifier.get_booster().num_boosted_rounds()
    classifier.save_model(tmp_path / "model.json")
    model = _load(tmp_path / "model.json", threads=2)
    assert model.booster.num_boosted_rounds() == classifier.best_iteration + 1
    rows = _data(50, 7)
    result = model.predict(rows, ["predict", "predict_proba"])
    np.testing.assert_array_equal(result["predict"], classifier.predict(rows))
    np.testing.assert_allclose(result["predict_proba"], classifier.predict_proba(rows), rtol=1e-6)


def test_multi_label_classifiers_and_multi_output_regressors_answer_a_column_per_target():
    x = np.nan_to_num(_data(300, 8))
    labels = np.column_stack([x[:, 0] > 0, x[:, 1] > 0, x[:, 2] > 0]).astype(int)
    classifier = xgb.XGBClassifier(n_estimators=5, n_jobs=1).fit(x, labels)
    model = XGBoostModel(classifier.get_booster(), host_bytes=0)
    assert [(o.name, o.shape) for o in model.metadata().outputs] == [("predict", (-1, 3)), ("predict_proba", (-1, 3))]
    result = model.predict(x[:40], ["predict", "predict_proba"])
    np.testing.assert_array_equal(result["predict"], classifier.predict(x[:40]).astype(np.int64))
    np.testing.assert_allclose(result["predict_proba"], classifier.predict_proba(x[:40]), rtol=1e-6)
    regressor = xgb.XGBRegressor(n_estimators=5, n_jobs=1).fit(x, labels.astype(float))
    model = XGBoostModel(regressor.get_booster(), host_bytes=0)
    assert [(o.name, o.shape) for o in model.metadata().outputs] == [("predict", (-1, 3))]
    np.testing.assert_allclose(model.predict(x[:40], ["predict"])["predict"], regressor.predict(x[:40]), rtol=1e-6)


def test_a_booster_whose_own_answer_differs_keeps_inplace_predict():
    booster = _train("reg:squarederror")
    own = booster.inplace_predict
    # Stands in for an XGBoost release whose C function no longer matches inplace_predict: the
    # booster's own answer is nudged by one rounding step, so the load-time probe must disagree.
    booster.inplace_predict = lambda matrix, **kw: np.nextafter(own(matrix, **kw), np.float32(np.inf))
    assert dense_predictor(booster, threads=2) is None
    assert _threads(booster) == 2  # the configured count is back


def test_an_error_in_xgboost_is_raised_with_its_message():
    booster = _train("binary:logistic")
    predictor = dense_predictor(booster, threads=1)
    assert predictor is not None
    with pytest.raises(XGBoostError, match="feature"):
        predictor(np.zeros((2, FEATURES + 3), dtype=np.float32))
    np.testing.assert_array_equal(predictor(_data(3, 6)), booster.inplace_predict(_data(3, 6)))
    predictor.close()
