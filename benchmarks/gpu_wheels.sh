#!/usr/bin/env bash
# Wheels the GPU machine's image lacks (it has torch, transformers, safetensors, huggingface_hub, pillow,
# numpy, fsspec, pyyaml, tqdm, matplotlib, timm, regex; the core reads tars with tarfile, so no webdataset):
# downloaded here, for Python 3.12, into .whl/ (git-ignored by .gitignore), carried to the machine and
# installed there with --no-index.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "open_clip_torch==3.3.0" "braceexpand==0.1.7" "ftfy==6.3.1" "wcwidth==0.2.13"
ls -l .whl
