"""Teacher feature cache: reuse, invalidation on any change, resume after an interruption, fp16 storage,
checksums (bad entries are re-extracted with a warning), non-finite features refused naming the image,
files that respect the umask, and read-only caches."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Type

import numpy as np
import pytest
import torch

from splatsem_ns.teachers import cache as cache_module
from splatsem_ns.teachers.base import DeferredTeacher, Teacher, TeacherConfig, defers_loading, reads_the_scene
from splatsem_ns.teachers.cache import (
    FOOTER_MAGIC,
    FOOTER_SIZE,
    FeatureCacheNotWritable,
    FeatureCacheWarning,
    TeacherFeatureCache,
    extract_teacher_features,
    image_key,
)


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
        self.nan_at = -1  # the n-th image encoded (0-based) gets a NaN feature; -1 never

    def encode_image(self, images):
        if 0 <= self.fail_after <= self.encoded:
            raise KeyboardInterrupt
        before = self.encoded
        self.encoded += images.shape[0]
        h, w = self.feature_grid(*images.shape[-2:])
        pooled = torch.nn.functional.adaptive_avg_pool2d(images, (h, w))
        features = torch.cat([pooled, pooled[:, :2] * 2], dim=1)
        if before <= self.nan_at < self.encoded:
            features[self.nan_at - before, 0, 0, 0] = float("nan")
        return features


def _images(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (24, 32, 3), generator=g, dtype=torch.uint8) for _ in range(n)]


def _extract(teacher, images, root, **kwargs):
    return extract_teacher_features([teacher], len(images), lambda i: images[i], root, batch_size=2, **kwargs)


def _cache(root) -> TeacherFeatureCache:
    return TeacherFeatureCache(root, "count", CountingTeacherConfig().fingerprint())


def _entry(root, images, index) -> Path:
    cache = _cache(root)
    return cache.path_for(image_key(images[index], cache.fingerprint))


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
    assert not list(cache.folder.glob(".*")), "no partial files are left behind"
    resumed = CountingTeacherConfig().setup()
    maps = _extract(resumed, images, tmp_path)["count"]
    assert resumed.encoded == 2 and len(maps) == 6


def test_non_finite_features_are_refused(tmp_path):
    cache = TeacherFeatureCache(tmp_path, "t", "abc")
    with pytest.raises(FloatingPointError, match="'t'"):
        cache.write("k", torch.tensor([[[1.0, float("nan")]]]))
    with pytest.raises(FloatingPointError, match="2 beyond the fp16 range"):
        cache.write("k", torch.full((1, 1, 2), 1e6), image_name="a.png")
    assert not cache.path_for("k").exists()


def test_corrupt_cache_file_names_the_file(tmp_path):
    cache = TeacherFeatureCache(tmp_path, "t", "abc")
    cache.folder.mkdir(parents=True)
    cache.path_for("k").write_bytes(b"not a numpy file")
    with pytest.raises(RuntimeError, match="k.npy"):
        cache.open("k")


def test_entries_carry_a_checksum_footer_that_np_load_ignores(tmp_path):
    images = _images(2)
    maps = _extract(CountingTeacherConfig().setup(), images, tmp_path)["count"]
    path = _entry(tmp_path, images, 1)
    assert path.parent.parent.name == "format-2"
    raw = path.read_bytes()
    buffer = io.BytesIO()
    np.save(buffer, np.array(maps[1]))
    payload = buffer.getvalue()
    assert raw[: len(payload)] == payload, "a standard .npy payload comes first"
    assert raw[len(payload) :] == FOOTER_MAGIC + hashlib.blake2b(payload, digest_size=32).digest()
    assert len(raw) == len(payload) + FOOTER_SIZE
    np.testing.assert_array_equal(np.load(path, mmap_mode="r"), maps[1])
    np.testing.assert_array_equal(np.load(path), maps[1])


def _nan_overwrite(path: Path) -> None:
    """Overwrite the feature bytes with NaNs in place: same size, header and footer untouched."""
    data = np.load(path, mmap_mode="r")
    nbytes, offset = data.nbytes, data.offset
    del data
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.full(nbytes // 2, np.nan, dtype=np.float16).tobytes())


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _strip_footer(path: Path) -> None:
    """What the first cache format wrote: a plain .npy."""
    np.save(path, np.load(path))


def _break_header(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"garbage!")


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (_nan_overwrite, "checksum mismatch"),
        (_truncate, "truncated"),
        (_strip_footer, "no checksum footer"),
        (_break_header, "unreadable .npy header"),
    ],
)
def test_bad_entry_is_reextracted_with_a_warning(tmp_path, corrupt, reason):
    images = _images(3)
    fresh = [
        np.array(m) for m in _extract(CountingTeacherConfig().setup(), images, tmp_path / "fresh")["count"]
    ]
    _extract(CountingTeacherConfig().setup(), images, tmp_path / "c")
    path = _entry(tmp_path / "c", images, 1)
    size = path.stat().st_size
    corrupt(path)
    if corrupt is _nan_overwrite:
        assert path.stat().st_size == size and np.isnan(np.load(path, mmap_mode="r")).all()
    teacher = CountingTeacherConfig().setup()
    with pytest.warns(FeatureCacheWarning, match=re.escape(str(path)) + r".*\(" + re.escape(reason)):
        maps = _extract(teacher, images, tmp_path / "c")["count"]
    assert teacher.encoded == 1, "only the bad entry is extracted again"
    for got, want in zip(maps, fresh, strict=True):
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(got, want)
    again = CountingTeacherConfig().setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FeatureCacheWarning)
        _extract(again, images, tmp_path / "c")
    assert again.encoded == 0


def test_first_format_cache_is_not_reused(tmp_path):
    """Footer-less files of the first format are in another folder: re-extracted, not warned about."""
    images = _images(3)
    fingerprint = CountingTeacherConfig().fingerprint()
    old = tmp_path / f"count-{fingerprint}"
    old.mkdir()
    for image in images:
        np.save(old / f"{image_key(image, fingerprint)}.npy", np.zeros((3, 4, 5), np.float16))
    teacher = CountingTeacherConfig().setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FeatureCacheWarning)
        _extract(teacher, images, tmp_path)
    assert teacher.encoded == 3


def test_each_entry_is_verified_once_per_run(tmp_path, monkeypatch):
    images = _images(4)
    _extract(CountingTeacherConfig().setup(), images, tmp_path)
    checked = []
    original = cache_module.entry_problem
    monkeypatch.setattr(cache_module, "entry_problem", lambda path: checked.append(path) or original(path))
    _extract(CountingTeacherConfig().setup(), images, tmp_path)
    assert sorted(checked) == sorted(_entry(tmp_path, images, i) for i in range(4))


@pytest.mark.parametrize("names", [None, [f"scene/images/frame_{i:03d}.png" for i in range(4)]])
def test_non_finite_teacher_fails_naming_the_image_and_the_teacher(tmp_path, names):
    images = _images(4)
    teacher = CountingTeacherConfig().setup()
    teacher.nan_at = 3
    expected = "image 3" if names is None else "scene/images/frame_003.png"
    with pytest.raises(
        FloatingPointError, match=rf"Teacher 'count' .* for {re.escape(expected)} \(1 NaN/inf"
    ):
        _extract(teacher, images, tmp_path, image_names=names)
    assert _entry(tmp_path, images, 2).is_file() and not _entry(tmp_path, images, 3).exists()


@pytest.mark.parametrize(
    "umask, file_mode, folder_mode",
    [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)],
    ids=["umask022", "umask002"],
)
def test_cache_files_respect_the_umask(tmp_path, umask, file_mode, folder_mode):
    images = _images(2)
    previous = os.umask(umask)
    try:
        _extract(CountingTeacherConfig().setup(), images, tmp_path)
    finally:
        os.umask(previous)
    path = _entry(tmp_path, images, 0)
    assert stat.S_IMODE(path.stat().st_mode) == file_mode
    assert stat.S_IMODE(path.parent.stat().st_mode) == folder_mode


def _refuse_writes(monkeypatch, root: Path, code: int) -> None:
    """Every way the cache writes (folders, new files, renames, deletions) fails under ``root``, as on a
    read-only folder; tests run as root in CI, where chmod would not stop them."""
    root = str(root)

    def inside(path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(root)

    def refuse(path):
        raise PermissionError(code, os.strerror(code), os.fspath(path))

    real_open, real_replace, real_mkdir, real_unlink = os.open, os.replace, Path.mkdir, Path.unlink

    def fake_open(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and inside(path):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def fake_replace(src, dst, *args, **kwargs):
        if inside(dst):
            refuse(dst)
        return real_replace(src, dst, *args, **kwargs)

    def fake_mkdir(self, *args, **kwargs):
        if inside(self) and not self.is_dir():
            refuse(self)
        return real_mkdir(self, *args, **kwargs)

    def fake_unlink(self, *args, **kwargs):
        if inside(self):
            refuse(self)
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "replace", fake_replace)
    monkeypatch.setattr(Path, "mkdir", fake_mkdir)
    monkeypatch.setattr(Path, "unlink", fake_unlink)


def _assert_names_cache_and_remedy(err, root) -> None:
    message = str(err.value)
    assert isinstance(err.value, PermissionError)
    assert "teacher feature cache" in message and str(root) in message
    assert "--pipeline.datamanager.feature-cache-dir DIR" in message and "SPLATSEM_CACHE" in message


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM, errno.EROFS])
@pytest.mark.parametrize("folder_exists", [False, True])
def test_unwritable_cache_fails_naming_it_and_how_to_move_it(tmp_path, monkeypatch, code, folder_exists):
    root = tmp_path / "cache"
    if folder_exists:
        _cache(root).folder.mkdir(parents=True)
    _refuse_writes(monkeypatch, root, code)
    teacher = CountingTeacherConfig().setup()
    with pytest.raises(FeatureCacheNotWritable) as err:
        _extract(teacher, _images(2), root)
    _assert_names_cache_and_remedy(err, root)
    assert teacher.encoded == 0, "fails before spending time on extraction"


def test_read_only_cache_with_every_entry_still_works(tmp_path, monkeypatch):
    images = _images(3)
    fresh = [np.array(m) for m in _extract(CountingTeacherConfig().setup(), images, tmp_path)["count"]]
    _refuse_writes(monkeypatch, tmp_path, errno.EROFS)
    teacher = CountingTeacherConfig().setup()
    maps = _extract(teacher, images, tmp_path)["count"]
    assert teacher.encoded == 0
    for got, want in zip(maps, fresh, strict=True):
        np.testing.assert_array_equal(got, want)
    monkeypatch.undo()
    _nan_overwrite(_entry(tmp_path, images, 0))
    _refuse_writes(monkeypatch, tmp_path, errno.EROFS)
    with pytest.warns(FeatureCacheWarning, match="checksum mismatch"):
        with pytest.raises(FeatureCacheNotWritable) as err:
            _extract(CountingTeacherConfig().setup(), images, tmp_path)
    _assert_names_cache_and_remedy(err, tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o555")
def test_chmod_read_only_cache(tmp_path):
    images = _images(3)
    root = tmp_path / "cache"
    _extract(CountingTeacherConfig().setup(), images[:2], root)
    folders = [root, root / "format-2", _cache(root).folder]
    for folder in folders:
        folder.chmod(0o555)
    try:
        reader = CountingTeacherConfig().setup()
        _extract(reader, images[:2], root)
        assert reader.encoded == 0, "a read-only cache that holds every entry works"
        writer = CountingTeacherConfig().setup()
        with pytest.raises(FeatureCacheNotWritable) as err:
            _extract(writer, images, root)
        _assert_names_cache_and_remedy(err, root)
        assert writer.encoded == 0
    finally:
        for folder in folders:
            folder.chmod(0o755)


def test_image_key_depends_on_pixels_and_teacher():
    a = _images(1)[0]
    b = a.clone()
    assert image_key(a, "t1") == image_key(b, "t1")
    b[3, 3, 1] += 1
    assert image_key(a, "t1") != image_key(b, "t1")
    assert image_key(a, "t1") != image_key(a, "t2")


def test_the_cache_key_covers_what_changes_the_features_and_nothing_else(tmp_path):
    """An unrelated teacher field (its name, a text-side option, where the weights lie) reuses the cache; a field
    that changes the image features (resolution, model, the weights' content) invalidates it."""
    from splatsem_ns.teachers.siglip_teacher import SigLIP2TeacherConfig

    base = SigLIP2TeacherConfig()
    same = [
        SigLIP2TeacherConfig(name="language"),
        SigLIP2TeacherConfig(lowercase_text=False),
        SigLIP2TeacherConfig(tokenizer="bytes"),
    ]
    other = [
        SigLIP2TeacherConfig(input_size=384),
        SigLIP2TeacherConfig(model_name="google/siglip2-large-patch16-512"),
    ]
    assert all(c.fingerprint() == base.fingerprint() for c in same)
    assert all(c.fingerprint() != base.fingerprint() for c in other)

    weights = tmp_path / "a" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"weights" * 1000)
    moved = tmp_path / "b" / "model.safetensors"
    moved.parent.mkdir()
    moved.write_bytes(weights.read_bytes())
    changed = tmp_path / "c" / "model.safetensors"
    changed.parent.mkdir()
    changed.write_bytes(b"WEIGHTS" * 1000)
    assert (
        SigLIP2TeacherConfig(checkpoint=weights).fingerprint()
        == SigLIP2TeacherConfig(checkpoint=moved).fingerprint()
    )
    assert (
        SigLIP2TeacherConfig(checkpoint=weights).fingerprint()
        != SigLIP2TeacherConfig(checkpoint=changed).fingerprint()
    )
    assert (
        SigLIP2TeacherConfig(checkpoint=moved.parent).fingerprint()
        == SigLIP2TeacherConfig(checkpoint=weights.parent).fingerprint()
    )


