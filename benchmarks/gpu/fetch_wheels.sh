#!/usr/bin/env bash
# Run here (a machine with PyPI): the wheels the GPU machine lacks, into .whl/ (git-ignored; carried to the
# device with `carry: [".whl"]`). The GPU machine has torch, torchvision, timm, transformers, peft,
# safetensors, numpy, Pillow, regex and huggingface_hub; diffusers (the device check) and open_clip with
# its text cleaner (the shapes run's reward CLIP) are pure Python, at the versions pyproject.toml pins.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "diffusers==0.42.1" "open_clip_torch==3.3.0" "ftfy==6.3.1" "wcwidth==0.9.4"
ls -l .whl
