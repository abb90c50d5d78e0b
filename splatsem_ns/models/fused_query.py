"""The folded query (``models/folded_query.py``) as one Triton kernel: latent in, relevancy out.

For a projector head with one hidden layer (the default), each block of pixels loads its latents once, computes the
hidden activations ``h = relu(W1 z + b1)``, the query dots ``h . (W^T q)`` and the squared norm
``h^T G h + 2 (W^T b) . h + |b|^2`` with the Gram matrix taken in column chunks (each chunk's ``h`` is recomputed
from the latent, which is cheap at 32 channels), and writes only the relevancy: nothing of size
``[pixels, hidden]`` ever reaches memory. The eager and compiled paths write such intermediates several times,
which is what their time at full resolution goes into.

The kernel runs on CUDA; ``TRITON_INTERPRET=1`` runs it on the CPU (slowly), which is how the tests check it
against the eager fold.
"""

from __future__ import annotations

from typing import List

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


def fused_relevancy(
    latent: Float[Tensor, "*batch D"],
    front_weights: List[Tensor],
    front_biases: List[Tensor],
    fold: Float[Tensor, "H K"],
    query_bias: Float[Tensor, " Q"],
    bias_norm: Float[Tensor, ""],
    num_positives: int,
    temperature: float,
) -> Float[Tensor, "*batch P"]:
    """LERF relevancy of every latent: ``folded_query.folded_relevancy``'s arguments and numbers, for a head with one
    hidden layer (``front_weights`` holds its ``[D, H]`` weight; ``fold`` is ``[W^T q | G | W^T b]``)."""
    (front_weight,), (front_bias,) = front_weights, front_biases
    batch_shape = latent.shape[:-1]
    flat = latent.reshape(-1, latent.shape[-1]).contiguous()
    rows, channels = flat.shape
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
    gram = fold[:, queries : queries + hidden].to(dtype).contiguous()
    gram_bias = fold[:, -1].float().contiguous()
    out = torch.empty(rows, num_positives, dtype=torch.float32, device=flat.device)
    block_rows, block_hidden = 64, 64
    if hidden % block_hidden or channels < 16 or channels & (channels - 1):
        raise ValueError(f"the fused query needs hidden % 64 == 0 and a power-of-two latent width >= 16 "
                         f"(got {hidden}, {channels})")  # fmt: skip
    grid = (triton.cdiv(rows, block_rows),)
    _relevancy_kernel[grid](
        flat,
        front_weight.to(dtype).contiguous(),
        front_bias.float().contiguous(),
        query_part,
        gram,
        gram_bias,
        query_bias.float().contiguous(),
        bias_norm.float().reshape(1),  # a pointer, not a Python number: reading it would wait for the GPU
        out,
        rows,
        float(temperature),
        CHANNELS=channels,
        HIDDEN=hidden,
        QUERIES=queries,
        PADDED_QUERIES=padded_queries,
        POSITIVES=num_positives,
        BLOCK_ROWS=block_rows,
        BLOCK_HIDDEN=block_hidden,
    )
    return out.reshape(*batch_shape, num_positives)


if triton is not None:

    @triton.jit
    def _relevancy_kernel(
        latent_ptr,  # [M, CHANNELS] float32
        weight_ptr,  # [CHANNELS, HIDDEN] compute dtype (W1^T)
        bias_ptr,  # [HIDDEN] float32
        query_ptr,  # [HIDDEN, PADDED_QUERIES] compute dtype (W^T q, zero-padded)
        gram_ptr,  # [HIDDEN, HIDDEN] compute dtype (W^T W)
        gram_bias_ptr,  # [HIDDEN] float32 (W^T b)
        query_bias_ptr,  # [QUERIES] float32 (q . b)
        bias_norm_ptr,  # [1] float32: |b|^2
        out_ptr,  # [M, POSITIVES] float32
        rows,
        temperature,
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
        x = x.to(weight_ptr.dtype.element_ty)
        column = tl.arange(0, PADDED_QUERIES)
        dots = tl.zeros((BLOCK_ROWS, PADDED_QUERIES), dtype=tl.float32)
        norm2 = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
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
            g = tl.zeros((BLOCK_ROWS, BLOCK_HIDDEN), dtype=tl.float32)
            for start in range(0, HIDDEN, BLOCK_HIDDEN):
                unit = start + tl.arange(0, BLOCK_HIDDEN)
                w = tl.load(weight_ptr + channel[:, None] * HIDDEN + unit[None, :])
                h = tl.maximum(tl.dot(x, w) + tl.load(bias_ptr + unit)[None, :], 0.0)
                block = tl.load(gram_ptr + unit[:, None] * HIDDEN + out_unit[None, :])
                g += tl.dot(h.to(weight_ptr.dtype.element_ty), block)
            norm2 += tl.sum(g * h_out, axis=1)
        norm2 += tl.load(bias_norm_ptr)
        inverse = 1.0 / tl.maximum(tl.sqrt(tl.maximum(norm2, 0.0)), 1e-12)
        query_bias = tl.load(query_bias_ptr + column, mask=column < QUERIES, other=0.0)
        cosine = (dots + query_bias[None, :]) * inverse[:, None]
        negative = (column >= POSITIVES) & (column < QUERIES)
        if QUERIES > POSITIVES:
            hardest = tl.max(tl.where(negative[None, :], cosine, -float("inf")), axis=1)
        else:
            hardest = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
        relevancy = tl.sigmoid(temperature * (cosine - hardest[:, None]))
        tl.store(
            out_ptr + row[:, None] * POSITIVES + column[None, :],
            relevancy,
            mask=live[:, None] & (column[None, :] < POSITIVES),
        )