def test_a_renamed_teacher_reuses_its_cached_features(tmp_path):
    images = _images(4)
    first = CountingTeacherConfig().setup()
    _extract(first, images, tmp_path)
    assert first.encoded == 4
    renamed = CountingTeacherConfig(name="counter").setup()
    _extract(renamed, images, tmp_path)
    assert renamed.encoded == 0  # every image's features came from the cache
    wider = CountingTeacherConfig(name="counter", input_size=64).setup()
    _extract(wider, images, tmp_path)
    assert wider.encoded == 4


def _deferred(config: TeacherConfig, built: list) -> DeferredTeacher:
    """``config``'s teacher, deferred; ``built`` collects each teacher the deferral builds."""

    def build(cfg: TeacherConfig) -> Teacher:
        teacher = cfg.setup()
        built.append(teacher)
        return teacher

    return DeferredTeacher(config, build)


def test_a_deferred_teacher_is_built_only_for_missing_features(tmp_path):
    """With every image cached the network is never built, and the features are the ones the built teacher
    cached; one changed image builds it once and extracts that image alone."""
    images = _images(4)
    first = _extract(CountingTeacherConfig().setup(), images, tmp_path)["count"]
    built: list = []
    again = _extract(_deferred(CountingTeacherConfig(), built), images, tmp_path)["count"]
    assert built == []
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    images[1] = images[1].flip(0).contiguous()
    deferred = _deferred(CountingTeacherConfig(), built)
    _extract(deferred, images, tmp_path)
    assert len(built) == 1 and built[0].encoded == 1 and deferred.built


