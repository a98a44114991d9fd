"""Model presets, one dataclass instance per name: the width of the text heads and what else of a size timm does
not know. The encoder of each is the timm model registered as `spatialnet_NAME` (networks/encoder.py), which
holds its architecture; `model.image_size`, `model.patch_size` and `model.activation` override its defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from spatialnet_dist.errors import UserError

STEMS = ("patch", "conv")  # model.stem: how images become tokens (networks/encoder.py)
POOLS = ("token", "avg")  # model.global_pool: what the pooled (B, D) vector is (networks/encoder.py)


@dataclass(frozen=True)
class Preset:
    """What timm does not know of a size: its text heads, activation checkpointing and matching hub weights. The
    encoder's architecture (width, depth, heads, patch and image size, activation) is the timm model registered
    under `timm_name` (networks/encoder.py)."""

    name: str
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

    @property
    def timm_name(self) -> str:
        """The encoder's name in timm's registry."""
        return f"spatialnet_{self.name}"


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny", text_dim=128, text_heads=4, decoder_depth=2, question_depth=1, fusion_depth=1, head_dropout=0.0,
               grad_checkpointing=False, hub_name=""),
        Preset("small", text_dim=256, text_heads=4, decoder_depth=3, question_depth=2, fusion_depth=1, head_dropout=0.1,
               grad_checkpointing=False, hub_name="vit_small_patch16_224.augreg_in21k_ft_in1k"),
        Preset("paper", text_dim=512, text_heads=8, decoder_depth=4, question_depth=2, fusion_depth=2, head_dropout=0.1,
               grad_checkpointing=False, hub_name=""),
        # The paper preset's text heads.
        Preset("base", text_dim=512, text_heads=8, decoder_depth=4, question_depth=2, fusion_depth=2, head_dropout=0.1,
               grad_checkpointing=False, hub_name="vit_base_patch16_224.augreg2_in21k_ft_in1k"),
        Preset("large", text_dim=768, text_heads=12, decoder_depth=6, question_depth=3, fusion_depth=2,
               head_dropout=0.1, grad_checkpointing=True, hub_name="vit_large_patch16_224.augreg_in21k_ft_in1k"),
        Preset("giant", text_dim=1024, text_heads=16, decoder_depth=6, question_depth=4, fusion_depth=2,
               head_dropout=0.1, grad_checkpointing=True, hub_name=""),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r} (expected one of {', '.join(PRESETS)})")
    return PRESETS[name]
