"""What makes a chorus-splat step cheaper on the host without changing its result: the compiled
distillation losses, fused Adam under gsplat's densification, and the teacher features' pinned copy."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from support import GPU_MARKS, gpu_only, tiny_chorus_model

from splatsem_ns.data.datamanager import ChorusDataManager
from splatsem_ns.engine.optimizers import FusedAdamOptimizerConfig, with_optimizer_implementation


def _inputs(device: str):
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(6, 8, 32, generator=generator).to(device).requires_grad_()
    targets = {
        "lang": torch.randn(4, 5, 24, generator=generator).half().to(device),
        "sam": torch.randn(8, 8, 16, generator=generator).half().to(device),
    }
    return latent, targets


def _losses_and_grads(model, fn, latent, targets):
    model.zero_grad(set_to_none=True)
    latent.grad = None
    losses = fn(latent, targets)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.projector_heads.named_parameters()}
    return {k: v.detach() for k, v in losses.items()}, latent.grad.clone(), grads


def _assert_same(a, b, atol=1e-5):
    (losses_a, latent_a, heads_a), (losses_b, latent_b, heads_b) = a, b
    assert losses_a.keys() == losses_b.keys() == {"distill_lang", "distill_sam"}
    for k in losses_a:
        torch.testing.assert_close(losses_a[k], losses_b[k], atol=atol, rtol=1e-4)
    torch.testing.assert_close(latent_a, latent_b, atol=atol, rtol=1e-4)
    for k in heads_a:
        torch.testing.assert_close(heads_a[k], heads_b[k], atol=atol, rtol=1e-4)


def test_distillation_losses_are_weighted_cosine_losses_per_teacher():
    from splatsem_ns.models.heads import cosine_distillation_loss, resize_feature_map

    model = tiny_chorus_model(distill_at="teacher")  # the render resampled onto each teacher's grid
    latent, targets = _inputs("cpu")
    losses = model.distillation_losses(latent, targets)
    expected = 0.5 * cosine_distillation_loss(
        model.projector_heads["sam"](resize_feature_map(latent, (8, 8))), targets["sam"]
    )
    torch.testing.assert_close(losses["distill_sam"], expected)
    assert 0.0 < float(losses["distill_lang"].detach()) < 2.0


def test_traced_distillation_matches_eager_with_gradients():
    """torch.compile's graph capture (with the eager backend, which needs no compiler) gives the same losses
    and gradients as the plain module calls."""
    model = tiny_chorus_model()
    latent, targets = _inputs("cpu")
    eager = _losses_and_grads(model, model.distillation_losses, latent, targets)
    traced = torch.compile(model.distillation_losses, backend="aot_eager")
    _assert_same(eager, _losses_and_grads(model, traced, latent, targets))


def test_cpu_training_uses_the_eager_losses():
    model = tiny_chorus_model()
    latent, _ = _inputs("cpu")
    assert model._distillation_function(latent) == model.distillation_losses
    assert model._compiled_distillation is None


@gpu_only
@pytest.mark.parametrize("options", [(), ("cpp_wrapper=true",), ("combo_kernels=true",)])
def test_compiled_distillation_on_cuda_matches_eager(options):
    """Inductor's defaults, and the options ``compile_options`` exists for, give the eager losses and gradients."""
    model = tiny_chorus_model(compile_options=options).cuda()
    latent, targets = _inputs("cuda")
    eager = _losses_and_grads(model, model.distillation_losses, latent, targets)
    compiled_fn = model._distillation_function(latent)
    assert compiled_fn is model._compiled_distillation is not None
    # As in training, where the options are held through the iteration (its backward compiles the losses' backward).
    model._hold_compile_options(True)
    try:
        compiled = _losses_and_grads(model, compiled_fn, latent, targets)
    finally:
        model._hold_compile_options(False)
    _assert_same(eager, compiled, atol=1e-4)


