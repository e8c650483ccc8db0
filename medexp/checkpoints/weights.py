"""Weights from elsewhere as a model's starting point: ``model.init_weights``.

A network starts from the weights of a file instead of a random initialisation, and is then
fine-tuned. The file may be:

- a medexp checkpoint of any task (encrypted ones too): its network's weights (``net.*``), so an
  autoencoder's encoder or a segmentation U-Net's down path can start a classifier
  (``model=autoencoder_classifier``, ``model=unet_classifier`` name their modules as those nets do);
- a plain state dict: ``.pt``/``.pth`` (read with ``weights_only``: nothing in it runs as code) or
  ``.safetensors``;
- a MONAI bundle: its directory or its ``models/model.pt`` (``models/model.safetensors``);
- ImageNet weights in the layout of torchvision or timm for the ResNet and DenseNet families:
  MONAI's ResNets name their modules as torchvision does, and DenseNets are mapped
  (``denselayerN.norm1`` -> ``denselayerN.layers.norm1``, ``classifier`` -> ``class_layers.out``);
- MONAI's self-supervised SwinUNETR encoders: ``model_swinvit.pt`` (Tang et al. 2022, a
  ``state_dict`` of ``module.*`` names) and ``ssl_pretrained_weights.pth`` (a ``model`` dict of
  ``encoder.*`` names), mapped onto ``swinViT.*`` as MONAI's ``load_from`` and
  ``filter_swinunetr`` map them;
- ViT weights: MONAI's (a ``ViT``, a ``ViTAutoEnc``, or a UNETR's ``vit.*`` with
  ``strip_prefix=vit.``) as named, or timm's layout (``pos_embed``, ``blocks.N.mlp.fc1``, ...),
  whose position embeddings lose the class token's and are resized to the net's patch grid.

The file's tensors are matched by name to the network's state (parameters and buffers), after
``key`` (the sub-dict holding them; found by itself where it is one of the usual ones),
``strip_prefix`` and ``add_prefix``; a ``module.`` prefix of every name (DataParallel/DDP) is
dropped. A tensor whose shape differs is adapted where that is well defined, else reported:

- **grey images from RGB weights**: a first convolution with 3 input channels loaded into one of
  1 gets the sum of its kernels over the colour channels (``grey: sum``: the response to a grey
  image is the RGB net's response to that image copied into the three channels) or their mean
  (``grey: mean``: the response to the same image scaled by 1/3, for inputs normalised as
  ImageNet's were); ``grey: null`` adapts nothing;
- **2D -> 3D inflation** (``inflate: true``): a ``k x k`` kernel loaded into a ``d x k x k`` one is
  repeated ``d`` times along the new first spatial axis and divided by ``d`` (I3D, Carreira and
  Zisserman 2017), so a volume of identical slices gives the 2D net's response.

What was loaded, excluded, missing, unexpected, adapted or shape-mismatched is a report (logged as
a table before training and written to ``run_info.json``). Loading fails in one line, naming the
file and a few names on both sides, when nothing matches, when a tensor has another shape and is
not excluded, or with ``strict: true`` when a weight of the network is not in the file.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medexp.utils.errors import MedexpError

log = logging.getLogger("medexp")

# the options of model.init_weights, with their defaults
OPTIONS: dict[str, Any] = {
    "path": None,
    "key": None,
    "strip_prefix": None,
    "add_prefix": None,
    "exclude": [],
    "strict": False,
    "grey": "sum",
    "inflate": False,
}
GREY = ("sum", "mean", None)
# sub-dicts that usually hold the weights of a saved model, tried in this order
USUAL_KEYS = ("state_dict", "model", "model_state_dict", "network", "net", "module", "weights", "params")
# a bundle's weights, in this order
BUNDLE_FILES = ("models/model.safetensors", "models/model.pt")
EXAMPLES = 4
# the word in model.freeze that stands for every weight loaded from init_weights
LOADED = "loaded"

# files of the networks whose `pretrained=true` downloads (MONAI 1.6), for the offline message
PRETRAINED_FILES: dict[str, str] = {
    "densenet121": "https://download.pytorch.org/models/densenet121-a639ec97.pth",
    "densenet169": "https://download.pytorch.org/models/densenet169-b2777c0a.pth",
    "densenet201": "https://download.pytorch.org/models/densenet201-c1103571.pth",
    "resnet": "resnet_{depth}_23dataset.pth of https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet{depth}",
}


def options(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """``model.init_weights`` with its defaults filled in.

    Raises:
        MedexpError: for an unknown option or a value of the wrong kind.
    """
    if config is not None and not isinstance(config, Mapping):
        raise MedexpError(
            f"model.init_weights={config!r}; expected its options, e.g. model.init_weights.path=<file> "
            "(model.init_weights.exclude=[fc.*], ...)"
        )
    given = dict(config or {})
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise MedexpError(f"model.init_weights.{unknown[0]}: unknown option; expected one of {sorted(OPTIONS)}")
    merged = {**OPTIONS, **given}
    if merged["grey"] not in GREY:
        raise MedexpError(f"model.init_weights.grey={merged['grey']!r}; expected sum, mean or null")
    exclude = merged["exclude"] or []
    if isinstance(exclude, str):
        exclude = [exclude]
    if not all(isinstance(pattern, str) for pattern in exclude):
        raise MedexpError(f"model.init_weights.exclude={exclude!r}; expected a list of name patterns, e.g. [fc.*]")
    merged["exclude"] = list(exclude)
    for key in ("strict", "inflate"):
        if not isinstance(merged[key], bool):
            raise MedexpError(f"model.init_weights.{key}={merged[key]!r}; expected true or false")
    return merged


def read_weights(path: str | Path, key: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of the file (or bundle directory) at ``path``, by name, and what the file is.

    Raises:
        MedexpError: for a missing or unreadable file, pickled code, a TorchScript-only bundle, a
            ``key`` the file has not, or a file whose weights cannot be found without ``key``.
    """
    path = Path(path).expanduser()
    where = f"model.init_weights.path={str(path)!r}"
    if path.is_dir():
        found = next((path / name for name in BUNDLE_FILES if (path / name).is_file()), None)
        if found is None:
            scripted = " (it has only TorchScript models/model.ts, which medexp does not run)"
            has_ts = (path / "models" / "model.ts").is_file()
            raise MedexpError(
                f"{where}: a directory, but not a MONAI bundle with weights: no {' or '.join(BUNDLE_FILES)}"
                f"{scripted if has_ts else ''}"
            )
        path, kind = found, "MONAI bundle"
    elif not path.is_file():
        raise MedexpError(f"{where}: no such file or directory")
    else:
        kind = ""
    contents = _load(path, where)
    if isinstance(contents, Mapping) and "medexp_config" in contents:
        return _medexp_weights(contents, where), "medexp checkpoint"
    weights = _select(contents, key, where)
    kind = kind or ("safetensors" if path.suffix == ".safetensors" else "state dict")
    return weights, kind


