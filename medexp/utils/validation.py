"""Config validation before anything is built: every problem found, reported together.

Three kinds of check, each returning messages that name the key, the value and what is valid:

- :func:`check_values`: types and ranges of the keys users set most (``optimizer.lr > 0``,
  ``data.batch_size >= 1``, dropout in [0, 1), ...), from the table :data:`RULES`;
- :func:`check_arguments`: every ``_target_`` node's keys against the target's signature, so a
  typo added with ``+`` (``+trainer.max_epoch=3``) is caught with a suggestion, not by a
  TypeError from deep inside ``instantiate``;
- :func:`check_combinations`: settings that are valid alone but not together (a segmentation
  model on classification data, a net whose channels do not match the data).

The other commands (eval, predict, export, ...) declare their own options the same way, a
module-level ``RULES`` table checked by :func:`check_options`.
"""

from __future__ import annotations

import difflib
import inspect
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from medexp.utils.errors import MedexpError

_HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


@dataclass(frozen=True)
class Rule:
    """What ``key`` must be: ``kind`` (``int``, ``number``, ``bool``, or a tuple of choices),
    bounds (``low``/``high``, ``low_open``/``high_open`` for strict ones), and ``optional``
    (None allowed). With ``sequence``, a non-empty list of such values (``length`` of them when
    given; ``increasing``: none smaller than the one before), e.g. Adam's ``betas`` or a
    scheduler's ``milestones``. A key absent from the config is not checked. ``exact``: an
    ``int`` itself, not ``2.0`` (for values passed on to APIs that take ints only); ``finite``
    false lets ``inf`` through (a bound that never binds); ``message`` replaces the generated
    ``expected ...`` (e.g. ``"expected a positive integer"``)."""

    key: str
    kind: str | tuple[Any, ...]
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    sequence: bool = False
    length: int | None = None
    increasing: bool = False
    exact: bool = False
    finite: bool = True
    message: str | None = None

    def check(self, value: Any) -> str | None:
        problem = self._check(value)
        if problem is None or self.message is None:
            return problem
        return f"{self.key}={'null' if value is None else repr(value)}; {self.message}"

    def _check(self, value: Any) -> str | None:
        if value is None:
            return None if self.optional else f"{self.key}=null; expected {self.describe()}"
        if self.sequence:
            item = replace(self, sequence=False, optional=False, message=None)
            items = list(value) if isinstance(value, (list, tuple)) else []
            fits = (
                len(items) >= 1
                and (self.length is None or len(items) == self.length)
                and all(item.check(v) is None for v in items)
                and not (self.increasing and any(a > b for a, b in itertools.pairwise(items)))
            )
            return None if fits else f"{self.key}={value!r}; expected {self.describe()}"
        if isinstance(self.kind, tuple):
            return None if value in self.kind else f"{self.key}={value!r}; expected one of {list(self.kind)}"
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"{self.key}={value!r}; expected true or false"
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        whole = isinstance(value, int) if self.exact else numeric and float(value).is_integer()
        if not numeric or (self.kind == "int" and not whole) or not _finite_enough(value, self.finite):
            return f"{self.key}={value!r}; expected {self.describe()}"
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"{self.key}={value!r}; expected {self.describe()}"
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return f"{self.key}={value!r}; expected {self.describe()}"
        return None

    def describe(self) -> str:
        kind = {"int": "an integer", "number": "a number"}.get(str(self.kind), str(self.kind))
        if self.sequence:
            count, order = f"{self.length} " if self.length else "", "non-decreasing " if self.increasing else ""
            kind = f"a list of {count}{order}" + {"int": "integers", "number": "numbers"}.get(
                str(self.kind), str(self.kind)
            )
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            bounds = f" in {left}{self.low:g}, {self.high:g}{right}"
        elif self.low is not None:
            bounds = f" {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            bounds = f" {'<' if self.high_open else '<='} {self.high:g}"
        else:
            bounds = ""
        return kind + bounds + (" or null" if self.optional else "")


