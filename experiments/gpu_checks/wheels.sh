#!/usr/bin/env bash
# Run HERE (the CPU machine with the package registry), from the repository root: fetches into .whl/ (ignored by
# git) the Python packages lightdiff needs that the lent GPU machine's image lacks. Its image (Python 3.12) has
# torch, pytorch-lightning, transformers, huggingface_hub, torchmetrics, safetensors, pillow, scipy, rich, tqdm and
# pytest, but no diffusers, Hydra, OmegaConf, torchao or pytest-xdist, and it cannot reach a registry.
#   bash experiments/gpu_checks/wheels.sh     then: device run with carry [".whl"], command: bash experiments/gpu_checks/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir -p .whl
download() {
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$@"
}
download diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1 importlib_metadata==8.7.0 zipp==3.23.0
# pytest-xdist and execnet: pyproject's addopts name -n (the tests stage runs with -n 0, but pytest must know it)
download pytest-xdist==3.8.0 execnet==2.1.2
# torchao for speed.quantize (int8, fp8 on the H200); 0.18 is the release built for the image's torch 2.11
download torchao==0.18.0
# antlr4-python3-runtime 4.9.3 (the version Hydra 1.3 pins) is published as a source archive only: build its wheel
python -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
du -sh .whl
