"""Everything about prompts: parsing, validation, and the model's vocabulary.

**Parsing.** One parser of the label-map JSON ``{"1": "liver", "5": ["spleen", "the spleen"],
"instance_label": 0}`` (:func:`parse_label_map`) serves ``segment --prompt-file``
(:func:`read_prompt_file`), the challenge npz ``text_prompts`` (:func:`prompts_for`), ``train``/``finetune``
prompt files (:func:`read_prompt_collection`) and ``eval --labels`` (:func:`read_labels_json`). One rule
applies everywhere; a violation is a one-line :class:`~text3dsam_cli.errors.InputError` naming the file:

* every key but ``instance_label`` is a label value: an integer 1..65535 written in decimal digits; two keys
  with the same value (``"1"`` and ``"01"``) are a repeat and refused;
* every value is a prompt text or a list of phrasings, each a string that is a prompt (the first is the prompt);
* ``instance_label``, when present, is 0, 1, true or false (JSON booleans, or those words/digits as text).

**Prompt text.** One rule (:func:`prompt_problem`) for every prompt, wherever it comes from (command line,
prompt files, npz ``text_prompts``, the Python API, the viewer): a prompt must be valid text (no lone
surrogates, e.g. the ``'\\udcff'`` that stands for a byte that is not UTF-8 on a command line) and must hold at
least one character that is not whitespace, a control or format character (NUL, zero-width space U+200B, ...),
a combining mark or U+FFFD: the text BERT's normalisation keeps. :func:`check_prompts` raises the
:class:`~text3dsam_cli.errors.UsageError` for a prompt given to segment (exit status 2, before the model loads).

**Vocabulary.** The phrasings the model was trained on (the CVPR 2025 text-guided 3D segmentation
challenge's prompt list), grouped into classes named by their first phrasing, per modality, shipped as
``text3dsam_cli/data/vocabulary.json`` (see ``text3dsam_cli/data/NOTICE``, ``docs/prompts.md``):
:func:`load_vocabulary`, :func:`search_vocabulary` (case-insensitive, typo-tolerant) and
:func:`match_prompt` (whether a prompt is one the model knows, after normalising case, spaces and punctuation).
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from text3dsam_cli.errors import InputError, UsageError

if TYPE_CHECKING:
    from text3dsam_cli.io.volume import Volume

__all__ = [
    "INSTANCE_KEY",
    "MAX_LABEL_VALUE",
    "LabelMap",
    "Preset",
    "VocabularyEntry",
    "VocabularyMatch",
    "add_presets",
    "check_known_prompts",
    "check_label_map_prompts",
    "check_prompt",
    "check_prompts",
    "describe_unknown",
    "find_preset",
    "is_label_map",
    "load_presets",
    "load_vocabulary",
    "match_prompt",
    "normalize_text",
    "parse_label_map",
    "parse_phrasings",
    "prompt_modality",
    "prompt_problem",
    "prompts_for",
    "read_json_object",
    "read_labels_json",
    "read_prompt_collection",
    "read_prompt_file",
    "search_vocabulary",
    "show_prompt",
    "unknown_prompts",
]

INSTANCE_KEY = "instance_label"
MAX_LABEL_VALUE = 65535
_DIGITS = re.compile(r"[+-]?\d+")
_INSTANCE_WORDS = {"0": False, "1": True, "false": False, "true": True}

# -- parsing and validation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelMap:
    """A validated label map: per label its value and phrasings (in the file's order), and the instance flag.

    ``instance`` is None when the map has no ``instance_label`` entry (callers pick their default).
    """

    values: tuple[int, ...]
    phrasings: tuple[tuple[str, ...], ...]
    instance: bool | None

    @property
    def prompts(self) -> list[str]:
        """The prompt of each label: its first phrasing, as written."""
        return [texts[0] for texts in self.phrasings]

    def phrasings_of(self, value: int) -> tuple[str, ...] | None:
        """The phrasings of label ``value``, or None when the map has no such label."""
        for v, texts in zip(self.values, self.phrasings):
            if v == value:
                return texts
        return None


def _label_value(key: Any, where: str | Path | None, context: str) -> int:
    """A label-map key as a label value 1..65535 (else an InputError)."""
    if isinstance(key, bool) or not isinstance(key, (int, str)) or \
            (isinstance(key, str) and not _DIGITS.fullmatch(key.strip())):
        raise InputError(f"{context}key {key!r} is not an integer label value (1..{MAX_LABEL_VALUE})", where)
    value = int(key)
    if not 0 < value <= MAX_LABEL_VALUE:
        raise InputError(f"{context}label value {value} is outside 1..{MAX_LABEL_VALUE}"
                         + (" (0 is the background)" if value == 0 else ""), where)
    return value


def _instance_flag(value: Any, where: str | Path | None, context: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, float) and value in (0.0, 1.0):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _INSTANCE_WORDS:
        return _INSTANCE_WORDS[value.strip().lower()]
    raise InputError(f"{context}'{INSTANCE_KEY}' must be 0, 1, true or false, got {value!r}", where)


#: Unicode categories that hold no text for the model: controls, format characters (zero-width space U+200B,
#: joiners, BOM, ...), separators and combining marks (BERT's normalisation drops or splits on all of them).
_NOT_TEXT = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Me"})


def prompt_problem(text: Any) -> str | None:
    """What makes ``text`` no prompt, or None when it is one: the one rule for every prompt (module docstring).

    Not a string: ``"is not text"``; a lone surrogate (``'\\udcff'``: a byte that is not UTF-8, as Python
    passes it from a command line; or ``"\\ud800"`` from JSON): ``"is not valid text ..."``; nothing left once
    whitespace, control and format characters, combining marks and U+FFFD are taken out: ``"is empty ..."``.
    """
    if not isinstance(text, str):
        return f"is not text ({type(text).__name__})"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        if "\udc80" <= bad <= "\udcff":  # surrogateescape: the byte the command line or file held
            return f"is not valid text (byte 0x{ord(bad) - 0xDC00:02x} is not UTF-8)"
        return f"is not valid text (lone surrogate U+{ord(bad):04X})"
    for char in text:
        if char != "\ufffd" and not char.isspace() and unicodedata.category(char) not in _NOT_TEXT:
            return None
    if not text:
        return "is empty"
    return "is empty: it holds only spaces, control or invisible characters"


def show_prompt(text: Any) -> str:
    """A prompt quoted for a one-line message: ``repr`` escapes line breaks, control and invisible characters
    and surrogates, so the message prints on any terminal."""
    shown = repr(text)
    return shown if len(shown) <= 80 else shown[:76] + "...'"


def check_prompt(text: Any, where: str | Path | None = None, context: str = "") -> str:
    """``text`` when it is a prompt (:func:`prompt_problem`), else a one-line UsageError naming it (and ``where``)."""
    problem = prompt_problem(text)
    if problem is not None:
        raise UsageError(f"{context}prompt {show_prompt(text)} {problem}", where)
    return text


def check_prompts(prompts: Sequence[Any], where: str | Path | None = None, context: str = "") -> list[str]:
    """Every prompt checked by :func:`check_prompt` (the first bad one raises); the prompts as a list."""
    return [check_prompt(p, where, context) for p in prompts]


def check_label_map_prompts(data: Any, where: str | Path | None = None, context: str = "") -> None:
    """Every string phrasing of a label map (a prompt file, an npz's ``text_prompts``) checked by
    :func:`check_prompt` (a UsageError); everything else about the map is :func:`parse_label_map`'s."""
    if not isinstance(data, Mapping):
        return
    for key, value in data.items():
        if key == INSTANCE_KEY:
            continue
        for text in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(text, str):
                check_prompt(text, where, f"{context}label {key!r}: ")


def parse_phrasings(value: Any, key: Any, where: str | Path | None = None, context: str = "") -> tuple[str, ...]:
    """A label's prompt text or list of phrasings, each a prompt by :func:`prompt_problem` (else an InputError)."""
    texts = list(value) if isinstance(value, (list, tuple)) else [value]
    problems = [prompt_problem(t) for t in texts]
    if not texts or any(problems):
        detail = next((f"; {show_prompt(t)} {p}" for t, p in zip(texts, problems) if p and isinstance(t, str)), "")
        raise InputError(f"{context}label {key!r} needs a non-empty prompt text (or a list of them), "
                         f"got {show_prompt(value)}{detail}", where)
    return tuple(texts)


def parse_label_map(data: Any, where: str | Path | None = None, context: str = "") -> LabelMap:
    """Validate a label map ``{"<value>": text | [texts], ..., "instance_label": 0|1}`` (see the module rule).

    ``where`` names the file in errors; ``context`` prefixes the message (e.g. ``"text_prompts: "``).
    """
    if not isinstance(data, Mapping):
        raise InputError(f'{context}expected a JSON object like {{"1": "liver", "2": "spleen"}}, got '
                         f"{type(data).__name__}", where)
    instance = None
    seen: dict[int, Any] = {}
    values, phrasings = [], []
    for key, value in data.items():
        if key == INSTANCE_KEY:
            instance = _instance_flag(value, where, context)
            continue
        number = _label_value(key, where, context)
        if number in seen:
            raise InputError(f"{context}label value {number} is given twice (keys {seen[number]!r} and {key!r})",
                             where)
        seen[number] = key
        values.append(number)
        phrasings.append(parse_phrasings(value, key, where, context))
    if not values:
        raise InputError(f"{context}no prompts (no label entries)", where)
    return LabelMap(tuple(values), tuple(phrasings), instance)


def is_label_map(data: Mapping[str, Any]) -> bool:
    """Whether a prompt JSON is one label map (keys are label numbers) rather than keyed by dataset name."""
    keys = [k for k in data if k != INSTANCE_KEY]
    return bool(keys) and all(isinstance(k, str) and _DIGITS.fullmatch(k.strip()) for k in keys)


def read_json_object(path: str | Path, what: str = "prompt file") -> dict[str, Any]:
    """A JSON file holding an object; InputError naming the file when missing, unreadable or not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"no such {what}", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the {what} ({exc})", path) from None
    except ValueError as exc:
        raise InputError(f"invalid JSON in the {what} ({exc})", path) from None
    if not isinstance(data, dict) or not data:
        raise InputError(f'the {what} should hold a non-empty JSON object like {{"1": "liver", "2": "spleen"}}',
                         path)
    return data


def read_prompt_file(path: str | Path) -> tuple[list[str], list[int]]:
    """``segment --prompt-file``: prompts and label values from a JSON label map (values as given; a list of
    phrasings takes its first) or from plain text, one prompt per line (values 1..K; blank lines and ``#``
    comments skipped)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        data = read_json_object(path)
        check_label_map_prompts(data, path)
        label_map = parse_label_map(data, path)
        return [p.strip() for p in label_map.prompts], list(label_map.values)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("no such prompt file", path) from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"the prompt file is not valid UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                         f"{exc.start})", path) from None
    except OSError as exc:
        raise InputError(f"cannot read the prompt file ({exc})", path) from None
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)
             if line.strip() and not line.lstrip().startswith("#")]
    for number, line in lines:
        check_prompt(line, path, f"line {number}: ")
    prompts = [line for _, line in lines]
    if not prompts:
        raise InputError("no prompts in the file", path)
    return prompts, list(range(1, len(prompts) + 1))


