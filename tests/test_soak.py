"""A short soak (``benchmarks/soak.py``, 20 s): mixed good, bad and failing traffic, loads and
unloads, overload bursts. Nothing may be lost, no 5xx but the deliberately failing model's, no
wrong answer, every malformed request a 4xx. (The 10-minute run and its RSS figures are in the
README; 20 s is too short to judge memory drift, so it is only reported here.)"""

from __future__ import annotations

import gc
import importlib.util
import sys
import weakref

from conftest import ROOT
from hardening_support import build_small_repo


def load_soak():
    benchmarks = str(ROOT / "benchmarks")
    if benchmarks not in sys.path:  # soak.py imports its sibling serving.py, as when run as a script
        sys.path.insert(0, benchmarks)
    spec = importlib.util.spec_from_file_location("soak", ROOT / "benchmarks" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module
    spec.loader.exec_module(module)
    return module


def test_a_short_soak_loses_nothing(tmp_path):
    soak = load_soak()
    result = soak.run(duration=20, warmup=4, workdir=tmp_path)
    print(soak.report(result))
    assert result.lost == 0, result.problems
    assert result.answered == result.sent
    assert result.unexpected_5xx == 0, result.problems
    assert result.wrong_answers == 0, result.problems
    assert result.bad_not_4xx == 0, result.problems
    assert not result.problems, result.problems
    # every kind of traffic took place
    assert result.sent > 1000
    assert result.failing_model_500 > 0
    assert result.loads > 0 and result.unloads > 0 and result.bursts > 0
    assert result.statuses.get("400", 0) > 0


async def test_loading_a_model_does_not_keep_pending_garbage_for_good(tmp_path):
    from mmserver_sklearn import SKLearnRuntime

    from mmserver.manager import ModelManager
    from mmserver.runtime import RuntimeRegistry
    from mmserver.settings import Settings

    repo = build_small_repo(tmp_path / "repo")
    manager = ModelManager(Settings(model_repository=repo.path, model_control_mode="explicit"),
                           RuntimeRegistry({"sklearn": SKLearnRuntime()}))

    class Node:
        pass

    gc.collect()
    gc.disable()  # the cycle below must still be pending when the load happens
    try:
        node = Node()
        node.me = node  # a reference cycle: only the cyclic collector can free it
        probe = weakref.ref(node)
        del node
        await manager.load("spare")
    finally:
        gc.enable()
    try:
        gc.collect()
        assert probe() is None, "garbage pending while a model loaded can no longer be collected"
    finally:
        gc.unfreeze()
        await manager.stop()
