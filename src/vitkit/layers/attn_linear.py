"""Linear-complexity attention: kernelised (Katharopoulos et al. 2020) and efficient attention (Shen et al. 2021)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers.attention import Attention

LINEAR_KERNELS = ("elu", "softmax")

# Added to the normaliser phi(q_i) . sum_j phi(k_j): it is a sum of positive terms, but can underflow to 0 in fp32
# when phi(q) is tiny (elu(x) + 1 -> 0 for very negative x).
_EPS = 1e-6


def _features(q: torch.Tensor, k: torch.Tensor, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The feature maps of q and k, (B, h, N, d) each: elu + 1 for both, or softmax of q over features and of k
    over tokens (efficient attention)."""
    if kernel == "elu":
        return F.elu(q) + 1, F.elu(k) + 1
    return q.softmax(dim=-1), k.softmax(dim=-2)


class LinearAttention(Attention):
    """Attention in O(N d^2) that never forms the N x N matrix.

    kernel="elu" (Katharopoulos et al. 2020, "Transformers are RNNs"): phi(x) = elu(x) + 1 and
        out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i) . sum_j phi(k_j) + eps).
    kernel="softmax" (Shen et al. 2021, "Efficient Attention: Attention with Linear Complexities"): softmax of each
        query over its d features, softmax of each key feature over the N tokens, out = rho_q(Q) (rho_k(K)^T V);
        the rows of rho_q(Q) rho_k(K)^T already sum to 1, so there is no denominator.
    Neither scales q by 1/sqrt(d) (both papers' formulas; a scale would only change the softmax kernel's
    temperature). Either way the implicit map A_ij is non-negative with rows summing to 1: the attention a query
    gives each key, so maps, rollout and relevance work (global_attention = True).

    Prefix tokens (class, distillation, registers) need no special handling: every query attends every key, so
    they attend globally and every patch attends them.

    Fast path: the (d, d) summary phi(K)^T V and the (d,) sum of phi(K) are computed once, then each query reads
    them: time O(N d^2), memory O(N d); no N x N tensor. It runs in fp32 even under bf16/fp16 autocast (sums over
    N tokens lose too much in 8 mantissa bits) and returns v's dtype. While a capture is attached the layer
    builds A explicitly (O(N^2)), hands it to the capture and computes out = A V from it, so gradients reach the
    map.

    Args:
        kernel: "elu" (Katharopoulos et al.) or "softmax" (efficient attention).
        attn_drop: must be 0: there are no attention probabilities to drop on the fast path.
        Other arguments as `vitkit.layers.Attention`.

    Raises:
        ValueError: an unknown kernel, or attn_drop > 0.
    """

    global_attention = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        kernel: str = "elu",
    ):
        if kernel not in LINEAR_KERNELS:
            raise ValueError(
                f"kernel {kernel!r} is not a linear-attention kernel; choose one of {', '.join(LINEAR_KERNELS)}"
            )
        if attn_drop:
            raise ValueError(
                f"attn_drop {attn_drop!r} cannot apply to linear attention, which never forms attention "
                "probabilities; use 0 (and proj_drop / drop_path for regularisation)"
            )
        super().__init__(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop, norm_layer)
        self.kernel = kernel

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """q, k, v (B, heads, N, d) -> (B, heads, N, d); `grid` is not needed (the layer ignores positions)."""
        capture = self.capture
        if capture is not None:
            attn = self.attention_matrix(q, k)  # (B, h, N, N)
            capture(self, attn)
            return attn @ v
        return self._linear(q, k, v)

    def attention_matrix(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The implicit map A (B, heads, Nq, Nk), non-negative, rows summing to 1 (O(Nq Nk) memory: for maps)."""
        fq, fk = _features(q, k, self.kernel)
        scores = fq @ fk.transpose(-2, -1)  # (B, h, Nq, Nk)
        if self.kernel == "elu":
            return scores / (scores.sum(dim=-1, keepdim=True) + _EPS)
        return scores

    def _linear(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dtype = v.dtype
        work = torch.promote_types(dtype, torch.float32)  # fp16/bf16 -> fp32; fp32 and fp64 stay
        with torch.autocast(q.device.type, enabled=False):
            q, k, v = q.to(work), k.to(work), v.to(work)
            fq, fk = _features(q, k, self.kernel)  # (B, h, N, d) each
            kv = fk.transpose(-2, -1) @ v  # (B, h, d, d_v)
            out = fq @ kv  # (B, h, N, d_v)
            if self.kernel == "elu":
                norm = fq @ fk.sum(dim=-2).unsqueeze(-1)  # (B, h, N, 1)
                out = out / (norm + _EPS)
        return out.to(dtype)

    def forward_queries(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Tokens (B, N, C) -> the outputs of the first `n` tokens (B, n, C), every token a key and value; equals
        `forward(x)[:, :n]` (the inherited version would use softmax attention)."""
        q, k, v = self.project_qkv(x)  # (B, h, N, d)
        return self.project_out(self._linear(q[:, :, :n], k, v))

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}"
