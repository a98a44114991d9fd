"""mae: masked autoencoding of any corpus's images (He et al. 2022, facebookresearch/mae `MaskedAutoencoderViT`);
no label is read, so it pretrains the shared encoder on unlabeled imagery, alone or beside labelled tasks.

The encoder sees a random (1 - `tasks.mae.mask_ratio`) of each image's patch tokens, with the class token
(ViTEncoder.encode_visible: the masked pass the head asks for by its `visible_tokens`, model/spatialnet.py); a
light decoder (MAEDecoder) embeds them linearly, puts a learned mask token at every masked patch, adds a
fixed 2-D sin-cos position, runs `decoder_depth` timm Blocks of `decoder_dim` and predicts each patch's
patch_size^2 x in_chans pixels, for any number of bands. The loss is the MSE over the masked patches only, on
pixels normalised per patch (MAE's norm_pix_loss, `tasks.mae.norm_pix_loss`).

Training masks come from torch's RNG inside the forward, which the Trainer reseeds from (seed, rank, step)
every step: a resumed run draws the uninterrupted run's masks. Evaluation masks each image by a noise seeded
from its id (`mask_noise`), so an image's reconstruction error is the same at every validation, on any
number of workers, in any batch. Evaluation: that error per image, its mean over the split, and for the
report's sample images the original, masked and reconstructed image side by side.
"""

from __future__ import annotations

import zlib
from functools import partial
from typing import NotRequired, TypedDict

import numpy as np
import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from spatialnet_dist.batch_format import MASK_NOISE
from spatialnet_dist.display import markdown_table
from spatialnet_dist.networks.encoder import meta_encoder
from spatialnet_dist.tasks.base import Task

DECODER_HEAD_WIDTH = 32  # channels per decoder attention head (MAE's 512-wide decoder has 16 heads)
NORM_EPS = 1e-6  # added to each patch's variance before normalising by it, as MAE's forward_loss


class MAEBatch(TypedDict):
    image: torch.Tensor  # (B, C, S, S) float32: the input and the reconstruction target
    image_id: list[str]  # [B]
    mask_noise: NotRequired[torch.Tensor]  # (B, N) float32 (batch_format.MASK_NOISE): evaluation's per-image masks


def visible_count(num_patches: int, mask_ratio: float) -> int:
    """The patch tokens the encoder sees of each image: round((1 - mask_ratio) x N), at least one kept and one
    masked (a loss over no masked patch is undefined)."""
    return min(num_patches - 1, max(1, round((1 - mask_ratio) * num_patches)))


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """images (B, C, S, S) -> (B, N, patch^2 x C): row-major patches as the patch embedding orders its tokens,
    each patch's pixels row-major with the bands last (MAE's layout)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """patchify's inverse: (B, N, patch^2 x C) -> (B, C, S, S)."""
    b, n, _ = patches.shape
    grid = int(round(n**0.5))
    x = patches.reshape(b, grid, grid, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, grid * patch, grid * patch)


def patch_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, L) -> each patch's mean and sqrt(unbiased variance + NORM_EPS), both (B, N, 1)."""
    return patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + NORM_EPS).sqrt()


def reconstruction_targets(images: torch.Tensor, patch: int, norm_pix: bool) -> torch.Tensor:
    """What the decoder predicts: images (B, C, S, S) -> (B, N, patch^2 x C) fp32 patches, with norm_pix each
    patch minus its mean over its pixels and bands, divided by its standard deviation."""
    target = patchify(images.float(), patch)
    if not norm_pix:
        return target
    mean, std = patch_stats(target)
    return (target - mean) / std


def masked_patch_errors(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pred, target (B, N, L), mask (B, N) 1 on the masked patches -> (B,) each image's mean squared error
    over its masked patches (over their pixels, then over the patches)."""
    per_patch = (pred.float() - target).pow(2).mean(-1)  # (B, N)
    return (per_patch * mask).sum(1) / mask.sum(1)


def patch_grid(model_cfg) -> tuple[int, int]:
    """(patch size, patches per side) of the model's token grid: model.patch_size and model.image_size, or where 0
    those of the preset's registered encoder (as networks.encoder.build_encoder reads them)."""
    defaults = meta_encoder(model_cfg.preset).patch_embed
    patch = model_cfg.patch_size or defaults.patch_size[0]
    return patch, (model_cfg.image_size or defaults.img_size[0]) // patch


def mask_noise(image_ids: list[str], num_patches: int) -> torch.Tensor:
    """(B, N) noise seeded by each image's id (crc32, the same in every process): evaluation's fixed masks."""
    return torch.stack([torch.rand(num_patches, generator=torch.Generator().manual_seed(zlib.crc32(i.encode())))
                        for i in image_ids])


class MAEDecoder(nn.Module):
    """MAE's decoder on the encoder's visible tokens; `visible_tokens` asks the model for the masked pass."""

    def __init__(self, encoder_dim: int, grid: int, patch: int, in_chans: int, depth: int, dim: int,
                 mask_ratio: float):
        super().__init__()
        self.num_patches, self.patch = grid * grid, patch
        self.visible_tokens = visible_count(self.num_patches, mask_ratio)
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # a fixed 2-D sin-cos position per patch, zero at the class token (MAE's): not a weight, not saved
        position = torch.cat([torch.zeros(1, dim), build_sincos2d_pos_embed([grid, grid], dim)])  # (1 + N, dim)
        self.register_buffer("pos_embed", position.unsqueeze(0), persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*(Block(dim, dim // DECODER_HEAD_WIDTH, 4.0, qkv_bias=True, norm_layer=norm)
                                      for _ in range(depth)))
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, patch * patch * in_chans)
        self.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens, pooled, sub_batch, kept: torch.Tensor | None = None) -> dict:
        """tokens (B, K, D) of the patches `kept` (B, K) (None: all N visible, in order), pooled (B, D) ->
        {"pred": (B, N, patch^2 x C) every patch's pixels, "mask": (B, N) float, 1 where the encoder saw nothing}."""
        x = self.embed(tokens)  # (B, K, dim)
        b, n = x.shape[0], self.num_patches
        mask = torch.zeros(b, n, device=x.device)
        if kept is not None:
            slots = kept.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (B, K, dim)
            x = self.mask_token.to(x.dtype).expand(b, n, -1).scatter(1, slots, x)  # (B, N, dim)
            mask = mask.fill_(1.0).scatter(1, kept, 0.0)
        x = torch.cat([self.embed(pooled).unsqueeze(1), x], dim=1) + self.pos_embed.to(x.dtype)  # (B, 1 + N, dim)
        return {"pred": self.pred(self.norm(self.blocks(x)))[:, 1:], "mask": mask}


