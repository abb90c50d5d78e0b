"""splatfacto's SSIM loss with its Gaussian blurs stacked (``models/ssim.py``), against pytorch_msssim's."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from pytorch_msssim import SSIM
from support import gpu_only, tiny_chorus_model
from torch.utils._python_dispatch import TorchDispatchMode

from splatsem_ns.models.ssim import blur_weights, gaussian_window, photometric_loss, stacked_ssim


def _images(shape, dtype):
    generator = torch.Generator().manual_seed(sum(shape))
    target = torch.rand(*shape, generator=generator).to(dtype)
    noise = 0.1 * torch.randn(*shape, generator=generator).to(dtype)
    render = (target + noise).clamp(0, 1).requires_grad_()
    return target, render


@pytest.mark.parametrize("shape", [(1, 3, 48, 64), (1, 3, 11, 30), (2, 1, 40, 23)])
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_stacked_ssim_gives_pytorch_msssims_value_and_gradient(shape, dtype, atol):
    """splatfacto's SSIM (11-tap window of sigma 1.5, data range 1), value and gradient with respect to the
    render, for images down to the window's own size, several channels and a batch."""
    target, render = _images(shape, dtype)
    reference = SSIM(data_range=1.0, size_average=True, channel=shape[1]).to(dtype)
    expected = reference(target, render)
    (expected_grad,) = torch.autograd.grad(expected, render)
    ours = stacked_ssim(target, render, blur_weights(gaussian_window().to(dtype), 3 * shape[1]))
    (ours_grad,) = torch.autograd.grad(ours, render)
    torch.testing.assert_close(ours, expected, atol=atol, rtol=0)
    torch.testing.assert_close(ours_grad, expected_grad, atol=atol * 1e-2, rtol=1e-5)
    assert 0.5 < float(ours) < 1.0  # a real comparison: similar images, not identical ones


def test_the_window_is_pytorch_msssims():
    torch.testing.assert_close(gaussian_window(), SSIM(channel=1).win.flatten())


def test_images_smaller_than_the_window_and_too_few_weights_are_refused():
    target, render = _images((1, 3, 10, 64), torch.float32)
    with pytest.raises(ValueError, match="at least 11x11"):
        stacked_ssim(target, render, blur_weights(gaussian_window(), 9))
    target, render = _images((1, 3, 20, 64), torch.float32)
    with pytest.raises(ValueError, match="cover 6 channels; 9"):
        stacked_ssim(target, render, blur_weights(gaussian_window(), 6))


def test_the_blur_weights_are_contiguous_for_every_group():
    """cuDNN copies weights that are not contiguous at every call: the weights of both stacked groups (6 and 9
    channels) are contiguous slices of the ones built once."""
    vertical, horizontal = blur_weights(gaussian_window(), 9)
    assert vertical.shape == (9, 1, 11, 1) and horizontal.shape == (9, 1, 1, 11)
    assert all(w[:channels].is_contiguous() for w in (vertical, horizontal) for channels in (6, 9))


class _Convolutions(TorchDispatchMode):
    """Counts the convolutions dispatched, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("convolution", "convolution_backward"):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _splatfactos_main_loss(model, target, render):
    """splatfacto's main loss as nerfstudio computes it, with pytorch_msssim's SSIM."""
    l1 = torch.abs(target - render).mean()
    ssim = model.ssim(target.permute(2, 0, 1)[None], render.permute(2, 0, 1)[None])
    lam = model.config.ssim_lambda
    return (1 - lam) * l1 + lam * (1 - ssim)


@pytest.mark.parametrize("stacked, forward, backward", [(True, 4, 2), (False, 10, 6)])
def test_the_training_loss_blurs_in_four_convolutions_forward_and_two_backward(stacked, forward, backward):
    """chorus-splat's main RGB loss: four blurs forward and two backward stacked, ten and six as splatfacto computes
    it, with splatfacto's value."""
    model = tiny_chorus_model(stacked_ssim=stacked)
    target, render = (im[0].permute(1, 2, 0) for im in _images((1, 3, 48, 64), torch.float32))
    with _Convolutions() as counted:
        loss = model._photometric_loss(target, render)
        loss.backward()
    assert counted.counts == {"convolution": forward, "convolution_backward": backward}
    torch.testing.assert_close(loss, _splatfactos_main_loss(model, target, render), atol=1e-7, rtol=0)


