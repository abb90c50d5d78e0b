"""benchmarks/prebuilt_gsplat: a saved gsplat build is offered for ``gsplat.csrc`` only when GSPLAT_PREBUILT names
a file, and a gzipped one is unpacked once, per file. Run in subprocesses: the finder would otherwise stay in this
process's import system."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

HELPER = Path(__file__).resolve().parents[1] / "benchmarks" / "prebuilt_gsplat"

PROBE = """
import sys
sys.path.insert(0, {helper!r})
import sitecustomize as helper
finder = sys.meta_path[0]
print(finder.find_spec("gsplat.csrc") is not None, finder.find_spec("gsplat") is None)
if len(sys.argv) > 1:
    print(helper.unpacked_path(sys.argv[1]))
"""


def _probe(env: dict, *args: str) -> list:
    code = PROBE.format(helper=str(HELPER))
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.split()


def test_the_saved_build_is_offered_only_when_named(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GSPLAT_PREBUILT"}
    assert _probe(env) == ["False", "True"]
    assert _probe({**env, "GSPLAT_PREBUILT": str(tmp_path / "missing.so.gz")}) == ["False", "True"]
    packed = tmp_path / "gsplat_cuda.so.gz"
    packed.write_bytes(gzip.compress(b"not really a library"))
    env = {**env, "GSPLAT_PREBUILT": str(packed), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    offered, others, unpacked = _probe(env, str(packed))
    assert (offered, others) == ("True", "True")
    assert Path(unpacked).read_bytes() == b"not really a library"
    assert Path(unpacked).parent.parent == tmp_path / "tmp"
    # A newer build gets its own folder instead of the older one's copy.
    packed.write_bytes(gzip.compress(b"a newer build, longer"))
    newer = _probe(env, str(packed))[2]
    assert newer != unpacked and Path(newer).read_bytes() == b"a newer build, longer"
