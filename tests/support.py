"""What several tests share: where the real scenes are, and how to run the installed ns-* commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def command(name: str) -> str:
    """Path of a console script installed next to the running interpreter."""
    return str(Path(sys.executable).with_name(name))


def offline_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    return env


DATA_ROOT = Path(os.environ.get("SPLATSEM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
"""The shared real scenes: ``../shared/data`` beside the repository, or ``$SPLATSEM_DATA``."""
SCANNET = DATA_ROOT / "scannet_scene0000_00"
