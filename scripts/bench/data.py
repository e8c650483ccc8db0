"""Data path: what medexp's DataModules cost per epoch against the plainest alternative.

1. MedMNIST (2D, in memory): an epoch of `data=medmnist`'s training loader (batches as training
   sees them) vs the same images as float tensors pre-built in memory, served by a torch
   `TensorDataset` + `DataLoader` with the same batch size and shuffling. Epochs alternate A B A B
   in one process. Target <= 1.05x.
2. 3D files (NIfTI volumes written by this script, `data=files data.spatial_dims=3` with a
   resize): a plain epoch (every volume read and resized each time) vs `data.cache=memory`
   (MONAI CacheDataset) and `data.cache=disk` (MONAI PersistentDataset); plus the time to fill
   each cache. Target: cached >= 10x faster than plain.

    python scripts/bench/data.py --data-root ../shared/data/medmnist
    python scripts/bench/data.py --tiny    # correctness only (the test suite runs this)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import interleave, save


def epoch(loader) -> float:
    """Seconds to draw every batch of ``loader`` once."""
    start = time.perf_counter()
    for _batch in loader:
        pass
    return time.perf_counter() - start


def medmnist(root: Path, name: str, pairs: int, batch_size: int, out: Path) -> dict:
    datamodule = data_module(
        out, "data=medmnist", f"data.name={name}", f"data.root={root}", f"data.batch_size={batch_size}"
    )
    datamodule.setup("fit")
    ours = datamodule.train_dataloader()
    # the same samples, pre-built: what a hand-written script would hold in memory
    train = datamodule.datasets["train"]
    images = torch.stack([train[i]["image"] for i in range(len(train))])
    labels = torch.stack([train[i]["label"] for i in range(len(train))])
    plain = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels), batch_size=batch_size, shuffle=True
    )
    epoch(ours), epoch(plain)  # warm-up
    result = interleave(pairs, lambda: epoch(ours), lambda: epoch(plain))
    return {
        "dataset": name,
        "images": len(train),
        "batch_size": batch_size,
        "medexp_epoch_s": result["median_a"],
        "prebuilt_epoch_s": result["median_b"],
        "ratio": result["ratio"],
        "spread": result["spread"],
    }


def write_volumes(folder: Path, n: int, size: int) -> Path:
    """``n`` compressed NIfTI volumes ``size``^3 with a bright blob in half of them, and a manifest."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    rows = ["image,label"]
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    for i in range(n):
        volume = rng.normal(100, 20, (size, size, size)).astype(np.float32)
        label = i % 2
        if label:
            volume += 80 * (((z - 0.2) ** 2 + y**2 + (x + 0.1) ** 2) < 0.1)
        path = folder / f"case{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
        rows.append(f"{path.name},{label}")
    manifest = folder / "cases.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def files_3d(folder: Path, n: int, size: int, resize: int, pairs: int) -> dict:
    manifest = write_volumes(folder, n, size)
    transforms = (
        f"data.transforms=[{{_target_: monai.transforms.ScaleIntensityd, keys: [image]}}, "
        f"{{_target_: monai.transforms.Resized, keys: [image], spatial_size: [{resize}, {resize}, {resize}]}}]"
    )

    def module(cache: str | None):
        return data_module(
            folder,
            "data=files",
            f"data.manifest={manifest}",
            "data.spatial_dims=3",
            transforms,
            f"data.cache={cache or 'null'}",
            f"data.cache_dir={folder / 'cache'}",
            "data.batch_size=4",
        )

    def filled(cache: str | None) -> tuple[float, object]:
        start = time.perf_counter()
        datamodule = module(cache)
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        epoch(loader)  # a disk cache fills during its first epoch
        return time.perf_counter() - start, loader

    plain_first, plain = filled(None)
    memory_fill, memory = filled("memory")
    disk_fill, disk = filled("disk")
    memory_result = interleave(pairs, lambda: epoch(plain), lambda: epoch(memory))
    disk_result = interleave(pairs, lambda: epoch(plain), lambda: epoch(disk))
    return {
        "volumes": n,
        "size": size,
        "resize": resize,
        "plain_epoch_s": statistics.median(memory_result["a"] + disk_result["a"]),
        "memory_epoch_s": memory_result["median_b"],
        "disk_epoch_s": disk_result["median_b"],
        "memory_speedup": memory_result["ratio"],
        "memory_speedup_spread": memory_result["spread"],
        "disk_speedup": disk_result["ratio"],
        "disk_speedup_spread": disk_result["spread"],
        "plain_first_epoch_s": plain_first,
        "memory_fill_and_epoch_s": memory_fill,
        "disk_fill_and_epoch_s": disk_fill,
    }


def data_module(out: Path, *overrides: str):
    """The DataModule `medexp train <overrides>` would build (its files written to ``out``)."""
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    from medexp.resolvers import register_resolvers
    from medexp.utils.config import build

    register_resolvers()
    with initialize_config_module(config_module="medexp.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return build(cfg.data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data/medmnist"))
    parser.add_argument("--name", default="pneumoniamnist")
    parser.add_argument("--pairs", type=int, default=15, help="epochs of each kind, alternating")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--volumes", type=int, default=32)
    parser.add_argument("--size", type=int, default=96, help="voxels per side of the written volumes")
    parser.add_argument("--resize", type=int, default=32, help="voxels per side after the resize transform")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="seconds-long: a written MedMNIST-format file, few volumes")
    parser.add_argument("--save", type=Path, default=None, help="append the result to this JSON-lines file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root, name = args.data_root, args.name
        if args.tiny:
            args.pairs, args.volumes, args.size, args.resize = 1, 4, 24, 8
            root, name = tmp, "breastmnist"
            rng = np.random.default_rng(0)
            np.savez(
                tmp / "breastmnist.npz",
                **{
                    f"{s}_images": rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
                    for s, n in (("train", 64), ("val", 16), ("test", 16))
                },
                **{f"{s}_labels": rng.integers(0, 2, (n, 1)) for s, n in (("train", 64), ("val", 16), ("test", 16))},
            )
        if not (root / f"{name}.npz").is_file():
            raise SystemExit(f"{root / f'{name}.npz'} not found; pass --data-root (see ../shared/data/README.md)")
        result = {
            "benchmark": "data",
            "threads": args.threads,
            "pairs": args.pairs,
            "tiny": args.tiny,
            "medmnist": medmnist(root.resolve(), name, args.pairs, args.batch_size, tmp),
        }
        (tmp / "volumes").mkdir()
        result["files_3d"] = files_3d(tmp / "volumes", args.volumes, args.size, args.resize, args.pairs)
    save(args.save, result)
    m, f = result["medmnist"], result["files_3d"]
    print(
        f"\nMedMNIST {m['dataset']} ({m['images']} images): medexp {m['medexp_epoch_s']:.3f} s/epoch vs pre-built "
        f"{m['prebuilt_epoch_s']:.3f} s = {m['ratio']:.3f}x ({m['spread'][0]:.3f}-{m['spread'][1]:.3f})"
    )
    print(
        f"3D files ({f['volumes']} x {f['size']}^3 -> {f['resize']}^3): plain {f['plain_epoch_s']:.2f} s/epoch; "
        f"memory cache {f['memory_epoch_s']:.3f} s ({f['memory_speedup']:.1f}x, filled in {f['memory_fill_and_epoch_s']:.2f} s); "
        f"disk cache {f['disk_epoch_s']:.3f} s ({f['disk_speedup']:.1f}x, filled in {f['disk_fill_and_epoch_s']:.2f} s)"
    )


if __name__ == "__main__":
    main()
