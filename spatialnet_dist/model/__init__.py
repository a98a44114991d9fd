"""SpatialNet-ViT: a timm ViT encoder shared by the task heads (model/spatialnet.py `build_model`).

This init imports nothing: the task modules import model.heads without loading model.spatialnet, which reads
the task registry (tests/test_layering.py).
"""
