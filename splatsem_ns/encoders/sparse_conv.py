"""Sparse 3D convolution in pure PyTorch, with spconv as an optional accelerator on CUDA.

Three convolutions cover a sparse U-Net and PTv3's positional encoding:

- ``SubmanifoldConv3d``: outputs exactly at the input's active sites (odd kernel, stride 1), so sparsity does
  not dilate layer after layer;
- ``StridedConv3d``: outputs on the coarser grid (site ``q`` receives the inputs ``s * q + d``, ``d`` in
  ``[0, k)^3``, as dense ``conv3d`` with padding 0), creating the coarse sites that have any input;
- ``InverseConv3d``: the transposed convolution of a ``StridedConv3d``, from the coarse sites back onto the
  fine sites that made them (as dense ``conv_transpose3d`` read at those sites).

Each is a *kernel map* (for each kernel offset, the pairs (input row, output row)) followed by gather ->
matmul -> ``index_add_`` per offset. Kernel maps come from binary search in sorted coordinate keys (see
``sparse_tensor``), depend on coordinates only, and are cached in the sparse tensor's shared cache, so every
block of a U-Net level reuses one map. A custom autograd function saves only the input features (not one
gathered copy per offset) and computes both gradients with the same maps; all of it is deterministic on CPU.

Weights are stored in spconv 2.x's layout, ``[C_out, k, k, k, C_in]`` with the kernel axes in the order of
the coordinate axes (x, y, z), so weights move between the two backends (and Pointcept checkpoints' conv
weights load) unchanged. ``backend="auto"`` runs spconv when it is importable and the tensors are on CUDA
(its CPU build computes wrong results with more than one thread and has no backward), else PyTorch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Literal, Optional, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from splatsem_ns.encoders.sparse_tensor import (
    CoordinateHash,
    SparseGridCache,
    SparseTensor,
    coordinate_keys,
    keys_to_coordinates,
)

ConvBackend = Literal["auto", "torch", "spconv"]

QUERY_BUDGET = 1 << 21
"""Neighbour queries per batch while a kernel map is built: bounds its memory (about 100 MB) at any scene size."""


def kernel_offsets(kernel_size: int, device: torch.device | str = "cpu") -> Int[Tensor, "K 3"]:
    """Every kernel position ``(i, j, l)`` in ``[0, k)^3``, x slowest: the order of a ``[k, k, k]`` weight
    flattened."""
    r = torch.arange(kernel_size, device=device)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)


@dataclass(eq=False)
class KernelMap:
    """For each kernel offset, the (input row, output row) pairs it connects.

    Pairs are grouped by offset: those of offset ``k`` are ``in_rows[bounds[k]:bounds[k+1]]``. An
    ``identity_offset`` connects every row to itself without listed pairs (the centre of a submanifold
    kernel): it is computed as one dense matmul.
    """

    in_rows: Int[Tensor, " P"]
    out_rows: Int[Tensor, " P"]
    bounds: Tuple[int, ...]
    """``kernel_volume + 1`` increasing pair positions (host ints, so slicing needs no device sync)."""
    num_inputs: int
    num_outputs: int
    identity_offset: Optional[int] = None

    @property
    def kernel_volume(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_pairs(self) -> int:
        return self.bounds[-1] + (self.num_outputs if self.identity_offset is not None else 0)

    def pairs(self, offset: int) -> Tuple[Int[Tensor, " p"], Int[Tensor, " p"]]:
        lo, hi = self.bounds[offset], self.bounds[offset + 1]
        return self.in_rows[lo:hi], self.out_rows[lo:hi]

    def transposed(self) -> "KernelMap":
        """The same connections read backwards (outputs become inputs): the map of the transposed conv."""
        return KernelMap(
            self.out_rows, self.in_rows, self.bounds, self.num_outputs, self.num_inputs, self.identity_offset
        )


def _bounds(counts_per_offset: List[int]) -> Tuple[int, ...]:
    bounds = [0]
    for count in counts_per_offset:
        bounds.append(bounds[-1] + count)
    return tuple(bounds)


def submanifold_kernel_map(x: SparseTensor, kernel_size: int) -> KernelMap:
    """Kernel map of a submanifold conv on ``x``'s sites (cached in ``x.cache``).

    Output site ``p`` reads input site ``p + d - k // 2`` through weight position ``d``, as dense ``conv3d``
    with padding ``k // 2``.
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"A submanifold conv needs an odd kernel size, got {kernel_size}.")
    key = ("submanifold", kernel_size)
    cached = x.cache.entries.get(key)
    if cached is not None:
        return cached
    num_sites = x.num_sites
    volume = kernel_size**3
    centre = volume // 2
    rows = torch.arange(num_sites, device=x.coords.device)
    if kernel_size == 1:  # the identity offset alone
        kernel_map = KernelMap(rows[:0], rows[:0], (0, 0), num_sites, num_sites, identity_offset=0)
        x.cache.entries[key] = kernel_map
        return kernel_map
    device = x.coords.device
    table = x.coordinate_hash()
    coords = x.coords.long()
    offsets = kernel_offsets(kernel_size, device) - kernel_size // 2
    # Offsets d and -d (positions i and volume-1-i) connect the same pairs in opposite directions, so only
    # the first half is searched; the second half is its mirror.
    half_in: List[Tensor] = []
    half_out: List[Tensor] = []
    half_counts: List[int] = []
    step = max(1, QUERY_BUDGET // max(num_sites, 1))
    for start in range(0, centre, step):
        chunk = offsets[start : min(start + step, centre)]
        query = coords[None].repeat(chunk.shape[0], 1, 1)
        query[..., 1:] += chunk[:, None, :]
        found = table.lookup(query.view(-1, 4)).view(chunk.shape[0], num_sites)
        hit = found >= 0
        half_in.append(found[hit])
        half_out.append(rows.expand(chunk.shape[0], -1)[hit])
        half_counts.extend(hit.sum(dim=1).tolist())
    half_in_rows = torch.cat(half_in) if half_in else rows[:0]
    half_out_rows = torch.cat(half_out) if half_out else rows[:0]
    half_bounds = _bounds(half_counts)
    in_parts, out_parts = [half_in_rows], [half_out_rows]
    for i in reversed(range(centre)):  # offset volume-1-i mirrors offset i
        lo, hi = half_bounds[i], half_bounds[i + 1]
        in_parts.append(half_out_rows[lo:hi])
        out_parts.append(half_in_rows[lo:hi])
    counts = half_counts + [0] + half_counts[::-1]
    kernel_map = KernelMap(
        torch.cat(in_parts),
        torch.cat(out_parts),
        _bounds(counts),
        num_sites,
        num_sites,
        identity_offset=centre,
    )
    x.cache.entries[key] = kernel_map
    return kernel_map


def _strided_candidates(
    x: SparseTensor, kernel_size: int, stride: int
) -> Tuple[List[Tensor], List[Tensor], List[int]]:
    """For each kernel position d: the fine rows p with a coarse site q = (p - d) / s on the integer grid,
    and q's coordinate keys."""
    device = x.coords.device
    coords = x.coords.long()
    rows = torch.arange(x.num_sites, device=device)
    offsets = kernel_offsets(kernel_size, device)
    fine_rows: List[Tensor] = []
    coarse_keys: List[Tensor] = []
    counts: List[int] = []
    step = max(1, QUERY_BUDGET // max(x.num_sites, 1))
    for start in range(0, offsets.shape[0], step):
        chunk = offsets[start : start + step]
        shifted = coords[None, :, 1:] - chunk[:, None, :]
        valid = ((shifted >= 0) & (shifted % stride == 0)).all(dim=-1)
        coarse = torch.cat([coords[None, :, :1].expand(chunk.shape[0], -1, -1), shifted // stride], dim=-1)
        fine_rows.append(rows.expand(chunk.shape[0], -1)[valid])
        coarse_keys.append(coordinate_keys(coarse[valid]))
        counts.extend(valid.sum(dim=1).tolist())
    return fine_rows, coarse_keys, counts


def downsample_kernel_map(
    x: SparseTensor, kernel_size: int = 2, stride: int = 2
) -> Tuple[Int[Tensor, "m 4"], SparseGridCache, KernelMap]:
    """The coarse sites of a strided conv on ``x`` and its kernel map (fine -> coarse), cached in ``x.cache``.

    The coarse sites are every ``q`` with an active input ``s * q + d`` (``d`` in ``[0, k)^3``), sorted by
    coordinate key; the returned cache (with their hash) is shared by every tensor on those sites, so the
    coarse level's convs reuse their maps too.
    """
    if stride < 1 or kernel_size < 1:
        raise ValueError(f"kernel_size and stride must be positive, got {kernel_size}, {stride}")
    key = ("downsample", kernel_size, stride)
    cached = x.cache.entries.get(key)
    if cached is not None:
        return cached
    fine_rows, keys, counts = _strided_candidates(x, kernel_size, stride)
    all_keys = torch.cat(keys)
    coarse_keys, out_rows = torch.unique(all_keys, sorted=True, return_inverse=True)
    coarse_cache = SparseGridCache(
        coordinate_hash=CoordinateHash(
            sorted_keys=coarse_keys, order=torch.arange(coarse_keys.shape[0], device=coarse_keys.device)
        )
    )
    kernel_map = KernelMap(torch.cat(fine_rows), out_rows, _bounds(counts), x.num_sites, coarse_keys.shape[0])
    result = (keys_to_coordinates(coarse_keys), coarse_cache, kernel_map)
    x.cache.entries[key] = result
    return result


def strided_kernel_map_onto(
    fine: SparseTensor, coarse: SparseTensor, kernel_size: int = 2, stride: int = 2
) -> KernelMap:
    """Kernel map (fine -> coarse) of a strided conv between two given grids; pairs whose coarse site is not in
    ``coarse`` are dropped. For coarse grids not made from ``fine`` by ``downsample_kernel_map`` (cached in
    ``fine.cache`` for the last coarse grid asked for)."""
    key = ("strided_onto", kernel_size, stride)
    cached = fine.cache.entries.get(key)
    if cached is not None and cached[0] is coarse.cache:
        return cached[1]
    table = coarse.coordinate_hash()
    coords = fine.coords.long()
    rows = torch.arange(fine.num_sites, device=coords.device)
    in_parts, out_parts = [], []
    for d in kernel_offsets(kernel_size, coords.device):
        shifted = coords[:, 1:] - d
        valid = ((shifted >= 0) & (shifted % stride == 0)).all(dim=-1)
        found = table.lookup(torch.cat([coords[:, :1], shifted.div(stride, rounding_mode="floor")], dim=1))
        hit = valid & (found >= 0)
        in_parts.append(rows[hit])
        out_parts.append(found[hit])
    counts = [p.numel() for p in in_parts]
    kernel_map = KernelMap(
        torch.cat(in_parts), torch.cat(out_parts), _bounds(counts), fine.num_sites, coarse.num_sites
    )
    fine.cache.entries[key] = (coarse.cache, kernel_map)
    return kernel_map


class _GatherMatmulScatter(torch.autograd.Function):
    """``out[o] = sum over pairs (i, o) of offset k: features[i] @ weight[k]``, with a hand-written backward
    that saves only ``features`` and ``weight`` (autograd through the gathers would keep one gathered copy per
    offset)."""

    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, kernel_map: KernelMap) -> Tensor:
        out = features.new_zeros(kernel_map.num_outputs, weight.shape[2])
        if kernel_map.identity_offset is not None:
            out += (features @ weight[kernel_map.identity_offset]).to(out.dtype)
        for k in range(kernel_map.kernel_volume):
            in_rows, out_rows = kernel_map.pairs(k)
            if in_rows.numel():
                out.index_add_(0, out_rows, (features.index_select(0, in_rows) @ weight[k]).to(out.dtype))
        ctx.save_for_backward(features, weight)
        ctx.kernel_map = kernel_map
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        features, weight = ctx.saved_tensors
        kernel_map: KernelMap = ctx.kernel_map
        need_features, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_features = torch.zeros_like(features) if need_features else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        centre = kernel_map.identity_offset
        if centre is not None:
            if need_features:
                grad_features += (grad_out @ weight[centre].T).to(features.dtype)
            if need_weight:
                grad_weight[centre] = (features.T @ grad_out).to(weight.dtype)
        for k in range(kernel_map.kernel_volume):
            in_rows, out_rows = kernel_map.pairs(k)
            if not in_rows.numel():
                continue
            grad_rows = grad_out.index_select(0, out_rows)
            if need_features:
                grad_features.index_add_(0, in_rows, (grad_rows @ weight[k].T).to(features.dtype))
            if need_weight:
                grad_weight[k] = (features.index_select(0, in_rows).T @ grad_rows).to(weight.dtype)
        return grad_features, grad_weight, None


def apply_kernel_map(
    features: Float[Tensor, "N Cin"], weight: Float[Tensor, "K Cin Cout"], kernel_map: KernelMap
) -> Float[Tensor, "M Cout"]:
    """Run a sparse convolution given its kernel map (differentiable in ``features`` and ``weight``)."""
    if weight.shape[0] != kernel_map.kernel_volume:
        raise ValueError(f"weight has {weight.shape[0]} kernel positions, the map {kernel_map.kernel_volume}")
    return _GatherMatmulScatter.apply(features, weight, kernel_map)


def matmul_weight(weight: Float[Tensor, "Cout k k k Cin"]) -> Float[Tensor, "K Cin Cout"]:
    """spconv-layout weight as one ``[C_in, C_out]`` matrix per kernel position (a view, no copy)."""
    out_channels, in_channels = weight.shape[0], weight.shape[-1]
    return weight.reshape(out_channels, -1, in_channels).permute(1, 2, 0)


def _with_bias(features: Tensor, bias: Optional[Tensor]) -> Tensor:
    return features if bias is None else features + bias


def submanifold_conv3d(
    x: SparseTensor, weight: Float[Tensor, "Cout k k k Cin"], bias: Optional[Float[Tensor, " Cout"]] = None
) -> SparseTensor:
    """Submanifold conv (PyTorch path): dense ``conv3d(padding=k // 2)`` read at ``x``'s sites, with inactive
    voxels read as zero."""
    kernel_map = submanifold_kernel_map(x, weight.shape[1])
    return x.replace_features(
        _with_bias(apply_kernel_map(x.features, matmul_weight(weight), kernel_map), bias)
    )


def strided_conv3d(
    x: SparseTensor,
    weight: Float[Tensor, "Cout k k k Cin"],
    bias: Optional[Float[Tensor, " Cout"]] = None,
    stride: int = 2,
) -> SparseTensor:
    """Strided conv (PyTorch path): dense ``conv3d(stride=s, padding=0)`` at the coarse sites that receive any
    active input."""
    coarse_coords, coarse_cache, kernel_map = downsample_kernel_map(x, weight.shape[1], stride)
    features = _with_bias(apply_kernel_map(x.features, matmul_weight(weight), kernel_map), bias)
    return SparseTensor(coarse_coords, features, x.batch_size, coarse_cache)


def inverse_conv3d(
    x: SparseTensor,
    target: SparseTensor,
    weight: Float[Tensor, "Cout k k k Cin"],
    bias: Optional[Float[Tensor, " Cout"]] = None,
    stride: int = 2,
) -> SparseTensor:
    """Transposed conv (PyTorch path) from ``x``'s coarse sites onto ``target``'s fine sites: dense
    ``conv_transpose3d(stride=s)`` read at the fine sites, with weight position ``d`` taking coarse ``q`` to
    fine ``s * q + d``."""
    kernel_size = weight.shape[1]
    made = target.cache.entries.get(("downsample", kernel_size, stride))
    if made is not None and made[1] is x.cache:
        forward_map = made[2]
    else:
        forward_map = strided_kernel_map_onto(target, x, kernel_size, stride)
    features = apply_kernel_map(x.features, matmul_weight(weight), forward_map.transposed())
    return target.replace_features(_with_bias(features, bias))


@functools.lru_cache(maxsize=1)
def spconv_available() -> bool:
    """Whether ``spconv.pytorch`` imports here."""
    try:
        import spconv.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure (missing wheel, CUDA mismatch) means "not here"
        return False
    return True


def resolve_backend(backend: ConvBackend, device: torch.device) -> Literal["torch", "spconv"]:
    """Which implementation runs a conv on ``device``: ``auto`` picks spconv only on CUDA where it imports."""
    if backend == "torch":
        return "torch"
    if backend == "spconv":
        if not spconv_available():
            raise ImportError("backend='spconv' needs the spconv package (pip install spconv-cu12x).")
        return "spconv"
    if backend == "auto":
        return "spconv" if device.type == "cuda" and spconv_available() else "torch"
    raise ValueError(f"Unknown sparse-conv backend '{backend}': use auto, torch or spconv.")


def _spconv_weight(weight: Tensor) -> Tensor:
    """Our KRSC weight in the layout spconv was built for (RSCK when SPCONV_FILTER_HWIO is set)."""
    from spconv.constants import FILTER_HWIO

    return weight.permute(1, 2, 3, 4, 0) if FILTER_HWIO else weight


def _spconv_tensor(x: SparseTensor, spatial_shape: List[int], indice_dict: dict):
    import spconv.pytorch as spconv

    return spconv.SparseConvTensor(
        x.features.contiguous(), x.coords.contiguous(), spatial_shape, x.batch_size, indice_dict=indice_dict
    )


def _spconv_call(module: nn.Module, weight: Tensor, sparse_input):
    """Run an spconv module with our weight (a plain attribute for the call, so autograd reaches our
    parameter and the spconv module owns no parameters of its own)."""
    module.weight = _spconv_weight(weight)
    try:
        return module(sparse_input)
    finally:
        module.weight = None


class _SparseConvBase(nn.Module):
    """Weight ``[C_out, k, k, k, C_in]`` (spconv layout), optional bias, backend choice."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        bias: bool = True,
        backend: ConvBackend = "auto",
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.backend = backend
        self.weight = nn.Parameter(
            torch.empty(out_channels, kernel_size, kernel_size, kernel_size, in_channels)
        )
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()
        object.__setattr__(self, "_spconv_module", None)  # not a submodule: it holds no parameters

    def reset_parameters(self) -> None:
        # nn.Conv3d's default (kaiming_uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size**3)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"bias={self.bias is not None}, backend={self.backend}"
        )

    def _backend_for(self, x: SparseTensor) -> Literal["torch", "spconv"]:
        if self.kernel_size == 1 and self.stride == 1:
            return "torch"  # a plain matmul; spconv's 1x1 path reads KRSC weights as [C_in, C_out]
        return resolve_backend(self.backend, x.device)

    def _spconv(self, factory):
        if self._spconv_module is None:
            module = factory()
            del module.weight  # our parameter is passed in per call
            object.__setattr__(self, "_spconv_module", module)
        return self._spconv_module


class SubmanifoldConv3d(_SparseConvBase):
    """Submanifold sparse conv: output at the input's sites; odd kernel (3 for blocks, 5 for stems)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        backend: ConvBackend = "auto",
    ) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"A submanifold conv needs an odd kernel size, got {kernel_size}.")
        super().__init__(in_channels, out_channels, kernel_size, 1, bias, backend)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if self._backend_for(x) == "torch":
            return submanifold_conv3d(x, self.weight, self.bias)
        import spconv.pytorch as spconv

        module = self._spconv(
            lambda: spconv.SubMConv3d(
                self.in_channels,
                self.out_channels,
                self.kernel_size,
                bias=False,
                indice_key=f"subm{self.kernel_size}",
            )
        )
        indice_dict = x.cache.entries.setdefault("spconv_indices", {})
        shape = x.cache.entries.get("spconv_spatial_shape") or list(x.spatial_shape())
        out = _spconv_call(module, self.weight, _spconv_tensor(x, shape, indice_dict))
        indice_dict.update(out.indice_dict)
        return x.replace_features(_with_bias(out.features, self.bias))


class _ResamplingConvBase(_SparseConvBase):
    """A conv between two grids of the hierarchy: kernel 2 and stride 2 by default (the coarse grid halves the
    resolution)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 2,
        stride: int = 2,
        bias: bool = True,
        backend: ConvBackend = "auto",
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, bias, backend)


class StridedConv3d(_ResamplingConvBase):
    """Strided sparse conv (downsampling): kernel 2, stride 2 halves the grid resolution."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        if self._backend_for(x) == "torch":
            return strided_conv3d(x, self.weight, self.bias, self.stride)
        import spconv.pytorch as spconv

        key = f"down_k{self.kernel_size}_s{self.stride}"
        module = self._spconv(
            lambda: spconv.SparseConv3d(
                self.in_channels, self.out_channels, self.kernel_size, self.stride, bias=False, indice_key=key
            )
        )
        indice_dict = x.cache.entries.setdefault("spconv_indices", {})
        # Room for every coarse site: spconv drops outputs whose window leaves the grid.
        shape = [
            math.ceil((extent + self.kernel_size) / self.stride) * self.stride for extent in x.spatial_shape()
        ]
        out = _spconv_call(module, self.weight, _spconv_tensor(x, shape, indice_dict))
        indice_dict.update(out.indice_dict)
        made = x.cache.entries.get(("spconv_downsample", key))
        if made is None:
            cache = SparseGridCache()
            cache.entries["spconv_spatial_shape"] = list(out.spatial_shape)
            cache.entries["spconv_parent"] = (x.cache, key, out.indice_dict[key])
            made = (out.indices.int(), cache)
            x.cache.entries[("spconv_downsample", key)] = made
        return SparseTensor(made[0], _with_bias(out.features, self.bias), x.batch_size, made[1])


class InverseConv3d(_ResamplingConvBase):
    """Transposed sparse conv back onto the fine sites a ``StridedConv3d`` came from (``target``)."""

    def forward(self, x: SparseTensor, target: SparseTensor) -> SparseTensor:
        parent = x.cache.entries.get("spconv_parent")
        key = f"down_k{self.kernel_size}_s{self.stride}"
        use_spconv = (
            self._backend_for(x) == "spconv"
            and parent is not None
            and parent[0] is target.cache
            and parent[1] == key
        )
        if not use_spconv:  # also when the coarse grid was not made by spconv from ``target``
            return inverse_conv3d(x, target, self.weight, self.bias, self.stride)
        import spconv.pytorch as spconv

        module = self._spconv(
            lambda: spconv.SparseInverseConv3d(
                self.in_channels, self.out_channels, self.kernel_size, indice_key=key, bias=False
            )
        )
        indice_data = parent[2]
        sparse_input = _spconv_tensor(x, list(indice_data.out_spatial_shape), {key: indice_data})
        out = _spconv_call(module, self.weight, sparse_input)
        return target.replace_features(_with_bias(out.features, self.bias))
