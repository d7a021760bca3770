"""Model input from an image file or array: :mod:`medsim.runtime.preprocess`, re-exported here (the export's
checks and this deployment layer run the same code; see that module for the steps and axis order)."""

from medsim.runtime.preprocess import (KNOWN_STEPS, MANIFEST_NAME, ImageSource, apply_window, area_resize,
                                       load_manifest, preprocess, preprocess_with_size, read_image, scale_range)

__all__ = ["MANIFEST_NAME", "ImageSource", "load_manifest", "read_image", "preprocess", "preprocess_with_size",
           "area_resize", "apply_window", "scale_range", "KNOWN_STEPS"]
