"""Reading image files as MONAI does (PNG, JPEG, BMP, TIFF, GIF, DICOM, NIfTI), channel first,
and the checks a case must pass to be trained on.

Loaded images are MetaTensors that keep each file's affine and metadata, so outputs can be
written aligned with their inputs.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor, PILReader
from monai.transforms import LoadImage, Transform

from medexp.data import validation
from medexp.data.paths import RASTER_SUFFIXES, folder_entries, has_geometry, is_dicom, located
from medexp.utils.errors import MedexpError


def _single_frame(image: Any) -> Any:
    # PIL would read the first page of a TIFF stack or an animated GIF and drop the rest
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise ValueError(f"it has {frames} frames; only single-frame images are read (store a stack as NIfTI)")
    return image


def not_a_series(folder: Path) -> str | None:
    """Why ``folder``, named where an image belongs, cannot be a DICOM series (a folder is read as
    one), or None when it may be: it holds no files, or none of its first files is DICOM."""
    files = [path for path in folder_entries(folder) if path.is_file()]
    if not files:
        return "a folder with no files, not an image (a folder is read as one DICOM series)"
    if not any(is_dicom(path) for path in files[:16]):
        shown = ", ".join(path.name for path in files[:3]) + (", ..." if len(files) > 3 else "")
        return (
            f"a folder, not an image: a folder is read as one DICOM series, but it holds no DICOM files ({shown}); "
            "list the image files themselves"
        )
    return None


class UnreadableFile(MedexpError):
    """A file that cannot be read as an image: ``name`` (the file and its manifest line) and why."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name}: {detail}")
        self.name, self.detail = name, detail