def _finite_enough(value: float, finite: bool) -> bool:
    return math.isfinite(value) or (not finite and not math.isnan(value))


PRECISIONS = (
    64,
    32,
    16,
    "64",
    "32",
    "16",
    "bf16",
    "64-true",
    "32-true",
    "16-true",
    "bf16-true",
    "16-mixed",
    "bf16-mixed",
    "transformer-engine",
)
TASKS = ("binary", "multiclass", "multilabel", "segmentation", "registration", "detection", "translation")

RULES: tuple[Rule, ...] = (
    Rule("seed", "int", 0, 2**32 - 1, optional=True),
    Rule("train", "bool"),
    Rule("report", "bool"),
    Rule("model.calibrate", "bool"),
    Rule("test", "bool"),
    Rule("test_checkpoint", ("best", "last")),
    Rule("optimizer.lr", "number", 0, low_open=True),
    Rule("optimizer.weight_decay", "number", 0),
    Rule("optimizer.momentum", "number", 0, 1, high_open=True),
    # Adam's family (torch checks them only when the optimiser is built, after the data)
    Rule("optimizer.betas", "number", 0, 1, high_open=True, sequence=True, length=2),
    Rule("optimizer.eps", "number", 0, low_open=True),
    Rule("optimizer.nesterov", "bool"),
    Rule("optimizer.amsgrad", "bool"),
    Rule("data.task", TASKS),
    Rule("data.num_classes", "int", 1),
    Rule("data.in_channels", "int", 1),
    Rule("data.spatial_dims", (2, 3)),
    Rule("data.batch_size", "int", 1),
    Rule("data.num_workers", "int", 0),
    # null: file data keep their files' sizes (data=files_reg, files_translation)
    Rule("data.image_size", "int", 1, optional=True),
    Rule("data.val_fraction", "number", 0, 1, high_open=True),
    Rule("data.test_fraction", "number", 0, 1, high_open=True),
    Rule("data.lesion_contrast", "number", 0, low_open=True),
    Rule("model.label_smoothing", "number", 0, 1, high_open=True),
    Rule("model.ordinal_smoothing", "bool"),
    Rule("model.focal_gamma", "number", 0),
    Rule("data.sampler", ("balanced",), optional=True),
    Rule("data.fold_by", ("site",), optional=True),
    Rule("model.overlap", "number", 0, 1, high_open=True),
    Rule("model.sw_batch_size", "int", 1),
    Rule("model.noise", ("gaussian", "poisson", "speckle", "blur"), optional=True),
    Rule("model.noise_std", "number", 0, low_open=True),
    Rule("model.kl_weight", "number", 0),
    Rule("model.data_range", "number", 0, low_open=True),
    Rule("model.residual", "bool"),
    Rule("model.latent_size", "int", 1),
    Rule("model.conditional", "bool"),
    Rule("model.real_label", "number", 0.5, 1, low_open=True),
    Rule("model.kid_subset_size", "int", 2),
    Rule("model.similarity", ("lncc", "mse", "mi")),
    Rule("model.regularization", ("bending", "diffusion")),
    Rule("model.reg_weight", "number", 0),
    Rule("model.label_weight", "number", 0),
    Rule("model.output", ("ddf", "dvf")),
    Rule("model.integration_steps", "int", 1),
    Rule("trainer.max_epochs", "int", 1),
    Rule("trainer.min_epochs", "int", 0, optional=True),
    Rule("trainer.precision", PRECISIONS),
    Rule("trainer.check_val_every_n_epoch", "int", 1, optional=True),
    Rule("trainer.log_every_n_steps", "int", 1, optional=True),
    Rule("trainer.accumulate_grad_batches", "int", 1),
    Rule("trainer.gradient_clip_val", "number", 0, optional=True),
    Rule("trainer.num_nodes", "int", 1),
    Rule("trainer.deterministic", (True, False, "warn")),
    # privacy=dp (conf/privacy/dp.yaml; combinations: medexp.privacy.dp.check_config)
    Rule("privacy.max_grad_norm", "number", 0, low_open=True),
    Rule("privacy.target_epsilon", "number", 0, low_open=True, optional=True),
    Rule("privacy.noise_multiplier", "number", 0, low_open=True, optional=True),
    Rule("privacy.delta", "number", 0, 1, low_open=True, high_open=True),
    Rule("privacy.accountant", ("prv", "rdp", "gdp")),
    Rule("privacy.noise_seed", "int", 0, 2**63 - 1, optional=True),
    # medexp federate (conf/federate.yaml)
    Rule("federated.sites", "int", 2, optional=True),
    Rule("federated.rounds", "int", 1),
    Rule("federated.local_epochs", "int", 1),
    Rule("federated.algorithm", ("fedavg", "fedprox")),
    Rule("federated.mu", "number", 0),
    Rule("federated.split", ("iid", "dirichlet", "column")),
    Rule("federated.alpha", "number", 0, low_open=True),
    Rule("federated.seed", "int", 0, 2**32 - 1),
)

