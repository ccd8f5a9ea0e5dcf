"""The embedded synthetic remote-sensing world: scenes, rendering, captions with known noise, export.

Everything is seeded and vectorised. ``generate_world`` writes a corpus (WebDataset shards in a
trusted and a coarse tier) and four segmentation sources in the layouts of real data sets;
``sample_pairs`` and ``sample_scenes`` give held-out evaluation sets in memory. With
``WorldConfig.scenes`` on, it also writes large georeferenced GeoTIFF scenes per source
(:mod:`rssqa.world.geoscenes`).
"""

from rssqa.world.captions import NOISE_KINDS, mentioned_classes
from rssqa.world.classes import CLASSES, NUM_CLASSES, SCENE_TYPES
from rssqa.world.export import SourcesConfig, WorldConfig, export_corpus, export_sources, generate_world
from rssqa.world.generate import CorpusConfig, Tile, make_pair, make_tile, sample_pairs, sample_scenes
from rssqa.world.geoscenes import ScenesConfig, export_scenes
from rssqa.world.render import Sensor, SensorStyle
from rssqa.world.scene import Scene, generate_scene
from rssqa.world.sources import IGNORE_INDEX, SOURCES, SourceSpec

__all__ = [
    "CLASSES",
    "IGNORE_INDEX",
    "NOISE_KINDS",
    "NUM_CLASSES",
    "SCENE_TYPES",
    "SOURCES",
    "CorpusConfig",
    "Scene",
    "ScenesConfig",
    "Sensor",
    "SensorStyle",
    "SourceSpec",
    "SourcesConfig",
    "Tile",
    "WorldConfig",
    "export_corpus",
    "export_scenes",
    "export_sources",
    "generate_scene",
    "generate_world",
    "make_pair",
    "make_tile",
    "mentioned_classes",
    "sample_pairs",
    "sample_scenes",
]