def test_chorus_splat_uses_fused_adam_everywhere_with_splatfacto_rates():
    from nerfstudio.configs.method_configs import all_methods

    ours, theirs = all_methods["chorus-splat"].optimizers, all_methods["splatfacto"].optimizers
    assert all(isinstance(g["optimizer"], FusedAdamOptimizerConfig) for g in ours.values())
    for name, group in theirs.items():
        assert (ours[name]["optimizer"].lr, ours[name]["optimizer"].eps) == (
            group["optimizer"].lr,
            group["optimizer"].eps,
        )
    optimizer = ours["means"]["optimizer"].setup([torch.nn.Parameter(torch.zeros(3, 3))])
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["fused"] is True

    stock = with_optimizer_implementation(ours, fused=False)
    assert not any(isinstance(g["optimizer"], FusedAdamOptimizerConfig) for g in stock.values())
    assert stock["semantic_latent"]["optimizer"].lr == ours["semantic_latent"]["optimizer"].lr
    assert stock["means"]["scheduler"] is ours["means"]["scheduler"]


def test_fused_adam_follows_gsplat_densification():
    """gsplat's strategy ops rewrite the optimizer state when Gaussians are cloned, split or pruned; the fused
    update must keep stepping on the resized state and match the default implementation."""
    from gsplat.strategy.ops import duplicate, remove

    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        params = torch.nn.ParameterDict({"latent": torch.nn.Parameter(torch.randn(10, 4))})
        optimizers = {"latent": torch.optim.Adam([params["latent"]], lr=0.01, eps=1e-15, fused=fused)}
        state: dict = {}
        for step in range(6):
            (params["latent"] ** 2).sum().backward()
            optimizers["latent"].step()
            optimizers["latent"].zero_grad()
            if step == 2:
                duplicate(params, optimizers, state, torch.arange(10) < 3)
            if step == 4:
                remove(params, optimizers, state, torch.arange(13) % 4 == 0)
        results.append(params["latent"].detach().clone())
        assert optimizers["latent"].state[params["latent"]]["exp_avg"].shape == (9, 4)
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU_MARKS)])
def test_teacher_features_copy_the_cached_maps(tmp_path, device):
    maps = []
    for i in range(2):
        array = np.random.default_rng(i).standard_normal((3, 4, 5)).astype(np.float16)
        np.save(tmp_path / f"{i}.npy", array)
        maps.append(np.load(tmp_path / f"{i}.npy", mmap_mode="r"))
    manager = types.SimpleNamespace(_features={"t": maps}, device=device)
    manager._to_device = lambda host: ChorusDataManager._to_device(manager, host)
    for i in (1, 0, 1):
        features = ChorusDataManager.teacher_features(manager, i)["t"]
        assert features.device.type == device and features.dtype == torch.float16
        np.testing.assert_array_equal(features.cpu().numpy(), maps[i])
        features.add_(1)  # writable, and the cache on disk is untouched
    np.testing.assert_array_equal(np.load(tmp_path / "1.npy"), maps[1])


def test_depth_images_reach_the_device_as_copies():
    """Depth images are held as host tensors (pinned on CUDA when they fit): a step gets a copy it may write."""
    depth = torch.arange(12, dtype=torch.float16).reshape(3, 4)
    manager = types.SimpleNamespace(device="cpu")
    served = ChorusDataManager._to_device(manager, depth)
    torch.testing.assert_close(served, depth)
    served.add_(1)
    assert float(depth[0, 0]) == 0.0


