"""Checks of the Triton rasterizer under Triton's CPU interpreter, one per command-line name.

Run by ``test_triton_rasterizer.py`` in subprocesses: the interpreter must be switched on before Triton's kernels
are defined, which a pytest process that imported them already cannot do.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # Triton's CPU interpreter: the kernels' arithmetic, without a GPU

import torch  # noqa: E402

from splatsem_ns.models.folded_query import FoldedQuery  # noqa: E402
from splatsem_ns.models.heads import ProjectorHead  # noqa: E402
from splatsem_ns.rendering.torch_rasterizer import rasterize_gaussians_torch  # noqa: E402
from splatsem_ns.rendering.triton_rasterizer import (  # noqa: E402
    fold_operands_for,
    rasterize_features_triton,
    rasterize_relevancy_triton,
    render_relevancy,
)

EXACT = 2e-5
"""Tolerance of the float32 ("ieee") path against the PyTorch rasterizer: only the grouping of products differs."""


def scene(n, width, height, cameras=1, opacity=(0.05, 0.95), spread=1.0, scale=(0.02, 0.2), seed=0):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([3.0, 2.0, 1.0]) * spread
    means[:, 2] += 4.0
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * (scale[1] - scale[0]) + scale[0]
    opacities = torch.rand(n, generator=g) * (opacity[1] - opacity[0]) + opacity[0]
    viewmats = torch.eye(4).repeat(cameras, 1, 1)
    viewmats[:, 0, 3] = torch.linspace(0, 0.3, cameras)  # cameras side by side
    f = 0.9 * width
    Ks = torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1.0]]).repeat(cameras, 1, 1)
    return means, quats, scales, opacities, viewmats, Ks


def compare(n, width, height, channels=20, cameras=1, per_camera=False, precision="ieee", block=32, tile=16,
            **kwargs):  # fmt: skip
    means, quats, scales, opacities, viewmats, Ks = scene(n, width, height, cameras, **kwargs)
    shape = (cameras, n, channels) if per_camera else (n, channels)
    features = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    ref, ref_alpha, info = rasterize_gaussians_torch(
        means, quats, scales, opacities, features, viewmats, Ks, width, height, tile_size=tile
    )
    out, alpha = rasterize_features_triton(
        info["means2d"], info["conics"], info["opacities"], features, info["isect_offsets"], info["flatten_ids"],
        width, height, tile, precision=precision, block_gaussians=block,
    )  # fmt: skip
    assert out.shape == ref.shape and alpha.shape == ref_alpha.shape, (out.shape, ref.shape)
    counts = torch.diff(
        info["isect_offsets"].reshape(-1).long(), append=torch.tensor([info["flatten_ids"].numel()])
    )
    return (out - ref).abs().max().item(), (alpha - ref_alpha).abs().max().item(), ref_alpha, counts, features


def check_random_scenes():
    for width, height, cameras, per_camera in [(40, 24, 1, False), (33, 17, 2, True), (64, 48, 1, False)]:
        err, err_alpha, ref_alpha, counts, _ = compare(
            300, width, height, cameras=cameras, per_camera=per_camera
        )
        print(width, height, cameras, err, err_alpha, int(counts.max()))
        assert err < EXACT and err_alpha < EXACT, (err, err_alpha)
        assert ref_alpha.max() > 0.5  # something was drawn


def check_empty_tiles():
    # Everything in one corner: most tiles have no Gaussian; and a scene with nothing in front of the camera.
    err, err_alpha, ref_alpha, counts, _ = compare(60, 64, 48, spread=0.2, scale=(0.01, 0.03))
    assert (counts == 0).sum() >= 4 and err < EXACT and err_alpha < EXACT, (counts, err, err_alpha)
    means, quats, scales, opacities, viewmats, Ks = scene(30, 40, 24)
    means[:, 2] = -4.0  # behind the camera
    _, _, info = rasterize_gaussians_torch(
        means, quats, scales, opacities, torch.randn(30, 16), viewmats, Ks, 40, 24
    )
    out, alpha = rasterize_features_triton(
        info["means2d"], info["conics"], info["opacities"], torch.randn(30, 16), info["isect_offsets"],
        info["flatten_ids"], 40, 24,
    )  # fmt: skip
    assert info["flatten_ids"].numel() == 0 and out.abs().max() == 0 and alpha.abs().max() == 0


def check_early_termination():
    # Opaque, large Gaussians stacked over every tile: pixels finish after a few of them, within and across blocks;
    # some opacities are above the 0.999 clamp.
    for block in (16, 32):
        err, err_alpha, ref_alpha, counts, _ = compare(
            600, 40, 24, opacity=(0.95, 1.0), scale=(0.2, 0.4), spread=2.0, block=block
        )
        print("opaque", block, err, err_alpha, float(ref_alpha.min()), int(counts.min()))
        assert err < EXACT and err_alpha < EXACT, (err, err_alpha)
        # Every tile holds several blocks, and nearly every pixel ends (T <= 1e-2) long before its tile's last.
        assert counts.min() > 2 * block and (1 - ref_alpha < 1e-2).float().mean() > 0.9


def check_faint_gaussians():
    # Opacities around 1/255: many contributions are skipped, the others are tiny.
    err, err_alpha, ref_alpha, _, _ = compare(300, 40, 24, opacity=(0.002, 0.008), scale=(0.1, 0.3))
    print("faint", err, err_alpha, float(ref_alpha.max()))
    assert 0 < ref_alpha.max() < 0.9
    assert err < 1e-6 and err_alpha < 1e-6, (err, err_alpha)


def check_blocks_and_tiles():
    # Many Gaussians per tile (several blocks each), smaller blocks and tiles, a feature width already a power of two.
    for block, tile, channels in [(16, 16, 32), (64, 8, 16), (32, 4, 20)]:
        err, err_alpha, _, counts, _ = compare(300, 40, 24, channels=channels, block=block, tile=tile)
        print("blocks", block, tile, err, err_alpha, int(counts.max()))
        assert counts.max() > 2 * block and err < EXACT and err_alpha < EXACT, (err, err_alpha)


def check_half_precision():
    # float16 products: each weight and feature rounded to 11 significant bits, so the error of a sum of weights
    # <= 1 is below 2^-10 of the largest feature; float32 accumulation adds nothing visible at this size.
    for precision in ("fp16", "tf32"):
        err, err_alpha, _, _, features = compare(300, 40, 24, channels=32, precision=precision)
        print(precision, err, err_alpha)
        bound = 2.0**-10 * float(features.abs().max())
        assert err < bound and err_alpha < EXACT, (err, bound)


def _fold(dtype, positives=1, negatives=4, latent=20):
    torch.manual_seed(3)
    head = ProjectorHead(latent, 48, 128, 2)
    texts = torch.nn.functional.normalize(torch.randn(positives + negatives, 48), dim=-1)
    return FoldedQuery(head, texts[:positives], texts[positives:], compute_dtype=dtype)


def check_fused_relevancy():
    # The fused kernel against the unfused path: latent render -> normalisation -> folded relevancy.
    width, height, n, channels = 40, 24, 300, 20
    means, quats, scales, opacities, viewmats, Ks = scene(n, width, height, cameras=2)
    features = torch.randn(n, channels, generator=torch.Generator().manual_seed(1))
    latent, alpha, info = rasterize_gaussians_torch(
        means, quats, scales, opacities, features, viewmats, Ks, width, height
    )
    for dtype, precision, normalize, positives, negatives, tolerance, factored in [
        (torch.float32, "ieee", None, 1, 4, 1e-5, True),
        (torch.float32, "ieee", 1e-3, 2, 4, 1e-5, True),
        (torch.float32, "ieee", 1e-3, 2, 0, 1e-5, True),
        (torch.bfloat16, "fp16", 1e-3, 1, 4, 5e-3, True),
        (torch.float32, "ieee", 1e-3, 2, 4, 1e-5, False),  # the Gram form of the norm
        (torch.bfloat16, "fp16", 1e-3, 1, 4, 5e-3, False),
    ]:
        folded = _fold(dtype, positives, negatives, channels)
        reference = _fold(torch.float32, positives, negatives, channels)
        expected = reference(latent if normalize is None else latent / alpha.clamp(min=normalize))
        got = rasterize_relevancy_triton(
            info["means2d"], info["conics"], info["opacities"], features, info["isect_offsets"], info["flatten_ids"],
            width, height, fold_operands_for(folded, channels, factored), normalize_min_alpha=normalize,
            precision=precision,
        )  # fmt: skip
        err = (got - expected).abs().max().item()
        print("fused", dtype, normalize, positives, negatives, factored, err)
        assert got.shape == expected.shape and err < tolerance, (got.shape, expected.shape, err)


def check_render_relevancy():
    # The whole path from 3D Gaussians (the PyTorch rasterizer's projection and binning here), both modes.
    width, height, n, channels = 33, 20, 200, 16
    means, quats, scales, opacities, viewmats, Ks = scene(n, width, height)
    features = torch.randn(n, channels, generator=torch.Generator().manual_seed(1))
    folded = _fold(torch.float32, latent=channels)
    for mode in ("classic", "antialiased"):
        latent, alpha, _ = rasterize_gaussians_torch(
            means, quats, scales, opacities, features, viewmats, Ks, width, height, rasterize_mode=mode
        )
        expected = folded(latent / alpha.clamp(min=1e-3))
        got = render_relevancy(
            means, quats, scales, opacities, features, viewmats, Ks, width, height,
            fold_operands_for(folded, channels), normalize_min_alpha=1e-3, rasterize_mode=mode, backend="torch",
            precision="ieee",
        )  # fmt: skip
        err = (got - expected).abs().max().item()
        print("render_relevancy", mode, err)
        assert err < 1e-5, err


def _viewer_model(width=36, height=20, n=300, **config):
    """A small chorus-splat model in eval mode (one 48-channel teacher, a 16-channel latent, a 64-unit head, alpha
    normalisation) and a camera 3 units back that sees its Gaussians."""
    import warnings

    from nerfstudio.cameras.cameras import Cameras, CameraType
    from nerfstudio.data.scene_box import SceneBox

    from splatsem_ns.models.chorus_splat import ChorusSplatModelConfig
    from splatsem_ns.models.semantic_source import LearnedLatentSourceConfig
    from splatsem_ns.teachers.base import TEACHER_SPECS_KEY, TeacherSpec
    from splatsem_ns.teachers.registry import make_teacher_config

    torch.manual_seed(0)
    spec = TeacherSpec("siglip2", 48, (4, 6), (height, width), True, make_teacher_config("siglip2-b16"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ChorusSplatModelConfig(
            semantic_source=LearnedLatentSourceConfig(latent_dim=16), projector_hidden_dim=64,
            semantic_alpha_normalize=True, **config,
        ).setup(
            scene_box=SceneBox(torch.tensor([[-2.0, -2.0, -2.0], [2.0, 2.0, 2.0]])), num_train_data=1,
            metadata={TEACHER_SPECS_KEY: {"siglip2": spec}},
            seed_points=(torch.rand(n, 3) * 2 - 1, torch.full((n, 3), 128, dtype=torch.uint8)),
        )  # fmt: skip
    model.gauss_params["scales"].data = torch.log(torch.rand(n, 3) * 0.1 + 0.03)
    model.gauss_params["semantic_latent"].data = torch.randn(n, 16)
    model.eval()
    c2w = torch.eye(4)[:3][None]
    c2w[0, 2, 3] = 3.0
    camera = Cameras(camera_to_worlds=c2w, fx=30.0, fy=30.0, cx=width / 2, cy=height / 2, width=width,
                     height=height, camera_type=CameraType.PERSPECTIVE)  # fmt: skip
    return model, camera


def check_viewer_route():
    # The query panel's relevancy through the fused rasterizer against the panel's unfused path (latent rendered
    # by the model, then folded), with a hidden selection, a non-multiple-of-16 view and alpha normalisation.
    from splatsem_ns.viewer.query_panel import QuerySnapshot, SemanticQueryPanel

    width, height, n = 36, 20, 300
    model, camera = _viewer_model(width, height, n)
    panel = SemanticQueryPanel([], build_teacher=None, get_model=lambda: model)
    texts = torch.nn.functional.normalize(torch.randn(3, 48), dim=-1)
    panel.embed = lambda teacher, phrases, device=None: texts[[{"a": 0, "b": 1, "c": 2}[p] for p in phrases]]
    snapshot = QuerySnapshot(("a",), ("b", "c"), "siglip2", "relevancy", 0.5, "turbo", ())
    model.viewer_semantic_scale = 1.0
    model.hidden_mask = torch.rand(n) < 0.2
    outputs = model.get_outputs(camera)
    unfused = panel._answer(model, snapshot, outputs).relevancy  # no camera: the rendered latent, folded
    folded = FoldedQuery(model.projector_heads["siglip2"], texts[:1], texts[1:])
    assert model.render_query_relevancy(camera, folded) is not None  # the route can be taken here
    model.viewer_semantic_scale = None  # training's scale, supersampled: the kernel does not take it
    assert not model.query_relevancy_supported(folded, camera)
    assert model.render_query_relevancy(camera, folded) is None
    model.viewer_semantic_scale = 1.0
    # By default (query_fused_raster off) the panel folds the rendered latent and never calls the fused kernel.
    fused_kernel = model.render_query_relevancy
    model.render_query_relevancy = None  # calling it now would fail the test
    default = panel._answer(model, snapshot, outputs, camera).relevancy
    calls = []
    model.render_query_relevancy = lambda *args, **kwargs: calls.append(1) or fused_kernel(*args, **kwargs)
    model.config.query_fused_raster = True
    routed = panel._answer(model, snapshot, outputs, camera).relevancy
    assert calls, "query_fused_raster on: the panel should take the fused kernel"
    model.viewer_latent_deferred = True  # renders leave the latent out; the route needs none
    deferred_outputs = model.get_outputs(camera)
    assert "semantic_latent" not in deferred_outputs
    deferred = panel._answer(model, snapshot, deferred_outputs, camera).relevancy
    pca = panel._answer(
        model, QuerySnapshot((), (), "siglip2", "pca", 0.5, "turbo", ()), deferred_outputs, camera
    )
    errors = [(x - unfused).abs().max().item() for x in (routed, deferred, default)]
    print("viewer", errors)
    assert routed.shape == unfused.shape == (height, width, 1) and max(errors) < 1e-5, errors
    assert pca.image.shape == (height, width, 3)  # other displays render the latent themselves


def check_viewer_latent():
    # viewer_latent_triton: the panel's full-resolution latent through the Triton rasterizer, inside a whole frame
    # from the RGB pass's projection (no second projection), alone from its own; the same latent as the render path
    # (float16 products); training-style renders (gradients on) and other scales keep the render path.
    from splatsem_ns.models import chorus_splat

    width, height, n = 36, 20, 300
    # The RGB pass's tile size for the latent too, so its projection applies.
    model, camera = _viewer_model(width, height, n, semantic_tile_size=16)
    model.hidden_mask = torch.rand(n) < 0.2  # the RGB pass and the latent draw the same subset
    projections, renders = [], []
    project, render = chorus_splat.project_and_bin, chorus_splat.rasterize_features_triton
    chorus_splat.project_and_bin = lambda *a, **k: projections.append(1) or project(*a, **k)
    chorus_splat.rasterize_features_triton = lambda *a, **k: renders.append(1) or render(*a, **k)
    model.viewer_semantic_scale = 1.0
    with torch.no_grad():
        model.config.viewer_latent_triton = False
        reference = model.get_outputs(camera)["semantic_latent"]
        assert not renders, "viewer_latent_triton off: the render path"
        model.config.viewer_latent_triton = True
        framed = model.get_outputs(camera)["semantic_latent"]
        assert renders == [1] and not projections, (renders, projections)  # the RGB pass's projection reused
        alone = model.render_viewer_latent(camera)
        assert renders == [1, 1] and projections == [1], (renders, projections)
    with torch.enable_grad():  # what training and gradient-based tools render: the render path
        assert torch.equal(model.get_outputs(camera)["semantic_latent"].detach(), reference)
    model.viewer_semantic_scale = None  # the panel not asking for full resolution
    with torch.no_grad():
        model.get_outputs(camera)
    assert renders == [1, 1], renders
    errors = [(x - reference).abs().max().item() for x in (framed, alone)]
    print("viewer latent", errors, reference.abs().max().item())
    assert framed.shape == reference.shape == (height, width, 16) and max(errors) < 1e-2, errors


def check_benchmark_rows():
    # benchmarks/query_speed.py's Triton rows time what they say: relevancy at the camera's full resolution (the
    # viewer's "Full resolution"), agreeing with the float32 fold of the full-resolution latent, for every setting.
    from pathlib import Path

    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import query_speed

    torch.manual_seed(0)
    width, height = 40, 24
    model = query_speed.build_model(400, 48, 16, (3, 5), (height, width))
    cam = query_speed.camera(width, height, torch.device("cpu"))
    text = F.normalize(torch.randn(5, 48), dim=-1)
    head = model.projector_heads["siglip2"]
    fused = FoldedQuery(head, text[:1], text[1:], compute_dtype=torch.bfloat16, fused=True)
    exact = FoldedQuery(head, text[:1], text[1:])
    with torch.no_grad():
        reference = exact(model.render_semantic_latent(cam, scale=1.0))
    frame_camera = query_speed.new_camera_per_frame(cam, cam.device)
    rows = query_speed.triton_rows(model, cam, frame_camera, fused, exact, width, height, ["16x4", "16x2x8"])
    assert [name for name, *_ in rows][:11] == [
        "query@full, fused raster+fold (triton, Gram norm)",
        "query@full, fused raster+fold (triton, factored norm)",
        "query@full, triton render + fused fold",
        "query@full, viewer path, gsplat latent + fused fold",
        "query@full, viewer path, gsplat latent + fused fold, camera read as before",
        "query@full, viewer path, triton latent + fused fold",
        "render latent@full (triton)",
        "projection+binning only",
        "frame+query@full, viewer path, gsplat latent + fused fold",
        "frame+query@full, viewer path, gsplat latent + fused fold, camera read as before",
        "frame+query@full, viewer path, triton latent from the RGB pass's projection + fused fold",
    ] and len(rows) == 13
    for name, _, _, check in rows:
        if check is None:
            continue
        answer = check()
        assert answer.shape == reference.shape == (height, width, 1), (name, tuple(answer.shape))
        error = (answer - reference).abs().max().item()
        print(name, error)
        assert error < 5e-3, (name, error)
    # The rows leave the viewer's settings, the camera reading and the background as they found them.
    assert model.viewer_semantic_scale is None and not model.config.viewer_latent_triton
    import splatsem_ns.models.chorus_splat as chorus
    from splatsem_ns.data.host_camera import camera_intrinsics

    assert chorus.camera_intrinsics is camera_intrinsics and "_get_background_color" not in vars(model)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        globals()[f"check_{name}"]()
    print("ok")
