"""ViTPose heatmap decoders: feature map (B, C, Hp, Wp) -> heatmaps (B, K, 4*Hp, 4*Wp).

Both keep the official parameter names (``deconv_layers.*``, ``final_layer.*``) so official
checkpoints' ``keypoint_head.*`` keys load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClassicDecoder(nn.Module):
    """Two (ConvTranspose 4x4 stride 2, no bias -> BatchNorm -> ReLU) stages, then a 1x1 conv.

    Each transposed conv doubles the resolution, so the 1/16 feature map becomes a 1/4 heatmap.
    """

    def __init__(self, in_channels: int, num_keypoints: int, channels: int = 256, num_stages: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for stage in range(num_stages):
            layers += [
                nn.ConvTranspose2d(
                    in_channels if stage == 0 else channels, channels, kernel_size=4, stride=2, padding=1,
                    output_padding=0, bias=False,
                ),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
        self.deconv_layers = nn.Sequential(*layers)
        self.final_layer = nn.Conv2d(channels, num_keypoints, kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        # official init: small normal weights so initial heatmaps are near zero
        for module in self.modules():
            if isinstance(module, nn.ConvTranspose2d | nn.Conv2d):
                nn.init.normal_(module.weight, std=0.001)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.final_layer(self.deconv_layers(features))


class SimpleDecoder(nn.Module):
    """ViTPose's simple decoder: ReLU, bilinear x4 upsampling (align_corners=False), 3x3 conv."""

    def __init__(self, in_channels: int, num_keypoints: int, upsample: int = 4) -> None:
        super().__init__()
        self.upsample = upsample
        self.final_layer = nn.Conv2d(in_channels, num_keypoints, kernel_size=3, padding=1)
        nn.init.normal_(self.final_layer.weight, std=0.001)
        nn.init.zeros_(self.final_layer.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(F.relu(features), scale_factor=self.upsample, mode="bilinear", align_corners=False)
        return self.final_layer(x)
