"""Masked autoencoder (MAE) pretraining of the ViTPose backbone.

Masked Autoencoders Are Scalable Vision Learners (He et al., 2022), https://arxiv.org/abs/2111.06377
-- written after the reference ``models_mae.py``, around this project's ``ViT`` so the pretrained
encoder is exactly the backbone ViTPose fine-tunes (same parameter names, same padded patch conv).

Encoder: embed all patches (with position), keep a random 25%, run the ViT blocks on those only.
Decoder: a light transformer sees the encoded visible tokens plus a shared learned mask token at every
masked position (with fixed 2-D sin-cos positions) and predicts each patch's pixels.
Loss: MSE on the masked patches only, against per-patch normalised pixels (``norm_pix_loss``).

Note on patches: the backbone's patch conv has padding 2, so token (i, j) sees pixels shifted by 2
from the plain 16x16 block (i, j) that ``patchify`` uses as its target; for an image side divisible
by 16 the two grids have the same size and the 2-pixel offset only makes the task slightly harder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from vitpose_core.models.vit import Block, ViT
from vitpose_core.models.vitpose import ViTPose, ViTPoseConfig

ENCODER_WEIGHTS_NAME = "encoder.safetensors"
ENCODER_CONFIG_NAME = "encoder.json"


def sincos_position_embedding(grid_size: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (1, Hp*Wp, dim): half the channels for rows, half for columns."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    grid_h, grid_w = grid_size
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega  # (Hp*Wp, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (Hp*Wp, dim/2)

    return torch.cat([encode(rows), encode(cols)], dim=1).float().unsqueeze(0)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images (B, 3, H, W) -> patches (B, N, p*p*3), N = (H/p)*(W/p), row-major, pixels (p, p, 3) per patch."""
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image {height}x{width} is not divisible by the patch size {patch_size}")
    grid_h, grid_w = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    x = torch.einsum("bchpwq->bhwpqc", x)  # (B, Hp, p, Wp, p, 3) -> (B, Hp, Wp, p, p, 3)
    return x.reshape(batch, grid_h * grid_w, patch_size * patch_size * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Patches (B, N, p*p*3) -> images (B, 3, Hp*p, Wp*p); the inverse of ``patchify``."""
    batch = patches.shape[0]
    grid_h, grid_w = grid_size
    x = patches.reshape(batch, grid_h, grid_w, patch_size, patch_size, 3)
    x = torch.einsum("bhwpqc->bchpwq", x)  # (B, Hp, Wp, p, p, 3) -> (B, 3, Hp, p, Wp, p)
    return x.reshape(batch, 3, grid_h * patch_size, grid_w * patch_size)


def random_masking(tokens: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random subset of tokens per sample, by sorting per-token noise.

    Args:
        tokens: (B, N, C) position-embedded patch tokens.
        mask_ratio: fraction of tokens to drop.

    Returns:
        visible (B, N_keep, C); mask (B, N) with 0 = kept, 1 = masked, in the original order;
        ids_restore (B, N) that puts [visible, mask tokens] back into the original order.
    """
    batch, num_tokens, channels = tokens.shape
    num_keep = max(1, int(num_tokens * (1 - mask_ratio)))
    # 1. one uniform random number per token; its rank decides whether the token survives
    noise = torch.rand(batch, num_tokens, device=tokens.device)
    # 2. ascending sort: the num_keep smallest-noise tokens are kept (a uniform random subset)
    ids_shuffle = torch.argsort(noise, dim=1)
    # 3. argsort of a permutation is its inverse: position of each original token in the shuffle
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    # 4. gather the kept tokens: (B, N, C) -> (B, N_keep, C)
    ids_keep = ids_shuffle[:, :num_keep]
    visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, channels))
    # 5. binary mask in shuffled order (0 for the first num_keep), unshuffled to the original order
    mask = torch.ones(batch, num_tokens, device=tokens.device)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return visible, mask, ids_restore


