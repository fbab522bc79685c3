"""Pure-torch stand-ins for the three ``fla`` functions megatron-core's Gated DeltaNet calls.

Support for the demo and the tests, not the exporter: bound into megatron's GDN modules only
inside :func:`gdn_torch_kernels`, and only where fla is not installed. Details: docs/cpu_models.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

# megatron-core modules that bind the fla names at import time.
_GDN_MODULES = (
    "megatron.core.ssm.gated_delta_net.common",
    "megatron.core.ssm.gated_delta_net.gdn",
    "megatron.core.ssm.gated_delta_net",
)


# --------------------------------------------------------------------------------------------
# fla.modules.convolution.causal_conv1d
# --------------------------------------------------------------------------------------------
def _segments(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int):
    """(batch index, start, end) of each sequence: rows of a batch, or packed ``cu_seqlens``."""
    if cu_seqlens is None:
        return [(b, 0, seq_len) for b in range(batch)], False
    if batch != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (packed sequences), got {batch}")
    bounds = [int(v) for v in cu_seqlens.tolist()]
    return [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)], True


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    activation: str | None = None,
    backend: str | None = None,
    cu_seqlens: torch.Tensor | None = None,
    **unused,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise causal 1-D convolution, fla's signature.

    Args:
        x: ``[B, T, D]`` input (``B == 1`` with ``cu_seqlens`` for packed sequences).
        weight: ``[D, W]`` per-channel kernel (``None``: identity, as in fla).
        bias: ``[D]`` or None.
        residual: added to the output (after the activation), as in fla.
        initial_state: ``[N, D, W]`` previous inputs per sequence (the last ``W - 1`` columns
            are used), or None for zeros.
        output_final_state: also return the last ``W`` inputs of each sequence ``[N, D, W]``.
        activation: None, ``"silu"`` or ``"swish"``.

    Returns:
        ``(y [B, T, D], final_state or None)``.
    """
    del backend, unused
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    batch, seq_len, dim = x.shape
    if weight is None:
        y = x if activation is None else F.silu(x)
        return (y + residual if residual is not None else y), None
    width = weight.shape[-1]
    kernel = weight.reshape(dim, 1, width)
    segments, packed = _segments(cu_seqlens, batch, seq_len)
    outputs, states = [], []
    for n, (b, start, end) in enumerate(segments):
        seq = x[b, start:end].transpose(0, 1).unsqueeze(0).to(weight.dtype)  # [1, D, t]
        if initial_state is not None:
            history = initial_state[n : n + 1, :, -(width - 1) :].to(seq) if width > 1 else seq[..., :0]
        else:
            history = seq.new_zeros(1, dim, width - 1)
        padded = torch.cat([history, seq], dim=-1)  # causal: W - 1 earlier inputs on the left
        out = F.conv1d(padded, kernel, bias, groups=dim)  # [1, D, t]
        if activation is not None:
            out = F.silu(out)
        outputs.append(out[0].transpose(0, 1))  # [t, D]
        if output_final_state:
            tail = padded[..., -width:]
            if tail.shape[-1] < width:
                tail = F.pad(tail, (width - tail.shape[-1], 0))
            states.append(tail[0])
    if packed:
        y = torch.cat(outputs, dim=0).unsqueeze(0)
    else:
        y = torch.stack(outputs, dim=0)
    y = y.to(x.dtype)
    if residual is not None:
        y = y + residual
    return y, (torch.stack(states, dim=0) if output_final_state else None)


# --------------------------------------------------------------------------------------------
# fla.modules.l2norm.l2norm
# --------------------------------------------------------------------------------------------
def l2norm(x: torch.Tensor, eps: float = 1e-6, output_dtype: torch.dtype | None = None, **unused) -> torch.Tensor:
    """``x / sqrt(sum(x**2, -1) + eps)`` over the last dimension, computed in fp32 as fla does."""
    del unused
    x32 = x.float()
    y = x32 * torch.rsqrt((x32 * x32).sum(dim=-1, keepdim=True) + eps)
    return y.to(output_dtype or x.dtype)


