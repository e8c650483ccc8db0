"""Metadata of the MedMNIST v2 / MedMNIST+ datasets (Yang et al., Scientific Data 10:41, 2023).

The facts below (dataset names, task types, label names, channel counts, split sizes,
per-size MD5 checksums and the download address) are taken from the official release's
dataset information table (``medmnist/info.py`` of github.com/MedMNIST/MedMNIST, package
version 3.0.2, the MedMNIST+ release with 64/128/224 sizes) and the Zenodo record it points
to, https://doi.org/10.5281/zenodo.10519652.  The short modality names follow the dataset
tables of the project page https://medmnist.com/.  This is our own table of those facts; the
``medmnist`` package itself is not a dependency.

Sizes: 2D datasets come at 28, 64, 128 and 224 pixels, 3D datasets at 28 and 64 voxels per
side.  The 28-size file is ``{name}.npz``, the others ``{name}_{size}.npz`` (see
:func:`file_name`).  Every file holds the keys ``{train,val,test}_{images,labels}``.

Split sizes are those of the current release (v2.2.4 and later), in which a few blank
samples were removed from OrganAMNIST, OrganCMNIST, OrganSMNIST, OrganMNIST3D and
VesselMNIST3D; older papers may quote slightly larger counts for those five.

Licence: CC BY 4.0, except DermaMNIST, which is CC BY-NC 4.0 (see ``LICENSE_EXCEPTIONS``).

Task codes: ``"binary"`` (official "binary-class"), ``"multiclass"`` ("multi-class"),
``"multilabel"`` ("multi-label, binary-class"), ``"ordinal"`` ("ordinal-regression").
"""

from __future__ import annotations

from typing import Any

ZENODO_RECORD = "10519652"
ZENODO_URL = "https://zenodo.org/records/10519652/files/{file}?download=1"

LICENSE = "CC BY 4.0"
LICENSE_EXCEPTIONS: dict[str, str] = {"dermamnist": "CC BY-NC 4.0"}

SIZES_2D: tuple[int, ...] = (28, 64, 128, 224)
SIZES_3D: tuple[int, ...] = (28, 64)

# Label order shared by the three 2D organ views (OrganA/C/S).  OrganMNIST3D uses a
# different order, spelled out in its own entry.
_ORGAN_2D_LABELS = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)

