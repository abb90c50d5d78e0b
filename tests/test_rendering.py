"""The pure-PyTorch rasterizer against an independent per-pixel reference, gradcheck, edge cases, and
gsplat's DefaultStrategy driven by its ``info``.

The reference below shares no code with the tiled rasterizer: it projects each camera with explicit
3x3 matrix products and composites by walking the depth-sorted Gaussians one at a time, updating every
pixel's own transmittance and "done" flag (the per-pixel loop of gsplat's kernel, vectorised over pixels
only). It applies gsplat's rules literally: 3-sigma integer radii, tile-bounding-box membership,
alpha = min(0.999, o * exp(-sigma)), skip below 1/255, stop before transmittance <= 1e-4.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import pytest
import torch
from support import gpu_only
from torch import Tensor

from splatsem_ns.rendering import rasterize_from_projection, rasterize_gaussians, rasterize_gaussians_torch

WIDTH, HEIGHT = 40, 28  # 3 x 2 tiles of 16 px, the last row and column only partly inside the image

# Real SH basis constants as in the original 3DGS code (independent of gsplat's Sloan formulation).
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (
    1.0925484305920792,
    -1.0925484305920792,
    0.31539156525252005,
    -1.0925484305920792,
    0.5462742152960396,
)
SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


# ----------------------------------------------------------------------------------------------- reference


def _rotation(quats: Tensor) -> Tensor:
    q = quats / quats.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ]
    return torch.stack(rows, -2)


def _sh_to_color(degree: int, dirs: Tensor, sh: Tensor) -> Tensor:
    """dirs [N, 3] (unnormalised), sh [N, K, 3] -> [N, 3], 3DGS convention, + 0.5 and clamped at 0."""
    d = dirs / dirs.norm(dim=-1, keepdim=True)
    x, y, z = d[:, 0:1], d[:, 1:2], d[:, 2:3]
    out = SH_C0 * sh[:, 0]
    if degree > 0:
        out = out - SH_C1 * y * sh[:, 1] + SH_C1 * z * sh[:, 2] - SH_C1 * x * sh[:, 3]
    if degree > 1:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out = (
            out
            + SH_C2[0] * xy * sh[:, 4]
            + SH_C2[1] * yz * sh[:, 5]
            + SH_C2[2] * (2 * zz - xx - yy) * sh[:, 6]
            + SH_C2[3] * xz * sh[:, 7]
            + SH_C2[4] * (xx - yy) * sh[:, 8]
        )
    if degree > 2:
        out = (
            out
            + SH_C3[0] * y * (3 * xx - yy) * sh[:, 9]
            + SH_C3[1] * xy * z * sh[:, 10]
            + SH_C3[2] * y * (4 * zz - xx - yy) * sh[:, 11]
            + SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy) * sh[:, 12]
            + SH_C3[4] * x * (4 * zz - xx - yy) * sh[:, 13]
            + SH_C3[5] * z * (xx - yy) * sh[:, 14]
            + SH_C3[6] * x * (xx - 3 * yy) * sh[:, 15]
        )
    return torch.clamp_min(out + 0.5, 0.0)


def reference_rasterize(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    sh_degree: Optional[int] = None,
    backgrounds: Optional[Tensor] = None,
    render_mode: str = "RGB",
    rasterize_mode: str = "classic",
    eps2d: float = 0.3,
    tile_size: int = 16,
) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    C, N = viewmats.shape[0], means.shape[0]
    rot = _rotation(quats)
    cov3 = (rot * scales[:, None, :] ** 2) @ rot.transpose(1, 2)
    eye2 = torch.eye(2, dtype=means.dtype)

    proj = []
    for c in range(C):
        Rv, tv = viewmats[c, :3, :3], viewmats[c, :3, 3]
        pc = means @ Rv.T + tv
        covc = Rv @ cov3 @ Rv.T
        fx, fy, cx, cy = Ks[c, 0, 0], Ks[c, 1, 1], Ks[c, 0, 2], Ks[c, 1, 2]
        z_ok = (pc[:, 2] >= near_plane) & (pc[:, 2] <= far_plane)
        x, y = pc[:, 0], pc[:, 1]
        z = torch.where(z_ok, pc[:, 2], torch.ones_like(pc[:, 2]))
        mean2d = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)
        lim_xp = (width - cx) / fx + 0.3 * (0.5 * width / fx)
        lim_xn = cx / fx + 0.3 * (0.5 * width / fx)
        lim_yp = (height - cy) / fy + 0.3 * (0.5 * height / fy)
        lim_yn = cy / fy + 0.3 * (0.5 * height / fy)
        tx = z * torch.clamp(x / z, -lim_xn, lim_xp)
        ty = z * torch.clamp(y / z, -lim_yn, lim_yp)
        J = torch.zeros(N, 2, 3, dtype=means.dtype)
        J[:, 0, 0] = fx / z
        J[:, 0, 2] = -fx * tx / z**2
        J[:, 1, 1] = fy / z
        J[:, 1, 2] = -fy * ty / z**2
        cov2 = J @ covc @ J.transpose(1, 2)
        det0 = torch.linalg.det(cov2)
        cov2b = cov2 + eps2d * eye2
        det = torch.linalg.det(cov2b)
        conic = torch.linalg.inv(cov2b)
        comp = torch.sqrt(torch.clamp(det0 / det, min=1e-12))
        with torch.no_grad():
            b = 0.5 * (cov2b[:, 0, 0] + cov2b[:, 1, 1])
            radius = torch.ceil(3 * torch.sqrt(b + torch.sqrt(torch.clamp(b * b - det, min=0.01))))
            onscreen = (
                (mean2d[:, 0] + radius > 0)
                & (mean2d[:, 0] - radius < width)
                & (mean2d[:, 1] + radius > 0)
                & (mean2d[:, 1] - radius < height)
            )
            radius = torch.where(z_ok & onscreen, radius, torch.zeros_like(radius))
        if sh_degree is None:
            col = colors if colors.dim() == 2 else colors[c]
        else:
            campos = -Rv.T @ tv
            col = _sh_to_color(sh_degree, means - campos, colors)
        proj.append((mean2d, conic, comp, pc[:, 2], radius, col))
    means2d = torch.stack([p[0] for p in proj])  # composited from this tensor so absgrad can be checked

    renders, alphas = [], []
    iy, ix = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    px, py = ix.to(means.dtype) + 0.5, iy.to(means.dtype) + 0.5
    tile_x, tile_y = ix // tile_size, iy // tile_size
    for c in range(C):
        _, conic, comp, depth, radius, col = proj[c]
        opac = opacities * comp if rasterize_mode == "antialiased" else opacities
        if render_mode in ("D", "ED"):
            col = depth[:, None]
        elif render_mode in ("RGB+D", "RGB+ED"):
            col = torch.cat([col, depth[:, None]], -1)
        T = torch.ones(height, width, dtype=means.dtype)
        done = torch.zeros(height, width, dtype=torch.bool)
        out = torch.zeros(height, width, col.shape[-1], dtype=means.dtype)
        visible = torch.nonzero(radius > 0).squeeze(-1).tolist()
        for g in sorted(visible, key=lambda i: (float(depth[i].detach()), i)):
            m = means2d[c, g]
            r = float(radius[g]) / tile_size
            mx, my = (m.detach() / tile_size).tolist()
            n_tx, n_ty = math.ceil(width / tile_size), math.ceil(height / tile_size)
            tx0, tx1 = min(max(math.floor(mx - r), 0), n_tx), min(max(math.ceil(mx + r), 0), n_tx)
            ty0, ty1 = min(max(math.floor(my - r), 0), n_ty), min(max(math.ceil(my + r), 0), n_ty)
            in_bbox = (tile_x >= tx0) & (tile_x < tx1) & (tile_y >= ty0) & (tile_y < ty1)
            dx, dy = m[0] - px, m[1] - py
            sigma = 0.5 * (conic[g, 0, 0] * dx * dx + conic[g, 1, 1] * dy * dy) + conic[g, 0, 1] * dx * dy
            alpha = torch.clamp(opac[g] * torch.exp(-sigma), max=0.999)
            use = in_bbox & ~done & (sigma >= 0) & (alpha >= 1 / 255)
            next_T = T * (1 - alpha)
            stop = use & (next_T <= 1e-4)
            done = done | stop
            use = use & ~stop
            out = out + torch.where(use, alpha * T, torch.zeros_like(T))[..., None] * col[g]
            T = torch.where(use, next_T, T)
        if backgrounds is not None:
            bg = backgrounds[c]
            if render_mode in ("D", "ED"):
                bg = torch.zeros(1, dtype=means.dtype)
            elif render_mode in ("RGB+D", "RGB+ED"):
                bg = torch.cat([bg, torch.zeros(1, dtype=means.dtype)])
            out = out + T[..., None] * bg
        alpha_img = 1 - T[..., None]
        if render_mode in ("ED", "RGB+ED"):
            out = torch.cat([out[..., :-1], out[..., -1:] / alpha_img.clamp(min=1e-10)], -1)
        renders.append(out)
        alphas.append(alpha_img)
    info = {
        "means2d": means2d,
        "radii": torch.stack([p[4] for p in proj]).to(torch.int32),
        "depths": torch.stack([p[3] for p in proj]),
        "conics": torch.stack([torch.stack([p[1][:, 0, 0], p[1][:, 0, 1], p[1][:, 1, 1]], -1) for p in proj]),
    }
    return torch.stack(renders), torch.stack(alphas), info


# ----------------------------------------------------------------------------------------------- scenes


def _cameras(n_cams: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    viewmats, Ks = [], []
    for c in range(n_cams):
        angle = 0.15 * c
        view = torch.eye(4, dtype=dtype)
        view[:3, :3] = torch.tensor(
            [[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]],
            dtype=dtype,
        )
        view[:3, 3] = torch.tensor([0.2 * c, -0.1 * c, 0.1 * c], dtype=dtype)
        viewmats.append(view)
        Ks.append(torch.tensor([[32.0 + 2 * c, 0, 20.0], [0, 32.0, 14.0], [0, 0, 1]], dtype=dtype))
    return torch.stack(viewmats), torch.stack(Ks)


def make_scene(
    n: int = 40,
    channels: int = 3,
    n_cams: int = 1,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    sh_coeffs: Optional[int] = None,
) -> Dict[str, Tensor]:
    """Random Gaussians in front of the cameras, partly off-screen, with a saturating cluster (so the
    transmittance stop triggers) and one fully opaque Gaussian centred on a pixel (so alpha clamps)."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g, dtype=dtype) - 0.5) * torch.tensor([3.2, 2.4, 1.0], dtype=dtype)
    means[:, 2] += 3.0
    scales = torch.rand(n, 3, generator=g, dtype=dtype) * 0.15 + 0.03
    opacities = torch.rand(n, generator=g, dtype=dtype) * 0.9 + 0.05
    if n >= 20:
        cluster = slice(0, 8)
        offsets = 0.05 * torch.randn(8, 3, generator=g, dtype=dtype)
        means[cluster] = torch.tensor([-0.5, 0.3, 2.5], dtype=dtype) + offsets
        scales[cluster] = 0.25
        opacities[cluster] = 0.97
        means[8] = torch.tensor([0.5 * 3 / 32, 0.5 * 3 / 32, 3.0], dtype=dtype)  # onto pixel centre (20, 14)
        opacities[8] = 1.0
    scene = {
        "means": means,
        "quats": torch.randn(n, 4, generator=g, dtype=dtype),
        "scales": scales,
        "opacities": opacities,
    }
    if sh_coeffs is None:
        scene["colors"] = torch.rand(n, channels, generator=g, dtype=dtype)
    else:
        scene["colors"] = 0.5 * torch.randn(n, sh_coeffs, 3, generator=g, dtype=dtype)
    scene["viewmats"], scene["Ks"] = _cameras(n_cams, dtype)
    return scene


