"""The networks SpatialNet-ViT is built from: the timm ViT encoder (`encoder.py`), the task heads (`heads.py`) and
the size presets (`presets.py`). They know nothing of tasks or data: the task modules (tasks/) pick their heads
here, and model/spatialnet.py assembles the encoder with the enabled tasks' heads.
"""
