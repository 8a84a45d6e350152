"""Stage three: BECO co-training of two DeepLabV2 networks (``main.py``) and CRF scoring (``test.py``)."""
