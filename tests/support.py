"""What several tests share: where the real scenes are, and how to run the installed ns-* commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import pytest
import torch

GPU_MARKS = (
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)"),
)
"""What a GPU-only test carries: the ``gpu`` marker (``pytest -m gpu`` runs them all, as benchmarks/chain.sh's
``gputests`` step does) and a skip where there is no CUDA device. ``pytest.param(..., marks=GPU_MARKS)`` for one
parameter, ``gpu_only`` for a whole test."""


def gpu_only(test):
    """Mark a test GPU-only (``GPU_MARKS``)."""
    for mark in GPU_MARKS:
        test = mark(test)
    return test


def command(name: str) -> str:
    """Path of a console script installed next to the running interpreter."""
    return str(Path(sys.executable).with_name(name))


def offline_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    return env


DATA_ROOT = Path(os.environ.get("SPLATSEM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
"""The shared real scenes: ``../shared/data`` beside the repository, or ``$SPLATSEM_DATA``."""
SCANNET = DATA_ROOT / "scannet_scene0000_00"


def train_synthetic(
    root: Path,
    iterations: int = 300,
    teachers: tuple = ("labels", "labels-instance"),
    num_views: int = 16,
    extra: Sequence[str] = (),
) -> Path:
    """Generate the synthetic room under ``root`` and train chorus-splat on it with the real ``ns-train`` on the
    CPU, with ``extra`` ns-train arguments; returns the run folder (holding config.yml and nerfstudio_models/)."""
    import subprocess

    from splatsem_ns.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene

    scene = generate_synthetic_scene(
        root / "scene", SyntheticSceneConfig(num_views=num_views, width=64, height=48)
    )
    train = subprocess.run(
        [
            command("ns-train"), "chorus-splat", "--data", str(scene.parent),
            "--output-dir", str(root / "out"), "--experiment-name", "t", "--timestamp", "run",
            "--max-num-iterations", str(iterations), "--steps-per-save", str(iterations),
            "--vis", "tensorboard", "--machine.device-type", "cpu", "--viewer.quit-on-train-completion", "True",
            "--steps-per-eval-image", "100000", "--steps-per-eval-all-images", "100000",
            "--pipeline.datamanager.teachers", *teachers,
            "--pipeline.datamanager.feature-cache-dir", str(root / "cache"),
            *extra,
        ],
        capture_output=True, text=True, env=offline_env(), timeout=900,
    )  # fmt: skip
    assert train.returncode == 0, f"ns-train failed:\n{train.stdout[-3000:]}\n{train.stderr[-5000:]}"
    return root / "out" / "t" / "chorus-splat" / "run"


def tiny_chorus_model(**config):
    """A chorus-splat model of 50 random Gaussians and two small teacher heads, built on the CPU."""
    import warnings

    import torch
    from nerfstudio.data.scene_box import SceneBox

    from splatsem_ns.models.chorus_splat import ChorusSplatModelConfig
    from splatsem_ns.teachers.base import TEACHER_SPECS_KEY, TeacherSpec
    from splatsem_ns.teachers.registry import make_teacher_config

    torch.manual_seed(0)
    specs = {
        "lang": TeacherSpec("lang", 24, (4, 5), (48, 64), True, make_teacher_config("labels")),
        "sam": TeacherSpec("sam", 16, (8, 8), (48, 64), False, make_teacher_config("labels-instance")),
    }
    with warnings.catch_warnings():  # offline: LPIPS weights are missing, the model still builds
        warnings.simplefilter("ignore")
        return ChorusSplatModelConfig(
            projector_hidden_dim=16, teacher_loss_weights={"sam": 0.5}, **config
        ).setup(
            scene_box=SceneBox(torch.tensor([[-1.0] * 3, [1.0] * 3])),
            num_train_data=2,
            metadata={TEACHER_SPECS_KEY: specs},
            seed_points=(torch.rand(50, 3), torch.zeros(50, 3, dtype=torch.uint8)),
        )


def tiny_camera():
    """64 x 48 pixels, looking down -z at ``tiny_chorus_model``'s seed points in the unit cube from z = 3."""
    import torch
    from nerfstudio.cameras.cameras import Cameras

    camera_to_world = torch.tensor([[[1.0, 0.0, 0.0, 0.5], [0.0, 1.0, 0.0, 0.5], [0.0, 0.0, 1.0, 3.0]]])
    return Cameras(camera_to_worlds=camera_to_world, fx=64.0, fy=64.0, cx=32.0, cy=24.0, width=64, height=48)


