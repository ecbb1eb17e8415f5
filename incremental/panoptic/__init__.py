"""Class-incremental panoptic segmentation (METHODS.md section 3).

- :mod:`.shapes`: deterministic panoptic scenes written in the COCO panoptic format;
- :mod:`.coco`: reads COCO panoptic files (real or generated) into samples for the loop;
- :mod:`.model`: a small Mask2Former-style model whose class head grows;
- :mod:`.matcher`, :mod:`.criterion`: Hungarian matching and the set loss;
- :mod:`.inference`: standard panoptic inference; :mod:`.pq`: PQ/SQ/RQ via torchmetrics;
- :mod:`.pseudo_labels`: every pseudo-label step of METHODS 3.3 as a pure function;
- :mod:`.update`: ``incremental update`` for panoptic model packages.

Submodules are imported on use, so ``import incremental.panoptic`` stays cheap.
"""
