"""Query-to-image speed: render the semantic latent, decode it with a teacher head, compute LERF relevancy.

A chorus-splat model with ``--gaussians`` random Gaussians (about 1M by default, spread through a room-sized
box) and a projector head of a full-size language teacher (SigLIP2-B: 768 channels) is timed at 1280x720 on:

- ``query@teacher``: the latent rendered at the teacher's feature resolution (what the viewer panel does),
  decoded, relevancy against one positive and LERF's four negatives, upsampled to the full frame;
- ``query@full``: the same with the latent rendered at full resolution;
- ``query@full, folded``: the viewer's full-resolution path: the latent rendered at full resolution and the text
  folded into the head (``models/folded_query.py``), in float32 and in bfloat16; no upsampling anywhere;
- ``fused kernel``: the fold as one Triton kernel (``models/fused_query.py``), with the norm in the Gram form and
  in the factored one (``FoldedQuery``'s default for 16-bit operands); called directly, so a kernel that fails
  drops its row rather than timing a fallback;
- ``triton``: the Triton rasterizer (``rendering/triton_rasterizer.py``): the latent render alone, that render
  followed by the one-kernel fold, the fused path that composites each tile's latent in registers and ends in
  the fold (no latent written) in both norm forms, and the model's own viewer path (the latent rendered by the
  model, then ``FoldedQuery``'s fused fold), alone and in a whole frame, with the latent by gsplat (the default)
  and by the Triton rasterizer (``viewer_latent_triton``, which in a frame reuses the RGB pass's projection); with
  ``projection+binning only`` (gsplat's projection and tile intersection, which both renders start with) for the
  breakdown. The model's rows include its per-frame host work (camera, intrinsics), the bare rows do not; the rows
  ending ``camera read as before`` are the model's viewer path reading the camera (and, in a frame, the background)
  the way it did before those reads stopped waiting for the GPU (``camera_read_as_before``);
- ``frame+query@full, folded bfloat16``: a whole viewer frame with the panel's "Full resolution" on, the latent
  rendered by gsplat from a projection of its own and folded eagerly (the viewer's path before the fused fold);
  the same with the fused fold (``gsplat latent projected again``: the frame before
  ``semantic_shares_rgb_projection``, against the triton rows' ``viewer path, gsplat latent`` frame, which
  composites the latent through the RGB pass's projection); and ``frame@full, RGB+depth only``, the frame without
  the latent;
- ``frame+query@teacher``: a whole viewer frame, i.e. RGB + depth render and ``query@teacher``;
- with ``--supersample 1 4``, the teacher-grid paths again with the semantic pass supersampled 4 x 4.

Every row that renders through the model's eval path (``get_outputs``, its latent or relevancy alone) gets a new
camera each frame, copied up from the host as nerfstudio's viewer makes one per frame: the model keeps what it read
from the last camera (``EvalCameraReads``), which the same camera object reused frame after frame would hand on.

Random parameters cost the same as trained ones. Text embeddings are computed once per change of text, so a
fixed random query vector stands in for them here. Times are medians over ``--frames`` after warm-up,
synchronised on the GPU.

    python benchmarks/query_speed.py --out DIR [--gaussians 1000000] [--width 1280 --height 720]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, peak_memory_gib, seed_everything, sync, write_markdown  # noqa: E402


def build_model(
    num_gaussians: int, feature_dim: int, latent_dim: int, grid: tuple[int, int], size: tuple[int, int]
):
    from nerfstudio.data.scene_box import SceneBox

    from splatsem_ns.models.chorus_splat import ChorusSplatModelConfig
    from splatsem_ns.teachers.base import TEACHER_SPECS_KEY, TeacherSpec
    from splatsem_ns.teachers.registry import make_teacher_config

    spec = TeacherSpec("siglip2", feature_dim, grid, size, True, make_teacher_config("siglip2-b16"))
    seed = torch.rand(1000, 3) * 4 - 2
    with warnings.catch_warnings():  # LPIPS weights are not needed here
        warnings.simplefilter("ignore")
        model = ChorusSplatModelConfig(semantic_source=_latent_source(latent_dim)).setup(
            scene_box=SceneBox(torch.tensor([[-2.0, -2.0, -2.0], [2.0, 2.0, 2.0]])),
            num_train_data=1,
            metadata={TEACHER_SPECS_KEY: {"siglip2": spec}},
            seed_points=(seed, torch.full((1000, 3), 128, dtype=torch.uint8)),
        )
    n = num_gaussians
    params = {
        "means": torch.rand(n, 3) * 4 - 2,
        "scales": torch.log(torch.rand(n, 3) * 0.02 + 0.005),
        "quats": F.normalize(torch.randn(n, 4), dim=-1),
        "features_dc": torch.randn(n, 3) * 0.5,
        "features_rest": torch.zeros(n, 15, 3),
        "opacities": torch.logit(torch.rand(n, 1) * 0.8 + 0.1),
        "semantic_latent": torch.randn(n, latent_dim),
    }
    for name, value in params.items():
        model.gauss_params[name] = torch.nn.Parameter(value)
    model.step = 30000  # full SH degree, as in a trained model
    return model.eval()


def _latent_source(latent_dim: int):
    from splatsem_ns.models.semantic_source import LearnedLatentSourceConfig

    return LearnedLatentSourceConfig(latent_dim=latent_dim)


def camera(width: int, height: int, device: torch.device):
    from nerfstudio.cameras.cameras import Cameras, CameraType

    c2w = torch.eye(4)[:3][None]
    c2w[0, 2, 3] = 3.0  # 3 units back, looking down -z into the box (nerfstudio's OpenGL convention)
    focal = 0.9 * width
    return Cameras(
        camera_to_worlds=c2w, fx=focal, fy=focal, cx=width / 2, cy=height / 2,
        width=width, height=height, camera_type=CameraType.PERSPECTIVE,
    ).to(device)  # fmt: skip


def new_camera_per_frame(host_camera, device: torch.device) -> Callable[[], object]:
    """A function that gives a new ``device`` copy of ``host_camera`` each call, as nerfstudio's viewer builds each
    frame's camera on the host and moves it to the model's device (a copy even where that device is the host)."""
    import copy

    def frame_camera():
        return host_camera.to(device) if device.type != "cpu" else copy.deepcopy(host_camera)

    return frame_camera


def time_it(fn, frames: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(frames):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


@contextmanager
def full_resolution(model, triton_latent: bool = False, share_projection: bool = True):
    """The viewer's "Full resolution" setting: eval-mode semantic renders at the camera's own resolution, their
    latent through the Triton rasterizer if ``triton_latent`` (``viewer_latent_triton``), else gsplat's, inside a
    frame through the RGB pass's projection if ``share_projection`` (``semantic_shares_rgb_projection``)."""
    config = model.config
    model.viewer_semantic_scale = 1.0
    config.viewer_latent_triton, config.semantic_shares_rgb_projection = triton_latent, share_projection
    try:
        yield
    finally:
        model.viewer_semantic_scale = None
        config.viewer_latent_triton, config.semantic_shares_rgb_projection = False, True


