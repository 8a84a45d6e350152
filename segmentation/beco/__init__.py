"""BECO building blocks: DeepLabV2 with the reference key names, datasets, the co-training model."""
