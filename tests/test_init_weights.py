"""`model.init_weights`: starting a model from weights of another run, a state dict, a bundle or
ImageNet weights in torchvision layout; freezing, unfreezing and a learning-rate factor.

Every weight file is built here (nothing downloads): checkpoints trained in the test, state dicts
of random tensors with the real names and shapes of torchvision's ResNet-18 and DenseNet.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from medexp.checkpoints.checkpoint import Checkpoint
from medexp.checkpoints.weights import load_initial_weights
from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, compose_config, medexp_main

SMALL = [
    *QUIET,
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "report=false",
    "data.image_size=16",
    "data.num_samples={train: 32, val: 16, test: 16}",
    "data.batch_size=16",
]
TINY_AE = ["model.net.channels=[4,8]", "model.net.strides=[2,2]"]
TINY_UNET = ["model.net.channels=[4,8,16]", "model.net.strides=[2,2]", "model.net.num_res_units=1"]
THREE_CLASSES = ["data.task=multiclass", "data.num_classes=3"]


def fit(out: Path, *overrides: str) -> dict:
    return train(compose_config([*SMALL, *overrides], output_dir=out))


def net_state(ckpt: Path) -> dict[str, torch.Tensor]:
    state = Checkpoint(ckpt).contents["state_dict"]
    return {name[len("net.") :]: value for name, value in state.items() if name.startswith("net.")}


def run_info(out: Path) -> dict:
    return json.loads((out / "run_info.json").read_text())


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of three tasks to start other models from."""
    root = tmp_path_factory.mktemp("sources")
    fit(root / "cls", "test=false")
    fit(root / "ae", "model=autoencoder", *TINY_AE, "test=false")
    fit(root / "seg", "data=synthetic_seg", "model=unet", *TINY_UNET, "test=false")
    return {name: root / name / "checkpoints" / "best.ckpt" for name in ("cls", "ae", "seg")}


def test_a_classifier_starts_one_with_another_number_of_classes(sources, tmp_path):
    """The two-class classifier's features start a three-class one; its head, excluded, does not."""
    init = [f"model.init_weights.path={sources['cls']}", "model.freeze=[loaded]", *THREE_CLASSES]
    with pytest.raises(MedexpError, match=r"other shapes than the net's: head\.1\.weight.*exclude=\[head\.1\.\*\]"):
        fit(tmp_path / "no_exclude", *init)
    fit(tmp_path / "run", *init, "model.init_weights.exclude=[head.*]")
    report = run_info(tmp_path / "run")["init_weights"]
    assert report["kind"] == "medexp checkpoint" and report["excluded"] == ["head.1.bias", "head.1.weight"]
    assert not report["missing"] and not report["mismatched"] and len(report["loaded"]) > 10
    source, started = net_state(sources["cls"]), net_state(tmp_path / "run" / "checkpoints" / "best.ckpt")
    for name in report["loaded"]:
        if name.endswith("weight") and source[name].ndim == 4:  # frozen: convolutions stay as loaded
            assert torch.equal(started[name], source[name]), name
    assert started["head.1.weight"].shape == (3, source["head.1.weight"].shape[1])


def test_an_autoencoders_encoder_starts_a_classifier_frozen(sources, tmp_path):
    """model=autoencoder_classifier takes the autoencoder's encoder by name; frozen, it stays as it was."""
    fit(
        tmp_path / "run",
        "model=autoencoder_classifier",
        *TINY_AE,
        f"model.init_weights.path={sources['ae']}",
        "model.freeze=[loaded]",
    )
    report = run_info(tmp_path / "run")["init_weights"]
    encoder = sorted(name for name in net_state(sources["ae"]) if name.startswith("encode."))
    assert report["loaded"] == encoder and report["missing"] == ["head.3.bias", "head.3.weight"]
    assert all(name.startswith("decode.") for name in report["unexpected"])
    started = net_state(tmp_path / "run" / "checkpoints" / "best.ckpt")
    for name in encoder:
        assert torch.equal(started[name], net_state(sources["ae"])[name]), name


