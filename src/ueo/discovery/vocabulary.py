"""Candidate names for groups of images: read a vocabulary, encode it with the adapted prompts.

A vocabulary is WordNet's English nouns by default, read offline from the Debian package
`wordnet-base` (`/usr/share/wordnet/index.noun`: a licence header whose lines start with spaces,
then one lemma per line, `_` for a space), or a user's file of one name per line. Names are
compared as class names are (`ueo.names.normalize_name`): duplicates are dropped, and the
known classes are taken out before naming, so a known class is never proposed as the name of
an unknown group; from WordNet, so are the synonyms of a known class's first (most frequent)
sense (`dog` takes `domestic dog` and `Canis familiaris` with it, not `hot dog`).

Encoding runs every name through the text tower with the adapted model's own learned context,
as its class names are: `[SOS] ctx <name>. [EOS]`. Tens of thousands of names do not fit in
one `PromptLearner` (it holds every prompt padded to the context length), so they are encoded
in chunks, each a learner over its names with the adapted context copied in. The result is
cached under `$UEO_CACHE/vocabulary` (default `~/.cache/ueo/vocabulary`): it depends on the
text tower, the context and the names only, never on the images, so one encoding serves every
later `ueo discover` with the same adapter and vocabulary, whatever its data or `--out`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ueo.errors import UeoError
from ueo.files import atomic_write
from ueo.model import UeoModel
from ueo.names import normalize_name, read_lines, spoken_name
from ueo.prompts import PromptLearner, prompt_text
from ueo.runs import tensors_sha256

log = logging.getLogger("ueo")

WORDNET_NOUNS = Path("/usr/share/wordnet/index.noun")
WORDNET_FILES = ("index.noun", "index.verb", "index.adj", "index.adv")
WORDNET_POS = ("n", "v", "a", "s", "r")
ENCODE_CHUNK = 512  # names per learner: ~75 MB of padded prompt embeddings at width 512
CACHE_FORMAT = 1


@dataclass(frozen=True)
class Vocabulary:
    """Names in order (their spoken form for WordNet, as written for a user's file)."""

    names: tuple[str, ...]
    source: str
    # WordNet only: each name's synsets (offsets in the index file), most frequent sense first.
    senses: dict[str, tuple[int, ...]] | None = field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.names).encode()).hexdigest()


def read_wordnet(path: str | os.PathLike) -> list[str]:
    """The lemmas of a WordNet index file (`index.noun`, ...), `_` read as a space."""
    return list(read_wordnet_senses(path))


