"""Self-attention over a ViT token grid: full, window, shifted window and pooling window.

ViTPose (Xu et al., 2022, arXiv 2204.12484, Sec. 4.3 / Table 5) studies how far full attention can
be replaced by cheaper local attention at high input resolution. The paper names the variants but
ships no code for them, so this module defines them precisely:

* ``full`` -- every token attends to every token (fused scaled-dot-product attention). This is the
  official ViTPose attention, numerically equal to ``softmax(q k^T / sqrt(d)) v``.
* ``window`` -- the (Hp, Wp) token grid is zero-padded on the bottom/right to multiples of k and cut
  into non-overlapping k x k windows; each token attends only to the tokens of its own window.
  Padding tokens are never attended to (masked keys), so results do not depend on the padding.
* ``shifted_window`` -- like ``window`` in even blocks; odd blocks first roll the padded grid by
  (-k//2, -k//2) (Swin, Liu et al., 2021), so information crosses window borders every other block.
  Tokens that the roll wraps around from the opposite border sit in their own region and are masked
  from the others, exactly as Swin's attention mask does; the roll is undone afterwards.
* ``pooling_window`` -- like ``window``, but every window additionally attends to a coarse summary of
  the whole map: the keys and values are average-pooled over non-overlapping k x k cells (ceil mode,
  padding not counted), giving ceil(Hp/k) * ceil(Wp/k) global tokens appended to each window's keys
  and values. Cost grows with k^2 + (Hp*Wp)/k^2 per query instead of Hp*Wp.

All four share the same parameters (one fused ``qkv`` linear with bias and one ``proj``), so a
checkpoint trained with one attention type loads into a model using another.

Which kernel computes ``softmax(q k^T / sqrt(d)) v`` is a speed choice, not a numerics one:
PyTorch's fused CPU kernel (flash attention) is tuned for long sequences, and in bf16 on short ones
(ViTPose-B's 192 tokens at 256x192, the tiny preset's 48, every 64-token window) two batched
matmuls and a softmax run 1.7-2.3x faster, inference and forward + backward
(bench/results/attention_kernels.md). So low-precision CPU attention over at most
``EXPLICIT_ATTENTION_MAX_TOKENS`` keys uses the explicit form -- what the official implementation
and transformers' "eager" attention compute -- and everything else uses
``F.scaled_dot_product_attention``. In fp32 the fused kernel is as fast or faster at every length measured.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

AttentionType = Literal["full", "window", "shifted_window", "pooling_window"]
ATTENTION_TYPES: tuple[str, ...] = ("full", "window", "shifted_window", "pooling_window")
# Below this many keys the explicit kernel is 1.7-2.3x faster in bf16 (bench/results/attention_kernels.md);
# above it the gain shrinks (1.0-1.25x at 432-972 keys) while the explicit kernel's saved (L x L)
# probabilities grow quadratically, so long sequences keep the fused kernel's linear memory.
EXPLICIT_ATTENTION_MAX_TOKENS = 512


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v over (..., L, d) tensors; a bool mask is True where allowed.

    Picks the faster kernel for the case (see the module docstring); both compute the same function.
    """
    explicit = (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
                and k.shape[-2] <= EXPLICIT_ATTENTION_MAX_TOKENS)
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return _explicit_attention(q, k, v, mask)