def test_only_teachers_fingerprinted_by_their_config_are_deferred():
    from splatsem_ns.teachers.labels_teacher import LabelsTeacherConfig

    assert defers_loading(CountingTeacherConfig())
    assert not reads_the_scene(DeferredTeacher(CountingTeacherConfig(), lambda cfg: cfg.setup()))
    assert not defers_loading(LabelsTeacherConfig())  # reads the scene before it has a fingerprint
    with pytest.raises(ValueError, match="reads the scene"):
        DeferredTeacher(LabelsTeacherConfig(), lambda cfg: cfg.setup())


def test_a_second_run_with_cached_features_loads_no_network(tmp_path, monkeypatch):
    """The datamanager builds only the label proxy (it reads the scene) when every training image's features
    are cached: the network teacher stays unloaded, and the features and the heads' specs are the first run's."""
    import warnings

    from splatsem_ns.data.datamanager import ChorusDataManager, ChorusDataManagerConfig
    from splatsem_ns.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene
    from splatsem_ns.teachers.base import TEACHER_SPECS_KEY

    scene = generate_synthetic_scene(
        tmp_path / "scene", SyntheticSceneConfig(num_views=6, width=40, height=30)
    )
    built: list = []
    original = ChorusDataManager.build_teacher

    def counted(self, config):
        built.append(config.name)
        return original(self, config)

    monkeypatch.setattr(ChorusDataManager, "build_teacher", counted)

    def setup():
        config = ChorusDataManagerConfig(
            data=scene.parent, teachers=("labels", "tiny-dinov2"), feature_cache_dir=tmp_path / "cache"
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return config.setup(device="cpu", test_mode="val")

    first = setup()
    names = sorted(first._features)
    assert sorted(built) == names  # the first run extracts with both
    built.clear()
    second = setup()
    network = [n for n in names if n != "labels"]
    assert built == ["labels"] and len(network) == 1
    for name in names:
        for a, b in zip(first._features[name], second._features[name], strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    specs = first.train_dataset.metadata[TEACHER_SPECS_KEY], second.train_dataset.metadata[TEACHER_SPECS_KEY]
    assert specs[0] == specs[1]
