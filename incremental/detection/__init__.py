"""Detection: a deployed detector adapted from user feedback (METHODS sections 2 and 3).

Modules (imported on use, so that ``import incremental`` stays light): ``scenes`` (COCO scene
generator), ``coco`` (COCO loader), ``model`` (small Faster R-CNN), ``trainer`` (the loop for detection
batches), ``evaluation`` (COCO mAP with pycocotools), ``feedback`` (step A and ``incremental feedback``),
``simulated_user``, ``distillation`` (Faster R-CNN adapter for pseudo labels + distillation),
``packaging`` (detector model packages), ``update`` (``incremental update`` for detectors),
``avalanche`` (Avalanche detection datasets). See docs/detection.md.
"""
