"""psalm: PSALM (Pixelwise SegmentAtion with Large Multi-Modal Model) as a detectron2 project."""

__version__ = "0.1.0"
