"""2D teachers: shapes, dense-feature maths against the libraries' own modules, loading and failures."""

from __future__ import annotations

import dataclasses
import time
import types
import warnings
from pathlib import Path
from typing import Dict

import pytest
import torch
import torch.nn.functional as F

from splatsem_ns.teachers import (
    DEFAULT_TEACHERS,
    TINY_TEACHERS,
    DINOTeacherConfig,
    OpenCLIPTeacherConfig,
    SAMTeacherConfig,
    SigLIP2TeacherConfig,
    Teacher,
    TeacherConfig,
    TeacherWeightsUnavailable,
    available_teachers,
    loading,
    make_teacher_config,
    register_teacher,
)
from splatsem_ns.teachers.loading import CHECKPOINT_FLAG

TINY = ("tiny-clip", "tiny-siglip2", "tiny-dinov2", "tiny-dinov3", "tiny-sam")
LANGUAGE = {"tiny-clip", "tiny-siglip2"}
FAIL_FAST_S = 15.0

_built: Dict[str, Teacher] = {}


def tiny(preset: str) -> Teacher:
    """Tiny teachers are built once per test session (building is the slow part)."""
    if preset not in _built:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            _built[preset] = make_teacher_config(preset).setup()
    return _built[preset]


def build(config: TeacherConfig) -> Teacher:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return config.setup()


def images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator)


def network(teacher: Teacher) -> torch.nn.Module:
    return teacher.encoder if hasattr(teacher, "encoder") else teacher.model


# ---------------------------------------------------------------------------------------------------------
# Shapes, flags, determinism
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", TINY)
@pytest.mark.parametrize("height,width", [(40, 70), (75, 30), (64, 64)])
def test_tiny_teacher_returns_its_feature_grid(preset: str, height: int, width: int) -> None:
    teacher = tiny(preset)
    features = teacher.encode_image(images(2, height, width))
    h, w = teacher.feature_grid(height, width)
    assert features.shape == (2, teacher.feature_dim, h, w)
    assert features.dtype == torch.float32
    assert torch.isfinite(features).all()
    # The grid follows the image's aspect ratio.
    assert (h > w) == (height > width) or h == w
    # Not a constant map: different images and different cells give different features.
    assert not torch.allclose(features[0], features[1])
    assert features.flatten(2).std(dim=-1).mean() > 0


