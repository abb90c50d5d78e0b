"""A cheap watch for NaN and inf in training, that names where they first appeared.

The PyTorch rasterizer checks its inputs and raises at once, naming the bad one. On CUDA that check would cost a
host-device synchronisation per step, and gsplat's kernels do not check: a NaN in a teacher's features or in a
Gaussian's colour becomes a NaN loss, then NaN gradients in every parameter, and the error, if any, comes later
from somewhere else (densification, the rasterizer), with nothing pointing at the cause.

``NonFiniteWatch`` keeps, on the device, what each step recorded (the losses themselves, one stacked tensor per
step; for the batch inputs whether each was finite) and, on the host, the first step at which each watched tensor
held a NaN or inf, and for the batch inputs which training image it was. Recording costs one small kernel per step
(a step is bound by the host's kernel launches) and never waits for the device; only ``check`` (every
``check_every`` steps, and before a checkpoint is written) looks at the steps recorded since the last one, all at
once, and reads them on the host in one transfer. Its error names the earliest source: a batch input (teacher features, depth) with its step and image,
a loss term, or, when the inputs and losses were finite, the Gaussian parameters that diverged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor


class NonFiniteTrainingError(FloatingPointError):
    """Training met a NaN or inf; the message names its first source."""


_COMPACT_EVERY = 256
"""Records of one kind kept as separate tensors before they are stacked into one (when ``check`` is rarely called)."""


@dataclass
class _Pending:
    """The records of one group and set of names since the last look: device rows, and their steps and images."""

    finite_flags: bool
    """Rows are ``isfinite(t).all()`` per name (batch inputs); otherwise the scalar values themselves (losses)."""
    rows: List[Tensor] = field(default_factory=list)
    chunks: List[Tensor] = field(default_factory=list)
    steps: List[int] = field(default_factory=list)
    images: List[int] = field(default_factory=list)

    def add(self, row: Tensor, step: int, image: int) -> None:
        self.rows.append(row)
        self.steps.append(step)
        self.images.append(image)
        if len(self.rows) >= _COMPACT_EVERY:
            self.chunks.append(torch.stack(self.rows))
            self.rows = []

    def bad(self) -> Tensor:
        """bool [steps, names]: which watched tensor was not finite at each recorded step (on the device)."""
        recorded = torch.cat([*self.chunks, torch.stack(self.rows)]) if self.rows else torch.cat(self.chunks)
        return ~recorded if self.finite_flags else ~torch.isfinite(recorded)


class NonFiniteWatch:
    """First step (and image) at which each watched tensor was not finite; see the module docstring."""

    def __init__(self) -> None:
        self._first: Dict[str, List[int]] = {}  # group:names -> first bad step per name, -1 while finite
        self._image: Dict[str, List[int]] = {}  # group:names -> the training image of that step
        self._names: Dict[str, List[str]] = {}
        self._pending: Dict[str, _Pending] = {}
        self.checked_up_to = -1
        """The last step a ``check`` covered."""

    def record(self, group: str, tensors: Mapping[str, Tensor], step: int, image: int = -1) -> None:
        """Note ``tensors`` at ``step`` (training image ``image``), to be looked at by the next ``problems``. No host
        sync, and for scalars (losses) one kernel: their stacked values, whose finiteness is checked later."""
        if not tensors:
            return
        names, values = list(tensors), list(tensors.values())
        key = (
            f"{group}:{','.join(names)}"  # the set of names can change (a teacher without features this step)
        )
        scalars = all(t.dim() == 0 for t in values)
        with torch.no_grad():  # a record, not part of the graph
            row = torch.stack(values) if scalars else torch.stack([torch.isfinite(t).all() for t in values])
        if key not in self._names:
            self._names[key] = names
            self._first[key] = [-1] * len(names)
            self._image[key] = [-1] * len(names)
        pending = self._pending.get(key)
        # The same names recorded as the other kind (values, then finite flags): settle the old records first.
        if pending is not None and pending.finite_flags == scalars:
            self._settle([key])
            pending = None
        if pending is None:
            pending = self._pending[key] = _Pending(finite_flags=not scalars)
        pending.add(row, step, image)

    def _settle(self, keys: Optional[List[str]] = None, extra: Sequence[Tensor] = ()) -> List[List[bool]]:
        """Fold the pending records of ``keys`` (default: all) into the first bad steps, reading them (and
        ``extra`` bool tensors, returned as lists) on the host in one transfer (a sync)."""
        keys = [k for k in (list(self._pending) if keys is None else keys) if k in self._pending]
        pending = [self._pending.pop(k) for k in keys]
        tensors = [p.bad() for p in pending] + list(extra)
        if not tensors:
            return []
        flat = torch.cat([t.reshape(-1) for t in tensors]).tolist()
        offset = 0
        for key, records in zip(keys, pending, strict=True):
            first, images, count = self._first[key], self._image[key], len(self._names[key])
            for row, (step, image) in enumerate(zip(records.steps, records.images, strict=True)):
                for i in range(count):
                    if first[i] < 0 and flat[offset + row * count + i]:
                        first[i], images[i] = step, image
            offset += len(records.steps) * count
        read = []
        for t in extra:
            read.append(flat[offset : offset + t.numel()])
            offset += t.numel()
        return read

    def problems(self) -> List[Tuple[int, str, str, int]]:
        """``(step, group, name, image)`` of every watched tensor that was not finite, earliest first (syncs)."""
        self._settle()
        return self._found()

    def _found(self) -> List[Tuple[int, str, str, int]]:
        found = []
        for key, first in self._first.items():
            group = key.split(":", 1)[0]
            for name, step, image in zip(self._names[key], first, self._image[key], strict=True):
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
        watched = {name: p.detach() for name, p in parameters.items() if p.numel()}
        with torch.no_grad():
            finite = [torch.isfinite(p).all() for p in watched.values()]
        # The records and the parameters' flags reach the host in one transfer: one sync per check.
        read = self._settle(extra=[torch.stack(finite)] if finite else [])
        found = self._found()
        bad_params = {
            name: int((~torch.isfinite(p)).reshape(p.shape[0], -1).any(dim=1).sum())
            for (name, p), ok in zip(watched.items(), read[0] if read else [], strict=True)
            if not ok
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
