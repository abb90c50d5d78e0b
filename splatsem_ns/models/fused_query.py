"""The folded query (``models/folded_query.py``) as one Triton kernel: latent in, relevancy out.

For a projector head with one hidden layer (the default), each block of pixels loads its latents once, computes the
hidden activations ``h = relu(W1 z + b1)``, the query dots ``h . (W^T q)`` and the squared norm of the head's
output ``|W h + b|^2``, and writes only the relevancy: nothing of size ``[pixels, hidden]`` ever reaches memory.
The eager and compiled paths write such intermediates several times, which is what their time at full resolution
goes into.

The norm is taken one of two ways (``FoldOperands.factored``):
- Gram: ``h^T G h + 2 (W^T b) . h + |b|^2`` with ``G = W^T W`` taken in column chunks, each chunk's ``h``
  recomputed from the latent (no block of ``h`` wider than a chunk is ever held, for any hidden width). It folds a
  1280x720 latent in 0.76 ms on an H200 (benchmarks/results/query_speed_h200_gram_fold.md) and 0.75-0.81 ms on
  H100s;
- factored (hidden widths that are powers of two): with the thin QR ``W = Q R``,
  ``|W h + b|^2 = |R h + Q^T b|^2 + (|b|^2 - |Q^T b|^2)``, so ``h`` is computed once per block and the norm is one
  ``[hidden, hidden]`` product whose squares are summed: fewer multiply-adds, but the whole ``[64, hidden]`` block
  of ``h`` held at once (228 registers a thread at 256 hidden units in float16, against the Gram form's 168;
  ``tests/test_triton_compiles.py`` prints both). It folds the same latent in 0.43-0.55 ms on H100s, in the same
  runs (benchmarks/results/query_speed_h100_factored_run1.md, _run2.md, query_speed_h100_viewer_path.md), so
  ``FoldedQuery`` takes it by default where it applies (``FoldedQuery.factored_by_default``); ``fold_operands``
  itself defaults to the Gram form, which takes any hidden width.

The kernel runs on CUDA; ``TRITON_INTERPRET=1`` runs it on the CPU (slowly), which is how the tests check it
against the eager fold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from jaxtyping import Float
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; without it the fused path is simply unavailable.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None


def fused_available(latent: Tensor, front_weights: List[Tensor]) -> bool:
    """Whether ``fused_relevancy`` can run: Triton present, one hidden layer, and CUDA (or the interpreter)."""
    import os

    if triton is None or len(front_weights) != 1:
        return False
    return latent.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class FoldOperands:
    """A folded query laid out for the Triton kernels: ``fused_relevancy``'s and the fused rasterizer's
    (``rendering/triton_rasterizer.py``), which both evaluate it through ``_relevancy_block``."""

    front_weight: Float[Tensor, "D H"]
    """The head's first layer, transposed for ``x @ W`` (compute dtype); D may be zero-padded."""
    front_bias: Float[Tensor, " H"]
    """float32."""
    query_part: Float[Tensor, "H PQ"]
    """``W^T q`` zero-padded to PQ = max(16, next power of two of Q) columns (compute dtype)."""
    gram: Float[Tensor, "H H"]
    """``W^T W`` (compute dtype)."""
    gram_bias: Float[Tensor, " H"]
    """``W^T b``, float32."""
    query_bias: Float[Tensor, " Q"]
    """``q . b``, float32."""
    bias_norm: Float[Tensor, "1"]
    """``|b|^2``, float32, as a tensor: reading it as a Python number would wait for the GPU."""
    norm_factor: Float[Tensor, "H H"]
    """``R^T`` of the thin QR ``W = Q R`` (zero rows of R added where the output is narrower than H; compute
    dtype): ``h @ norm_factor = (R h)^T``."""
    norm_offset: Float[Tensor, " H"]
    """``Q^T b`` (zero-padded like R), float32."""
    norm_residual: Float[Tensor, "1"]
    """``|b|^2 - |Q^T b|^2`` (the part of the bias outside W's columns), float32."""
    num_positives: int
    temperature: float
    factored: bool = False
    """The norm through ``norm_factor`` (one pass over h) rather than the Gram matrix; needs a power-of-two
    hidden width (Triton's block shapes)."""

    @property
    def channels(self) -> int:
        return self.front_weight.shape[0]

    @property
    def hidden(self) -> int:
        return self.front_weight.shape[1]

    @property
    def queries(self) -> int:
        return self.query_bias.shape[0]

    @property
    def padded_queries(self) -> int:
        return self.query_part.shape[1]


BLOCK_HIDDEN = 64
"""Hidden units per ``tl.dot`` block of the relevancy math; the head's hidden width must be a multiple of it."""