DIFF_KEYS = ("means", "quats", "scales", "opacities", "colors")


def _render_and_grads(fn, scene: Dict[str, Tensor], seed: int = 1, **kwargs):
    """Renders with ``fn`` and returns render, alpha, info and the gradients of a fixed random loss."""
    inputs = {k: v.detach().clone().requires_grad_(k in DIFF_KEYS) for k, v in scene.items()}
    bg = kwargs.get("backgrounds")
    if bg is not None:
        kwargs["backgrounds"] = bg.detach().clone().requires_grad_(True)
    render, alpha, info = fn(
        inputs["means"],
        inputs["quats"],
        inputs["scales"],
        inputs["opacities"],
        inputs["colors"],
        inputs["viewmats"],
        inputs["Ks"],
        WIDTH,
        HEIGHT,
        **kwargs,
    )
    g = torch.Generator().manual_seed(seed)
    w_render = torch.randn(render.shape, generator=g, dtype=render.dtype)
    w_alpha = torch.randn(alpha.shape, generator=g, dtype=alpha.dtype)
    (render * w_render).sum().add((alpha * w_alpha).sum()).backward()
    grads = {k: inputs[k].grad for k in DIFF_KEYS}
    if bg is not None:
        grads["backgrounds"] = kwargs["backgrounds"].grad
    return render.detach(), alpha.detach(), info, grads


