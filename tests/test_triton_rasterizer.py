"""The Triton rasterizer (``rendering/triton_rasterizer.py``) against the PyTorch rasterizer, under Triton's CPU
interpreter (``triton_raster_checks.py`` holds the checks; each runs in its own process)."""

import subprocess
import sys
from pathlib import Path

import pytest

CHECKS = Path(__file__).with_name("triton_raster_checks.py")
ROOT = Path(__file__).resolve().parents[1]


def _run(*names: str) -> None:
    pytest.importorskip("triton")
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(CHECKS), *names], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def test_random_scenes_match_the_torch_rasterizer():
    _run("random_scenes")


def test_empty_tiles_and_empty_scenes():
    _run("empty_tiles")


def test_early_termination_within_and_across_blocks():
    _run("early_termination")


def test_faint_gaussians_are_skipped_as_gsplat_does():
    _run("faint_gaussians")


def test_block_and_tile_sizes():
    _run("blocks_and_tiles")


def test_half_and_tf32_products_stay_within_their_rounding_bound():
    _run("half_precision")


def test_fused_relevancy_matches_render_normalise_fold():
    _run("fused_relevancy")


def test_relevancy_from_gaussians_matches_the_unfused_path():
    _run("render_relevancy")


def test_the_viewers_routed_relevancy_matches_the_unfused_path():
    _run("viewer_route")


def test_the_viewers_latent_through_the_triton_rasterizer_matches_the_render_path():
    _run("viewer_latent")


def test_the_query_benchmarks_triton_rows_answer_at_full_resolution():
    _run("benchmark_rows")
