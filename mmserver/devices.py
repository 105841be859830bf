"""What the memory ledger measures: GPUs through NVML (pynvml, from nvidia-ml-py) and host RAM.

This is the only module that talks to NVML. GPUs are named as torch names them (``cuda:N``, an
index into CUDA_VISIBLE_DEVICES) and matched to NVML by UUID, because CUDA's and NVML's device
orders differ. Host memory honours a cgroup (container) limit when there is one, and then
counts the container's working set, as the kubelet does.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from .runtime import HOST

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CgroupFiles:
    """Where one cgroup version keeps a container's memory limit, its usage, and the statistics
    whose ``inactive`` line is page cache the kernel reclaims before it kills anything."""

    limit: Path
    usage: Path
    stat: Path
    inactive: str


#: the container's memory cgroup: v2, then v1 (older nodes); the first whose limit file exists
#: counts. v1 writes "no limit" as a huge number and v2 as "max".
CGROUP_FILES = (
    CgroupFiles(Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current"),
                Path("/sys/fs/cgroup/memory.stat"), "inactive_file"),
    CgroupFiles(Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"), Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
                Path("/sys/fs/cgroup/memory/memory.stat"), "total_inactive_file"),
)
MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True, slots=True)
class MemoryReading:
    """One measurement of a device: bytes in total, in use by anyone, and in use by this process."""

    total: int
    used: int
    ours: int

    @property
    def free(self) -> int:
        return self.total - self.used

    @property
    def others(self) -> int:
        """Bytes held by other processes."""
        return max(0, self.used - self.ours)


class Device(ABC):
    """A memory the ledger budgets: the host or one GPU."""

    name: str
    uuid: str

    @abstractmethod
    def read(self) -> MemoryReading:
        """Measure the device now."""


class HostMemory(Device):
    """Host RAM, or the container's memory limit when a cgroup sets one."""

    name = HOST
    uuid = HOST

    def read(self) -> MemoryReading:
        info = _meminfo()
        total, available = info["MemTotal"], info["MemAvailable"]
        used = total - available
        limit, usage = _cgroup_memory()
        if limit is not None and limit < total:
            total = limit
            used = usage if usage is not None else used
        return MemoryReading(total, used, _process_rss())


class NvmlGpu(Device):
    """One GPU, measured through NVML."""

    def __init__(self, name: str, uuid: str) -> None:
        import pynvml

        self.name = name
        self.uuid = uuid
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        self._pid = os.getpid()

    def read(self) -> MemoryReading:
        info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        ours = 0
        try:
            for process in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if process.pid == self._pid and process.usedGpuMemory:
                    ours += process.usedGpuMemory
        except self._nvml.NVMLError:  # some drivers refuse per-process accounting in containers
            ours = 0
        return MemoryReading(int(info.total), int(info.used), int(ours))


def discover_devices() -> dict[str, Device]:
    """The host, plus every GPU this process can use that NVML can measure."""
    devices: dict[str, Device] = {HOST: HostMemory()}
    for index, uuid in enumerate(_visible_gpu_uuids()):
        try:
            gpu = NvmlGpu(f"cuda:{index}", uuid)
            reading = gpu.read()
        except Exception as exc:  # an unreadable GPU is left out, not fatal
            log.warning("GPU %s (%s) cannot be measured through NVML: %s", index, uuid, exc)
            continue
        devices[gpu.name] = gpu
        log.info("device %s: %s, %.1f GiB, %.1f GiB in use", gpu.name, uuid, reading.total / 2**30,
                 reading.used / 2**30)
    return devices


def _visible_gpu_uuids() -> list[str]:
    """UUIDs of the GPUs in CUDA's order for this process (CUDA_VISIBLE_DEVICES applied)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVML library or driver: no GPUs to manage
        return []
    try:
        from_torch = _uuids_from_torch()
        if from_torch is not None:
            return from_torch
        count = pynvml.nvmlDeviceGetCount()
        by_index = [pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
        by_index = [u.decode() if isinstance(u, bytes) else u for u in by_index]
        return select_visible(by_index, os.environ.get("CUDA_VISIBLE_DEVICES"))
    except Exception as exc:
        log.warning("cannot enumerate GPUs through NVML: %s", exc)
        return []


def _uuids_from_torch() -> list[str] | None:
    """torch knows CUDA's own order; ask it when it is installed with CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    uuids = []
    for index in range(torch.cuda.device_count()):
        raw = str(torch.cuda.get_device_properties(index).uuid)
        uuids.append(raw if raw.startswith("GPU-") else f"GPU-{raw}")
    return uuids


def select_visible(nvml_uuids: list[str], visible: str | None) -> list[str]:
    """Apply CUDA_VISIBLE_DEVICES (indices or UUIDs) to NVML's list of UUIDs.

    Without torch to ask, NVML's (PCI bus) order is assumed to be CUDA's, which holds when
    CUDA_DEVICE_ORDER=PCI_BUS_ID or the GPUs are all of one model."""
    if visible is None:
        return list(nvml_uuids)
    chosen = []
    for token in (t.strip() for t in visible.split(",")):
        if not token:
            continue
        if token.isdigit():
            if int(token) >= len(nvml_uuids):
                break  # CUDA stops at the first invalid entry
            chosen.append(nvml_uuids[int(token)])
        elif token.startswith("MIG-"):
            log.warning("CUDA_VISIBLE_DEVICES names the MIG instance %s, which this server cannot match "
                        "to a GPU without torch; it and the devices after it are not managed", token)
            break
        else:
            matches = [u for u in nvml_uuids if u.startswith(token if token.startswith("GPU-") else f"GPU-{token}")]
            if len(matches) != 1:
                break
            chosen.append(matches[0])
    return chosen


def _meminfo() -> dict[str, int]:
    values = {}
    for line in MEMINFO.read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            values[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return values


def _cgroup_memory() -> tuple[int | None, int | None]:
    """The container's memory limit and its working set (usage less inactive page cache, as the
    kubelet counts it before it evicts a pod), from the first cgroup version whose files exist."""
    for files in CGROUP_FILES:
        if files.limit.exists():
            usage = _read_int(files.usage)
            if usage is not None:
                usage = max(0, usage - _cgroup_stat(files.stat).get(files.inactive, 0))
            return _read_int(files.limit), usage
    return None, None


def _cgroup_stat(path: Path) -> dict[str, int]:
    """The ``name value`` lines of a cgroup's memory.stat (empty when it cannot be read)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    pairs = (line.split() for line in lines)
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _process_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
