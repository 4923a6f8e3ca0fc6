"""Where each dataset lives and how its classes are named: one `DatasetSpec` per name.

Class names and prompt templates follow the CoOp / PromptKD family so that results compare
with the literature: underscores become spaces, EuroSAT uses its descriptive names, Caltech101
drops `BACKGROUND_Google` and `Faces_easy` (100 classes) and singularises four folder names,
SUN397's "/a/apartment_building/outdoor" reads "outdoor apartment building". Label ids follow
the CoOp split files; for TFDS sources they are mapped onto the same order (the only dataset
where TFDS orders differently is Caltech101, whose TFDS labels are lower-cased and sorted).

The three medical sets (BACH, Brain tumour MRI, EyeDR) are not part of that family: their class
names come from the class folders (with the renamings below) and their templates are ours.

This module imports neither TensorFlow nor Keras.
"""

import dataclasses
import re
from collections.abc import Callable

from mtkd_jax.errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SPLITS = ("train", "val", "test")


def _normalise_key(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def humanize(raw: str, renames: dict[str, str] | None = None) -> str:
    """A folder or label name as readable words: `renames` first, else `_` to spaces."""
    if renames:
        renamed = renames.get(_normalise_key(raw))
        if renamed is not None:
            return renamed
    return " ".join(raw.replace("_", " ").split())


def _sun397_name(raw: str) -> str:
    """'/a/apartment_building/outdoor' -> 'outdoor apartment building' (as CoOp reads it)."""
    parts = raw.strip("/").split("/")
    if len(parts) > 1 and len(parts[0]) == 1:  # the leading "/a/" letter folder
        parts = parts[1:]
    return humanize(" ".join(reversed(parts)))


def _caltech101_order(tfds_names: list[str]) -> list[str]:
    """CoOp's Caltech101 labels: original folder names sorted case-sensitively, which puts the
    three capitalised folders (Faces, Leopards, Motorbikes) first; background and Faces_easy
    dropped. TFDS lower-cases and sorts all 102, so its order differs."""
    capitalised = ("faces", "leopards", "motorbikes")
    kept = [n for n in tfds_names if n not in ("background_google", "faces_easy")]
    return sorted(kept, key=lambda n: (n not in capitalised, n))


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Everything the loaders need to know about one dataset name.

    Attributes:
      name: the `--dataset` name.
      templates: prompt templates with one `{}` for the class name.
      tfds_name: TFDS builder name (with config), or None when TFDS does not serve it.
      tfds_splits: our split name -> TFDS split name; a missing "val" is carved from train
        (20% per class, as CoOp does), a missing "test" too (train/val/test 50/20/30 per class).
      tfds_order: TFDS label names -> the kept names in our label order (default: all, as is).
      coop_dir: folder under the data root (CoOp: `DATA/<coop_dir>`).
      image_dir: images folder inside `coop_dir` ("" for the folder itself).
      split_file: the split JSON inside `coop_dir`, or None.
      reference_split_file: the authors' own split JSON there (MTKD's medical sets), read with
        `--reference_data`.
      layout: "coop" (split JSON), "aircraft" (images_variant_*.txt), "class_folders"
        (medical sets and `folder:` roots: split created on first use), "generated" (shapes).
      renames: normalised raw name -> readable class name.
      namer: raw label/folder name -> readable class name (default: `humanize` with renames).
    """

    name: str
    templates: tuple[str, ...]
    tfds_name: str | None = None
    tfds_splits: dict[str, str] = dataclasses.field(default_factory=dict)
    tfds_order: Callable[[list[str]], list[str]] | None = None
    coop_dir: str | None = None
    image_dir: str = "images"
    split_file: str | None = None
    reference_split_file: str | None = None
    layout: str = "coop"
    renames: dict[str, str] = dataclasses.field(default_factory=dict)
    namer: Callable[[str], str] | None = None

    def classname(self, raw: str) -> str:
        """The readable class name of a raw TFDS label, folder or split-file name."""
        if self.namer is not None:
            return self.namer(raw)
        return humanize(raw, {_normalise_key(k): v for k, v in self.renames.items()})


_TRAIN_TEST = {"train": "train", "test": "test"}
_TRAIN_VAL_TEST = {"train": "train", "val": "validation", "test": "test"}

_SPECS = [
    DatasetSpec(
        name="oxford_pets",
        templates=("a photo of a {}, a type of pet.",),
        tfds_name="oxford_iiit_pet",
        tfds_splits=_TRAIN_TEST,
        coop_dir="oxford_pets",
        split_file="split_zhou_OxfordPets.json",
        namer=lambda raw: humanize(raw.lower()),
    ),
    DatasetSpec(
        name="oxford_flowers",
        templates=("a photo of a {}, a type of flower.",),
        tfds_name="oxford_flowers102",
        tfds_splits=_TRAIN_VAL_TEST,
        coop_dir="oxford_flowers",
        image_dir="jpg",
        split_file="split_zhou_OxfordFlowers.json",
    ),
    DatasetSpec(
        name="caltech101",
        templates=("a photo of a {}.",),
        tfds_name="caltech101",
        tfds_splits=_TRAIN_TEST,
        tfds_order=_caltech101_order,
        coop_dir="caltech-101",
        image_dir="101_ObjectCategories",
        split_file="split_zhou_Caltech101.json",
        renames={
            "airplanes": "airplane",
            "faces": "face",
            "leopards": "leopard",
            "motorbikes": "motorbike",
        },
    ),
    DatasetSpec(
        name="dtd",
        templates=("{} texture.",),
        tfds_name="dtd",
        tfds_splits=_TRAIN_VAL_TEST,
        coop_dir="dtd",
        split_file="split_zhou_DescribableTextures.json",
    ),
    DatasetSpec(
        name="eurosat",
        templates=("a centered satellite photo of {}.",),
        tfds_name="eurosat/rgb",
        tfds_splits={"train": "train"},
        coop_dir="eurosat",
        image_dir="2750",
        split_file="split_zhou_EuroSAT.json",
        renames={
            "AnnualCrop": "Annual Crop Land",
            "Forest": "Forest",
            "HerbaceousVegetation": "Herbaceous Vegetation Land",
            "Highway": "Highway or Road",
            "Industrial": "Industrial Buildings",
            "Pasture": "Pasture Land",
            "PermanentCrop": "Permanent Crop Land",
            "Residential": "Residential Buildings",
            "River": "River",
            "SeaLake": "Sea or Lake",
        },
    ),
    DatasetSpec(
        name="fgvc_aircraft",
        templates=("a photo of a {}, a type of aircraft.",),
        coop_dir="fgvc_aircraft",
        layout="aircraft",
    ),
    DatasetSpec(
        name="food101",
        templates=("a photo of {}, a type of food.",),
        tfds_name="food101",
        tfds_splits={"train": "train", "test": "validation"},
        coop_dir="food-101",
        split_file="split_zhou_Food101.json",
    ),
    DatasetSpec(
        name="stanford_cars",
        templates=("a photo of a {}.",),
        tfds_name="cars196",
        tfds_splits=_TRAIN_TEST,
        coop_dir="stanford_cars",
        image_dir="",
        split_file="split_zhou_StanfordCars.json",
    ),
    DatasetSpec(
        name="sun397",
        templates=("a photo of a {}.",),
        tfds_name="sun397",
        tfds_splits=_TRAIN_VAL_TEST,
        coop_dir="sun397",
        image_dir="SUN397",
        split_file="split_zhou_SUN397.json",
        namer=_sun397_name,
    ),
    DatasetSpec(
        name="ucf101",
        templates=("a photo of a person doing {}.",),
        coop_dir="ucf101",
        image_dir="UCF-101-midframes",
        split_file="split_zhou_UCF101.json",
    ),
    DatasetSpec(
        name="bach",
        templates=("a breast histology image showing {}.",),
        coop_dir="bach",
        layout="class_folders",
        split_file="split_mtkd_bach.json",
        reference_split_file="split_BACH.json",
        renames={
            "Normal": "normal tissue",
            "Benign": "benign tumour",
            "InSitu": "in situ carcinoma",
            "Invasive": "invasive carcinoma",
        },
    ),
    DatasetSpec(
        name="brain",
        templates=("a brain MRI showing {}.",),
        coop_dir="brain",
        layout="class_folders",
        split_file="split_mtkd_brain.json",
        reference_split_file="split_brain.json",
        renames={
            "glioma": "glioma tumour",
            "glioma_tumor": "glioma tumour",
            "meningioma": "meningioma tumour",
            "meningioma_tumor": "meningioma tumour",
            "pituitary": "pituitary tumour",
            "pituitary_tumor": "pituitary tumour",
            "notumor": "no tumour",
            "no_tumor": "no tumour",
        },
    ),
    DatasetSpec(
        name="eyedr",
        templates=("a retinal fundus photograph showing {}.",),
        coop_dir="eyedr",
        layout="class_folders",
        split_file="split_mtkd_eyedr.json",
        reference_split_file="split_eyedr.json",
        renames={
            "No_DR": "no diabetic retinopathy",
            "Mild": "mild diabetic retinopathy",
            "Moderate": "moderate diabetic retinopathy",
            "Severe": "severe diabetic retinopathy",
            "Proliferate_DR": "proliferative diabetic retinopathy",
            "Proliferative_DR": "proliferative diabetic retinopathy",
        },
    ),
    DatasetSpec(name="shapes", templates=(), layout="generated"),
]

REGISTRY: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}
DATASET_NAMES: tuple[str, ...] = tuple(REGISTRY) + ("folder:/path/to/class/folders",)
FOLDER_PREFIX = "folder:"


def get_spec(name: str) -> DatasetSpec:
    """The spec of a dataset name; `folder:/path` gets a generic class-folder spec.

    Raises:
      ValueError: unknown name, listing the valid ones.
    """
    if not isinstance(name, str):
        raise InputError(f"A dataset name must be a string. Received: name={name!r}")
    if name.startswith(FOLDER_PREFIX):
        root = name[len(FOLDER_PREFIX) :]
        if not root:
            raise InputError(
                "`folder:` needs the path of a folder of class folders, e.g. "
                f"'folder:/data/my_set'. Received: name={name!r}"
            )
        return DatasetSpec(
            name=name,
            templates=("a photo of a {}.",),
            coop_dir=root,
            image_dir="",
            layout="class_folders",
            split_file="split_mtkd.json",
        )
    if name not in REGISTRY:
        raise InputError(
            f"Unknown dataset. Valid names: {', '.join(DATASET_NAMES)}. Received: name={name!r}"
        )
    return REGISTRY[name]