def read_wordnet_senses(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Each lemma of a WordNet index file (`_` read as a space) with its synsets, most frequent
    sense first.

    Licence lines start with a space; every other line is `lemma pos synset_cnt p_cnt
    [pointer symbol]*p_cnt sense_cnt tagsense_cnt [synset offset]*` (wndb(5WN)).
    """
    path = Path(path)
    senses: dict[str, tuple[int, ...]] = {}
    for number, line in enumerate(read_lines(path, "WordNet index"), 1):
        if not line.strip() or line.startswith(" "):
            continue
        fields = line.split()
        if len(fields) < 2 or fields[1] not in WORDNET_POS:
            raise UeoError(f"{path}:{number} is not a WordNet index line: {line[:60]!r}.")
        senses[spoken_name(fields[0])] = _synset_offsets(fields)
    return senses


def _synset_offsets(fields: list[str]) -> tuple[int, ...]:
    """The synset offsets of an index line's fields; none if the line is short of them."""
    try:
        first = 4 + int(fields[3]) + 2  # past the pointer symbols, sense_cnt and tagsense_cnt
        return tuple(int(f) for f in fields[first:])
    except (IndexError, ValueError):
        return ()


def read_name_list(path: str | os.PathLike) -> list[str]:
    """One name per line (UTF-8 with or without a BOM, UTF-16/32 with one); blanks skipped."""
    return [line.strip() for line in read_lines(Path(path), "Vocabulary file") if line.strip()]


def load_vocabulary(spec: str | os.PathLike | None = None) -> Vocabulary:
    """`spec` = a file of names (one per line), a WordNet index file (by its name, e.g.
    `index.noun`), or None for WordNet's nouns."""
    if spec is None:
        if not WORDNET_NOUNS.is_file():
            raise UeoError(
                f"No vocabulary: the default, WordNet's nouns ({WORDNET_NOUNS}), is not "
                "installed (sudo apt-get install wordnet-base); or give --vocabulary FILE, one "
                "name per line."
            )
        path = WORDNET_NOUNS
    else:
        path = Path(spec)
        try:
            found = path.is_file()
        except OSError as exc:
            raise UeoError(f"Vocabulary {path}: {exc.strerror}.") from None
        if not found:
            raise UeoError(f"Vocabulary file {path} not found.")
    senses = read_wordnet_senses(path) if path.name in WORDNET_FILES else None
    unique = _unique(list(senses) if senses is not None else read_name_list(path))
    if not unique:
        raise UeoError(f"Vocabulary {path} holds no names.")
    if senses is not None:
        senses = {normalize_name(n): senses[n] for n in unique}
    return Vocabulary(tuple(unique), str(path), senses)


def _unique(names: list[str]) -> list[str]:
    """First occurrence of each name by `normalize_name`, in order."""
    seen, kept = set(), []
    for name in names:
        key = normalize_name(name)
        if key and key not in seen:
            seen.add(key)
            kept.append(name)
    return kept


def without_known(vocabulary: Vocabulary, known: list[str]) -> Vocabulary:
    """The vocabulary less the known class names (so none names an unknown group) and, from
    WordNet, less the synonyms of their first sense (the sense a class list most likely
    means; the others, e.g. `hot dog` for `dog`, can name something else)."""
    keys = {normalize_name(n) for n in known}
    senses = vocabulary.senses or {}
    first = {senses[k][0] for k in keys if senses.get(k)}
    named = ((n, normalize_name(n)) for n in vocabulary.names)
    names = tuple(
        n for n, key in named if key not in keys and not first.intersection(senses.get(key, ()))
    )
    synonyms = len(vocabulary.names) - len(names) - len(keys.intersection(senses))
    if senses and synonyms > 0:
        log.info("Left out %d synonym(s) of the known classes from the vocabulary", synonyms)
    if not names:
        raise UeoError(
            f"The vocabulary {vocabulary.source} holds only known class names"
            f"{' and their synonyms' if senses else ''}: no name is left for unknown groups."
        )
    return Vocabulary(names, vocabulary.source, vocabulary.senses)


def fitting_names(model: UeoModel, names: tuple[str, ...]) -> tuple[str, ...]:
    """The names whose prompt fits the text context; the others are left out with a warning."""
    limit = model.prompt.tower.context_length - 1 - model.prompt.n_ctx  # SOS and ctx first
    encode = model.clip.tokenizer.encode
    kept = tuple(n for n in names if len(encode(prompt_text(n))) + 1 <= limit)
    if len(kept) < len(names):
        fit = set(kept)
        dropped = [n for n in names if n not in fit]
        log.warning(
            "Leaving out %d vocabulary name(s) too long for the text context of %d tokens, e.g. %s",
            len(dropped),
            model.prompt.tower.context_length,
            dropped[0],
        )
    return kept


def cache_dir() -> Path:
    """Where encoded vocabularies are kept: `$UEO_CACHE/vocabulary` or ~/.cache/ueo/vocabulary."""
    base = os.environ.get("UEO_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "ueo") / "vocabulary"


def cache_components(model: UeoModel, names: tuple[str, ...]) -> dict:
    """What an encoding depends on: the network's text-side tensors (everything outside the
    image tower, which adaptation never changes), the context, the prompt's form and the
    names. Hashing the tensors themselves, not their tag, makes random weights and replaced
    files safe too."""
    text = {
        k: v.float().reshape(-1)
        for k, v in model.net.state_dict().items()
        if not k.startswith("visual.")
    }
    return {
        "format": CACHE_FORMAT,
        "model": model.clip.model_name,
        "text_tower_sha256": tensors_sha256(text),
        "ctx_sha256": tensors_sha256({"ctx": model.prompt.ctx.float()}),
        "prompt": "[SOS] ctx {name}. [EOS]",
        "names_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
    }


@torch.no_grad()
def encode_names(
    model: UeoModel, names: tuple[str, ...], progress: bool = True, chunk: int = ENCODE_CHUNK
) -> torch.Tensor:
    """L2-normalised text features of `names` (names x embed dim, fp32, CPU) with the model's
    adapted context, `chunk` names per prompt learner."""
    prompt = model.prompt
    device = prompt.ctx.device
    parts = []
    starts = range(0, len(names), chunk)
    for start in tqdm(starts, desc="encode vocabulary", unit="chunk", disable=not progress):
        # A learner with a random context of the right length, replaced by the adapted one;
        # the random draw must not move the caller's generator.
        with torch.random.fork_rng(devices=_cuda_index(device)):
            learner = PromptLearner(
                model.net,
                model.clip.tokenizer,
                list(names[start : start + chunk]),
                n_ctx=prompt.n_ctx,
                ctx_init=None,
                bucketing=prompt.bucketing,
            )
        learner.ctx.copy_(prompt.ctx)
        parts.append(learner().float().cpu())
    return torch.cat(parts)


def _cuda_index(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [torch.cuda.current_device() if device.index is None else device.index]


def encode_vocabulary(
    model: UeoModel,
    vocabulary: Vocabulary,
    *,
    progress: bool = True,
    cache: Path | None = None,
) -> tuple[tuple[str, ...], torch.Tensor]:
    """(names, features): the vocabulary's names that fit the text context and their features.

    Read from the cache when the same tower, context and vocabulary were encoded before
    (`cache_dir()`, or the folder `cache`); the cached file holds the names it encoded.
    """
    components = cache_components(model, vocabulary.names)
    folder = cache if cache is not None else cache_dir()
    key = hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()[:24]
    path = folder / f"{key}.safetensors"
    cached = _read_cached(path, components)
    if cached is not None:
        log.debug("Vocabulary of %d names read from the cache %s", len(cached[0]), path)
        return cached
    names = fitting_names(model, vocabulary.names)
    if not names:
        raise UeoError(f"No name of vocabulary {vocabulary.source} fits the text context.")
    log.info("Encoding a vocabulary of %d names (cached in %s)", len(names), folder)
    features = encode_names(model, names, progress)
    metadata = {"ueo": json.dumps(components), "names": json.dumps(names)}
    try:
        with atomic_write(path) as tmp:
            save_file({"features": features}, str(tmp), metadata=metadata)
    except OSError as exc:
        log.warning("Could not cache the encoded vocabulary in %s: %s", folder, exc)
    return names, features


def _read_cached(path: Path, components: dict) -> tuple[tuple[str, ...], torch.Tensor] | None:
    """The cached names and features if `path` holds this very encoding; None otherwise."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            stored = json.loads(meta.get("ueo", "null"))
            names = tuple(json.loads(meta.get("names", "[]")))
            features = f.get_tensor("features")
    except Exception as exc:  # safetensors raises its own types for a damaged file
        log.warning("Ignoring the damaged vocabulary cache %s: %s", path, exc)
        return None
    if (
        stored != components
        or not names
        or features.shape[0] != len(names)
        or not torch.isfinite(features).all()
    ):
        return None
    return names, features