@pytest.mark.parametrize("preset", TINY)
def test_text_encoder_flags_and_dims(preset: str) -> None:
    teacher = tiny(preset)
    assert teacher.has_text_encoder == (preset in LANGUAGE)
    if teacher.has_text_encoder:
        text = teacher.encode_text(["a wooden chair", "a lamp", "a wooden chair"])
        assert text.shape == (3, teacher.feature_dim)
        assert torch.isfinite(text).all()
        torch.testing.assert_close(text[0], text[2])
        assert not torch.allclose(text[0], text[1])
        # Each prompt's embedding does not depend on what else is in the batch.
        torch.testing.assert_close(teacher.encode_text(["a lamp"])[0], text[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    else:
        with pytest.raises(NotImplementedError, match=teacher.name):
            teacher.encode_text(["a chair"])


@pytest.mark.parametrize("preset", TINY)
def test_same_input_same_output_and_reproducible_random_builds(preset: str) -> None:
    teacher = tiny(preset)
    x = images(1, 50, 60, seed=3)
    first = teacher.encode_image(x)
    torch.testing.assert_close(teacher.encode_image(x.clone()), first, rtol=0, atol=0)
    # Random weights are seeded, so a second build (e.g. in another process) gives the same features:
    # the fingerprint that keys the feature cache stays truthful.
    torch.manual_seed(1234)
    again = build(make_teacher_config(preset))
    torch.testing.assert_close(again.encode_image(x), first)


@pytest.mark.parametrize("preset", TINY)
def test_teacher_is_frozen_and_in_eval_mode(preset: str) -> None:
    teacher = tiny(preset)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    features = teacher.encode_image(images(1, 32, 32))
    assert not features.requires_grad


def test_bad_image_input_names_the_teacher() -> None:
    teacher = tiny("tiny-dinov2")
    with pytest.raises(ValueError, match="dinov2"):
        teacher.encode_image(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="float"):
        teacher.encode_image(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------------------
# Dense-feature maths against the libraries' own modules
# ---------------------------------------------------------------------------------------------------------


def test_siglip_dense_features_are_the_pooling_head_applied_to_each_token() -> None:
    teacher = build(make_teacher_config("tiny-siglip2", normalize=False))
    vision = teacher.model.vision_model
    x = images(1, 64, 64)  # native size: no resize, so the network sees exactly (x - 0.5) / 0.5
    dense = teacher.encode_image(x)
    tokens = vision(pixel_values=(x - 0.5) / 0.5).last_hidden_state
    # The real head with a single key (the token itself) is the oracle.
    pooled = torch.stack([vision.head(tokens[:, i : i + 1]) for i in range(tokens.shape[1])], dim=-1)
    torch.testing.assert_close(dense.flatten(2), pooled, rtol=1e-4, atol=1e-5)


def _clip_reference_tokens(teacher: Teacher, pixels: torch.Tensor, self_only: bool) -> torch.Tensor:
    visual = teacher.model.visual
    x = visual._embeds(pixels)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    mask = None
    if self_only:  # MaskCLIP: each token attends to itself only
        n = x.shape[1]
        mask = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)
    x = blocks[-1](x, attn_mask=mask)
    return visual.ln_post(x[:, 1:]) @ visual.proj


@pytest.mark.parametrize("dense_path", ["maskclip", "tokens"])
def test_clip_dense_features_match_open_clip_blocks(dense_path: str) -> None:
    from splatsem_ns.teachers.open_clip_teacher import CLIP_MEAN, CLIP_STD

    teacher = build(make_teacher_config("tiny-clip", normalize=False, dense_path=dense_path))
    x = images(2, 64, 64)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    reference = _clip_reference_tokens(teacher, (x - mean) / std, self_only=dense_path == "maskclip")
    torch.testing.assert_close(
        teacher.encode_image(x).flatten(2).transpose(1, 2), reference, rtol=1e-4, atol=1e-5
    )


def test_clip_dense_paths_differ() -> None:
    maskclip = build(make_teacher_config("tiny-clip", dense_path="maskclip")).encode_image(images(1, 64, 64))
    tokens = build(make_teacher_config("tiny-clip", dense_path="tokens")).encode_image(images(1, 64, 64))
    assert not torch.allclose(maskclip, tokens)


def test_sam_matches_segment_anything_preprocessing_and_crops_the_padding() -> None:
    from segment_anything.modeling import Sam

    teacher = tiny("tiny-sam")
    x = images(1, 64, 128)  # longer side = the tiny encoder's 128: no resize
    assert teacher.network_input_size(64, 128) == (64, 128)
    sam_like = types.SimpleNamespace(
        pixel_mean=torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1),
        pixel_std=torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1),
        image_encoder=teacher.encoder,
    )
    padded = Sam.preprocess(sam_like, x[0] * 255.0).unsqueeze(0)
    assert padded.shape[-2:] == (128, 128)
    reference = teacher.encoder(padded)
    features = teacher.encode_image(x)
    assert features.shape[-2:] == (4, 8)
    torch.testing.assert_close(features, reference[:, :, :4, :8], rtol=1e-4, atol=1e-5)


def test_sam_grid_covers_the_image_at_full_size() -> None:
    teacher = tiny("tiny-sam")
    # The grid is that of the unpadded image, with SAM's longer side fixed by the encoder.
    assert teacher.network_input_size(480, 640) == (96, 128)
    assert teacher.feature_grid(480, 640) == (6, 8)
    assert teacher.feature_grid(640, 480) == (8, 6)


def test_sam_rejects_an_input_size_the_encoder_cannot_take() -> None:
    with pytest.raises(ValueError, match="input_size must be 128"):
        build(make_teacher_config("tiny-sam", input_size=256))