MEDMNIST: dict[str, dict] = {
    # ------------------------------------------------------------------ 2D
    "pathmnist": {
        "dims": 2,
        "task": "multiclass",
        "modality": "Colon Pathology",
        "channels": 3,
        "labels": [
            "adipose",
            "background",
            "debris",
            "lymphocytes",
            "mucus",
            "smooth muscle",
            "normal colon mucosa",
            "cancer-associated stroma",
            "colorectal adenocarcinoma epithelium",
        ],
        "splits": {"train": 89996, "val": 10004, "test": 7180},
        "md5": {
            28: "a8b06965200029087d5bd730944a56c1",
            64: "55aa9c1e0525abe5a6b9d8343a507616",
            128: "ac42d08fb904d92c244187169d1fd1d9",
            224: "2c51a510bcdc9cf8ddb2af93af1eadec",
        },
    },
    "chestmnist": {
        "dims": 2,
        "task": "multilabel",
        "modality": "Chest X-Ray",
        "channels": 1,
        "labels": [
            "atelectasis",
            "cardiomegaly",
            "effusion",
            "infiltration",
            "mass",
            "nodule",
            "pneumonia",
            "pneumothorax",
            "consolidation",
            "edema",
            "emphysema",
            "fibrosis",
            "pleural",
            "hernia",
        ],
        "splits": {"train": 78468, "val": 11219, "test": 22433},
        "md5": {
            28: "02c8a6516a18b556561a56cbdd36c4a8",
            64: "9de6cd0b934ebb5b7426cfba5efbae16",
            128: "db107e5590b27930b62dbaf558aebee3",
            224: "45bd33e6f06c3e8cdb481c74a89152aa",
        },
    },
    "dermamnist": {
        "dims": 2,
        "task": "multiclass",
        "modality": "Dermatoscope",
        "channels": 3,
        "labels": [
            "actinic keratoses and intraepithelial carcinoma",
            "basal cell carcinoma",
            "benign keratosis-like lesions",
            "dermatofibroma",
            "melanoma",
            "melanocytic nevi",
            "vascular lesions",
        ],
        "splits": {"train": 7007, "val": 1003, "test": 2005},
        "md5": {
            28: "0744692d530f8e62ec473284d019b0c7",
            64: "b70a2f5635c6199aeaa28c31d7202e1f",
            128: "2defd784463fa5243564e855ed717de1",
            224: "8974907d8e169bef5f5b96bc506ae45d",
        },
    },
    "octmnist": {
        "dims": 2,
        "task": "multiclass",
        "modality": "Retinal OCT",
        "channels": 1,
        "labels": [
            "choroidal neovascularization",
            "diabetic macular edema",
            "drusen",
            "normal",
        ],
        "splits": {"train": 97477, "val": 10832, "test": 1000},
        "md5": {
            28: "c68d92d5b585d8d81f7112f81e2d0842",
            64: "e229e9440236b774d9f0dfef9d07bdaf",
            128: "0a97e76651ace45c5d943ee3f65b63ae",
            224: "abc493b6d529d5de7569faaef2773ba3",
        },
    },
    "pneumoniamnist": {
        "dims": 2,
        "task": "binary",
        "modality": "Chest X-Ray",
        "channels": 1,
        "labels": ["normal", "pneumonia"],
        "splits": {"train": 4708, "val": 524, "test": 624},
        "md5": {
            28: "28209eda62fecd6e6a2d98b1501bb15f",
            64: "8f4eceb4ccffa70c672198ea285246c6",
            128: "05b46931834c231683c68f40c47b2971",
            224: "d6a3c71de1b945ea11211b03746c1fe1",
        },
    },
    "retinamnist": {
        "dims": 2,
        "task": "ordinal",
        "modality": "Fundus Camera",
        "channels": 3,
        "labels": ["0", "1", "2", "3", "4"],
        "splits": {"train": 1080, "val": 120, "test": 400},
        "md5": {
            28: "bd4c0672f1bba3e3a89f0e4e876791e4",
            64: "afda852cc34dcda56f86ad2b2457dbcc",
            128: "e48e916a24454daf90583d4e6efb1a18",
            224: "eae7e3b6f3fcbda4ae613ebdcbe35348",
        },
    },
    "breastmnist": {
        "dims": 2,
        "task": "binary",
        "modality": "Breast Ultrasound",
        "channels": 1,
        "labels": ["malignant", "normal, benign"],
        "splits": {"train": 546, "val": 78, "test": 156},
        "md5": {
            28: "750601b1f35ba3300ea97c75c52ff8f6",
            64: "742edef2a1fd1524b2efff4bd7ba9364",
            128: "363e4b3f8d712e9b5de15470a2aaadf1",
            224: "b56378a6eefa9fed602bb16d192d4c8b",
        },
    },
    "bloodmnist": {
        "dims": 2,
        "task": "multiclass",
        "modality": "Blood Cell Microscope",
        "channels": 3,
        "labels": [
            "basophil",
            "eosinophil",
            "erythroblast",
            "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
            "lymphocyte",
            "monocyte",
            "neutrophil",
            "platelet",
        ],
        "splits": {"train": 11959, "val": 1712, "test": 3421},
        "md5": {
            28: "7053d0359d879ad8a5505303e11de1dc",
            64: "2b94928a2ae4916078ca51e05b6b800b",
            128: "adace1e0ed228fccda1f39692059dd4c",
            224: "b718ff6835fcbdb22ba9eacccd7b2601",
        },
    },
    "tissuemnist": {
        "dims": 2,
        "task": "multiclass",
        "modality": "Kidney Cortex Microscope",
        "channels": 1,
        "labels": [
            "Collecting Duct, Connecting Tubule",
            "Distal Convoluted Tubule",
            "Glomerular endothelial cells",
            "Interstitial endothelial cells",
            "Leukocytes",
            "Podocytes",
            "Proximal Tubule Segments",
            "Thick Ascending Limb",
        ],
        "splits": {"train": 165466, "val": 23640, "test": 47280},
        "md5": {
            28: "ebe78ee8b05294063de985d821c1c34b",
            64: "123ece2eba09d0aa5d698fda57103344",
            128: "61b955355d7425a89687b06cca3ce0c2",
            224: "b077128c4a949f0a4eb01517f9037b9c",
        },
    },
    "organamnist": {
        "dims": 2,
        "task": "multiclass",
        "modality": "Abdominal CT",
        "channels": 1,
        "labels": list(_ORGAN_2D_LABELS),
        "splits": {"train": 34561, "val": 6491, "test": 17778},
        "md5": {
            28: "68e3f8846a6bd62f0c9bf841c0d9eacc",
            64: "2dcccc29b88e6da5a01161ef20cda288",
            128: "eeae80d0a227a8d099027e1b3cfd3b60",
            224: "50747347e05c87dd3aaf92c49f9f3170",
        },
    },
    "organcmnist": {
        "dims": 2,
        "task": "multiclass",
        "modality": "Abdominal CT",
        "channels": 1,
        "labels": list(_ORGAN_2D_LABELS),
        "splits": {"train": 12975, "val": 2392, "test": 8216},
        "md5": {
            28: "b9ceb9546e10131b32923c5bbeaea2b1",
            64: "3ce34a8724ea6f548e6db4744d03b6a9",
            128: "773c1f009daa3fe5d9a2a201b2a7ed94",
            224: "050f5e875dc056f6768abf94ec9995d1",
        },
    },
    "organsmnist": {
        "dims": 2,
        "task": "multiclass",
        "modality": "Abdominal CT",
        "channels": 1,
        "labels": list(_ORGAN_2D_LABELS),
        "splits": {"train": 13932, "val": 2452, "test": 8827},
        "md5": {
            28: "9ab87b696fb54e2a387ebe992d6ed5f1",
            64: "53a6d115339d874c25e309a994ff46d3",
            128: "ded0c5fa01a95dc4978b956f613e9b8e",
            224: "b354719e553fbbb2513d5533f52a4cb1",
        },
    },
    # ------------------------------------------------------------------ 3D
    "organmnist3d": {
        "dims": 3,
        "task": "multiclass",
        "modality": "Abdominal CT",
        "channels": 1,
        "labels": [
            "liver",
            "kidney-right",
            "kidney-left",
            "femur-right",
            "femur-left",
            "bladder",
            "heart",
            "lung-right",
            "lung-left",
            "spleen",
            "pancreas",
        ],
        "splits": {"train": 971, "val": 161, "test": 610},
        "md5": {
            28: "a0c5a1ff56af4f155c46d46fbb45a2fe",
            64: "58a2205adf14a9d0a189cb06dc78bf10",
        },
    },
    "nodulemnist3d": {
        "dims": 3,
        "task": "binary",
        "modality": "Chest CT",
        "channels": 1,
        "labels": ["benign", "malignant"],
        "splits": {"train": 1158, "val": 165, "test": 310},
        "md5": {
            28: "8755a7e9e05a4d9ce80a24c3e7a256f3",
            64: "c47c5b7d457bf6332200d2ea6d64ecd8",
        },
    },
    "adrenalmnist3d": {
        "dims": 3,
        "task": "binary",
        "modality": "Shape from Abdominal CT",
        "channels": 1,
        "labels": ["normal", "hyperplasia"],
        "splits": {"train": 1188, "val": 98, "test": 298},
        "md5": {
            28: "bbd3c5a5576322bc4cdfea780653b1ce",
            64: "17721accfe9fb005146a47d33bc54b2f",
        },
    },
    "fracturemnist3d": {
        "dims": 3,
        "task": "multiclass",
        "modality": "Chest CT",
        "channels": 1,
        "labels": [
            "buckle rib fracture",
            "nondisplaced rib fracture",
            "displaced rib fracture",
        ],
        "splits": {"train": 1027, "val": 103, "test": 240},
        "md5": {
            28: "6aa7b0143a6b42da40027a9dda61302f",
            64: "f01d7e6316aedf4210da0da5b7437b42",
        },
    },
    "vesselmnist3d": {
        "dims": 3,
        "task": "binary",
        "modality": "Shape from Brain MRA",
        "channels": 1,
        "labels": ["vessel", "aneurysm"],
        "splits": {"train": 1335, "val": 191, "test": 382},
        "md5": {
            28: "b41fd4f7e7e2feedddb201585ecafa1b",
            64: "6bb274a8846e1097066dcd64e2c4520f",
        },
    },
    "synapsemnist3d": {
        "dims": 3,
        "task": "binary",
        "modality": "Electron Microscope",
        "channels": 1,
        "labels": ["inhibitory synapse", "excitatory synapse"],
        "splits": {"train": 1230, "val": 177, "test": 352},
        "md5": {
            28: "1235b78a3cd6280881dd7850a78eadb6",
            64: "43bd14ebf3af9d3dd072446fedc14d5e",
        },
    },
}


