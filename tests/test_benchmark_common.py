"""The benchmark scripts' run specs: ``LABEL=METHOD:field=value`` overrides reach the right configs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import parse_method, trainer_config  # noqa: E402


def test_run_spec_overrides_reach_model_dataparser_and_pipeline(tmp_path: Path) -> None:
    label, method, overrides = parse_method(
        "aa=chorus-splat:depth_loss_weight=0.1,semantic_rasterize_mode=antialiased,"
        "dataparser.load_3D_points=false,pipeline.semantic_eval.render_scale=0.5,semantic_source.latent_dim=16"
    )
    assert (label, method) == ("aa", "chorus-splat")
    cfg = trainer_config(method, tmp_path, tmp_path / "out", 10, ["labels"], overrides=overrides)
    model = cfg.pipeline.model
    assert model.depth_loss_weight == 0.1 and model.semantic_rasterize_mode == "antialiased"
    assert model.semantic_source.latent_dim == 16
    assert cfg.pipeline.datamanager.dataparser.load_3D_points is False
    assert cfg.pipeline.semantic_eval.render_scale == 0.5
    assert cfg.pipeline.datamanager.teachers == ("labels",)
    assert parse_method("splatfacto") == ("splatfacto", "splatfacto", {})
    with pytest.raises(ValueError, match="true or false"):
        trainer_config(
            method, tmp_path, tmp_path / "out", 10, overrides={"dataparser.load_3D_points": "maybe"}
        )
