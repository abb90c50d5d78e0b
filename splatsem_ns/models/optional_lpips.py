"""LPIPS that is optional: splatfacto-based models still build when its weights cannot be downloaded."""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor, nn


class NaNMetric(nn.Module):
    """Stands in for LPIPS where it is unavailable; the caller drops its value."""

    def forward(self, *args, **kwargs) -> Tensor:
        return torch.tensor(float("nan"))


@contextlib.contextmanager
def optional_lpips():
    """Let splatfacto build without LPIPS when its backbone weights cannot be downloaded.

    torchmetrics' LPIPS downloads torchvision's AlexNet weights when constructed, so offline machines
    could not even create a splatfacto model. Here a failed construction warns and leaves ``lpips`` None;
    evaluation then reports PSNR and SSIM without LPIPS.
    """
    import torchmetrics.image.lpip as lpip_module

    original = lpip_module.LearnedPerceptualImagePatchSimilarity

    def build(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except Exception as err:  # network, hash or file errors all mean "no LPIPS here"
            warnings.warn(
                f"LPIPS is unavailable ({type(err).__name__}: {str(err)[:120]}); evaluation reports PSNR and SSIM "
                "only. Put torchvision's AlexNet weights in the torch hub cache to enable it.",
                stacklevel=2,
            )
            return None

    lpip_module.LearnedPerceptualImagePatchSimilarity = build  # type: ignore[assignment]
    try:
        yield
    finally:
        lpip_module.LearnedPerceptualImagePatchSimilarity = original  # type: ignore[assignment]