def test_images_smaller_than_the_window_take_splatfactos_ssim():
    """An early coarse-to-fine step of a tiny scene renders fewer pixels than the window: pytorch_msssim skips the
    blur along that side (with a warning), so the loss takes its SSIM there instead of refusing the image."""
    model = tiny_chorus_model()
    target, render = (im[0].permute(1, 2, 0) for im in _images((1, 3, 6, 8), torch.float32))
    with pytest.warns(UserWarning, match="Skipping Gaussian Smoothing"):
        loss = model._photometric_loss(target, render)
    with pytest.warns(UserWarning):
        torch.testing.assert_close(loss, _splatfactos_main_loss(model, target, render))


def test_the_photometric_loss_compiles_as_one_graph():
    """``compile_photometric_loss`` compiles ``photometric_loss`` whole (``fullgraph``): the capture (the eager
    backend, which needs no compiler) has no graph break and gives the eager loss and gradient."""
    target, render = (im[0].permute(1, 2, 0) for im in _images((1, 3, 48, 64), torch.float32))
    arguments = (blur_weights(gaussian_window(), 9), 0.2, 1.0, (0.01, 0.03))
    eager = photometric_loss(target, render, *arguments)
    (eager_grad,) = torch.autograd.grad(eager, render)
    captured = torch.compile(photometric_loss, backend="aot_eager", fullgraph=True)(
        target, render, *arguments
    )
    (captured_grad,) = torch.autograd.grad(captured, render)
    torch.testing.assert_close(captured, eager)
    torch.testing.assert_close(captured_grad, eager_grad)


def test_compile_photometric_loss_compiles_once_on_cuda_only(monkeypatch):
    """The model's main loss goes through one ``torch.compile`` (whole graph, the configured options) when
    ``compile_photometric_loss`` is on and the render is on CUDA, and stays eager otherwise. CUDA is faked
    (``is_cuda``) and the compile recorded, so the compiled call here runs the eager function."""
    calls = []
    model = tiny_chorus_model(compile_photometric_loss=True, compile_options=("combo_kernels=true",))
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append((fn.__name__, kwargs)) or fn)
    target, render = (im[0].permute(1, 2, 0) for im in _images((1, 3, 48, 64), torch.float32))
    eager = model._photometric_loss(target, render)  # CPU: eager
    assert calls == [] and model._compiled_photometric_loss is None
    with monkeypatch.context() as cuda:
        cuda.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        through_compile = model._photometric_loss(target, render)
        model._photometric_loss(target, render)
    assert calls == [
        ("photometric_loss", {"mode": None, "options": {"combo_kernels": True}, "fullgraph": True})
    ]
    torch.testing.assert_close(through_compile, eager)


def test_without_the_stacked_ssim_the_photometric_loss_stays_eager(monkeypatch):
    """``compile_photometric_loss`` (on by default) compiles the stacked SSIM only: ``stacked_ssim=False`` is still
    a valid choice, and its loss (pytorch_msssim's, splatfacto's value) is not compiled, even on CUDA (faked)."""
    calls = []
    model = tiny_chorus_model(compile_photometric_loss=True, stacked_ssim=False)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(fn.__name__) or fn)
    target, render = (im[0].permute(1, 2, 0) for im in _images((1, 3, 48, 64), torch.float32))
    eager = model._photometric_loss(target, render)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    torch.testing.assert_close(model._photometric_loss(target, render), eager)
    assert calls == [] and model._compiled_photometric_loss is None
    torch.testing.assert_close(eager, _splatfactos_main_loss(model, target, render), atol=1e-7, rtol=0)


@gpu_only
def test_the_compiled_photometric_loss_on_cuda_matches_eager():
    model = tiny_chorus_model(compile_photometric_loss=True).cuda()
    target, render = (im[0].permute(1, 2, 0).cuda() for im in _images((1, 3, 48, 64), torch.float32))
    render = render.detach().requires_grad_()
    compiled = model._photometric_loss(target, render)
    assert model._compiled_photometric_loss is not None
    (compiled_grad,) = torch.autograd.grad(compiled, render)
    eager = _splatfactos_main_loss(model, target, render)
    (eager_grad,) = torch.autograd.grad(eager, render)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)
    torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-9, rtol=1e-4)