@gpu_only
def test_per_view_inputs_are_pinned_while_they_fit_the_budget():
    """Features first, then depth images, then consistency weights, each kind whole within pinned_features_gib."""
    features = {"t": [np.zeros((4, 4, 8), np.float16)] * 2}  # 512 bytes
    depths = [torch.zeros(8, 8, dtype=torch.float16)] * 2  # 256 bytes
    weights = {"t": [np.ones((4, 4), np.float16)] * 2}  # 64 bytes
    for budget_bytes, pinned in [
        (900, (True, True, True)),
        (800, (True, True, False)),
        (600, (True, False, True)),
    ]:
        manager = types.SimpleNamespace(
            device="cuda", config=types.SimpleNamespace(pinned_features_gib=budget_bytes / 2**30),
            _features=dict(features), _depths=list(depths), _weights=dict(weights),
        )  # fmt: skip
        ChorusDataManager._pin_host_inputs(manager)
        found = (
            isinstance(manager._features["t"][0], torch.Tensor) and manager._features["t"][0].is_pinned(),
            manager._depths[0].is_pinned(),
            isinstance(manager._weights["t"][0], torch.Tensor) and manager._weights["t"][0].is_pinned(),
        )
        assert found == pinned, budget_bytes
        manager._to_device = lambda host, m=manager: ChorusDataManager._to_device(m, host)
        assert ChorusDataManager._to_device(manager, manager._depths[1]).device.type == "cuda"


def test_depth_l1_loss_uses_measured_pixels_only():
    from splatsem_ns.models.chorus_splat import depth_l1_loss

    predicted = torch.full((2, 4, 1), 2.0)
    sensor = torch.tensor(
        [[1.0, 1.0, 0.0, 0.0, 3.0, 3.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0, 3.0, 3.0, 0.0, 0.0]]
    )
    sensor = torch.cat(
        [sensor, sensor]
    ).half()  # [4, 8]: nearest resampling to [2, 4] keeps columns 0, 2, 4, 6
    assert float(depth_l1_loss(predicted, sensor)) == pytest.approx(1.0)  # |2-1| and |2-3|, zeros ignored
    assert float(depth_l1_loss(predicted, torch.zeros(2, 4))) == 0.0


def test_depth_images_load_at_image_size_in_scene_units(tmp_path):
    from PIL import Image

    from splatsem_ns.data.depth import load_depth_image

    millimetres = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000
    Image.fromarray(millimetres).save(tmp_path / "d.png")
    depth = load_depth_image(tmp_path / "d.png", (6, 8), scale=1e-3 * 0.5)
    assert depth.dtype == torch.float16 and depth.shape == (6, 8)
    assert float(depth[5, 7]) == pytest.approx(5.5) and float(depth[0, 0]) == 0.0
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="single channel"):
        load_depth_image(tmp_path / "rgb.png", (3, 4), 1.0)
    with pytest.raises(ValueError, match="Cannot read depth image"):
        load_depth_image(tmp_path / "missing.png", (3, 4), 1.0)


def test_depth_loss_weight_defaults_to_on_where_the_scene_has_depth():
    from splatsem_ns.models.chorus_splat import DEFAULT_DEPTH_LOSS_WEIGHT, resolve_depth_loss_weight

    assert resolve_depth_loss_weight(None, depth_served=True) == DEFAULT_DEPTH_LOSS_WEIGHT > 0
    assert resolve_depth_loss_weight(None, depth_served=False) == 0.0
    assert resolve_depth_loss_weight(0.0, depth_served=True) == 0.0
    assert resolve_depth_loss_weight(0.5, depth_served=False) == 0.5  # required: the datamanager raises

    # "auto" serves depth only when every training view has an image.
    def manager(paths):
        return types.SimpleNamespace(train_dataset=_Sized({"depth_filenames": paths}, 2))

    assert ChorusDataManager._every_view_has_depth(manager(["a.png", "b.png"]))
    assert not ChorusDataManager._every_view_has_depth(manager(["a.png", None]))
    assert not ChorusDataManager._every_view_has_depth(manager(None))


class _Sized:
    """A stand-in dataset with metadata and a length."""

    def __init__(self, metadata: dict, length: int) -> None:
        self.metadata, self._length = metadata, length

    def __len__(self) -> int:
        return self._length