def _assert_matches_reference(scene: Dict[str, Tensor], **kwargs) -> Dict:
    render, alpha, info, grads = _render_and_grads(rasterize_gaussians_torch, scene, **kwargs)
    ref_render, ref_alpha, ref_info, ref_grads = _render_and_grads(reference_rasterize, scene, **kwargs)
    torch.testing.assert_close(render, ref_render)
    torch.testing.assert_close(alpha, ref_alpha)
    torch.testing.assert_close(info["radii"], ref_info["radii"])
    visible = info["radii"] > 0
    for key in ("means2d", "depths", "conics"):
        torch.testing.assert_close(info[key][visible].detach(), ref_info[key][visible].detach())
    for key, grad in ref_grads.items():
        torch.testing.assert_close(grads[key], grad, msg=lambda m, key=key: f"gradient of {key}: {m}")
    return info


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
@pytest.mark.parametrize("render_mode", ["RGB", "RGB+ED"])
@pytest.mark.parametrize("channels", [3, 16, 35])
@pytest.mark.parametrize("n_cams", [1, 2])
@pytest.mark.parametrize("with_background", [False, True])
def test_matches_reference(rasterize_mode, render_mode, channels, n_cams, with_background):
    scene = make_scene(channels=channels, n_cams=n_cams, seed=channels + n_cams)
    backgrounds = torch.rand(n_cams, channels, dtype=torch.float64) if with_background else None
    info = _assert_matches_reference(
        scene, rasterize_mode=rasterize_mode, render_mode=render_mode, backgrounds=backgrounds
    )
    assert (info["radii"] > 0).sum() > 20, "the scene should keep most Gaussians visible"


