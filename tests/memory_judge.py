"""The judge of the memory manager's scenarios and benchmarks: device memory in use, sampled in
a background thread while a real server runs.

On a GPU the judge is NVML (pynvml, read in this process, which never makes a CUDA context of its
own), device-wide: what the server's process holds shows as growth above the reading taken before
it started. On the CPU, where the host's RAM is shared with everything else, it is the ledger the
server exports on ``/metrics`` (``mmserver_memory_reserved_bytes`` and
``mmserver_memory_overhead_bytes``): what the server believes it holds.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request

#: the ledger's families on /metrics whose samples add up to what the server holds
LEDGER_FAMILIES = ("mmserver_memory_reserved_bytes", "mmserver_memory_overhead_bytes")


def ledger_bytes(url: str, device: str) -> int:
    """Bytes the server's ledger holds on ``device`` (models and runtime overheads)."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(LEDGER_FAMILIES) and f'device="{device}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def cuda_context_bytes() -> int:
    """NVML's growth when a fresh process makes torch's CUDA context on GPU 0 (measured in a
    child process, so that this one never holds a context of its own)."""
    script = (
        "import pynvml, torch\n"
        "pynvml.nvmlInit(); h = pynvml.nvmlDeviceGetHandleByIndex(0)\n"
        "before = pynvml.nvmlDeviceGetMemoryInfo(h).used\n"
        "torch.zeros(1, device='cuda:0'); torch.cuda.synchronize()\n"
        "print(pynvml.nvmlDeviceGetMemoryInfo(h).used - before)\n"
    )
    return int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)


class NvmlReader:
    """Device-wide memory in use on one GPU, as NVML reports it."""

    def __init__(self, index: int = 0) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)

    def __call__(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)


class DeviceSampler:
    """Samples device memory while the ``with`` block runs: NVML on a GPU (``device``
    ``cuda:N``) every 10 ms (a query costs microseconds), the server's ledger on the CPU every
    100 ms (a scrape costs the server's event loop). ``peak`` is the largest sample less
    ``baseline`` (the reading before the server started; 0 for the ledger)."""

    def __init__(self, device: str, url: str, baseline: int = 0) -> None:
        self.device, self.baseline = device, baseline
        if device.startswith("cuda"):
            self.read, self.interval_s = NvmlReader(int(device.partition(":")[2] or 0)), 0.01
        else:
            self.read, self.interval_s = (lambda: ledger_bytes(url, device)), 0.1
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="device sampler", daemon=True)

    @property
    def peak(self) -> int:
        return max(self.samples, default=self.baseline) - self.baseline

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.read())
            time.sleep(self.interval_s)

    def __enter__(self) -> DeviceSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