def test_dino_drops_class_and_register_tokens() -> None:
    teacher = tiny("tiny-dinov3")
    assert teacher.model.config.num_register_tokens == 4
    assert teacher.num_prefix_tokens == 5
    x = images(1, 64, 64)
    from splatsem_ns.teachers.dino_teacher import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    hidden = teacher.model(pixel_values=(x - mean) / std).last_hidden_state
    torch.testing.assert_close(teacher.encode_image(x).flatten(2).transpose(1, 2), hidden[:, 5:])


# ---------------------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------------------


def test_fingerprint_changes_with_model_resolution_and_weights_only(tmp_path: Path) -> None:
    base = make_teacher_config("tiny-dinov2")
    assert base.fingerprint() == make_teacher_config("tiny-dinov2").fingerprint()
    assert tiny("tiny-dinov2").fingerprint() == base.fingerprint()
    assert make_teacher_config("tiny-dinov2", input_size=96).fingerprint() != base.fingerprint()
    assert make_teacher_config("tiny-dinov3", name="dinov2").fingerprint() != base.fingerprint()
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x" * 10)
    with_ckpt = make_teacher_config("tiny-dinov2", checkpoint=weights)
    assert with_ckpt.fingerprint() != base.fingerprint()
    assert with_ckpt.fingerprint() == make_teacher_config("tiny-dinov2", checkpoint=weights).fingerprint()
    other = tmp_path / "other.pt"
    other.write_bytes(b"x" * 10)  # the same weights elsewhere: the same features, the same key
    assert make_teacher_config("tiny-dinov2", checkpoint=other).fingerprint() == with_ckpt.fingerprint()
    other.write_bytes(b"z" * 10)  # other weights of the same size
    assert make_teacher_config("tiny-dinov2", checkpoint=other).fingerprint() != with_ckpt.fingerprint()
    before = with_ckpt.fingerprint()
    weights.write_bytes(b"y" * 20)  # new weights in the same file
    assert make_teacher_config("tiny-dinov2", checkpoint=weights).fingerprint() != before


# ---------------------------------------------------------------------------------------------------------
# Loading: checkpoints and failures
# ---------------------------------------------------------------------------------------------------------


def _perturbed_state(teacher: Teacher) -> Dict[str, torch.Tensor]:
    """The teacher's weights, changed so that a loader which silently loads nothing is caught."""
    generator = torch.Generator().manual_seed(7)
    state = {}
    for key, value in network(teacher).state_dict().items():
        if value.is_floating_point():
            value = value + 0.05 * torch.randn(value.shape, generator=generator)
        state[key] = value.clone()
    return state


@pytest.mark.parametrize("preset", TINY)
def test_checkpoint_file_gives_back_identical_features(preset: str, tmp_path: Path) -> None:
    source = build(make_teacher_config(preset))
    state = _perturbed_state(source)
    network(source).load_state_dict(state)
    if preset == "tiny-sam":  # an official SAM file holds the whole model
        state = {f"image_encoder.{k}": v for k, v in state.items()}
        state["mask_decoder.dummy"] = torch.zeros(1)
    suffix = ".safetensors" if preset == "tiny-dinov3" else ".pt"
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state} if preset == "tiny-clip" else state, path)
    loaded = build(make_teacher_config(preset, random_weights=False, checkpoint=path))
    x = images(2, 48, 80)
    torch.testing.assert_close(loaded.encode_image(x), source.encode_image(x), rtol=0, atol=0)
    assert not torch.allclose(loaded.encode_image(x), tiny(preset).encode_image(x))
    if loaded.has_text_encoder:
        torch.testing.assert_close(
            loaded.encode_text(["a sofa"]), source.encode_text(["a sofa"]), rtol=0, atol=0
        )


def test_hf_snapshot_folder_checkpoint(tmp_path: Path) -> None:
    source = build(make_teacher_config("tiny-dinov2"))
    network(source).load_state_dict(_perturbed_state(source))
    network(source).save_pretrained(tmp_path / "snapshot")
    loaded = build(make_teacher_config("tiny-dinov2", random_weights=False, checkpoint=tmp_path / "snapshot"))
    x = images(1, 40, 56)
    torch.testing.assert_close(loaded.encode_image(x), source.encode_image(x), rtol=0, atol=0)