@contextmanager
def camera_read_as_before(model, host_background=None):
    """Eval renders as they read the camera and background before they stopped waiting for the GPU there: the
    intrinsics matrix built on the host by nerfstudio (four reads of the device camera and a blocking copy), the size
    read with two ``.item()`` calls, and splatfacto's eval background copied from the host every frame. Rows ending
    "camera read as before" time that beside the default in the same run; they pass ``host_background``, the
    background's host copy made once, so that making it is not timed."""
    import types

    from nerfstudio.models.splatfacto import SplatfactoModel, get_viewmat

    def host_read(camera):
        K = camera.get_intrinsics_matrices().to(camera.device)
        return K, int(camera.width.item()), int(camera.height.item())

    class ReadEachTime:  # nothing kept from one render of a camera to the next, as before EvalCameraReads
        def viewmat(self, camera):
            return get_viewmat(camera.camera_to_worlds)

        def intrinsics(self, camera):
            return host_read(camera)

        def size(self, camera):
            return host_read(camera)[1:]

    # Every eval render reads its camera through _eval_camera_reads; the training path is not timed here.
    background, reads = model.background_color, model._eval_camera_reads
    model._eval_camera_reads = ReadEachTime()
    model.background_color = background.cpu() if host_background is None else host_background
    model._get_background_color = types.MethodType(SplatfactoModel._get_background_color, model)
    try:
        yield
    finally:
        model.background_color, model._eval_camera_reads = background, reads
        del model._get_background_color