# gamma > 1 raises the rate at each step: unusual, but a schedule (a warm-up), not a mistake
_GAMMA = Rule("scheduler.gamma", "number", 0, low_open=True)
# The keys of each LR scheduler (conf/scheduler/*.yaml), by its _target_: torch checks a few only
# when the first epoch ends, and others never (milestones='abc' leaves the learning rate constant).
SCHEDULER_RULES: dict[str, tuple[Rule, ...]] = {
    "torch.optim.lr_scheduler.CosineAnnealingLR": (
        Rule("scheduler.T_max", "int", 1),
        Rule("scheduler.eta_min", "number", 0),
    ),
    "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts": (
        Rule("scheduler.T_0", "int", 1),
        Rule("scheduler.T_mult", "int", 1),
        Rule("scheduler.eta_min", "number", 0),
    ),
    "torch.optim.lr_scheduler.MultiStepLR": (
        Rule("scheduler.milestones", "int", 1, sequence=True, increasing=True),
        _GAMMA,
    ),
    "torch.optim.lr_scheduler.StepLR": (Rule("scheduler.step_size", "int", 1), _GAMMA),
    "torch.optim.lr_scheduler.ExponentialLR": (_GAMMA,),
    "torch.optim.lr_scheduler.ReduceLROnPlateau": (
        Rule("scheduler.mode", ("min", "max")),
        Rule("scheduler.factor", "number", 0, 1, low_open=True, high_open=True),
        Rule("scheduler.patience", "int", 0),
        Rule("scheduler.threshold", "number", 0),
        Rule("scheduler.threshold_mode", ("rel", "abs")),
        Rule("scheduler.cooldown", "int", 0),
        Rule("scheduler.min_lr", "number", 0),
        Rule("scheduler.eps", "number", 0),
    ),
}


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every entry of a nested dict/list config."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        yield path, value
        yield from _walk(value, path)


