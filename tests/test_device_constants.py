"""Constants made once per device, and the feed-forward step's helpers that use them instead of host copies."""

from __future__ import annotations

import torch

from splatsem_ns.feedforward.cameras import opengl_to_opencv, scale_intrinsics
from splatsem_ns.feedforward.constants import device_constant


def test_a_constant_is_made_once_and_shared():
    a = device_constant((1.0, -1.0), "cpu")
    assert a is device_constant([1.0, -1.0], "cpu")  # lists and tuples name the same constant
    assert a.dtype == torch.float32 and a.tolist() == [1.0, -1.0]
    assert device_constant((1, 2), "cpu", torch.long).dtype == torch.long
    assert device_constant(((0, 1), (1, 0)), "cpu", torch.long).shape == (2, 2)


def test_camera_helpers_keep_their_values():
    pose = torch.randn(2, 4, 4)
    flipped = opengl_to_opencv(pose)
    torch.testing.assert_close(flipped, pose * torch.tensor([1.0, -1.0, -1.0, 1.0]))
    intrinsics = torch.tensor([[[100.0, 0.0, 32.0], [0.0, 90.0, 24.0], [0.0, 0.0, 1.0]]])
    scaled = scale_intrinsics(intrinsics, 0.25, 0.5)
    torch.testing.assert_close(scaled, torch.tensor([[[25.0, 0.0, 8.0], [0.0, 45.0, 12.0], [0.0, 0.0, 1.0]]]))
    assert intrinsics[0, 0, 0] == 100.0  # the input is not modified


def test_the_depth_range_comes_from_each_scenes_sensor_depth():
    from splatsem_ns.feedforward.network import SemanticSplatNetworkConfig
    from splatsem_ns.models.semantic_splat import SemanticSplatModel

    model = SemanticSplatModel.__new__(SemanticSplatModel)
    torch.nn.Module.__init__(model)
    model.config = type("C", (), {"depth_range_from_sensor": True})()
    model.network = type("N", (), {"config": SemanticSplatNetworkConfig.tiny()})()
    depth = torch.zeros(3, 2, 16, 16)
    depth[0] = torch.linspace(1.0, 3.0, 512).reshape(2, 16, 16)  # measured everywhere
    depth[1, :, :4, :4] = 2.0  # 32 measured pixels: too few, the defaults
    near, far = model.depth_range({"depth": depth, "has_depth": torch.tensor([True, True, False])})
    defaults = model.network.config.depth
    assert abs(float(near[0]) - 0.5 * 1.1) < 0.02 and abs(float(far[0]) - 1.5 * 2.9) < 0.05
    torch.testing.assert_close(near[1:], torch.full((2,), float(defaults.near)))
    torch.testing.assert_close(far[1:], torch.full((2,), float(defaults.far)))