class MaskedAutoencoder(nn.Module):
    """MAE around a ``ViT`` backbone: images (B, 3, H, W) -> (loss, predicted patches (B, N, p*p*3), mask (B, N))."""

    def __init__(
        self,
        backbone: ViT,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if any(block.attn.attn_type != "full" for block in backbone.blocks):
            # window attention needs the full token grid; masked MAE encodes a ragged subset
            raise ValueError("MAE pretraining needs a full-attention backbone (attention='full')")
        self.backbone = backbone
        self.patch_size = backbone.patch_embed.patch_size
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.model_config: ViTPoseConfig | None = None  # set by build_mae; saved with the encoder
        self.decoder_embed = nn.Linear(backbone.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, 4 * decoder_dim) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * 3)
        self._init_decoder()

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)  # as models_mae.py
                nn.init.zeros_(module.bias)

    def forward_encoder(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        tokens, grid_size = self.backbone.embed(images)  # position added before masking, as in MAE
        blocks = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        if tuple(grid_size) != blocks:
            raise ValueError(f"image {tuple(images.shape[-2:])} gives a token grid {grid_size} but {blocks} pixel "
                             f"blocks; use sides divisible by {self.patch_size}")
        visible, mask, ids_restore = random_masking(tokens, self.mask_ratio)
        return self.backbone.forward_tokens(visible, grid_size), mask, ids_restore, grid_size

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        x = self.decoder_embed(latent)  # (B, N_keep, Cd)
        batch, num_keep, channels = x.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(batch, ids_restore.shape[1] - num_keep, -1)
        x = torch.cat([x, mask_tokens], dim=1)  # (B, N, Cd) in shuffled order
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, channels))  # original order
        x = x + sincos_position_embedding(grid_size, channels).to(x.device, x.dtype)
        for block in self.decoder_blocks:
            x = block(x, grid_size)
        return self.decoder_pred(self.decoder_norm(x))  # (B, N, p*p*3)

    def reconstruction_loss(self, images: torch.Tensor, predicted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over masked patches only (MAE Sec. 3)."""
        target = patchify(images, self.patch_size).float()
        if self.norm_pix_loss:
            # normalising each target patch by its own mean/var sharpens the reconstructions (Table 1d)
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = (predicted.float() - target).pow(2).mean(dim=-1)  # (B, N)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent, mask, ids_restore, grid_size = self.forward_encoder(images)
        predicted = self.forward_decoder(latent, ids_restore, grid_size)
        return self.reconstruction_loss(images, predicted, mask), predicted, mask


def build_mae(model_config: ViTPoseConfig, decoder_dim: int = 128, decoder_depth: int = 2, decoder_heads: int = 4,
              mask_ratio: float = 0.75, norm_pix_loss: bool = True) -> MaskedAutoencoder:
    """An MAE whose encoder is the backbone of the ViTPose ``model_config`` describes (forced to full attention)."""
    config = ViTPoseConfig(**{**model_config.model_dump(), "attention": "full", "full_attention_blocks": ()})
    mae = MaskedAutoencoder(ViTPose(config).backbone, decoder_dim, decoder_depth, decoder_heads, mask_ratio,
                            norm_pix_loss)
    mae.model_config = config  # travels with the exported encoder
    return mae


def save_pretrained_encoder(mae: MaskedAutoencoder, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write the encoder as ViTPose backbone weights (``encoder.safetensors``) plus ``encoder.json``."""
    out_dir = Path(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in mae.backbone.state_dict().items()}
    save_file(state, str(out_dir / ENCODER_WEIGHTS_NAME))
    record = {"grid_size": list(mae.backbone.grid_size), "metadata": metadata or {},
              "model": mae.model_config.model_dump(mode="json") if mae.model_config else None}
    (out_dir / ENCODER_CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True))
    return out_dir


def load_pretrained_encoder(model: ViTPose, path: str | Path) -> dict[str, Any]:
    """Initialise ``model.backbone`` from ``save_pretrained_encoder`` output; returns the encoder record.

    Loads strictly (a missing, unexpected or mis-shaped key is an error naming it); ``pos_embed`` is
    resized bicubically when pretraining ran at another resolution than fine-tuning.
    """
    directory = Path(path)
    weights, record_file = directory / ENCODER_WEIGHTS_NAME, directory / ENCODER_CONFIG_NAME
    if not weights.exists() or not record_file.exists():
        raise FileNotFoundError(f"no pretrained encoder at {directory} (need {ENCODER_WEIGHTS_NAME} and "
                                f"{ENCODER_CONFIG_NAME})")
    record = json.loads(record_file.read_text())
    state = load_file(str(weights))
    backbone = model.backbone
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != backbone.pos_embed.shape and pos.shape[-1] == backbone.pos_embed.shape[-1]:
        state["pos_embed"] = resample_abs_pos_embed(pos, list(backbone.grid_size), list(record["grid_size"]),
                                                    num_prefix_tokens=1, antialias=False)
    expected = backbone.state_dict()
    problems = [f"missing {k}" for k in sorted(set(expected) - set(state))]
    problems += [f"unexpected {k}" for k in sorted(set(state) - set(expected))]
    problems += [f"{k}: encoder {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if problems:
        raise ValueError(f"pretrained encoder {directory} does not fit the ViTPose backbone: " + "; ".join(problems))
    backbone.load_state_dict(state, strict=True)
    return record
