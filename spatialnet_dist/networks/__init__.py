"""The networks SpatialNet-ViT is built from: the timm ViT encoder and its sizes, registered with timm
(`encoder.py`), the task heads (`heads.py`) and the rest of each size preset (`presets.py`). They know nothing of
tasks or data: the task modules (tasks/) pick their heads here, and model/spatialnet.py assembles the encoder with
the enabled tasks' heads.
"""

# Importing the package registers the encoder sizes with timm: timm.create_model("spatialnet_paper") then works.
import spatialnet_dist.networks.encoder  # noqa: F401