def test_a_segmentation_unets_encoder_starts_a_classifier(sources, tmp_path):
    fit(tmp_path / "run", "model=unet_classifier", *TINY_UNET, f"model.init_weights.path={sources['seg']}")
    report = run_info(tmp_path / "run")["init_weights"]
    down = [name for name in net_state(tmp_path / "run" / "checkpoints" / "best.ckpt") if name.startswith("model.")]
    assert report["loaded"] == sorted(down) and len(down) > 10
    assert report["unexpected"] and not report["mismatched"]


def torchvision_resnet18() -> dict[str, torch.Tensor]:
    """Random tensors with the names and shapes of torchvision's ImageNet ResNet-18 (MONAI names its
    modules as torchvision does; torchvision's shortcut convolutions have no bias)."""
    from monai.networks.nets import resnet18

    net = resnet18(spatial_dims=2, n_input_channels=3, num_classes=1000, bias_downsample=False)
    return {
        name: torch.randn_like(value) if value.is_floating_point() else value
        for name, value in net.state_dict().items()
    }


def test_imagenet_resnet18_in_torchvision_layout_starts_a_grey_classifier(tmp_path):
    """A .safetensors ResNet-18 of RGB ImageNet layout starts medexp's ResNet-18 on grey images:
    the first convolution's kernels are summed over the colours, the head is excluded."""
    from safetensors.torch import save_file

    weights = torchvision_resnet18()
    save_file(weights, str(tmp_path / "resnet18.safetensors"))
    out = tmp_path / "run"
    medexp_main(
        "train",
        *SMALL,
        "model=resnet18",
        "model.net.conv1_t_size=7",
        "model.net.conv1_t_stride=2",
        "model.pretrained_lr_scale=0.0",
        f"model.init_weights.path={tmp_path / 'resnet18.safetensors'}",
        "model.init_weights.exclude=[fc.*]",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    log = (out / "train.log").read_text() if (out / "train.log").exists() else ""
    report = run_info(out)["init_weights"]
    assert report["kind"] == "safetensors" and report["adapted"] == ["conv1.weight: RGB kernels summed to 1 channel"]
    # MONAI's shortcut convolutions have a bias that torchvision's have not: left as initialised
    assert report["missing"] == [f"layer{i}.0.downsample.0.bias" for i in (2, 3, 4)]
    assert report["excluded"] == ["fc.bias", "fc.weight"] and len(report["loaded"]) == len(weights) - 2
    started = net_state(out / "checkpoints" / "best.ckpt")
    assert torch.allclose(started["conv1.weight"], weights["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(started["layer3.1.conv2.weight"], weights["layer3.1.conv2.weight"])
    assert not log or "init_weights:" in log


def test_densenet_weights_in_torchvision_layout_are_mapped_onto_monais_names():
    from monai.networks.nets import DenseNet

    def densenet(**kwargs):
        return DenseNet(spatial_dims=2, init_features=8, growth_rate=4, block_config=(2, 2), bn_size=2, **kwargs)

    monai_names = densenet(in_channels=3, out_channels=10).state_dict()
    # torchvision's names: denselayerN.norm1 (older releases: norm.1), classifier
    layout = {}
    for index, (name, value) in enumerate(monai_names.items()):
        name = name.replace("class_layers.out.", "classifier.").replace(".layers.", ".")
        if index % 2 and re.search(r"denselayer\d+\.(norm|conv)[12]\.", name):
            name = re.sub(r"\.(norm|conv)([12])\.", r".\1.\2.", name)
        layout[name] = torch.randn_like(value) if value.is_floating_point() else value
    net = densenet(in_channels=1, out_channels=10)
    report = load_initial_weights(net, {"path": _save(layout)})
    assert report["layout"] == "torchvision/timm DenseNet" and not report["missing"] and not report["unexpected"]
    got = net.state_dict()
    assert torch.equal(got["class_layers.out.weight"], layout["classifier.weight"])
    assert torch.equal(got["features.conv0.weight"], layout["features.conv0.weight"].sum(1, keepdim=True))


def _save(weights, name: str = "weights.pt") -> str:
    import tempfile

    path = Path(tempfile.mkdtemp()) / name
    torch.save(weights, path)
    return str(path)


def test_2d_kernels_inflate_to_3d():
    """inflate=true: 2D ImageNet kernels into MONAI's 3D ResNet-18; a volume of identical slices
    then gives the 2D net's first-layer response."""
    from monai.networks.nets import resnet18

    weights = torchvision_resnet18()
    net = resnet18(spatial_dims=3, n_input_channels=1, num_classes=2, bias_downsample=False)
    with pytest.raises(MedexpError, match="other shapes than the net's: conv1.weight"):
        load_initial_weights(net, {"path": _save(weights), "exclude": ["fc.*"]})
    report = load_initial_weights(net, {"path": _save(weights), "exclude": ["fc.*"], "inflate": True})
    assert "conv1.weight: RGB kernels summed to 1 channel, inflated to depth 7" in report["adapted"]
    image = torch.randn(1, 1, 32, 32)
    volume = image.unsqueeze(2).repeat(1, 1, 7, 1, 1)
    conv2d = torch.nn.functional.conv2d(image, weights["conv1.weight"].sum(1, keepdim=True), stride=2, padding=3)
    conv3d = torch.nn.functional.conv3d(volume, net.conv1.weight, stride=(1, 2, 2), padding=(0, 3, 3))
    assert torch.allclose(conv3d[:, :, 0], conv2d, atol=1e-4)


def test_the_weights_are_found_inside_a_saved_training_state(tmp_path):
    """A .pth of {"model": {"module.<name>": ...}, "epoch": ...} (a DataParallel training script's)."""
    from monai.networks.nets import resnet18

    weights = torchvision_resnet18()
    path = tmp_path / "training_state.pth"
    torch.save({"epoch": 90, "model": {f"module.{k}": v for k, v in weights.items()}}, path)
    net = resnet18(spatial_dims=2, n_input_channels=3, num_classes=1000)
    report = load_initial_weights(net, {"path": str(path)})
    assert len(report["loaded"]) == len(weights) and report["kind"] == "state dict"
    torch.save({"model": weights, "ema": weights}, path)
    with pytest.raises(MedexpError, match=r"cannot tell which part.*\[ema, model\].*set model.init_weights.key"):
        load_initial_weights(net, {"path": str(path)})
    assert load_initial_weights(net, {"path": str(path), "key": "ema"})["loaded"]
    with pytest.raises(MedexpError, match=r"no key 'best' in the file; its top-level keys are \[ema, model\]"):
        load_initial_weights(net, {"path": str(path), "key": "best"})


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_monai_bundle_directory_is_read_and_torchscript_or_pickles_are_refused(tmp_path):
    from monai.networks.nets import resnet18

    weights = torchvision_resnet18()
    net = resnet18(spatial_dims=2, n_input_channels=3, num_classes=1000, bias_downsample=False)
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    (bundle / "models" / "model.ts").write_bytes(b"PK")
    with pytest.raises(MedexpError, match="not a MONAI bundle with weights.*only TorchScript models/model.ts"):
        load_initial_weights(net, {"path": str(bundle)})
    torch.save(weights, bundle / "models" / "model.pt")
    report = load_initial_weights(net, {"path": str(bundle), "strict": True})
    assert report["kind"] == "MONAI bundle" and len(report["loaded"]) == len(weights)
    evil = tmp_path / "evil.pt"
    torch.save({"conv1.weight": Payload()}, evil)
    with pytest.raises(MedexpError, match="refused, it holds a pickled print, which loading would run as code"):
        load_initial_weights(net, {"path": str(evil)})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.init_weights.path=/nowhere/w.pt"], r"model.init_weights.path='/nowhere/w.pt': no such file"),
        (
            ["model.init_weights=w.pt"],
            r"model.init_weights='w.pt'; expected its options, e.g. model.init_weights.path=",
        ),
        (
            ["model.init_weights.path={weights}", "model.init_weights.grey=max"],
            r"grey='max'; expected sum, mean or null",
        ),
        (["model.init_weights.path={weights}", "+model.init_weights.prefix=x"], r"init_weights.prefix: unknown option"),
        (["model.freeze=[loaded]"], r"model.freeze names `loaded`.*init_weights.path is null"),
        (["model.pretrained_lr_scale=0.1"], r"pretrained_lr_scale=0.1: it scales.*path is null"),
        (["model.freeze=[features.*]", "model.unfreeze_at_epoch=1", "trainer=ddp_sim"], r"DDP synchronises only"),
        (["model.unfreeze_at_epoch=1"], r"model.freeze is empty: nothing to unfreeze"),
        (["model.freeze=[backbone.*]"], r"model.freeze: 'backbone.\*' names no parameter of SimpleCNN"),
        (["model.freeze=[*]"], r"model.freeze=\['\*'\] freezes every parameter of SimpleCNN: nothing would train"),
        (
            ["model.init_weights.path={weights}"],
            r"none of its \d+ weights match SimpleCNN's names: the net has e.g. \[features.0.conv.weight.*the file "
            r"\[conv1.weight",
        ),
        (
            [
                "model.init_weights.path={weights}",
                "model.init_weights.strict=true",
                "model=resnet18",
                "model.net.conv1_t_size=7",
            ],
            r"strict=true, and 5 weight\(s\) are not in the file: \[fc.bias, fc.weight, layer2.0.downsample.0.bias",
        ),
    ],
)
def test_bad_settings_fail_in_one_line(tmp_path, overrides, message):
    path = tmp_path / "w.pt"
    weights = torchvision_resnet18()
    weights.pop("fc.weight"), weights.pop("fc.bias")
    torch.save(weights, path)
    overrides = [o.replace("{weights}", str(path)) for o in overrides]
    with pytest.raises(MedexpError, match=message):
        fit(tmp_path / "run", *overrides)


def test_freezing_unfreezing_and_a_learning_rate_factor(sources, tmp_path):
    """Frozen features (and their norm statistics) stay as loaded through epoch 0 and train from
    unfreeze_at_epoch=1; pretrained_lr_scale=0 keeps loaded weights and trains the rest, in two
    parameter groups the learning-rate monitor logs."""
    source = net_state(sources["cls"])
    init = [f"model.init_weights.path={sources['cls']}", "model.freeze=[features.*]", "model.unfreeze_at_epoch=1"]
    fit(tmp_path / "one", *init)
    one = net_state(tmp_path / "one" / "checkpoints" / "last.ckpt")
    features = [name for name in source if name.startswith("features.") and "num_batches" not in name]
    assert all(torch.equal(one[name], source[name]) for name in features)
    assert not torch.equal(one["head.1.weight"], source["head.1.weight"])
    fit(tmp_path / "two", *init, "trainer.max_epochs=2")
    two = net_state(tmp_path / "two" / "checkpoints" / "last.ckpt")
    assert not torch.equal(two["features.0.conv.weight"], source["features.0.conv.weight"])

    out = tmp_path / "scaled"
    fit(
        out,
        f"model.init_weights.path={sources['cls']}",
        "model.init_weights.exclude=[head.*]",
        "model.pretrained_lr_scale=0.0",
    )
    scaled = net_state(out / "checkpoints" / "last.ckpt")
    assert torch.equal(scaled["features.0.conv.weight"], source["features.0.conv.weight"])
    assert not torch.equal(scaled["head.1.weight"], source["head.1.weight"])
    with (out / "csv" / "metrics.csv").open() as f:
        rows = [row for row in csv.DictReader(f) if row.get("lr-Adam/pg2")]
    assert float(rows[0]["lr-Adam/pg2"]) == 0.0 and float(rows[0]["lr-Adam/pg1"]) > 0


def test_a_rebuilt_model_does_not_need_its_starting_weights(sources, tmp_path):
    """eval/predict/export rebuild from the checkpoint: init_weights and freezing are inert then."""
    copy = tmp_path / "start.ckpt"
    copy.write_bytes(sources["cls"].read_bytes())
    init = [f"model.init_weights.path={copy}", "model.init_weights.exclude=[head.*]", "model.freeze=[loaded]"]
    fit(tmp_path / "run", *init, "test=false")
    copy.unlink()
    model = Checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt").build_model()
    assert model.init_report is None and all(p.requires_grad for p in model.parameters())


def test_an_encrypted_checkpoint_starts_a_model(tmp_path, monkeypatch):
    from medexp.privacy.encryption import generate_key

    monkeypatch.setenv("MEDEXP_TEST_INIT_KEY", generate_key())
    fit(tmp_path / "enc", "test=false", "encryption.key_env=MEDEXP_TEST_INIT_KEY")
    ckpt = tmp_path / "enc" / "checkpoints" / "best.ckpt"
    assert not ckpt.read_bytes().startswith(b"PK")  # sealed, not a plain zip
    fit(tmp_path / "run", f"model.init_weights.path={ckpt}", "test=false")
    assert run_info(tmp_path / "run")["init_weights"]["kind"] == "medexp checkpoint"


def test_pretrained_true_offline_says_which_file_to_fetch(tmp_path, monkeypatch):
    """MONAI's DenseNet-121 downloads torchvision's weights for pretrained=true; with no network
    the error names the file and the init_weights setting instead of a traceback."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached copy
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")  # nothing listens there: no network
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(MedexpError) as error:
        fit(tmp_path / "run", "model=densenet121", "+model.net.pretrained=true", "data.image_size=32")
    message = str(error.value)
    assert "\n" not in message
    assert "densenet121-a639ec97.pth" in message and "model.init_weights.path=<file>" in message


def test_a_bundle_exported_by_medexp_starts_a_model(sources, tmp_path):
    """`medexp export format=bundle` and back: the bundle's models/model.pt holds the net's weights."""
    pytest.importorskip("ignite")
    from medexp.export import export

    bundle = tmp_path / "bundle"
    export(
        compose_config(
            [f"ckpt_path={sources['cls']}", "format=bundle", f"output={bundle}"], "export", output_dir=tmp_path / "x"
        )
    )
    fit(tmp_path / "run", f"model.init_weights.path={bundle}", "model.init_weights.strict=true", "test=false")
    report = run_info(tmp_path / "run")["init_weights"]
    assert report["kind"] == "MONAI bundle" and report["loaded"] == sorted(net_state(sources["cls"]))


def test_label_fraction_trains_on_part_of_each_class(tmp_path):
    """data.label_fraction=0.25 keeps a quarter of each class of the training split, the same rows
    whatever the training seed; validation and test stay whole."""
    import numpy as np

    from medexp.utils.config import build
    from tests.helpers import write_medmnist_npz

    write_medmnist_npz(tmp_path / "breastmnist.npz", {"train": 80, "val": 20, "test": 20}, num_classes=2)
    overrides = ["data=medmnist", f"data.root={tmp_path}", "data.label_fraction=0.25"]
    labels = np.load(tmp_path / "breastmnist.npz")["train_labels"].reshape(-1)
    kept = []
    for seed in (0, 1):
        datamodule = build(compose_config([*overrides, f"seed={seed}"], output_dir=tmp_path / "run").data)
        datamodule.setup()
        kept.append(datamodule.datasets["train"].labels.reshape(-1))
        assert len(datamodule.datasets["val"]) == 20 and len(datamodule.datasets["test"]) == 20
    assert np.array_equal(kept[0], kept[1])
    for label in (0, 1):
        assert (kept[0] == label).sum() == round(0.25 * (labels == label).sum())
    with pytest.raises(MedexpError, match=r"data.label_fraction=1.5; expected a fraction in \(0, 1\]"):
        build(
            compose_config(
                ["data=medmnist", f"data.root={tmp_path}", "data.label_fraction=1.5"], output_dir=tmp_path
            ).data
        )
