"""The live repository, through the real server: folders dropped in, version rollover under
continuous traffic, broken new versions, removals, the control modes, KServe's single-model
layout, and draining on SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import joblib
import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

from v2_helpers import binary_request, body

FEATURES = 4
WATCH = ("--repository-settle-s", "0.3")


def trained(seed: int) -> LogisticRegression:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, FEATURES))
    return LogisticRegression().fit(x, (x[:, seed % FEATURES] > 0).astype(int))


def publish(repo: Path, relative: str, estimator=None, raw: bytes | None = None, yaml_text: str | None = None) -> None:
    """Write a model (or version) folder next to the repository's models, then move it in at once,
    the way the README tells operators to publish."""
    staging = repo / f".staging-{relative.replace('/', '-')}"
    staging.mkdir(parents=True)
    if estimator is not None:
        joblib.dump(estimator, staging / "model.joblib")
    if raw is not None:
        (staging / "model.joblib").write_bytes(raw)
    if yaml_text is not None:
        (staging / "model.yaml").write_text(yaml_text)
    target = repo / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, target)


def index(url: str) -> dict[tuple[str, str], dict]:
    return {(r["name"], r["version"]): r for r in httpx.post(f"{url}/v2/repository/index").json()}


def wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


class Traffic:
    """A client thread sending requests to one model without pause, recording every answer."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.answers: list[tuple[int, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                response = client.post(f"{self.url}/v2/models/{self.model}/infer",
                                       json=body(np.ones((1, FEATURES))))
                version = response.json().get("model_version") if response.status_code == 200 else response.text
                self.answers.append((response.status_code, version))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.fixture()
def live_repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    publish(repo, "m/1", trained(1), yaml_text="runtime: sklearn\n")
    publish(repo, "other/1", trained(2))
    return repo


def _request_head(url: str, path: str, content: bytes) -> socket.socket:
    """A connection that has sent the head of a POST of ``content`` to ``path``, not its body."""
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=10)
    connection.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(content)}\r\n\r\n".encode())
    return connection


def _rest_of_request(connection: socket.socket, content: bytes) -> tuple[int, dict]:
    """Send the body; the response's status and JSON document."""
    connection.sendall(content)
    reply = b""
    while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < int(
            reply.lower().partition(b"content-length: ")[2].split(b"\r\n")[0] or 0):
        reply += connection.recv(65536)
    connection.close()
    head, _, document = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(document)


def test_versions_roll_over_without_failing_a_request(live_repo, start_server, tmp_path):
    with start_server(live_repo, tmp_path / "server.log", *WATCH) as server:
        url = server.url
        with Traffic(url, "m") as traffic:
            wait_for(lambda: len(traffic.answers) > 20, what="traffic")
            # requests whose model was looked up (from the path, before the body is read) just
            # before the switch: one for the default version goes to the new one, one that
            # names version 1 is told it is no longer served
            content = json.dumps(body(np.ones((1, FEATURES)))).encode()
            by_default = _request_head(url, "/v2/models/m/infer", content)
            by_version = _request_head(url, "/v2/models/m/versions/1/infer", content)
            publish(live_repo, "m/2", trained(3))
            wait_for(lambda: traffic.answers and traffic.answers[-1][1] == "2", what="version 2 to serve")
            wait_for(lambda: index(url)[("m", "1")]["state"] == "UNAVAILABLE", what="version 1 to unload")
            status, answer = _rest_of_request(by_default, content)
            assert (status, answer.get("model_version")) == (200, "2"), answer
            status, answer = _rest_of_request(by_version, content)
            assert status == 503 and "replaced by a newer version" in answer["error"], answer
            rows = index(url)
            assert rows[("m", "2")]["state"] == "READY"
            assert rows[("m", "1")]["state"] == "UNAVAILABLE"  # drained and unloaded after the switch
            # a broken new version is reported, and version 2 goes on serving
            publish(live_repo, "m/3", raw=b"not a pickle")
            wait_for(lambda: "load failed" in index(url).get(("m", "3"), {}).get("reason", ""),
                     what="version 3 to fail")
            count = len(traffic.answers)
            wait_for(lambda: len(traffic.answers) > count + 20, what="more traffic")
            # a changed model.yaml reloads the model (here: now serving the two newest that load)
            (live_repo / "m" / "model.yaml").write_text("runtime: sklearn\nversions: all\n")
            wait_for(lambda: index(url)[("m", "1")]["state"] == "READY", what="version 1 to serve again")
            count = len(traffic.answers)
            wait_for(lambda: len(traffic.answers) > count + 20, what="more traffic")
        statuses = {status for status, _ in traffic.answers}
        assert statuses == {200}, [a for a in traffic.answers if a[0] != 200][:5]
        versions = [v for _, v in traffic.answers]
        assert versions[0] == "1" and versions[-1] == "2"
        assert versions.index("2") == len(versions) - versions[::-1].index("1")  # one switch, no flapping
        assert "3" not in versions
        assert httpx.post(f"{url}/v2/models/m/versions/3/infer", json=body(np.ones((1, FEATURES)))).status_code == 503


