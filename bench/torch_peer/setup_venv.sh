#!/usr/bin/env bash
# A throwaway venv with the current PyTorch from PyPI, for bench/torch_peer/compare.py:
#   bash bench/torch_peer/setup_venv.sh /tmp/torch-peer     -> /tmp/torch-peer/venv/bin/python
# torch's wheel is installed without its dependency tree (the CUDA wheels are most of it); its import
# on a machine without a GPU still loads libcufile, cuSPARSELt, NVSHMEM and NCCL, so those four wheels
# come too (compare.py puts their lib folders on LD_LIBRARY_PATH), and its pure-Python requirements.
set -euo pipefail
dir=${1:?usage: setup_venv.sh DIR}
mkdir -p "$dir"
python3 -m venv "$dir/venv"
"$dir/venv/bin/pip" download --no-deps -d "$dir/wheels" torch nvidia-cufile nvidia-cusparselt-cu13 nvidia-nvshmem-cu13 nvidia-nccl-cu13
"$dir/venv/bin/pip" install --no-deps "$dir"/wheels/*.whl
"$dir/venv/bin/pip" install filelock typing-extensions sympy networkx jinja2 fsspec numpy
echo "$dir/venv/bin/python"