def fold_operands(
    front_weights: List[Tensor],
    front_biases: List[Tensor],
    fold: Float[Tensor, "H K"],
    query_bias: Float[Tensor, " Q"],
    bias_norm: Float[Tensor, ""],
    num_positives: int,
    temperature: float,
    norm_terms: Tuple[Tensor, Tensor, Tensor],
    channels: Optional[int] = None,
    factored: bool = False,
) -> FoldOperands:
    """The kernels' operands of a folded query (``FoldedQuery``'s terms, a head with one hidden layer).
    ``norm_terms``: (R^T [H, H], Q^T b [H], |b|^2 - |Q^T b|^2) of the last layer (``norm_factor_terms``).
    ``channels`` zero-pads the first layer to that latent width (a latent padded with zero channels).
    ``factored``: the norm's form (see the module docstring); default: the Gram form, which takes any hidden
    width."""
    (front_weight,), (front_bias,) = front_weights, front_biases
    hidden = front_weight.shape[1]
    queries = query_bias.shape[0]
    if fold.shape != (hidden, queries + hidden + 1):
        raise ValueError(
            f"fold must be [H, Q + H + 1] = [{hidden}, {queries + hidden + 1}], got {tuple(fold.shape)}"
        )
    # Half precision with float32 accumulation on 16-bit inputs (float16: finer than bfloat16, and Triton's CPU
    # interpreter, which the tests use, computes it correctly), float32 otherwise.
    dtype = torch.float16 if fold.dtype in (torch.float16, torch.bfloat16) else torch.float32
    padded_queries = max(16, triton.next_power_of_2(queries))  # tl.dot's smallest tile
    query_part = torch.zeros(hidden, padded_queries, dtype=dtype, device=fold.device)
    query_part[:, :queries] = fold[:, :queries].to(dtype)
    width = front_weight.shape[0] if channels is None else channels
    if width < front_weight.shape[0]:
        raise ValueError(f"cannot pad a {front_weight.shape[0]}-channel head to {width} channels")
    weight = torch.zeros(width, hidden, dtype=dtype, device=front_weight.device)
    weight[: front_weight.shape[0]] = front_weight.to(dtype)
    if hidden % BLOCK_HIDDEN or width < 16 or width & (width - 1):
        raise ValueError(f"the fused query needs hidden % {BLOCK_HIDDEN} == 0 and a power-of-two latent width "
                         f">= 16 (got {hidden}, {width})")  # fmt: skip
    if factored and hidden & (hidden - 1):
        raise ValueError(f"the factored norm needs a power-of-two hidden width, got {hidden}")
    factor, offset, residual = norm_terms
    return FoldOperands(
        front_weight=weight,
        front_bias=front_bias.float().contiguous(),
        query_part=query_part,
        gram=fold[:, queries : queries + hidden].to(dtype).contiguous(),
        gram_bias=fold[:, -1].float().contiguous(),
        query_bias=query_bias.float().contiguous(),
        bias_norm=bias_norm.float().reshape(1),
        norm_factor=factor.to(dtype).contiguous(),
        norm_offset=offset.float().contiguous(),
        norm_residual=residual.float().reshape(1),
        num_positives=num_positives,
        temperature=float(temperature),
        factored=factored,
    )


def norm_factor_terms(
    weight: Float[Tensor, "C H"], bias: Float[Tensor, " C"]
) -> Tuple[Float[Tensor, "H H"], Float[Tensor, " H"], Float[Tensor, ""]]:
    """(R^T, Q^T b, |b|^2 - |Q^T b|^2) of the thin QR ``W = Q R`` of a last layer ``W h + b``, in float64 then
    float32: ``|W h + b|^2 = |R h + Q^T b|^2 + |b|^2 - |Q^T b|^2``. R gets zero rows where C < H, so R^T is
    always [H, H]."""
    hidden = weight.shape[1]
    q, r = torch.linalg.qr(weight.double())  # q [C, K], r [K, H], K = min(C, H)
    offset = q.T @ bias.double()
    factor = torch.zeros(hidden, hidden, dtype=torch.float64, device=weight.device)
    factor[: r.shape[0]] = r
    padded = torch.zeros(hidden, dtype=torch.float64, device=weight.device)
    padded[: offset.shape[0]] = offset
    residual = (bias.double() @ bias.double() - offset @ offset).clamp_min(0.0)
    return factor.T.float(), padded.float(), residual.float()


