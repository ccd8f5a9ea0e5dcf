"""rssqa: remote-sensing semantic segmentation quality assessment without ground truth."""

__version__ = "0.1.0"
