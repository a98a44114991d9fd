"""SpatialNet-ViT: one ViT encoder shared by the task heads. Knows nothing of data loading or distribution."""

from __future__ import annotations

import torch
from torch import nn

from spatialnet_dist import tasks as registry
from spatialnet_dist.batch_format import IMAGE_ROW, MASK_NOISE, images_and_rows
from spatialnet_dist.config import ModelConfig, TasksConfig, tasks_config_class
from spatialnet_dist.networks.encoder import ViTEncoder, build_encoder, freeze_blocks, layer_id, load_pretrained
from spatialnet_dist.networks.heads import VocabSizes
from spatialnet_dist.networks.presets import Preset, get_preset
from spatialnet_dist.objective import TaskBalance
from spatialnet_dist.text import TextVocabs


class SpatialNetViT(nn.Module):
    def __init__(self, encoder: ViTEncoder, heads: dict[str, nn.Module], preset: Preset,
                 loss_balance: TaskBalance | None = None):
        super().__init__()
        self.preset = preset
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        if loss_balance is not None:  # loss.balance=uncertainty: the objective's s_t, trained with the network
            self.loss_balance = loss_balance

    @property
    def image_size(self) -> int:
        return self.encoder.patch_embed.img_size[0]

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) -> tokens (B, N, D), pooled (B, D)."""
        return self.encoder.encode(images)

    def forward(self, batch: dict[str, dict]) -> dict[str, dict]:
        """Multi-task batch -> {task: head outputs} for the tasks present.

        The encoder runs once over the batch's images (batch_format.images_and_rows): a training micro-batch's
        one tensor of distinct images, or the sub-batches' own images, concatenated (one large matmul per layer
        beats several small ones). Each head gets the whole encoding, tokens (U, N, D) and pooled (U, D), with
        its sub-batch, and picks its rows (IMAGE_ROW; batch_format.own_rows). Keys that name no registered
        task are ignored. vqa and regression sub-batches pass each image once, however many of their questions
        ask about it (their TypedDicts in tasks/); their outputs have one row per question.

        A head with `visible_tokens` K > 0 (mae's) gets an encoding of its own images in which the blocks
        see K random patch tokens of each (ViTEncoder.encode_visible; the noise: the sub-batch's MASK_NOISE,
        else torch's RNG), and is called as head(tokens (B, K, D), pooled (B, D), sub_batch, kept (B, K)).
        """
        known = set(registry.names())
        tasks = [t for t in batch if t in known]
        unknown = [t for t in tasks if t not in self.heads]
        if unknown:
            raise ValueError(f"batch has tasks {unknown} but the model has heads only for {list(self.heads)}")
        images, rows = images_and_rows(batch, tasks)  # (U, C, H, W), {task: (B,) or None}
        masked = [t for t in tasks if getattr(self.heads[t], "visible_tokens", 0)]
        outputs = self._shared_pass(batch, images, {t: r for t, r in rows.items() if t not in masked},
                                    only_shown=bool(masked))
        for t in masked:  # a masked encoding is its own pass: its tokens are no other task's
            own = images if rows[t] is None else images[rows[t]]  # (B, C, H, W)
            tokens, pooled, kept = self.encoder.encode_visible(own, self.heads[t].visible_tokens,
                                                               batch[t].get(MASK_NOISE))
            outputs[t] = self.heads[t](tokens, pooled, batch[t], kept)
        return {t: outputs[t] for t in tasks}

    def _shared_pass(self, batch: dict[str, dict], images: torch.Tensor, rows: dict[str, torch.Tensor | None],
                     only_shown: bool) -> dict[str, dict]:
        """The heads of the tasks in `rows` over one encoder pass of `images`; `only_shown`: of those their rows
        show (a masked task beside them may show images of its own)."""
        if not rows:
            return {}
        subs = {t: batch[t] if r is None else {**batch[t], IMAGE_ROW: r} for t, r in rows.items()}
        if only_shown and all(r is not None for r in rows.values()):
            shown = torch.unique(torch.cat(list(rows.values())))  # (U',) sorted rows of `images`
            if len(shown) < len(images):
                slot = torch.full((len(images),), -1, dtype=torch.int64, device=shown.device)
                slot[shown] = torch.arange(len(shown), device=shown.device)
                images = images[shown]
                subs = {t: {**batch[t], IMAGE_ROW: slot[r]} for t, r in rows.items()}
        tokens, pooled = self.encode(images)  # (U, N, D), (U, D)
        return {t: self.heads[t](tokens, pooled, sub) for t, sub in subs.items()}

    # ---- training helpers, used by the engine ----

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute encoder block activations in backward instead of storing them."""
        self.encoder.set_grad_checkpointing(enable)

    def no_weight_decay_names(self) -> set[str]:
        """Parameters AdamW must not decay (nor the explicit L2 term penalise): norms, biases and other
        1-D parameters, position/class tokens and embedding tables (decay would shrink rare words)."""
        names = set()
        for module_name, module in self.named_modules():
            for name, p in module.named_parameters(recurse=False):
                full = f"{module_name}.{name}" if module_name else name
                if p.ndim <= 1 or isinstance(module, nn.Embedding) or name in ("pos_embed", "cls_token", "reg_token"):
                    names.add(full)
        return names  # the tied caption output layer is named_parameters()' embed.weight: covered

    def decayed_parameters(self) -> list[nn.Parameter]:
        skip = self.no_weight_decay_names()
        return [p for n, p in self.named_parameters() if p.requires_grad and n not in skip]

    def lr_scales(self, layer_decay: float) -> dict[str, float]:
        """Layer-wise lr decay (BEiT, MAE): parameter name -> lr factor. Encoder block i gets
        decay^(depth - i), the stem decay^(depth + 1); the final norm and the heads 1."""
        depth = len(self.encoder.blocks)
        return {
            name: layer_decay ** (depth + 1 - layer_id(name.removeprefix("encoder."), depth))
            if name.startswith("encoder.") else 1.0
            for name, _ in self.named_parameters()
        }


def assemble_model(model_cfg: ModelConfig, tasks: list[str], sizes: VocabSizes, balance: bool = False,
                   pretraining: dict[str, torch.Tensor] | None = None,
                   task_cfgs: TasksConfig | None = None) -> SpatialNetViT:
    """Encoder from the preset (with the config's overrides) + one head per task, sized by `sizes` and by its
    section of `task_cfgs` (the config's `tasks`; None: every task's defaults); with `balance`
    (loss.balance=uncertainty) also the tasks' learned loss weights (objective.TaskBalance). The encoder starts
    from model.pretrained: a weights file or the hub, read here, or this project's checkpoint or bundle, whose
    weights the caller read into `pretraining` (checkpoint_weights.pretraining_weights: model/ sits below it)."""
    task_cfgs = tasks_config_class()() if task_cfgs is None else task_cfgs
    preset = get_preset(model_cfg.preset)
    encoder = build_encoder(preset, model_cfg.image_size, model_cfg.in_chans, model_cfg.activation, model_cfg.drop_path,
                            model_cfg.patch_size, model_cfg.stem, model_cfg.global_pool)
    if model_cfg.pretrained:
        load_pretrained(encoder, model_cfg.pretrained, preset, pretraining)
    freeze_blocks(encoder, model_cfg.freeze_encoder_blocks)
    heads = {t: registry.get(t).head(encoder.embed_dim, preset, sizes, model_cfg, getattr(task_cfgs, t)) for t in tasks}
    model = SpatialNetViT(encoder, heads, preset, TaskBalance(tasks) if balance else None)
    model.set_grad_checkpointing(preset.grad_checkpointing)
    return model


def build_model(model_cfg: ModelConfig, tasks: list[str], vocabs: TextVocabs, balance: bool = False,
                pretraining: dict[str, torch.Tensor] | None = None,
                task_cfgs: TasksConfig | None = None) -> SpatialNetViT:
    """The model for `tasks`, its heads sized by the vocabularies built from the training text (`balance`,
    `pretraining`, `task_cfgs`: assemble_model's)."""
    sizes = VocabSizes(words=len(vocabs.words), answers=len(vocabs.answers), classes=len(vocabs.classes),
                       tags=len(vocabs.tags))
    return assemble_model(model_cfg, tasks, sizes, balance, pretraining, task_cfgs)
