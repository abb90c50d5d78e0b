"""Time the Gaussian encoder's backbones on a synthetic room: ``python benchmarks/encoder_speed.py``.

Two layouts of N random Gaussians in a room of ``extent`` metres: "volume" (uniform in the cube: almost every
Gaussian alone in its 2 cm voxel, few neighbours; the worst case for voxel count) and "surfaces" (on the floor,
ceiling, walls and a few boxes, as reconstructed scenes are: many Gaussians per voxel, dense neighbourhoods).
Prints one JSON line per backbone: voxels, parameters, forward and forward+backward seconds (median of
``--repeats`` after one warm-up; kernel maps are rebuilt every pass, as in training), peak CUDA memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Dict, List

import torch
from torch import Tensor

from splatsem_ns.encoders.encoder import GaussianEncoder, GaussianEncoderConfig
from splatsem_ns.encoders.voxelize import voxelize


def room_gaussians(
    num: int, extent: float = 4.0, layout: str = "volume", seed: int = 0, device: str = "cpu"
) -> Dict[str, Tensor]:
    """Splatfacto-shaped random Gaussians in a cubic room (see the module docstring for the layouts)."""
    generator = torch.Generator().manual_seed(seed)
    if layout == "volume":
        means = torch.rand(num, 3, generator=generator) * extent
    elif layout == "surfaces":
        uv = torch.rand(num, 2, generator=generator)
        face = torch.randint(0, 9, (num,), generator=generator)
        means = torch.empty(num, 3)
        for f in range(9):
            rows = face == f
            if f < 6:  # the six room faces: axis f // 2 fixed at 0 or extent
                axis, side = f // 2, float(f % 2) * extent
                other = [a for a in range(3) if a != axis]
                means[rows, axis] = side
                means[rows[:, None].expand(-1, 3) & torch.tensor([a in other for a in range(3)])] = (
                    uv[rows] * extent
                ).reshape(-1)
            else:  # three boxes' tops (tables, beds): horizontal planes 0.5 to 1 m up
                centre = torch.tensor([1.0 + f - 6, 1.0 + (f - 6) * 0.8])
                means[rows, 0:2] = centre + (uv[rows] - 0.5) * 1.2
                means[rows, 2] = 0.5 + 0.25 * (f - 6)
        means += (
            torch.randn(num, 3, generator=generator) * 0.003
        )  # surface thickness of a real reconstruction
    else:
        raise ValueError(f"Unknown layout '{layout}': use volume or surfaces.")
    params = {
        "means": means,
        "features_dc": torch.randn(num, 3, generator=generator),
        "opacities": torch.randn(num, 1, generator=generator),
        "scales": torch.randn(num, 3, generator=generator) * 0.5 - 4.5,
        "quats": torch.randn(num, 4, generator=generator),
    }
    return {k: v.to(device) for k, v in params.items()}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_backbone(
    backbone: str, gaussians: Dict[str, Tensor], voxel_size: float, repeats: int, device: str
) -> Dict[str, object]:
    """Forward and forward+backward seconds of a default-size encoder with ``backbone``."""
    torch.manual_seed(0)
    encoder = (
        GaussianEncoder(GaussianEncoderConfig(backbone=backbone, voxel_size=voxel_size)).to(device).train()
    )
    forward_times: List[float] = []
    total_times: List[float] = []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for i in range(repeats + 1):
        encoder.zero_grad(set_to_none=True)
        _sync(device)
        start = time.perf_counter()
        latent = encoder.forward_gauss_params(gaussians)
        _sync(device)
        middle = time.perf_counter()
        latent.square().mean().backward()
        _sync(device)
        end = time.perf_counter()
        if i:  # the first pass warms up allocators and kernels
            forward_times.append(middle - start)
            total_times.append(end - start)
    voxels = voxelize(gaussians["means"], voxel_size)
    return {
        "backbone": backbone,
        "gaussians": gaussians["means"].shape[0],
        "voxels": voxels.num_voxels,
        "parameters": sum(p.numel() for p in encoder.parameters()),
        "backbone_parameters": sum(p.numel() for p in encoder.backbone.parameters()),
        "forward_s": round(statistics.median(forward_times), 3),
        "forward_backward_s": round(statistics.median(total_times), 3),
        "peak_cuda_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if device.startswith("cuda")
        else None,
        "device": device,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gaussians", type=int, default=100_000)
    parser.add_argument("--extent", type=float, default=4.0, help="room edge in metres")
    parser.add_argument("--voxel-size", type=float, default=0.02)
    parser.add_argument("--layout", choices=("volume", "surfaces"), default="volume")
    parser.add_argument("--backbones", nargs="+", default=["SpUNet-v1", "PTv3-lite-v1"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gaussians = room_gaussians(args.gaussians, args.extent, args.layout, device=args.device)
    for backbone in args.backbones:
        result = time_backbone(backbone, gaussians, args.voxel_size, args.repeats, args.device)
        print(json.dumps({"layout": args.layout, **result}), flush=True)


if __name__ == "__main__":
    main()