def test_depth_loss_without_depth_images_is_a_clear_error():
    manager = types.SimpleNamespace(train_dataset=types.SimpleNamespace(metadata={}))
    with pytest.raises(ValueError, match="no depth images"):
        ChorusDataManager._load_train_depths(manager)


def _per_teacher_distillation(model, latent, targets, pixels=None, pixel_weights=None, target_weights=None):
    """The distillation losses as first written: each teacher gathers the latent and resamples its features alone."""
    from splatsem_ns.models.chorus_splat import render_resolution_pairs
    from splatsem_ns.models.heads import cosine_distillation_loss, resize_feature_map

    losses = {}
    for name, target in targets.items():
        kept = None if target_weights is None else target_weights.get(name)
        if model.config.distill_at == "render":
            target = target.to(latent.dtype)
            if kept is not None:
                target = torch.cat([target, kept.to(latent.dtype)[..., None]], dim=-1)
            latent_at, target = render_resolution_pairs(latent, target, pixels)
            predicted, weights = model.decode_features(latent_at, name), pixel_weights
            if kept is not None:
                target, kept = target[:, :-1], target[:, -1]
                weights = kept if weights is None else weights * kept
        else:
            predicted = model.decode_features(resize_feature_map(latent, tuple(target.shape[:2])), name)
            weights = kept
        weight = model.config.teacher_loss_weights.get(name, model.config.default_teacher_loss_weight)
        losses[f"distill_{name}"] = weight * cosine_distillation_loss(predicted, target, weights)
    return losses


@pytest.mark.parametrize("distill_at", ["render", "teacher"])
@pytest.mark.parametrize("grids", [((8, 8), (8, 8)), ((4, 5), (8, 8))])
@pytest.mark.parametrize("sampled", [True, False])
@pytest.mark.parametrize("with_weights", [True, False])
def test_shared_gather_and_resampling_match_the_per_teacher_losses(distill_at, grids, sampled, with_weights):
    """One latent gather and one resampling per teacher grid give each teacher's loss and every gradient as
    resampling and gathering per teacher did."""
    model = tiny_chorus_model(distill_at=distill_at)
    generator = torch.Generator().manual_seed(2)
    latent = torch.randn(24, 32, 32, generator=generator).requires_grad_()
    targets = {
        name: torch.randn(*grid, dim, generator=generator).half()
        for (name, dim), grid in zip((("lang", 24), ("sam", 16)), grids, strict=True)
    }
    kept = {n: (torch.rand(*t.shape[:2], generator=generator) > 0.3).half() for n, t in targets.items()}
    kept = kept if with_weights else None
    pixels = (
        torch.randperm(24 * 32, generator=generator)[:100] if sampled and distill_at == "render" else None
    )
    pixel_weights = None
    if with_weights and distill_at == "render":
        pixel_weights = torch.rand(100 if pixels is not None else 24 * 32, generator=generator)
    new = _losses_and_grads(
        model, lambda *a: model.distillation_losses(*a, pixels, pixel_weights, kept), latent, targets
    )
    old = _losses_and_grads(
        model, lambda *a: _per_teacher_distillation(model, *a, pixels, pixel_weights, kept), latent, targets
    )
    for a, b in zip(new, old, strict=True):  # losses, the latent's gradient, the heads' gradients
        for key in a if isinstance(a, dict) else [None]:
            x, y = (a[key], b[key]) if key is not None else (a, b)
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8)


def test_training_metrics_are_computed_on_logging_steps_only(monkeypatch):
    from nerfstudio.utils import writer
    from support import tiny_camera

    model = tiny_chorus_model(num_downscales=0)
    model.train()
    model.optimizers = {}
    outputs = model.get_outputs(tiny_camera())
    batch = {"image": torch.rand(48, 64, 3)}
    monkeypatch.setitem(writer.GLOBAL_BUFFER, "steps_per_log", 10)
    for step, logged in ((0, True), (3, False), (20, True)):
        model.step = step
        assert ("psnr" in model.get_metrics_dict(outputs, batch)) == logged
    model.eval()
    assert "psnr" in model.get_metrics_dict(outputs, batch)  # evaluation always
    monkeypatch.delitem(writer.GLOBAL_BUFFER, "steps_per_log")
    model.train()
    assert "psnr" in model.get_metrics_dict(outputs, batch)  # no trainer's writer: always


