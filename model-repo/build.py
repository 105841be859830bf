"""Train the example models and write them into this repository (run once after installing).

    python model-repo/build.py

Uses only datasets bundled with scikit-learn, so it needs no network:
  iris/1/model.joblib        LogisticRegression, described by iris/model.yaml (ours)
  diabetes/model.joblib      RandomForestRegressor, described by MLServer's model-settings.json
  breast-cancer/model.json   XGBClassifier, no config at all: the runtime is detected
"""

from __future__ import annotations

from pathlib import Path

import joblib
import xgboost as xgb
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import LogisticRegression

REPO = Path(__file__).resolve().parent


def main() -> None:
    x, y = load_iris(return_X_y=True)
    (REPO / "iris" / "1").mkdir(parents=True, exist_ok=True)
    joblib.dump(LogisticRegression(max_iter=500).fit(x, y), REPO / "iris" / "1" / "model.joblib")

    x, y = load_diabetes(return_X_y=True)
    forest = RandomForestRegressor(n_estimators=50, max_depth=8, random_state=0).fit(x, y)
    joblib.dump(forest, REPO / "diabetes" / "model.joblib")

    x, y = load_breast_cancer(return_X_y=True)
    booster = xgb.XGBClassifier(n_estimators=50, max_depth=4, random_state=0).fit(x, y)
    (REPO / "breast-cancer").mkdir(exist_ok=True)  # holds only the generated file: not in git
    booster.save_model(REPO / "breast-cancer" / "model.json")
    print(f"example models written under {REPO}")


if __name__ == "__main__":
    main()
