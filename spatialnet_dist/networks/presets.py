"""Model presets: the encoder's size and the width of the text heads, one dataclass instance per name.

`model.preset` picks one; `model.image_size` and `model.activation` override its defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from spatialnet_dist.errors import UserError

STEMS = ("patch", "conv")  # model.stem: how images become tokens (networks/encoder.py)
POOLS = ("token", "avg")  # model.global_pool: what the pooled (B, D) vector is (networks/encoder.py)


@dataclass(frozen=True)
class Preset:
    name: str
    # encoder: a timm VisionTransformer
    image_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    activation: str  # FFN activation: gelu | relu
    # text heads: caption decoder, question encoder and fusion share one width
    text_dim: int
    text_heads: int
    decoder_depth: int  # caption decoder layers
    question_depth: int  # question encoder layers (vqa)
    fusion_depth: int  # question-to-image cross-attention layers (vqa)
    head_dropout: float
    # Activation checkpointing trades one extra forward for not storing every block's activations;
    # on for the presets whose activations would not fit an accelerator otherwise.
    grad_checkpointing: bool
    # timm weights whose architecture matches this encoder exactly ("" = none published):
    # loaded by `model.pretrained: hub`.
    hub_name: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        # CPU tests and the demo: seconds per step on a laptop core.
        Preset(
            "tiny", image_size=128, patch_size=16, embed_dim=192, depth=4, num_heads=3, mlp_ratio=4.0,
            activation="gelu", text_dim=128, text_heads=4, decoder_depth=2, question_depth=1, fusion_depth=1,
            head_dropout=0.0, grad_checkpointing=False, hub_name="",
        ),
        # ViT-S/16.
        Preset(
            "small", image_size=256, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
            activation="gelu", text_dim=256, text_heads=4, decoder_depth=3, question_depth=2, fusion_depth=1,
            head_dropout=0.1, grad_checkpointing=False, hub_name="vit_small_patch16_224.augreg_in21k_ft_in1k",
        ),
        # The seed's encoder: 12 layers, 8 heads, patch 16, 256 px, ReLU FFN (its Eq. 5); ~86M parameters.
        # 8 heads and ReLU differ from every published ViT-B, so no hub weights match it: it trains from
        # scratch. `base` is the same size with timm's ViT-B/16 layout, for pretrained weights.
        Preset(
            "paper", image_size=256, patch_size=16, embed_dim=768, depth=12, num_heads=8, mlp_ratio=4.0,
            activation="relu", text_dim=512, text_heads=8, decoder_depth=4, question_depth=2, fusion_depth=2,
            head_dropout=0.1, grad_checkpointing=False, hub_name="",
        ),
        # timm's ViT-B/16 (vit_base_patch16_224: 12 heads, GELU) at 256 px, for transfer learning: published
        # ImageNet and remote-sensing ViT-B/16 weights load as they are (`model.pretrained: FILE` or hub),
        # pos_embed resampled from their grid. The text heads are the paper preset's.
        Preset(
            "base", image_size=256, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
            activation="gelu", text_dim=512, text_heads=8, decoder_depth=4, question_depth=2, fusion_depth=2,
            head_dropout=0.1, grad_checkpointing=False, hub_name="vit_base_patch16_224.augreg2_in21k_ft_in1k",
        ),
        # ViT-L/16, ~300M parameters.
        Preset(
            "large", image_size=256, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
            activation="gelu", text_dim=768, text_heads=12, decoder_depth=6, question_depth=3, fusion_depth=2,
            head_dropout=0.1, grad_checkpointing=True, hub_name="vit_large_patch16_224.augreg_in21k_ft_in1k",
        ),
        # ViT-g widths (1408 x 40, FFN 6144) with patch 16: ~1.0B encoder parameters, the reason ZeRO-3 exists.
        Preset(
            "giant", image_size=256, patch_size=16, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11,
            activation="gelu", text_dim=1024, text_heads=16, decoder_depth=6, question_depth=4, fusion_depth=2,
            head_dropout=0.1, grad_checkpointing=True, hub_name="",
        ),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r} (expected one of {', '.join(PRESETS)})")
    return PRESETS[name]
