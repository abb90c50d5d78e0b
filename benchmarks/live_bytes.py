"""Peak bytes of the tensors a piece of PyTorch code allocates, counted on the CPU, and the voxel prior's.

    python benchmarks/live_bytes.py [--gaussians 643000] [--dim 32] [--module PATH] [--out DIR --label NAME]

``LiveBytes`` is a ``TorchDispatchMode`` that adds each new storage an operator returns and subtracts it when the
storage is freed: the peak of what the code holds at once, forward and backward. The same operators allocate the
same tensors on CUDA, so this is the transient memory a loss adds to a GPU step, less the allocator's rounding and
kernels' workspaces. Tensors made before the block (parameters, inputs) are not counted.

The script measures ``voxel_consensus_loss`` (``splatsem_ns/models/smoothness.py``, or the function of that name in
``--module``, e.g. an earlier version of the file) over ``--gaussians`` Gaussians with ``--dim``-channel latents (the
defaults: chorus-splat's latent on ScanNet scene0000_00 after 2000 steps), forward then backward.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import weakref
from pathlib import Path
from typing import Callable, Dict, Set

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Bytes of storages created by operators inside the block and still alive: ``live`` now, ``peak`` so far.
    Views share their base's storage and count once. Subclasses hear of each storage through ``allocated`` and
    ``freed``."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: Set[int] = set()

    def allocated(self, key: int, nbytes: int) -> None:
        """A new storage (``key``: its address) of ``nbytes``, just returned by an operator."""

    def freed(self, key: int, nbytes: int) -> None:
        """The storage at ``key`` was freed."""
        self._alive.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._alive:
                continue
            self._alive.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            self.allocated(key, nbytes)
            weakref.finalize(storage, self.freed, key, nbytes)
        return out


def load_loss(module: Path | None) -> Callable:
    if module is None:
        from splatsem_ns.models.smoothness import voxel_consensus_loss

        return voxel_consensus_loss
    spec = importlib.util.spec_from_file_location("measured_smoothness", module)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)  # type: ignore[union-attr]
    return loaded.voxel_consensus_loss


def measure_voxel_prior(loss_fn: Callable, gaussians: int, dim: int, seed: int = 0) -> Dict[str, float]:
    """Peak bytes per Gaussian of the prior's forward, what it holds for backward, and the peak through backward
    (the latent's gradient included)."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.nn.Parameter(torch.randn(gaussians, dim, generator=generator))
    means = (
        torch.rand(gaussians, 3, generator=generator) * 4.0
    )  # a 4 m room at 5 cm voxels: about 3 per voxel
    weights = torch.rand(gaussians, generator=generator)
    counter = LiveBytes()
    with counter:
        loss = loss_fn(latent, means, weights, 0.05, torch.rand(3, generator=generator) * 0.05)
        forward_peak, held = counter.peak, counter.live
        loss.backward()
    return {
        "forward_peak_bytes_per_gaussian": round(forward_peak / gaussians, 1),
        "held_for_backward_bytes_per_gaussian": round(held / gaussians, 1),
        "peak_with_backward_bytes_per_gaussian": round(counter.peak / gaussians, 1),
        "peak_with_backward_mib": round(counter.peak / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gaussians", type=int, default=643_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument(
        "--module", type=Path, help="a file defining voxel_consensus_loss (default: the package's)"
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--label", default="voxel_prior_memory_cpu")
    args = parser.parse_args()
    result = {
        "benchmark": "live_bytes", "function": "voxel_consensus_loss", "device": "cpu",
        "module": str(args.module or "splatsem_ns/models/smoothness.py"), "gaussians": args.gaussians,
        "dim": args.dim, **measure_voxel_prior(load_loss(args.module), args.gaussians, args.dim),
    }  # fmt: skip
    print(json.dumps(result, indent=2), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.label}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
