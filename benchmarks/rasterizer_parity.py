"""Parity and speed of the pure-PyTorch rasterizer against gsplat's CUDA kernels.

For random scenes (sizes x channels x resolutions x rasterize modes) it renders RGB+ED with backgrounds
through both backends of ``splatsem_ns.rendering.rasterize_gaussians``, backpropagates one fixed random
loss, and reports max/mean absolute differences of colour, alpha, expected depth and of the gradients
w.r.t. means, quats, scales, opacities and colors, plus forward/backward timings of both paths. The
torch path is skipped for scenes where its estimated time exceeds ``--torch-time-limit``.

Usage (CUDA machine with gsplat's kernels)::

    python benchmarks/rasterizer_parity.py --out benchmarks/results/rasterizer_parity

Quick end-to-end check without a GPU (torch path only, tiny scenes)::

    python benchmarks/rasterizer_parity.py --cpu-smoke --out /tmp/parity
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from splatsem_ns.rendering import bin_gaussians_to_tiles, project_gaussians, rasterize_gaussians

DIFF_KEYS = ("means", "quats", "scales", "opacities", "colors")
TILE_SIZE = 16


@dataclass(frozen=True)
class SceneSpec:
    n_gaussians: int
    channels: int
    width: int
    height: int
    rasterize_mode: str
    seed: int

    @property
    def name(self) -> str:
        return f"N={self.n_gaussians} D={self.channels} {self.width}x{self.height} {self.rasterize_mode}"


def make_scene(spec: SceneSpec, device: torch.device) -> Dict[str, Tensor]:
    """Random Gaussians filling a frustum-shaped box in front of one camera. Scales shrink with the cube
    root of N so that every size covers the image with a similar depth complexity."""
    g = torch.Generator().manual_seed(spec.seed)
    n = spec.n_gaussians
    z = 2.0 + 3.0 * torch.rand(n, generator=g)
    half_w = 0.5 * spec.width / (0.8 * spec.width) * 1.15
    half_h = 0.5 * spec.height / (0.8 * spec.width) * 1.15
    x = (2 * torch.rand(n, generator=g) - 1) * half_w * z
    y = (2 * torch.rand(n, generator=g) - 1) * half_h * z
    typical = 0.6 * (4.0 / max(n, 1)) ** (1 / 3)
    scales = typical * torch.exp(0.5 * torch.randn(n, 3, generator=g))
    scene = {
        "means": torch.stack([x, y, z], -1),
        "quats": torch.randn(n, 4, generator=g),
        "scales": scales,
        "opacities": 0.05 + 0.9 * torch.rand(n, generator=g),
        "colors": torch.rand(n, spec.channels, generator=g),
        "viewmats": torch.eye(4)[None],
        "Ks": torch.tensor(
            [[0.8 * spec.width, 0, spec.width / 2], [0, 0.8 * spec.width, spec.height / 2], [0, 0, 1]]
        )[None],
        "backgrounds": torch.rand(1, spec.channels, generator=g),
        "loss_render": torch.randn(1, spec.height, spec.width, spec.channels + 1, generator=g),
        "loss_alpha": torch.randn(1, spec.height, spec.width, 1, generator=g),
    }
    return {k: v.to(device=device, dtype=torch.float32) for k, v in scene.items()}


def count_pairs(scene: Dict[str, Tensor], spec: SceneSpec) -> int:
    """Pixel/Gaussian pairs the torch path evaluates (tile intersections x tile pixels)."""
    with torch.no_grad():
        radii, means2d, depths, _, _ = project_gaussians(
            scene["means"],
            scene["quats"],
            scene["scales"],
            scene["viewmats"],
            scene["Ks"],
            spec.width,
            spec.height,
        )
        bins = bin_gaussians_to_tiles(
            means2d,
            radii,
            depths,
            TILE_SIZE,
            math.ceil(spec.width / TILE_SIZE),
            math.ceil(spec.height / TILE_SIZE),
        )
    return int(bins.tile_ids.numel()) * TILE_SIZE * TILE_SIZE


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_backend(
    scene: Dict[str, Tensor], spec: SceneSpec, backend: str, repeats: int
) -> Tuple[Dict[str, Tensor], Dict[str, float]]:
    """One recorded forward/backward (outputs and gradients kept) plus ``repeats`` timed ones."""
    device = scene["means"].device
    outputs: Dict[str, Tensor] = {}
    fwd_times: List[float] = []
    bwd_times: List[float] = []
    for it in range(repeats + 1):
        inputs = {k: scene[k].detach().clone().requires_grad_(True) for k in DIFF_KEYS}
        _sync(device)
        t0 = time.perf_counter()
        render, alpha, _ = rasterize_gaussians(
            inputs["means"],
            inputs["quats"],
            inputs["scales"],
            inputs["opacities"],
            inputs["colors"],
            scene["viewmats"],
            scene["Ks"],
            spec.width,
            spec.height,
            backgrounds=scene["backgrounds"],
            render_mode="RGB+ED",
            rasterize_mode=spec.rasterize_mode,
            backend=backend,
        )
        _sync(device)
        t1 = time.perf_counter()
        loss = (render * scene["loss_render"]).sum() + (alpha * scene["loss_alpha"]).sum()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        if it == 0:  # the first call also pays for compilation and allocator warm-up
            outputs = {"render": render.detach(), "alpha": alpha.detach()}
            outputs.update({f"grad_{k}": inputs[k].grad for k in DIFF_KEYS})
        else:
            fwd_times.append(t1 - t0)
            bwd_times.append(t2 - t1)
        del render, alpha, loss, inputs
    timing = {
        "fwd_ms": 1000 * sorted(fwd_times)[len(fwd_times) // 2],
        "bwd_ms": 1000 * sorted(bwd_times)[len(bwd_times) // 2],
    }
    return outputs, timing


def compare(ours: Dict[str, Tensor], ref: Dict[str, Tensor], channels: int) -> Dict[str, Dict[str, float]]:
    """Max and mean absolute differences; "ref_max_abs" gives the scale of the reference values."""
    covered = ref["alpha"][..., 0] > 0.5  # expected depth is D / alpha: unstable where alpha is small
    pairs = {
        "color": (ours["render"][..., :channels], ref["render"][..., :channels]),
        "alpha": (ours["alpha"], ref["alpha"]),
        "expected_depth (alpha>0.5)": (
            ours["render"][..., channels][covered],
            ref["render"][..., channels][covered],
        ),
    }
    pairs.update({f"grad_{k}": (ours[f"grad_{k}"], ref[f"grad_{k}"]) for k in DIFF_KEYS})
    result = {}
    for name, (a, b) in pairs.items():
        if b.numel() == 0:
            continue
        diff = (a.double() - b.double()).abs()
        result[name] = {
            "max_abs": float(diff.max()),
            "mean_abs": float(diff.mean()),
            "ref_max_abs": float(b.double().abs().max()),
        }
    return result


def gsplat_status(device: torch.device) -> Optional[str]:
    """None when gsplat's kernels can run here, else the reason they cannot."""
    if device.type != "cuda":
        return "no CUDA device"
    try:
        from gsplat.cuda._backend import _C

        if _C is None:
            return "gsplat's CUDA extension failed to build or load"
    except Exception as exc:  # any import/build failure only disables the gsplat column
        return f"gsplat unavailable: {exc!r}"
    return None