@pytest.mark.parametrize(
    "settings, step, masked",
    [({}, 3, False), ({}, 3, True), ({"use_scale_regularization": True}, 10, False),
     ({"use_scale_regularization": True}, 11, True), ({"use_bilateral_grid": True}, 5, False)],
)  # fmt: skip
def test_splatfacto_losses_match_splatfacto_without_the_host_copy(settings, step, masked):
    """chorus-splat's own copy of splatfacto's losses gives splatfacto's values and gradients; its zero scale
    regularisation is made on the model's device, and SSIM's window is a buffer that moves with the model."""
    from nerfstudio.models.splatfacto import SplatfactoModel
    from support import tiny_camera

    model = tiny_chorus_model(num_downscales=0, **settings)
    model.train()
    model.optimizers = {}
    model.step = step
    torch.manual_seed(0)
    outputs = model.get_outputs(tiny_camera())
    batch = {"image": torch.rand(48, 64, 3)}
    if masked:
        batch["mask"] = torch.rand(48, 64, 1) > 0.3
    ours = model._splatfacto_loss_dict(outputs, batch)
    theirs = SplatfactoModel.get_loss_dict(model, outputs, batch)
    assert set(ours) == set(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-7)
    params = [model.gauss_params["means"], model.gauss_params["scales"]]
    ours_grad = torch.autograd.grad(sum(ours.values()), params, allow_unused=True, retain_graph=True)
    theirs_grad = torch.autograd.grad(sum(theirs.values()), params, allow_unused=True)
    for a, b in zip(ours_grad, theirs_grad, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert "win" in dict(model.ssim.named_buffers()) and "ssim.win" not in model.state_dict()


def test_compile_options_are_checked_when_the_model_is_built(monkeypatch):
    """``compile_options``: KEY=VALUE entries become torch.compile's inductor options (bools and numbers typed),
    reach torch.compile with the distillation, and a misspelt option, an entry without "=", or an unknown
    ``compile_mode`` fail when the model is built, not at the first step's compile."""
    from splatsem_ns.models.compile_options import compile_arguments, inductor_options

    assert inductor_options(()) is None
    assert inductor_options(
        ("cpp_wrapper=true", "combo_kernels=False", "max_autotune_gemm_search_space=DEFAULT")
    ) == {
        "cpp_wrapper": True,
        "combo_kernels": False,
        "max_autotune_gemm_search_space": "DEFAULT",
    }
    for entries, mode, message in [
        (("cpp_wraper=true",), None, "no option 'cpp_wraper'"),
        (("cpp_wrapper",), None, "KEY=VALUE"),
        (("cpp_wrapper=true",), "reduce-overheads", "Unrecognized mode"),
        ((), "reduce-overheads", "Unrecognized mode"),
    ]:
        with pytest.raises(ValueError, match=message):
            compile_arguments(entries, mode)
        with pytest.raises(ValueError, match=message):
            tiny_chorus_model(compile_options=entries, compile_mode=mode)
    # torch.compile takes a mode or options, not both: a mode beside options goes in as the options it stands for,
    # so that compile_mode still works with the default compile_options.
    assert compile_arguments(("cpp_wrapper=true",), "reduce-overhead") == {
        "mode": None,
        "options": {"triton.cudagraphs": True, "cpp_wrapper": True},
    }
    assert compile_arguments((), "reduce-overhead") == {"mode": "reduce-overhead", "options": None}
    assert compile_arguments(("triton.cudagraphs=false",), "reduce-overhead")["options"] == {
        "triton.cudagraphs": False
    }

    model = tiny_chorus_model(compile_options=("cpp_wrapper=true",))
    model.train()
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    cuda_latent = types.SimpleNamespace(is_cuda=True)  # compile_distillation compiles on CUDA only
    assert model._distillation_function(cuda_latent) == model.distillation_losses
    assert calls == [{"mode": None, "options": {"cpp_wrapper": True}}]


def test_held_options_patch_inductor_and_restore_it():
    """``HeldOptions`` sets the options process-wide and restores what they replaced; entering again after a span
    that never exited (an iteration that raised) does not stack, and exiting twice is harmless."""
    import torch._inductor.config as inductor_config

    from splatsem_ns.models.compile_options import HeldOptions, release_held_options

    before = (inductor_config.cpp_wrapper, inductor_config.combo_kernels)
    held = HeldOptions({"cpp_wrapper": not before[0], "combo_kernels": not before[1]})
    with held:
        assert held.held and (inductor_config.cpp_wrapper, inductor_config.combo_kernels) == (
            not before[0],
            not before[1],
        )
    assert not held.held and (inductor_config.cpp_wrapper, inductor_config.combo_kernels) == before
    held.enter()
    held.enter()  # the previous span never exited
    held.exit()
    held.exit()
    assert (inductor_config.cpp_wrapper, inductor_config.combo_kernels) == before
    # Runs that raised inside their iterations left two holds of the same option: released last entered first.
    first, second = HeldOptions({"cpp_wrapper": not before[0]}), HeldOptions({"cpp_wrapper": before[0]})
    first.enter()
    second.enter()
    release_held_options()
    assert not (first.held or second.held) and inductor_config.cpp_wrapper == before[0]


def test_compile_options_are_held_through_each_cuda_training_iteration(monkeypatch):
    """With ``compile_options``, the model's callbacks hold them from before each training iteration to after it (the
    trainer's backward compiles the compiled losses' backward), on CUDA only; without options there is no such
    callback."""
    import torch._inductor.config as inductor_config
    from nerfstudio.engine.callbacks import TrainingCallbackAttributes, TrainingCallbackLocation

    def callbacks(model, location):
        attributes = TrainingCallbackAttributes(
            optimizers=None, grad_scaler=None, pipeline=None, trainer=None
        )
        return [c for c in model.get_training_callbacks(attributes) if location in c.where_to_run]

    plain = tiny_chorus_model(compile_options=())
    assert plain.held_compile_options is None
    model = tiny_chorus_model(compile_options=("cpp_wrapper=true",))
    before = TrainingCallbackLocation.BEFORE_TRAIN_ITERATION
    after = TrainingCallbackLocation.AFTER_TRAIN_ITERATION
    for location in (before, after):
        assert len(callbacks(model, location)) == len(callbacks(plain, location)) + 1
    hold, release = callbacks(model, before)[0], callbacks(model, after)[-1]  # first before, last after
    default = inductor_config.cpp_wrapper
    hold.run_callback_at_location(0, before)
    assert inductor_config.cpp_wrapper == default, "nothing is compiled on the CPU: nothing held"
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    try:
        hold.run_callback_at_location(1, before)
        assert inductor_config.cpp_wrapper is True and model.held_compile_options.held
    finally:
        release.run_callback_at_location(1, after)
    assert inductor_config.cpp_wrapper == default and not model.held_compile_options.held


def test_a_run_spec_passes_tuple_fields_split_at_semicolons(tmp_path):
    """``train_speed.py --methods 'cpp=chorus-splat:compile_options=cpp_wrapper=true;combo_kernels=true'``."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import parse_method, trainer_config

    label, method, overrides = parse_method(
        "cpp=chorus-splat:compile_options=cpp_wrapper=true;combo_kernels=true"
    )
    assert (label, method) == ("cpp", "chorus-splat")
    cfg = trainer_config(method, tmp_path, tmp_path / "out", 10, ["labels"], overrides=overrides)
    assert cfg.pipeline.model.compile_options == ("cpp_wrapper=true", "combo_kernels=true")


def _voxel_prior_inputs(count: int, device: str = "cpu"):
    generator = torch.Generator().manual_seed(count)
    latent = torch.randn(count, 32, generator=generator).to(device).requires_grad_()
    means = torch.rand(count, 3, generator=generator).to(device)
    weights = torch.rand(count, generator=generator).to(device)
    return latent, means, weights, 0.1, torch.rand(3, generator=generator).to(device) * 0.1


def test_the_voxel_prior_compiles_as_one_graph_for_any_gaussian_count():
    """``compile_voxel_prior`` compiles ``voxel_consensus_loss`` whole (``fullgraph``) with dynamic shapes: the
    capture (the eager backend, which needs no compiler) has no graph break and gives the eager loss and gradient
    at two Gaussian counts, as densification changes it."""
    from splatsem_ns.models.smoothness import voxel_consensus_loss

    captured = torch.compile(voxel_consensus_loss, backend="aot_eager", dynamic=True, fullgraph=True)
    for count in (900, 1300):
        latent, *rest = _voxel_prior_inputs(count)
        eager = voxel_consensus_loss(latent, *rest)
        (eager_grad,) = torch.autograd.grad(eager, latent)
        compiled = captured(latent, *rest)
        (compiled_grad,) = torch.autograd.grad(compiled, latent)
        torch.testing.assert_close(compiled, eager)
        torch.testing.assert_close(compiled_grad, eager_grad)


def test_compile_voxel_prior_compiles_once_on_cuda_only(monkeypatch):
    """The model's voxel prior goes through one ``torch.compile`` (dynamic shapes, whole graph, the configured
    options) when ``compile_voxel_prior`` is on and the latents are on CUDA, and stays eager otherwise. CUDA is
    faked (``is_cuda``) and the compile recorded, so the compiled call here runs the eager function."""
    calls = []
    model = tiny_chorus_model(compile_voxel_prior=True, compile_options=("combo_kernels=true",))
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append((fn.__name__, kwargs)) or fn)
    model.train()
    torch.manual_seed(0)
    eager = model._voxel_prior_loss()  # CPU: eager
    assert calls == [] and model._compiled_voxel_prior is None
    with monkeypatch.context() as cuda:
        cuda.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        torch.manual_seed(0)
        through_compile = model._voxel_prior_loss()
        model._voxel_prior_loss()
    expected = {"mode": None, "options": {"combo_kernels": True}, "dynamic": True, "fullgraph": True}
    assert calls == [("voxel_consensus_loss", expected)]  # compiled once, reused
    torch.testing.assert_close(through_compile, eager)


def test_the_first_compile_is_announced_once(monkeypatch):
    """The compiled losses stall the first CUDA steps for up to a minute: the first compile says so (and how to turn
    it off), once per model, not once per compiled function. CUDA is faked and the compile recorded."""
    import splatsem_ns.models.chorus_splat as chorus_splat

    logged = []
    monkeypatch.setattr(chorus_splat.CONSOLE, "log", lambda *args, **kwargs: logged.append(" ".join(args)))
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    model = tiny_chorus_model()
    model.train()
    model._voxel_prior_loss()  # CPU: eager, nothing to say
    assert logged == []
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    model._voxel_prior_loss()
    model._distillation_function(model.means)
    model._voxel_prior_loss()
    assert (
        len(logged) == 1 and "first training steps" in logged[0] and "compile-voxel-prior False" in logged[0]
    )


def test_cpp_wrapper_without_a_cpp_compiler_fails_at_once_and_says_how_to_go_on(monkeypatch):
    """Where no C++ compiler exists, ``cpp_wrapper=true`` (a default) stops before the first compile with a message
    that names the fix; without it, the same model compiles. CUDA is faked and the compile recorded."""
    import torch._inductor.cpp_builder as cpp_builder
    from torch._inductor import exc

    def no_compiler(*args, **kwargs):
        raise exc.InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    model = tiny_chorus_model()
    model.train()
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler was found.*--pipeline.model.compile-options"):
        model._voxel_prior_loss()
    assert calls == []
    without = tiny_chorus_model(compile_options=())
    without.train()
    without._voxel_prior_loss()
    assert len(calls) == 1 and calls[0]["options"] is None


def test_the_models_voxel_prior_is_not_recompiled_as_densification_changes_the_count(monkeypatch):
    """The model hands the compiled voxel prior plain tensors: Dynamo keeps an ``nn.Parameter``'s sizes static
    whatever ``dynamic`` says, so passing the Gaussians' Parameters recompiled at every new count, and past Dynamo's
    recompile limit (8) ``fullgraph`` failed the run. Here the count changes 12 times; the capture (the eager
    backend, no compiler needed, CUDA faked for the model's check) compiles at most twice."""
    from torch import nn
    from torch._dynamo.testing import CompileCounter

    from splatsem_ns.models.smoothness import voxel_consensus_loss

    torch._dynamo.reset()
    counter = CompileCounter()
    model = tiny_chorus_model(compile_voxel_prior=True)
    model.train()
    model._compiled_voxel_prior = torch.compile(
        voxel_consensus_loss, backend=counter, dynamic=True, fullgraph=True
    )
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    for count in range(60, 180, 10):
        for name, param in list(model.gauss_params.items()):
            model.gauss_params[name] = nn.Parameter(torch.randn(count, *param.shape[1:]))
        loss = model._voxel_prior_loss()
        loss.backward()
        assert (
            model.gauss_params[model.semantic_source.PARAM_NAME].grad is not None
        )  # the view kept the gradient
    assert counter.frame_count <= 2
    torch._dynamo.reset()


@gpu_only
def test_the_compiled_voxel_prior_on_cuda_matches_eager():
    from splatsem_ns.models.smoothness import voxel_consensus_loss

    model = tiny_chorus_model(compile_voxel_prior=True).cuda()
    model.train()
    torch.manual_seed(0)
    compiled = model._voxel_prior_loss()
    assert model._compiled_voxel_prior is not None
    for count in (900, 1300):
        latent, *rest = _voxel_prior_inputs(count, "cuda")
        eager = voxel_consensus_loss(latent, *rest)
        (eager_grad,) = torch.autograd.grad(eager, latent)
        result = model._compiled_voxel_prior(latent, *rest)
        (result_grad,) = torch.autograd.grad(result, latent)
        torch.testing.assert_close(result, eager, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(result_grad, eager_grad, rtol=1e-3, atol=1e-7)
    assert torch.isfinite(compiled)


def test_the_compiled_distillation_compiles_once_over_a_training_run(tmp_path, monkeypatch):
    """Through the real trainer and datamanager (each step's own teacher features, consistency weights, pixel draw
    and area weights), Dynamo captures the distillation once, whole: a guard on something that changes from step
    to step would recompile it every step on the GPU, and past Dynamo's 8 entries run it eagerly without a word.
    The capture runs on the CPU with the eager backend, which needs no compiler."""
    import sys
    from pathlib import Path

    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import release_earlier_runs
    from step_ops import build

    release_earlier_runs()  # Dynamo's state and counts from other tests
    trainer = build("chorus-splat", tmp_path, 24)
    model = trainer.pipeline.model
    counted = CompileCounterWithBackend("aot_eager")
    captured = torch.compile(model.distillation_losses, backend=counted)
    calls = []
    monkeypatch.setattr(model, "_distillation_function", lambda latent: calls.append(1) or captured)
    trainer.train()
    assert len(calls) >= 20  # the semantic half ran on (nearly) every step
    assert counted.frame_count == 1, f"compiled {counted.frame_count} times in {len(calls)} steps"
    assert not counters["graph_break"] and not counters["resumes"]
