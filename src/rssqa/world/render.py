"""Render a :class:`~rssqa.world.scene.Scene` to an image, then pass it through a simulated sensor.

Rendering gives each class its reflectance in four bands (R, G, B, NIR) with per-image colour drift,
per-object colours (roofs, cars, fields), texture, pitched-roof shading and cast shadows. The sensor
then applies the image's conditions: illumination and colour cast, haze, gamma, blur, a loss of
resolution, noise and JPEG compression. Each condition is drawn from the source's
:class:`SensorStyle` through one latent ``difficulty``, so some images are hard for several visible
reasons at once, as in real acquisitions, and the drawn values are recorded in the sample's meta.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from rssqa.world.classes import (
    BARE_SOIL,
    BUILDING,
    CAR,
    LOW_VEGETATION,
    REFLECTANCE,
    TEXTURE,
    TREE,
    WATER,
)
from rssqa.world.noise import fractal_noise
from rssqa.world.scene import Scene

# Roof and car paints (R, G, B, NIR): terracotta, grey, dark, white, brown, copper green, blue metal.
ROOFS = np.array(
    [[0.62, 0.30, 0.22, 0.45], [0.50, 0.50, 0.52, 0.45], [0.25, 0.25, 0.27, 0.25], [0.80, 0.80, 0.78, 0.70],
     [0.45, 0.32, 0.25, 0.38], [0.35, 0.50, 0.45, 0.40], [0.40, 0.45, 0.58, 0.40], [0.70, 0.45, 0.35, 0.55]],
    dtype=np.float32,
)  # fmt: skip
PAINTS = np.array(
    [[0.85, 0.85, 0.85, 0.7], [0.1, 0.1, 0.1, 0.1], [0.7, 0.1, 0.1, 0.5], [0.15, 0.25, 0.6, 0.3],
     [0.55, 0.55, 0.58, 0.5], [0.9, 0.8, 0.2, 0.7]],
    dtype=np.float32,
)  # fmt: skip
HAZE = np.array([0.78, 0.80, 0.84, 0.70], np.float32)
BANDS = {"RGB": (0, 1, 2), "IRRG": (3, 0, 1)}


@dataclass(frozen=True)
class SensorStyle:
    """Ranges of the acquisition conditions of one source; ``difficulty ~ Beta(a, b)`` spans each range.

    Attributes:
        bands: ``"RGB"`` or ``"IRRG"`` (near-infrared, red, green false colour).
        difficulty: Beta parameters (a, b) of the latent difficulty in [0, 1].
        haze, blur, noise, resolution: (easy, hard) ends of each condition's range.
        jpeg: (easy, hard) JPEG quality, or None for a lossless sensor.
        illumination: (low, high) gain range (drawn independently of difficulty).
        color_drift: relative std of per-image class-colour drift.
    """

    bands: str = "RGB"
    difficulty: tuple[float, float] = (2.0, 3.0)
    haze: tuple[float, float] = (0.0, 0.45)
    blur: tuple[float, float] = (0.0, 1.6)
    noise: tuple[float, float] = (0.005, 0.06)
    resolution: tuple[float, float] = (1.0, 2.5)
    jpeg: tuple[int, int] | None = None
    illumination: tuple[float, float] = (0.75, 1.2)
    color_drift: float = 0.08


@dataclass(frozen=True)
class Sensor:
    """The conditions one image was taken under (recorded in its meta)."""

    difficulty: float
    illumination: float
    gamma: float
    haze: float
    blur_sigma: float
    noise_sigma: float
    resolution: float
    jpeg_quality: int | None
    sun_azimuth: float
    sun_elevation: float

    def as_dict(self) -> dict[str, float | int | None]:
        """Rounded values, for JSON meta."""
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def sample_sensor(rng: np.random.Generator, style: SensorStyle) -> Sensor:
    """Draw one image's conditions from ``style``."""
    d = float(rng.beta(*style.difficulty))

    def span(lo_hi: tuple[float, float]) -> float:
        t = float(np.clip(d + rng.normal(0, 0.12), 0, 1))
        return lo_hi[0] + (lo_hi[1] - lo_hi[0]) * t

    jpeg = None if style.jpeg is None else int(round(span(style.jpeg)))
    return Sensor(
        difficulty=d,
        illumination=float(rng.uniform(*style.illumination)),
        gamma=float(rng.uniform(0.85, 1.2)),
        haze=span(style.haze),
        blur_sigma=span(style.blur),
        noise_sigma=span(style.noise),
        resolution=span(style.resolution),
        jpeg_quality=jpeg,
        sun_azimuth=float(rng.uniform(0, 360)),
        sun_elevation=float(rng.uniform(25, 70)),
    )