def triton_rows(
    model, cam, frame_camera, fused_fold, float32_fold, W: int, H: int, configs: Sequence[str] = ()
):
    """Rows of the Triton rasterizer, as (name, fn, supersample, relevancy map for the agreement or None); none
    where it cannot run (no Triton, no GPU, a head it does not take), so the run goes on without them. The
    relevancy of the latent render is its latent through ``float32_fold``. ``cam``: the camera on the device, for the
    bare kernels; ``frame_camera()``: a new one per frame, for the model's eval path. ``configs`` ("BLOCKxWARPS", e.g.
    "16x4") add a row of the fused path per kernel setting besides its default."""
    try:
        from splatsem_ns.models.chorus_splat import _MIN_ALPHA, semantic_tile_size
        from splatsem_ns.rendering.triton_rasterizer import project_and_bin, rasterize_features_triton

        with full_resolution(model):
            supported = model.query_relevancy_supported(fused_fold, cam)
        if not supported:
            print("Triton rasterizer rows skipped: not supported here", flush=True)
            return []
    except Exception as err:  # noqa: BLE001 (the other rows do not need it)
        print(f"Triton rasterizer rows skipped: {type(err).__name__}: {err}", flush=True)
        return []
    from nerfstudio.models.splatfacto import get_viewmat

    # The model's full-resolution semantic render (render_semantic_latent at scale 1.0), its inputs fixed once.
    means, quats = model.means.detach(), model.quats.detach()
    scales, opacities = torch.exp(model.scales).detach(), torch.sigmoid(model.opacities).squeeze(-1).detach()
    latent = model.semantic_source(model.gauss_params).detach()
    # nerfstudio builds the intrinsics on the host whatever the camera's device; gsplat takes them on the GPU.
    viewmat, K = get_viewmat(cam.camera_to_worlds), cam.get_intrinsics_matrices().to(means.device)
    tile = semantic_tile_size(model.config.semantic_tile_size, W * H)
    mode = model.config.semantic_rasterize_mode or model.config.rasterize_mode
    normalize = _MIN_ALPHA if model.config.semantic_alpha_normalize else None

    @torch.no_grad()
    def binning():
        return project_and_bin(
            means, quats, scales, opacities, viewmat, K, W, H, rasterize_mode=mode, tile_size=tile
        )

    @torch.no_grad()
    def render_latent():  # normalised inside the kernel, as the model's viewer path renders it
        t = binning()
        out, _ = rasterize_features_triton(
            t.means2d, t.conics, t.opacities, latent, t.isect_offsets, t.flatten_ids, W, H, tile,
            normalize_min_alpha=normalize,
        )  # fmt: skip
        return out

    def query(**kernel_options):
        @torch.no_grad()
        def run():  # what the viewer's panel calls per frame, at full resolution
            with full_resolution(model):
                return model.render_query_relevancy(frame_camera(), fused_fold, **kernel_options)

        return run

    @torch.no_grad()
    def latent_then_fold():  # the latent render's agreement: its latent through the float32 fold
        return float32_fold(render_latent()[0])

    @torch.no_grad()
    def render_then_fused_fold():  # the latent render above, then the one-kernel fold, as two launches
        return fused_fold(render_latent()[0])

    host_background = model.background_color.cpu()  # for the "camera read as before" rows

    @contextmanager
    def viewer_path(triton_latent: bool, as_before: bool):
        """The panel's full-resolution settings, with the camera read as before where asked."""
        with (
            full_resolution(model, triton_latent),
            camera_read_as_before(model, host_background) if as_before else nullcontext(),
        ):
            yield

    def viewer_query(triton_latent: bool, as_before: bool = False):
        @torch.no_grad()
        def run():  # the panel's relevancy with the latent left out of the frame: the model renders it alone
            with viewer_path(triton_latent, as_before):
                return fused_fold(model.render_viewer_latent(frame_camera()))

        return run

    def viewer_frame_query(triton_latent: bool, as_before: bool = False):
        @torch.no_grad()
        def run():  # a whole viewer frame: RGB + depth, the latent (with triton_latent: from their projection), fold
            with viewer_path(triton_latent, as_before):
                outputs = model.get_outputs(frame_camera())
                return outputs["rgb"], fused_fold(outputs["semantic_latent"])

        return run

    rows = [
        (
            "query@full, fused raster+fold (triton, Gram norm)",
            query(factored=False),
            1,
            query(factored=False),
        ),
        (
            "query@full, fused raster+fold (triton, factored norm)",
            query(factored=True),
            1,
            query(factored=True),
        ),
        ("query@full, triton render + fused fold", render_then_fused_fold, 1, render_then_fused_fold),
        ("query@full, viewer path, gsplat latent + fused fold", viewer_query(False), 1, viewer_query(False)),
        (
            "query@full, viewer path, gsplat latent + fused fold, camera read as before",
            viewer_query(False, as_before=True),
            1,
            viewer_query(False, as_before=True),
        ),
        ("query@full, viewer path, triton latent + fused fold", viewer_query(True), 1, viewer_query(True)),
        ("render latent@full (triton)", render_latent, 1, latent_then_fold),
        ("projection+binning only", binning, 1, None),
        (
            "frame+query@full, viewer path, gsplat latent + fused fold",
            viewer_frame_query(False),
            1,
            lambda: viewer_frame_query(False)()[1],
        ),
        (
            "frame+query@full, viewer path, gsplat latent + fused fold, camera read as before",
            viewer_frame_query(False, as_before=True),
            1,
            lambda: viewer_frame_query(False, as_before=True)()[1],
        ),
        (
            "frame+query@full, viewer path, triton latent from the RGB pass's projection + fused fold",
            viewer_frame_query(True),
            1,
            lambda: viewer_frame_query(True)()[1],
        ),
    ]
    for config in configs:
        block, warps, *edge = (int(v) for v in config.split("x"))
        options = {"block_gaussians": block, "num_warps": warps, **({"tile_size": edge[0]} if edge else {})}
        run = query(**options)
        tiles = f", {edge[0]}-pixel tiles" if edge else ""
        rows.append(
            (f"query@full, fused raster+fold (triton, {block} Gaussians x {warps} warps{tiles})", run, 1, run)
        )
    return rows


