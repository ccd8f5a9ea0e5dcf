"""Whole scenes: a GeoTIFF in; quality, best-method, fused and error maps out, georeferenced.

A scene is read in overlapping windows of the size the scorer was trained on, one row of windows
(a strip) at a time, so memory stays bounded whatever the scene's size. For every window, every
method of the source segments it once (:class:`rssqa.models.quality_inputs.QualityInputs` with
``pixels``): the same pass gives the quality head its inputs, the recommendation (the ranking head
where the scorer has one and three methods or more run), the chosen method's class probabilities
and its per-pixel error probability (the scorer's pixel error head).

Outputs (Cloud-Optimised GeoTIFFs with the input's CRS and transform; nodata where the input has none):

- ``quality.tif`` float32: the recommended method's predicted OA, per window (each pixel takes the
  window whose centre is nearest); nodata -1;
- ``best_method.tif`` uint8: the recommended method's index (colour table; names in the metadata
  ``methods`` tag and ``scene.json``); nodata 255;
- ``fused.tif`` uint8: classes from each window's recommended method, its probabilities blended
  with a taper where windows overlap (class names and the source's palette when known); nodata 255;
- ``error.tif`` float32: per pixel, the predicted probability that ``fused.tif`` is wrong there
  (blended like the classes); nodata -1;
- ``scene.json`` (written last) and ``quicklook.png``.

Resumable: work in progress sits under ``<out>/.scene-work/``; after every strip the rows that no
later window touches are written there, and every 20 s the rolling rows and the state are saved, so a
rerun continues after the last saved strip. Final names appear only when complete (``os.replace``).

With ``truth`` (a ground-truth raster on the same grid), the run also measures what the maps are
worth: OA of the fused map, of each single method and of the oracle (best method per window) on the
same pixels, and the error map's pixel AUROC against per-pixel label-free baselines.

Modules: :mod:`~rssqa.scene.windows` (offsets, owned pixels, taper), :mod:`~rssqa.scene.job`
(:class:`SceneJob`), :mod:`~rssqa.scene.evaluate` (against a truth raster),
:mod:`~rssqa.scene.quicklook`, :mod:`~rssqa.scene.index` (a scene index, several processes),
:mod:`~rssqa.scene.split` (a labelled folder's held-out whole images as scenes).
"""

from __future__ import annotations

from rssqa.scene.common import DTYPES, LAYERS, NODATA
from rssqa.scene.index import score_scene_index
from rssqa.scene.job import SceneJob, SceneOptions, score_scene_file
from rssqa.scene.quicklook import quicklook
from rssqa.scene.split import export_split_scenes
from rssqa.scene.windows import owned_bounds, taper, window_offsets

__all__ = [
    "DTYPES", "LAYERS", "NODATA", "SceneJob", "SceneOptions", "export_split_scenes", "owned_bounds", "quicklook",
    "score_scene_file", "score_scene_index", "taper", "window_offsets",
]  # fmt: skip
