"""The UNI2-h architecture: a ViT-H/14 with SwiGLU blocks and 8 register tokens, 1536-d, 681,394,176 parameters.

Only the architecture is built here. Its weights are gated and are never downloaded at run time: a
backend loads them from a file the user supplies.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.layers import SwiGLUPacked

from shared.imaging import IMAGENET_MEAN, IMAGENET_STD

UNI2H_PARAMETERS = 681_394_176
UNI2H_EMBED_DIM = 1536
# UNI2-h's evaluation transform: resize to 224 px, centre crop 224 px, ImageNet mean and std. Tiles
# prepared by shared.imaging.prepare_tile are already resized and cropped to 224 px.
UNI2H_INPUT_SIZE = 224
UNI2H_MEAN = tuple(float(value) for value in IMAGENET_MEAN)
UNI2H_STD = tuple(float(value) for value in IMAGENET_STD)
UNI2H_KWARGS: dict[str, Any] = {
    "img_size": 224,
    "patch_size": 14,
    "depth": 24,
    "num_heads": 24,
    "init_values": 1e-5,
    "embed_dim": UNI2H_EMBED_DIM,
    "mlp_ratio": 2.66667 * 2,
    "num_classes": 0,
    "no_embed_class": True,
    "reg_tokens": 8,
    "dynamic_img_size": True,
}


def build_uni2h() -> torch.nn.Module:
    """Build UNI2-h with random weights (call under ``torch.device('meta')`` to count parameters for free).

    Its output is the final-norm CLS token, 1536-d, for 224 x 224 RGB input at about 0.5 µm/px.
    """
    return timm.create_model(
        "vit_giant_patch14_224",
        pretrained=False,
        mlp_layer=SwiGLUPacked,
        act_layer=torch.nn.SiLU,
        **UNI2H_KWARGS,
    )
