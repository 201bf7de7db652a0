#!/usr/bin/env bash
# Run here (a machine with PyPI): the wheels the GPU machine lacks for the device check, into .whl/
# (git-ignored; carried to the device with `carry: [".whl"]`). The GPU machine has torch, transformers,
# peft, safetensors, numpy, Pillow and huggingface_hub; diffusers is pure Python.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "diffusers==0.42.1"
ls -l .whl
