"""splatsem-fit-collection: short fits of a collection's scenes, written as each scene's Gaussians in its own frame."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from support import tiny_collection

from splatsem_ns.data.fit_collection import FitCollection
from splatsem_ns.data.frames import to_dataparser_frame, to_scene_frame
from splatsem_ns.data.scene_gaussians import load_scene_gaussians


def test_the_scene_frame_inverts_the_dataparser_frame():
    generator = torch.Generator().manual_seed(0)
    angle = 0.7
    rotation = torch.tensor(
        [[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0], [0.0, 0.0, 1.0]]
    )
    transform = torch.cat([rotation, torch.tensor([[0.3], [-1.0], [2.0]])], dim=1)
    means = torch.randn(20, 3, generator=generator)
    scales = torch.rand(20, 3, generator=generator) + 0.1
    quats = torch.nn.functional.normalize(torch.randn(20, 4, generator=generator), dim=-1)
    moved, scaled, turned = to_dataparser_frame(means, scales, quats, transform, 0.25)
    back, log_scales, quats_back = to_scene_frame(moved, torch.log(scaled), turned, transform, 0.25)
    torch.testing.assert_close(back, means, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_scales.exp(), scales, atol=1e-5, rtol=1e-5)
    same = (quats_back * quats).sum(-1).abs()  # q and -q are the same rotation
    torch.testing.assert_close(same, torch.ones(20), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_fitting_a_collection_writes_each_scene_and_resumes(tmp_path, capsys):
    collection = tiny_collection(tmp_path, rooms=2, test_room=1)
    fit = FitCollection(collection=collection, method="chorus-splat", steps=3)
    summary = fit.main()
    assert set(summary) == {"room_0", "room_1"} and not any(r.get("error") for r in summary.values())
    for room in ("room_0", "room_1"):
        served = load_scene_gaussians(tmp_path / room, "ply", "gaussians.ply")
        assert len(served["means"]) == summary[room]["gaussians"] > 0
        # In the scene's own frame: where its seed points are (the room's metres), not nerfstudio's unit cube.
        points = load_scene_gaussians(tmp_path / room, "points", "gaussians.ply")["means"]
        low, high = points.min(0).values, points.max(0).values
        inside = ((served["means"] > low - 0.5) & (served["means"] < high + 0.5)).all(dim=1)
        assert inside.float().mean() > 0.9
        assert float(np.ptp(served["means"].numpy(), axis=0).max()) > 1.5  # a room spans metres
    # chorus-splat fits keep their latents and heads, decodable like any export.
    from splatsem_ns.export.loader import load_semantic_scene

    scene = load_semantic_scene(tmp_path / "room_0" / "gaussians.ply")
    assert scene.latent is not None and len(scene.latent) == summary["room_0"]["gaussians"]
    assert set(scene.heads) == {"labels"}
    assert scene.decode("labels").shape == (len(scene.latent), scene.heads["labels"].feature_dim)
    # The linear probe reads them as its per-scene chorus-splat row (no encoder: that row is left out).
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "linear_probe.py"
    probe = subprocess.run(
        [sys.executable, str(script), "--collection", str(collection), "--out", str(tmp_path / "probe"),
         "--max-points", "300", "--max-distance", "10", "--device", "cpu"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-3000:]
    report = json.loads((tmp_path / "probe" / "linear_probe.json").read_text())
    assert set(report["results"]) == {"chorus-splat", "raw"} and report["test_points"] > 0
    recorded = json.loads((tmp_path / "fit_collection.json").read_text())
    assert recorded.keys() == summary.keys()
    before = (tmp_path / "room_0" / "gaussians.ply").stat().st_mtime_ns
    again = FitCollection(collection=collection, method="chorus-splat", steps=3).main()  # nothing left to fit
    assert (tmp_path / "room_0" / "gaussians.ply").stat().st_mtime_ns == before
    assert again == summary
    assert "0 to fit" in capsys.readouterr().out


def test_splatfacto_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "collection.json").write_text(
        json.dumps({"format": "splatsem_ns.scene_collection", "format_version": 1, "scenes": []})
    )
    with pytest.raises(SystemExit, match="CUDA only"):
        FitCollection(collection=tmp_path / "collection.json").main()