def file_name(name: str, size: int) -> str:
    """Release file name of dataset ``name`` at image size ``size``.

    ``file_name("breastmnist", 28) == "breastmnist.npz"``;
    ``file_name("breastmnist", 64) == "breastmnist_64.npz"``.
    """
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def url(name: str, size: int) -> str:
    """Zenodo download address of dataset ``name`` at image size ``size``."""
    return ZENODO_URL.format(file=file_name(name, size))


# The spatial axes along which a mirror image is as plausible as the image and keeps its label
# (0: rows, i.e. up-down; 1: columns, left-right; 2: depth), for flip augmentation and test-time
# flips. Our reading of each dataset's anatomy, not part of the official metadata:
FLIP_AXES: dict[str, list[int]] = {
    # tissue patches, dermoscopy and blood-cell smears have no orientation
    "pathmnist": [0, 1],
    "dermamnist": [0, 1],
    "bloodmnist": [0, 1],
    "tissuemnist": [0, 1],
    # chest X-rays: the heart is on the left (dextrocardia is a finding), so no flip
    "chestmnist": [],
    "pneumoniamnist": [],
    # OCT B-scans and breast ultrasound: the retina's layers and the skin are on top, left-right is
    # arbitrary; fundus photographs: a mirrored left eye is a right eye, the grade is unchanged
    "octmnist": [1],
    "breastmnist": [1],
    "retinamnist": [1],
    # abdominal CT slices whose classes are left and right organs (femur-left/right, kidney-left/right)
    "organamnist": [],
    "organcmnist": [],
    "organsmnist": [],
    "organmnist3d": [],
    # lung nodules, synapses and vessel segments are not lateralised; adrenal glands and rib
    # fractures are judged in their side's anatomy
    "nodulemnist3d": [0, 1, 2],
    "synapsemnist3d": [0, 1, 2],
    "vesselmnist3d": [0, 1, 2],
    "adrenalmnist3d": [],
    "fracturemnist3d": [],
}