def test_new_files_in_a_versions_folder_replace_its_model_without_failing_a_request(live_repo, start_server,
                                                                                 tmp_path):
    def predicted(url: str) -> int:
        response = httpx.post(f"{url}/v2/models/m/infer", json=body(np.ones((1, FEATURES))))
        return response.json()["outputs"][0]["data"][0]

    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, FEATURES))
    flipped = LogisticRegression().fit(x, (x[:, 1] <= 0).astype(int))  # trained(1) with its labels flipped
    with start_server(live_repo, tmp_path / "server.log", *WATCH) as server:
        url = server.url
        before = predicted(url)
        with Traffic(url, "m") as traffic:
            wait_for(lambda: len(traffic.answers) > 20, what="traffic")
            joblib.dump(flipped, live_repo / "m" / "1" / ".model.joblib.new")
            os.replace(live_repo / "m" / "1" / ".model.joblib.new", live_repo / "m" / "1" / "model.joblib")
            wait_for(lambda: predicted(url) != before, what="the new files to serve")
        assert {status for status, _ in traffic.answers} == {200}
        assert "m:1 READY" in server.log().split("rescanning")[-1]  # loaded again after the change


def test_a_failure_while_the_watcher_settles_does_not_stop_it(tmp_path, monkeypatch):
    """watchfiles' event stream is replaced by two batches of changes; measuring the folder
    fails for the first (it vanished meanwhile, say): the second still gets its rescan."""
    import asyncio

    from mmserver import watcher

    async def two_batches(*args, **kwargs):
        for _ in range(2):
            yield {(1, str(tmp_path / "m" / "model.joblib"))}

    failures = iter([FileNotFoundError("m/2 was removed during the walk")])

    def signature(root, names):
        for failure in failures:
            raise failure
        return frozenset()

    monkeypatch.setattr(watcher.watchfiles, "awatch", two_batches)
    monkeypatch.setattr(watcher, "folder_signature", signature)
    rescans = []

    async def on_change() -> None:
        rescans.append(1)

    asyncio.run(watcher.RepositoryWatcher(tmp_path, on_change, settle_s=0.01, poll=True).run())
    assert rescans == [1]


def test_a_rescan_waits_for_a_folder_still_being_copied_in_whose_changes_came_later(tmp_path, monkeypatch):
    """Folder a's changes settle while b is still being copied in (b's events are in the next
    batch): the rescan, which reads every folder, must not come before b is complete."""
    import asyncio

    from mmserver import watcher

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model.joblib").write_bytes(b"a")
    (tmp_path / "b").mkdir()

    async def one_batch(*args, **kwargs):
        yield {(1, str(tmp_path / "a" / "model.joblib"))}

    monkeypatch.setattr(watcher.watchfiles, "awatch", one_batch)
    copying = True
    copying_at_rescans = []

    async def copy_b() -> None:
        nonlocal copying
        with (tmp_path / "b" / "model.joblib").open("wb") as f:
            for _ in range(12):
                f.write(b"x" * 1000)
                f.flush()
                await asyncio.sleep(0.03)
        copying = False

    async def on_change() -> None:
        copying_at_rescans.append(copying)

    async def main() -> None:
        copy = asyncio.create_task(copy_b())
        await watcher.RepositoryWatcher(tmp_path, on_change, settle_s=0.15, poll=True).run()
        await copy

    asyncio.run(main())
    assert copying_at_rescans == [False]


