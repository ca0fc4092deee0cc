"""SNOMED CT codes for the anatomical structures of the vocabulary (DICOM-SEG segments, RTSTRUCT ROIs).

A prompt is coded only when it is a phrasing the model was trained on
(:func:`text3dsam_cli.prompts.match_prompt` says ``known``) and its class is in :data:`STRUCTURES`; every
other prompt keeps the generic code (SCT 85756007 "Tissue"). Codes are never guessed from similar text.

Sources: each entry names a concept of DICOM PS3.16's SNOMED CT dictionary as shipped by pydicom
(``pydicom.sr.codedict.codes.SCT``), taken from the anatomic-structure context groups a segmentation uses
(CID 7151 "Segmentation Property Types", CID 7150 "Segmentation Property Categories" for the category,
CID 244 "Laterality" for left/right); the code values therefore come from the standard, not from this file.
Laterality is a Segmented Property Type Modifier (``Left kidney`` = Kidney 64033007 + Left 7771000), except
for heart chambers, whose left/right concepts are structures of their own (Left atrium 82471001).
Classes deliberately left generic: lesions and tumours (what they are is the prompt's business), ambiguous
names (``Hip``: bone or joint; ``Jugular vein``: internal or external; ``Nucleus``: cell or brain) and
structures without a concept in the dictionary (e.g. individual muscles, lung lobes other than the middle).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

#: Category of every coded structure (CID 7150): "Anatomical Structure".
ANATOMICAL_STRUCTURE = codes.SCT.AnatomicalStructure
#: Generic category and type for prompts without a code (3D Slicer's default for unclassified segments).
TISSUE = codes.SCT.Tissue
LATERALITY = {"left": codes.SCT.Left, "right": codes.SCT.Right}

#: Vocabulary class name (normalised, without a leading "left"/"right") -> pydicom ``codes.SCT`` keyword.
STRUCTURES: dict[str, str] = {
    "adrenal gland": "AdrenalGland",
    "aorta": "Aorta",
    "appendix": "Appendix",
    "ascending colon": "AscendingColon",
    "bladder": "Bladder",
    "urinary bladder": "Bladder",
    "brachiocephalic trunk": "BrachiocephalicTrunk",
    "brachiocephalic vein": "BrachiocephalicVein",
    "brain": "Brain",
    "carotid artery": "CarotidArtery",
    "cecum": "Cecum",
    "circle of willis": "CircleOfWillis",
    "clavicula": "Clavicle",
    "colon": "Colon",
    "common carotid artery": "CommonCarotidArtery",
    "descending colon": "DescendingColon",
    "duodenum": "Duodenum",
    "esophagus": "Esophagus",
    "femur": "Femur",
    "gallbladder": "Gallbladder",
    "heart": "Heart",
    "humerus": "Humerus",
    "iliac artery": "IliacArtery",
    "inferior vena cava": "InferiorVenaCava",
    "postcava": "InferiorVenaCava",  # AbdomenAtlas' name for the inferior vena cava
    "kidney": "Kidney",
    "lacrimal gland": "LacrimalGland",
    "liver": "Liver",
    "lung": "Lung",
    "lung middle lobe right": "MiddleLobeOfRightLung",
    "optic chiasm": "OpticChiasm",
    "optic nerve": "OpticNerve",
    "pancreas": "Pancreas",
    "parotid gland": "ParotidGland",
    "prostate": "Prostate",
    "pulmonary artery": "PulmonaryArtery",
    "pulmonary vein": "PulmonaryVein",
    "rectum": "Rectum",
    "sacrum": "Sacrum",
    "scapula": "Scapula",
    "sigmoid colon": "SigmoidColon",
    "skull": "Skull",
    "small bowel": "SmallIntestine",
    "small intestine": "SmallIntestine",
    "spinal cord": "SpinalCord",
    "spleen": "Spleen",
    "stomach": "Stomach",
    "subclavian artery": "SubclavianArtery",
    "submandibular gland": "SubmandibularGland",
    "superior vena cava": "SuperiorVenaCava",
    "thyroid": "Thyroid",
    "thyroid gland": "Thyroid",
    "trachea": "Trachea",
    "transverse colon": "TransverseColon",
    **{f"vertebrae {p}{n}": f"{p.upper()}{n}Vertebra"
       for p, top in (("c", 7), ("t", 12), ("l", 5)) for n in range(1, top + 1)},
}
#: Left/right structures with concepts of their own (no laterality modifier).
SIDED_STRUCTURES: dict[str, str] = {
    "left atrium": "LeftAtrium",
    "right atrium": "RightAtrium",
    "left ventricle": "LeftVentricle",
    "right ventricle": "RightVentricle",
}


@dataclass(frozen=True)
class StructureCode:
    """How a segment is coded: category, type, and an optional laterality modifier of the type."""

    category: Code
    type: Code
    modifier: Code | None = None

    @property
    def generic(self) -> bool:
        """Whether this is the generic "Tissue" coding (no known structure)."""
        return self.type == TISSUE


GENERIC = StructureCode(TISSUE, TISSUE)


def code_for_class(name: str) -> StructureCode:
    """The coding of a vocabulary class name (``"Left kidney"``), or :data:`GENERIC`."""
    from text3dsam_cli.prompts import normalize_text

    key = normalize_text(name)
    if key in SIDED_STRUCTURES:
        return StructureCode(ANATOMICAL_STRUCTURE, getattr(codes.SCT, SIDED_STRUCTURES[key]))
    side, _, rest = key.partition(" ")
    modifier = LATERALITY.get(side) if rest else None
    base = rest if modifier is not None else key
    keyword = STRUCTURES.get(base)
    if keyword is None:
        return GENERIC
    return StructureCode(ANATOMICAL_STRUCTURE, getattr(codes.SCT, keyword), modifier)


def code_for_prompt(prompt: str) -> StructureCode:
    """The coding of a prompt: its class's when the prompt is a trained phrasing, else :data:`GENERIC`."""
    from text3dsam_cli.prompts import match_prompt

    match = match_prompt(prompt)
    return code_for_class(match.closest) if match.known else GENERIC
