#!/usr/bin/env bash
# Run here (a machine with PyPI), before the lent GPU machine starts: fetch the wheels that its
# image lacks for the GPU checks (Python 3.12, x86-64), into .whl/ (git-ignored), which the
# `device` tool's run then carries (carry: [".whl"]). The versions are those this project is
# tested with; the image already has torch, transformers, numpy, pynvml, prometheus-client,
# pyyaml, httpx, anyio, uvloop, pytest and pytest-timeout (typing-extensions too, but perhaps older
# than pydantic needs).
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir .whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  starlette==1.10.0 uvicorn==0.54.0 httptools==0.9.0 orjson==3.13.0 watchfiles==1.3.0 \
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
du -sh .whl
