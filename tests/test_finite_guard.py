"""NaN and inf in training are caught on every device and named by their source, without a sync per step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from support import tiny_camera, tiny_chorus_model

from splatsem_ns.models.finite_guard import NonFiniteTrainingError, NonFiniteWatch

ATTRIBUTES = SimpleNamespace(optimizers=None)
"""What splatfacto's callbacks read of nerfstudio's TrainingCallbackAttributes."""


def _training_step(model, batch_features: dict, step: int, image_idx: int = 1):
    """One training forward and loss of ``tiny_chorus_model`` at ``step`` with these teacher features."""
    model.train()
    model.optimizers = {}  # set by the trainer; the densification strategy only passes them on here
    model.step = step
    outputs = model.get_outputs(tiny_camera())
    batch = {"image": torch.rand(48, 64, 3), "image_idx": image_idx, "teacher_features": batch_features}
    return model.get_loss_dict(outputs, batch)


def _features(nan: bool = False) -> dict:
    lang, sam = torch.rand(4, 5, 24), torch.rand(8, 8, 16)
    if nan:
        sam[3, 3, 0] = float("nan")
    return {"lang": lang, "sam": sam}


def test_a_nan_in_teacher_features_is_named_with_its_step_and_image():
    model = tiny_chorus_model(num_downscales=0)
    model.training_image_names = ["images/a.png", "images/b.png", "images/c.png"]
    _training_step(model, _features(), step=0)
    model.check_finite()  # all finite: nothing to say
    _training_step(model, _features(nan=True), step=1, image_idx=2)
    _training_step(model, _features(), step=2)
    with pytest.raises(NonFiniteTrainingError) as error:
        model.check_finite()
    message = str(error.value)
    assert "batch input 'teacher features sam' of training image images/c.png at step 1" in message
    assert "came from the data" in message
    assert "loss 'distill_sam' at step 1" in message  # what it caused, after the source


def test_diverged_parameters_are_reported_when_the_inputs_were_finite():
    model = tiny_chorus_model(num_downscales=0)
    _training_step(model, _features(), step=0)
    with torch.no_grad():
        model.gauss_params["features_dc"][[3, 7]] = float("inf")
    model.step = 5
    with pytest.raises(
        NonFiniteTrainingError, match=r"'features_dc' \(2 Gaussians\).*diverged between steps 0 and 5"
    ):
        model.check_finite()


def test_the_check_runs_as_a_training_callback_every_few_steps():
    model = tiny_chorus_model(num_downscales=0, finite_check_every=7)
    callbacks = [c for c in model.get_training_callbacks(ATTRIBUTES) if c.update_every_num_iters == 7]
    assert len(callbacks) == 1
    assert tiny_chorus_model(num_downscales=0).config.finite_check_every > 0, "on by default"
    assert not [
        c
        for c in tiny_chorus_model(finite_check_every=0).get_training_callbacks(ATTRIBUTES)
        if c.update_every_num_iters
    ]


def test_recording_never_reads_the_device():
    """Recording only queues device work: nothing in it converts a device value to a Python one."""
    watch = NonFiniteWatch()
    calls = []
    original = torch.Tensor.item
    torch.Tensor.item = lambda self: calls.append(1) or original(self)  # type: ignore[method-assign]
    try:
        for step in range(5):
            watch.record("batch input", {"x": torch.rand(3, 3)}, step, image=step)
            watch.record(
                "loss", {"a": torch.tensor(1.0), "b": torch.tensor(float("nan") if step == 3 else 2.0)}, step
            )
    finally:
        torch.Tensor.item = original  # type: ignore[method-assign]
    assert calls == []
    assert watch.problems() == [(3, "loss", "b", -1)]


def test_each_images_inputs_are_watched_once():
    model = tiny_chorus_model(num_downscales=0)
    recorded = []
    original = model.finite_watch.record
    model.finite_watch.record = lambda group, tensors, step, image=-1: (
        recorded.append((group, step)),
        original(group, tensors, step, image),
    )
    for step, image in enumerate([0, 1, 0, 1, 2]):
        _training_step(model, _features(), step=step, image_idx=image)
    assert [s for g, s in recorded if g == "batch input"] == [0, 1, 4]  # images 0, 1, 2 the first time
    assert [s for g, s in recorded if g == "loss"] == [0, 1, 2, 3, 4]  # losses every step
