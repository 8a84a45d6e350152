"""IRN networks: ResNet-50 backbone with frozen BN and the edge/displacement heads."""