def write_markdown(report: Dict, path: Path) -> None:
    env = report["environment"]
    lines = [
        "# Rasterizer parity: pure-PyTorch path vs gsplat CUDA",
        "",
        f"Device: {env['device']}; torch {env['torch']}; gsplat {env['gsplat']}; float32; render_mode RGB+ED "
        f"with backgrounds; timings are medians of {env['repeats']} runs after one warm-up.",
        "",
    ]
    if env["gsplat_status"]:
        lines += [f"gsplat column not run: {env['gsplat_status']}.", ""]
    lines += [
        "| scene | pairs (M) | gsplat fwd/bwd ms | torch fwd/bwd ms | color max | alpha max | depth max "
        "| grad means rel | grad quats rel | grad scales rel | grad opac rel | grad colors rel |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        g = row.get("gsplat") or {}
        t = row.get("torch") or {}
        gs = f"{g['fwd_ms']:.2f} / {g['bwd_ms']:.2f}" if "fwd_ms" in g else "-"
        ts = (
            f"{t['fwd_ms']:.1f} / {t['bwd_ms']:.1f}"
            if "fwd_ms" in t
            else f"skipped ({t.get('skipped', '-')})"
        )
        d = row.get("diff") or {}

        def cell(key: str, relative: bool = False, d=d) -> str:
            if key not in d:
                return "-"
            if relative:
                return f"{d[key]['max_abs'] / max(d[key]['ref_max_abs'], 1e-12):.1e}"
            return f"{d[key]['max_abs']:.1e}"

        lines.append(
            f"| {row['scene']} | {row['pairs'] / 1e6:.1f} | {gs} | {ts} | {cell('color')} | {cell('alpha')} "
            f"| {cell('expected_depth (alpha>0.5)')} | {cell('grad_means', True)} | {cell('grad_quats', True)} "
            f"| {cell('grad_scales', True)} | {cell('grad_opacities', True)} | {cell('grad_colors', True)} |"
        )
    lines += [
        "",
        "color/alpha/depth: max absolute difference. grad * rel: max absolute difference of the gradient "
        "divided by the largest gradient magnitude of gsplat. Full numbers (mean differences too) are in "
        "parity.json.",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for parity.json and parity.md")
    parser.add_argument("--cpu-smoke", action="store_true", help="torch path only, on CPU, tiny scenes")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="numbers of Gaussians")
    parser.add_argument("--channels", type=int, nargs="+", default=None, help="feature channels")
    parser.add_argument(
        "--resolutions", type=str, nargs="+", default=None, help="WIDTHxHEIGHT, e.g. 256x192 640x480"
    )
    parser.add_argument("--modes", nargs="+", default=["classic", "antialiased"], help="rasterize modes")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per backend after one warm-up")
    parser.add_argument(
        "--torch-time-limit",
        type=float,
        default=30.0,
        help="skip the torch path above this estimated time (s)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.cpu_smoke:
        device = torch.device("cpu")
        sizes = args.sizes or [300, 2000]
        channels = args.channels or [3, 35]
        resolutions = args.resolutions or ["64x48"]
        repeats = min(args.repeats, 3)
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: use --cpu-smoke for the CPU-only check")
        device = torch.device("cuda")
        sizes = args.sizes or [1_000, 20_000, 200_000]
        channels = args.channels or [3, 32]
        resolutions = args.resolutions or ["256x192", "640x480"]
        repeats = args.repeats
    status = gsplat_status(device)
    backends = ["torch"] if status else ["gsplat", "torch"]

    import gsplat

    report: Dict = {
        "environment": {
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu",
            "torch": torch.__version__,
            "gsplat": gsplat.__version__,
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "gsplat_status": status,
            "torch_time_limit_s": args.torch_time_limit,
        },
        "results": [],
    }
    # Pairs per second of the torch path (forward + backward); refined after every torch run.
    torch_rate = 5e8 if device.type == "cuda" else 5e6
    args.out.mkdir(parents=True, exist_ok=True)
    for n in sizes:
        for d in channels:
            for res in resolutions:
                width, height = (int(v) for v in res.lower().split("x"))
                for mode in args.modes:
                    spec = SceneSpec(n, d, width, height, mode, args.seed)
                    scene = make_scene(spec, device)
                    pairs = count_pairs(scene, spec)
                    row: Dict = {"scene": spec.name, "spec": asdict(spec), "pairs": pairs}
                    outputs = {}
                    for backend in backends:
                        estimate = pairs / torch_rate * (repeats + 1)
                        if backend == "torch" and estimate > args.torch_time_limit:
                            row["torch"] = {
                                "skipped": f"estimated {estimate:.0f} s > {args.torch_time_limit:.0f} s"
                            }
                            continue
                        t0 = time.perf_counter()
                        outputs[backend], row[backend] = run_backend(scene, spec, backend, repeats)
                        if backend == "torch":
                            torch_rate = max(pairs, 1) * (repeats + 1) / max(time.perf_counter() - t0, 1e-6)
                    if "gsplat" in outputs and "torch" in outputs:
                        row["diff"] = compare(outputs["torch"], outputs["gsplat"], d)
                    report["results"].append(row)
                    print(json.dumps({k: row[k] for k in row if k != "spec"}), flush=True)
                    # Written after every scene so that an interrupted run still leaves a report.
                    (args.out / "parity.json").write_text(json.dumps(report, indent=2))
                    write_markdown(report, args.out / "parity.md")
                    del scene, outputs
                    if device.type == "cuda":
                        torch.cuda.empty_cache()

    print(f"wrote {args.out / 'parity.json'} and {args.out / 'parity.md'}")


if __name__ == "__main__":
    main()
