"""nerfstudio checkpoints hold numpy scalars; they must load under torch.load's weights_only default."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

SCRIPT = """
import sys, numpy as np, torch
state = {"schedulers": {"lr": [np.float64(1e-3), np.float32(2.0)], "step": np.int64(7)}, "w": torch.ones(2)}
torch.save(state, sys.argv[1])
if sys.argv[2] == "register":
    from splatsem_ns.checkpoints import allow_numpy_scalars_in_checkpoints
    allow_numpy_scalars_in_checkpoints()
try:
    out = torch.load(sys.argv[1], weights_only=True)
except Exception as err:
    print("FAILED", type(err).__name__)
else:
    assert out["schedulers"]["lr"][0] == 1e-3 and out["schedulers"]["step"] == 7
    print("LOADED")
"""


def _load(tmp_path, mode: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt.pt"), mode],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_numpy_scalars_fail_without_and_load_with_allow_list(tmp_path):
    # Separate processes: the allow-list is global to a process once registered.
    assert _load(tmp_path, "plain").startswith("FAILED")
    assert _load(tmp_path, "register") == "LOADED"


def test_importing_the_method_config_registers_it():
    import splatsem_ns.method_configs.chorus_splat  # noqa: F401  (what every ns-* command imports)

    safe = {getattr(g, "__name__", str(g)) for g in torch.serialization.get_safe_globals()}
    assert "scalar" in safe and np.dtype.__name__ in safe
