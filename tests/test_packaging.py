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


def _package_methods() -> dict:
    """The MethodSpecifications this package registers with nerfstudio."""
    return {
        e.name: e.load()
        for e in entry_points(group="nerfstudio.method_configs")
        if e.value.startswith("splatsem_ns.")
    }


def test_every_method_of_the_package_serves_the_viewer_on_loopback_only():
    from splatsem_ns.viewer.address import LOOPBACK

    methods = _package_methods()
    assert "chorus-splat" in methods
    for name, spec in methods.items():
        assert spec.config.viewer.websocket_host == LOOPBACK == "127.0.0.1", name


def test_splatsem_viewer_defaults_to_loopback_and_ns_viewer_is_warned_about():
    import tyro

    from splatsem_ns.viewer.address import exposure_notice
    from splatsem_ns.viewer.run_viewer import LoopbackRunViewer

    parsed = tyro.cli(tyro.conf.FlagConversionOff[LoopbackRunViewer], args=["--load-config", "c.yml"])
    assert parsed.viewer.websocket_host == "127.0.0.1"
    shared = ["--load-config", "c.yml", "--viewer.websocket-host", "0.0.0.0"]
    assert (
        tyro.cli(tyro.conf.FlagConversionOff[LoopbackRunViewer], args=shared).viewer.websocket_host
        == "0.0.0.0"
    )
    # ns-viewer takes its address from its own command line (0.0.0.0 unless given), never from the saved config.
    notice = exposure_notice(["/venv/bin/ns-viewer", "--load-config", "c.yml"])
    assert notice is not None and "splatsem-viewer" in notice and "ssh -L 7007:localhost:7007" in notice
    assert (
        exposure_notice(
            ["/venv/bin/ns-viewer", "--load-config", "c.yml", "--viewer.websocket-host=127.0.0.1"]
        )
        is None
    )
    assert exposure_notice(["/venv/bin/ns-viewer", *shared]) is None
    assert exposure_notice(["/venv/bin/ns-eval", "--load-config", "c.yml"]) is None


def test_readme_decode_examples_name_a_teacher():
    """``SemanticScene.decode`` takes a teacher's name (its head's key), not a text: the examples of the README and
    of docs/ must show that."""
    import re

    from splatsem_ns.teachers.registry import available_teachers, make_teacher_config

    names = {make_teacher_config(preset).name for preset in available_teachers()}
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    calls = re.findall(r"\.decode\(\"([^\"]+)\"\)", "\n".join(page.read_text() for page in pages))
    assert calls, "the README shows decode"
    assert set(calls) <= names, (
        f"decode takes a teacher name ({sorted(names)}), not {sorted(set(calls) - names)}"
    )