def _init_weights(module: nn.Module) -> None:
    """MAE's: xavier-uniform linear layers with zero bias, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def reconstruction_strips(images: torch.Tensor, out: dict, patch: int, norm_pix: bool) -> np.ndarray:
    """(B, C, S, S) images and their decoder outputs -> (B, S, 3S, C) float32: the image, its visible patches
    (the masked ones at the image's minimum) and the reconstruction (visible patches kept, masked ones
    predicted; under norm_pix given the true patch's mean and spread, as MAE's visualisation does)."""
    target = patchify(images.float(), patch)  # (B, N, L)
    pred = out["pred"].float()
    if norm_pix:
        mean, std = patch_stats(target)
        pred = pred * std + mean
    hidden = out["mask"].unsqueeze(-1).bool()  # (B, N, 1)
    low = target.amin(dim=(1, 2), keepdim=True)  # (B, 1, 1)
    views = (target, torch.where(hidden, low, target), torch.where(hidden, pred, target))
    strip = torch.cat([unpatchify(v, patch, images.shape[1]) for v in views], dim=-1)  # (B, C, S, 3S)
    return strip.permute(0, 2, 3, 1).detach().cpu().numpy()


class MaskedAutoencoding(Task):
    name = "mae"
    needs = "images"
    default_enabled = False  # pretraining is asked for
    strong_augment = True  # crops and recolours change no target: the target is the augmented image itself
    loss_reads_images = True
    validation_keys = ("reconstruction_MSE",)
    headline_keys = ("reconstruction_MSE",)
    sample_only_keys = ("reconstruction",)
    report_heading = "Masked autoencoding"
    options = {
        "mask_ratio": 0.75,  # the share of each image's patches the encoder does not see (MAE's 0.75)
        "decoder_depth": 2,  # decoder transformer blocks: light, it is dropped after pretraining
        "decoder_dim": 128,  # decoder width, a multiple of DECODER_HEAD_WIDTH (heads of 32 channels)
        "norm_pix_loss": True,  # targets normalised per patch (MAE: sharper features than raw pixels)
    }

    def has_content(self, manifest, split):
        return split.get("samples", 0) > 0

    def row(self, s, rows, rng, symmetry):
        return {}  # the image is the target

    def head(self, encoder_dim, preset, sizes, model_cfg, task_cfg):
        patch, grid = patch_grid(model_cfg)
        return MAEDecoder(encoder_dim, grid, patch, model_cfg.in_chans, task_cfg.decoder_depth,
                          task_cfg.decoder_dim, task_cfg.mask_ratio)

    def loss_state(self, cfg, vocabs):
        """(the patch size, tasks.mae.norm_pix_loss)."""
        return patch_grid(cfg.model)[0], cfg.tasks.mae.norm_pix_loss

    def loss(self, out, sub, cfg, state):
        patch, norm_pix = state
        target = reconstruction_targets(sub["image"], patch, norm_pix)
        # every image masks as many patches: the images' mean is the mean over all masked patches (MAE's)
        return masked_patch_errors(out["pred"], target, out["mask"]).mean()

    def predict(self, model, sub, images, cfg, vocabs):
        decoder = model.heads[self.name]
        noise = mask_noise(sub["image_id"], decoder.num_patches).to(images.device)
        out = model({self.name: {"image": images, MASK_NOISE: noise}})[self.name]
        norm_pix = cfg.tasks.mae.norm_pix_loss
        errors = masked_patch_errors(out["pred"], reconstruction_targets(images, decoder.patch, norm_pix),
                                     out["mask"])
        strips = reconstruction_strips(images, out, decoder.patch, norm_pix)
        return [{"image_id": i, "mse": float(e), "reconstruction": s}
                for i, e, s in zip(sub["image_id"], errors.tolist(), strips)]

    def score(self, rows, cfg, vocabs):
        return {"reconstruction_MSE": float(np.mean([r["mse"] for r in rows])), "n": len(rows)}

    def sample_fields(self, rows, vocabs):
        fields = {"reconstruction_MSE": rows[0]["mse"]}
        if "reconstruction" in rows[0]:  # kept for the report's images only (evaluate.run.predict_split)
            fields["reconstruction"] = rows[0]["reconstruction"]
        return fields

    def report_section(self, scores, out_dir):
        table = markdown_table(["masked autoencoding", "reconstruction MSE", "n"],
                               [["this run", f"{scores['reconstruction_MSE']:.4f}", str(scores["n"])]])
        return [table, "", "The mean squared error of the masked patches' pixels (normalised per patch under "
                "tasks.mae.norm_pix_loss), each image masked by a noise seeded from its id.", ""]


TASK = MaskedAutoencoding()
