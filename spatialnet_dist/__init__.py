"""spatialnet-dist: distributed multi-task training of SpatialNet-ViT."""
