"""SpatialNet-ViT: the encoder shared by the enabled tasks' heads (model/spatialnet.py `build_model`), and its
size and FLOP summary (model/summary.py). Both read the task registry; the networks they assemble live below the
tasks, in networks/.
"""
