"""What determines a result, as plain data that can be stored, compared and explained.

A run's identity (`run_identity`) and a benchmark cell's fingerprint are dicts of
components: the recipe, the model name, the weights (`weights_identity`), the class names in
order, the images (`images_digest`), how augmentation is drawn (when a run augments) and, for
a cell, the scenario's class split. Two runs
with equal components compute the same numbers; `describe_changes` names the components that
differ, so a refused resume or a recomputed cell says why.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict

from ueo.data import ImageSet
from ueo.loader import AUGMENTATION_DRAWS
from ueo.recipe import Recipe

_FILE_HASHES: dict[tuple[str, int, int], str] = {}
DIGEST_CHUNK = 65536  # image paths hashed per update

# How each component is named to the user.
COMPONENT_NAMES = {
    "model": "--model",
    "pretrained": "--pretrained",
    "weights": "the model weights",
    "class_names": "the class names (or their order)",
    "split": "the known/unlabeled/test class split",
    "known_classes": "the known classes",
    "unlabeled": "the unlabeled images (paths or labels)",
    "test": "the test images (paths or labels)",
    "augmentation_draws": "how augmentation is drawn",
}
# What an augmented run's identity without "augmentation_draws" was made with.
EARLIER_DRAWS = "each loader worker's generator (ueo before 2026-11-30)"


def weights_identity(model_name: str, pretrained: str) -> str:
    """The exact base weights: a file's full sha256, a plug-in's recorded hash, or the tag.

    A local checkpoint is hashed in full once per process (cached by path, size and mtime):
    a file replaced under the same name is a different model. An open_clip tag names fixed
    published weights, so the tag is the identity.
    """
    from ueo.clip import RANDOM_WEIGHTS, WEIGHT_IDENTITIES, WEIGHT_SOURCES, load_plugins

    load_plugins()
    if pretrained in WEIGHT_IDENTITIES:
        return f"{pretrained}:sha256:{WEIGHT_IDENTITIES[pretrained](model_name)}"
    if pretrained in WEIGHT_SOURCES:
        return f"plugin:{pretrained}"
    if pretrained.lower() == RANDOM_WEIGHTS:
        return "random"
    if os.path.isfile(pretrained):
        return f"file:sha256:{_file_sha256(pretrained)}"
    return f"tag:{pretrained}"


def _file_sha256(path: str) -> str:
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def images_digest(images: ImageSet | None) -> str | None:
    """sha256 of the absolute paths and labels, in order: the listing, not the image bytes."""
    if images is None:
        return None
    digest = hashlib.sha256()
    labels = images.labels.tolist()
    for start in range(0, len(images), DIGEST_CHUNK):  # the same bytes, fewer calls
        part = slice(start, start + DIGEST_CHUNK)
        lines = zip(images.paths[part], labels[part], strict=True)
        digest.update("".join(f"{os.path.abspath(p)}\t{label}\n" for p, label in lines).encode())
    return digest.hexdigest()


def run_identity(
    model_name: str,
    pretrained: str,
    class_names: list[str],
    recipe: Recipe,
    unlabeled: ImageSet,
    test: ImageSet | None = None,
) -> dict:
    """Everything that determines an adaptation run's numbers (the runtime aside)."""
    identity = {
        "recipe": asdict(recipe),
        "model": model_name,
        "pretrained": pretrained,
        "weights": weights_identity(model_name, pretrained),
        "class_names": list(class_names),
        "unlabeled": images_digest(unlabeled),
        "test": images_digest(test),
    }
    if recipe.augment != "none":
        identity["augmentation_draws"] = AUGMENTATION_DRAWS
    return identity


def digest(components: dict) -> str:
    """A short hash of a dict of components."""
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()[:16]


def describe_changes(old: dict, new: dict) -> list[str]:
    """One phrase per component that differs, recipe settings named by their option."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "recipe" and isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    flag = "--" + name.replace("_", "-")
                    changes.append(f"{flag} ({_short(a.get(name))} -> {_short(b.get(name))})")
            continue
        if key == "augmentation_draws":
            if _augment(old) != _augment(new):  # the --augment line says it
                continue
            a, b = a or EARLIER_DRAWS, b or EARLIER_DRAWS
        what = COMPONENT_NAMES.get(key, key)
        if key in ("unlabeled", "test", "weights"):
            changes.append(what)
        else:
            changes.append(f"{what} ({_short(a)} -> {_short(b)})")
    return changes


def _augment(components: dict) -> object:
    recipe = components.get("recipe")
    return recipe.get("augment") if isinstance(recipe, dict) else None


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."
