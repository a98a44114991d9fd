"""The shared image encoder: a timm VisionTransformer sized by a preset, plus transfer learning.

`ViTEncoder` *is* a timm `VisionTransformer` (same parameter names), so timm checkpoints load into it
and timm's helpers (pos_embed resampling, activation checkpointing) apply unchanged. Its sizes are registered
with timm, one model per preset (`spatialnet_tiny` ... `spatialnet_giant`), and are built through timm's registry:
`timm.create_model("spatialnet_paper", in_chans=13)` once this package is imported.

`model.stem: conv` replaces the one strided patch convolution by a small convolutional stem (Xiao et al.
2021, "Early convolutions help transformers see better"): with little data a ViT from scratch lacks the
locality a stack of 3x3 convolutions gives its first layer. The rest stays a timm ViT: the same token grid,
blocks and names, so timm weights still load into everything after the patch embedding.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import timm
import torch
from timm.layers import PatchEmbed
from timm.models import adapt_input_conv, build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from spatialnet_dist.errors import UserError
from spatialnet_dist.networks.presets import POOLS, STEMS, Preset, get_preset

log = logging.getLogger(__name__)

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}
STEM_GROUPS = 8  # GroupNorm groups of each convolution of the conv stem


class ConvStemEmbed(PatchEmbed):
    """timm's PatchEmbed whose `proj` is a convolutional stem: log2(patch) 3x3 stride-2 convolutions, each
    followed by a GroupNorm of STEM_GROUPS groups and GELU, widths doubling up to the embedding width, then a
    1x1 projection (Xiao et al. 2021). The same (B, N, D) tokens on the same grid as the patch convolution.
    GroupNorm rather than the paper's BatchNorm: no running statistics, so every rank and every batch
    composition computes the same function (evaluation on any number of workers, shared encoder passes).
    On real UC Merced images (tiny, 128 px, classification alone, 150 s on 2 cores, val accuracy) the norm
    decided it: GroupNorm 0.61, BatchNorm 0.46, a channel LayerNorm 0.42, timm's patch convolution 0.46-0.48."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        patch, in_chans, dim = self.patch_size[0], self.proj.in_channels, self.proj.out_channels
        convs = patch.bit_length() - 1
        if patch != self.patch_size[1] or patch != 1 << convs or convs < 1:
            raise UserError(f"model.stem conv: the patch size {self.patch_size} must be a power of 2, >= 2")
        layers: list[nn.Module] = []
        for i in range(convs):
            width = max(2 * STEM_GROUPS, dim >> (convs - 1 - i)) // STEM_GROUPS * STEM_GROUPS  # tiny: 24, 48, 96, 192
            layers += [nn.Conv2d(in_chans, width, 3, stride=2, padding=1, bias=False), nn.GroupNorm(STEM_GROUPS, width),
                       nn.GELU()]
            in_chans = width
        self.proj = nn.Sequential(*layers, nn.Conv2d(in_chans, dim, 1))  # (B, C, H, W) -> (B, D, H/p, W/p)


class ViTEncoder(VisionTransformer):
    """A timm ViT without its classifier: images -> patch tokens and the class-token vector."""

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) -> tokens (B, N, D) normalised patch tokens, pooled (B, D): the normalised class
        token, or with global_pool "avg" the mean of `tokens`."""
        x = self.forward_features(images)  # (B, prefix + N, D), after the final norm
        return x[:, self.num_prefix_tokens :], self.forward_head(x, pre_logits=True)

    def encode_visible(self, images: torch.Tensor, keep: int, noise: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MAE's random masking (He et al. 2022, models_mae.random_masking): the blocks see only `keep` of
        each image's N patch tokens, taken after the patch embedding and position embedding, with the
        class token. Each image keeps the patches of its `keep` lowest `noise` (B, N) values; noise drawn
        from torch's RNG when None. The hidden patches' pixels are zeroed before the stem: a conv stem's
        receptive field (31 px for 16 px patches) would otherwise carry ~7 px of every masked neighbour into
        a kept token, and reconstruction becomes interpolation across borders (ConvMAE masks its convolutions
        for this reason); a patch kernel reads its own patch only, so there it changes nothing.
        -> tokens (B, keep, D) of the kept patches, in `kept` order, pooled (B, D) as `encode`'s, kept
        (B, keep) int64 patch indices (row-major on the token grid)."""
        (rows, cols), patch = self.patch_embed.dynamic_feat_size(images.shape[-2:]), self.patch_embed.patch_size
        if noise is None:
            noise = torch.rand(images.shape[0], rows * cols, device=images.device)  # (B, N)
        kept = noise.to(images.device).argsort(dim=1)[:, :keep]  # (B, K)
        shown = torch.zeros_like(noise, dtype=images.dtype, device=images.device).scatter_(1, kept, 1.0)  # (B, N)
        shown = shown.view(-1, 1, rows, 1, cols, 1).expand(-1, -1, -1, patch[0], -1, patch[1])
        images = images * shown.reshape(-1, 1, rows * patch[0], cols * patch[1])  # (B, C, H, W), hidden = 0
        x = self._pos_embed(self.patch_embed(images))  # (B, prefix + N, D)
        prefix = self.num_prefix_tokens
        visible = x[:, prefix:].gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, D)
        x = self.norm_pre(self.patch_drop(torch.cat([x[:, :prefix], visible], dim=1)))  # (B, prefix + K, D)
        x = self.norm(checkpoint_seq(self.blocks, x) if self.grad_checkpointing else self.blocks(x))
        return x[:, prefix:], self.forward_head(x, pre_logits=True), kept


