"""COCO detection / instance-segmentation transfer (`mokd-eval coco`): data, the C4 Mask R-CNN rebuilt on
torchvision, its training and COCOEvaluator-equivalent evaluation, and the optional detectron2 engine."""