@pytest.mark.parametrize("sh_degree", [0, 1, 2, 3])
@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
def test_spherical_harmonics_match_reference(sh_degree, rasterize_mode):
    scene = make_scene(n_cams=2, sh_coeffs=16, seed=sh_degree)
    _assert_matches_reference(scene, sh_degree=sh_degree, rasterize_mode=rasterize_mode)


@pytest.mark.parametrize("render_mode", ["D", "ED", "RGB+D"])
def test_depth_modes_match_reference(render_mode):
    scene = make_scene(n_cams=2, seed=7)
    backgrounds = torch.rand(2, 3, dtype=torch.float64)  # replaced by zeros for the depth channel
    _assert_matches_reference(scene, render_mode=render_mode, backgrounds=backgrounds)


def test_per_camera_colors_match_reference():
    scene = make_scene(n_cams=2, channels=5, seed=3)
    scene["colors"] = torch.rand(2, scene["means"].shape[0], 5, dtype=torch.float64)
    _assert_matches_reference(scene)


def test_expected_depth_is_accumulated_depth_over_alpha():
    scene = make_scene(n_cams=1, seed=4)
    args = [scene[k] for k in ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")]
    depth, alpha, _ = rasterize_gaussians_torch(*args, WIDTH, HEIGHT, render_mode="D")
    expected, _, _ = rasterize_gaussians_torch(*args, WIDTH, HEIGHT, render_mode="ED")
    covered = alpha > 1e-6
    torch.testing.assert_close(expected[covered], (depth / alpha)[covered])
    zs = scene["means"][:, 2]
    assert expected[covered].min() >= zs.min() - 1.0 and expected[covered].max() <= zs.max() + 1.0


def test_chunking_does_not_change_results():
    """Many small chunks (and intermediates recomputed in backward) give the same values and gradients."""
    scene = make_scene(n=60, channels=4, n_cams=2, seed=5)
    kwargs = {"render_mode": "RGB+ED", "absgrad": True}
    one = _render_and_grads(rasterize_gaussians_torch, scene, **kwargs)
    many = _render_and_grads(rasterize_gaussians_torch, scene, max_pairs_per_chunk=300, **kwargs)
    torch.testing.assert_close(one[0], many[0])
    torch.testing.assert_close(one[1], many[1])
    for key in DIFF_KEYS:
        torch.testing.assert_close(one[3][key], many[3][key])
    torch.testing.assert_close(one[2]["means2d"].absgrad, many[2]["means2d"].absgrad)


def test_gradcheck_float64():
    scene = make_scene(n=5, channels=2, n_cams=2, seed=11)
    scene["means"][:, 2] = 2.0 + 0.2 * torch.arange(5, dtype=torch.float64)
    scene["opacities"] = torch.linspace(0.3, 0.8, 5, dtype=torch.float64)
    backgrounds = torch.rand(2, 2, dtype=torch.float64)
    viewmats, Ks = scene["viewmats"], scene["Ks"]

    def fn(means, quats, scales, opacities, colors, backgrounds):
        render, alpha, _ = rasterize_gaussians_torch(
            means,
            quats,
            scales,
            opacities,
            colors,
            viewmats,
            Ks,
            20,
            12,
            backgrounds=backgrounds,
            render_mode="RGB+ED",
            rasterize_mode="antialiased",
        )
        return render, alpha

    inputs = tuple(
        t.clone().requires_grad_(True)
        for t in (
            scene["means"],
            scene["quats"],
            scene["scales"],
            scene["opacities"],
            scene["colors"],
            backgrounds,
        )
    )
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True, atol=1e-6, rtol=1e-5)


