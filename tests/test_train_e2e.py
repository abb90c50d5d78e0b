"""End to end through the real commands: ``ns-train chorus-splat`` on CPU with tiny random teachers of
every family, then ``ns-eval`` on the checkpoint it wrote (which also proves it loads under
``torch.load``'s weights_only default)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
from support import command, ns_eval, offline_env

from splatsem_ns.checkpoints import allow_numpy_scalars_in_checkpoints
from splatsem_ns.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene

pytestmark = pytest.mark.slow

ITERATIONS = 300
TEACHERS = ["tiny-siglip2", "tiny-dinov2", "tiny-sam"]


def _train(scene: Path, out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        command("ns-train"),
        "chorus-splat",
        "--data", str(scene),
        "--output-dir", str(out),
        "--experiment-name", "e2e",
        "--timestamp", "run",
        "--max-num-iterations", str(ITERATIONS),
        "--steps-per-save", str(ITERATIONS),
        "--steps-per-eval-image", "100000",
        "--steps-per-eval-all-images", "100000",
        "--logging.steps-per-log", "10",
        "--vis", "tensorboard",
        "--machine.device-type", "cpu",
        "--viewer.quit-on-train-completion", "True",
        "--pipeline.model.warmup-length", "100",
        "--pipeline.model.refine-every", "50",
        "--pipeline.datamanager.teachers", *TEACHERS,
        "--pipeline.datamanager.feature-cache-dir", str(cache),
        *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=offline_env(), timeout=900)


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    scene = generate_synthetic_scene(root / "scene", SyntheticSceneConfig(num_views=16, width=64, height=48))
    proc = _train(scene, root / "outputs", root / "cache")
    assert proc.returncode == 0, f"ns-train failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return root, root / "outputs" / "e2e" / "chorus-splat" / "run", proc


def test_losses_fall(trained):
    _, run_dir, _ = trained
    scalars = _scalars(run_dir)
    for name in ["main_loss", "distill_siglip2", "distill_dinov2", "distill_sam"]:
        tag = f"Train Loss Dict/{name}"
        assert tag in scalars, f"{tag} not logged; have {sorted(scalars)}"
        values = [v for _, v in scalars[tag]]
        first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
        assert last < 0.8 * first, f"{name} did not fall: first {first:.4f}, last {last:.4f}"


def test_checkpoint_written_and_reloads_with_weights_only(trained):
    _, run_dir, _ = trained
    ckpts = sorted((run_dir / "nerfstudio_models").glob("step-*.ckpt"))
    assert ckpts, "no checkpoint written"
    allow_numpy_scalars_in_checkpoints()  # what importing the method config does in every ns-* command
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    pipeline = state["pipeline"]
    assert any(k.startswith("_model.projector_heads.sam.") for k in pipeline)
    n = pipeline["_model.gauss_params.means"].shape[0]
    assert pipeline["_model.gauss_params.semantic_latent"].shape == (n, 32)


def test_ns_eval_restores_model_without_teachers(trained):
    root, run_dir, _ = trained
    out = root / "eval.json"
    results = ns_eval(run_dir, out, timeout=600)
    assert results["psnr"] > 12.0, results  # a synthetic room after 300 CPU steps; a broken render is ~5-8 dB


def test_second_run_reuses_cached_features(trained, tmp_path):
    root, _, first = trained
    assert "Teacher features: " in first.stdout + first.stderr  # the first run extracted with a progress bar
    scene = root / "scene"
    cache_files = sorted(p.name for p in (root / "cache").rglob("*.npy"))
    proc = _train(scene, tmp_path / "outputs", root / "cache", "--max-num-iterations", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Teacher features: " not in proc.stdout + proc.stderr, "features were extracted again"
    assert sorted(p.name for p in (root / "cache").rglob("*.npy")) == cache_files


def test_depth_loss_trains_on_sensor_depth(trained, tmp_path):
    """With --pipeline.model.depth-loss-weight the datamanager serves the depth images and the rendered depth
    moves towards them."""
    root, _, _ = trained
    proc = _train(
        root / "scene", tmp_path / "outputs", root / "cache",
        "--max-num-iterations", "120", "--pipeline.model.depth-loss-weight", "1.0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert re.search(r"Loaded \d+ depth\s+images", proc.stdout + proc.stderr), proc.stdout[-3000:]
    values = [
        v for _, v in _scalars(tmp_path / "outputs" / "e2e" / "chorus-splat" / "run")["Train Loss Dict/depth"]
    ]
    assert len(values) >= 10 and sum(values[-3:]) < 0.8 * sum(values[:3]), values
