"""gsplat's densification strategy without its per-step host synchronisations.

After every training step ``DefaultStrategy._update_state`` adds each visible Gaussian's screen-space gradient norm,
a count and its largest screen radius to running statistics. With ``packed=False`` renders (splatfacto's) it picks
the visible Gaussians with ``torch.where`` and boolean-mask indexing, whose output sizes the host has to read from
the GPU: three waits for the GPU per step, in a step whose pace the host sets. The same sums need no selection: the
invisible Gaussians' terms are made zero (and their radii left out of the maximum) instead of removed.
"""

from __future__ import annotations

from typing import Any, Dict, Union

import torch
from gsplat.strategy import DefaultStrategy


class SyncFreeDefaultStrategy(DefaultStrategy):
    """``DefaultStrategy`` with ``_update_state`` written without data-dependent shapes for unpacked renders. With one
    camera per step (training's), the statistics are bit for bit gsplat's: each Gaussian's entry gains the same single
    term, and a term of zero leaves the others unchanged."""

    @torch.no_grad()
    def _update_state(
        self,
        params: Union[Dict[str, torch.nn.Parameter], torch.nn.ParameterDict],
        state: Dict[str, Any],
        info: Dict[str, Any],
        packed: bool = False,
    ) -> None:
        if packed:
            return super()._update_state(params, state, info, packed=packed)
        for key in ["width", "height", "n_cameras", "radii", "gaussian_ids", self.key_for_gradient]:
            assert key in info, f"{key} is required but missing."
        gradient = info[self.key_for_gradient]
        grads = (gradient.absgrad if self.absgrad else gradient.grad).clone()  # [C, N, 2]
        # Normalised to [-1, 1] screen space, as gsplat does.
        grads[..., 0] *= info["width"] / 2.0 * info["n_cameras"]
        grads[..., 1] *= info["height"] / 2.0 * info["n_cameras"]
        n_gaussian = len(list(params.values())[0])
        for key in ("grad2d", "count") + (("radii",) if self.refine_scale2d_stop_iter > 0 else ()):
            if state[key] is None:
                state[key] = torch.zeros(n_gaussian, device=grads.device)
        visible = info["radii"] > 0.0  # [C, N]
        state["grad2d"] += torch.where(visible, grads.norm(dim=-1), 0.0).sum(dim=0)
        state["count"] += visible.sum(dim=0)
        if self.refine_scale2d_stop_iter > 0:
            # Normalised to [0, 1] screen space; the running maximum is never negative, so zeros leave it as it is.
            radii = torch.where(visible, info["radii"] / float(max(info["width"], info["height"])), 0.0)
            torch.maximum(state["radii"], radii.amax(dim=0), out=state["radii"])
