"""Fused exit gate: (spatial mean-pool) -> linear exit head -> softmax confidence -> threshold.

``exit_gate(h, weight, bias=None, *, criterion="maxprob", threshold=1.0, gate=None)``
returns ``(logits, score, exit_mask)``:

* ``h``: ``[N, D]``, or ``[N, C, *spatial]`` (any number of spatial dims), mean-pooled over the
  spatial dims inside the kernel (then ``D = C``). Any strides: a CLS-token view ``h[:, 0]``, a
  transposed or sliced view, channels_last. The spatial dims are collapsed into one (size ``S``,
  one stride) whenever their strides allow it -- contiguous NC(*spatial) and channels_last always do;
  for the rare layout that does not (e.g. a view that slices *inside* the spatial dims), the host
  wrapper falls back to ``h.contiguous()`` for that call only.
* ``weight``: ``[K, D]`` (``nn.Linear`` layout), ``bias``: ``[K]`` or ``None``. ``weight=None`` means
  ``h`` already holds logits (``K = D``); the linear layer is the identity and ``bias`` must be
  ``None``.
* ``logits``: fp32 ``[N, K]``. ``score``: fp32 ``[N]`` in [0, 1], higher = more confident:

  ============ =====================================================================
  ``maxprob``  top-1 softmax probability
  ``margin``   top-1 minus top-2 probability (a tied maximum gives margin 0)
  ``entropy``  ``1 - H(p) / log(K)``
  ``learned``  ``sigmoid(g0*maxprob + g1*margin + g2*entropy + g3)``; ``gate`` = 4 floats
  ============ =====================================================================

  ``gate`` is required for ``learned`` and rejected (``ValueError``) for the other criteria, so a
  gate can never be silently ignored.
* ``exit_mask``: bool ``[N]``, ``score >= threshold``. A row with any non-finite logit (NaN/Inf in
  ``h``, the weight or the bias) gets ``score = NaN`` and never exits.

Inputs may be fp32/fp16/bf16 (``h`` and ``weight`` may differ); everything is converted to fp32 right
after loading (the Triton interpreter computes bf16 arithmetic wrongly) and accumulated in fp32. The
fp32 ``tl.dot`` uses ``input_precision="ieee"`` so results match the fp32 torch reference to fp32
rounding (TF32 would cost ~1e-3 relative error). One exception, exact too: 2D fp16 ``h`` with an fp16
weight feeds the raw fp16 tiles to a tensor-core dot (fp16 products are exact in fp32 accumulation).

Dispatch (:mod:`adaexit.kernels._dispatch`): CUDA tensors -> the Triton kernel, CPU tensors -> the
reference :func:`exit_gate_torch` (plain, unfused torch), ``ADAEXIT_BACKEND=triton`` with
``TRITON_INTERPRET=1`` -> the Triton kernel on CPU through the interpreter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._compile import CompileSpec
from .._dispatch import count_launch, direct_call, use_triton
from .._triton import tl, triton

CRITERIA = ("maxprob", "margin", "entropy", "learned")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# =============================================================================================
# Triton kernel
# =============================================================================================
@triton.jit
def _pooled_tile(
    ptr,
    row_off,
    row_mask,
    cols,
    col_mask,
    stride_c,
    S,
    stride_s,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    RAW: tl.constexpr = False,
):
    """fp32 ``[BLOCK_R, BLOCK_C]`` tile of ``mean_s x[row, col, s]``.

    ``row_off`` are int64 element offsets of the rows; ``BLOCK_S == 1`` means no spatial extent
    (``x`` is 2D, ``S`` is ignored) and the tile is a single load, returned in the input dtype
    if ``RAW`` (for the fp16 tensor-core dot).
    """
    base = ptr + row_off[:, None] + cols[None, :] * stride_c
    m2 = row_mask[:, None] & col_mask[None, :]
    if BLOCK_S == 1:
        x = tl.load(base, mask=m2, other=0.0)
        if not RAW:
            x = x.to(tl.float32)
    else:
        offs_s = tl.arange(0, BLOCK_S)
        x = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + offs_s
            v = tl.load(
                base[:, :, None] + ss[None, None, :].to(tl.int64) * stride_s,
                mask=m2[:, :, None] & (ss < S)[None, None, :],
                other=0.0,
            ).to(tl.float32)  # convert before any arithmetic (bf16 in the interpreter)
            x += tl.sum(v, axis=2)
        x = x / S
    return x


@triton.jit
def _exit_gate_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    gate_ptr,
    scratch_ptr,
    logits_ptr,
    score_ptr,
    mask_ptr,
    N,
    D,
    K,
    S,
    stride_hn,
    stride_hd,
    stride_hs,
    stride_wk,
    stride_wd,
    criterion,
    threshold,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_SCRATCH: tl.constexpr,
    FP16_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One program owns ``BLOCK_N`` rows and streams all ``K`` classes for them.

    Pointers / strides (in elements):

    * ``h_ptr``: features ``h[n, d, s]`` at ``n*stride_hn + d*stride_hd + s*stride_hs``, ``S`` the
      collapsed spatial extent (``S == 1`` and ``BLOCK_S == 1`` for 2D ``h``).
    * ``w_ptr``: weight ``w[k, d]`` at ``k*stride_wk + d*stride_wd`` (unused if ``not HAS_WEIGHT``:
      then ``D == K`` and the pooled ``h`` *is* the logits).
    * ``b_ptr``: contiguous fp32 bias ``[K]`` (if ``HAS_BIAS``). ``gate_ptr``: contiguous fp32 ``[4]``.
    * ``scratch_ptr``: contiguous fp32 ``[N, D]``; used iff ``USE_SCRATCH`` (spatial ``h`` and more
      than one class tile): phase 1 pools this program's rows into it once, phase 2 reads the class
      tiles from it instead of re-reading (and re-pooling) the ``S``-times larger ``h``.
    * ``logits_ptr``: contiguous fp32 ``[N, K]``; ``score_ptr``: fp32 ``[N]``; ``mask_ptr``: uint8
      ``[N]`` (the bytes of the bool output).
    * ``criterion``: 0 maxprob, 1 margin, 2 entropy, 3 learned (runtime: all four are a few flops).
    * ``FP16_DOT``: 2D fp16 ``h`` and fp16 weight: the operands are exact in fp16, so the dot runs on
      tensor cores (fp16 x fp16 products are exact in the fp32 accumulator); otherwise both operands
      are converted to fp32 and the dot is an fp32 FMA dot (``input_precision="ieee"``).

    Bytes moved (the model the benchmark reports): read ``h`` once from DRAM
    (``N*D*S*h.element_size()``), the weight once per program (``ceil(N/BLOCK_N)*K*D*w.element_size()``,
    served from L2 after the first program), the bias; write ``N*K*4`` logits, ``N*4`` score,
    ``N`` mask. Spatial + multi-tile adds ``N*D*4`` scratch written once and read ``ceil(K/BLOCK_K)``
    times, all by the program that wrote it (L2/L1 resident). 2D ``h`` with several class tiles
    re-reads this program's ``BLOCK_N x D`` slab of ``h`` per class tile; the slab was just touched
    by the same program, so those re-reads hit L2, not DRAM.

    Online softmax over class tiles, per row: ``m`` = running max (= top-1 logit), ``top2``,
    ``s = sum exp(z - m)``, ``t = sum exp(z - m) * (z - m)``; tiles merge with ``alpha = exp(m_old -
    m_new)``: ``s' = alpha*s + s_tile``, ``t' = alpha*(t + s*(m_old - m_new)) + t_tile``. Then
    ``maxprob = 1/s``, ``margin = (1 - exp(top2 - m))/s``, ``H = log(s) - t/s``.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    h_row_off = rows64 * stride_hn
    x_row_off = rows64 * D  # scratch rows
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)

    # ---- phase 1 (spatial h with several class tiles): pool this program's rows once ----------
    if USE_SCRATCH:
        if HAS_WEIGHT:
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                dmask = dd < D
                x = _pooled_tile(
                    h_ptr, h_row_off, row_mask, dd, dmask, stride_hd, S, stride_hs, BLOCK_N, BLOCK_D, BLOCK_S
                )
                tl.store(scratch_ptr + x_row_off[:, None] + dd[None, :], x, mask=row_mask[:, None] & dmask[None, :])
        else:
            for d0 in range(0, D, BLOCK_K):
                dd = d0 + offs_k
                dmask = dd < D
                x = _pooled_tile(
                    h_ptr, h_row_off, row_mask, dd, dmask, stride_hd, S, stride_hs, BLOCK_N, BLOCK_K, BLOCK_S
                )
                tl.store(scratch_ptr + x_row_off[:, None] + dd[None, :], x, mask=row_mask[:, None] & dmask[None, :])
        tl.debug_barrier()  # this program's scratch writes are visible to all its threads

    # ---- phase 2: class tiles, online softmax statistics ---------------------------------------
    neg_inf = float("-inf")
    m = tl.full([BLOCK_N], neg_inf, tl.float32)
    top2 = tl.full([BLOCK_N], neg_inf, tl.float32)
    s_run = tl.zeros([BLOCK_N], dtype=tl.float32)
    t_run = tl.zeros([BLOCK_N], dtype=tl.float32)
    bad = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cls = k0 + offs_k
        kmask = cls < K
        if HAS_WEIGHT:
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                dmask = dd < D
                w = tl.load(
                    w_ptr + cls[None, :].to(tl.int64) * stride_wk + dd[:, None] * stride_wd,
                    mask=kmask[None, :] & dmask[:, None],
                    other=0.0,
                )
                if FP16_DOT:
                    x = _pooled_tile(
                        h_ptr, h_row_off, row_mask, dd, dmask, stride_hd, S, stride_hs, BLOCK_N, BLOCK_D, 1, True
                    )
                    acc = tl.dot(x, w, acc)
                else:
                    if USE_SCRATCH:
                        x = _pooled_tile(scratch_ptr, x_row_off, row_mask, dd, dmask, 1, 1, 0, BLOCK_N, BLOCK_D, 1)
                    else:
                        x = _pooled_tile(
                            h_ptr, h_row_off, row_mask, dd, dmask, stride_hd, S, stride_hs, BLOCK_N, BLOCK_D, BLOCK_S
                        )
                    acc = tl.dot(x, w.to(tl.float32), acc, input_precision="ieee")
            if HAS_BIAS:
                acc += tl.load(b_ptr + cls, mask=kmask, other=0.0)[None, :]
        else:
            if USE_SCRATCH:
                acc = _pooled_tile(scratch_ptr, x_row_off, row_mask, cls, kmask, 1, 1, 0, BLOCK_N, BLOCK_K, 1)
            else:
                acc = _pooled_tile(
                    h_ptr, h_row_off, row_mask, cls, kmask, stride_hd, S, stride_hs, BLOCK_N, BLOCK_K, BLOCK_S
                )
        valid = row_mask[:, None] & kmask[None, :]
        tl.store(logits_ptr + rows64[:, None] * K + cls[None, :], acc, mask=valid)

        # non-finite logits poison the row (score NaN, never exits)
        finite = (acc == acc) & (tl.abs(acc) < float("inf"))
        bad = tl.maximum(bad, tl.max((kmask[None, :] & ~finite).to(tl.int32), axis=1))
        z = tl.where(kmask[None, :] & finite, acc, neg_inf)

        # tile top-1 / top-2 (a maximum that occurs twice is also the top-2)
        t1 = tl.max(z, axis=1)
        is_top = z == t1[:, None]
        n_top = tl.sum(is_top.to(tl.int32), axis=1)
        t2 = tl.where(n_top > 1, t1, tl.max(tl.where(is_top, neg_inf, z), axis=1))
        top2 = tl.maximum(tl.minimum(m, t1), tl.maximum(top2, t2))

        m_new = tl.maximum(m, t1)
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)  # rows with no finite logit yet
        seen = m > neg_inf
        alpha = tl.where(seen, tl.exp(m - m_safe), 0.0)
        shift = tl.where(seen, m - m_safe, 0.0)
        live = z > neg_inf
        d = tl.where(live, z - m_safe[:, None], 0.0)
        e = tl.where(live, tl.exp(d), 0.0)
        t_run = alpha * (t_run + s_run * shift) + tl.sum(e * d, axis=1)
        s_run = alpha * s_run + tl.sum(e, axis=1)
        m = m_new

    # ---- scores and decision -----------------------------------------------------------------
    maxprob = 1.0 / s_run
    margin = (1.0 - tl.exp(top2 - m)) / s_run
    entropy = tl.log(s_run) - t_run / s_run
    ent_score = 1.0 - entropy / tl.log(K.to(tl.float32))
    maxprob = tl.minimum(tl.maximum(maxprob, 0.0), 1.0)
    margin = tl.minimum(tl.maximum(margin, 0.0), 1.0)
    ent_score = tl.minimum(tl.maximum(ent_score, 0.0), 1.0)
    g0 = tl.load(gate_ptr + 0)
    g1 = tl.load(gate_ptr + 1)
    g2 = tl.load(gate_ptr + 2)
    g3 = tl.load(gate_ptr + 3)
    learned = tl.sigmoid(g0 * maxprob + g1 * margin + g2 * ent_score + g3)
    score = tl.where(
        criterion == 0, maxprob, tl.where(criterion == 1, margin, tl.where(criterion == 2, ent_score, learned))
    )
    nan_row = (bad > 0) | (score != score)  # checked explicitly: GPU min/max drop NaNs
    score = tl.where(nan_row, float("nan"), score)
    exit_ = (score >= threshold) & ~nan_row
    tl.store(score_ptr + rows, score, mask=row_mask)
    tl.store(mask_ptr + rows, exit_.to(tl.uint8), mask=row_mask)


# =============================================================================================
# Host side
# =============================================================================================
def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _validate(h, weight, bias, criterion, gate):
    """Shape/dtype checks shared by the kernel wrapper and the reference. Returns ``(N, D, K)``."""
    if not isinstance(h, torch.Tensor) or h.dim() < 2:
        got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise ValueError(f"exit_gate: h must be [N, D] or [N, C, *spatial] (>= 2 dims), got {got}")
    if h.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"exit_gate: h must be float32/float16/bfloat16, got {h.dtype}")
    if criterion not in CRITERIA:
        raise ValueError(f"exit_gate: unknown criterion {criterion!r}; expected one of {CRITERIA}")
    N, D = h.shape[0], h.shape[1]
    if weight is None:
        if bias is not None:
            raise ValueError("exit_gate: bias given with weight=None (h already holds logits)")
        K = D
    else:
        if weight.dim() != 2 or weight.shape[1] != D:
            raise ValueError(
                f"exit_gate: weight must be [K, D] with D = h.shape[1] = {D}, got {tuple(weight.shape)}"
            )
        if weight.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"exit_gate: weight must be float32/float16/bfloat16, got {weight.dtype}")
        if weight.device != h.device:
            raise ValueError(f"exit_gate: weight is on {weight.device} but h is on {h.device}")
        K = weight.shape[0]
        if bias is not None:
            if bias.dim() != 1 or bias.shape[0] != K:
                raise ValueError(f"exit_gate: bias must be [K] with K = {K}, got {tuple(bias.shape)}")
            if bias.device != h.device:
                raise ValueError(f"exit_gate: bias is on {bias.device} but h is on {h.device}")
    if K < 2:
        raise ValueError(f"exit_gate: need K >= 2 classes for a softmax confidence, got K = {K}")
    if criterion == "learned":
        if gate is None:
            raise ValueError("exit_gate: criterion='learned' needs gate, a 4-element float tensor")
        if not isinstance(gate, torch.Tensor) or gate.numel() != 4 or gate.dim() > 1:
            got = tuple(gate.shape) if isinstance(gate, torch.Tensor) else type(gate).__name__
            raise ValueError(f"exit_gate: gate must be a 4-element tensor [4], got {got}")
        if gate.device != h.device:
            raise ValueError(f"exit_gate: gate is on {gate.device} but h is on {h.device}")
    elif gate is not None:
        raise ValueError(f"exit_gate: gate is only used by criterion='learned', not {criterion!r}")
    return N, D, K


def exit_gate_torch(h, weight, bias=None, *, criterion="maxprob", threshold=1.0, gate=None):
    """Reference: unfused torch (pool -> fp32 F.linear -> softmax statistics -> compare; maxprob without the
    softmax tensor)."""
    N, D, K = _validate(h, weight, bias, criterion, gate)
    return _gate_torch(h, weight, bias, criterion, threshold, gate, K)


def _gate_torch(h, weight, bias, criterion, threshold, gate, K):
    """:func:`exit_gate_torch` on validated arguments (the op's CPU path: the public function validated them)."""
    x = h.float()
    if x.dim() > 2:
        x = x.flatten(2).mean(dim=2)
    if weight is None:
        logits = x.contiguous()
    else:
        logits = F.linear(x, weight.float(), None if bias is None else bias.float())
    if criterion == "maxprob":  # the CPU users' path, in a few cheap ops (a CPU softmax over few classes is
        # slow): the top-1 probability is 1 / sum(exp(logits - max)), in (0, 1] (the max's own term is 1)
        score = (logits - logits.amax(dim=1, keepdim=True)).exp_().sum(dim=1).reciprocal_()
    else:
        p = torch.softmax(logits, dim=1)
        top1, idx = p.max(dim=1)
        # second largest probability; a tied maximum is masked only once, so top2 == top1 then
        top2 = p.scatter(1, idx[:, None], -1.0).max(dim=1).values
        if criterion == "margin":
            score = top1 - top2
        else:
            entropy = -(p * torch.log_softmax(logits, dim=1)).sum(dim=1)
            ent_score = 1.0 - entropy / math.log(K)
            if criterion == "entropy":
                score = ent_score
            else:
                g = gate.float().reshape(4)
                clamp = lambda t: t.clamp(0.0, 1.0)  # noqa: E731
                z = g[0] * clamp(top1) + g[1] * clamp(top1 - top2) + g[2] * clamp(ent_score) + g[3]
                score = torch.sigmoid(z)
        score = score.clamp(0.0, 1.0)
    # a row with a non-finite logit scores NaN: a NaN or +inf logit already makes it NaN, and min * 0 is NaN
    # for a -inf (or NaN) minimum, 0 otherwise (one reduction, where isfinite + all + masked_fill take four ops)
    score = score + logits.amin(dim=1) * 0
    exit_mask = score >= float(threshold)  # NaN compares False: never exits
    return logits, score.contiguous(), exit_mask


def _collapse_spatial(h):
    """``(h, S, stride_s)`` with the spatial dims of ``h`` as one ``(S, stride_s)``, or a contiguous copy."""
    if h.dim() == 2:
        return h, 1, 0
    sizes, strides = h.shape[2:], h.stride()[2:]
    dims = [(sz, st) for sz, st in zip(sizes, strides) if sz != 1]
    S = 1
    for sz in sizes:
        S *= sz
    if not dims:
        return h, 1, 0
    ok = all(dims[i][1] == dims[i + 1][1] * dims[i + 1][0] for i in range(len(dims) - 1))
    if ok:
        return h, S, dims[-1][1]
    # Documented fallback: a layout whose spatial dims do not form a single strided run.
    h = h.contiguous()
    return h, S, 1


def _blocks(N, K, S, spatial):
    """``(BLOCK_N, BLOCK_D, BLOCK_K, BLOCK_S, num_warps, num_stages)`` by heuristic.

    No autotuning (multi-config autotune needs a GPU driver). Chosen from the sm_80/sm_90 compile
    report: 8 warps with no software pipelining keep every spec at <= ~170 registers with zero
    spills (4 warps or 2-3 stages hit the 255-register cap and spill on some); a 64-class tile with
    32-wide D chunks keeps the fp32 FMA dot and the online-softmax temporaries small.
    """
    BLOCK_N = 16  # tl.dot needs >= 16 rows; 32 spills on sm_90 with a 64-class tile
    BLOCK_K = min(64, max(16, _next_pow2(K)))
    BLOCK_D = 32
    BLOCK_S = 1
    if spatial:  # [BLOCK_N, BLOCK_D, BLOCK_S] pooling tile of <= 2048 elements
        BLOCK_D = 16 if BLOCK_K > 32 else 32
        BLOCK_S = min(max(2, _next_pow2(S)), 2048 // (BLOCK_N * BLOCK_D))
    return BLOCK_N, BLOCK_D, BLOCK_K, BLOCK_S, 8, 1


def _launch(h, weight, bias, criterion, threshold, gate, N, D, K):
    dev = h.device
    logits = torch.empty((N, K), dtype=torch.float32, device=dev)
    score = torch.empty((N,), dtype=torch.float32, device=dev)
    exit_mask = torch.empty((N,), dtype=torch.bool, device=dev)
    if N == 0:
        return logits, score, exit_mask
    spatial = h.dim() > 2
    h, S, stride_s = _collapse_spatial(h)
    if spatial and S == 1:  # all spatial dims are 1: plain 2D
        spatial = False
    BLOCK_N, BLOCK_D, BLOCK_K, BLOCK_S, num_warps, num_stages = _blocks(N, K, S, spatial)
    use_scratch = spatial and K > BLOCK_K
    scratch = torch.empty((N, D) if use_scratch else (1,), dtype=torch.float32, device=dev)
    has_w = weight is not None
    fp16_dot = has_w and not spatial and h.dtype == torch.float16 and weight.dtype == torch.float16
    w = weight if has_w else logits  # dummy pointer, never read
    b = bias.float().contiguous() if bias is not None else score  # dummy pointer, never read
    g = gate.float().reshape(4).contiguous() if gate is not None else torch.zeros(4, dtype=torch.float32, device=dev)
    grid = (triton.cdiv(N, BLOCK_N),)
    count_launch("exit_gate")
    _exit_gate_kernel[grid](
        h, w, b, g, scratch, logits, score, exit_mask.view(torch.uint8),
        N, D, K, S,
        h.stride(0), h.stride(1), stride_s,
        w.stride(0) if has_w else 0, w.stride(1) if has_w else 0,
        CRITERIA.index(criterion), float(threshold),
        HAS_WEIGHT=has_w, HAS_BIAS=bias is not None, USE_SCRATCH=use_scratch, FP16_DOT=fp16_dot,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_K=BLOCK_K, BLOCK_S=BLOCK_S,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return logits, score, exit_mask


def bytes_moved(h: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None) -> int:
    """The bytes-moved model of ``exit_gate(h, weight, bias)`` (the kernel docstring's): read ``h`` once, the
    weight once (later programs hit L2) and the fp32 bias; write fp32 logits ``N*K*4``, the fp32 score ``N*4``
    and the mask ``N``. The scratch path's pooled rows stay in L2/L1 and are not counted."""
    N = h.shape[0]
    K = h.shape[1] if weight is None else weight.shape[0]
    w = 0 if weight is None else weight.numel() * weight.element_size()
    return h.numel() * h.element_size() + w + (0 if bias is None else 4 * K) + N * K * 4 + N * 4 + N


# ---------------------------------------------------------------------------------------------
# The torch op ``torch.ops.adaexit.exit_gate``: the Triton kernel and the reference behind one op.
# Autograd (logits and score, w.r.t. h, weight, bias and gate) recomputes the reference in backward: the
# gate runs in eval forwards, where nothing needs gradients; training calls it rarely, so the recompute
# costs less than keeping a second, differentiable kernel.
# ---------------------------------------------------------------------------------------------
def _exit_gate_impl(
    h: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    criterion: str,
    threshold: float,
    gate: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(h.device):
        N, D = h.shape[0], h.shape[1]
        return _launch(h, weight, bias, criterion, threshold, gate, N, D, D if weight is None else weight.shape[0])
    K = h.shape[1] if weight is None else weight.shape[0]
    logits, score, exit_mask = _gate_torch(h, weight, bias, criterion, threshold, gate, K)
    if weight is None and logits.untyped_storage().data_ptr() == h.untyped_storage().data_ptr():
        logits = logits.clone()  # weight=None on contiguous fp32 h: an op's output never aliases its input
    return logits, score, exit_mask


_exit_gate_op = torch.library.custom_op("adaexit::exit_gate", mutates_args=())(_exit_gate_impl)


@_exit_gate_op.register_fake
def _(h, weight, bias, criterion, threshold, gate):
    N = h.shape[0]
    K = h.shape[1] if weight is None else weight.shape[0]
    return (
        h.new_empty((N, K), dtype=torch.float32),
        h.new_empty((N,), dtype=torch.float32),
        h.new_empty((N,), dtype=torch.bool),
    )


def _setup_context(ctx, inputs, output):
    h, weight, bias, criterion, threshold, gate = inputs
    ctx.save_for_backward(h, weight, bias, gate)
    ctx.options = dict(criterion=criterion, threshold=threshold)


def _backward(ctx, grad_logits, grad_score, _grad_mask):
    needs = ctx.needs_input_grad[:3] + ctx.needs_input_grad[5:]  # h, weight, bias, gate
    inputs = [None if t is None else t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs)]
    h, weight, bias, gate = inputs
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    grads = {}
    if wanted:
        with torch.enable_grad():
            logits, score, _ = exit_gate_torch(h, weight, bias, gate=gate, **ctx.options)
            outs = [(logits, grad_logits), (score, grad_score)]
            outs = [(o, g) for o, g in outs if g is not None]
            found = torch.autograd.grad([o for o, _ in outs], wanted, [g for _, g in outs], allow_unused=True)
        grads = {id(t): g for t, g in zip(wanted, found)}
    gh, gw, gb, gg = (None if t is None else grads.get(id(t)) for t in inputs)
    return gh, gw, gb, None, None, gg


_exit_gate_op.register_autograd(_backward, setup_context=_setup_context)


def exit_gate(h, weight, bias=None, *, criterion="maxprob", threshold=1.0, gate=None):
    """Fused exit gate (the op ``torch.ops.adaexit.exit_gate``); see the module docstring. Returns ``(logits
    fp32 [N, K], score fp32 [N], exit_mask bool [N])``; differentiable in ``h``, ``weight``, ``bias``, ``gate``."""
    _validate(h, weight, bias, criterion, gate)
    if direct_call(h, weight, bias, gate):
        return _exit_gate_impl(h, weight, bias, criterion, float(threshold), gate)
    return _exit_gate_op(h, weight, bias, criterion, float(threshold), gate)


# =============================================================================================
# Ahead-of-time compile report (kernels/_compile.py): representative launches
# =============================================================================================
def _spec(label, h_dtype, w_dtype, *, spatial, K, N=256, channels_last=False, has_weight=True, has_bias=True):
    S = 64 if spatial else 1  # [N, 64, 8, 8] or [N, 512]
    BLOCK_N, BLOCK_D, BLOCK_K, BLOCK_S, num_warps, num_stages = _blocks(N, K, S, spatial)
    use_scratch = spatial and K > BLOCK_K
    fp16_dot = has_weight and not spatial and h_dtype == w_dtype == "fp16"
    sig = {
        "h_ptr": f"*{h_dtype}", "w_ptr": f"*{w_dtype}", "b_ptr": "*fp32", "gate_ptr": "*fp32",
        "scratch_ptr": "*fp32", "logits_ptr": "*fp32", "score_ptr": "*fp32", "mask_ptr": "*u8",
        "N": "i32", "D": "i32", "K": "i32", "S": "i32",
        "stride_hn": "i32", "stride_hd": "i32", "stride_hs": "i32",
        "stride_wk": "i32", "stride_wd": "constexpr",
        "criterion": "i32", "threshold": "fp32",
    }  # fmt: skip
    consts = {"stride_wd": 1}
    # Triton specialises integer arguments equal to 1 as constexpr; mirror the real launches.
    if spatial and not channels_last:
        sig["stride_hs"] = "constexpr"
        consts["stride_hs"] = 1
    else:
        sig["stride_hd"] = "constexpr"
        consts["stride_hd"] = 1
    if not spatial:
        consts["stride_hs"] = 0
        sig["stride_hs"] = "constexpr"
    flags = {
        "HAS_WEIGHT": has_weight, "HAS_BIAS": has_bias, "USE_SCRATCH": use_scratch, "FP16_DOT": fp16_dot,
        "BLOCK_N": BLOCK_N, "BLOCK_D": BLOCK_D, "BLOCK_K": BLOCK_K, "BLOCK_S": BLOCK_S,
    }  # fmt: skip
    for k in flags:
        sig[k] = "constexpr"
    consts.update(flags)
    return CompileSpec(
        label=label, fn=_exit_gate_kernel, signature=sig, constexprs=consts, num_warps=num_warps, num_stages=num_stages
    )


COMPILE_SPECS = [
    _spec("exit_gate fp32 [256,512] K=10", "fp32", "fp32", spatial=False, K=10),
    _spec("exit_gate fp16 [256,512] K=10", "fp16", "fp16", spatial=False, K=10),
    _spec("exit_gate bf16 [256,512] K=1000", "bf16", "bf16", spatial=False, K=1000),
    _spec("exit_gate fp16 [256,512] K=1000", "fp16", "fp16", spatial=False, K=1000),
    _spec("exit_gate fp16 h, fp32 w [256,512] K=1000", "fp16", "fp32", spatial=False, K=1000),
    _spec("exit_gate fp32 [256,64,8,8] K=10", "fp32", "fp32", spatial=True, K=10),
    _spec("exit_gate fp16 [256,64,8,8] K=1000 scratch", "fp16", "fp16", spatial=True, K=1000),
    _spec("exit_gate bf16 channels_last [256,64,8,8] K=10", "bf16", "bf16", spatial=True, K=10, channels_last=True),
    _spec("exit_gate fp32 logits [256,1000] (weight=None)", "fp32", "fp32", spatial=False, K=1000, has_weight=False, has_bias=False),
]  # fmt: skip