def render(rng: np.random.Generator, scene: Scene, sensor: Sensor, style: SensorStyle) -> np.ndarray:
    """Render ``scene`` as seen by ``sensor``: an ``H×W×3`` uint8 image in the style's bands."""
    return _acquire(rng, _surface(rng, scene, sensor, style.color_drift), sensor, style.bands)


def _surface(rng: np.random.Generator, scene: Scene, sensor: Sensor, drift: float) -> np.ndarray:
    """Reflectance ``H×W×4``: class colours (roofs, cars, fields per object) × shading + texture."""
    label, inst = scene.label, scene.instance
    table = REFLECTANCE * (1 + drift * rng.standard_normal(REFLECTANCE.shape, dtype=np.float32))
    colours = np.concatenate([table, ROOFS, PAINTS])  # one lookup for classes and object paints
    index = label.astype(np.int64)
    gain = 1 + 0.12 * scene.roof_side.astype(np.float32)  # pitched roofs: the half facing the sun is brighter
    for cls, offset, n in ((BUILDING, len(table), len(ROOFS)), (CAR, len(table) + len(ROOFS), len(PAINTS))):
        m = (label == cls) & (inst >= 0)
        index[m] = offset + inst[m] % n
    field = ((label == LOW_VEGETATION) | (label == BARE_SOIL)) & (inst >= 0)
    gain[field] *= 1 + 0.18 * (((inst[field] * 2654435761) % 1000) / 1000.0 - 0.5)
    gain[_shadow(scene, sensor)] *= 0.45
    size = label.shape[0]
    texture = fractal_noise(rng, size, max(4, size // 6), octaves=3) - 0.5
    texture += 0.5 * (rng.random((size, size), dtype=np.float32) - 0.5)
    return colours[index] * gain[..., None] + (TEXTURE[label] * texture)[..., None]


def _shadow(scene: Scene, sensor: Sensor) -> np.ndarray:
    """Cast shadows: buildings (~9 m) and trees (~7 m) shift their footprint away from the sun."""
    az = np.deg2rad(sensor.sun_azimuth)
    run = 1.0 / np.tan(np.deg2rad(sensor.sun_elevation)) / scene.gsd_m
    shadow = np.zeros(scene.label.shape, bool)
    for cls, height in ((BUILDING, 9.0), (TREE, 7.0)):
        mask = scene.label == cls
        if mask.any():
            shadow |= _shift(mask, int(round(-np.cos(az) * height * run)), int(round(np.sin(az) * height * run)))
    casters = (scene.label == BUILDING) | (scene.label == TREE)
    return shadow & ~casters & (scene.label != WATER)


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _acquire(rng: np.random.Generator, img: np.ndarray, s: Sensor, bands: str) -> np.ndarray:
    img = img[..., list(BANDS[bands])]
    haze = HAZE[list(BANDS[bands])]
    img = img * s.illumination
    img = img * (1 - s.haze) + haze * s.haze
    if s.blur_sigma > 0.3:
        img = ndimage.gaussian_filter(img, sigma=(s.blur_sigma, s.blur_sigma, 0), truncate=2.5)
    if s.resolution > 1.15:
        img = _resample(img, s.resolution)
    img = img + s.noise_sigma * rng.standard_normal(img.shape, dtype=np.float32)
    # the camera's tone curve, after sensor noise, as a lookup table on the quantised signal
    tone = (np.linspace(0, 1, 256) ** s.gamma * 255 + 0.5).astype(np.uint8)
    out = tone[(np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)]
    if s.jpeg_quality is not None:
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=s.jpeg_quality)
        out = np.array(Image.open(buf).convert("RGB"))
    return out


def _resample(img: np.ndarray, factor: float) -> np.ndarray:
    # a coarser sensor: area-average down by `factor`, bilinear back up to the original grid
    size = img.shape[0]
    small = max(2, int(round(size / factor)))
    out = np.empty_like(img)
    for b in range(img.shape[2]):
        band = Image.fromarray(np.ascontiguousarray(img[..., b]), mode="F")
        out[..., b] = np.asarray(band.resize((small, small), Image.BOX).resize((size, size), Image.BILINEAR))
    return out