def test_absgrad_is_sum_of_per_pixel_absolute_gradients():
    """gsplat's absgrad: for every Gaussian, sum over pixels of |d(loss of that pixel) / d means2d|."""
    width, height = 12, 9
    scene = make_scene(n=6, channels=2, n_cams=1, seed=12)
    scene["Ks"] = torch.tensor([[[12.0, 0, 6.0], [0, 12.0, 4.5], [0, 0, 1]]], dtype=torch.float64)
    scene["means"][:, 2] = 2.0 + 0.3 * torch.arange(6, dtype=torch.float64)
    args = [scene[k].clone().requires_grad_(k in DIFF_KEYS) for k in scene if k not in ("viewmats", "Ks")]
    weights = torch.randn(
        1, height, width, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )

    render, _, info = rasterize_gaussians_torch(
        *args, scene["viewmats"], scene["Ks"], width, height, absgrad=True
    )
    info["means2d"].retain_grad()
    (render * weights).sum().backward()
    absgrad = info["means2d"].absgrad

    ref_render, _, ref_info = reference_rasterize(*args, scene["viewmats"], scene["Ks"], width, height)
    per_pixel = (ref_render * weights).sum(-1)[0]  # [H, W]
    expected = torch.zeros_like(absgrad)
    for i in range(height):
        for j in range(width):
            (g,) = torch.autograd.grad(
                per_pixel[i, j], ref_info["means2d"], retain_graph=True, allow_unused=True
            )
            if g is not None:
                expected += g.abs()
    visible = info["radii"] > 0
    assert visible.sum() >= 4
    torch.testing.assert_close(absgrad[visible], expected[visible])
    assert (absgrad >= info["means2d"].grad.abs() - 1e-12).all()
    assert (absgrad[visible].sum(-1) > 0).all()


def test_empty_scene_returns_background():
    dtype = torch.float32
    viewmats, Ks = _cameras(2, dtype)
    means = torch.zeros(0, 3, requires_grad=True)
    backgrounds = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    render, alpha, info = rasterize_gaussians(
        means,
        torch.zeros(0, 4),
        torch.zeros(0, 3),
        torch.zeros(0),
        torch.zeros(0, 3),
        viewmats,
        Ks,
        WIDTH,
        HEIGHT,
        backgrounds=backgrounds,
        render_mode="RGB+ED",
        absgrad=True,
    )
    assert render.shape == (2, HEIGHT, WIDTH, 4) and alpha.shape == (2, HEIGHT, WIDTH, 1)
    torch.testing.assert_close(render[..., :3], backgrounds[:, None, None, :].expand(2, HEIGHT, WIDTH, 3))
    assert (render[..., 3] == 0).all() and (alpha == 0).all()
    assert info["radii"].shape == (2, 0) and info["means2d"].shape == (2, 0, 2)
    render.sum().backward()
    assert means.grad.shape == (0, 3)


