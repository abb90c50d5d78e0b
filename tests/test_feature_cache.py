"""Teacher feature cache: reuse, invalidation on any change, resume after an interruption, fp16 storage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Type

import numpy as np
import pytest
import torch

from splatsem_ns.teachers.base import Teacher, TeacherConfig
from splatsem_ns.teachers.cache import TeacherFeatureCache, extract_teacher_features, image_key


@dataclass
class CountingTeacherConfig(TeacherConfig):
    _target: Type = field(default_factory=lambda: CountingTeacher)
    name: str = "count"
    model_name: str = "counting"
    input_size: int = 32


class CountingTeacher(Teacher):
    """Mean colour per 8x8 patch, tiled to 5 channels; counts the images it encodes."""

    def __init__(self, config: CountingTeacherConfig) -> None:
        super().__init__(config)
        self.feature_dim, self.feature_stride = 5, 8
        self.encoded = 0
        self.fail_after = -1  # raise after this many images (an interrupted extraction); -1 never

    def encode_image(self, images):
        if 0 <= self.fail_after <= self.encoded:
            raise KeyboardInterrupt
        self.encoded += images.shape[0]
        h, w = self.feature_grid(*images.shape[-2:])
        pooled = torch.nn.functional.adaptive_avg_pool2d(images, (h, w))
        return torch.cat([pooled, pooled[:, :2] * 2], dim=1)


def _images(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (24, 32, 3), generator=g, dtype=torch.uint8) for _ in range(n)]


def _extract(teacher, images, root):
    return extract_teacher_features([teacher], len(images), lambda i: images[i], root, batch_size=2)


def test_features_are_fp16_memmaps_with_teacher_grid(tmp_path):
    teacher = CountingTeacherConfig().setup()
    images = _images(3)
    maps = _extract(teacher, images, tmp_path)["count"]
    assert len(maps) == 3
    assert isinstance(maps[0], np.memmap) and maps[0].dtype == np.float16
    assert maps[0].shape == (*teacher.feature_grid(24, 32), 5)
    expected = teacher.encode_image(images[1].permute(2, 0, 1)[None].float() / 255)[0].permute(1, 2, 0)
    torch.testing.assert_close(torch.from_numpy(np.array(maps[1])).float(), expected, atol=2e-3, rtol=0)


def test_second_run_reuses_features(tmp_path):
    images = _images(4)
    _extract(CountingTeacherConfig().setup(), images, tmp_path)
    again = CountingTeacherConfig().setup()
    _extract(again, images, tmp_path)
    assert again.encoded == 0


@pytest.mark.parametrize(
    "change",
    ["image", "input_size", "model_name"],
)
def test_any_change_invalidates(tmp_path, change):
    images = _images(3)
    _extract(CountingTeacherConfig().setup(), images, tmp_path)
    cfg = CountingTeacherConfig()
    if change == "image":
        images[2] = images[2].clone()
        images[2][0, 0, 0] ^= 1  # one bit of one pixel
        expected = 1
    elif change == "input_size":
        cfg.input_size = 48
        expected = 3
    else:
        cfg.model_name = "counting-v2"
        expected = 3
    teacher = cfg.setup()
    _extract(teacher, images, tmp_path)
    assert teacher.encoded == expected


def test_interrupted_extraction_resumes(tmp_path):
    images = _images(6)
    interrupted = CountingTeacherConfig().setup()
    interrupted.fail_after = 4
    with pytest.raises(KeyboardInterrupt):
        _extract(interrupted, images, tmp_path)
    cache = TeacherFeatureCache(tmp_path, "count", CountingTeacherConfig().fingerprint())
    written = list(cache.folder.glob("*.npy"))
    assert len(written) == 4, "whole batches before the interruption are kept"
    assert not list(cache.folder.glob(".partial-*")), "no partial files are left behind"
    resumed = CountingTeacherConfig().setup()
    maps = _extract(resumed, images, tmp_path)["count"]
    assert resumed.encoded == 2 and len(maps) == 6


def test_non_finite_features_are_refused(tmp_path):
    cache = TeacherFeatureCache(tmp_path, "t", "abc")
    with pytest.raises(FloatingPointError, match="'t'"):
        cache.write("k", torch.tensor([[[1.0, float("nan")]]]))
    with pytest.raises(FloatingPointError):
        cache.write("k", torch.full((1, 1, 2), 1e6))  # beyond fp16


def test_corrupt_cache_file_names_the_file(tmp_path):
    cache = TeacherFeatureCache(tmp_path, "t", "abc")
    cache.folder.mkdir(parents=True)
    cache.path_for("k").write_bytes(b"not a numpy file")
    with pytest.raises(RuntimeError, match="k.npy"):
        cache.open("k")


def test_image_key_depends_on_pixels_and_teacher():
    a = _images(1)[0]
    b = a.clone()
    assert image_key(a, "t1") == image_key(b, "t1")
    b[3, 3, 1] += 1
    assert image_key(a, "t1") != image_key(b, "t1")
    assert image_key(a, "t1") != image_key(a, "t2")