# The encoder sizes, timm's way (timm/models/vision_transformer.py): each registered function's model_args are
# its architecture, VisionTransformer's defaults the rest (MLP ratio 4, GELU, qkv bias, a class token), and its
# default cfg's input_size the image size it is built for (timm passes it on as img_size). One entry per preset
# of presets.py, under its Preset.timm_name.


def _cfg(image_size: int = 256) -> dict:
    """No weights of their own (Preset.hub_name names timm's published ones that fit) and no classifier."""
    return {"input_size": (3, image_size, image_size), "fixed_input_size": True, "num_classes": 0,
            "first_conv": "patch_embed.proj", "classifier": "head"}


default_cfgs = generate_default_cfgs({  # timm's register_model reads this module's `default_cfgs`
    "spatialnet_tiny": _cfg(128),
    "spatialnet_small": _cfg(),
    "spatialnet_paper": _cfg(),
    "spatialnet_base": _cfg(),
    "spatialnet_large": _cfg(),
    "spatialnet_giant": _cfg(),
})


def _create_encoder(variant: str, pretrained: bool, **kwargs) -> ViTEncoder:
    # fc_norm off: for global_pool "avg" timm would move the final norm after the pooling; `encode` wants it on
    # the tokens, so "avg" and "token" have the same parameters and either loads the other's weights.
    return build_model_with_cfg(ViTEncoder, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **{"fc_norm": False, **kwargs})


