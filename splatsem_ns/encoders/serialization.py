"""Space-filling curves over voxel coordinates (pure PyTorch bit arithmetic), as Point Transformer V3 uses them.

Sorting voxels by their position along a z-order (Morton) or Hilbert curve puts voxels that are close in space
mostly close in the list, so attention over runs of consecutive voxels ("patches") is local attention without
any neighbour search. The Hilbert curve keeps every step between neighbouring cells (better locality); z-order
is cheaper and jumps at block borders. "-trans" variants swap x and y, so that shuffling several orders between
blocks lets patches cut the scene in different ways (PTv3).

A serialisation code is ``batch << (3 * depth) | curve_index``: sorting by it groups voxels by scene first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from jaxtyping import Int
from torch import Tensor

ORDERS: Tuple[str, ...] = ("z", "z-trans", "hilbert", "hilbert-trans")
"""Serialisation orders known here (PTv3's four)."""
MAX_DEPTH = 16
"""Bits per axis a curve index may use (the coordinate keys' range; with a scene index it fits in int64)."""

# Masks that spread the low 21 bits of a number to every third bit (and back): the usual Morton "magic bits".
_SPREAD = (
    (32, 0x1F00000000FFFF),
    (16, 0x1F0000FF0000FF),
    (8, 0x100F00F00F00F00F),
    (4, 0x10C30C30C30C30C3),
    (2, 0x1249249249249249),
)


def _spread_bits(v: Int[Tensor, " N"]) -> Int[Tensor, " N"]:
    """Bit i of ``v`` moves to bit 3i."""
    v = v.long() & 0x1FFFFF
    for shift, mask in _SPREAD:
        v = (v | (v << shift)) & mask
    return v


def _compact_bits(v: Int[Tensor, " N"]) -> Int[Tensor, " N"]:
    """Bit 3i of ``v`` moves to bit i (the spreading steps undone in reverse)."""
    v = v.long() & _SPREAD[-1][1]
    masks = [mask for _, mask in _SPREAD[-2::-1]] + [0x1FFFFF]
    for (shift, _), mask in zip(_SPREAD[::-1], masks, strict=True):
        v = (v | (v >> shift)) & mask
    return v


def _interleave(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """Bits of x, y, z interleaved, x most significant in each triple: ``... x1 y1 z1 x0 y0 z0``."""
    return (_spread_bits(x) << 2) | (_spread_bits(y) << 1) | _spread_bits(z)


def _deinterleave(code: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return _compact_bits(code >> 2), _compact_bits(code >> 1), _compact_bits(code)


def z_order_encode(coords: Int[Tensor, "N 3"]) -> Int[Tensor, " N"]:
    """Morton code of non-negative ``(x, y, z)`` (up to 21 bits per axis)."""
    return _interleave(coords[:, 0], coords[:, 1], coords[:, 2])


def z_order_decode(codes: Int[Tensor, " N"]) -> Int[Tensor, "N 3"]:
    """Coordinates of Morton codes."""
    return torch.stack(_deinterleave(codes), dim=1)


def _invert_or_exchange(x: List[Tensor], q: int, axes: Sequence[int]) -> None:
    """One bit level of Skilling's transform, in place on the three coordinate columns ``x``: for each axis in
    ``axes``, where its bit ``q`` is set, invert the lower bits of axis 0; elsewhere exchange those bits between
    axis 0 and it. The encoding walks the axes forwards, the decoding backwards."""
    p = q - 1
    for i in axes:
        bit = (x[i] & q) != 0
        if i == 0:
            x[0] = torch.where(bit, x[0] ^ p, x[0])
            continue
        t = (x[0] ^ x[i]) & p
        x[0], x[i] = torch.where(bit, x[0] ^ p, x[0] ^ t), torch.where(bit, x[i], x[i] ^ t)


def hilbert_encode(coords: Int[Tensor, "N 3"], depth: int) -> Int[Tensor, " N"]:
    """Index along the 3D Hilbert curve of order ``depth`` (coordinates in ``[0, 2^depth)``).

    Skilling's transform ("Programming the Hilbert curve", AIP Conf. Proc. 707, 2004): undo the curve's
    rotations and reflections level by level, Gray-encode, then read the bits interleaved as a Morton code.
    Vectorised over points; the loops run over bits and axes only.
    """
    x = [coords[:, i].long() for i in range(3)]
    q = 1 << (depth - 1)
    while q > 1:
        _invert_or_exchange(x, q, (0, 1, 2))
        q >>= 1
    x[1] = x[1] ^ x[0]
    x[2] = x[2] ^ x[1]
    t = torch.zeros_like(x[0])
    q = 1 << (depth - 1)
    while q > 1:
        t = torch.where((x[2] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    return _interleave(x[0] ^ t, x[1] ^ t, x[2] ^ t)


def hilbert_decode(codes: Int[Tensor, " N"], depth: int) -> Int[Tensor, "N 3"]:
    """Coordinates of Hilbert indices (inverse of ``hilbert_encode`` at the same depth)."""
    x = list(_deinterleave(codes))
    t = x[2] >> 1
    x[2] = x[2] ^ x[1]
    x[1] = x[1] ^ x[0]
    x[0] = x[0] ^ t
    q = 2
    while q != (2 << (depth - 1)):
        _invert_or_exchange(x, q, (2, 1, 0))
        q <<= 1
    return torch.stack(x, dim=1)


def serialization_codes(coords: Int[Tensor, "M 4"], order: str, depth: int = MAX_DEPTH) -> Int[Tensor, " M"]:
    """``batch << 3 * depth | curve index`` of each ``(batch, x, y, z)`` row for one of ``ORDERS``.

    The depth is fixed (not the batch's largest coordinate, as Pointcept does): a Hilbert curve's path through
    a small cube depends on the curve's depth, so a depth taken from the batch would let one scene's extent
    change another scene's order, and with it its features.
    """
    xyz = coords[:, 1:].long()
    if order.endswith("-trans"):
        xyz = xyz[:, [1, 0, 2]]
    curve = order.removesuffix("-trans")
    if curve == "z":
        index = z_order_encode(xyz)
    elif curve == "hilbert":
        index = hilbert_encode(xyz, depth)
    else:
        raise ValueError(f"Unknown serialisation order '{order}'; known: {', '.join(ORDERS)}")
    return (coords[:, 0].long() << (3 * depth)) | index


@dataclass(eq=False)
class Serialization:
    """One serialised order of a set of voxels."""

    order: Int[Tensor, " M"]
    """Voxel row at each position of the sorted list."""
    inverse: Int[Tensor, " M"]
    """Position of each voxel in the sorted list: ``order[inverse] == arange(M)``."""
    codes: Int[Tensor, " M"]
    """Serialisation code of each voxel (in voxel order)."""


def serialize(
    coords: Int[Tensor, "M 4"], orders: Tuple[str, ...] | List[str] = ORDERS
) -> List[Serialization]:
    """Sort voxels along each curve in ``orders`` (scene-major, codes are unique per voxel)."""
    result = []
    for name in orders:
        codes = serialization_codes(coords, name)
        order = torch.argsort(codes)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        result.append(Serialization(order=order, inverse=inverse, codes=codes))
    return result