def _get(config: dict[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_values(config: dict[str, Any]) -> list[str]:
    """Problems with the types and ranges of the keys in :data:`RULES` and, for the scheduler
    in use, :data:`SCHEDULER_RULES`, and of any ``dropout``-named value (a probability in [0, 1))."""
    problems = []
    scheduler = config.get("scheduler")
    target = str(scheduler.get("_target_")) if isinstance(scheduler, dict) else ""
    for rule in (*RULES, *SCHEDULER_RULES.get(target, ())):
        present, value = _get(config, rule.key)
        if present and (problem := rule.check(value)) is not None:
            problems.append(problem)
    for key, value in _walk(config):
        name = key.rsplit(".", 1)[-1]
        if "dropout" in name and not isinstance(value, (dict, list)):
            problem = Rule(key, "number", 0, 1, high_open=True, optional=True).check(value)
            if problem:
                problems.append(problem)
    return problems


def _locate(target: str) -> Callable[..., Any] | None:
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception:  # reported by instantiate, with Hydra's own message about the import
        return None


def accepted_arguments(target: Callable[..., Any]) -> set[str] | None:
    """Keyword arguments ``target`` accepts, following ``**kwargs`` up a class's bases; None
    when anything goes (a ``**kwargs`` that is never resolved)."""
    functions = (
        [klass.__dict__["__init__"] for klass in target.__mro__ if "__init__" in klass.__dict__]
        if inspect.isclass(target)
        else [target]
    )
    names: set[str] = set()
    for function in functions:
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            return names - {"self"}
    return None


def check_arguments(config: dict[str, Any]) -> list[str]:
    """Keys of ``_target_`` nodes that their target does not take, with the closest valid names."""
    problems = []
    nodes = [("", config)] if isinstance(config, dict) and "_target_" in config else []
    nodes += [(key, value) for key, value in _walk(config) if isinstance(value, dict) and "_target_" in value]
    for key, node in nodes:
        target = _locate(str(node["_target_"]))
        accepted = accepted_arguments(target) if target is not None else None
        if accepted is None:
            continue
        for name in sorted(set(node) - _HYDRA_KEYS - accepted):
            close = difflib.get_close_matches(name, sorted(accepted), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"it takes {', '.join(sorted(accepted))}"
            problems.append(f"{key + '.' if key else ''}{name}: not an argument of {node['_target_']}; {hint}")
    return problems


def model_options() -> dict[str, tuple[str, ...]]:
    """``model=`` options (``conf/model/*.yaml``) and the data tasks each trains on."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    model_dir = files("medexp.conf").joinpath("model")
    tasks: dict[str, tuple[str, ...]] = {}

    def data_tasks(entry: str) -> tuple[str, ...] | None:
        # "task/<name>@_here_" -> the data_tasks of the class that conf/model/task/<name>.yaml builds
        if not (entry.startswith("task/") and entry.endswith("@_here_")):
            return None
        if entry not in tasks:
            task_file = model_dir.joinpath(f"{entry[: -len('@_here_')]}.yaml")
            target = OmegaConf.create(task_file.read_text()).get("_target_") if task_file.is_file() else None
            located = _locate(str(target)) if target else None
            tasks[entry] = tuple(getattr(located, "data_tasks", ()))
        return tasks[entry]

    options = {}
    for entry in sorted(model_dir.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            defaults = OmegaConf.create(entry.read_text()).get("defaults") or []
            found = (data_tasks(d) for d in defaults if isinstance(d, str))
            options[entry.name[:-5]] = next((t for t in found if t is not None), ())
    return options


def check_combinations(config: dict[str, Any]) -> list[str]:
    """Settings that do not fit together: the model's task and the data's, and the net's
    channels, classes and dimensions against the data's."""
    problems = []
    data, model = config.get("data") or {}, config.get("model") or {}
    task_class = _locate(str(model.get("_target_", "")))
    handles = getattr(task_class, "data_tasks", None)
    if handles is not None and data.get("task") not in handles:
        fitting = [name for name, tasks in model_options().items() if data.get("task") in tasks]
        problems.append(
            f"the model ({model['_target_'].rsplit('.', 1)[-1]}) trains on data.task in {list(handles)}, but "
            f"data.task={data.get('task')!r}; models for {data.get('task')} data: model={','.join(fitting) or '(none)'}"
        )
    # a task's own checks of the whole config (e.g. a distillation teacher against these data)
    if callable(own_checks := getattr(task_class, "config_problems", None)):
        problems.extend(own_checks(config))
    net = model.get("net") or {}
    net_class = _locate(str(net.get("_target_", ""))) if isinstance(net, dict) else None
    # a sequence model (its forward takes each sample's length) on single 2D images
    if (
        "length" in getattr(net_class, "extra_inputs", ())
        and data.get("spatial_dims") == 2
        and "max_length" not in data
    ):
        problems.append(
            f"the net ({net['_target_'].rsplit('.', 1)[-1]}) reads sequences of images, but these data are single "
            "2D images; use data=synthetic_longitudinal or files_longitudinal (images over time), or 3D data "
            "(data.spatial_dims=3, read as a sequence of slices)"
        )
    size = data.get("image_size")
    # null keeps the files' own sizes: only data modules that read files (their default is None) can
    data_class = _locate(str(data.get("_target_", "")))
    if "image_size" in data and size is None and data_class is not None:
        default = inspect.signature(data_class).parameters.get("image_size")
        if default is not None and default.default is not None:
            problems.append(
                f"data.image_size=null, but {data_class.__name__} draws its images at a size: "
                f"set a number of pixels (voxels) per side, e.g. data.image_size={default.default}"
            )
    # MONAI's DenseNets halve the resolution five times: below 29 pixels a pooling layer gets nothing
    if str(net.get("_target_", "")).startswith("monai.networks.nets.DenseNet") and isinstance(size, int) and size < 29:
        problems.append(
            f"the net ({net['_target_'].rsplit('.', 1)[-1]}) needs at least 29 pixels (voxels) per side, but "
            f"data.image_size={size}; for MedMNIST use data.size=64, or choose model=resnet18"
        )
    # images stacked into the net's input (a registration net takes the moving and the fixed image)
    images = getattr(task_class, "net_input_images", 1)
    if "in_channels" in net and "in_channels" in data and net["in_channels"] != images * data["in_channels"]:
        expected = (
            "they must match" if images == 1 else f"the net takes {images} x data.in_channels (the images it stacks)"
        )
        problems.append(
            f"model.net.in_channels={net['in_channels']} but data.in_channels={data['in_channels']}; {expected}"
        )
    if "spatial_dims" in net and "spatial_dims" in data and net["spatial_dims"] != data["spatial_dims"]:
        problems.append(
            f"model.net.spatial_dims={net['spatial_dims']} but data.spatial_dims={data['spatial_dims']}; they must match"
        )
    # GlobalNet is built for one input size: a number of pixels (voxels) per spatial axis, the data's
    net_size, data_size = net.get("image_size"), data.get("image_size")
    if isinstance(net_size, list) and (
        len(net_size) != data.get("spatial_dims")
        or not all(isinstance(v, int) and v > 0 for v in net_size)
        or (isinstance(data_size, int) and any(v != data_size for v in net_size))
    ):
        problems.append(
            f"model.net.image_size={net_size}; the net needs the images' size, one number per axis of "
            f"data.spatial_dims={data.get('spatial_dims')} (e.g. {[data_size or 32] * (data.get('spatial_dims') or 2)} for "
            f"data.image_size={data_size or 32}): set data.image_size (file data are resampled to it) and model.net.image_size"
        )
    outputs = next((net[k] for k in ("out_channels", "num_classes") if k in net), None)
    # the data property the net's outputs must equal: classes, or channels for a reconstruction
    match_key = getattr(task_class, "net_outputs", "num_classes")
    if outputs is not None and match_key in data and outputs != data[match_key]:
        problems.append(f"the net has {outputs} outputs but data.{match_key}={data[match_key]}; they must match")
    problems.extend(check_transformer_sizes(config))
    return problems


# MONAI's transformers, by _target_: (what the input size must divide by, the key naming it)
TRANSFORMERS = {
    "monai.networks.nets.ViT": "patch_size",
    "monai.networks.nets.vit.ViT": "patch_size",
    "monai.networks.nets.UNETR": "patch",
    "monai.networks.nets.unetr.UNETR": "patch",
    "monai.networks.nets.SwinUNETR": "swin",
    "monai.networks.nets.swin_unetr.SwinUNETR": "swin",
}
UNETR_PATCH = 16  # fixed in MONAI's UNETR


def _nearest_multiples(size: int, step: int) -> list[int]:
    """The multiples of ``step`` nearest ``size`` (one below and one above, at least ``step``)."""
    below = max(step, size // step * step)
    return sorted({below, below + step} if below != size else {size})


def _divisors(size: int, low: int = 2) -> list[int]:
    return [d for d in range(low, size + 1) if size % d == 0]


def _sizes(value: Any, dims: int) -> list[int] | None:
    """One size per spatial axis from an int or a list; None where not all are known integers."""
    sizes = list(value) if isinstance(value, list | tuple) else [value] * dims
    ok = len(sizes) == dims and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes)
    return sizes if ok else None


def check_transformer_sizes(config: dict[str, Any]) -> list[str]:
    """Input sizes MONAI's transformers cannot take, found before anything is built (MONAI finds
    them in the first forward pass, after the data, or not at all):

    - ``ViT``: ``img_size`` (``data.image_size``) a multiple of ``patch_size`` on every axis;
    - ``UNETR``: ``img_size`` (``model.roi_size``, by default the whole image) a multiple of its
      fixed 16-pixel patches, the same as ``model.roi_size``;
    - ``SwinUNETR``: the whole image (``data.image_size``) or the sliding window
      (``model.roi_size``) a multiple of ``patch_size ** 5`` (32) on every axis, and
      ``feature_size`` a multiple of 12; with instance norm (MONAI's default) more than 32 per axis;
    - all: ``hidden_size`` a multiple of ``num_heads``.

    Returns:
        One line per problem naming the keys, the values and the nearest valid sizes.
    """
    data, model = config.get("data") or {}, config.get("model") or {}
    net = model.get("net") if isinstance(model.get("net"), dict) else {}
    kind = TRANSFORMERS.get(str(net.get("_target_", "")))
    if kind is None:
        return []
    name = str(net["_target_"]).rsplit(".", 1)[-1]
    dims = net.get("spatial_dims", data.get("spatial_dims", 3))
    dims = dims if dims in (2, 3) else 2
    problems = []
    hidden, heads = net.get("hidden_size"), net.get("num_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads:
        problems.append(
            f"model.net.hidden_size={hidden} is not a multiple of model.net.num_heads={heads} ({name}); e.g. "
            f"num_heads in {_divisors(hidden)[:6]} or hidden_size in {_nearest_multiples(hidden, heads)}"
        )
    if kind in ("patch_size", "patch"):
        patch = _sizes(net.get("patch_size"), dims) if kind == "patch_size" else [UNETR_PATCH] * dims
        where = "model.net.img_size" + (" (model.roi_size)" if kind == "patch" else " (data.image_size)")
        value = net.get("img_size")
        sizes = _sizes(value, dims)
        if sizes is None:
            fix = (
                "set model.roi_size (one size per axis, a multiple of 16: UNETR is built for one input size; "
                "data of other sizes are cropped to it for training and inferred with sliding windows)"
                if kind == "patch"
                else "set data.image_size"
            )
            problems.append(f"{where}={value!r}; {name} needs the input's size, a positive integer per axis: {fix}")
            return problems
        if patch is None:
            problems.append(f"model.net.patch_size={net.get('patch_size')!r}; expected a positive integer per axis")
            return problems
        for size, step in zip(sizes, patch, strict=True):
            if size % step:
                # the patch sizes that divide the image, nearest the one given first
                near = sorted(sorted((d for d in _divisors(size) if d <= size // 2), key=lambda d: abs(d - step))[:3])
                other = f" or model.net.patch_size in {near}" if kind == "patch_size" and near else ""
                problems.append(
                    f"{where}={value} is not a multiple of the {'model.net.patch_size' if kind == 'patch_size' else 'patch size'}"
                    f"={step} of {name}; nearest valid sizes: {_nearest_multiples(size, step)}{other}"
                )
                break
        roi = model.get("roi_size")
        if kind == "patch" and roi is not None and _sizes(roi, dims) != sizes:
            problems.append(
                f"model.net.img_size={value} but model.roi_size={roi}; UNETR runs on windows of its img_size: set "
                "model.net.img_size=${model.roi_size}"
            )
        return problems
    # SwinUNETR
    feature = net.get("feature_size", 24)
    if isinstance(feature, int) and feature % 12:
        problems.append(
            f"model.net.feature_size={feature} is not a multiple of 12 (SwinUNETR); nearest valid: "
            f"{_nearest_multiples(feature, 12)}"
        )
    patch = net.get("patch_size", 2)
    step = patch**5 if isinstance(patch, int) and patch > 0 else 32
    roi = model.get("roi_size")
    key, value = ("model.roi_size", roi) if roi is not None else ("data.image_size", data.get("image_size"))
    sizes = _sizes(value, dims)
    if sizes is not None:
        bad = [size for size in sizes if size % step]
        fix = "" if roi is not None else " (or sliding windows of such a size: model.roi_size)"
        if bad:
            problems.append(
                f"{key}={value} is not a multiple of {step} (SwinUNETR halves it 5 times: patch_size={patch} ** 5) on "
                f"every axis; nearest valid sizes: {_nearest_multiples(bad[0], step)}{fix}"
            )
        elif str(net.get("norm_name", "instance")).lower() == "instance" and min(sizes) <= step:
            # its bottleneck is size / 32 per axis: one voxel, which instance norm cannot normalise
            problems.append(
                f"{key}={value}: SwinUNETR's bottleneck has one voxel at {step} per axis, which "
                f"model.net.norm_name=instance cannot normalise; use at least {2 * step} per axis{fix} "
                "or model.net.norm_name=batch"
            )
    return problems


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")


def check_accelerator(config: dict[str, Any]) -> list[str]:
    """``trainer.accelerator`` naming a device this machine lacks: Lightning would say so only
    after the data are built."""
    accelerator = (config.get("trainer") or {}).get("accelerator")
    if not isinstance(accelerator, str):
        return []  # absent, or an Accelerator object: Lightning's to check
    if accelerator not in ACCELERATORS:
        return [f"trainer.accelerator={accelerator!r}; expected one of {list(ACCELERATORS)}"]
    import torch

    missing = {
        "gpu": not torch.cuda.is_available() and not torch.backends.mps.is_available(),
        "cuda": not torch.cuda.is_available(),
        "mps": not torch.backends.mps.is_available(),
    }
    if not missing.get(accelerator, False):
        return []
    device = "MPS device" if accelerator == "mps" else "CUDA GPU"
    return [
        (
            f"trainer.accelerator={accelerator!r}, but this machine has no {device} (torch sees none); "
            "use trainer=cpu, or trainer.accelerator=auto to take whatever is there"
        )
    ]


def check_devices(config: dict[str, Any]) -> list[str]:
    """``trainer.devices`` > 1 on CPU with no strategy chosen: Lightning would quietly start that
    many DDP training processes on this machine. An explicit strategy (``trainer=ddp_sim``) says
    it is meant."""
    trainer = config.get("trainer") or {}
    accelerator, devices = trainer.get("accelerator", "auto"), trainer.get("devices", "auto")
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if (
        not isinstance(devices, int)
        or isinstance(devices, bool)
        or devices <= 1
        or trainer.get("strategy") not in (None, "auto")
    ):
        return []  # one device, "auto", a list (Lightning's to check), or a strategy chosen on purpose
    if accelerator == "auto":
        import torch

        if torch.cuda.is_available() or torch.backends.mps.is_available():
            return []
    elif accelerator != "cpu":
        return []
    where = "trainer.accelerator=cpu" if accelerator == "cpu" else "trainer.accelerator=auto and no GPU here"
    return [
        f"trainer.devices={devices} on CPU ({where}) would start {devices} training processes on this machine; "
        f"to simulate DDP on CPU say so with trainer=ddp_sim trainer.devices={devices}, otherwise use trainer.devices=1"
    ]


def check_monitors(config: dict[str, Any], logged: Sequence[str], task: str) -> None:
    """Every ``monitor`` of a callback (checkpointing, early stopping) against the metrics the
    run logs, before training: Lightning finds a typo only when the first epoch ends. (The
    plateau scheduler follows ``model.monitor``, which the task itself checks.)

    Args:
        config: the resolved config.
        logged: what the task logs (:meth:`medexp.tasks.base.BaseTask.logged_metrics`); callbacks
            add what their class declares in ``logged_metrics`` (e.g. ``train/epsilon`` of
            differential privacy).
        task: the task's name, for the message.

    Raises:
        MedexpError: naming each monitor the run never logs, with the metrics it logs.
    """
    added: set[str] = set()
    for _, node in _walk(config):
        if isinstance(node, dict) and "_target_" in node:
            declared = getattr(_locate(str(node["_target_"])), "logged_metrics", ())
            added |= set(declared) if isinstance(declared, (tuple, list)) else set()
    names = set(logged) | added
    problems = []
    for key, node in _walk(config.get("callbacks") or {}, "callbacks"):
        monitor = node.get("monitor") if isinstance(node, dict) and "_target_" in node else None
        if monitor is not None and monitor not in names:
            close = difflib.get_close_matches(str(monitor), sorted(names), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            extra = f"; callbacks may log {sorted(added - set(logged))}" if added - set(logged) else ""
            problems.append(
                f"{key}.monitor={monitor!r}: not logged by this run; {hint}{task} logs {sorted(logged)}{extra}"
            )
    _report(problems)


def _report(problems: Sequence[str]) -> None:
    if problems:
        lines = "\n".join(f"  - {problem}" for problem in problems)
        raise MedexpError(f"{len(problems)} problem(s) in the config:\n{lines}")


def check_options(config: Any, rules: Sequence[Rule], extra: Sequence[str] = ()) -> None:
    """Check a command's own options (``medexp export``'s ``format``, ``opset``, ...) against its
    table of ``rules``, as :func:`validate_config` checks a training run's.

    Args:
        config: the command's config (a ``DictConfig`` or a plain dict).
        rules: the command's table (its module's ``RULES``).
        extra: problems found by the command's checks of settings that a table cannot express
            (two keys together, choices known only at run time), reported with the rest.

    Raises:
        MedexpError: listing every problem found, one per line.
    """
    problems = []
    for rule in rules:
        present, value = _select(config, rule.key)
        if present and (problem := rule.check(value)) is not None:
            problems.append(problem)
    _report([*problems, *extra])


def _select(config: Any, key: str) -> tuple[bool, Any]:
    """``(present, value)`` of a dotted key; a config node comes back as plain lists and dicts."""
    from omegaconf import OmegaConf

    if not OmegaConf.is_config(config):
        return _get(config, key)
    absent = object()
    value = OmegaConf.select(config, key, default=absent)
    if value is absent:
        return False, None
    return True, OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def validate_config(config: dict[str, Any], extra: Sequence[str] = ()) -> None:
    """Run every check on a resolved config.

    Args:
        config: the resolved config.
        extra: problems a command found with its own settings (e.g. ``medexp federate``'s),
            reported together with the rest.

    Raises:
        MedexpError: listing every problem found, one per line.
    """
    problems = [
        *check_values(config),
        *check_arguments(config),
        *check_combinations(config),
        *check_accelerator(config),
        *check_devices(config),
        *extra,
    ]
    _report(problems)
