"""Derive ``text3dsam_cli/data/vocabulary.json`` from the challenge's prompt list.

    python scripts/build_vocabulary.py ../shared/data/prompts/CVPR25_TextSegFMData_with_class.json

The source (``{dataset: {"<label>": [phrasings], "instance_label": 0|1}}``, 68 datasets, 3,186 phrasings)
is the CVPR 2025 text-guided 3D segmentation challenge's prompt list as published in yinghemedical/Medal-S
``data/challenge_data/`` (CC BY-NC-SA 4.0). Rules:

* modality: the dataset name's prefix before the first ``_`` (``CT_AMOS`` -> ``CT``, ``MR_...`` -> ``MR``,
  ``US_...`` -> ``US``, ``Microscopy_...`` -> ``Microscopy``); ``autoPET`` has no prefix and is ``PET``;
* class: a label's first phrasing is its name (the file lists the class name first, then variants); labels of
  one modality whose names are equal after normalising case, spaces and punctuation are one class (so 248
  distinct (name, modality) spellings become 247 classes: ``Left atrium``/``Left Atrium`` in MR);
* each class keeps the datasets it occurs in and its phrasings (first spelling of each normalised phrasing,
  in file order); classes are sorted by modality, then name;
* presets: one per dataset (file order), its label values (ascending) and, per label, one trained phrasing:
  the first of the label's phrasings that belongs to classes of one modality only and to no other dataset
  (so it names the modality and, where the file has one, the dataset's own wording: BraTS-T2f's
  ``Non-enhancing tumor core in head MR T2 FLAIR``), else the first of one modality only (``Spleen`` is CT
  and MR), else its first phrasing; and the instance flag.

``tests/test_prompts.py`` checks that the shipped file equals what this script derives.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).resolve().parents[1] / "text3dsam_cli" / "data" / "vocabulary.json"
MODALITY_ORDER = ("CT", "MR", "PET", "US", "Microscopy")
SOURCE = {
    "name": "CVPR 2025 challenge: foundation models for text-guided 3D biomedical image segmentation "
            "(CVPR-BiomedSegFM), prompt list CVPR25_TextSegFMData_with_class.json",
    "published": "https://github.com/yinghemedical/Medal-S (data/challenge_data/)",
    "licence": "CC BY-NC-SA 4.0",
}


def normalize(text: str) -> str:
    """Same rule as ``text3dsam_cli.prompts.normalize_text``."""
    return " ".join(re.sub(r"[\W_]+", " ", str(text).casefold()).split())


def modality_of(dataset: str) -> str:
    prefix = dataset.split("_", 1)[0]
    if prefix == "autoPET":
        return "PET"
    if prefix not in MODALITY_ORDER:
        raise ValueError(f"dataset {dataset!r}: unknown modality prefix {prefix!r}")
    return prefix


def derive(source: dict[str, Any]) -> dict[str, Any]:
    """The vocabulary document derived from the parsed prompt list."""
    classes: dict[tuple[str, str], dict[str, Any]] = {}
    seen: dict[tuple[str, str], set[str]] = {}
    for dataset, labels in source.items():
        modality = modality_of(dataset)
        for key, phrasings in labels.items():
            if key == "instance_label":
                continue
            texts = [t.strip() for t in (phrasings if isinstance(phrasings, list) else [phrasings])]
            ident = (modality, normalize(texts[0]))
            entry = classes.setdefault(ident, {"name": texts[0], "modality": modality, "datasets": [],
                                               "phrasings": []})
            if dataset not in entry["datasets"]:
                entry["datasets"].append(dataset)
            known = seen.setdefault(ident, set())
            for text in texts:
                if normalize(text) not in known:
                    known.add(normalize(text))
                    entry["phrasings"].append(text)
    ordered = sorted(classes.values(), key=lambda e: (MODALITY_ORDER.index(e["modality"]), e["name"].casefold()))
    return {"source": SOURCE, "classes": ordered, "presets": presets(source, ordered)}


def presets(source: dict[str, Any], classes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One prompt set per dataset: label value -> a phrasing that names one modality (see the module rule)."""
    modalities: dict[str, set[str]] = {}
    for entry in classes:
        for text in (entry["name"], *entry["phrasings"]):
            modalities.setdefault(normalize(text), set()).add(entry["modality"])
    users: dict[str, set[str]] = {}
    for dataset, labels in source.items():
        for key, phrasings in labels.items():
            if key != "instance_label":
                for text in (phrasings if isinstance(phrasings, list) else [phrasings]):
                    users.setdefault(normalize(text), set()).add(dataset)
    out = []
    for dataset, labels in source.items():
        chosen: dict[str, str] = {}
        for key, phrasings in labels.items():
            if key == "instance_label":
                continue
            texts = [t.strip() for t in (phrasings if isinstance(phrasings, list) else [phrasings])]
            one_modality = [t for t in texts if len(modalities[normalize(t)]) == 1]
            own = [t for t in one_modality if users[normalize(t)] == {dataset}]
            chosen[str(int(key))] = (own or one_modality or texts)[0]
        if len({normalize(t) for t in chosen.values()}) != len(chosen):
            raise ValueError(f"dataset {dataset!r}: two labels would get the same prompt")
        out.append({"name": dataset, "modality": modality_of(dataset), "instance": bool(labels.get("instance_label")),
                    "labels": dict(sorted(chosen.items(), key=lambda item: int(item[0])))})
    return out


def render(document: dict[str, Any]) -> str:
    """The file's exact text (one class per line keeps diffs readable)."""
    lines = ["{", f'  "source": {json.dumps(document["source"], ensure_ascii=False)},', '  "classes": [']
    rows = [f"    {json.dumps(entry, ensure_ascii=False)}" for entry in document["classes"]]
    lines.append(",\n".join(rows))
    lines += ["  ],", '  "presets": [']
    rows = [f"    {json.dumps(entry, ensure_ascii=False)}" for entry in document["presets"]]
    lines.append(",\n".join(rows))
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    source = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render(derive(source)), encoding="utf-8")
    document = derive(source)
    print(f"{OUTPUT}: {len(document['classes'])} classes, "
          f"{sum(len(e['phrasings']) for e in document['classes'])} phrasings")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
