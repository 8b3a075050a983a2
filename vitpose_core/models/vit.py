"""Plain Vision Transformer backbone of ViTPose.

ViTPose: Simple Vision Transformer Baselines for Human Pose Estimation (Xu et al., 2022),
https://arxiv.org/abs/2204.12484

The backbone is a non-hierarchical ViT (Dosovitskiy et al., 2021) that keeps the official ViTPose
numerics bit for bit, so official checkpoints load with unchanged parameter names:

* patch embedding: a 16x16 conv with stride 16 and padding 2 (a 16x12 token grid at 256x192);
* ``pos_embed`` of shape (1, N + 1, C) without a cls token: its first slot is *added to every patch
  token* (official code: ``x + pos_embed[:, 1:] + pos_embed[:, :1]``);
* pre-norm blocks with a fused qkv projection (with bias), LayerNorm eps 1e-6, exact GELU, and
  stochastic depth rising linearly from 0 to ``drop_path_rate``;
* a final LayerNorm (``last_norm``), then tokens reshaped row-major to (B, C, Hp, Wp).

Where the input grid differs from the grid the position embedding was built for, the embedding is
resized bicubically on the fly, so a model runs at any resolution divisible by the patch size.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath, Mlp, resample_abs_pos_embed, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitpose_core.models.attention import Attention, AttentionType


def token_grid_size(img_size: tuple[int, int], patch_size: int, padding: int) -> tuple[int, int]:
    """(H, W) of the image -> (Hp, Wp) of the token grid the padded patch conv produces."""
    return tuple((side + 2 * padding - patch_size) // patch_size + 1 for side in img_size)  # type: ignore[return-value]


class PatchEmbed(nn.Module):
    """Image (B, 3, H, W) -> tokens (B, Hp*Wp, C) with the official padded patch conv."""

    def __init__(self, patch_size: int = 16, padding: int = 2, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.padding = padding
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, padding=padding)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        grid_size = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid_size  # (B, C, Hp, Wp) -> (B, Hp*Wp, C)


class MoEMlp(nn.Module):
    """ViTPose++'s FFN: a shared part and a dataset-specific expert part (Xu et al., 2023, ViTPose++).

    fc1 (C -> D) and GELU are shared; the output channels are split: ``fc2`` (D -> C - P) is shared
    and each of the ``num_experts`` linears in ``experts`` (D -> P) serves one dataset; a token's
    output is ``cat(fc2(h), experts[e](h))`` with e its sample's expert. Parameter names and the
    split are the official ViTPose+ ones (``mlp.fc2``, ``mlp.experts.N``), so official and
    transformers ViTPose+ weights map 1:1, and ``cat(fc2, experts[e])`` along the output rows is
    the plain FFN of dataset e (what the official model_split does).
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, part_features: int) -> None:
        super().__init__()
        if not 0 < part_features < dim:
            raise ValueError(f"part_features must be in 1..{dim - 1}, got {part_features}")
        self.part_features = part_features
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim - part_features)
        self.experts = nn.ModuleList(nn.Linear(hidden_dim, part_features) for _ in range(num_experts))

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor | int | None) -> torch.Tensor:
        """x (B, N, C); expert_index: an int for the whole batch or a (B,) tensor, one per sample."""
        if expert_index is None:
            raise ValueError("a ViTPose++ (MoE) model needs a dataset index: its FFNs have one expert per dataset")
        hidden = self.act(self.fc1(x))
        shared = self.fc2(hidden)
        if isinstance(expert_index, int):
            if not 0 <= expert_index < len(self.experts):
                raise ValueError(f"dataset index {expert_index} outside the {len(self.experts)} experts")
            if not (self.training and torch.is_grad_enabled()):
                return torch.cat([shared, self.experts[expert_index](hidden)], dim=-1)
            expert_index = torch.full((x.shape[0],), expert_index, device=x.device)
        # Every expert runs on the whole batch and is masked to its samples: all experts take part
        # in every step's graph (DDP requires it) and the graph is the same for any index mix.
        selector = expert_index.to(x.device).view(-1, 1, 1)  # (B,) -> (B, 1, 1) broadcast over tokens
        expert_out = shared.new_zeros(*shared.shape[:-1], self.part_features)
        for index, expert in enumerate(self.experts):
            expert_out = expert_out + expert(hidden) * (selector == index)
        return torch.cat([shared, expert_out], dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden_dim: int,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        attn_type: AttentionType = "full",
        window_size: int = 8,
        shift: bool = False,
        num_experts: int = 0,
        part_features: int = 0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_type, window_size, shift)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp: nn.Module
        if num_experts:
            self.mlp = MoEMlp(dim, mlp_hidden_dim, num_experts, part_features)
        else:
            # timm's Mlp is fc1 -> GELU (exact, approximate="none") -> fc2, the official layout
            self.mlp = Mlp(in_features=dim, hidden_features=mlp_hidden_dim, act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int], num_extra_tokens: int = 0,
                expert_index: torch.Tensor | int | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid_size, num_extra_tokens))
        if isinstance(self.mlp, MoEMlp):
            x = x + self.drop_path(self.mlp(self.norm2(x), expert_index))
        else:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class ViT(nn.Module):
    """Plain ViT backbone: image (B, 3, H, W) -> feature map (B, C, Hp, Wp)."""

    def __init__(
        self,
        img_size: tuple[int, int] = (256, 192),
        patch_size: int = 16,
        patch_padding: int = 2,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_hidden_dim: int = 3072,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        attn_type: AttentionType = "full",
        window_size: int = 8,
        full_attention_blocks: tuple[int, ...] = (),
        grad_checkpointing: bool = False,
        num_experts: int = 0,
        part_features: int = 0,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(patch_size, patch_padding, 3, embed_dim)
        self.grid_size = token_grid_size(img_size, patch_size, patch_padding)
        num_patches = self.grid_size[0] * self.grid_size[1]
        # slot 0 is the official "cls" slot; there is no cls token, the slot is added to every patch
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        # stochastic depth rises linearly with depth (plain Python so meta-device builds work)
        drop_path_rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_hidden_dim,
                qkv_bias,
                drop_path_rates[i],
                "full" if i in full_attention_blocks else attn_type,
                window_size,
                shift=(i % 2 == 1),
                num_experts=num_experts,
                part_features=part_features,
            )
            for i in range(depth)
        )
        self.last_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.grad_checkpointing = grad_checkpointing
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def position_embedding(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """Position embedding (1, Hp*Wp, C) for a token grid, with the shared slot 0 already added."""
        pos_embed = self.pos_embed
        if tuple(grid_size) != self.grid_size:
            pos_embed = resample_abs_pos_embed(
                pos_embed, list(grid_size), list(self.grid_size), num_prefix_tokens=1, antialias=False
            )
        return pos_embed[:, 1:] + pos_embed[:, :1]

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image (B, 3, H, W) -> position-embedded tokens (B, Hp*Wp, C) and the grid (Hp, Wp)."""
        tokens, grid_size = self.patch_embed(x)
        return tokens + self.position_embedding(grid_size), grid_size

    def forward_tokens(
        self, tokens: torch.Tensor, grid_size: tuple[int, int], extra_tokens: torch.Tensor | None = None,
        expert_index: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Run the blocks and the final norm on (B, N, C) tokens.

        ``extra_tokens`` (B, E, C) -- e.g. ViTPose's knowledge token -- are appended after the patch
        tokens, take part in (full) attention, and are dropped from the output. ``expert_index``
        (an int, or one per sample) picks the dataset expert of MoE FFNs; plain FFNs ignore it.
        """
        num_extra = 0
        if extra_tokens is not None:
            num_extra = extra_tokens.shape[1]
            tokens = torch.cat([tokens, extra_tokens.to(tokens.dtype)], dim=1)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                tokens = checkpoint(block, tokens, grid_size, num_extra, expert_index, use_reentrant=False)
            else:
                tokens = block(tokens, grid_size, num_extra, expert_index)
        tokens = self.last_norm(tokens)
        return tokens[:, : tokens.shape[1] - num_extra]

    def forward(self, x: torch.Tensor, extra_tokens: torch.Tensor | None = None,
                expert_index: torch.Tensor | int | None = None) -> torch.Tensor:
        tokens, (grid_h, grid_w) = self.embed(x)
        tokens = self.forward_tokens(tokens, (grid_h, grid_w), extra_tokens, expert_index)
        batch, _, channels = tokens.shape
        # (B, Hp*Wp, C) -> (B, C, Hp, Wp), row-major as the official reshape
        return tokens.transpose(1, 2).reshape(batch, channels, grid_h, grid_w)
