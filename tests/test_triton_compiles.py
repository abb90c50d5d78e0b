"""The Triton kernels compile for the GPU they run on (sm_90), on this CPU-only machine.

Triton's CPU interpreter, which the numeric tests use (``test_triton_rasterizer.py``, ``test_folded_query.py``), runs a
kernel as Python and accepts code that Triton's compiler rejects: a kernel passed them while failing to compile on the
H200, where the caller fell back to a slower path without failing. Triton's front end and ``ptxas`` (shipped in its
wheel) need no GPU, so each kernel is compiled here for an sm_90 target with the arguments the package's own launch
code passes: the launches are recorded instead of run, then compiled from what they were given.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from typing import Any, Dict, List, Tuple

import pytest
import torch

triton = pytest.importorskip("triton")
from splatsem_ns.models import fused_query  # noqa: E402
from splatsem_ns.models.folded_query import FoldedQuery  # noqa: E402
from splatsem_ns.models.heads import ProjectorHead  # noqa: E402
from splatsem_ns.rendering import triton_rasterizer  # noqa: E402
from splatsem_ns.rendering.torch_rasterizer import rasterize_gaussians_torch  # noqa: E402

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type
except ImportError:  # pragma: no cover - depends on the Triton release
    pytest.skip("this Triton release has no GPUTarget/ASTSource/mangle_type", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":  # pragma: no cover - the kernels would be interpreter objects
    pytest.skip("TRITON_INTERPRET is set: the kernels are not compiled", allow_module_level=True)

TARGET = GPUTarget("cuda", 90, 32)
"""The H100/H200's architecture."""
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


class _Recorder:
    """Stands for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the call instead of running it."""

    def __init__(self) -> None:
        self.calls: List[Tuple[tuple, Dict[str, Any]]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def compile_for_gpu(kernel, args: tuple, kwargs: Dict[str, Any]):
    """Compile ``kernel`` (a JITFunction) for ``TARGET`` as a launch with these arguments would."""
    names = list(kernel.arg_names)
    options = {k: kwargs[k] for k in _LAUNCH_OPTIONS if k in kwargs}
    constexprs = {k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS}
    # Each argument typed as Triton's launcher types it ("*fp32", "i32", ...); the rest of the names are constexprs.
    signature = {name: mangle_type(value) for name, value in zip(names, args, strict=False)}
    missing = [n for n in names[len(args) :] if n not in constexprs]
    assert not missing, f"launch leaves {missing} unset"
    for name in names[len(args) :]:
        signature[name] = "constexpr"
    try:
        source = ASTSource(
            fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()}
        )
    except TypeError as err:  # pragma: no cover - another Triton release's ASTSource
        pytest.skip(f"this Triton release builds kernel sources differently ({err})")
    return triton.compile(source, target=TARGET, options=options)


def resource_usage(compiled) -> str:
    """cuobjdump's register and local-memory (spill) line of a compiled kernel, or "" without the tool."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.isfile(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        out = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True).stdout
    return next((line.strip() for line in out.splitlines() if "REG:" in line), "")


@pytest.fixture
def recorded(monkeypatch):
    """The package's three Triton kernels replaced by recorders; yields {name: (kernel, recorder)}."""
    kernels = {}
    for module, name in (
        (fused_query, "_relevancy_kernel"),
        (triton_rasterizer, "_render_kernel"),
        (triton_rasterizer, "_relevancy_raster_kernel"),
    ):
        kernel = getattr(module, name)
        if not isinstance(kernel, triton.runtime.jit.JITFunction):  # e.g. defined under Triton's interpreter
            pytest.skip(f"{name} is a {type(kernel).__name__}, not a compiled Triton kernel")
        recorder = _Recorder()
        kernels[name] = (kernel, recorder)
        monkeypatch.setattr(module, name, recorder)
    return kernels


def _folded(
    hidden: int = 256, positives: int = 1, negatives: int = 4, dtype=None, out: int = 768, latent: int = 32
):
    torch.manual_seed(0)
    head = ProjectorHead(latent, out, hidden_dim=hidden, num_layers=2)
    return FoldedQuery(head, torch.randn(positives, out), torch.randn(negatives, out), compute_dtype=dtype)


def _compile_all(kernel, recorder: _Recorder) -> List[str]:
    assert recorder.calls, "the launch code made no launch"
    usage = []
    for args, kwargs in recorder.calls:
        flags = {k: v for k, v in kwargs.items() if k in ("FACTORED", "NORMALIZE", "DOT_FP16", "HIDDEN")}
        usage.append(f"{kernel.__name__} {flags}: {resource_usage(compile_for_gpu(kernel, args, kwargs))}")
    return usage


def test_the_fused_fold_compiles_in_both_norm_forms(recorded):
    kernel, recorder = recorded["_relevancy_kernel"]
    latent = torch.randn(100, 32)
    for dtype in (torch.bfloat16, None):
        for factored in (False, True):
            for positives, negatives, hidden in ((1, 4, 256), (3, 0, 128)):
                folded = _folded(hidden, positives, negatives, dtype)
                fused_query.fused_relevancy(latent, folded.operands(factored=factored))
    print("\n".join(_compile_all(kernel, recorder)))


def _projected_scene(n: int = 300, width: int = 64, height: int = 48, channels: int = 32):
    g = torch.Generator().manual_seed(0)
    means = (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([3.0, 2.0, 1.0])
    means[:, 2] += 4.0
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.2 + 0.02
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    f = 0.9 * width
    Ks = torch.tensor([[[f, 0, width / 2], [0, f, height / 2], [0, 0, 1.0]]])
    features = torch.randn(n, channels, generator=g)
    _, _, info = rasterize_gaussians_torch(
        means, quats, scales, opacities, features, torch.eye(4)[None], Ks, width, height, tile_size=16
    )
    geometry = (
        info["means2d"],
        info["conics"],
        info["opacities"],
        features,
        info["isect_offsets"],
        info["flatten_ids"],
    )
    return geometry, width, height


def test_the_tile_rasterizer_and_its_relevancy_epilogue_compile(recorded):
    geometry, width, height = _projected_scene()
    for precision in ("fp16", "tf32", "ieee"):
        triton_rasterizer.rasterize_features_triton(*geometry, width, height, precision=precision)
    triton_rasterizer.rasterize_features_triton(*geometry, width, height, normalize_min_alpha=0.05)
    folded = _folded(positives=2, negatives=4)
    for factored in (False, True):
        for normalize in (None, 0.05):
            triton_rasterizer.rasterize_relevancy_triton(
                *geometry, width, height, triton_rasterizer.fold_operands_for(folded, 32, factored),
                normalize_min_alpha=normalize,
            )  # fmt: skip
    usage = [*_compile_all(*recorded["_render_kernel"]), *_compile_all(*recorded["_relevancy_raster_kernel"])]
    print("\n".join(usage))
