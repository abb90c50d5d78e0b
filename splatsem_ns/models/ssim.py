"""splatfacto's SSIM training loss with its five Gaussian blurs done as two.

splatfacto's SSIM (``pytorch_msssim.SSIM``, 11-tap Gaussian window of sigma 1.5, K = (0.01, 0.03)) blurs five maps
one after another, X, Y, X², Y² and XY, each by two 1-D depthwise convolutions: ten convolution launches forward
and six backward per training step, each with cuDNN's host-side set-up. A training step is bound by the host's
launches, not by the GPU's arithmetic (benchmarks/results/profile_*_h100_lean_prior.txt), so here the maps are
stacked along the channel axis and blurred together, in two groups: the target's two maps (no gradient) and the
render's three (the render, its square and its product with the target). The same per-channel window on the same
values gives the same SSIM to rounding (a test holds it to pytorch_msssim's value and gradient) in four
convolutions forward and two backward, with the same arithmetic as before.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

_WINDOW = 11
_SIGMA = 1.5
_K: Tuple[float, float] = (0.01, 0.03)


def gaussian_window(size: int = _WINDOW, sigma: float = _SIGMA) -> Float[Tensor, " size"]:
    """The normalised 1-D Gaussian window pytorch_msssim builds (``_fspecial_gauss_1d``)."""
    coords = torch.arange(size, dtype=torch.float) - size // 2
    window = torch.exp(-(coords**2) / (2 * sigma**2))
    return window / window.sum()


BlurWeights = Tuple[Float[Tensor, "K 1 size 1"], Float[Tensor, "K 1 1 size"]]
"""A separable blur's depthwise weights for up to K channels: down the columns, then along the rows."""


def blur_weights(window: Float[Tensor, " size"], channels: int) -> BlurWeights:
    """The depthwise weights of the separable blur by ``window`` for up to ``channels`` channels, each contiguous:
    cuDNN copies weights that are not (an expanded view, say) into new memory at every call, forward and backward,
    so they are built once (and sliced, which keeps them contiguous, for fewer channels)."""
    size = window.shape[-1]
    return (
        window.reshape(1, 1, size, 1).repeat(channels, 1, 1, 1),
        window.reshape(1, 1, 1, size).repeat(channels, 1, 1, 1),
    )


def stacked_ssim(
    target: Float[Tensor, "N C H W"],
    render: Float[Tensor, "N C H W"],
    weights: BlurWeights,
    data_range: float = 1.0,
    k: Tuple[float, float] = _K,
) -> Float[Tensor, ""]:
    """Mean SSIM of ``target`` against ``render`` over every channel and valid (unpadded) pixel, as
    ``pytorch_msssim.ssim(target, render, data_range, size_average=True)``, with the five blurred maps from two
    stacked blurs (``weights``: ``blur_weights`` of the window for at least 3 C channels, on the images' device and
    dtype). No gradient flows to ``target`` (a ground-truth image). Images smaller than the window are refused
    (splatfacto's never are)."""
    c, h, w = render.shape[1:]
    size = weights[0].shape[2]
    if h < size or w < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels, got {h}x{w}")
    if weights[0].shape[0] < 3 * c:
        raise ValueError(
            f"the blur weights cover {weights[0].shape[0]} channels; {3 * c} are blurred together"
        )
    target = target.detach()
    mu1, xx = _blur(torch.cat([target, target * target], dim=1), weights).split(c, dim=1)
    mu2, yy, xy = _blur(torch.cat([render, render * render, target * render], dim=1), weights).split(c, dim=1)
    c1, c2 = (k[0] * data_range) ** 2, (k[1] * data_range) ** 2
    mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    cs_map = (2 * (xy - mu1_mu2) + c2) / ((xx - mu1_sq) + (yy - mu2_sq) + c2)
    ssim_map = ((2 * mu1_mu2 + c1) / (mu1_sq + mu2_sq + c1)) * cs_map
    return ssim_map.mean()


def _blur(maps: Float[Tensor, "N K H W"], weights: BlurWeights) -> Float[Tensor, "N K h w"]:
    """Each channel blurred by itself (groups = channels), down the columns then along the rows, unpadded, in
    pytorch_msssim's order."""
    channels = maps.shape[1]
    vertical, horizontal = weights
    maps = F.conv2d(maps, vertical[:channels], groups=channels)
    return F.conv2d(maps, horizontal[:channels], groups=channels)


def photometric_loss(
    target: Float[Tensor, "H W 3"],
    render: Float[Tensor, "H W 3"],
    weights: BlurWeights,
    ssim_lambda: float,
    data_range: float = 1.0,
    k: Tuple[float, float] = _K,
) -> Float[Tensor, ""]:
    """splatfacto's main loss, ``(1 - ssim_lambda) * L1 + ssim_lambda * (1 - SSIM)``, with the stacked SSIM: one
    function of the two images, so that ``compile_photometric_loss`` can compile it whole."""
    l1 = torch.abs(target - render).mean()
    ssim = stacked_ssim(target.permute(2, 0, 1)[None], render.permute(2, 0, 1)[None], weights, data_range, k)
    return (1 - ssim_lambda) * l1 + ssim_lambda * (1 - ssim)