class CaseReader(Transform):
    """Load one case and check it, as the first (cached) transform of a file dataset.

    Input ``{"image": path, "label": class index or mask path, "where": manifest line}``; output
    ``{"image": (C, *spatial), "label": class index or (1, *spatial) mask}``, images and masks as
    float32 MetaTensors carrying their file's affine and metadata. Without a ``label`` (prediction),
    only the image is read.

    Masks become class indices: with ``mask_threshold=None`` their values must already be
    ``0..num_classes-1``; with a number ``t``, values above ``t`` become 1 and the rest 0 (binary
    masks saved as 0/255 images: ``t=127``).

    Raises:
        MedexpError: naming the file (and manifest line) when it cannot be read, a mask has more
            than one channel, its spatial shape differs from the image's, or its values are not
            class indices. :meth:`inspect` lists these problems, and more, without raising.
    """

    def __init__(self, task: str, num_classes: int, mask_threshold: float | None = None) -> None:
        self.task = task
        self.num_classes = num_classes
        self.mask_threshold = mask_threshold
        # site name -> index (FileDataModule.site_names); a case's "site" is served as its index
        self.site_index: dict[str, int] = {}
        with warnings.catch_warnings():
            # LoadImage registers MONAI's GPU DICOM decoder too, which warns wherever nvImageCodec is absent
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)
            self.loader = LoadImage(image_only=True, ensure_channel_first=True)
        self.raster_reader = PILReader(converter=_single_frame)
        # set by inspect(): the largest value of the case's mask as stored, and its file
        self.inspected_mask_max: tuple[float, str] | None = None

    def read(self, path: str, where: str = "") -> MetaTensor:
        """One file as a ``(C, *spatial)`` MetaTensor.

        Raises:
            UnreadableFile: naming the file, its manifest line and the reader's complaint.
        """
        if Path(path).is_dir() and (reason := not_a_series(Path(path))):
            raise UnreadableFile(located(path, where), reason)  # before MONAI's DICOM reader warns about every file
        reader = self.raster_reader if path.lower().endswith(RASTER_SUFFIXES) else None
        try:
            return self.loader(path, reader=reader)
        except Exception as exc:  # PIL, pydicom, nibabel and MONAI each raise their own types
            reason = (str(exc).strip().splitlines() or [""])[0]
            detail = f"cannot read it as an image ({type(exc).__name__}: {reason})"
            raise UnreadableFile(located(path, where), detail) from exc

    def load(self, data: dict[str, Any]) -> dict[str, MetaTensor]:
        """The files of a case as stored, unchecked: ``image``, and for segmentation the mask
        (``label``) and ``roi`` where the case has them. Raises :class:`UnreadableFile`."""
        where = data.get("where", "")
        sample = {"image": self.read(data["image"], where)}
        if "label" in data and self.task == "segmentation":
            sample["label"] = self.read(data["label"], where)
            if "roi" in data:
                sample["roi"] = self.read(data["roi"], where)
        return sample

    def problems(self, data: dict[str, Any], sample: dict[str, MetaTensor]) -> list[tuple[str, str, str]]:
        """What makes a loaded segmentation case unusable for training, as ``(kind, file, detail)``
        (kinds of :data:`medexp.data.validation.KINDS`): a mask with several channels, masks or
        roi whose shape differs from the image's, mask values that are not class indices."""
        if "label" not in sample:
            return []
        where = data.get("where", "")
        image, mask = sample["image"], sample["label"]
        mask_name = located(data["label"], where)
        if mask.shape[0] != 1:
            detail = (
                f"the mask has {mask.shape[0]} channels; expected one channel of class indices (save it as a grey "
                "image)"
            )
            return [("shape_mismatch", mask_name, detail)]
        found = []
        if mask.shape[1:] != image.shape[1:]:
            detail = (
                f"mask of spatial shape {tuple(mask.shape[1:])} does not match its image {data['image']} of "
                f"spatial shape {tuple(image.shape[1:])}"
            )
            found.append(("shape_mismatch", mask_name, detail))
        if "roi" in sample and sample["roi"].shape[1:] != image.shape[1:]:
            detail = (
                f"roi mask of spatial shape {tuple(sample['roi'].shape[1:])} does not match its image "
                f"{data['image']} of spatial shape {tuple(image.shape[1:])}"
            )
            found.append(("shape_mismatch", located(data["roi"], where), detail))
        if self.mask_threshold is None:  # with a threshold every value becomes 0 or 1
            detail = validation.mask_values_problem(torch.unique(mask.as_tensor()).numpy(), self.num_classes)
            if detail:
                found.append(("label_range", mask_name, detail))
        return found

    def inspect(self, data: dict[str, Any]) -> tuple[list[tuple[str, str, str]], MetaTensor | None]:
        """Read a case as training does and list every problem found, without raising.

        Besides :meth:`problems`: unreadable files, NaN/Inf values and constant images, and for
        segmentation an image and mask that both carry geometry (NIfTI, DICOM, ...) but whose
        affines differ. The mask's largest value as stored, with its file, is left in
        :attr:`inspected_mask_max` (None without a mask), to tell whether ``mask_threshold``
        empties every mask (:func:`medexp.data.validation.mask_threshold_problem`).

        Returns:
            ``(kind, file, detail)`` per problem, and the image as read (None when unreadable).
        """
        where = data.get("where", "")
        self.inspected_mask_max = None
        try:
            sample = self.load(data)
        except UnreadableFile as exc:
            return [("unreadable", exc.name, exc.detail)], None
        image = sample["image"]
        image_name = located(data["image"], where)
        found = [
            (kind, image_name, detail)
            for _, kind, detail in validation.content_problems(image.as_tensor().numpy()[None])
        ]
        found += self.problems(data, sample)
        mask = sample.get("label")
        if mask is not None and mask.numel():
            self.inspected_mask_max = (float(mask.as_tensor().max()), located(data["label"], where))
        if mask is not None and has_geometry(str(data["image"])) and has_geometry(str(data["label"])):
            detail = validation.geometry_problem(image.affine, mask.affine, str(data["image"]))
            if detail:
                found.append(("geometry_mismatch", located(data["label"], where), detail))
        return found, image

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        sample = self.load(data)
        if "site" in data:
            sample["site"] = self.site_index[data["site"]]
        if "label" not in data:  # an image to predict on
            return sample
        if self.task != "segmentation":
            return {**sample, "label": data["label"]}
        for _, name, detail in self.problems(data, sample)[:1]:
            raise MedexpError(f"{name}: {detail}")
        if "roi" in sample:
            sample["roi"] = (sample["roi"][:1] > 0).to(sample["roi"].dtype)
        if self.mask_threshold is not None:
            mask = sample["label"]
            sample["label"] = (mask > self.mask_threshold).to(mask.dtype)
        return sample
