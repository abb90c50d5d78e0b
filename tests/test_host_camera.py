"""Training cameras' intrinsics and sizes read on the host (``data/host_camera.py``): the same numbers as the device
camera's, at every downscale factor, and the same renders."""

import pytest
import torch
from nerfstudio.cameras.cameras import Cameras
from support import GPU_MARKS, gpu_only, tiny_camera, tiny_chorus_model

from splatsem_ns.data.host_camera import HOST_CAMERA_KEY, EvalCameraReads, HostCameraCache, camera_intrinsics


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


@pytest.mark.parametrize("index", [slice(None), slice(1, 2), 2])
def test_camera_intrinsics_match_nerfstudios(index):
    """``camera_intrinsics``: nerfstudio's matrix (values, shape, dtype) for a batch, one camera and a camera
    indexed to shape (), and the first camera's size."""
    cameras = _cameras()[index]
    K, width, height = camera_intrinsics(cameras)
    expected = cameras.get_intrinsics_matrices()
    assert K.shape == expected.shape and K.dtype == expected.dtype
    assert torch.equal(K, expected)
    first = cameras.reshape((-1,))[0]
    assert (width, height) == (int(first.width.item()), int(first.height.item()))


def test_eval_renders_never_build_the_intrinsics_on_the_host(monkeypatch):
    """chorus-splat's eval renders (the viewer's frame, its latent alone, a feature render) take the matrix from
    ``camera_intrinsics``: nerfstudio's ``get_intrinsics_matrices``, which reads a device camera back four times,
    is not called, and every render is what it was with it."""
    model = tiny_chorus_model()
    model.eval()
    camera = tiny_camera()
    with torch.no_grad():
        before = model.get_outputs(camera)
        latent_before = model.render_viewer_latent(camera)
        features_before = model.render_features(camera, torch.ones(model.num_points, 3), scale=1.0)

    def host_matrix(self):
        raise AssertionError("get_intrinsics_matrices called in an eval render")

    monkeypatch.setattr(Cameras, "get_intrinsics_matrices", host_matrix)
    camera = tiny_camera()  # a new camera: nothing read from the first is kept for it
    with torch.no_grad():
        after = model.get_outputs(camera)
        latent_after = model.render_viewer_latent(camera)
        features_after = model.render_features(camera, torch.ones(model.num_points, 3), scale=1.0)
    for key in ("rgb", "depth", "accumulation", "semantic_latent"):
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    torch.testing.assert_close(latent_after, latent_before, rtol=0, atol=0)
    torch.testing.assert_close(features_after, features_before, rtol=0, atol=0)


_DEVICES = [
    "cpu",
    pytest.param("cuda", marks=GPU_MARKS),
]


@pytest.mark.parametrize("device", _DEVICES)
def test_the_eval_background_is_moved_to_the_device_once(device):
    """An eval render keeps splatfacto's eval background, moved to the model's device once instead of copied there
    every frame (a copy that waits for the RGB render), and the viewer's ``set_background`` still replaces it."""
    model = tiny_chorus_model().to(device)
    model.eval()
    host_background = model.background_color.clone()
    camera = tiny_camera().to(device)
    with torch.no_grad():
        first = model.get_outputs(camera)
    kept = model.background_color
    assert kept.device == model.device and torch.equal(kept.cpu(), host_background)
    torch.testing.assert_close(first["background"][0, 0].cpu(), host_background)
    with torch.no_grad():
        model.get_outputs(camera)
    assert model.background_color is kept  # not copied again
    model.set_background(torch.tensor([1.0, 0.0, 0.0], device=device))
    with torch.no_grad():
        red = model.get_outputs(camera)
    torch.testing.assert_close(red["background"][0, 0].cpu(), torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("render", ["latent", "frame"])
def test_eval_renders_read_the_camera_size_after_queuing_what_needs_none(render, monkeypatch):
    """Reading a device camera's size makes the host wait for the GPU's queue, the previous frame included. The
    viewer's renders (its latent alone, and a whole eval frame) first queue the per-Gaussian work that needs no size
    (activations, the latent), so that the host's work on it overlaps the GPU's end of the previous frame; the
    size is read after it. Traced on the CPU: the order of the operators against the moment of the read."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import splatsem_ns.data.host_camera as host_camera

    trace: list = []

    class Trace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            trace.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    real_size = host_camera.camera_size
    monkeypatch.setattr(host_camera, "camera_size", lambda camera: trace.append("SIZE") or real_size(camera))
    model = tiny_chorus_model()
    model.eval()
    camera = tiny_camera()
    with torch.no_grad(), Trace():
        model.render_viewer_latent(camera) if render == "latent" else model.get_outputs(camera)
    assert trace.count("SIZE") == 1, trace.count("SIZE")
    before = trace[: trace.index("SIZE")]
    assert {"exp", "sigmoid"} <= set(before), before


@gpu_only
def test_the_viewers_latent_waits_for_the_gpu_once_in_the_models_code():
    """On the GPU, the viewer's latent render (``render_viewer_latent``) makes the host wait once in the project's
    own code: reading the camera's size, after the frame's work that needs no size is queued. Syncs inside gsplat's
    extension (its intersection count) do not reach Python's warnings and are not counted."""
    import warnings

    model = tiny_chorus_model().to("cuda")
    model.eval()
    camera = tiny_camera().to("cuda")
    with torch.no_grad():
        model.render_viewer_latent(camera)  # warm
    camera = tiny_camera().to("cuda")  # a new frame's camera: its size is not known yet
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.no_grad():
                model.render_viewer_latent(camera)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "called a synchronizing" in str(w.message) and "splatsem_ns" in w.filename]
    assert len(syncs) == 1, [f"{w.filename}:{w.lineno}" for w in syncs]