def test_culled_gaussians_render_nothing_and_get_zero_gradients():
    scene = make_scene(n=20, channels=3, n_cams=1, dtype=torch.float32, seed=13)
    keep = scene["means"].shape[0]
    culled_means = torch.tensor(
        [
            [0.0, 0.0, -2.0],  # behind the camera
            [0.3, 0.1, 0.0],  # exactly on the camera plane (division by zero if projected)
            [0.0, 0.0, 0.005],  # in front of the camera but closer than the near plane
            [40.0, 0.0, 3.0],  # far off-screen to the right
            [0.0, -30.0, 3.0],  # far off-screen above
            [0.0, 0.0, 200.0],  # beyond the far plane set below
        ]
    )
    n_culled = culled_means.shape[0]
    full = {
        "means": torch.cat([scene["means"], culled_means]),
        "quats": torch.cat([scene["quats"], torch.randn(n_culled, 4)]),
        "scales": torch.cat([scene["scales"], torch.full((n_culled, 3), 0.2)]),
        "opacities": torch.cat([scene["opacities"], torch.full((n_culled,), 0.9)]),
        "colors": torch.cat([scene["colors"], torch.rand(n_culled, 3)]),
        "viewmats": scene["viewmats"],
        "Ks": scene["Ks"],
    }
    kwargs = {"far_plane": 100.0, "render_mode": "RGB+ED", "rasterize_mode": "antialiased", "absgrad": True}
    render, alpha, info, grads = _render_and_grads(rasterize_gaussians_torch, full, **kwargs)
    only, only_alpha, _, only_grads = _render_and_grads(rasterize_gaussians_torch, scene, **kwargs)
    assert (info["radii"][0, keep:] == 0).all()
    torch.testing.assert_close(render, only)
    torch.testing.assert_close(alpha, only_alpha)
    for key in DIFF_KEYS:
        assert torch.isfinite(grads[key]).all(), key
        assert (grads[key][keep:] == 0).all(), key
        torch.testing.assert_close(grads[key][:keep], only_grads[key])
    assert torch.isfinite(info["means2d"].detach()).all() and torch.isfinite(info["conics"].detach()).all()


def test_info_has_gsplat_keys_shapes_and_dtypes():
    scene = make_scene(n=30, channels=3, n_cams=2, dtype=torch.float32, seed=14)
    args = [scene[k].requires_grad_(k in DIFF_KEYS) for k in scene]
    _, _, info = rasterize_gaussians_torch(*args, WIDTH, HEIGHT, rasterize_mode="antialiased")
    C, N = 2, 30
    assert info["camera_ids"] is None and info["gaussian_ids"] is None
    assert info["radii"].shape == (C, N) and info["radii"].dtype == torch.int32
    assert info["means2d"].shape == (C, N, 2) and not info["means2d"].is_leaf
    assert info["depths"].shape == (C, N) and info["conics"].shape == (C, N, 3)
    assert info["opacities"].shape == (C, N)
    assert info["tiles_per_gauss"].dtype == torch.int32 and info["flatten_ids"].dtype == torch.int32
    assert info["isect_ids"].dtype == torch.int64 and info["isect_offsets"].shape == (C, 2, 3)
    assert (info["width"], info["height"], info["n_cameras"], info["tile_size"]) == (WIDTH, HEIGHT, C, 16)
    assert (info["tile_width"], info["tile_height"]) == (3, 2)
    assert int(info["tiles_per_gauss"].sum()) == info["flatten_ids"].numel() == info["isect_ids"].numel()
    # gsplat's order: intersections sorted by (camera, tile, depth), offsets pointing at each tile's start.
    assert (info["isect_ids"][1:] >= info["isect_ids"][:-1]).all()
    tiles = info["isect_ids"] >> 32
    tile_bits = (2 * 3).bit_length()
    keys = torch.tensor([(c << tile_bits) | t for c in range(C) for t in range(6)])
    starts = torch.searchsorted(tiles, keys).view(C, 2, 3)
    assert (starts == info["isect_offsets"]).all()
    assert info["backend"] == "torch"


