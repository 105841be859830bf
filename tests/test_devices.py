"""Tests of mmserver.devices that need no GPU: host memory under a container limit, and how
CUDA_VISIBLE_DEVICES picks GPUs out of NVML's list."""

from __future__ import annotations

import logging

import pytest

from mmserver import devices
from mmserver.devices import HostMemory, select_visible

GiB = 1024**3
UUIDS = ["GPU-aaaa-1111", "GPU-bbbb-2222", "GPU-cccc-3333"]


@pytest.fixture
def cgroup(tmp_path, monkeypatch):
    """Points the v2 and v1 cgroup files at empty folders under tmp_path; returns a writer."""
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    v2.mkdir()
    v1.mkdir()
    monkeypatch.setattr(devices, "CGROUP_FILES", (
        devices.CgroupFiles(v2 / "memory.max", v2 / "memory.current", v2 / "memory.stat", "inactive_file"),
        devices.CgroupFiles(v1 / "memory.limit_in_bytes", v1 / "memory.usage_in_bytes", v1 / "memory.stat",
                            "total_inactive_file"),
    ))
    monkeypatch.setattr(devices, "_meminfo", lambda: {"MemTotal": 64 * GiB, "MemAvailable": 40 * GiB})

    def write(version: str, limit: str, usage: str, stat: str | None = None) -> None:
        names = ("memory.max", "memory.current") if version == "v2" else ("memory.limit_in_bytes", "memory.usage_in_bytes")
        for name, text in zip(names, (limit, usage)):
            (tmp_path / version / name).write_text(text + "\n")
        if stat is not None:
            (tmp_path / version / "memory.stat").write_text(stat)
    return write


def test_without_a_cgroup_the_host_is_measured_from_meminfo(cgroup):
    reading = HostMemory().read()
    assert (reading.total, reading.used) == (64 * GiB, 24 * GiB)
    assert reading.ours > 0


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_a_container_limit_is_the_total_and_its_usage_the_use(cgroup, version):
    cgroup(version, str(2 * GiB), str(GiB // 2))
    reading = HostMemory().read()
    assert (reading.total, reading.used) == (2 * GiB, GiB // 2)


@pytest.mark.parametrize("version, key", [("v2", "inactive_file"), ("v1", "total_inactive_file")])
def test_a_containers_use_is_its_working_set_without_inactive_page_cache(cgroup, version, key):
    # reading model files fills the page cache, which counts in the usage but is reclaimed before
    # the container is killed: the kubelet's working set leaves the inactive part out
    stat = f"anon {GiB}\nactive_file {GiB // 4}\ninactive_file_x 1\n{key} {GiB // 2}\nfile {3 * GiB // 4}\n"
    cgroup(version, str(4 * GiB), str(2 * GiB), stat)
    assert HostMemory().read().used == 2 * GiB - GiB // 2
    cgroup(version, str(4 * GiB), str(GiB // 4), f"{key} {GiB}\n")  # never below zero
    assert HostMemory().read().used == 0


@pytest.mark.parametrize("version, unlimited", [("v2", "max"), ("v1", "9223372036854771712")])
def test_an_unlimited_cgroup_leaves_the_host_figures(cgroup, version, unlimited):
    cgroup(version, unlimited, str(GiB))
    reading = HostMemory().read()
    assert (reading.total, reading.used) == (64 * GiB, 24 * GiB)


def test_cgroup_v2_is_read_before_v1(cgroup):
    cgroup("v2", str(4 * GiB), str(GiB))
    cgroup("v1", str(2 * GiB), str(GiB // 2))
    assert HostMemory().read().total == 4 * GiB


@pytest.mark.parametrize(
    "visible, expected",
    [(None, UUIDS), ("", []), ("2,0", [UUIDS[2], UUIDS[0]]), ("1, 2", UUIDS[1:]),
     ("GPU-bbbb", [UUIDS[1]]), ("cccc-3333,0", [UUIDS[2], UUIDS[0]]),
     ("0,7,1", [UUIDS[0]]),  # CUDA stops at the first entry that names no device
     ("GPU-", [])],  # a prefix matching several GPUs names none
)
def test_cuda_visible_devices_by_index_and_uuid(visible, expected):
    assert select_visible(UUIDS, visible) == expected


def test_a_mig_instance_is_reported_not_silently_dropped(caplog):
    with caplog.at_level(logging.WARNING, logger="mmserver.devices"):
        assert select_visible(UUIDS, "0,MIG-1234-5678,1") == [UUIDS[0]]
    assert "MIG instance MIG-1234-5678" in caplog.text