def prompts_for(volume: Volume, prompts: Sequence[str],
                label_values: Sequence[int] | None = None) -> tuple[list[str], list[int], bool]:
    """Prompts, label values and the instance flag: the given prompts (values 1..K unless given) or, without
    prompts, the input's own challenge ``text_prompts`` (validated by :func:`parse_label_map`; a list of
    phrasings takes its first, as the challenge does)."""
    if prompts:
        values = list(label_values) if label_values is not None else list(range(1, len(prompts) + 1))
        return check_prompts(prompts), values, False
    stored = volume.meta.get("text_prompts")
    if not stored:
        raise InputError("no prompts: give PROMPT arguments (this input carries no text_prompts)", volume.path)
    check_label_map_prompts(stored, volume.path, "text_prompts: ")
    label_map = parse_label_map(stored, volume.path, "text_prompts: ")
    return label_map.prompts, list(label_map.values), bool(label_map.instance)


def prompts_to_segment(prompts: Sequence[str], values: Sequence[int],
                       instance: bool) -> tuple[list[str], list[int]]:
    """The prompts and label values that are segmented: all of them, except in a challenge instance case
    (``instance_label`` 1), which segments its first prompt alone as label 1 (instances are then told apart
    by connected components)."""
    if instance:
        return list(prompts[:1]), [1]
    return list(prompts), list(values)