def _load(path: Path, where: str) -> Any:
    """The file's contents: safetensors by their format, anything else through ``torch.load``
    with ``weights_only`` (decrypted first when medexp encrypted it)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise MedexpError(f"{where}: not a safetensors file ({exc})") from None
    from medexp.checkpoints.checkpoint import load_weights_only
    from medexp.privacy.encryption import read_bytes

    return load_weights_only(
        read_bytes(path, what="weights file"),
        where,
        expected="a state dict (.pt/.pth), a .safetensors file, a medexp checkpoint or a MONAI bundle",
    )


def _medexp_weights(contents: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """The network's weights in a medexp checkpoint: its state dict's ``net.*`` entries."""
    state = contents.get("state_dict") or {}
    weights = {name[len("net.") :]: value for name, value in state.items() if name.startswith("net.")}
    if not weights:
        raise MedexpError(f"{where}: a medexp checkpoint without network weights (no net.* in its state_dict)")
    return weights


def _is_weights(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _select(contents: Any, key: str | None, where: str) -> dict[str, torch.Tensor]:
    """The dict of tensors in ``contents``: at ``key`` (dotted for nested dicts), else the contents
    themselves, else the one usual sub-dict that holds tensors."""
    if key:
        value = contents
        for part in str(key).split("."):
            if not isinstance(value, Mapping) or part not in value:
                keys = sorted(value) if isinstance(value, Mapping) else []
                raise MedexpError(
                    f"{where}: no key {key!r} in the file; its top-level keys are {_few(keys)}; set "
                    "model.init_weights.key to the one holding the weights"
                )
            value = value[part]
        if not _is_weights(value):
            raise MedexpError(f"{where}: the file's {key!r} is not a dict of tensors")
        return dict(value)
    if _is_weights(contents):
        return dict(contents)
    if isinstance(contents, Mapping):
        candidates = [name for name in USUAL_KEYS if _is_weights(contents.get(name))]
        candidates += [name for name, value in contents.items() if name not in candidates and _is_weights(value)]
        if len(candidates) == 1:
            return dict(contents[candidates[0]])
        raise MedexpError(
            f"{where}: cannot tell which part of the file holds the weights (its keys: {_few(sorted(contents))}); set "
            f"model.init_weights.key, e.g. key={candidates[0] if candidates else 'state_dict'}"
        )
    raise MedexpError(f"{where}: holds a {type(contents).__name__}, not a dict of tensors")


def _few(names: Sequence[str]) -> str:
    shown = ", ".join(names[:EXAMPLES])
    return f"[{shown}{', ...' if len(names) > EXAMPLES else ''}] ({len(names)} in all)"


# torchvision/timm DenseNet layers -> MONAI's (the old torchvision names `norm.1` too)
_DENSE_LAYER = re.compile(r"^(.*denselayer\d+)\.((?:norm|relu|conv)\.?[12])\.(.*)$")


def _densenet_layout(name: str) -> str:
    match = _DENSE_LAYER.match(name)
    if match:
        name = f"{match.group(1)}.layers.{match.group(2).replace('.', '')}.{match.group(3)}"
    return re.sub(r"^classifier\.", "class_layers.out.", name)


def _swinvit_layout(name: str) -> str:
    """MONAI's self-supervised Swin encoder of Tang et al. 2022 (``model_swinvit.pt``: a
    ``state_dict`` of ``module.patch_embed.*``, ``module.layers1.0.blocks.0.*``, ..., what
    ``SwinUNETR.load_from`` reads): the encoder is SwinUNETR's ``swinViT``."""
    return name if name.startswith("swinViT.") else f"swinViT.{name}"