# Kept out of torch.compile graphs: inductor's generated bf16 softmax kernel took as long as the two
# matmuls together (ViTPose-B, 192 tokens), halving the compiled model's speed; eager aten is fast.
@torch.compiler.disable
def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # Autocast would run the softmax in fp32 and cast back, which costs more than the matmuls here;
    # the CPU softmax kernel already accumulates bf16 inputs in fp32.
    with torch.autocast("cpu", enabled=False):
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (..., Lq, Lk)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return logits.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head self-attention on tokens laid out row-major on a (Hp, Wp) grid.

    Args:
        dim: token width C.
        num_heads: number of heads; C must be divisible by it.
        qkv_bias: bias on the fused qkv projection (official ViTPose: True).
        attn_type: one of ``ATTENTION_TYPES``.
        window_size: k, the window side for the window variants.
        shift: for ``shifted_window``, whether this block rolls the grid (odd blocks do).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_type: AttentionType = "full",
        window_size: int = 8,
        shift: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if attn_type not in ATTENTION_TYPES:
            raise ValueError(f"unknown attention type {attn_type!r}; choose one of {ATTENTION_TYPES}")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_type = attn_type
        self.window_size = window_size
        self.shift_size = window_size // 2 if (attn_type == "shifted_window" and shift) else 0
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self._mask_cache: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int], num_extra_tokens: int = 0) -> torch.Tensor:
        """x: (B, N, C) with N = Hp * Wp + num_extra_tokens (extra tokens, if any, come last)."""
        batch, num_tokens, channels = x.shape
        qkv = self.qkv(x)
        if self.attn_type == "full":
            out = self._full_attention(qkv)
        else:
            if num_extra_tokens:
                raise ValueError("extra (knowledge) tokens are only supported with full attention")
            out = self._window_attention(qkv, grid_size)
        return self.proj(out)

    def _split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # (..., L, 3C) -> 3 x (..., heads, L, d)
        *lead, length, _ = qkv.shape
        qkv = qkv.reshape(*lead, length, 3, self.num_heads, self.head_dim)
        qkv = qkv.movedim(-3, 0).transpose(-3, -2)
        return qkv.unbind(0)

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        # (..., heads, L, d) -> (..., L, C)
        x = x.transpose(-3, -2)
        return x.reshape(*x.shape[:-2], self.num_heads * self.head_dim)

    def _full_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split_heads(qkv)
        return self._merge_heads(scaled_dot_product_attention(q, k, v))

    def _window_attention(self, qkv: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        batch, num_tokens, width = qkv.shape
        grid_h, grid_w = grid_size
        k = self.window_size
        pad_h, pad_w = (-grid_h) % k, (-grid_w) % k
        padded_h, padded_w = grid_h + pad_h, grid_w + pad_w
        rows, cols = padded_h // k, padded_w // k

        grid = qkv.reshape(batch, grid_h, grid_w, width)  # (B, N, 3C) -> (B, Hp, Wp, 3C)
        pooled_k = pooled_v = None
        if self.attn_type == "pooling_window":
            pooled_k, pooled_v = self._pooled_keys_values(grid, k)
        if pad_h or pad_w:
            grid = F.pad(grid, (0, 0, 0, pad_w, 0, pad_h))
        if self.shift_size:
            grid = torch.roll(grid, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))

        # (B, rows*k, cols*k, 3C) -> (B, rows*cols, k*k, 3C): windows in row-major order
        windows = grid.reshape(batch, rows, k, cols, k, width).permute(0, 1, 3, 2, 4, 5)
        windows = windows.reshape(batch, rows * cols, k * k, width)
        q, key, value = self._split_heads(windows)  # each (B, nW, heads, k*k, d)

        mask = self._window_mask(grid_h, grid_w, qkv.device)  # (nW, 1, k*k, k*k) or None
        if pooled_k is not None:
            # every window also sees the P pooled tokens: (B, heads, P, d) -> (B, nW, heads, P, d)
            num_windows = rows * cols
            key = torch.cat([key, pooled_k.unsqueeze(1).expand(-1, num_windows, -1, -1, -1)], dim=-2)
            value = torch.cat([value, pooled_v.unsqueeze(1).expand(-1, num_windows, -1, -1, -1)], dim=-2)
            if mask is not None:
                mask = F.pad(mask, (0, pooled_k.shape[-2]), value=True)
        out = scaled_dot_product_attention(q, key, value, mask)
        out = self._merge_heads(out)  # (B, nW, k*k, C)

        channels = out.shape[-1]
        # (B, rows*cols, k*k, C) -> (B, rows*k, cols*k, C)
        out = out.reshape(batch, rows, cols, k, k, channels).permute(0, 1, 3, 2, 4, 5)
        out = out.reshape(batch, padded_h, padded_w, channels)
        if self.shift_size:
            out = torch.roll(out, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        return out[:, :grid_h, :grid_w].reshape(batch, num_tokens, channels)

    def _pooled_keys_values(self, grid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Average-pool keys and values over k x k cells of the unpadded grid -> (B, heads, P, d) each."""
        batch, grid_h, grid_w, width = grid.shape
        kv = grid[..., width // 3 :].permute(0, 3, 1, 2)  # (B, Hp, Wp, 3C) -> (B, 2C, Hp, Wp)
        # ceil_mode keeps the partial cells at the border; count_include_pad=False averages only real tokens
        pooled = F.avg_pool2d(kv, kernel_size=k, stride=k, ceil_mode=True, count_include_pad=False)
        pooled = pooled.flatten(2).transpose(1, 2)  # (B, 2C, ph, pw) -> (B, P, 2C)
        pooled = pooled.reshape(batch, -1, 2, self.num_heads, self.head_dim)
        pooled = pooled.permute(2, 0, 3, 1, 4)  # (2, B, heads, P, d)
        return pooled[0], pooled[1]

    def _window_mask(self, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor | None:
        """Boolean mask (nW, 1, k*k, k*k), True where a query may attend to a key; None if all allowed.

        Keys are disallowed when they are padding, or (shifted windows) when they belong to another
        region of the rolled grid. A query always sees itself, so padding queries never get an
        all-masked row (which would give NaNs that poison the backward pass).
        """
        k, shift = self.window_size, self.shift_size
        pad_h, pad_w = (-grid_h) % k, (-grid_w) % k
        if not (pad_h or pad_w or shift):
            return None
        cache_key = (grid_h, grid_w, str(device))
        cached = self._mask_cache.get(cache_key)
        if cached is not None:
            return cached
        padded_h, padded_w = grid_h + pad_h, grid_w + pad_w
        valid = torch.zeros(padded_h, padded_w, dtype=torch.bool, device=device)
        valid[:grid_h, :grid_w] = True
        region = torch.zeros(padded_h, padded_w, dtype=torch.long, device=device)
        if shift:
            # Swin's three bands per axis on the rolled grid: [0, -k), [-k, -shift), [-shift, end)
            bands = (slice(0, -k), slice(-k, -shift), slice(-shift, None))
            label = 0
            for band_h in bands:
                for band_w in bands:
                    region[band_h, band_w] = label
                    label += 1
            valid = torch.roll(valid, shifts=(-shift, -shift), dims=(0, 1))
        rows, cols = padded_h // k, padded_w // k

        def to_windows(t: torch.Tensor) -> torch.Tensor:
            # (rows*k, cols*k) -> (nW, k*k)
            return t.reshape(rows, k, cols, k).permute(0, 2, 1, 3).reshape(rows * cols, k * k)

        valid_w, region_w = to_windows(valid), to_windows(region)
        allowed = valid_w[:, None, :] & (region_w[:, :, None] == region_w[:, None, :])
        allowed |= torch.eye(k * k, dtype=torch.bool, device=device)
        mask = allowed.unsqueeze(1)  # (nW, 1, L, L): broadcast over heads
        self._mask_cache[cache_key] = mask
        return mask
