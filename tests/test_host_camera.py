"""Training cameras' intrinsics and sizes read on the host (``data/host_camera.py``): the same numbers as the device
camera's, at every downscale factor, and the same renders."""

import pytest
import torch
from nerfstudio.cameras.cameras import Cameras
from support import tiny_camera, tiny_chorus_model

from splatsem_ns.data.host_camera import HOST_CAMERA_KEY, HostCameraCache


def _cameras() -> Cameras:
    c2w = torch.eye(4)[:3][None].repeat(3, 1, 1)
    return Cameras(
        camera_to_worlds=c2w,
        fx=torch.tensor([[500.3], [410.0], [333.7]]),
        fy=torch.tensor([[499.1], [411.5], [333.7]]),
        cx=torch.tensor([[320.2], [301.0], [160.5]]),
        cy=torch.tensor([[241.7], [227.0], [121.3]]),
        width=torch.tensor([[641], [603], [321]]),
        height=torch.tensor([[483], [455], [243]]),
    )


@pytest.mark.parametrize("downscale", [1, 2, 4, 8])
def test_host_intrinsics_match_the_rescaled_camera(downscale):
    """What coarse-to-fine training renders at: the device camera rescaled by 1/downscale (odd sizes round down)."""
    cameras = _cameras()
    cache = HostCameraCache(cameras, "cpu")
    for index in range(3):
        expected = cameras[index : index + 1]
        if downscale != 1:
            expected.rescale_output_resolution(1 / downscale)
        K, width, height = cache.for_camera(index).intrinsics(downscale)
        assert torch.equal(K, expected.get_intrinsics_matrices())
        assert (width, height) == (int(expected.width.item()), int(expected.height.item()))
    assert torch.equal(cameras.fx, _cameras().fx)  # the dataset's cameras are left as they were
    assert cache.intrinsics(0, downscale)[0] is cache.intrinsics(0, downscale)[0]  # read once


@pytest.mark.parametrize("step", [0, 4000, 9000])
def test_a_training_render_with_the_host_camera_is_the_same(step):
    """chorus-splat renders a training camera that carries its host-side intrinsics exactly as one that does not,
    through coarse-to-fine (downscaled 4x, 2x, then full)."""
    model = tiny_chorus_model()
    model.train()
    model.optimizers = {}
    model.step = step
    camera = tiny_camera()
    camera.metadata = {"cam_idx": 0}
    torch.manual_seed(0)  # training renders draw a random background
    plain = model.get_outputs(camera)
    # The other training camera's entry would give other numbers: the model must read the camera's own.
    camera.metadata[HOST_CAMERA_KEY] = HostCameraCache(tiny_camera(), "cpu").for_camera(0)
    model.step = step
    torch.manual_seed(0)
    hosted = model.get_outputs(camera)
    assert plain["rgb"].shape == hosted["rgb"].shape
    for key in ("rgb", "accumulation", "semantic_latent"):
        torch.testing.assert_close(hosted[key], plain[key], rtol=0, atol=0)


def test_the_datamanager_hands_each_training_camera_its_host_entry(tmp_path):
    """The camera served for a step carries its own image's entry, equal to the served camera's numbers."""
    import warnings

    from splatsem_ns.data.datamanager import ChorusDataManagerConfig
    from splatsem_ns.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene

    scene = generate_synthetic_scene(
        tmp_path / "scene", SyntheticSceneConfig(num_views=6, width=40, height=30)
    )
    config = ChorusDataManagerConfig(
        data=scene.parent, teachers=("labels",), feature_cache_dir=tmp_path / "cache"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = config.setup(device="cpu", test_mode="val")
    for step in range(4):
        camera, _ = manager.next_train(step)
        host = camera.metadata[HOST_CAMERA_KEY]
        assert host.index == camera.metadata["cam_idx"]
        K, width, height = host.intrinsics()
        assert torch.equal(K, camera.get_intrinsics_matrices())
        assert (width, height) == (int(camera.width.item()), int(camera.height.item()))
