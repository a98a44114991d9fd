"""`spatialnet model --preset NAME`: parameter counts per component and forward GFLOPs per image.

Built on the meta device (shapes only, no memory), so even `giant` answers in seconds.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from spatialnet_dist import tasks as registry
from spatialnet_dist.config import ModelConfig
from spatialnet_dist.model.spatialnet import assemble_model
from spatialnet_dist.networks.heads import VocabSizes

# Vocabulary sizes of a representative run: 10000 words, 1000 answers (model.max_answers), 21 land-use
# classes (UCM), 17 tags (UCM multi-label). The text heads' counts scale with them; the encoder's do not.
REPRESENTATIVE_SIZES = VocabSizes(words=10000, answers=1000, classes=21, tags=17)


def _example_batch(cfg: ModelConfig, image_size: int, in_chans: int) -> dict:
    """One image per task with full-length captions and questions: a worst-case text length."""
    image = torch.zeros(1, in_chans, image_size, image_size)
    return {t.name: t.example_sub_batch(image, cfg) for t in registry.all_tasks()}


def model_summary(preset: str, image_size: int = 0) -> dict:
    """-> {"preset", "params": {"encoder", <each task head>, "total"}, "gflops_per_image"}.

    FLOPs are torch's FlopCounterMode count (a multiply-add = 2) of one image through the encoder once
    and through every head (the caption decoder teacher forced over caption_max_len tokens).
    """
    cfg = ModelConfig(preset=preset, image_size=image_size)
    with torch.device("meta"):
        model = assemble_model(cfg, registry.names(), REPRESENTATIVE_SIZES)
        batch = _example_batch(cfg, model.image_size, cfg.in_chans)
        with FlopCounterMode(display=False) as counter:
            tokens, pooled = model.encode(next(iter(batch.values()))["image"])
            for task, head in model.heads.items():
                head(tokens, pooled, batch[task])
    params = {"encoder": sum(p.numel() for p in model.encoder.parameters())}
    params |= {t: sum(p.numel() for p in model.heads[t].parameters()) for t in model.heads}
    params["total"] = sum(p.numel() for p in model.parameters())
    return {
        "preset": preset,
        "image_size": model.image_size,
        "params": params,
        "gflops_per_image": round(counter.get_total_flops() / 1e9, 3),
    }


def format_summary(info: dict) -> str:
    lines = [f"SpatialNet-ViT preset {info['preset']} ({info['image_size']} px)", f"{'component':<16}{'parameters':>16}"]
    lines += [f"{name:<16}{n:>16,}" for name, n in info["params"].items()]
    lines.append(f"forward GFLOPs per image (encoder + every head): {info['gflops_per_image']:.2f}")
    return "\n".join(lines)
