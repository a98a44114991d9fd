"""SpatialNet-ViT: a timm ViT encoder shared by captioning, VQA, classification and count-regression heads."""

from spatialnet_dist.model.presets import PRESETS, Preset
from spatialnet_dist.model.spatialnet import SpatialNetViT, build_model

__all__ = ["PRESETS", "Preset", "SpatialNetViT", "build_model"]