def test_siglip_snapshot_folder_needs_and_uses_its_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    source = build(make_teacher_config("tiny-siglip2"))
    folder = tmp_path / "snapshot"
    network(source).save_pretrained(folder)
    config = make_teacher_config("tiny-siglip2", random_weights=False, checkpoint=folder, tokenizer="")
    with pytest.raises(TeacherWeightsUnavailable, match="tokenizer"):
        build(config)

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "wooden": 4, "chair": 5, "lamp": 6}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)
    teacher = build(config)
    ids = teacher._tokenize(["a wooden chair"])
    assert ids.shape == (1, teacher.text_length)  # max-length padding, as SigLIP was trained
    assert ids[0, :3].tolist() == [3, 4, 5] and (ids[0, 3:] == 0).all()
    # Prompts are lower-cased before tokenising.
    torch.testing.assert_close(
        teacher.encode_text(["A Wooden CHAIR"]), teacher.encode_text(["a wooden chair"])
    )
    assert not torch.allclose(teacher.encode_text(["a lamp"]), teacher.encode_text(["a wooden chair"]))


@pytest.mark.parametrize("preset", TINY)
def test_missing_checkpoint_names_teacher_and_path(preset: str, tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "weights.pth"
    config = make_teacher_config(preset, random_weights=False, checkpoint=path)
    with pytest.raises(TeacherWeightsUnavailable) as err:
        build(config)
    message = str(err.value)
    assert f"'{config.name}'" in message and str(path) in message and CHECKPOINT_FLAG in message


@pytest.mark.parametrize("preset", ["tiny-dinov2", "tiny-sam", "tiny-clip"])
def test_corrupt_checkpoint_names_teacher_and_path(preset: str, tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    path.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(TeacherWeightsUnavailable, match="weights.pth") as err:
        build(make_teacher_config(preset, random_weights=False, checkpoint=path))
    assert make_teacher_config(preset).name in str(err.value)


@dataclasses.dataclass
class _Pickled:
    """Not a tensor: what a checkpoint that needs ``weights_only=False`` holds."""

    weights: dict


def test_checkpoint_with_pickled_objects_says_so_without_unsafe_advice(tmp_path: Path) -> None:
    import traceback

    path = tmp_path / "sam.pth"
    torch.save(_Pickled(network(tiny("tiny-sam")).state_dict()), path)
    with pytest.raises(TeacherWeightsUnavailable) as err:
        build(make_teacher_config("tiny-sam", random_weights=False, checkpoint=path))
    message = str(err.value)
    assert str(path) in message and "pickled Python objects (GLOBAL" in message and "_Pickled" in message
    shown = "".join(traceback.format_exception(err.value))
    assert "weights_only" not in shown and "safe_globals" not in shown


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dinov3.pt"
    torch.save(network(tiny("tiny-dinov3")).state_dict(), path)
    with pytest.raises(TeacherWeightsUnavailable, match="does not match"):
        build(make_teacher_config("tiny-dinov2", random_weights=False, checkpoint=path))


def _assert_fast_helpful_failure(config: TeacherConfig) -> float:
    start = time.perf_counter()
    with pytest.raises(TeacherWeightsUnavailable) as err:
        build(config)
    elapsed = time.perf_counter() - start
    message = str(err.value)
    assert elapsed < FAIL_FAST_S, f"failing took {elapsed:.1f} s"
    assert f"'{config.name}'" in message and config.model_name in message
    assert f"{CHECKPOINT_FLAG} {config.name}" in message
    return elapsed


@pytest.fixture
def unreachable_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every endpoint points at a closed local port; torch hub's cache is empty."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))


@pytest.mark.usefixtures("unreachable_network")
@pytest.mark.parametrize(
    "config",
    [
        DINOTeacherConfig(name="dinov2", model_name="facebook/dinov2-small-splatsem-test-absent"),
        SigLIP2TeacherConfig(name="siglip2", model_name="google/siglip2-splatsem-test-absent"),
        SAMTeacherConfig(name="sam", model_name="vit_b", download_url="http://127.0.0.1:9/sam_absent.pth"),
    ],
    ids=["dinov2", "siglip2", "sam"],
)
def test_unreachable_weights_fail_fast_with_a_helpful_message(config: TeacherConfig) -> None:
    _assert_fast_helpful_failure(config)


@pytest.mark.usefixtures("unreachable_network")
def test_unreachable_clip_weights_fail_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    from splatsem_ns.teachers import open_clip_teacher

    monkeypatch.setattr(open_clip_teacher, "_cached_pretrained_file", lambda cfg: None)
    _assert_fast_helpful_failure(
        OpenCLIPTeacherConfig(name="clip", model_name="ViT-B-16", pretrained="openai")
    )


def test_offline_mode_fails_without_touching_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "endpoint_reachable", lambda *a, **k: pytest.fail("probed the network"))
    config = DINOTeacherConfig(name="dinov2", model_name="facebook/dinov2-small-splatsem-test-absent")
    with pytest.raises(TeacherWeightsUnavailable, match="offline"):
        build(config)


def test_gated_model_message_says_how_to_get_access(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = make_teacher_config("dinov3-s16", model_name="facebook/dinov3-vits16-splatsem-test-absent")
    with pytest.raises(TeacherWeightsUnavailable, match="accept its license"):
        build(config)


@pytest.mark.parametrize("preset", ["siglip2-b16", "dinov2-s14", "sam-vit-b"])
def test_default_presets_fail_fast_here_without_network(preset: str) -> None:
    """The real path, nothing patched: only meaningful on a machine without network and weights."""
    config = make_teacher_config(preset)
    if isinstance(config, SAMTeacherConfig):
        probe = config.download_url or "https://dl.fbaipublicfiles.com"
    else:
        probe = loading.hf_endpoint()
    if loading.endpoint_reachable(probe):
        pytest.skip("the network is reachable")
    if _weights_cached(config):
        pytest.skip("the weights are in the local cache")
    _assert_fast_helpful_failure(config)


def _weights_cached(config: TeacherConfig) -> bool:
    if isinstance(config, SAMTeacherConfig):
        return any((Path(torch.hub.get_dir()) / "checkpoints").glob(f"sam_{config.model_name}_*.pth"))
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(config.model_name, "config.json"), str)


def test_random_weights_warn_loudly_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "_warned_random", set())
    with pytest.warns(RuntimeWarning, match="RANDOM weights"):
        make_teacher_config("tiny-dinov2").setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        make_teacher_config("tiny-dinov2").setup()