def read_prompt_collection(path: str | Path) -> dict[str, Any]:
    """``train --prompts``: one label map, or label maps keyed by dataset name (the challenge's
    ``CVPR25_TextSegFMData_with_class.json``). Every label map in it is validated; the data comes back as read."""
    path = Path(path)
    data = read_json_object(path)
    if is_label_map(data) or not all(isinstance(v, dict) for v in data.values()):
        parse_label_map(data, path)  # not keyed by dataset: must be one valid label map
        return data
    for dataset, label_map in data.items():
        parse_label_map(label_map, path, f"dataset {dataset!r}: ")
    return data


def read_labels_json(path: str | Path | None) -> LabelMap | None:
    """``eval --labels``: the label map of a labels JSON, or None when no file is given."""
    if path is None:
        return None
    path = Path(path)
    return parse_label_map(read_json_object(path, "labels JSON"), path)


# -- the vocabulary -----------------------------------------------------------------------------------------

VOCABULARY_RESOURCE = "vocabulary.json"
#: Modality names of the vocabulary and the spellings ``--modality`` also accepts for them.
MODALITY_ALIASES = {"CT": "CT", "MR": "MR", "MRI": "MR", "PET": "PET", "PT": "PET", "US": "US",
                    "MICROSCOPY": "Microscopy"}