def profile_rows(rows, out: Path, frames: int) -> dict:
    """Each ``(name, fn)`` run ``frames`` times under torch.profiler, after the timing: what a row spends on the
    host (the per-frame work around the kernels) beside what its kernels take on the GPU. The operator tables go
    to ``out/profile_<n>.txt``; returned: the file and the per-frame totals by row name."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiles = {}
    for index, (name, fn) in enumerate(rows):
        fn()  # warm (compiled paths, caches)
        sync()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(frames):
                fn()
            sync()
        averages = prof.key_averages()
        host_us = sum(event.self_cpu_time_total for event in averages)
        # Kernels and copies only: an operator that launches a kernel carries that kernel's time as its own too.
        gpu_us = sum(
            event.self_device_time_total
            for event in averages
            if event.device_type != torch.autograd.DeviceType.CPU
            and not getattr(event, "is_user_annotation", False)
        )
        sort_gpu = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        path = out / f"profile_{index}.txt"
        path.write_text(
            f"# {name}: {frames} frames under torch.profiler\n\n"
            f"host {host_us / frames / 1000:.3f} ms a frame (operators' own CPU time), "
            f"GPU {gpu_us / frames / 1000:.3f} ms a frame (their kernels)\n\n"
            "## By host time\n\n"
            + averages.table(sort_by="self_cpu_time_total", row_limit=40)
            + "\n\n## By GPU time\n\n"
            + averages.table(sort_by=sort_gpu, row_limit=30)
            + "\n"
        )
        profiles[name] = {
            "file": path.name,
            "host_ms_per_frame": round(host_us / frames / 1000, 3),
            "gpu_ms_per_frame": round(gpu_us / frames / 1000, 3),
        }
        print(f"profiled {name}: {profiles[name]}", flush=True)
    return profiles


def sync_points(fn) -> list:
    """Where one call of ``fn`` makes the host wait for the GPU (``step_regions.watched_syncs``: reading a value
    back, a blocking copy), as (ms since the call began, the innermost frames of this project and its libraries). A
    wait while GPU work is still queued stops the host from preparing the rest of the frame meanwhile, so the times
    show which one costs."""
    from step_regions import frame_name, watched_syncs

    fn()  # warm
    sync()
    points = []
    began = time.perf_counter()

    def record(frames, origin: str) -> None:
        names = [frame_name(f) for f in frames[-6:]] or [origin]
        points.append((round(1000 * (time.perf_counter() - began), 3), names))

    with watched_syncs(record):
        began = time.perf_counter()
        fn()
    sync()
    points.append((round(1000 * (time.perf_counter() - began), 3), ["end (after the final synchronise)"]))
    return points


def trace_sync_rows(rows, out: Path) -> dict:
    """``sync_points`` of each ``(name, fn)``, each into ``out/syncs_<n>.txt``; returned: file and count by row."""
    traces = {}
    if not torch.cuda.is_available():
        return traces
    for index, (name, fn) in enumerate(rows):
        points = sync_points(fn)
        path = out / f"syncs_{index}.txt"
        lines = [f"# {name}: synchronising calls of one frame (ms since it began)", ""]
        for ms, stack in points:
            lines += [f"{ms:9.3f} ms  {stack[-1]}", *[f"             {frame}" for frame in stack[-2::-1]]]
        path.write_text("\n".join(lines) + "\n")
        traces[name] = {"file": path.name, "syncs": len(points) - 1, "ms": points[-1][0]}
        print(f"sync trace {name}: {traces[name]}", flush=True)
    return traces


def main() -> None:
    from splatsem_ns.models.folded_query import _FAILED as _FOLD_FAILED
    from splatsem_ns.models.folded_query import FoldedQuery
    from splatsem_ns.models.fused_query import fused_available, fused_relevancy
    from splatsem_ns.models.relevancy import lerf_relevancy

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--gaussians", type=int, default=1_000_000)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--feature-dim", type=int, default=768, help="teacher channels (SigLIP2-B: 768)")
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--stride", type=int, default=16, help="teacher patch size in pixels at 512-px input")
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--supersample",
        nargs="+",
        type=int,
        default=[1],
        help="semantic_supersample values to time the teacher-grid paths with (query@full is unaffected)",
    )
    parser.add_argument(
        "--triton-configs",
        nargs="*",
        default=["16x4", "16x8", "32x4", "64x8", "32x4x8", "16x2x8"],
        help="extra settings of the fused Triton path to time, BLOCKxWARPS[xTILE] (Gaussians per step x warps per "
        "tile program [x tile edge in pixels; smaller tiles keep the epilogue's registers smaller])",
    )
    parser.add_argument(
        "--profile-rows",
        nargs="*",
        default=[
            "query@full, viewer path, gsplat latent + fused fold",
            "query@full, viewer path, triton latent + fused fold",
            "query@full, triton render + fused fold",
            "frame+query@full, viewer path, gsplat latent + fused fold",
            "query@full, viewer path, gsplat latent + fused fold, camera read as before",
        ],  # fmt: skip
        help="rows to run again under torch.profiler after the timing (operators by host and by GPU time, per "
        "frame), each into profile_<n>.txt beside the report, and once more with their synchronising calls traced "
        "(syncs_<n>.txt, GPU only); none: neither",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seed_everything(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    W, H = args.width, args.height
    grid = (round(512 * H / max(W, H) / args.stride), round(512 * W / max(W, H) / args.stride))
    model = build_model(args.gaussians, args.feature_dim, args.latent_dim, grid, (H, W)).to(device)
    host_cam = camera(W, H, torch.device("cpu"))
    cam = host_cam.to(device)
    frame_camera = new_camera_per_frame(host_cam, device)
    text = F.normalize(torch.randn(5, args.feature_dim, device=device), dim=-1)  # 1 positive, 4 negatives

    def relevancy_image(latent):
        features = model.decode_features(latent, "siglip2")
        relevancy = lerf_relevancy(features, text[:1], text[1:])  # [h, w, 1]
        return F.interpolate(relevancy.permute(2, 0, 1)[None], size=(H, W), mode="bilinear")[0]

    teacher_scale = grid[1] / W

    @torch.no_grad()
    def query_teacher():
        return relevancy_image(model.render_semantic_latent(cam, scale=teacher_scale))

    @torch.no_grad()
    def query_full():
        return relevancy_image(model.render_semantic_latent(cam, scale=1.0))

    @torch.no_grad()
    def frame_and_query():
        outputs = model.get_outputs(frame_camera())
        return outputs["rgb"], relevancy_image(outputs["semantic_latent"])

    head = model.projector_heads["siglip2"]
    folded = {
        (dtype, compiled): FoldedQuery(head, text[:1], text[1:], compute_dtype=dtype, compiled=compiled)
        for dtype in (torch.float32, torch.bfloat16)
        for compiled in (False, True)
    }
    # The one-kernel Triton fold (models/fused_query.py), float16 with float32 sums.
    folded[torch.bfloat16, "fused"] = FoldedQuery(
        head, text[:1], text[1:], compute_dtype=torch.bfloat16, fused=True
    )

    def query_full_folded(dtype, compiled=False):
        # The viewer's path: every pixel rendered, the text folded into the head (no [H, W, C] map).
        @torch.no_grad()
        def run():
            return folded[dtype, compiled](model.render_semantic_latent(cam, scale=1.0))

        return run

    @torch.no_grad()
    def render_full():
        return model.render_semantic_latent(cam, scale=1.0)

    latent_full = render_full()

    def fold_only(dtype, compiled):
        @torch.no_grad()
        def run():
            return folded[dtype, compiled](latent_full)

        return run

    def fused_kernel(factored: bool, render: bool):
        # The one-kernel fold called directly, not through FoldedQuery's fallbacks: a kernel that fails to compile
        # then drops its row instead of timing the unfused fold under its name.
        @torch.no_grad()
        def run():
            latent = model.render_semantic_latent(cam, scale=1.0) if render else latent_full
            return fused_relevancy(latent, folded[torch.bfloat16, "fused"].operands(factored=factored))

        return run

    def frame_and_query_full(fold):
        # A whole viewer frame with the panel's "Full resolution" on: RGB + depth + latent at 1280x720, the latent
        # by gsplat from a projection of its own (semantic_shares_rgb_projection off), then ``fold``.
        @torch.no_grad()
        def run():
            with full_resolution(model, share_projection=False):
                outputs = model.get_outputs(frame_camera())
                return outputs["rgb"], fold(outputs["semantic_latent"])

        return run

    @torch.no_grad()
    def frame_only():  # the same frame without the latent: what a query adds to a frame is the difference
        model.viewer_latent_deferred = True
        try:
            return model.get_outputs(frame_camera())["rgb"]
        finally:
            model.viewer_latent_deferred = False

    with torch.no_grad():
        coverage = float(model.get_outputs(frame_camera())["accumulation"].mean())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rows = {}
    fused = fused_available(latent_full, folded[torch.bfloat16, "fused"].front_weights)
    # Rows whose first run may fail (Triton kernels): (name, function, supersample, agreement check).
    checked = [
        (f"{what}, fused kernel{form}", fused_kernel(factored, render), 1, fused_kernel(factored, False))
        for what, render in (("query@full", True), ("fold only", False))
        for form, factored in ((", Gram norm", False), (", factored norm", True))
        if fused  # no Triton or no GPU: nothing to time
    ]
    paths = [
        ("query@full", query_full, 1),
        ("query@full, folded float32", query_full_folded(torch.float32), 1),
        ("query@full, folded bfloat16", query_full_folded(torch.bfloat16), 1),
        ("query@full, folded bfloat16 compiled", query_full_folded(torch.bfloat16, True), 1),
        ("render latent@full only", render_full, 1),
        ("fold only, bfloat16", fold_only(torch.bfloat16, False), 1),
        ("fold only, bfloat16 compiled", fold_only(torch.bfloat16, True), 1),
        *[row[:3] for row in checked],
        ("frame+query@full, folded bfloat16", frame_and_query_full(folded[torch.bfloat16, False]), 1),
        (
            "frame+query@full, gsplat latent projected again + fused fold",
            frame_and_query_full(folded[torch.bfloat16, "fused"]),
            1,
        ),
        ("frame@full, RGB+depth only", frame_only, 1),
    ]
    # Supersampling renders k x k pixels per teacher cell (see ChorusSplatModelConfig.semantic_supersample).
    for k in args.supersample:
        suffix = "" if k == 1 else f", supersample {k}"
        paths += [
            (f"query@teacher{suffix}", query_teacher, k),
            (f"frame+query@teacher{suffix}", frame_and_query, k),
        ]
    # How far each fast fold's map is from the float32 fold's, on the same rendered latent (relevancy in [0, 1]).
    with torch.no_grad():
        reference = folded[torch.float32, False](latent_full).float()
        agreement = {
            str(key): float((folded[key](latent_full).float() - reference).abs().max())
            for key in [(torch.bfloat16, False), (torch.bfloat16, True)]
        }
    # The Triton rasterizer's rows go after the fused kernel's, where this run's gsplat rows can be read beside them.
    triton_paths = triton_rows(
        model, cam, frame_camera, folded[torch.bfloat16, "fused"], folded[torch.float32, False], W, H,
        args.triton_configs,
    )  # fmt: skip
    at = [name for name, _, _ in paths].index("frame+query@full, folded bfloat16")
    paths[at:at] = [row[:3] for row in triton_paths]
    dropped = {}
    # Each Triton row's first run: a failure drops that row, not the run.
    for name, fn, _, check in [*checked, *triton_paths]:
        try:
            with torch.no_grad():
                if check is not None:
                    agreement[name] = float((check().float() - reference).abs().max())
                else:
                    fn()
        except Exception as err:  # noqa: BLE001
            print(f"Triton row dropped: {name}: {type(err).__name__}: {err}", flush=True)
            dropped[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    paths = [row for row in paths if row[0] not in dropped]
    print("max |relevancy - float32 fold|:", agreement, flush=True)
    for name, fn, k in paths:
        model.config.semantic_supersample = k
        ms = time_it(fn, args.frames, args.warmup)
        rows[name] = {"ms": round(ms, 3), "fps": round(1000.0 / ms, 1)}
        print(name, rows[name], flush=True)
    profiles = profile_rows(
        [(name, fn) for name, fn, _ in paths if name in args.profile_rows], args.out, args.frames
    )
    syncs = trace_sync_rows([(name, fn) for name, fn, _ in paths if name in args.profile_rows], args.out)
    report = {
        "benchmark": "query_speed",
        "device": device_name(),
        "max_abs_difference_to_float32_fold": agreement,
        "torch": torch.__version__,
        "gaussians": args.gaussians,
        "resolution": [W, H],
        "teacher_grid": list(grid),
        "feature_dim": args.feature_dim,
        "latent_dim": args.latent_dim,
        "frame_coverage_alpha_mean": round(coverage, 3),
        "peak_gpu_mem_gib": peak_memory_gib(),
        "results": rows,
        "rows_dropped": dropped,
        "profiles": profiles,
        "sync_traces": syncs,
        # FoldedQuery's fused flag falls back to the unfused fold if the kernel fails: rows timed through it say so.
        "fused_fold_fell_back": "fused" in _FOLD_FAILED,
        "target": "at least 400 relevancy frames per second at full resolution (1280x720) with about 1M Gaussians",
    }
    (args.out / "query_speed.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Query-to-image speed",
        "",
        f"- device: {report['device']}; torch {report['torch']}; {args.gaussians} random Gaussians; "
        f"{W}x{H}; mean alpha {coverage:.2f}",
        f"- head: latent {args.latent_dim} -> {args.feature_dim} channels (SigLIP2-B); teacher grid {grid[0]}x{grid[1]}",
        f"- target: {report['target']}",
        "",
        "| path | ms / frame (median) | frames / s |",
        "|---|---|---|",
        *[f"| {k} | {v['ms']} | {v['fps']} |" for k, v in rows.items()],
        "",
        "Max |relevancy - float32 fold of the gsplat latent| over the frame (relevancy in [0, 1]):",
        "",
        *[f"- {k}: {v:.3g}" for k, v in agreement.items()],
    ]
    if dropped:
        lines += [
            "",
            "Rows dropped (their first run failed):",
            "",
            *[f"- {k}: {v}" for k, v in dropped.items()],
        ]
    if profiles:
        lines += ["", "Rows run again under torch.profiler (host: the operators' own CPU time per frame; GPU: their "
                  "kernels' time per frame):", "",
                  *[f"- {k}: {v['file']} (host {v['host_ms_per_frame']} ms, GPU {v['gpu_ms_per_frame']} ms a "
                    f"frame)" for k, v in profiles.items()]]  # fmt: skip
    if syncs:
        lines += ["", "The same rows' synchronising calls in one frame (`torch.cuda.set_sync_debug_mode`; gsplat's own, "
                  "inside its extension, not seen):", "",
                  *[f"- {k}: {v['file']} ({v['syncs']} syncs, {v['ms']} ms traced)" for k, v in syncs.items()]]  # fmt: skip
    if report["fused_fold_fell_back"]:
        lines += ["", "**The fused fold failed in this run**: rows through FoldedQuery's fused flag (the triton "
                  "render + fused fold row) timed the unfused fold."]  # fmt: skip
    write_markdown(args.out / "query_speed.md", lines)


if __name__ == "__main__":
    main()
