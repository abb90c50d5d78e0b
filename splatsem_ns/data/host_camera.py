"""A training camera's intrinsics and size, read on the host once per image, so a training step never waits for them.

nerfstudio's datamanager hands the model each training camera already on the GPU (with images cached there, the
cameras are too). Building its intrinsics matrix (``Cameras.get_intrinsics_matrices``) then reads fx, fy, cx and cy
back from the device and copies the matrix up again, and ``int(camera.width.item())`` reads its size: every such read
makes the host wait until the GPU has run every kernel queued so far, which in a step bound by the host's dispatch
costs the overlap of the two. The dataset's own cameras stay on the host, so this module reads them there, once per
image and downscale factor, keeps the matrix on the device, and the datamanager hands it on with the camera.

Cameras that come without that (the viewer's, evaluation's) go through ``camera_intrinsics``: the matrix built where
the camera lives, and the size read back in one transfer instead of six.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from jaxtyping import Float
from nerfstudio.cameras.cameras import Cameras
from torch import Tensor

HOST_CAMERA_KEY = "host_camera"
"""Key of a training camera's ``HostCamera`` in ``Cameras.metadata``."""


def camera_intrinsics(camera: Cameras) -> Tuple[Float[Tensor, "*batch 3 3"], int, int]:
    """``camera.get_intrinsics_matrices()`` built on the camera's own device, and the width and height of its first
    camera. nerfstudio builds the matrix on the host, so for a camera on the GPU it reads fx, fy, cx and cy back
    one by one and copies the matrix up again: four waits for the GPU and a blocking copy, where this makes one
    (the size, read as a pair). Same values, shape ([*batch, 3, 3]) and dtype (float32) as nerfstudio's."""
    fx, fy, cx, cy = (value.squeeze(-1).float() for value in (camera.fx, camera.fy, camera.cx, camera.cy))
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    K = torch.stack((fx, zero, cx, zero, fy, cy, zero, zero, one), dim=-1).unflatten(-1, (3, 3))
    return (K, *camera_size(camera))


def camera_size(camera: Cameras) -> Tuple[int, int]:
    """Width and height of ``camera``'s first camera, read in one transfer (two ``.item()`` calls wait twice)."""
    width, height = torch.stack((camera.width.reshape(-1)[0], camera.height.reshape(-1)[0])).tolist()
    return int(width), int(height)


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
            K, width, height = camera_intrinsics(camera)  # once per image and factor, on the host
            self._cache[key] = (K.to(self.device), width, height)
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


class EvalCameraReads:
    """What eval-mode renders derive from one camera on the device, its view matrix and its intrinsics and size, kept
    until a render of another camera: a viewer frame renders the same camera twice when the query panel renders the
    latent after the RGB pass (``viewer_latent_deferred``), and reading the size again would make the host wait for
    the frame's RGB render where the second render could have been queued behind it. The view matrix comes from
    nerfstudio's compiled ``get_viewmat``, whose call costs about 0.2 ms of host time.

    A camera is "the same" while each of its tensors views the same memory, with the same shape, strides and version:
    ``Cameras.to`` (to the device it is on) and ``get_outputs_for_camera`` make new camera objects whose tensors are
    new views of the same memory, any in-place change bumps the version its views share, and
    ``rescale_output_resolution`` makes new tensors. The last camera's tensors are held, so their memory cannot be
    handed to another camera's while its reads are kept. Tensors without a version counter (made under
    ``torch.inference_mode``) or that require grad are never kept.
    """

    def __init__(self, view_matrix: Callable[[Tensor], Float[Tensor, "*batch 4 4"]]) -> None:
        self._view_matrix = view_matrix
        self._key: Tuple[Tuple[object, ...], ...] = ()
        self._held: Tuple[Tensor, ...] = ()  # the kept camera's tensors: their memory is not reused meanwhile
        self._values: Dict[str, object] = {}

    def _entry(self, camera: Cameras) -> Dict[str, object]:
        tensors = (
            camera.camera_to_worlds, camera.fx, camera.fy, camera.cx, camera.cy, camera.width, camera.height,
        )  # fmt: skip
        try:
            key = tuple(
                (t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride(), t._version) for t in tensors
            )
        except RuntimeError:  # inference tensors track no version, so a change could not be seen
            return {}
        if any(t.requires_grad for t in tensors):
            return {}  # a pose being optimised: a kept view matrix would tie two backward graphs together
        if key != self._key:
            self._key, self._held, self._values = key, tensors, {}
        return self._values

    def viewmat(self, camera: Cameras) -> Float[Tensor, "*batch 4 4"]:
        """The camera's world-to-camera matrix, as ``get_viewmat(camera.camera_to_worlds)`` gives it."""
        entry = self._entry(camera)
        if "viewmat" not in entry:
            entry["viewmat"] = self._view_matrix(camera.camera_to_worlds)
        return entry["viewmat"]  # type: ignore[return-value]

    def intrinsics(self, camera: Cameras) -> Tuple[Float[Tensor, "*batch 3 3"], int, int]:
        """``camera_intrinsics(camera)``, read from the device once per camera."""
        entry = self._entry(camera)
        if "intrinsics" not in entry:
            entry["intrinsics"] = camera_intrinsics(camera)
        return entry["intrinsics"]  # type: ignore[return-value]

    def size(self, camera: Cameras) -> Tuple[int, int]:
        """``camera_size(camera)``: width and height, with the intrinsics' single read."""
        _, width, height = self.intrinsics(camera)
        return width, height