# --------------------------------------------------------------------------------------------
# fla.ops.gated_delta_rule.chunk_gated_delta_rule
# --------------------------------------------------------------------------------------------
def _gated_delta_rule_one(q, k, v, g, beta, scale, state, chunk_size):
    """Chunked gated delta rule for one batch of equal-length sequences, all fp32.

    q, k ``[B, H, T, K]``; v ``[B, H, T, V]``; g, beta ``[B, H, T]``; state ``[B, H, K, V]``.
    Recurrence per step t (S: K x V):  S = exp(g_t) S;  S += k_t (beta_t (v_t - S^T k_t))^T;
    o_t = S^T (scale q_t). Chunks of ``chunk_size`` steps are solved at once with the
    UT transform (a unit lower-triangular solve), then carried over chunks sequentially.
    """
    batch, heads, seq_len, k_dim = k.shape
    v_dim = v.shape[-1]
    q = q * scale
    pad = (chunk_size - seq_len % chunk_size) % chunk_size
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    n_chunks = (seq_len + pad) // chunk_size

    def chunked(t):
        return t.reshape(batch, heads, n_chunks, chunk_size, t.shape[-1])

    q, k, v = chunked(q), chunked(k), chunked(v)
    beta = beta.reshape(batch, heads, n_chunks, chunk_size)
    log_decay = g.reshape(batch, heads, n_chunks, chunk_size).cumsum(dim=-1)  # within a chunk

    k_beta = k * beta.unsqueeze(-1)
    v_beta = v * beta.unsqueeze(-1)
    future = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    # decay between positions j <= i of a chunk: exp(G_i - G_j); zero above the diagonal.
    pair_decay = (log_decay.unsqueeze(-1) - log_decay.unsqueeze(-2)).masked_fill(future, float("-inf")).exp()

    # UT transform: (I + strictly-lower(diag(beta) K K^T * decay)) X = RHS.
    system = (k_beta @ k.transpose(-1, -2)) * pair_decay  # diagonal is replaced by 1 (unitriangular)
    new_values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    decayed_k_beta = k_beta * log_decay.exp().unsqueeze(-1)
    k_cumdecay = torch.linalg.solve_triangular(system, decayed_k_beta, upper=False, unitriangular=True)

    intra = (q @ k.transpose(-1, -2)) * pair_decay  # causal within the chunk (diagonal kept)
    q_decayed = q * log_decay.exp().unsqueeze(-1)
    k_to_end = k * (log_decay[..., -1:] - log_decay).exp().unsqueeze(-1)
    chunk_decay = log_decay[..., -1].exp()[..., None, None]

    out = torch.zeros(batch, heads, n_chunks, chunk_size, v_dim, dtype=q.dtype, device=q.device)
    for i in range(n_chunks):
        v_new = new_values[:, :, i] - k_cumdecay[:, :, i] @ state
        out[:, :, i] = q_decayed[:, :, i] @ state + intra[:, :, i] @ v_new
        state = state * chunk_decay[:, :, i] + k_to_end[:, :, i].transpose(-1, -2) @ v_new
    out = out.reshape(batch, heads, n_chunks * chunk_size, v_dim)[:, :, :seq_len]
    return out, state


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    **unused,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over whole sequences, fla's signature and layout.

    Args:
        q, k: ``[B, T, Hk, K]``; v: ``[B, T, Hv, V]`` (``Hv`` a multiple of ``Hk``: grouped
            value heads, each q/k head serving ``Hv // Hk`` consecutive value heads).
        g: ``[B, T, Hv]`` log-space decay (the state is multiplied by ``exp(g)``; ``g <= 0``).
        beta: ``[B, T, Hv]`` write strength.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[N, Hv, K, V]`` (N sequences) or None for zeros.
        use_qk_l2norm_in_kernel: L2-normalise q and k (last dim) first.
        cu_seqlens: cumulative lengths of packed sequences (then ``B == 1``).

    Returns:
        ``(o [B, T, Hv, V] in q's dtype, final state [N, Hv, K, V] fp32 or None)``.
    """
    if unused.get("head_first"):
        raise NotImplementedError("head_first=True layout is not supported by this stand-in")
    out_dtype = q.dtype
    batch, seq_len, k_heads, k_dim = k.shape
    v_heads = v.shape[2]
    if v_heads != k_heads:
        if v_heads % k_heads:
            raise ValueError(f"value heads ({v_heads}) must be a multiple of key heads ({k_heads})")
        q = q.repeat_interleave(v_heads // k_heads, dim=2)
        k = k.repeat_interleave(v_heads // k_heads, dim=2)
    # [B, T, H, D] -> [B, H, T, D] in fp32
    q, k, v = (t.transpose(1, 2).float().contiguous() for t in (q, k, v))
    g, beta = (t.transpose(1, 2).float().contiguous() for t in (g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    scale = k_dim**-0.5 if scale is None else scale

    segments, packed = _segments(cu_seqlens, batch, seq_len)
    if not packed:
        state = (
            torch.zeros(batch, v_heads, k_dim, v.shape[-1], dtype=torch.float32, device=q.device)
            if initial_state is None
            else initial_state.float()
        )
        out, state = _gated_delta_rule_one(q, k, v, g, beta, scale, state, chunk_size)
        final = state if output_final_state else None
        return out.transpose(1, 2).to(out_dtype).contiguous(), final
    outputs, finals = [], []
    for n, (_, start, end) in enumerate(segments):
        state = (
            torch.zeros(1, v_heads, k_dim, v.shape[-1], dtype=torch.float32, device=q.device)
            if initial_state is None
            else initial_state[n : n + 1].float()
        )
        part = slice(start, end)
        out, state = _gated_delta_rule_one(
            q[:, :, part], k[:, :, part], v[:, :, part], g[:, :, part], beta[:, :, part], scale, state, chunk_size
        )
        outputs.append(out)
        finals.append(state)
    out = torch.cat(outputs, dim=2).transpose(1, 2).to(out_dtype).contiguous()
    return out, (torch.cat(finals, dim=0) if output_final_state else None)


# --------------------------------------------------------------------------------------------
# Binding into megatron's GDN (scoped)
# --------------------------------------------------------------------------------------------
def real_fla_available() -> bool:
    """True when a real flash-linear-attention package is importable."""
    try:
        return importlib.util.find_spec("fla") is not None
    except (ImportError, ValueError):
        return False


_BINDINGS = {
    "causal_conv1d": causal_conv1d,
    "l2norm": l2norm,
    "chunk_gated_delta_rule": chunk_gated_delta_rule,
}


@contextmanager
def gdn_torch_kernels(*, force: bool = False) -> Iterator[None]:
    """Inside the block megatron's GDN modules call this module's functions and report ``HAVE_FLA``.

    Without ``force`` nothing is done where a real fla is importable. Every name is restored on
    exit. A ``GatedDeltaNet`` keeps the ``chunk_gated_delta_rule`` it was built with (its
    ``gated_delta_rule`` attribute); ``causal_conv1d`` and ``l2norm`` are looked up at each forward.
    """
    if real_fla_available() and not force:
        yield
        return
    importlib.import_module(_GDN_MODULES[-1])
    saved = []
    for module_name in _GDN_MODULES:
        module = sys.modules[module_name]
        replacements = {name: function for name, function in _BINDINGS.items() if hasattr(module, name)}
        if hasattr(module, "HAVE_FLA"):
            replacements["HAVE_FLA"] = True
        for name, value in replacements.items():
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, previous in reversed(saved):
            setattr(module, name, previous)


def torch_kernels_in_megatron():
    """:func:`gdn_torch_kernels` even where the real fla is installed (to tell a kernel's rounding
    from a mapping error on a GPU machine)."""
    return gdn_torch_kernels(force=True)


def using_stand_in() -> bool:
    """True when megatron's GDN runs this module's functions (not a real fla)."""
    common = sys.modules.get(_GDN_MODULES[0])
    return common is not None and getattr(common, "chunk_gated_delta_rule", None) is chunk_gated_delta_rule