def _swin_ssl_layout(name: str) -> str | None:
    """MONAI's ``ssl_pretrained_weights.pth`` (Valanarasu et al. 2023, Disruptive Autoencoders:
    a ``model`` dict of ``encoder.*`` and the pre-training decoder's ``out.*``), renamed as
    MONAI's ``filter_swinunetr`` does; what it leaves out (the mask token, the encoder's last
    norm, the reconstruction head, whose name is SwinUNETR's segmentation head's) is None."""
    from monai.networks.nets.swin_unetr import filter_swinunetr

    renamed = filter_swinunetr(name, None)
    return renamed[0] if renamed else None


# timm/Hugging Face ViT names -> MONAI ViT's (qkv rows are laid out (3, heads, head_dim) in both)
_TIMM_VIT = (
    (re.compile(r"^pos_embed$"), "patch_embedding.position_embeddings"),
    (re.compile(r"^patch_embed\.proj\."), "patch_embedding.patch_embeddings."),
    (re.compile(r"^(blocks\.\d+)\.attn\.proj\."), r"\1.attn.out_proj."),
    (re.compile(r"^(blocks\.\d+)\.mlp\.fc([12])\."), r"\1.mlp.linear\2."),
    (re.compile(r"^head\."), "classification_head."),
)


def _timm_vit_layout(name: str) -> str:
    for pattern, replacement in _TIMM_VIT:
        name = pattern.sub(replacement, name)
    return name


# other layouts of the same networks, tried when names do not match as they are: each maps a
# name of the file to the net's, or to None for a tensor the layout leaves out
LAYOUTS: dict[str, Callable[[str], str | None]] = {
    "torchvision/timm DenseNet": _densenet_layout,
    "MONAI SwinUNETR self-supervised (model_swinvit.pt)": _swinvit_layout,
    "MONAI SwinUNETR self-supervised (ssl_pretrained_weights.pth)": _swin_ssl_layout,
    "timm ViT": _timm_vit_layout,
}


