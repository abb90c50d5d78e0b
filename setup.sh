#!/usr/bin/env bash
# Sets up a virtual environment in .venv with nerfstudio 1.1.5, this package and the test tools.
#   bash setup.sh                      # default: PyPI's torch/torchvision pair
#   TORCH_SPEC="torch==2.5.1 torchvision==0.20.1" bash setup.sh   # pick another pair (e.g. for your CUDA)
# torchvision must come from the same build family as torch: a CPU-only torch wheel with PyPI's
# torchvision fails at import ("operator torchvision::nms does not exist"), and every ns-* command
# imports torchvision. PyPI's default (CUDA-enabled) pair also runs on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torchvision==0.29.2"}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip wheel
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q $TORCH_SPEC
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python - <<'PY'
import torch, torchvision, nerfstudio, gsplat, splatsem_ns
from torchvision.ops import nms  # fails when torch and torchvision builds do not match
print(f"ok: torch {torch.__version__}, torchvision {torchvision.__version__}, gsplat {gsplat.__version__}, "
      f"splatsem_ns {splatsem_ns.__version__}, CUDA available: {torch.cuda.is_available()}")
PY
