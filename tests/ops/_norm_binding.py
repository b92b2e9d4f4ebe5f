"""A torch model of the cuda norm binding (kernels/norm_binding.cpp), for its Python side on CPU."""

from __future__ import annotations

import torch


class BindingModel:
    """The contract of kernels/norm_binding.cpp computed with torch, for the Python side on CPU.

    norm_fwd -> [y (y_dtype), sum (residual's dtype), mean, rstd]; norm_bwd -> [dx (x's dtype),
    dweight, dbias, dx_branch (branch_dtype, when it differs from x's)]. The kernels themselves
    are checked on a GPU and in the emulator; this checks what the autograd Function does with
    their outputs.
    """

    @staticmethod
    def norm_fwd(x, residual, weight, bias, rms, eps, y_dtype=None):
        assert x.is_contiguous() and x.dim() == 2
        s = None if residual is None else (x.float() + residual.float()).to(residual.dtype)
        v = (x if s is None else s).float()
        mean = None if rms else v.mean(-1)
        c = v if rms else v - mean[:, None]
        rstd = torch.rsqrt(c.square().mean(-1) + eps)
        y = c * rstd[:, None]
        if weight is not None:
            y = y * weight.float()
        if bias is not None:
            y = y + bias.float()
        return [y.to(y_dtype or (x if s is None else s).dtype), s, mean, rstd]

    @staticmethod
    def norm_bwd(dy, dsum, x, mean, rstd, weight, need_dw, need_db, rms, branch_dtype=None):
        xh = (x.float() - (0 if rms else mean[:, None])) * rstd[:, None]
        g = dy.float() * (1 if weight is None else weight.float())
        m1 = 0 if rms else g.mean(-1, keepdim=True)
        dx = rstd[:, None] * (g - m1 - xh * (g * xh).mean(-1, keepdim=True))
        if dsum is not None:
            dx = dx + dsum.float()
        dw = (dy.float() * xh).sum(0) if need_dw else None
        db = dy.float().sum(0) if need_db else None
        branch = None
        if branch_dtype is not None and branch_dtype != x.dtype:
            branch = dx.to(x.dtype).to(branch_dtype)
        return [dx.to(x.dtype), dw, db, branch]
