"""A training camera's intrinsics and size, read on the host once per image, so a training step never waits for them.

nerfstudio's datamanager hands the model each training camera already on the GPU (with images cached there, the
cameras are too). Building its intrinsics matrix (``Cameras.get_intrinsics_matrices``) then reads fx, fy, cx and cy
back from the device and copies the matrix up again, and ``int(camera.width.item())`` reads its size: every such read
makes the host wait until the GPU has run every kernel queued so far, which in a step bound by the host's dispatch
costs the overlap of the two. The dataset's own cameras stay on the host, so this module reads them there, once per
image and downscale factor, keeps the matrix on the device, and the datamanager hands it on with the camera.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from jaxtyping import Float
from nerfstudio.cameras.cameras import Cameras
from torch import Tensor

HOST_CAMERA_KEY = "host_camera"
"""Key of a training camera's ``HostCamera`` in ``Cameras.metadata``."""


class HostCameraCache:
    """Intrinsics matrices (on ``device``) and sizes of a dataset's cameras, computed from its host-side copy on first
    use, for the full resolution and each downscale factor asked for."""

    def __init__(self, cameras: Cameras, device: torch.device | str) -> None:
        self.cameras = cameras
        self.device = device
        self._cache: Dict[Tuple[int, int], Tuple[Tensor, int, int]] = {}

    def intrinsics(self, index: int, downscale: int = 1) -> Tuple[Float[Tensor, "1 3 3"], int, int]:
        """Camera ``index``'s intrinsics matrix on the device, width and height, at ``1 / downscale`` of its
        resolution, rounded exactly as ``Cameras.rescale_output_resolution`` rounds them (it is what runs)."""
        key = (index, downscale)
        if key not in self._cache:
            camera = self.cameras[index : index + 1].to("cpu")
            if downscale != 1:
                camera.rescale_output_resolution(1 / downscale)
            K = camera.get_intrinsics_matrices().to(self.device)  # once per image and factor
            self._cache[key] = (K, int(camera.width.item()), int(camera.height.item()))
        return self._cache[key]

    def for_camera(self, index: int) -> "HostCamera":
        return HostCamera(self, index)


class HostCamera:
    """One training camera's entry of a ``HostCameraCache``: what the model reads instead of the device camera."""

    def __init__(self, cache: HostCameraCache, index: int) -> None:
        self._cache = cache
        self.index = index

    def intrinsics(self, downscale: int = 1) -> Tuple[Float[Tensor, "1 3 3"], int, int]:
        """The intrinsics matrix on the device, width and height at ``1 / downscale`` of the resolution."""
        return self._cache.intrinsics(self.index, downscale)