# ---------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------


def test_presets_cover_every_family_with_short_names() -> None:
    expected = {
        "clip-vit-b16": (OpenCLIPTeacherConfig, "clip"),
        "siglip2-b16": (SigLIP2TeacherConfig, "siglip2"),
        "dinov2-s14": (DINOTeacherConfig, "dinov2"),
        "dinov2-b14": (DINOTeacherConfig, "dinov2"),
        "dinov3-s16": (DINOTeacherConfig, "dinov3"),
        "sam-vit-b": (SAMTeacherConfig, "sam"),
        "sam-vit-l": (SAMTeacherConfig, "sam"),
        "sam-vit-h": (SAMTeacherConfig, "sam"),
        "tiny-clip": (OpenCLIPTeacherConfig, "clip"),
        "tiny-siglip2": (SigLIP2TeacherConfig, "siglip2"),
        "tiny-dinov2": (DINOTeacherConfig, "dinov2"),
        "tiny-dinov3": (DINOTeacherConfig, "dinov3"),
        "tiny-sam": (SAMTeacherConfig, "sam"),
    }
    for preset, (cls, name) in expected.items():
        config = make_teacher_config(preset)
        assert isinstance(config, cls) and config.name == name, preset
        assert config.random_weights == preset.startswith("tiny-"), preset
    assert set(DEFAULT_TEACHERS) | set(TINY_TEACHERS) <= set(available_teachers())
    assert [make_teacher_config(p).name for p in DEFAULT_TEACHERS] == ["siglip2", "dinov2", "sam"]
    assert [make_teacher_config(p).name for p in TINY_TEACHERS] == ["siglip2", "dinov2", "sam"]


