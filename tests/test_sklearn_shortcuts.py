"""The scikit-learn runtime's shortcuts (the tree ensembles' and linear models' fast paths,
predict taken from predict_proba) answer exactly what the estimator itself does."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import (
    ExtraTreesClassifier,
    ExtraTreesRegressor,
    GradientBoostingClassifier,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import ElasticNet, Lasso, LinearRegression, LogisticRegression, Ridge, SGDClassifier
from sklearn.svm import LinearSVC
from sklearn.decomposition import PCA
from sklearn.multioutput import MultiOutputRegressor
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from mmserver_sklearn import SKLearnModel
from mmserver_sklearn.forest import forest_predictor
from mmserver_sklearn.linear import linear_predictor


def _data(n_features: int = 12, rows: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, n_features))
    return x, x[:, 0] + 0.5 * x[:, 1] ** 2 - x[:, 2] + rng.normal(scale=0.3, size=rows)


def _classes(target: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return labels[np.digitize(target, np.quantile(target, np.linspace(0, 1, len(labels) + 1)[1:-1]))]


FORESTS = {
    "rf-binary": lambda x, t: RandomForestClassifier(n_estimators=40, random_state=0).fit(x, t > 0),
    "rf-4-classes": lambda x, t: RandomForestClassifier(n_estimators=30, random_state=1).fit(
        x, _classes(t, np.array([3, 5, 7, 11]))),
    "et-string-labels": lambda x, t: ExtraTreesClassifier(n_estimators=25, random_state=2).fit(
        x, _classes(t, np.array(["low", "mid", "high"]))),
    "rf-regressor": lambda x, t: RandomForestRegressor(n_estimators=30, random_state=3).fit(x, t),
    "et-regressor": lambda x, t: ExtraTreesRegressor(n_estimators=20, max_depth=6, random_state=4).fit(x, t),
}


def _fitted(builders: dict):
    """A module fixture: each of ``builders`` fitted on the same data."""
    @pytest.fixture(scope="module", params=sorted(builders))
    def fixture(request):
        x, target = _data()
        return builders[request.param](x, target)
    return fixture


forest = _fitted(FORESTS)


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_fast_path_is_bit_identical_to_the_estimator(forest, rows):
    predictor = forest_predictor(forest)
    assert predictor is not None
    x, _ = _data(seed=rows)
    matrix = x[:rows].astype(np.float32)
    own = forest.predict_proba(matrix) if hasattr(forest, "classes_") else forest.predict(matrix)
    np.testing.assert_array_equal(predictor(matrix), own)


def test_the_runtime_answers_both_outputs_as_the_estimator_does(forest):
    model = SKLearnModel(forest, host_bytes=0)
    assert model._forest is not None
    x, _ = _data(seed=9)
    matrix = x[:50].astype(np.float32)
    names = [spec.name for spec in model.metadata().outputs]
    result = model.predict(matrix, names)
    np.testing.assert_array_equal(result["predict"], forest.predict(matrix))
    if "predict_proba" in names:
        np.testing.assert_array_equal(result["predict_proba"], forest.predict_proba(matrix))


def test_missing_values_follow_the_trees_own_rules():
    x, target = _data()
    x[::7, 3] = np.nan
    forest = RandomForestClassifier(n_estimators=20, random_state=0).fit(x, target > 0)
    predictor = forest_predictor(forest)
    assert predictor is not None
    probe = _data(seed=5)[0][:40].astype(np.float32)
    probe[::3, 3] = np.nan
    np.testing.assert_array_equal(predictor(probe), forest.predict_proba(probe))


@pytest.mark.parametrize("build", [
    pytest.param(lambda x, t: RandomForestClassifier(n_estimators=5, n_jobs=2).fit(x, t > 0), id="parallel"),
    pytest.param(lambda x, t: RandomForestRegressor(n_estimators=5).fit(x, np.column_stack([t, -t])),
                 id="two-outputs"),
    pytest.param(lambda x, t: make_pipeline(StandardScaler(), RandomForestClassifier(n_estimators=5)).fit(x, t > 0),
                 id="pipeline"),
    pytest.param(lambda x, t: GradientBoostingClassifier(n_estimators=5).fit(x, t > 0), id="boosting"),
])
def test_estimators_outside_its_scope_keep_their_own_methods(build):
    x, target = _data(rows=200)
    assert forest_predictor(build(x, target)) is None


def test_a_forest_whose_own_answer_differs_keeps_its_own_methods():
    x, target = _data(rows=200)
    forest = RandomForestClassifier(n_estimators=5, random_state=0).fit(x, target > 0)
    # Stands in for a scikit-learn release whose trees store values the fast path does not
    # reproduce: the estimator's own answer is shifted, so the load-time probe must disagree.
    own = forest.predict_proba
    forest.predict_proba = lambda matrix: own(matrix) * 0.5
    assert forest_predictor(forest) is None


# ----------------------------------------------------------------------------- linear models

LINEAR = {
    "lr-binary": lambda x, t: LogisticRegression().fit(x, t > 0),
    "lr-3-classes": lambda x, t: LogisticRegression(max_iter=500).fit(x, _classes(t, np.arange(3))),
    "lr-string-labels": lambda x, t: LogisticRegression(C=0.1).fit(x, _classes(t, np.array(["a", "b", "c", "d"]))),
    "lr-liblinear-ovr": lambda x, t: LogisticRegression(solver="liblinear").fit(x, t > 1),
    "linear-regression": lambda x, t: LinearRegression().fit(x, t),
    "ridge": lambda x, t: Ridge(alpha=2.0).fit(x, t),
    "lasso": lambda x, t: Lasso(alpha=0.05).fit(x, t),
    "elastic-net": lambda x, t: ElasticNet(alpha=0.05, fit_intercept=False).fit(x, t),
    "scaled-lr": lambda x, t: make_pipeline(StandardScaler(), LogisticRegression()).fit(x, _classes(t, np.arange(3))),
    "scaled-twice-ridge": lambda x, t: Pipeline([
        ("center", StandardScaler(with_std=False)), ("skip", "passthrough"),
        ("scale", StandardScaler(with_mean=False)), ("ridge", Ridge())]).fit(x * 50.0 + 3.0, t),
}


linear = _fitted(LINEAR)


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_linear_fast_path_is_bit_identical_to_the_estimator(linear, rows):
    predictor = linear_predictor(linear, np.dtype(np.float64))
    assert predictor is not None
    matrix = _data(seed=rows, rows=max(rows, 10))[0][:rows] * 3.0
    outputs = ["predict", "predict_proba"] if hasattr(linear, "classes_") else ["predict"]
    ours = predictor(matrix, outputs)
    for name in outputs:
        own = getattr(linear, name)(matrix)
        assert ours[name].dtype == own.dtype
        np.testing.assert_array_equal(ours[name], own)


def test_the_runtime_serves_linear_models_through_the_fast_path(linear):
    model = SKLearnModel(linear, host_bytes=0)
    assert model._linear is not None
    matrix = _data(seed=21)[0][:40]
    names = [spec.name for spec in model.metadata().outputs]
    for asked in ([name] for name in names):  # each output alone, then all together
        np.testing.assert_array_equal(model.predict(matrix, asked)[asked[0]], getattr(linear, asked[0])(matrix))
    result = model.predict(matrix, names)
    for name in names:
        np.testing.assert_array_equal(result[name], getattr(linear, name)(matrix))


@pytest.mark.parametrize("build", [
    pytest.param(lambda x, t: make_pipeline(MinMaxScaler(), LogisticRegression()).fit(x, t > 0), id="min-max-scaled"),
    pytest.param(lambda x, t: make_pipeline(StandardScaler(), PCA(3), Ridge()).fit(x, t), id="pca"),
    pytest.param(lambda x, t: Ridge().fit(x, np.column_stack([t, -t])), id="two-outputs"),
    pytest.param(lambda x, t: LogisticRegression().fit(x, t > 0).sparsify(), id="sparse-coefficients"),
    pytest.param(lambda x, t: LinearSVC().fit(x, t > 0), id="svm"),
    pytest.param(lambda x, t: SGDClassifier(loss="log_loss").fit(x, t > 0), id="sgd"),
])
def test_linear_models_outside_its_scope_keep_their_own_methods(build):
    x, target = _data(rows=200)
    estimator = build(x, target)
    assert linear_predictor(estimator, np.dtype(np.float64)) is None
    model = SKLearnModel(estimator, host_bytes=0)  # and the runtime serves them as they answer
    np.testing.assert_array_equal(model.predict(x[:20], ["predict"])["predict"], estimator.predict(x[:20]))


def test_a_linear_model_whose_own_answer_differs_keeps_its_own_methods():
    x, target = _data(rows=200)
    estimator = LogisticRegression().fit(x, target > 0)
    # Stands in for a scikit-learn release that computes probabilities differently: the
    # estimator's own answer is nudged by one rounding step, so the load-time probe must disagree.
    own = estimator.predict_proba
    estimator.predict_proba = lambda matrix: np.nextafter(own(matrix), 2.0)
    assert linear_predictor(estimator, np.dtype(np.float64)) is None


# ----------------------------------------------------------------------------- predict from predict_proba


def _both_outputs(estimator, matrix: np.ndarray, fast_path: bool = True) -> dict[str, np.ndarray]:
    model = SKLearnModel(estimator, host_bytes=0)
    if not fast_path:
        model._linear = None  # the path of a logistic regression after steps the fast path lacks
    return model.predict(matrix, ["predict", "predict_proba"])


@pytest.mark.parametrize("build", [
    pytest.param(lambda x, t: LogisticRegression().fit(x, t > 0), id="binary"),
    pytest.param(lambda x, t: LogisticRegression(max_iter=500).fit(x, _classes(t, np.array(["a", "b", "c", "d"]))),
                 id="4-classes"),
    pytest.param(lambda x, t: make_pipeline(StandardScaler(), LogisticRegression()).fit(x, _classes(t, np.arange(3))),
                 id="pipeline"),
])
def test_logistic_regression_labels_from_its_probabilities_match_its_predict(build):
    x, target = _data()
    estimator = build(x, target)
    matrix = _data(seed=11)[0]
    result = _both_outputs(estimator, matrix)
    np.testing.assert_array_equal(result["predict"], estimator.predict(matrix))
    np.testing.assert_array_equal(result["predict_proba"], estimator.predict_proba(matrix))


@pytest.mark.parametrize("decision", [
    pytest.param([0.0, 1e-20], id="binary: a positive decision too small to move the probability off 0.5"),
    pytest.param([0.0, 1e-17, -5.0], id="3 classes: two decisions one rounding apart"),
])
@pytest.mark.parametrize("fast_path", [True, False], ids=["linear fast path", "labels from probabilities"])
def test_rows_whose_top_probabilities_tie_get_the_estimators_own_label(decision, fast_path):
    """Weights set by hand so that one row's decision values differ by less than the rounding of
    its probabilities: argmax(predict_proba) alone would name the wrong class."""
    classes = len(decision)
    x = np.eye(classes)
    estimator = LogisticRegression().fit(np.vstack([x, x]), np.tile(np.arange(classes), 2))
    if classes == 2:  # one decision value: class 1 when positive
        estimator.coef_, estimator.intercept_ = np.array([[0.0, 1.0]]), np.zeros(1)
        row = np.array([[0.0, decision[1]]])
    else:
        estimator.coef_, estimator.intercept_ = np.eye(classes), np.zeros(classes)
        row = np.array([decision])
    proba = estimator.predict_proba(row)
    assert np.count_nonzero(proba == proba.max()) == 2  # the probabilities tie...
    assert estimator.predict(row)[0] == 1 != np.argmax(proba)  # ...but the decision does not
    assert _both_outputs(estimator, row, fast_path)["predict"].tolist() == [1]


# ----------------------------------------------------------------------------- the features' dtype


def _served(model: SKLearnModel, x: np.ndarray) -> dict[str, np.ndarray]:
    """What the runtime answers for float64 rows sent as FP64, through validate and infer."""
    import asyncio

    from mmserver.types import InferInput, InferRequest

    request = InferRequest([InferInput("input-0", "FP64", x)])
    model.validate(request)
    return {o.name: o.data for o in asyncio.run(model.infer([request]))[0].outputs}


def test_a_pipeline_ending_in_trees_and_an_ensemble_of_other_models_get_float64_features():
    from sklearn.ensemble import BaggingRegressor, VotingClassifier

    rng = np.random.default_rng(3)
    x = 1e8 + rng.normal(size=(400, 4)) * 10.0  # (timestamps, say): float32 would erase the differences
    y = x[:, 0] > 1e8
    pipeline = make_pipeline(StandardScaler(), RandomForestClassifier(n_estimators=10, random_state=0)).fit(x, y)
    np.testing.assert_array_equal(_served(SKLearnModel(pipeline, 0), x[:80])["predict"], pipeline.predict(x[:80]))
    scaled = (x - 1e8) / 10.0
    voting = VotingClassifier([("a", LogisticRegression()), ("b", LogisticRegression(C=0.1))],
                              voting="soft").fit(scaled, y)
    np.testing.assert_array_equal(_served(SKLearnModel(voting, 0), scaled[:80])["predict_proba"],
                                  voting.predict_proba(scaled[:80]))
    bagging = BaggingRegressor(LinearRegression(), n_estimators=3, random_state=0).fit(scaled, x[:, 1] - 1e8)
    np.testing.assert_array_equal(_served(SKLearnModel(bagging, 0), scaled[:80])["predict"], bagging.predict(scaled[:80]))


def test_a_stacking_model_of_trees_that_passes_the_features_through_gets_float64_features():
    from sklearn.ensemble import StackingClassifier
    from sklearn.tree import DecisionTreeClassifier, ExtraTreeClassifier

    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, 4)) * 1.2345678901
    y = x[:, 0] + 0.3 * x[:, 1] > 0
    # the final estimator sees the features themselves beside the trees' answers
    stacking = StackingClassifier([("a", DecisionTreeClassifier(max_depth=2, random_state=0)),
                                   ("b", ExtraTreeClassifier(max_depth=2, random_state=0))],
                                  LogisticRegression(), passthrough=True).fit(x, y)
    np.testing.assert_array_equal(_served(SKLearnModel(stacking, 0), x[:80])["predict_proba"],
                                  stacking.predict_proba(x[:80]))


def test_a_value_beyond_float32_to_a_model_that_computes_in_float32_is_refused():
    from mmserver.errors import InvalidInput

    x, y = _data(n_features=4)
    forest = RandomForestClassifier(n_estimators=5, random_state=0).fit(x, y > 0)
    model = SKLearnModel(forest, 0)
    rows = x[:2].astype(np.float64)
    rows[1, 2] = 1e39  # float32 would make it infinity, which scikit-learn refuses
    with pytest.raises(InvalidInput, match="beyond float32"):
        _served(model, rows)
    rows[1, 2] = 3e38  # the largest values still fit
    assert _served(model, rows)["predict"].shape == (2,)


def test_multi_output_classifiers_and_regressors_answer_a_label_or_value_per_output():
    from sklearn.multioutput import MultiOutputClassifier

    x, target = _data(n_features=4)
    labels = np.column_stack([target > 0, x[:, 1] > 0.5]).astype(int)
    for estimator in (RandomForestClassifier(n_estimators=5, random_state=0).fit(x, labels),
                      MultiOutputClassifier(LogisticRegression()).fit(x, labels)):
        model = SKLearnModel(estimator, 0)
        assert [(o.name, o.datatype, o.shape) for o in model.metadata().outputs] == [("predict", "INT64", (-1, 2))]
        np.testing.assert_array_equal(_served(model, x[:30])["predict"], estimator.predict(x[:30]))
    regressor = RandomForestRegressor(n_estimators=5, random_state=0).fit(x, np.column_stack([target, x[:, 3]]))
    model = SKLearnModel(regressor, 0)
    assert [(o.name, o.shape) for o in model.metadata().outputs] == [("predict", (-1, 2))]
    np.testing.assert_array_equal(_served(model, x[:30])["predict"], regressor.predict(x[:30]))


@pytest.mark.parametrize("build", [
    lambda: LinearRegression(), lambda: Ridge(), lambda: make_pipeline(StandardScaler(), Lasso(alpha=0.01)),
    lambda: KNeighborsRegressor(), lambda: MultiOutputRegressor(Ridge()),
])
def test_multi_output_regressors_without_n_outputs_declare_the_columns_they_answer(build):
    # only trees keep n_outputs_; the metadata and a zero-row answer must still have the columns
    x, target = _data(n_features=4)
    regressor = build().fit(x, np.column_stack([target, x[:, 3]]))
    model = SKLearnModel(regressor, 0)
    assert [(o.name, o.shape) for o in model.metadata().outputs] == [("predict", (-1, 2))]
    np.testing.assert_array_equal(_served(model, x[:30])["predict"], regressor.predict(x[:30]))
    assert _served(model, x[:0])["predict"].shape == (0, 2)
