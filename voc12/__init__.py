"""The dataset layer every stage uses: VOC lists, class labels, datasets, the toy VOC generator."""
