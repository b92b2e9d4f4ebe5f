"""Flash attention in Triton: forward and backward (FlashAttention-2 scheme), causal or not, GQA.

q (B, H, Tq, D), k/v (B, Hkv, Tk, D), H % Hkv == 0, D in {16, 32, 64, 128}, fp16/bf16/fp32 with
fp32 accumulation. The causal mask is bottom-right aligned (query i sits at key position
Tk - Tq + i), so decoding with a KV cache is causal too; a query that sees no key (Tq > Tk) gets a
zero output and zero gradients.

The forward keeps only the per-row log-sum-exp (base 2) besides the output. The backward
recomputes the probabilities tile by tile: a preprocessing pass computes delta_i = <o_i, do_i>,
one kernel owns a K/V tile and accumulates dK/dV over every query head of its group (no atomics,
no K/V copies for GQA), another owns a Q tile and accumulates dQ. No T x T buffer exists anywhere.

With few K/V heads the dK/dV grid is small (Tk / BLOCK_N x Hkv x B programs), the price of owning
a K/V tile without atomics; MHA (Hkv == H) is unaffected.

Each key loop runs in two phases: tiles that need no mask (fully visible, fully in bounds) and
the few tiles on the causal diagonal or the ragged end, which are masked.

The kernels have no dropout: a call with dropout_p > 0 (training with `model.attn_dropout`) runs
on the torch backend (SDPA, which has it), and says so once in the log.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import triton
import triton.language as tl

from craft.errors import KernelError
from craft.ops.triton._common import FLOAT_DTYPES, configs, dot_precision, upcast_dots

HEAD_DIMS = (16, 32, 64, 128)
log = logging.getLogger("craft.ops")
_dropout_noted = False
LOG2E = 1.4426950408889634

# (meta, num_warps, num_stages); sized for H100 (228 KB smem) and A100 (164 KB): configs that do
# not fit a device are skipped by the autotuner, and each list ends with a small one that always fits.
_FWD_CONFIGS = configs(
    [
        ({"BLOCK_M": 128, "BLOCK_N": 64}, 4, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 4),
        ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3),
        ({"BLOCK_M": 128, "BLOCK_N": 128}, 8, 2),
        ({"BLOCK_M": 128, "BLOCK_N": 128}, 8, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 2),  # small: fits fp32 with D=128 on any card
    ],
    {"BLOCK_M": 16, "BLOCK_N": 16},
)
_DKDV_CONFIGS = configs(
    [
        ({"BLOCK_M": 32, "BLOCK_N": 128}, 4, 3),
        ({"BLOCK_M": 32, "BLOCK_N": 64}, 4, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 128}, 8, 3),
        ({"BLOCK_M": 32, "BLOCK_N": 128}, 8, 2),
        ({"BLOCK_M": 32, "BLOCK_N": 32}, 4, 2),  # small: fits fp32 with D=128 on any card
    ],
    {"BLOCK_M": 16, "BLOCK_N": 32},
)
_DQ_CONFIGS = configs(
    [
        ({"BLOCK_M": 128, "BLOCK_N": 32}, 4, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 3),
        ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3),
        ({"BLOCK_M": 32, "BLOCK_N": 32}, 4, 2),  # small: fits fp32 with D=128 on any card
    ],
    {"BLOCK_M": 32, "BLOCK_N": 16},
)
_PRE_BLOCK_M = 64


def _t_bucket(t: int) -> int:
    """Coarse sequence-length class for the autotune key, so decoding does not retune per step."""
    return 0 if t <= 512 else (1 if t <= 2048 else 2)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


# --------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_tiles(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    offs_m,
    offs_d,
    lo,
    hi,
    Tk,
    shift,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N).to(tl.int64)  # int64: T * stride can pass 2**31
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kT_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # (D, BN)
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # (BN, D)
        if MASKED:
            kT = tl.load(kT_ptrs, mask=offs_n[None, :] < Tk, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < Tk, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            v = tl.load(v_ptrs)
        zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        qk = _dot(q, kT, zero, UPCAST, PREC) * qk_scale  # (BM, BN), base-2 logits
        if MASKED:
            keep = offs_n[None, :] < Tk
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + shift)
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        p = tl.exp2(qk - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = _dot(p.to(v.dtype), v, acc, UPCAST, PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=["D", "CAUSAL", "T_BUCKET"])
@triton.jit(do_not_specialize=["Tq", "Tk", "shift", "T_BUCKET"])
def _attn_fwd(
    Q,
    K,
    V,
    O,
    LSE,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    H,
    Tq,
    Tk,
    shift,
    qk_scale,
    T_BUCKET,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    offs_m = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Tq
    q = tl.load(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None],
        other=0.0,
    )  # (BM, D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    if CAUSAL:
        # keys < start_m + shift + 1 are visible to every row of the tile
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + shift, 0), Tk)
        full = tl.minimum(tl.maximum(start_m + shift + 1, 0), Tk) // BLOCK_N * BLOCK_N
    else:
        hi = Tk
        full = Tk // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, 0, full, Tk, shift, qk_scale,
        BLOCK_M, BLOCK_N, False, CAUSAL, UPCAST, PREC,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, full, hi, Tk, shift, qk_scale,
        BLOCK_M, BLOCK_N, True, CAUSAL, UPCAST, PREC,
    )  # fmt: skip
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    # +inf for a row without keys makes every recomputed probability exactly 0 in the backward
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    o_ptrs = (
        O
        + b * stride_ob
        + h * stride_oh
        + offs_m[:, None] * stride_om
        + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + (b * H + h) * Tq + offs_m, lse, mask=row_ok)


# --------------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["Tq"])
def _attn_bwd_delta(
    O,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    H,
    Tq,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d o_id * do_id, the row term of dS = P * (dP - delta)."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Tq
    o = tl.load(
        O
        + b * stride_ob
        + h * stride_oh
        + offs_m[:, None] * stride_om
        + offs_d[None, :] * stride_od,
        mask=row_ok[:, None],
        other=0.0,
    ).to(tl.float32)
    do = tl.load(
        DO
        + b * stride_dob
        + h * stride_doh
        + offs_m[:, None] * stride_dom
        + offs_d[None, :] * stride_dod,
        mask=row_ok[:, None],
        other=0.0,
    ).to(tl.float32)
    tl.store(DELTA + (b * H + h) * Tq + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _dkdv_tiles(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qm,
    stride_qd,
    stride_dom,
    stride_dod,
    offs_n,
    offs_d,
    lo,
    hi,
    Tq,
    shift,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    offs_m0 = tl.arange(0, BLOCK_M).to(tl.int64)  # int64: T * stride can pass 2**31
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        qT_ptrs = q_base + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd  # (D, BM)
        do_ptrs = do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod  # (BM, D)
        if MASKED:
            row_ok = offs_m < Tq
            qT = tl.load(qT_ptrs, mask=row_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            qT = tl.load(qT_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        zero = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        qkT = _dot(k, qT, zero, UPCAST, PREC) * qk_scale  # (BN, BM)
        pT = tl.exp2(qkT - lse[None, :])
        if MASKED:
            keep = offs_m[None, :] < Tq
            if CAUSAL:
                keep = keep & (offs_n[:, None] <= offs_m[None, :] + shift)
            pT = tl.where(keep, pT, 0.0)
        dv = _dot(pT.to(do.dtype), do, dv, UPCAST, PREC)  # (BN, D)
        dpT = _dot(v, tl.trans(do), zero, UPCAST, PREC)  # (BN, BM)
        dsT = pT * (dpT - delta[None, :])
        dk = _dot(dsT.to(qT.dtype), tl.trans(qT), dk, UPCAST, PREC)  # (BN, D)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=["D", "CAUSAL", "T_BUCKET"])
@triton.jit(do_not_specialize=["Tq", "Tk", "shift", "T_BUCKET"])
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dvd,
    H,
    Tq,
    Tk,
    shift,
    qk_scale,
    sm_scale,
    T_BUCKET,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.arange(0, D)
    col_ok = offs_n < Tk
    k = tl.load(
        K
        + b * stride_kb
        + hk * stride_kh
        + offs_n[:, None] * stride_kn
        + offs_d[None, :] * stride_kd,
        mask=col_ok[:, None],
        other=0.0,
    )  # (BN, D)
    v = tl.load(
        V
        + b * stride_vb
        + hk * stride_vh
        + offs_n[:, None] * stride_vn
        + offs_d[None, :] * stride_vd,
        mask=col_ok[:, None],
        other=0.0,
    )  # (BN, D)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    tq_full = Tq // BLOCK_M * BLOCK_M
    if CAUSAL:
        # first query that sees key start_n, and first that sees the whole key tile
        lo = tl.minimum(tl.maximum(start_n - shift, 0), Tq) // BLOCK_M * BLOCK_M
        mid = (
            tl.cdiv(tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), Tq), BLOCK_M) * BLOCK_M
        )
    else:
        lo = 0
        mid = 0
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + (b * H + h) * Tq
        delta_base = DELTA + (b * H + h) * Tq
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base,
            stride_qm, stride_qd, stride_dom, stride_dod, offs_n, offs_d,
            lo, tl.minimum(mid, Tq), Tq, shift, qk_scale,
            BLOCK_M, BLOCK_N, True, CAUSAL, UPCAST, PREC,
        )  # fmt: skip
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base,
            stride_qm, stride_qd, stride_dom, stride_dod, offs_n, offs_d,
            mid, tq_full, Tq, shift, qk_scale,
            BLOCK_M, BLOCK_N, False, CAUSAL, UPCAST, PREC,
        )  # fmt: skip
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base,
            stride_qm, stride_qd, stride_dom, stride_dod, offs_n, offs_d,
            tl.maximum(mid, tq_full), Tq, Tq, shift, qk_scale,
            BLOCK_M, BLOCK_N, True, CAUSAL, UPCAST, PREC,
        )  # fmt: skip
    dk = dk * sm_scale
    tl.store(
        DK
        + b * stride_dkb
        + hk * stride_dkh
        + offs_n[:, None] * stride_dkn
        + offs_d[None, :] * stride_dkd,
        dk.to(DK.dtype.element_ty),
        mask=col_ok[:, None],
    )
    tl.store(
        DV
        + b * stride_dvb
        + hk * stride_dvh
        + offs_n[:, None] * stride_dvn
        + offs_d[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty),
        mask=col_ok[:, None],
    )


@triton.jit
def _dq_tiles(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    offs_m,
    offs_d,
    lo,
    hi,
    Tk,
    shift,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N).to(tl.int64)  # int64: T * stride can pass 2**31
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kT_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # (D, BN)
        vT_ptrs = v_base + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd  # (D, BN)
        if MASKED:
            kT = tl.load(kT_ptrs, mask=offs_n[None, :] < Tk, other=0.0)
            vT = tl.load(vT_ptrs, mask=offs_n[None, :] < Tk, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            vT = tl.load(vT_ptrs)
        zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        qk = _dot(q, kT, zero, UPCAST, PREC) * qk_scale  # (BM, BN)
        p = tl.exp2(qk - lse[:, None])
        if MASKED:
            keep = offs_n[None, :] < Tk
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + shift)
            p = tl.where(keep, p, 0.0)
        dp = _dot(do, vT, zero, UPCAST, PREC)  # (BM, BN)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(kT.dtype), tl.trans(kT), dq, UPCAST, PREC)  # (BM, D)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=["D", "CAUSAL", "T_BUCKET"])
@triton.jit(do_not_specialize=["Tq", "Tk", "shift", "T_BUCKET"])
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_dqd,
    H,
    Tq,
    Tk,
    shift,
    qk_scale,
    sm_scale,
    T_BUCKET,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Tq
    q = tl.load(
        Q
        + b * stride_qb
        + h * stride_qh
        + offs_m[:, None] * stride_qm
        + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None],
        other=0.0,
    )  # (BM, D)
    do = tl.load(
        DO
        + b * stride_dob
        + h * stride_doh
        + offs_m[:, None] * stride_dom
        + offs_d[None, :] * stride_dod,
        mask=row_ok[:, None],
        other=0.0,
    )  # (BM, D)
    lse = tl.load(LSE + (b * H + h) * Tq + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + (b * H + h) * Tq + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + shift, 0), Tk)
        full = tl.minimum(tl.maximum(start_m + shift + 1, 0), Tk) // BLOCK_N * BLOCK_N
    else:
        hi = Tk
        full = Tk // BLOCK_N * BLOCK_N
    dq = _dq_tiles(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, 0, full, Tk, shift, qk_scale,
        BLOCK_M, BLOCK_N, False, CAUSAL, UPCAST, PREC,
    )  # fmt: skip
    dq = _dq_tiles(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, full, hi, Tk, shift, qk_scale,
        BLOCK_M, BLOCK_N, True, CAUSAL, UPCAST, PREC,
    )  # fmt: skip
    dq = dq * sm_scale
    tl.store(
        DQ
        + b * stride_dqb
        + h * stride_dqh
        + offs_m[:, None] * stride_dqm
        + offs_d[None, :] * stride_dqd,
        dq.to(DQ.dtype.element_ty),
        mask=row_ok[:, None],
    )


# --------------------------------------------------------------------------------- launchers
def check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
) -> str | None:
    """None when the kernels accept q/k/v, else why not (used by `supports` and the op)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"expected 4-d q/k/v (B, H, T, D), got {q.dim()}/{k.dim()}/{v.dim()} dims"
    B, H, _, D = q.shape
    if k.shape != v.shape:
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} differ"
    if k.shape[0] != B or k.shape[3] != D:
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim"
    if k.shape[1] == 0 or H % k.shape[1] != 0:
        return f"query heads ({H}) must be a multiple of key/value heads ({k.shape[1]})"
    if D not in HEAD_DIMS:
        return f"head dim {D} not supported by the Triton attention kernel (supported: 16, 32, 64, 128)"
    if q.dtype not in FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q={q.dtype}, k={k.dtype}, v={v.dtype}: need one of fp16/bf16/fp32 for all"
    if not (q.device == k.device == v.device):
        return f"q/k/v on different devices ({q.device}, {k.device}, {v.device})"
    if causal and q.shape[2] > k.shape[2]:
        return f"causal attention needs Tq <= Tk, got Tq={q.shape[2]}, Tk={k.shape[2]}"
    return None


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    s = t.stride()
    return s[0], s[1], s[2], s[3]


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. Returns o (B, H, Tq, D) in q's dtype and lse (B, H, Tq) fp32, base 2."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    o = torch.empty_like(q)  # keeps q's memory layout, e.g. (B, T, H, D) underneath
    lse = torch.empty((B, H, Tq), device=q.device, dtype=torch.float32)
    if Tq == 0 or B == 0:
        return o, lse
    if Tk == 0:
        return o.zero_(), lse.fill_(float("inf"))

    def grid(meta: dict[str, Any]) -> tuple[int, int, int]:
        return (triton.cdiv(Tq, meta["BLOCK_M"]), H, B)

    _attn_fwd[grid](
        q, k, v, o, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        H, Tq, Tk, Tk - Tq, sm_scale * LOG2E, _t_bucket(Tk),
        GROUP=H // Hkv, D=D, CAUSAL=causal,
        UPCAST=upcast_dots(q.dtype), PREC=dot_precision(q.dtype),
    )  # fmt: skip
    return o, lse


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: delta, then dK/dV (per K/V head), then dQ. Returns dq, dk, dv."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B == 0 or Tq == 0 or Tk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((B, H, Tq), device=q.device, dtype=torch.float32)
    _attn_bwd_delta[(triton.cdiv(Tq, _PRE_BLOCK_M), H, B)](
        o, do, delta, *_strides(o), *_strides(do), H, Tq, D=D, BLOCK_M=_PRE_BLOCK_M
    )
    common = dict(
        GROUP=H // Hkv,
        D=D,
        CAUSAL=causal,
        UPCAST=upcast_dots(q.dtype),
        PREC=dot_precision(q.dtype),
    )
    scalars = (H, Tq, Tk, Tk - Tq, sm_scale * LOG2E, sm_scale, _t_bucket(Tk))

    def grid_kv(meta: dict[str, Any]) -> tuple[int, int, int]:
        return (triton.cdiv(Tk, meta["BLOCK_N"]), Hkv, B)

    _attn_bwd_dkdv[grid_kv](
        q, k, v, do, dk, dv, lse, delta,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        *scalars, **common,
    )  # fmt: skip

    def grid_q(meta: dict[str, Any]) -> tuple[int, int, int]:
        return (triton.cdiv(Tq, meta["BLOCK_M"]), H, B)

    _attn_bwd_dq[grid_q](
        q, k, v, do, dq, lse, delta,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        *scalars, **common,
    )  # fmt: skip
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """softmax(q k^T * scale [+ causal mask]) v with the Triton kernels in both directions."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        sm_scale: float,
    ) -> torch.Tensor:
        o, lse = attention_forward(q, k, v, causal, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        ctx.sm_scale = sm_scale
        return o

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor) -> tuple[Any, ...]:
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale)
        return dq, dk, dv, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The `triton` backend of craft.ops.attention. q (B, H, Tq, D), k/v (B, Hkv, Tk, D)."""
    if dropout_p > 0.0:
        return _with_dropout(q, k, v, causal, scale, dropout_p)
    reason = check_inputs(q, k, v, causal)
    if reason:
        raise KernelError(f"triton attention: {reason}")
    sm_scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return FlashAttentionFunction.apply(q, k, v, bool(causal), sm_scale)


def _with_dropout(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float | None,
    dropout_p: float,
) -> torch.Tensor:
    """Attention with dropout, which these kernels lack: the torch backend's SDPA runs it."""
    global _dropout_noted
    from craft.ops import torch_backend

    if not _dropout_noted and not torch.compiler.is_compiling():
        _dropout_noted = True
        log.warning(
            "triton attention has no dropout: calls with dropout_p > 0 (training with "
            "model.attn_dropout = %g) run on the torch backend (SDPA); evaluation and "
            "generation (dropout_p = 0) use the Triton kernels",
            dropout_p,
        )
    return torch_backend.attention(q, k, v, causal, scale, dropout_p)
