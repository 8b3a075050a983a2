"""Attention variants against a brute-force reference built from their documented definitions."""

from __future__ import annotations

import math

import pytest
import torch

from vitpose_core import build_model
from vitpose_core.models.attention import ATTENTION_TYPES, Attention


def reference_attention(attn: Attention, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Dense masked attention: token i may see token j iff the definition in attention.py says so."""
    batch, n, c = x.shape
    grid_h, grid_w = grid
    k, shift = attn.window_size, attn.shift_size
    q, key, v = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    rows = torch.arange(n) // grid_w
    cols = torch.arange(n) % grid_w
    if attn.attn_type == "full":
        allowed = torch.ones(n, n, dtype=torch.bool)
    else:
        # window id of each token in the (cyclically shifted) padded grid, and its Swin region
        padded_h, padded_w = math.ceil(grid_h / k) * k, math.ceil(grid_w / k) * k
        r, s = (rows - shift) % padded_h, (cols - shift) % padded_w
        window = (r // k) * (padded_w // k) + s // k

        def band(pos, size):  # Swin's three bands on the rolled grid
            return torch.where(pos < size - k, 0, torch.where(pos < size - shift, 1, 2))

        region = band(r, padded_h) * 3 + band(s, padded_w) if shift else torch.zeros(n, dtype=torch.long)
        allowed = (window[:, None] == window[None, :]) & (region[:, None] == region[None, :])
    scores = (q @ key.transpose(-2, -1)) / math.sqrt(attn.head_dim)
    scores = scores.masked_fill(~allowed, float("-inf"))
    values = v
    if attn.attn_type == "pooling_window":
        # pooled tokens: mean of keys/values over each k x k cell of the unpadded grid
        cell = (rows // k) * math.ceil(grid_w / k) + cols // k
        num_cells = int(cell.max()) + 1
        one_hot = torch.nn.functional.one_hot(cell, num_cells).float()  # (N, P)
        weights = one_hot / one_hot.sum(0, keepdim=True)
        pooled_k = torch.einsum("bhnd,np->bhpd", key, weights)
        pooled_v = torch.einsum("bhnd,np->bhpd", v, weights)
        scores = torch.cat([scores, (q @ pooled_k.transpose(-2, -1)) / math.sqrt(attn.head_dim)], dim=-1)
        values = torch.cat([v, pooled_v], dim=-2)
    out = scores.softmax(-1) @ values
    return attn.proj(out.transpose(1, 2).reshape(batch, n, c))


CASES = [
    ("full", False, 8, (16, 12)),
    ("window", False, 4, (16, 12)),  # no padding
    ("window", False, 5, (16, 12)),  # padding on both axes
    ("shifted_window", True, 4, (16, 12)),
    ("shifted_window", True, 5, (13, 11)),  # shift and padding together
    ("shifted_window", False, 4, (16, 12)),  # even blocks do not shift
    ("pooling_window", False, 4, (16, 12)),
    ("pooling_window", False, 5, (13, 11)),
]


@pytest.mark.parametrize(("attn_type", "shift", "window", "grid"), CASES)
def test_attention_matches_reference_definition(attn_type, shift, window, grid):
    torch.manual_seed(0)
    attn = Attention(32, 4, attn_type=attn_type, window_size=window, shift=shift).eval()
    x = torch.randn(2, grid[0] * grid[1], 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, grid), reference_attention(attn, x, grid), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("attn_type", "shift", "window", "grid"), CASES)
def test_bf16_attention_matches_reference_definition(attn_type, shift, window, grid):
    """bf16 on the CPU takes the explicit-softmax kernel (short sequences); it computes the same function."""
    torch.manual_seed(0)
    attn = Attention(64, 4, attn_type=attn_type, window_size=window, shift=shift).eval()
    x = torch.randn(2, grid[0] * grid[1], 64)
    with torch.no_grad():
        expected = reference_attention(attn, x, grid)
        actual = attn.to(torch.bfloat16)(x.to(torch.bfloat16), grid).float()
    torch.testing.assert_close(actual, expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("num_tokens", [48, 600])  # explicit kernel below the threshold, fused above it
def test_kernel_choice_computes_the_same_function_with_gradients(num_tokens):
    from vitpose_core.models.attention import EXPLICIT_ATTENTION_MAX_TOKENS, scaled_dot_product_attention

    assert (num_tokens <= EXPLICIT_ATTENTION_MAX_TOKENS) == (num_tokens == 48)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, num_tokens, 16, requires_grad=True) for _ in range(3))
    mask = torch.rand(num_tokens, num_tokens) > 0.3
    mask |= torch.eye(num_tokens, dtype=torch.bool)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    expected.square().sum().backward()
    expected_grads = [t.grad.clone() for t in (q, k, v)]
    low = [t.detach().to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in bf16 training
        actual = scaled_dot_product_attention(*low, mask)
    actual.float().square().sum().backward()
    torch.testing.assert_close(actual.float(), expected, atol=3e-2, rtol=3e-2)
    for grad, ref in zip((t.grad.float() for t in low), expected_grads, strict=True):
        assert (grad - ref).norm() / ref.norm() < 2e-2


def test_window_attention_is_local():
    """Perturbing a token changes only the outputs of tokens in its own window."""
    torch.manual_seed(0)
    attn = Attention(16, 2, attn_type="window", window_size=4).eval()
    x = torch.randn(1, 8 * 8, 16)
    y = x.clone()
    y[0, 0] += 1.0  # token (0, 0): window rows 0-3, cols 0-3
    with torch.no_grad():
        changed = (attn(x, (8, 8)) - attn(y, (8, 8))).abs().amax(-1)[0].reshape(8, 8) > 1e-6
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:4, :4] = True
    assert torch.equal(changed, expected)


def test_window_covering_whole_grid_equals_full_attention():
    torch.manual_seed(0)
    full = Attention(32, 4, attn_type="full")
    window = Attention(32, 4, attn_type="window", window_size=16)
    window.load_state_dict(full.state_dict())
    x = torch.randn(2, 16 * 12, 32)
    with torch.no_grad():  # 16x12 grid, 16x16 window: the padding is masked, so this is full attention
        torch.testing.assert_close(window(x, (16, 12)), full(x, (16, 12)), atol=1e-5, rtol=1e-4)


def test_padding_queries_never_produce_nan_gradients():
    attn = Attention(16, 2, attn_type="shifted_window", window_size=5, shift=True)
    x = torch.randn(1, 13 * 11, 16, requires_grad=True)
    attn(x, (13, 11)).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("attn_type", ATTENTION_TYPES)
@pytest.mark.parametrize("img_size", [(256, 192), (384, 288)])
def test_every_attention_type_trains(attn_type, img_size):
    """A few AdamW steps on one tiny batch lower the loss, at 256x192 and 384x288."""
    torch.manual_seed(0)
    model = build_model("vitpose-tiny", img_size=img_size, attention=attn_type, window_size=4, depth=2).train()
    images = torch.randn(2, 3, *img_size)
    targets = torch.rand(2, 17, img_size[0] // 4, img_size[1] // 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = (model(images) - targets).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