def _projection_reuse_case(backend: str, device: str):
    """An RGB+ED render with SH colours (as a viewer frame), then 35 other channels through its projection and
    through a render of their own with the same settings."""
    scene = make_scene(n=60, channels=35, n_cams=2, dtype=torch.float32, seed=21)
    scene = {k: v.to(device) for k, v in scene.items()}
    g = torch.Generator().manual_seed(3)
    sh = (0.5 * torch.randn(60, 16, 3, generator=g)).to(device)
    geometry = [scene[k] for k in ("means", "quats", "scales", "opacities")]
    cams = (scene["viewmats"], scene["Ks"], WIDTH, HEIGHT)
    kwargs = {"rasterize_mode": "antialiased", "backend": backend}
    with torch.no_grad():
        _, _, info = rasterize_gaussians(*geometry, sh, *cams, sh_degree=3, render_mode="RGB+ED", **kwargs)
        shared = rasterize_from_projection(info, scene["colors"])
        render, alpha, _ = rasterize_gaussians(*geometry, scene["colors"], *cams, **kwargs)
    return shared, (render, alpha)


def test_features_through_an_earlier_projection_match_their_own_render():
    # rendering.rasterize_from_projection: the same compositing on the same projection, so the same numbers.
    (features, alpha), (render, render_alpha) = _projection_reuse_case("torch", "cpu")
    assert features.shape == render.shape == (2, HEIGHT, WIDTH, 35) and alpha.shape == (2, HEIGHT, WIDTH, 1)
    assert torch.equal(features, render) and torch.equal(alpha, render_alpha)
    assert alpha.max() > 0.9  # something was composited


@gpu_only
def test_features_through_an_earlier_gsplat_projection_match_their_own_render():
    (features, alpha), (render, render_alpha) = _projection_reuse_case("gsplat", "cuda")
    torch.testing.assert_close(features, render, rtol=0, atol=1e-6)
    torch.testing.assert_close(alpha, render_alpha, rtol=0, atol=1e-6)


def test_auto_backend_uses_torch_on_cpu_and_gsplat_needs_cuda():
    scene = make_scene(n=10, dtype=torch.float32, seed=15)
    args = [scene[k] for k in ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")]
    render, alpha, info = rasterize_gaussians(*args, WIDTH, HEIGHT)
    assert info["backend"] == "torch"
    expected, expected_alpha, _ = rasterize_gaussians_torch(*args, WIDTH, HEIGHT)
    torch.testing.assert_close(render, expected)
    torch.testing.assert_close(alpha, expected_alpha)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        rasterize_gaussians(*args, WIDTH, HEIGHT, backend="gsplat")
    with pytest.raises(ValueError, match="unknown backend"):
        rasterize_gaussians(*args, WIDTH, HEIGHT, backend="cuda")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["means", "quats", "scales", "opacities", "colors", "viewmats", "Ks"])