def _adapt_positions(value: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, str] | None:
    """A ViT's position embeddings ``(1, tokens, hidden)`` made to the net's: a class token's
    position (timm keeps one, MONAI's patch embedding does not) dropped, and a square grid of
    patches of another size resized (bicubic, as timm does) to the net's square grid."""
    if value.ndim != 3 or len(shape) != 3 or value.shape[2] != shape[2]:
        return None
    done = []
    side, target = math.isqrt(value.shape[1]), math.isqrt(shape[1])
    if side * side != value.shape[1] and math.isqrt(value.shape[1] - 1) ** 2 == value.shape[1] - 1:
        value, side = value[:, 1:], math.isqrt(value.shape[1] - 1)
        done.append("class token's position dropped")
    if value.shape[1] != shape[1] and side * side == value.shape[1] and target * target == shape[1]:
        grid = value.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        grid = torch.nn.functional.interpolate(grid, size=(target, target), mode="bicubic", align_corners=False)
        value = grid.permute(0, 2, 3, 1).reshape(1, shape[1], -1).to(value.dtype)
        done.append(f"{side}x{side} patch grid resized to {target}x{target}")
    return (value, ", ".join(done)) if done and value.shape == shape else None


def _renamed(weights: dict[str, torch.Tensor], opts: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The names after ``strip_prefix``, ``add_prefix`` and a DataParallel ``module.`` prefix."""
    if weights and all(name.startswith("module.") for name in weights):
        weights = {name[len("module.") :]: value for name, value in weights.items()}
    strip, add = opts["strip_prefix"] or "", opts["add_prefix"] or ""
    if strip:
        weights = {name[len(strip) :]: value for name, value in weights.items() if name.startswith(strip)}
    return {f"{add}{name}": value for name, value in weights.items()}


def _adapt(value: torch.Tensor, shape: torch.Size, opts: dict[str, Any]) -> tuple[torch.Tensor, str] | None:
    """``value`` made to ``shape`` by summing RGB kernels to grey and/or inflating 2D kernels to
    3D (see the module's docstring), with what was done; None where neither applies."""
    done = []
    if value.ndim >= 3 and len(shape) >= value.ndim and value.shape[1] == 3 and shape[1] == 1 and opts["grey"]:
        value = value.sum(dim=1, keepdim=True) if opts["grey"] == "sum" else value.mean(dim=1, keepdim=True)
        done.append("RGB kernels summed to 1 channel" if opts["grey"] == "sum" else "RGB kernels averaged to 1 channel")
    if opts["inflate"] and value.ndim >= 4 and len(shape) == value.ndim + 1 and tuple(shape[3:]) == value.shape[2:]:
        depth = shape[2]
        value = value.unsqueeze(2).repeat(1, 1, depth, *([1] * (value.ndim - 2))) / depth
        done.append(f"inflated to depth {depth}")
    if not done or value.shape != shape:
        return None
    return value, ", ".join(done)


def match_weights(net: nn.Module, weights: dict[str, torch.Tensor], opts: dict[str, Any]) -> dict[str, Any]:
    """The tensors of ``weights`` that go into ``net``'s state, and the report of the matching.

    Returns:
        ``{"tensors": {name: tensor}, "layout", "loaded", "excluded", "missing", "unexpected",
        "adapted", "mismatched"}`` (names; ``adapted`` and ``mismatched`` as descriptions).
    """
    target = net.state_dict()
    renamed = _renamed(weights, opts)
    layout = "as named"
    best = sum(name in target for name in renamed)
    dropped: list[str] = []  # the file's names a layout leaves out (reported as unexpected)
    for name, rename in LAYOUTS.items():
        names = {key: rename(key) for key in renamed}
        candidate = {new: renamed[key] for key, new in names.items() if new is not None}
        hits = sum(key in target for key in candidate)
        if hits > best:
            renamed, layout, best = candidate, name, hits
            dropped = sorted(key for key, new in names.items() if new is None)
    excluded = sorted(name for name in target if any(fnmatch.fnmatchcase(name, p) for p in opts["exclude"]))
    tensors, adapted, mismatched = {}, [], []
    for name, expected in target.items():
        if name in excluded or name not in renamed:
            continue
        value = renamed[name]
        if value.shape == expected.shape:
            tensors[name] = value
            continue
        change = (
            _adapt_positions(value, expected.shape)
            if name.endswith("position_embeddings")
            else _adapt(value, expected.shape, opts)
        )
        if change is None:
            mismatched.append(f"{name}: file {tuple(value.shape)}, net {tuple(expected.shape)}")
        else:
            tensors[name] = change[0]
            adapted.append(f"{name}: {change[1]}")
    other_shape = {item.split(": ", 1)[0] for item in mismatched}
    missing = sorted(
        name for name in target if name not in tensors and name not in excluded and name not in other_shape
    )
    return {
        "tensors": tensors,
        "layout": layout,
        "loaded": sorted(tensors),
        "excluded": excluded,
        "missing": missing,
        "unexpected": sorted([*(name for name in renamed if name not in target), *dropped]),
        "adapted": adapted,
        "mismatched": mismatched,
    }


def load_initial_weights(net: nn.Module, config: Mapping[str, Any]) -> dict[str, Any]:
    """Load ``model.init_weights`` into ``net`` (see the module's docstring) and log the report.

    Returns:
        The report for ``run_info.json``: path, kind, layout, counts and names.

    Raises:
        MedexpError: in one line, naming the file and a few names on both sides, when nothing
            matches, a tensor's shape differs and it is not excluded, or (``strict``) a weight of
            the net is missing from the file.
    """
    opts = options(config)
    where = f"model.init_weights.path={str(opts['path'])!r}"
    weights, kind = read_weights(opts["path"], opts["key"])
    matched = match_weights(net, weights, opts)
    net_names = list(net.state_dict())
    if not matched["loaded"]:
        raise MedexpError(
            f"{where}: none of its {len(weights)} weights match {type(net).__name__}'s names: the net has e.g. "
            f"{_few(net_names)}, the file {_few(list(weights))}; set model.init_weights.strip_prefix, add_prefix or "
            "key so that they match"
        )
    if matched["mismatched"]:
        first = matched["mismatched"][0].split(":")[0]
        pattern = first.rsplit(".", 1)[0] + ".*" if "." in first else first
        raise MedexpError(
            f"{where}: {len(matched['mismatched'])} weight(s) have other shapes than the net's: "
            f"{'; '.join(matched['mismatched'][:3])}; leave them as initialised with model.init_weights.exclude="
            f"[{pattern}] (e.g. a classification head for another number of classes)"
        )
    if opts["strict"] and (matched["missing"] or matched["unexpected"]):
        side, names = (
            ("not in the file", matched["missing"]) if matched["missing"] else ("not in the net", matched["unexpected"])
        )
        raise MedexpError(
            f"{where}: strict=true, and {len(names)} weight(s) are {side}: {_few(names)}; exclude them with "
            "model.init_weights.exclude or set strict=false"
        )
    state = net.state_dict()
    for name, value in matched.pop("tensors").items():
        state[name] = value.to(dtype=state[name].dtype)
    net.load_state_dict(state)
    report = {"path": str(Path(opts["path"]).expanduser().resolve()), "kind": kind, **matched}
    for line in report_lines(report):
        log.info("%s", line)
    return report


def report_lines(report: Mapping[str, Any]) -> list[str]:
    """The report as a small table: one row per outcome, its count and a few names."""
    rows = [
        (outcome, report[outcome])
        for outcome in ("loaded", "adapted", "excluded", "missing", "unexpected", "mismatched")
    ]
    width = max(len(outcome) for outcome, _ in rows)
    lines = [f"init_weights: {report['path']} ({report['kind']}, names {report['layout']})"]
    for outcome, names in rows:
        lines.append(f"  {outcome:<{width}}  {len(names):>5}  {_few(list(names)) if names else ''}")
    return lines


def pretrained_download_failed(net_config: Mapping[str, Any], error: BaseException) -> MedexpError | None:
    """A one-line error for a net whose ``pretrained=true`` could not download its weights (no
    network), naming the file to fetch and how to pass it; None where this is not that case."""
    # pretrained=<path> (MONAI's ResNets) reads a local file: a missing one is not a download
    if net_config.get("pretrained") is not True or not isinstance(error, OSError):
        return None
    target = str(net_config.get("_target_", "")).rsplit(".", 1)[-1]
    name = target.lower()
    if name in PRETRAINED_FILES:
        source, extra = PRETRAINED_FILES[name], ""
    elif name.startswith("resnet"):
        depth = re.sub(r"\D", "", name) or "18"
        source = PRETRAINED_FILES["resnet"].format(depth=depth)
        extra = " model.init_weights.key=state_dict"
    else:
        source, extra = "the weights file it downloads", ""
    return MedexpError(
        f"model.net.pretrained=true: {target} could not download its weights ({type(error).__name__}: "
        f"{str(error).strip().splitlines()[0][:120] if str(error).strip() else 'no network'}); fetch {source} on a "
        f"machine with internet and pass it as model.net.pretrained=false model.init_weights.path=<file>{extra}"
    )