@register_model
def spatialnet_tiny(pretrained: bool = False, **kwargs) -> ViTEncoder:
    """CPU tests and the demo: seconds per step on a laptop core."""
    model_args = dict(patch_size=16, embed_dim=192, depth=4, num_heads=3)
    return _create_encoder("spatialnet_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def spatialnet_small(pretrained: bool = False, **kwargs) -> ViTEncoder:
    """ViT-S/16."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_encoder("spatialnet_small", pretrained, **dict(model_args, **kwargs))


@register_model
def spatialnet_paper(pretrained: bool = False, **kwargs) -> ViTEncoder:
    """The seed's encoder: 12 layers, 8 heads, patch 16, 256 px, ReLU FFN (its Eq. 5); ~86M parameters.
    8 heads and ReLU differ from every published ViT-B, so no hub weights match it: it trains from scratch.
    `spatialnet_base` is the same size with timm's ViT-B/16 layout, for pretrained weights."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=8, act_layer=nn.ReLU)
    return _create_encoder("spatialnet_paper", pretrained, **dict(model_args, **kwargs))


@register_model
def spatialnet_base(pretrained: bool = False, **kwargs) -> ViTEncoder:
    """timm's ViT-B/16 (vit_base_patch16_224: 12 heads, GELU) at 256 px, for transfer learning: published
    ImageNet and remote-sensing ViT-B/16 weights load as they are (`model.pretrained: FILE` or hub),
    pos_embed resampled from their grid."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_encoder("spatialnet_base", pretrained, **dict(model_args, **kwargs))


@register_model
def spatialnet_large(pretrained: bool = False, **kwargs) -> ViTEncoder:
    """ViT-L/16, ~300M parameters."""
    model_args = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return _create_encoder("spatialnet_large", pretrained, **dict(model_args, **kwargs))


@register_model
def spatialnet_giant(pretrained: bool = False, **kwargs) -> ViTEncoder:
    """ViT-g widths (1408 x 40, FFN 6144) with patch 16: ~1.0B parameters, the reason ZeRO-3 exists."""
    model_args = dict(patch_size=16, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11)
    return _create_encoder("spatialnet_giant", pretrained, **dict(model_args, **kwargs))


@functools.cache
def meta_encoder(preset: str) -> ViTEncoder:
    """The preset's registered encoder as timm builds it by default, on the meta device (shapes, no memory), once
    per process: where the config checks, the plan and the data pipeline read its image size
    (`patch_embed.img_size`), patch size and depth (`len(blocks)`) without a second table of them. Read only."""
    with torch.device("meta"):
        return timm.create_model(get_preset(preset).timm_name)


def build_encoder(
    preset: Preset, image_size: int = 0, in_chans: int = 3, activation: str = "", drop_path: float = 0.0,
    patch_size: int = 0, stem: str = "patch", global_pool: str = "token",
) -> ViTEncoder:
    """The preset's encoder from timm's registry, without a classifier (the task heads sit on top). 0 / "" keep
    its image size / patch size / activation. global_pool "token": the class token, as every published ViT
    checkpoint was trained; "avg" pools the patch tokens after the final norm."""
    if stem not in STEMS:
        raise UserError(f"model.stem {stem!r}: expected one of {', '.join(STEMS)}")
    if global_pool not in POOLS:
        raise UserError(f"model.global_pool {global_pool!r}: expected one of {', '.join(POOLS)}")
    overrides = {"img_size": image_size, "patch_size": patch_size, "act_layer": activation and ACTIVATIONS[activation]}
    encoder = timm.create_model(
        preset.timm_name, in_chans=in_chans, global_pool=global_pool, drop_path_rate=drop_path,
        embed_layer=ConvStemEmbed if stem == "conv" else PatchEmbed, **{k: v for k, v in overrides.items() if v},
    )
    image_size, patch_size = encoder.patch_embed.img_size[0], encoder.patch_embed.patch_size[0]
    if image_size < patch_size or image_size % patch_size:
        raise UserError(f"model.image_size {image_size}: must be a multiple of the patch size {patch_size}")
    return encoder


# Parameters before the first block (timm's names): patch embedding, position/class/register tokens.
_STEM = ("patch_embed.", "pos_embed", "cls_token", "reg_token", "norm_pre.")


def layer_id(name: str, depth: int) -> int:
    """Depth of an encoder parameter: 0 the stem, i + 1 block i, depth + 1 what follows (the final norm)."""
    if name.startswith(_STEM):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def freeze_blocks(encoder: ViTEncoder, n: int) -> None:
    """Fine-tuning: the stem and the first `n` blocks stop training (n = depth: all but the final norm)."""
    depth = len(encoder.blocks)
    if not 0 <= n <= depth:
        raise ValueError(f"cannot freeze {n} of {depth} blocks")
    for name, p in encoder.named_parameters():
        if n and layer_id(name, depth) <= n:
            p.requires_grad_(False)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A .pth/.pt (torch.save) or .safetensors file -> state dict. Errors name the file."""
    p = Path(path)
    if p.is_dir():  # callers hand this project's checkpoints and bundles over as `state` (load_pretrained)
        raise UserError(f"model.pretrained: {path}: a directory, expected a weights file")
    if not p.is_file():
        raise UserError(f"model.pretrained: {path}: file not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        if p.suffix in (".pth", ".pt", ".bin"):
            state = torch.load(p, map_location="cpu", weights_only=True)
        else:
            raise UserError(f"model.pretrained: {path}: expected a .pth, .pt or .safetensors file")
    except UserError:
        raise
    except Exception as e:  # a truncated or foreign file: say which, not a pickle traceback
        raise UserError(f"model.pretrained: {path}: cannot read weights ({e.__class__.__name__})") from None
    if not isinstance(state, dict):
        raise UserError(f"model.pretrained: {path}: holds a {type(state).__name__}, not a state dict")
    return state


def hub_state_dict(preset: Preset) -> dict[str, torch.Tensor]:
    """timm's published weights for the preset's architecture (needs the Hugging Face hub)."""
    if not preset.hub_name:
        raise UserError(
            f"model.pretrained=hub: preset {preset.name} matches no published timm weights; pass a local weights file"
        )
    import timm

    try:
        return timm.create_model(preset.hub_name, pretrained=True, num_classes=0).state_dict()
    except OSError:  # offline mode, no network, missing file on the hub: all OSErrors in huggingface_hub
        raise UserError(
            f"model.pretrained=hub: the Hugging Face hub is unreachable for {preset.hub_name}; "
            "pass a local .pth/.safetensors file instead"
        ) from None


def _input_bands(state: dict[str, torch.Tensor]) -> int | None:
    """The bands an encoder state dict reads: the input width of its patch kernel or first stem convolution."""
    kernel = state.get("patch_embed.proj.weight", state.get("patch_embed.proj.0.weight"))  # (D or width, C, k, k)
    return None if kernel is None else kernel.shape[1]


def load_pretrained(encoder: ViTEncoder, source: str, preset: Preset,
                    state: dict[str, torch.Tensor] | None = None) -> tuple[list[str], list[str]]:
    """Load encoder weights from `source` -> (missing keys, unexpected keys): "hub" or a file path, read here,
    or a pretraining of this project (a checkpoint or bundle) whose model weights `state` the caller read
    (checkpoint_weights.pretraining_weights; networks/ reads no checkpoints).

    Accepts a timm ViT state dict (also nested under "model"/"state_dict") or a SpatialNet-ViT one
    (its "encoder." keys; the heads are left out, they start fresh). pos_embed and the patch kernel are
    resampled to this encoder's grid by timm. Weights from elsewhere have their input conv adapted when
    the band count differs (RGB weights for multispectral images); this project's own pretraining must
    have this encoder's bands, else a UserError names both. A stem of the other kind (patch vs conv) is
    left out under either: it cannot seed this one, and blocks pretrained behind one stem still serve
    behind the other (a patch-stem MAE pretraining, a conv-stem fine-tuning on little data).
    """
    own_pretraining = state is not None
    if state is None:
        state = hub_state_dict(preset) if source == "hub" else read_state_dict(source)
    state = state.get("model", state.get("state_dict", state))
    if any(k.startswith("encoder.") for k in state):  # a SpatialNet-ViT checkpoint: keep its encoder
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    own = encoder.state_dict()
    bands, own_bands = _input_bands(state), _input_bands(own)
    if own_pretraining and bands is not None and bands != own_bands:
        raise UserError(f"model.pretrained: {source}: pretrained on {bands} bands, but model.in_chans is {own_bands}: "
                        f"fine-tune on the {bands} bands it was pretrained on")
    own_stem = isinstance(encoder.patch_embed, ConvStemEmbed)
    if own_stem != any(k.startswith("patch_embed.proj.0.") for k in state):
        # a patch kernel cannot seed a convolutional stem (nor the reverse): the stem starts fresh, the rest loads
        log.warning("model.pretrained %s: its %s stem cannot seed this model's %s stem (model.stem): the stem starts "
                    "fresh, the rest loads", source, "patch" if own_stem else "conv", "conv" if own_stem else "patch")
        state = {k: v for k, v in state.items() if not k.startswith("patch_embed.")}
    state = checkpoint_filter_fn(state, encoder)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}  # an ImageNet classifier is no encoder part
    conv = "patch_embed.proj.weight"
    if conv in state and state[conv].shape[1] != own[conv].shape[1]:
        state[conv] = adapt_input_conv(own[conv].shape[1], state[conv])
    for k, v in state.items():
        if k in own and v.shape != own[k].shape:
            raise UserError(
                f"model.pretrained: {source}: {k} has shape {tuple(v.shape)} but preset {preset.name} "
                f"expects {tuple(own[k].shape)}"
            )
    if not set(state) & set(own):
        raise UserError(f"model.pretrained: {source}: holds no ViT encoder weights")
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        log.warning(
            "model.pretrained %s: %d encoder weights missing (kept at init: %s), %d unexpected (ignored: %s)",
            source, len(missing), ", ".join(missing[:5]), len(unexpected), ", ".join(unexpected[:5]),
        )
    return list(missing), list(unexpected)