def test_folders_dropped_in_or_removed_are_served_or_retired(live_repo, start_server, tmp_path):
    with start_server(live_repo, tmp_path / "server.log", *WATCH) as server:
        url = server.url
        publish(live_repo, "fresh", trained(4))
        wait_for(lambda: index(url).get(("fresh", "1"), {}).get("state") == "READY", what="fresh to load")
        assert httpx.post(f"{url}/v2/models/fresh/infer", json=body(np.ones((1, FEATURES)))).status_code == 200
        assert 'model_name="other"' in httpx.get(f"{url}/metrics").text
        shutil.rmtree(live_repo / "other")
        wait_for(lambda: ("other", "1") not in index(url), what="other to go")
        response = httpx.post(f"{url}/v2/models/other/infer", json=body(np.ones((1, FEATURES))))
        assert response.status_code == 404
        assert "removed: its folder is gone" in server.log()
        # its series go with it, and so do those of a version whose folder goes
        publish(live_repo, "m/2", trained(5))
        wait_for(lambda: index(url).get(("m", "2"), {}).get("state") == "READY", what="m:2 to load")
        shutil.rmtree(live_repo / "m" / "1")
        wait_for(lambda: ("m", "1") not in index(url), what="m:1 to go")
        exposition = httpx.get(f"{url}/metrics").text
        assert 'model_name="other"' not in exposition
        assert 'model_name="m",model_version="1"' not in exposition
        assert 'model_name="m",model_version="2"' in exposition
        # a folder dropped in as a link out of the repository is refused, and the log says so
        outside = tmp_path / "outside" / "evil"
        publish(outside.parent, "evil", trained(6))
        os.symlink(outside, live_repo / "evil", target_is_directory=True)
        wait_for(lambda: "model folder evil/ points outside the model repository: ignored" in server.log(),
                 what="the link to be refused")
        assert ("evil", "1") not in index(url)


def test_strict_readiness_waits_for_every_startup_model_but_not_for_later_folders(live_repo, start_server, tmp_path):
    # a rolling update must not count a replica whose models failed to load as ready; once ready,
    # a bad folder dropped into a repository the replicas share must not take them all out
    publish(live_repo, "bad/1", raw=b"not a pickle")
    with start_server(live_repo, tmp_path / "server.log", *WATCH, strict_readiness=True, until="live") as server:
        url = server.url

        def readiness() -> httpx.Response | None:
            response = httpx.get(f"{url}/v2/health/ready")
            return response if "starting" not in response.text else None

        response = wait_for(readiness, what="the startup loading to finish")
        assert response.status_code == 503, response.text
        assert response.json()["ready"] is False and response.json()["reason"].startswith("bad:1: ")
        assert "not ready (/v2/health/ready answers 503) until these load: bad:1" in server.log()
        assert httpx.post(f"{url}/v2/models/m/infer", json=body(np.ones((1, FEATURES)))).status_code == 200
        shutil.rmtree(live_repo / "bad")
        wait_for(lambda: httpx.get(f"{url}/v2/health/ready").status_code == 200, what="ready without bad")
        publish(live_repo, "worse/1", raw=b"junk")
        wait_for(lambda: index(url).get(("worse", "1"), {}).get("reason"), what="worse to fail")
        assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
        assert httpx.get(f"{url}/v2/models/worse/ready").status_code == 503


def test_a_version_list_without_the_newest_folder_serves_the_newest_it_names(tmp_path, start_server):
    repo = tmp_path / "repo"
    for version in ("1", "2", "3"):
        publish(repo, f"m/{version}", trained(int(version)))
    (repo / "m" / "model.yaml").write_text("versions: [1, 2]\n")
    with start_server(repo, tmp_path / "server.log") as server:
        response = httpx.post(f"{server.url}/v2/models/m/infer", json=body(np.ones((1, FEATURES))))
        assert response.status_code == 200, response.text
        assert response.json()["model_version"] == "2"
        assert httpx.get(f"{server.url}/v2/models/m/ready").status_code == 200
        assert httpx.get(f"{server.url}/v2/models/m/versions/3/ready").status_code == 503


def test_the_outputs_model_yaml_declares_are_what_a_request_naming_none_gets(tmp_path, start_server):
    repo = tmp_path / "repo"
    publish(repo, "m", trained(1), yaml_text="outputs: [{name: predict, datatype: INT64, shape: [-1]}]\n")
    publish(repo, "typo", trained(2), yaml_text="outputs: [{name: predicted, datatype: INT64, shape: [-1]}]\n")
    with start_server(repo, tmp_path / "server.log") as server:
        one_row = body(np.ones((1, FEATURES)))
        response = httpx.post(f"{server.url}/v2/models/m/infer", json=one_row)
        assert [o["name"] for o in response.json()["outputs"]] == ["predict"]
        asked = httpx.post(f"{server.url}/v2/models/m/infer", json={**one_row, "outputs": [{"name": "predict_proba"}]})
        assert [o["name"] for o in asked.json()["outputs"]] == ["predict_proba"]  # still there when asked for
        reason = index(server.url)[("typo", "1")]["reason"]
        assert "declares the outputs ['predicted'], which the model does not compute" in reason