def fused_relevancy(latent: Float[Tensor, "*batch D"], ops: FoldOperands) -> Float[Tensor, "*batch P"]:
    """LERF relevancy of every latent in one kernel: ``folded_query.folded_relevancy``'s numbers, for a query laid out
    by ``fold_operands`` (``FoldedQuery.operands``; a head with one hidden layer)."""
    num_positives = ops.num_positives
    batch_shape = latent.shape[:-1]
    flat = latent.reshape(-1, latent.shape[-1]).contiguous()
    rows = flat.shape[0]
    if flat.shape[1] != ops.channels:
        raise ValueError(f"latent has {flat.shape[1]} channels, the head takes {ops.channels}")
    out = torch.empty(rows, num_positives, dtype=torch.float32, device=flat.device)
    block_rows = 64
    grid = (triton.cdiv(rows, block_rows),)
    _relevancy_kernel[grid](
        flat,
        ops.front_weight,
        ops.front_bias,
        ops.query_part,
        ops.gram,
        ops.gram_bias,
        ops.query_bias,
        ops.bias_norm,
        ops.norm_factor,
        ops.norm_offset,
        ops.norm_residual,
        out,
        rows,
        ops.temperature,
        FACTORED=ops.factored,
        CHANNELS=ops.channels,
        HIDDEN=ops.hidden,
        QUERIES=ops.queries,
        PADDED_QUERIES=ops.padded_queries,
        POSITIVES=num_positives,
        BLOCK_ROWS=block_rows,
        BLOCK_HIDDEN=BLOCK_HIDDEN,
    )
    return out.reshape(*batch_shape, num_positives)