def _counted_reads(model, monkeypatch) -> dict:
    """Counts of the size reads and view-matrix builds of ``model``'s eval renders from here on."""
    import splatsem_ns.data.host_camera as host_camera

    counts = {"size": 0, "viewmat": 0}
    real_size, reads = host_camera.camera_size, model._eval_camera_reads
    real_viewmat = reads._view_matrix

    def size(camera):
        counts["size"] += 1
        return real_size(camera)

    def viewmat(camera_to_worlds):
        counts["viewmat"] += 1
        return real_viewmat(camera_to_worlds)

    monkeypatch.setattr(host_camera, "camera_size", size)
    monkeypatch.setattr(reads, "_view_matrix", viewmat)
    return counts


def test_the_panels_latent_render_of_a_frame_reads_its_camera_no_more(monkeypatch):
    """A viewer frame with the query panel's latent left out of the RGB pass (``viewer_latent_deferred``) renders
    the same camera twice: the second render takes the first's size and view matrix (reading the size again would
    wait for the frame's RGB render on a GPU), and renders what it renders from a new camera."""
    model = tiny_chorus_model()
    model.eval()
    with torch.no_grad():
        expected = model.render_viewer_latent(tiny_camera())
    counts = _counted_reads(model, monkeypatch)
    model.viewer_latent_deferred = True
    camera = tiny_camera()
    with torch.no_grad():
        outputs = model.get_outputs(camera)
        latent = model.render_viewer_latent(camera.to(camera.device))  # as the viewer moves it: same tensors
    assert "semantic_latent" not in outputs
    assert counts == {"size": 1, "viewmat": 1}
    torch.testing.assert_close(latent, expected, rtol=0, atol=0)
    with torch.no_grad():
        model.render_viewer_latent(tiny_camera())  # the next frame's camera
    assert counts == {"size": 2, "viewmat": 2}


def test_a_changed_camera_is_read_again():
    """What ``EvalCameraReads`` kept for a camera is read again once the camera changes: in place (a version
    bump) or rescaled (new tensors); a camera made under ``torch.inference_mode`` (no version to watch) or whose
    pose requires grad is never kept."""
    from nerfstudio.models.splatfacto import get_viewmat

    reads = EvalCameraReads(get_viewmat)
    camera = tiny_camera()
    assert reads.size(camera) == (64, 48)
    first_view = reads.viewmat(camera)
    assert reads.viewmat(camera) is first_view and reads.intrinsics(camera) is reads.intrinsics(camera)
    camera.camera_to_worlds[..., 2, 3] += 1.0  # in place
    moved = reads.viewmat(camera)
    assert moved is not first_view
    torch.testing.assert_close(moved, get_viewmat(camera.camera_to_worlds), rtol=0, atol=0)
    camera.rescale_output_resolution(0.5)
    K, width, height = reads.intrinsics(camera)
    assert (width, height) == (32, 24) and float(K[0, 0, 0]) == 32.0
    camera.width[...] = 40  # in place, as a caller could
    assert reads.size(camera) == (40, 24)
    with torch.inference_mode():
        frozen = tiny_camera()
    assert reads.intrinsics(frozen) is not reads.intrinsics(frozen)  # computed each time, never kept
    assert reads.size(frozen) == (64, 48)
    posed = tiny_camera()
    posed.camera_to_worlds.requires_grad_(True)
    assert reads.viewmat(posed) is not reads.viewmat(posed)