def test_a_folder_copied_in_slowly_is_read_only_once_complete(live_repo, start_server, tmp_path):
    with start_server(live_repo, tmp_path / "server.log", "--repository-settle-s", "1.0") as server:
        folder = live_repo / "slowcopy"
        folder.mkdir()
        joblib.dump(trained(5), tmp_path / "model.joblib")
        data = (tmp_path / "model.joblib").read_bytes()
        piece = len(data) // 4 + 1
        with (folder / "model.joblib").open("wb") as f:  # written in pieces, 0.3 s apart
            for start in range(0, len(data), piece):
                f.write(data[start:start + piece])
                f.flush()
                time.sleep(0.3)
        wait_for(lambda: index(server.url).get(("slowcopy", "1"), {}).get("state") == "READY", what="slowcopy")
        assert "slowcopy" not in "".join(line for line in server.log().splitlines() if "load failed" in line)


def test_an_unloaded_model_is_not_reloaded_behind_the_operators_back(live_repo, start_server, tmp_path):
    with start_server(live_repo, tmp_path / "server.log", *WATCH) as server:
        url = server.url
        assert httpx.post(f"{url}/v2/repository/models/other/unload").status_code == 200
        publish(live_repo, "other/2", trained(6))
        wait_for(lambda: ("other", "2") in index(url), what="version 2 to register")
        time.sleep(1.0)
        assert index(url)[("other", "2")]["state"] == "UNAVAILABLE"
        assert httpx.post(f"{url}/v2/models/other/infer", json=body(np.ones((1, FEATURES)))).status_code == 503
        assert httpx.post(f"{url}/v2/repository/models/other/load").status_code == 200
        assert index(url)[("other", "2")]["state"] == "READY"


def test_explicit_mode_follows_only_the_api_and_none_mode_refuses_it(live_repo, start_server, tmp_path):
    with start_server(live_repo, tmp_path / "explicit.log", "--model-control-mode", "explicit") as server:
        publish(live_repo, "late", trained(7))
        time.sleep(1.0)
        assert ("late", "1") not in index(server.url)
        assert httpx.post(f"{server.url}/v2/repository/models/late/load").status_code == 200
        assert index(server.url)[("late", "1")]["state"] == "READY"
    with start_server(live_repo, tmp_path / "none.log", "--model-control-mode", "none") as server:
        for action in ("load", "unload"):
            response = httpx.post(f"{server.url}/v2/repository/models/late/{action}")
            assert response.status_code == 403
            assert "model-control-mode none" in response.json()["error"]


def test_the_repository_folder_itself_can_be_one_model(tmp_path, start_server):
    root = tmp_path / "mnt-models"  # KServe's storage initializer puts the model's files here
    root.mkdir()
    joblib.dump(trained(8), root / "model.joblib")
    with start_server(root, tmp_path / "server.log", "--model-name", "my-isvc") as server:
        response = httpx.post(f"{server.url}/v2/models/my-isvc/infer", json=body(np.ones((1, FEATURES))))
        assert response.status_code == 200
        assert response.json()["model_name"] == "my-isvc"


def test_sigterm_answers_the_requests_in_flight_before_exiting(tmp_path, start_server):
    repo = tmp_path / "repo"
    rng = np.random.default_rng(9)
    x = rng.normal(size=(300, FEATURES))
    slow = RandomForestClassifier(n_estimators=300, max_depth=4, random_state=0).fit(x, (x[:, 0] > 0).astype(int))
    publish(repo, "slow", slow)
    with start_server(repo, tmp_path / "server.log") as server:
        content, headers = binary_request(np.ones((300_000, FEATURES)))
        result: dict[str, httpx.Response] = {}
        sender = threading.Thread(target=lambda: result.setdefault("r", httpx.post(
            f"{server.url}/v2/models/slow/infer", content=content, headers=headers, timeout=120)))
        sender.start()
        time.sleep(1.0)  # the request is being computed
        server.process.send_signal(signal.SIGTERM)
        sender.join(120)
        assert result["r"].status_code == 200
        assert len(result["r"].json()["outputs"][0]["data"]) == 300_000