def test_make_teacher_config_returns_fresh_configs_and_checks_overrides() -> None:
    first = make_teacher_config("tiny-dinov2", input_size=32)
    first.input_size = 999
    assert make_teacher_config("tiny-dinov2").input_size == 64
    with pytest.raises(KeyError, match="tiny-dinov2"):  # the error lists what exists
        make_teacher_config("no-such-teacher")
    with pytest.raises(ValueError, match="input_size"):
        make_teacher_config("tiny-dinov2", input_sise=32)


def test_register_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    from splatsem_ns.teachers import registry

    monkeypatch.setattr(registry, "_PRESETS", dict(registry._PRESETS))
    register_teacher(
        "my-dino", lambda: DINOTeacherConfig(name="mydino", model_name="tiny-dinov2", random_weights=True)
    )
    assert "my-dino" in available_teachers()
    teacher = build(make_teacher_config("my-dino", input_size=32))
    assert teacher.name == "mydino" and teacher.encode_image(images(1, 32, 32)).shape == (1, 32, 4, 4)
    with pytest.raises(ValueError, match="already exists"):
        register_teacher("my-dino", lambda: DINOTeacherConfig())
    register_teacher("my-dino", lambda: DINOTeacherConfig(name="other"), overwrite=True)
    assert make_teacher_config("my-dino").name == "other"
    register_teacher("broken", lambda: "not a config")  # type: ignore[arg-type, return-value]
    with pytest.raises(TypeError, match="broken"):
        make_teacher_config("broken")


# ---------------------------------------------------------------------------------------------------------
# Full-size architectures, random weights, offline
# ---------------------------------------------------------------------------------------------------------

# (preset, millions of parameters in the image tower, tolerance, feature dim, stride)
FULL_SIZE = [
    pytest.param("clip-vit-b16", 86.2, 1.0, 512, 16, id="clip-vit-b16"),
    pytest.param("siglip2-b16", 93.5, 1.0, 768, 16, id="siglip2-b16", marks=pytest.mark.slow),
    pytest.param("dinov2-s14", 22.1, 0.5, 384, 14, id="dinov2-s14"),
    pytest.param("dinov2-b14", 86.6, 1.0, 768, 14, id="dinov2-b14"),
    pytest.param("dinov3-s16", 21.6, 0.5, 384, 16, id="dinov3-s16"),
    pytest.param("sam-vit-b", 89.7, 1.0, 256, 16, id="sam-vit-b"),
    pytest.param("sam-vit-l", 308.3, 2.0, 256, 16, id="sam-vit-l", marks=pytest.mark.slow),
    pytest.param("sam-vit-h", 637.0, 3.0, 256, 16, id="sam-vit-h", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("preset,image_params_m,tolerance_m,feature_dim,stride", FULL_SIZE)
def test_full_size_architectures_build_offline(
    preset: str, image_params_m: float, tolerance_m: float, feature_dim: int, stride: int
) -> None:
    teacher = build(make_teacher_config(preset, random_weights=True))
    if hasattr(teacher, "encoder"):
        image_tower = teacher.encoder
    elif hasattr(teacher.model, "visual"):
        image_tower = teacher.model.visual
    else:
        image_tower = getattr(teacher.model, "vision_model", teacher.model)
    params_m = sum(p.numel() for p in image_tower.parameters()) / 1e6
    assert abs(params_m - image_params_m) < tolerance_m, f"{preset}: {params_m:.1f}M parameters"
    assert teacher.feature_dim == feature_dim and teacher.feature_stride == stride
    input_size = make_teacher_config(preset).input_size
    assert max(teacher.network_input_size(480, 640)) == input_size
    if teacher.has_text_encoder:
        assert teacher.encode_text(["a chair"]).shape == (1, feature_dim)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["clip-vit-b16", "siglip2-b16", "dinov2-s14", "dinov3-s16", "sam-vit-b"])
def test_full_size_features_have_the_right_grid(preset: str) -> None:
    teacher = build(make_teacher_config(preset, random_weights=True))
    features = teacher.encode_image(images(1, 240, 320))
    assert features.shape == (1, teacher.feature_dim, *teacher.feature_grid(240, 320))
    assert torch.isfinite(features).all()
    if teacher.has_text_encoder:
        text = teacher.encode_text(["a chair"])
        assert F.cosine_similarity(features[0, :, 0, 0], text[0], dim=0).abs() <= 1.0
