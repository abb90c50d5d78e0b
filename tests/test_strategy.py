"""chorus-splat's densification statistics (``models/strategy.py``) against gsplat's DefaultStrategy."""

import copy

import pytest
import torch
from gsplat.strategy import DefaultStrategy
from support import tiny_chorus_model

from splatsem_ns.models.strategy import SyncFreeDefaultStrategy


def _info(n: int, generator: torch.Generator, absgrad: bool) -> dict:
    means2d = torch.zeros(1, n, 2, requires_grad=True)
    gradient = torch.randn(1, n, 2, generator=generator)
    means2d.grad = gradient
    if absgrad:
        means2d.absgrad = gradient.abs() * 1.5
    radii = torch.randint(0, 40, (1, n), generator=generator, dtype=torch.int32)
    radii[0, : n // 3] = 0  # a third of the Gaussians off screen
    return {
        "width": 64,
        "height": 48,
        "n_cameras": 1,
        "radii": radii,
        "gaussian_ids": None,
        "means2d": means2d,
    }


@pytest.mark.parametrize("absgrad", [False, True])
@pytest.mark.parametrize("scale2d", [0, 4000])
def test_statistics_are_gsplats_bit_for_bit(absgrad, scale2d):
    """Over several steps from an empty state, the running sums, counts and maximum radii equal gsplat's exactly."""
    settings = {"absgrad": absgrad, "refine_scale2d_stop_iter": scale2d}
    ours, theirs = SyncFreeDefaultStrategy(**settings), DefaultStrategy(**settings)
    n = 257
    params = {"means": torch.nn.Parameter(torch.zeros(n, 3))}
    ours_state, theirs_state = ours.initialize_state(), DefaultStrategy(**settings).initialize_state()
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        info = _info(n, generator, absgrad)
        ours._update_state(params, ours_state, info, packed=False)
        theirs._update_state(params, theirs_state, copy.copy(info), packed=False)
    keys = ("grad2d", "count") + (("radii",) if scale2d else ())
    for key in keys:
        assert torch.equal(ours_state[key], theirs_state[key]), key
    assert ours_state["count"].max() == 5 and ours_state["count"].min() == 0
    if not scale2d:
        assert ours_state.get("radii") is None


def test_chorus_splat_densifies_with_splatfactos_settings():
    """The strategy chorus-splat swaps in keeps every setting splatfacto gave gsplat's."""
    import dataclasses

    calls = []
    original = DefaultStrategy.__init__

    def capture(self, **settings):
        calls.append((type(self), settings))
        original(self, **settings)

    DefaultStrategy.__init__ = capture
    try:
        model = tiny_chorus_model()
    finally:
        DefaultStrategy.__init__ = original
    (first, splatfacto_settings), (second, _) = calls  # splatfacto's strategy, then chorus-splat's
    assert first is DefaultStrategy and second is SyncFreeDefaultStrategy is type(model.strategy)
    ours = {f.name: getattr(model.strategy, f.name) for f in dataclasses.fields(model.strategy)}
    assert splatfacto_settings and all(ours[k] == v for k, v in splatfacto_settings.items())
