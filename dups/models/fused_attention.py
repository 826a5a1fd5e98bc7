"""Fused clustered attention in Triton: one program per (query group, head) reads its queries
and its keys and values straight from the stage's token table by index, so neither the
gathered query groups nor the packed key/value groups (48 keys x 8 queries) are materialised,
and writes each output row back in row order.

Numbers are those of ``attention.attend_torch`` (the reference and the CPU path): the same
packed ``[values | keys + bias channels]`` layout, the same groups. Backward recomputes the
probabilities per group and scatters key and value gradients with atomic adds (a key belongs
to several groups). Both are custom ops (``dups::cluster_attention`` and its backward), so
torch.compile and CUDA graphs take each as one call. Tested on the CPU with Triton's
interpreter (``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # an optional GPU dependency; ``available()`` says whether it is here
    triton = None


def available() -> bool:
    return triton is not None


def _block(n: int) -> int:
    """Triton blocks are powers of two, at least 16 (``tl.dot``'s smallest tile)."""
    return max(16, 1 << (n - 1).bit_length())


if triton is not None:

    @triton.jit
    def _group_tiles(q_ptr, kv_ptr, query_rows, key_rows, group, head, dq, dv, n_queries, n_keys,
                     stride_q_row, stride_q_head, stride_kv_row, stride_kv_head,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DQ: tl.constexpr,
                     BLOCK_DV: tl.constexpr):
        """One group's query rows and key rows, and its queries, keys and values (fp32) read
        from the token tables by those rows; padding lanes masked to 0."""
        m = tl.arange(0, BLOCK_M)
        k = tl.arange(0, BLOCK_K)
        d = tl.arange(0, BLOCK_DQ)
        e = tl.arange(0, BLOCK_DV)
        m_ok = m < n_queries
        k_ok = k < n_keys
        rows = tl.load(query_rows + group * n_queries + m, mask=m_ok, other=0).to(tl.int64)
        keys = tl.load(key_rows + group * n_keys + k, mask=k_ok, other=0).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_q_row + head * stride_q_head + d[None, :],
                    mask=m_ok[:, None] & (d[None, :] < dq), other=0.0).to(tl.float32)
        kv_base = kv_ptr + keys[:, None] * stride_kv_row + head * stride_kv_head
        key = tl.load(kv_base + dv + d[None, :], mask=k_ok[:, None] & (d[None, :] < dq), other=0.0).to(tl.float32)
        val = tl.load(kv_base + e[None, :], mask=k_ok[:, None] & (e[None, :] < dv), other=0.0).to(tl.float32)
        return m, d, e, m_ok, k_ok, rows, keys, q, key, val

    @triton.jit
    def _forward(q_ptr, kv_ptr, out_ptr, lse_ptr, query_rows, key_rows, scale,
                 heads, dq, dv, n_queries, n_keys,
                 stride_q_row, stride_q_head, stride_kv_row, stride_kv_head,
                 stride_o_row, stride_o_head,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DQ: tl.constexpr,
                 BLOCK_DV: tl.constexpr):
        group = tl.program_id(0)
        head = tl.program_id(1)
        m, d, e, m_ok, k_ok, rows, keys, q, key, val = _group_tiles(
            q_ptr, kv_ptr, query_rows, key_rows, group, head, dq, dv, n_queries, n_keys,
            stride_q_row, stride_q_head, stride_kv_row, stride_kv_head, BLOCK_M, BLOCK_K, BLOCK_DQ, BLOCK_DV)
        s = tl.dot(q, tl.trans(key), input_precision="ieee") * scale
        s = tl.where(k_ok[None, :], s, float("-inf"))
        top = tl.max(s, 1)
        p = tl.exp(s - top[:, None])
        total = tl.sum(p, 1)
        out = tl.dot(p, val, input_precision="ieee") / total[:, None]
        tl.store(out_ptr + rows[:, None] * stride_o_row + head * stride_o_head + e[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & (e[None, :] < dv))
        tl.store(lse_ptr + (group * heads + head) * BLOCK_M + m, top + tl.log(total))

    @triton.jit
    def _backward(q_ptr, kv_ptr, dout_ptr, delta_ptr, lse_ptr, dq_ptr, dkv_ptr, query_rows, key_rows,
                  scale, heads, dq, dv, n_queries, n_keys,
                  stride_q_row, stride_q_head, stride_kv_row, stride_kv_head,
                  stride_o_row, stride_o_head,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DQ: tl.constexpr,
                  BLOCK_DV: tl.constexpr):
        group = tl.program_id(0)
        head = tl.program_id(1)
        m, d, e, m_ok, k_ok, rows, keys, q, key, val = _group_tiles(
            q_ptr, kv_ptr, query_rows, key_rows, group, head, dq, dv, n_queries, n_keys,
            stride_q_row, stride_q_head, stride_kv_row, stride_kv_head, BLOCK_M, BLOCK_K, BLOCK_DQ, BLOCK_DV)
        q_mask = m_ok[:, None] & (d[None, :] < dq)
        k_mask = k_ok[:, None] & (d[None, :] < dq)
        v_mask = k_ok[:, None] & (e[None, :] < dv)
        o_mask = m_ok[:, None] & (e[None, :] < dv)
        dout = tl.load(dout_ptr + rows[:, None] * stride_o_row + head * stride_o_head + e[None, :],
                       mask=o_mask, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + (group * heads + head) * BLOCK_M + m)
        delta = tl.load(delta_ptr + rows * heads + head, mask=m_ok, other=0.0)
        s = tl.dot(q, tl.trans(key), input_precision="ieee") * scale
        p = tl.where(k_ok[None, :] & m_ok[:, None], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(dout, tl.trans(val), input_precision="ieee")
        ds = p * (dp - delta[:, None]) * scale
        # a padded group repeats its last query: only the first copy of a row adds its gradient
        first = tl.load(query_rows + group * n_queries + m - 1, mask=m_ok & (m > 0), other=-1).to(tl.int64) != rows
        dq_rows = tl.dot(ds, key, input_precision="ieee")
        tl.atomic_add(dq_ptr + rows[:, None] * stride_q_row + head * stride_q_head + d[None, :], dq_rows,
                      mask=q_mask & first[:, None])
        ds = tl.where(first[:, None], ds, 0.0)
        p = tl.where(first[:, None], p, 0.0)
        dkv_base = dkv_ptr + keys[:, None] * stride_kv_row + head * stride_kv_head
        tl.atomic_add(dkv_base + e[None, :], tl.dot(tl.trans(p), dout, input_precision="ieee"), mask=v_mask)
        tl.atomic_add(dkv_base + dv + d[None, :], tl.dot(tl.trans(ds), q, input_precision="ieee"), mask=k_mask)


def _launch_shape(q: Tensor, kv: Tensor, query_rows: Tensor, key_rows: Tensor, groups: int):
    heads, dq = q.shape[1:]
    dv = kv.shape[-1] - dq
    m, k = query_rows.numel() // groups, key_rows.numel() // groups
    blocks = dict(BLOCK_M=_block(m), BLOCK_K=_block(k), BLOCK_DQ=_block(dq), BLOCK_DV=_block(dv))
    return heads, dq, dv, m, k, blocks


# Custom ops, so that torch.compile and CUDA graphs take each kernel as one opaque call with a
# known output shape instead of tracing into the Triton launch.
@torch.library.custom_op("dups::cluster_attention", mutates_args=())
def cluster_attention(q: Tensor, kv: Tensor, query_rows: Tensor, key_rows: Tensor, groups: int,
                      scale: float) -> tuple[Tensor, Tensor]:
    """Rows ``q`` (R, h, dq), ``kv`` (R, h, dv + dq) -> the output (R, h, dv) and each group's
    log-sum-exp (kept for the backward)."""
    heads, dq, dv, m, k, blocks = _launch_shape(q, kv, query_rows, key_rows, groups)
    out, lse = _outputs(q, heads, dv, groups, blocks["BLOCK_M"])
    _forward[(groups, heads)](q, kv, out, lse, query_rows, key_rows, scale, heads, dq, dv, m, k,
                              q.stride(0), q.stride(1), kv.stride(0), kv.stride(1),
                              out.stride(0), out.stride(1), **blocks)
    return out, lse


@cluster_attention.register_fake
def _(q, kv, query_rows, key_rows, groups, scale):
    heads, dq, dv, m, k, blocks = _launch_shape(q, kv, query_rows, key_rows, groups)
    return _outputs(q, heads, dv, groups, blocks["BLOCK_M"])


def _outputs(q: Tensor, heads: int, dv: int, groups: int, block_m: int) -> tuple[Tensor, Tensor]:
    """The forward's empty output rows and per-group log-sum-exp (fp32)."""
    return q.new_empty(q.shape[0], heads, dv), q.new_empty(groups * heads * block_m, dtype=torch.float32)


@torch.library.custom_op("dups::cluster_attention_backward", mutates_args=())
def cluster_attention_backward(dout: Tensor, q: Tensor, kv: Tensor, out: Tensor, lse: Tensor, query_rows: Tensor,
                               key_rows: Tensor, groups: int, scale: float) -> tuple[Tensor, Tensor]:
    heads, dq, dv, m, k, blocks = _launch_shape(q, kv, query_rows, key_rows, groups)
    dout = dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # rowsum(dO * O), (rows, heads)
    dq_ = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    dkv = torch.zeros(kv.shape, device=kv.device, dtype=torch.float32)
    _backward[(groups, heads)](q, kv, dout, delta, lse, dq_, dkv, query_rows, key_rows, scale,
                               heads, dq, dv, m, k, q.stride(0), q.stride(1), kv.stride(0), kv.stride(1),
                               dout.stride(0), dout.stride(1), **blocks)
    return dq_.to(q.dtype), dkv.to(kv.dtype)


@cluster_attention_backward.register_fake
def _(dout, q, kv, out, lse, query_rows, key_rows, groups, scale):
    return torch.empty_like(q), torch.empty_like(kv)


def _save(ctx, inputs, output):
    q, kv, query_rows, key_rows, groups, scale = inputs
    ctx.save_for_backward(q, kv, output[0], output[1], query_rows, key_rows)
    ctx.groups, ctx.scale = groups, scale


def _gradients(ctx, dout, _dlse):
    q, kv, out, lse, query_rows, key_rows = ctx.saved_tensors
    dq, dkv = cluster_attention_backward(dout, q, kv, out, lse, query_rows, key_rows, ctx.groups, ctx.scale)
    return dq, dkv, None, None, None, None


cluster_attention.register_autograd(_gradients, setup_context=_save)


def attend_fused(q: Tensor, kv: Tensor, nbhd, scale: float) -> Tensor:
    """``attention.attend_torch``'s numbers without its gathers: ``q`` (B, N, h, dq), ``kv``
    (B, N, h, dv + dq) packed ``[values | keys]`` -> (B, N, h, dv). Cluster mode only."""
    if triton is None:
        raise ImportError("the fused attention backend needs Triton (it ships with CUDA torch)")
    if nbhd.query_rows is None:
        raise ValueError("the fused kernel takes cluster neighbourhoods (grid mode has natten)")
    b, n, h, dq = q.shape
    out, _ = cluster_attention(q.reshape(b * n, h, dq).contiguous(), kv.reshape(b * n, h, -1).contiguous(),
                               nbhd.query_rows.contiguous(), nbhd.key_rows.contiguous(), b * nbhd.groups, scale)
    return out.view(b, n, h, -1)