def test_non_finite_input_is_named(name):
    scene = make_scene(n=10, dtype=torch.float32, seed=16)
    scene[name].view(-1)[0] = float("nan") if name != "scales" else float("inf")
    args = [scene[k] for k in ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")]
    with pytest.raises(ValueError, match=rf"\b{name} contains non-finite"):
        rasterize_gaussians(*args, WIDTH, HEIGHT)


def test_bad_shapes_are_reported():
    scene = make_scene(n=10, dtype=torch.float32, seed=17)
    args = [scene[k] for k in ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")]
    with pytest.raises(ValueError, match="quats has shape"):
        rasterize_gaussians(args[0], args[1][:, :3], *args[2:], WIDTH, HEIGHT)
    with pytest.raises(ValueError, match="SH coefficients"):
        rasterize_gaussians(*args, WIDTH, HEIGHT, sh_degree=1)
    with pytest.raises(ValueError, match="backgrounds has shape"):
        rasterize_gaussians(*args, WIDTH, HEIGHT, backgrounds=torch.zeros(1, 4))


@pytest.mark.parametrize("absgrad", [False, True])
def test_default_strategy_runs_on_torch_info(absgrad):
    """gsplat's DefaultStrategy reads radii, means2d gradients, width/height/n_cameras from ``info``,
    then duplicates/splits visible Gaussians with large gradients and prunes transparent ones."""
    from gsplat.strategy import DefaultStrategy

    torch.manual_seed(0)
    scene = make_scene(n=50, channels=3, n_cams=2, dtype=torch.float32, seed=18)
    opacities = scene["opacities"].clamp(0.05, 0.95)
    opacities[-5:] = 1e-3  # below prune_opa: must be removed at the first refinement
    params = torch.nn.ParameterDict(
        {
            "means": scene["means"],
            "quats": scene["quats"],
            "scales": torch.log(scene["scales"]),
            "opacities": torch.logit(opacities),
            "colors": scene["colors"],
        }
    )
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    strategy = DefaultStrategy(
        refine_start_iter=0,
        refine_every=2,
        reset_every=10_000,
        grow_grad2d=1e-7,
        grow_scale3d=0.1,
        prune_opa=0.005,
        absgrad=absgrad,
    )
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state(scene_scale=1.0)
    target = torch.rand(2, HEIGHT, WIDTH, 3)

    for step in range(1, 5):
        render, _, info = rasterize_gaussians(
            params["means"],
            params["quats"],
            torch.exp(params["scales"]),
            torch.sigmoid(params["opacities"]),
            params["colors"],
            scene["viewmats"],
            scene["Ks"],
            WIDTH,
            HEIGHT,
            absgrad=absgrad,
        )
        strategy.step_pre_backward(params, optimizers, state, step, info)
        ((render - target) ** 2).mean().backward()
        n_before = len(params["means"])
        visible = (info["radii"] > 0).sum(0)
        grads = info["means2d"].absgrad if absgrad else info["means2d"].grad
        scaled = grads * torch.tensor([WIDTH / 2 * 2, HEIGHT / 2 * 2])
        expected_grad2d = (scaled.norm(dim=-1) * (info["radii"] > 0)).sum(0)
        transparent = torch.sigmoid(params["opacities"]) < strategy.prune_opa
        strategy.step_post_backward(params, optimizers, state, step, info, packed=False)
        if step % 2 == 1:
            # Running statistics, before any refinement: one count per camera that sees a Gaussian.
            torch.testing.assert_close(state["count"], visible.float())
            torch.testing.assert_close(state["grad2d"], expected_grad2d)
            assert len(params["means"]) == n_before
        else:
            n_after = len(params["means"])
            assert n_after > n_before - int(transparent.sum()), "visible Gaussians with gradients must grow"
            assert (torch.sigmoid(params["opacities"]) >= strategy.prune_opa).all()
            assert state["grad2d"].shape == (n_after,) and (state["grad2d"] == 0).all()
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert len(params["means"]) > 50


@gpu_only
@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
@pytest.mark.parametrize("channels", [3, 35])
def test_torch_path_matches_gsplat_on_cuda(rasterize_mode, channels):
    scene = {k: v.float().cuda() for k, v in make_scene(n=300, channels=channels, n_cams=2, seed=19).items()}
    backgrounds = torch.rand(2, channels, device="cuda")
    kwargs = {"rasterize_mode": rasterize_mode, "render_mode": "RGB+ED", "backgrounds": backgrounds}
    results = {}
    for backend in ("gsplat", "torch"):
        inputs = {k: v.clone().requires_grad_(k in DIFF_KEYS) for k, v in scene.items()}
        render, alpha, info = rasterize_gaussians(
            *[inputs[k] for k in ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")],
            WIDTH,
            HEIGHT,
            backend=backend,
            **kwargs,
        )
        assert info["backend"] == backend
        g = torch.Generator(device="cuda").manual_seed(0)
        loss = (render * torch.randn(render.shape, generator=g, device="cuda")).sum() + alpha.sum()
        loss.backward()
        results[backend] = (render.detach(), alpha.detach(), info, {k: inputs[k].grad for k in DIFF_KEYS})
    ours, theirs = results["torch"], results["gsplat"]
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-3, atol=2e-3)
    assert (ours[2]["radii"] == theirs[2]["radii"]).float().mean() > 0.99
    for key in DIFF_KEYS:
        scale = theirs[3][key].abs().max().clamp(min=1e-6)
        torch.testing.assert_close(ours[3][key] / scale, theirs[3][key] / scale, rtol=0, atol=1e-2)