#: Search keeps classes scoring at least this (0..100, rapidfuzz's partial ratio; see docs/prompts.md).
SEARCH_CUTOFF = 80.0


@dataclass(frozen=True)
class VocabularyEntry:
    """One class of the vocabulary: its name (first phrasing), modality, the datasets and phrasings it has."""

    name: str
    modality: str
    datasets: list[str]
    phrasings: list[str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (``text3dsam prompts --json``)."""
        return {"name": self.name, "modality": self.modality, "datasets": list(self.datasets),
                "phrasings": list(self.phrasings)}


@dataclass(frozen=True)
class VocabularyMatch:
    """How a prompt relates to the vocabulary.

    ``known``: its normalised text equals a trained phrasing; ``closest``: the class of the most similar
    phrasing; ``phrasing``: that phrasing; ``score``: their similarity, 0..1 (1.0 when known).
    """

    known: bool
    closest: str
    score: float
    phrasing: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The sidecar's ``labels[i].vocabulary``."""
        return {"known": self.known, "closest": self.closest, "score": round(self.score, 4)}


def normalize_text(text: str) -> str:
    """Lower case, punctuation and underscores to spaces, runs of spaces to one: ``"Left  Kidney."`` ->
    ``"left kidney"``."""
    return " ".join(re.sub(r"[\W_]+", " ", str(text).casefold()).split())


def normalize_modality(modality: str) -> str:
    """A ``--modality`` spelling as a vocabulary modality (``ct`` -> ``CT``, ``PT`` -> ``PET``); unknown
    spellings come back unchanged (and match nothing)."""
    return MODALITY_ALIASES.get(modality.strip().upper(), modality.strip())


@functools.lru_cache(maxsize=1)
def _vocabulary_document() -> dict[str, Any]:
    text = resources.files("text3dsam_cli").joinpath("data", VOCABULARY_RESOURCE).read_text(encoding="utf-8")
    return json.loads(text)


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[VocabularyEntry, ...]:
    return tuple(VocabularyEntry(e["name"], e["modality"], list(e["datasets"]), list(e["phrasings"]))
                 for e in _vocabulary_document()["classes"])


# -- presets: the training datasets' class lists -------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A named prompt set: one training dataset's classes, each once, in a trained phrasing.

    ``values`` are the dataset's own label values (in ascending order), ``prompts`` their phrasings (the first
    of each label's phrasings that belongs to one modality of the vocabulary, else its first); ``instance``:
    the dataset is an instance case in the challenge (its label is split into instances by components).
    """

    name: str
    modality: str
    values: tuple[int, ...]
    prompts: tuple[str, ...]
    instance: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (``text3dsam prompts --presets --json``)."""
        return {"name": self.name, "modality": self.modality, "prompts": list(self.prompts),
                "labels": {str(v): p for v, p in zip(self.values, self.prompts)}, "instance": self.instance}


@functools.lru_cache(maxsize=1)
def _presets() -> tuple[Preset, ...]:
    return tuple(Preset(e["name"], e["modality"], tuple(int(v) for v in e["labels"]), tuple(e["labels"].values()),
                        bool(e["instance"])) for e in _vocabulary_document()["presets"])


def load_presets(modality: str | None = None) -> list[Preset]:
    """Every preset (one per training dataset, in the prompt list's order), or those of one modality."""
    found = list(_presets())
    if modality:
        wanted = normalize_modality(modality).casefold()
        found = [p for p in found if p.modality.casefold() == wanted]
    return found


def find_preset(name: str) -> Preset:
    """The preset called ``name`` (compared after :func:`normalize_text`: ``ct-amos`` is ``CT_AMOS``); a
    :class:`~text3dsam_cli.errors.UsageError` naming the closest names otherwise."""
    from text3dsam_cli.errors import UsageError

    by_name = {normalize_text(p.name): p for p in _presets()}
    found = by_name.get(normalize_text(name))
    if found is not None:
        return found
    from rapidfuzz import fuzz, process

    choices = {normalize_text(p.name): p.name for p in _presets()}
    close = [choices[text] for text, _, _ in process.extract(normalize_text(name), list(choices), scorer=fuzz.WRatio,
                                                             limit=3, score_cutoff=70)]
    hint = f" (closest: {', '.join(close)})" if close else ""
    raise UsageError(f"unknown --preset {name!r}{hint}; 'text3dsam prompts --presets' lists them")


def add_presets(names: Sequence[str], prompts: Sequence[str],
                values: Sequence[int] | None = None) -> tuple[list[str], list[int]]:
    """``prompts`` (label ``values``, default 1..K) followed by the prompts of the named presets.

    Label values: the first source keeps its own (the PROMPT arguments 1..K, a JSON prompt file its values, or,
    when there are no other prompts, the first preset its dataset's label values, so a lone preset numbers its
    labels like the dataset's ground truth); every prompt a later preset adds takes the next value above the
    largest so far. A preset prompt whose text (normalised) is already among the prompts is not added again.
    """
    out = list(prompts)
    numbers = list(values) if values is not None else list(range(1, len(out) + 1))
    seen = {normalize_text(p) for p in out}
    for name in names:
        preset = find_preset(name)
        keep = not out
        for value, prompt in zip(preset.values, preset.prompts):
            if normalize_text(prompt) in seen:
                continue
            seen.add(normalize_text(prompt))
            out.append(prompt)
            numbers.append(value if keep else max(numbers, default=0) + 1)
    return out, numbers


def load_vocabulary() -> list[VocabularyEntry]:
    """Every class of the shipped vocabulary, sorted by modality and name."""
    return list(_vocabulary())


@functools.lru_cache(maxsize=1)
def _phrasing_index() -> tuple[dict[str, int], list[str], list[int]]:
    """Normalised phrasing -> first class index; and the unique normalised phrasings with their class index."""
    exact: dict[str, int] = {}
    for index, entry in enumerate(_vocabulary()):
        for text in (entry.name, *entry.phrasings):
            exact.setdefault(normalize_text(text), index)
    texts = list(exact)
    return exact, texts, [exact[t] for t in texts]


@functools.lru_cache(maxsize=1)
def _phrasing_modalities() -> dict[str, frozenset[str]]:
    """Normalised phrasing -> the vocabulary modalities of every class that has it."""
    found: dict[str, set[str]] = {}
    for entry in _vocabulary():
        for text in (entry.name, *entry.phrasings):
            found.setdefault(normalize_text(text), set()).add(entry.modality)
    return {text: frozenset(modalities) for text, modalities in found.items()}


def prompt_modality(prompts: Sequence[str]) -> tuple[str | None, str]:
    """The one vocabulary modality (``CT``, ``MR``, ``PET``, ``US``, ``Microscopy``) that every known prompt
    belongs to, and a sentence saying so; ``(None, reason)`` when no prompt is known or the known prompts do not
    share exactly one modality. A phrasing used in several modalities (``Liver``: CT and MR) narrows nothing
    alone; with ``Liver in abdominal CT`` the prompts share CT. Unknown prompts are not counted."""
    index = _phrasing_modalities()
    known = [index[key] for key in (normalize_text(p) for p in prompts) if key in index]
    if not known:
        return None, "no prompt is a phrasing of the vocabulary"
    shared = frozenset.intersection(*known)
    if len(shared) != 1:
        names = ", ".join(sorted(shared)) if shared else "none in common"
        return None, f"the known prompts' modalities in the vocabulary: {names}"
    modality = next(iter(shared))
    return modality, (f"every known prompt ({len(known)} of {len(prompts)}) is a {modality} phrasing of the "
                      "vocabulary")


@functools.lru_cache(maxsize=4096)
def match_prompt(text: str) -> VocabularyMatch:
    """Whether ``text`` is a phrasing the model was trained on (after :func:`normalize_text`), and the closest
    class (by rapidfuzz's weighted ratio over every phrasing) when it is not."""
    from rapidfuzz import fuzz, process

    entries = _vocabulary()
    exact, texts, owners = _phrasing_index()
    key = normalize_text(text)
    if key in exact:
        return VocabularyMatch(True, entries[exact[key]].name, 1.0, key)
    best = process.extractOne(key, texts, scorer=fuzz.WRatio) if key else None
    if best is None:
        return VocabularyMatch(False, "", 0.0, "")
    phrasing, score, position = best
    return VocabularyMatch(False, entries[owners[position]].name, float(score) / 100.0, phrasing)


def unknown_prompts(prompts: Sequence[str]) -> list[tuple[str, VocabularyMatch]]:
    """The prompts (each once, in order) that are not phrasings of the vocabulary, with their closest match."""
    out, seen = [], set()
    for prompt in prompts:
        if prompt in seen:
            continue
        seen.add(prompt)
        match = match_prompt(prompt)
        if not match.known:
            out.append((prompt, match))
    return out


def describe_unknown(prompt: str, match: VocabularyMatch) -> str:
    """One line about an unknown prompt: ``prompt 'kidny' is not a phrasing the model was trained on
    (closest known class: Left kidney, similarity 0.83)``."""
    closest = f" (closest known class: {match.closest}, similarity {match.score:.2f})" if match.closest else ""
    return f"prompt {prompt!r} is not a phrasing the model was trained on{closest}"


def check_known_prompts(prompts: Sequence[str], where: str | Path | None = None) -> None:
    """Raise an InputError naming the first prompt that is not in the vocabulary (``--strict-prompts``)."""
    unknown = unknown_prompts(prompts)
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise InputError(f"--strict-prompts: {describe_unknown(*unknown[0])}{more}; see 'text3dsam prompts'",
                         where)


def search_vocabulary(query: str = "", modality: str | None = None,
                      limit: int | None = None) -> list[VocabularyEntry]:
    """Classes whose name or phrasings match ``query`` (case-insensitive, typo-tolerant), best first.

    A class scores the best of rapidfuzz's partial ratio of the query against its name and (10 points lower)
    against its phrasings; classes scoring at least :data:`SEARCH_CUTOFF` are kept, ties ordered by the
    whole-name similarity, then name. An empty query lists every class; a query with no letter or digit
    (``%``, ``.*``, an emoji) matches none. ``modality`` (CT, MR, PET/PT, US,
    Microscopy; any case) filters; ``limit`` caps the number of results.
    """
    from rapidfuzz import fuzz

    entries = list(_vocabulary())
    if modality:
        wanted = normalize_modality(modality).casefold()
        entries = [e for e in entries if e.modality.casefold() == wanted]
    key = normalize_text(query)
    if not key:
        if query.strip():  # text, but no letter or digit to match ("%", ".*", an emoji): nothing matches
            return []
        return entries[:limit] if limit is not None else entries
    scored = []
    for entry in entries:
        name = normalize_text(entry.name)
        score = fuzz.partial_ratio(key, name)
        if score < 100:
            phrase_score = max(fuzz.partial_ratio(key, normalize_text(p)) for p in entry.phrasings)
            score = max(score, phrase_score - 10)
        if score >= SEARCH_CUTOFF:
            scored.append((-score, -fuzz.ratio(key, name), entry.name.casefold(), entry.modality, entry))
    scored.sort(key=lambda item: item[:4])
    found = [item[-1] for item in scored]
    return found[:limit] if limit is not None else found
