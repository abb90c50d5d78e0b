"""A cheap watch for NaN and inf in training, that names where they first appeared.

The PyTorch rasterizer checks its inputs and raises at once, naming the bad one. On CUDA that check would cost a
host-device synchronisation per step, and gsplat's kernels do not check: a NaN in a teacher's features or in a
Gaussian's colour becomes a NaN loss, then NaN gradients in every parameter, and the error, if any, comes later
from somewhere else (densification, the rasterizer), with nothing pointing at the cause.

``NonFiniteWatch`` keeps, on the device, the first step at which each watched tensor held a NaN or inf, and for
the batch inputs which training image it was. Recording costs a few small kernels per step and never waits for
the device; only ``check`` (every ``check_every`` steps, and before a checkpoint is written) reads the record on
the host. Its error names the earliest source: a batch input (teacher features, depth) with its step and image,
a loss term, or, when the inputs and losses were finite, the Gaussian parameters that diverged.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor


class NonFiniteTrainingError(FloatingPointError):
    """Training met a NaN or inf; the message names its first source."""


class NonFiniteWatch:
    """First step (and image) at which each watched tensor was not finite; see the module docstring."""

    def __init__(self) -> None:
        self._first: Dict[str, Tensor] = {}  # group -> int64 [K]: first bad step per name, -1 while finite
        self._image: Dict[str, Tensor] = {}  # group -> int64 [K]: the training image of that step
        self._names: Dict[str, List[str]] = {}
        self.checked_up_to = -1
        """The last step a ``check`` covered."""

    def record(self, group: str, tensors: Mapping[str, Tensor], step: int, image: int = -1) -> None:
        """Note which of ``tensors`` hold a NaN or inf at ``step`` (training image ``image``). No host sync."""
        if not tensors:
            return
        names, values = list(tensors), [t.detach() for t in tensors.values()]
        if all(t.dim() == 0 for t in values):  # scalars (losses): one kernel for all of them
            bad = ~torch.isfinite(torch.stack(values).float())
        else:
            bad = ~torch.stack([torch.isfinite(t).all() for t in values])
        key = (
            f"{group}:{','.join(names)}"  # the set of names can change (a teacher without features this step)
        )
        if key not in self._first:
            self._first[key] = torch.full((len(names),), -1, dtype=torch.int64, device=bad.device)
            self._image[key] = torch.full((len(names),), -1, dtype=torch.int64, device=bad.device)
            self._names[key] = names
        first = self._first[key]
        new = bad & (first < 0)
        self._image[key] = torch.where(new, image, self._image[key])
        self._first[key] = torch.where(new, step, first)

    def problems(self) -> List[Tuple[int, str, str, int]]:
        """``(step, group, name, image)`` of every watched tensor that was not finite, earliest first (syncs)."""
        found = []
        for key, first in self._first.items():
            group = key.split(":", 1)[0]
            steps, images = first.tolist(), self._image[key].tolist()
            for name, step, image in zip(self._names[key], steps, images, strict=True):
                if step >= 0:
                    found.append((step, group, name, image))
        return sorted(found)

    def check(
        self,
        step: int,
        parameters: Mapping[str, Tensor],
        image_names: Optional[Sequence[str]] = None,
    ) -> None:
        """Raise ``NonFiniteTrainingError`` if any watched tensor, or any of ``parameters`` now, is not finite.

        Args:
            step: The current step (the parameters are checked as they are now).
            parameters: The Gaussians' parameters by name (checked here, not per step: once inputs and losses are
                finite, a parameter can only turn non-finite by diverging, and then the step hardly matters).
            image_names: Training image names by index, to name the image of a bad batch input.
        """
        since = self.checked_up_to + 1
        self.checked_up_to = step
        found = self.problems()
        bad_params = {
            name: int((~torch.isfinite(p.detach())).reshape(p.shape[0], -1).any(dim=1).sum())
            for name, p in parameters.items()
            if p.numel() and not bool(torch.isfinite(p.detach()).all())
        }
        if not found and not bad_params:
            return
        lines = []
        if found:
            first_step, group, name, image = found[0]
            where = ""
            if image >= 0:
                where = f" of training image {image_names[image] if image_names else image}"
            lines.append(
                f"First non-finite value (NaN or inf): {group} '{name}'{where} at step {first_step}."
            )
            if group == "batch input":
                lines.append(
                    "It came from the data, not the optimisation: check that file (and the teacher's features "
                    "of it) for NaN or inf."
                )
            for later in found[1:4]:
                lines.append(f"Then: {later[1]} '{later[2]}' at step {later[0]}.")
        if bad_params:
            counts = ", ".join(f"'{n}' ({c} Gaussians)" for n, c in bad_params.items())
            lines.append(f"Gaussian parameters non-finite at step {step}: {counts}.")
            if not found:
                lines.append(
                    f"The inputs and losses were finite, so the optimisation diverged between steps {since} and "
                    f"{step}: lower the learning rates (--optimizers.*), check the cameras, and resume from the "
                    "last checkpoint."
                )
        raise NonFiniteTrainingError("Training stopped on non-finite values. " + " ".join(lines))
