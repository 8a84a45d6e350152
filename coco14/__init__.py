"""MS COCO 2014: dataset description, preparation (prepare.py) and a COCO-format toy set (toy.py)."""