def tiny_collection(root: Path, rooms: int, test_room: int, seed_points: int = 200) -> Path:
    """``rooms`` small synthetic rooms (8 views of 64x48) under ``root`` and their collection.json, with room
    ``test_room`` held out (test split) and the others to train on."""
    from splatsem_ns.data.collection_cli import BuildCollection
    from splatsem_ns.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene

    for seed in range(rooms):
        config = SyntheticSceneConfig(
            seed=seed, num_views=8, width=64, height=48, num_seed_points=seed_points
        )
        generate_synthetic_scene(root / f"room_{seed}", config)
    out = root / "collection.json"
    BuildCollection(
        scenes=(root,), out=out, val_fraction=0.0, test_fraction=0.0, test_scenes=(f"room_{test_room}",)
    ).main()
    return out


def ns_train_on_collection(
    method: str, collection: Path, root: Path, steps: int, experiment: str, *extra: str
):
    """The real ``ns-train METHOD`` of a feed-forward model on a ``tiny_collection``, on the CPU: 48x64 views, the
    labels proxy teachers, the test split held out, batches of 2, no loader workers; outputs under ``root/out``
    (``root/out/EXPERIMENT/METHOD/run``). Returns the finished process."""
    import subprocess

    return subprocess.run(
        [
            command("ns-train"), method, "--data", str(collection),
            "--pipeline.datamanager.image-size", "48", "64",
            "--pipeline.datamanager.teachers", "labels", "labels-instance",
            "--pipeline.datamanager.eval-split", "test",
            "--pipeline.datamanager.num-workers", "0",
            "--pipeline.datamanager.batch-size", "2",
            "--pipeline.datamanager.feature-cache-dir", str(root / "cache"),
            "--machine.device-type", "cpu",
            "--output-dir", str(root / "out"), "--experiment-name", experiment, "--timestamp", "run",
            "--max-num-iterations", str(steps), "--steps-per-save", str(steps), "--logging.steps-per-log", "1",
            *extra,
        ],
        capture_output=True, text=True, env=offline_env(), timeout=900,
    )  # fmt: skip


def trained_on_collection(
    method: str, collection: Path, root: Path, steps: int, experiment: str, *extra: str
) -> Path:
    """``ns_train_on_collection`` that must succeed; returns the run folder (``root/out/EXPERIMENT/METHOD/run``)."""
    trained = ns_train_on_collection(method, collection, root, steps, experiment, *extra)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-4000:]
    return root / "out" / experiment / method / "run"


def ns_eval(run_dir: Path, out: Path, timeout: int = 900) -> dict:
    """Run the real ``ns-eval`` on a run folder, offline; it must succeed. Returns the JSON's "results"."""
    import json
    import subprocess

    proc = subprocess.run(
        [command("ns-eval"), "--load-config", str(run_dir / "config.yml"), "--output-path", str(out)],
        capture_output=True, text=True, env=offline_env(), timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, f"ns-eval failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(Path(out).read_text())["results"]


def fit_one_batch(model, batch, loss_name: str, steps: int, lr: float = 3e-3) -> list:
    """``steps`` Adam steps of ``model`` on one batch's ``loss_name`` loss; the loss before each step."""
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        loss = model.get_loss_dict(model(batch), batch)[loss_name]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss))
    return history