def dataset_info(name: str, dims: int | None = None) -> dict:
    """Metadata of dataset ``name``; with ``dims``, only 2D or only 3D datasets are accepted.

    Raises:
        ValueError: naming the valid dataset names when ``name`` is unknown.
    """
    valid = sorted(n for n, info in MEDMNIST.items() if dims is None or info["dims"] == dims)
    if name not in valid:
        kind = f"{dims}D " if dims else ""
        raise ValueError(f"data.name={name!r} is not a MedMNIST {kind}dataset; expected one of {valid}")
    return MEDMNIST[name]


def medmnist_property(name: str, field: str) -> Any:
    """A property of a MedMNIST dataset from its metadata: ``task``, ``num_classes``, ``channels``,
    ``flip_axes`` (see :data:`FLIP_AXES`), ``train_size`` (images in the official training split) or
    ``ordinal`` (whether the classes are ordered grades: "ordinal-regression")."""
    info = dataset_info(name)
    match field:
        case "task":
            # ordinal regression (RetinaMNIST) is evaluated as multi-class, as in MedMNIST v2
            return {"ordinal": "multiclass"}.get(info["task"], info["task"])
        case "num_classes":
            return len(info["labels"])
        case "channels":
            return info["channels"]
        case "flip_axes":
            return list(FLIP_AXES[name])
        case "train_size":
            return info["splits"]["train"]
        case "ordinal":
            return info["task"] == "ordinal"
        case _:
            raise ValueError(
                f"medmnist field {field!r}; expected one of ['task', 'num_classes', 'channels', 'flip_axes', "
                "'train_size', 'ordinal']"
            )
