"""Prompt templates that turn a class name into sentences for CLIP's text encoder.

CLIP was trained on captions, not bare nouns, so a class embedding is the mean over many
captions ("a photo of a {}.") — prompt ensembling (Radford et al. 2021, §3.1.4). Sets:

- ``imagenet80``: the 80 ImageNet templates of the CLIP paper.
- ``scene``: the 5 scene templates MaskCLIP adds for dense labelling ("there is a {} in the scene.").
- ``maskclip``: ``imagenet80`` + ``scene`` (85), what MaskCLIP / CLIP2Scene ensemble over; the default.
- ``driving``: street-scene captions for vehicle cameras (nuScenes, SemanticKITTI, RELLIS-3D).
- ``indoor``: room captions for RGB-D scans (ScanNet, S3DIS).
- ``single``: only "a photo of a {}." (cheap; for tests and quick experiments).
"""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import ConfigError

IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

SCENE_TEMPLATES: tuple[str, ...] = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)

DRIVING_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a {} in the street.",
    "a photo of the {} on the road.",
    "a dashcam photo of a {}.",
    "a car camera photo of the {}.",
    "a blurry photo of a {} in traffic.",
    "a dark photo of a {} at night.",
    "a {} seen from a car.",
    "there is a {} in the street scene.",
    "there is the {} in the driving scene.",
    "a low resolution photo of a {} in a city.",
)

INDOOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a {} in a room.",
    "a photo of the {} in the room.",
    "a photo of a {} indoors.",
    "a {} in an apartment.",
    "a {} in an office.",
    "a dark photo of a {} in a room.",
    "a blurry photo of the {} indoors.",
    "there is a {} in the room.",
    "there is the {} in the indoor scene.",
    "a low resolution photo of a {} in a house.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "imagenet80": IMAGENET_TEMPLATES,
    "scene": SCENE_TEMPLATES,
    "maskclip": IMAGENET_TEMPLATES + SCENE_TEMPLATES,
    "driving": DRIVING_TEMPLATES,
    "indoor": INDOOR_TEMPLATES,
    "single": ("a photo of a {}.",),
}

DEFAULT_TEMPLATES = "maskclip"


def _check_template(template: str) -> str:
    if template.count("{}") != 1:
        raise ConfigError(f"prompt template {template!r} must contain exactly one '{{}}' placeholder")
    return template


def resolve_templates(spec: str | Sequence[str] = DEFAULT_TEMPLATES) -> tuple[str, ...]:
    """Templates named by ``spec``: a set name, one template, or a list mixing both.

    Duplicates are dropped (first occurrence kept) so that combining sets does not give
    one template twice the weight in the ensemble.
    """
    if isinstance(spec, str):
        if spec in TEMPLATE_SETS:
            return TEMPLATE_SETS[spec]
        if "{}" in spec:
            return (_check_template(spec),)
        raise ConfigError(
            f"unknown prompt template set {spec!r}; known sets: {sorted(TEMPLATE_SETS)} "
            "(or give templates containing '{}')")
    if not isinstance(spec, Sequence) or len(spec) == 0:
        raise ConfigError(f"prompt templates must be a set name or a non-empty list, got {spec!r}")
    out: list[str] = []
    for item in spec:
        if not isinstance(item, str):
            raise ConfigError(f"prompt template must be a string, got {item!r}")
        for t in resolve_templates(item):
            if t not in out:
                out.append(t)
    return tuple(out)


def build_prompts(names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every name, template-major within a name."""
    return [t.format(n) for n in names for t in templates]
