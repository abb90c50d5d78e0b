"""The installable package: every subpackage is listed, and nerfstudio's entry points resolve."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_packaged():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "splatsem_ns").rglob("__init__.py")
    } | {"splatsem_ns.method_configs"}
    assert on_disk <= listed, f"add to pyproject [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert config["package-dir"]["splatsem_ns.method_configs"] == "method_configs"


def test_entry_points_resolve():
    methods = {e.name: e for e in entry_points(group="nerfstudio.method_configs")}
    parsers = {e.name: e for e in entry_points(group="nerfstudio.dataparser_configs")}
    spec = methods["chorus-splat"].load()
    assert spec.config.method_name == "chorus-splat"
    assert parsers["splatsem-data"].load().config is not None
    assert importlib.import_module("splatsem_ns.method_configs.chorus_splat").chorus_splat is spec