if triton is not None:

    @triton.jit
    def _relevancy_block(
        x,  # [BLOCK_ROWS, CHANNELS] latents, in registers (any float dtype)
        weight_ptr,  # [CHANNELS, HIDDEN] compute dtype (W1^T)
        bias_ptr,  # [HIDDEN] float32
        query_ptr,  # [HIDDEN, PADDED_QUERIES] compute dtype (W^T q, zero-padded)
        gram_ptr,  # [HIDDEN, HIDDEN] compute dtype (W^T W)
        gram_bias_ptr,  # [HIDDEN] float32 (W^T b)
        query_bias_ptr,  # [QUERIES] float32 (q . b)
        bias_norm_ptr,  # [1] float32: |b|^2
        factor_ptr,  # [HIDDEN, HIDDEN] compute dtype (R^T)
        offset_ptr,  # [HIDDEN] float32 (Q^T b)
        residual_ptr,  # [1] float32 (|b|^2 - |Q^T b|^2)
        temperature,
        FACTORED: tl.constexpr,
        CHANNELS: tl.constexpr,
        HIDDEN: tl.constexpr,
        QUERIES: tl.constexpr,
        PADDED_QUERIES: tl.constexpr,
        POSITIVES: tl.constexpr,
        BLOCK_HIDDEN: tl.constexpr,
    ):
        """Relevancy [BLOCK_ROWS, PADDED_QUERIES] of a block of latents (columns >= POSITIVES are padding); the
        whole folded query, so every kernel that ends in relevancy shares one copy of the math."""
        x = x.to(weight_ptr.dtype.element_ty)
        channel = tl.arange(0, CHANNELS)
        column = tl.arange(0, PADDED_QUERIES)
        # Triton compiles both branches' names into one scope (a constexpr branch's early return does not end it), so
        # the two forms share no variable whose shape differs between them, and the function returns once.
        if FACTORED:
            # h once for the block, then |R h + Q^T b|^2 one block of R's rows at a time.
            units = tl.arange(0, HIDDEN)
            h_all = tl.dot(x, tl.load(weight_ptr + channel[:, None] * HIDDEN + units[None, :]))
            h_all = tl.maximum(h_all + tl.load(bias_ptr + units)[None, :], 0.0).to(
                weight_ptr.dtype.element_ty
            )
            dots = tl.dot(h_all, tl.load(query_ptr + units[:, None] * PADDED_QUERIES + column[None, :]))
            norm2 = tl.zeros((x.shape[0],), dtype=tl.float32)
            for start in range(0, HIDDEN, BLOCK_HIDDEN):
                unit = start + tl.arange(0, BLOCK_HIDDEN)
                u = tl.dot(h_all, tl.load(factor_ptr + units[:, None] * HIDDEN + unit[None, :]))
                u += tl.load(offset_ptr + unit)[None, :]
                norm2 += tl.sum(u * u, axis=1)
            norm2 += tl.load(residual_ptr)
        else:
            dots = tl.zeros((x.shape[0], PADDED_QUERIES), dtype=tl.float32)
            norm2 = tl.zeros((x.shape[0],), dtype=tl.float32)
            # Pass 1: the hidden activations chunk by chunk, for the query dots and the bias term of the norm.
            for start in range(0, HIDDEN, BLOCK_HIDDEN):
                unit = start + tl.arange(0, BLOCK_HIDDEN)
                w = tl.load(weight_ptr + channel[:, None] * HIDDEN + unit[None, :])
                h = tl.dot(x, w) + tl.load(bias_ptr + unit)[None, :]
                h = tl.maximum(h, 0.0)
                norm2 += 2.0 * tl.sum(h * tl.load(gram_bias_ptr + unit)[None, :], axis=1)
                hc = h.to(weight_ptr.dtype.element_ty)
                q = tl.load(query_ptr + unit[:, None] * PADDED_QUERIES + column[None, :])
                dots += tl.dot(hc, q)
            # Pass 2: h^T G h, one block of G's columns at a time; h of the columns' units is recomputed (cheap).
            for out_start in range(0, HIDDEN, BLOCK_HIDDEN):
                out_unit = out_start + tl.arange(0, BLOCK_HIDDEN)
                w_out = tl.load(weight_ptr + channel[:, None] * HIDDEN + out_unit[None, :])
                h_out = tl.maximum(tl.dot(x, w_out) + tl.load(bias_ptr + out_unit)[None, :], 0.0)
                g = tl.zeros((x.shape[0], BLOCK_HIDDEN), dtype=tl.float32)
                for start in range(0, HIDDEN, BLOCK_HIDDEN):
                    unit = start + tl.arange(0, BLOCK_HIDDEN)
                    w = tl.load(weight_ptr + channel[:, None] * HIDDEN + unit[None, :])
                    h = tl.maximum(tl.dot(x, w) + tl.load(bias_ptr + unit)[None, :], 0.0)
                    block = tl.load(gram_ptr + unit[:, None] * HIDDEN + out_unit[None, :])
                    g += tl.dot(h.to(weight_ptr.dtype.element_ty), block)
                norm2 += tl.sum(g * h_out, axis=1)
            norm2 += tl.load(bias_norm_ptr)
        return _relevancy_tail(dots, norm2, query_bias_ptr, temperature, QUERIES, PADDED_QUERIES, POSITIVES)

    @triton.jit
    def _relevancy_tail(
        dots,  # [BLOCK_ROWS, PADDED_QUERIES] float32: h . (W^T q)
        norm2,  # [BLOCK_ROWS] float32: |W h + b|^2
        query_bias_ptr,
        temperature,
        QUERIES: tl.constexpr,
        PADDED_QUERIES: tl.constexpr,
        POSITIVES: tl.constexpr,
    ):
        """The cosines and LERF's pairwise sigmoid against the hardest negative."""
        column = tl.arange(0, PADDED_QUERIES)
        inverse = 1.0 / tl.maximum(tl.sqrt(tl.maximum(norm2, 0.0)), 1e-12)
        query_bias = tl.load(query_bias_ptr + column, mask=column < QUERIES, other=0.0)
        cosine = (dots + query_bias[None, :]) * inverse[:, None]
        negative = (column >= POSITIVES) & (column < QUERIES)
        if QUERIES > POSITIVES:
            hardest = tl.max(tl.where(negative[None, :], cosine, -float("inf")), axis=1)
        else:
            hardest = tl.zeros((dots.shape[0],), dtype=tl.float32)
        return tl.sigmoid(temperature * (cosine - hardest[:, None]))

    @triton.jit
    def _relevancy_kernel(
        latent_ptr,  # [M, CHANNELS] float32
        weight_ptr,
        bias_ptr,
        query_ptr,
        gram_ptr,
        gram_bias_ptr,
        query_bias_ptr,
        bias_norm_ptr,
        factor_ptr,
        offset_ptr,
        residual_ptr,
        out_ptr,  # [M, POSITIVES] float32
        rows,
        temperature,
        FACTORED: tl.constexpr,
        CHANNELS: tl.constexpr,
        HIDDEN: tl.constexpr,
        QUERIES: tl.constexpr,
        PADDED_QUERIES: tl.constexpr,
        POSITIVES: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_HIDDEN: tl.constexpr,
    ):
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        live = row < rows
        channel = tl.arange(0, CHANNELS)
        x = tl.load(latent_ptr + row[:, None] * CHANNELS + channel[None, :], mask=live[:, None], other=0.0)
        relevancy = _relevancy_block(
            x,
            weight_ptr,
            bias_ptr,
            query_ptr,
            gram_ptr,
            gram_bias_ptr,
            query_bias_ptr,
            bias_norm_ptr,
            factor_ptr,
            offset_ptr,
            residual_ptr,
            temperature,
            FACTORED,
            CHANNELS,
            HIDDEN,
            QUERIES,
            PADDED_QUERIES,
            POSITIVES,
            BLOCK_HIDDEN,
        )
        column = tl.arange(0, PADDED_QUERIES)
        tl.store(
            out_ptr + row[:, None] * POSITIVES + column[None, :],
            relevancy,
            mask=live[:, None] & (column[None, :] < POSITIVES),
        )
