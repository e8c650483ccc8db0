"""MONAI's transformers as one YAML each (model=vit, unetr, swin_unetr; 2D and 3D): trained
through `medexp train`, their sizes checked before anything is built, their published weight
layouts loaded through model.init_weights, and ViT attention rollout through `medexp explain`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from medexp.explain import explain
from medexp.explainability.maps import SaliencyMaps, attention_rollout
from medexp.tasks.base import OutputSelection
from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, compose_config

FEW = ["data.num_samples={train: 8, val: 4, test: 4}", "data.batch_size=4", "trainer.max_epochs=1", "logger=csv"]
# tiny transformers: a ViT of 8-pixel patches on 32 px (16 tokens), 2 blocks of 2 heads
TINY_VIT = [
    "model=vit",
    "model.net.patch_size=8",
    "model.net.hidden_size=48",
    "model.net.mlp_dim=96",
    "model.net.num_layers=2",
    "model.net.num_heads=2",
]
TINY_UNETR = [
    "model=unetr",
    "model.net.feature_size=8",
    "model.net.hidden_size=48",
    "model.net.mlp_dim=96",
    "model.net.num_heads=2",
]
# the smallest SwinUNETR; at 32 px its bottleneck is one pixel, which only batch norm normalises
TINY_SWIN = ["model=swin_unetr", "model.net.feature_size=12", "model.net.norm_name=batch"]


def run_train(tmp_path: Path, *overrides: str) -> dict:
    return train(compose_config([*QUIET, *FEW, *overrides], output_dir=tmp_path))


def metrics_of(run: Path) -> dict[str, float]:
    (path,) = run.glob("**/csv/**/metrics.csv")
    rows = list(csv.DictReader(path.open()))
    return {key: float(value) for row in rows for key, value in row.items() if value not in ("", None)}


# --- the task base selects one of a net's outputs --------------------------------------------


def test_output_selection_picks_an_index_or_key_and_names_what_there_is():
    net = torch.nn.Linear(2, 2)
    out = torch.ones(1)
    assert OutputSelection(0)(net, (), (out, [out, out])) is out
    assert OutputSelection("logits")(net, (), {"logits": out, "aux": out * 2}) is out
    with pytest.raises(MedexpError, match=r"model.select_output=2; Linear returns 2 outputs: an index in 0..1"):
        OutputSelection(2)(net, (), (out, out))
    with pytest.raises(MedexpError, match=r"returns a dict with keys \['aux', 'logits'\]"):
        OutputSelection("x")(net, (), {"logits": out, "aux": out})
    with pytest.raises(MedexpError, match="returns one Tensor; set model.select_output=null"):
        OutputSelection(0)(net, (), out)
    with pytest.raises(MedexpError, match="expected an index"):
        OutputSelection(1.5)


def test_vit_yaml_builds_a_classifier_whose_net_gives_logits(compose_cfg):
    cfg = compose_cfg(*TINY_VIT, "data.task=multiclass", "data.num_classes=3")
    task = instantiate(cfg.model, _convert_="all").eval()
    with torch.no_grad():
        logits = task.net(torch.randn(2, 1, 32, 32))  # every caller of the net gets the logits
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 3)
    # no tanh head: logits are not squashed into [-1, 1]
    assert type(task.net.classification_head) is torch.nn.Linear


# --- training, 2D and 3D -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [[], ["data=synthetic_3d", "data.image_size=16", "model.net.patch_size=4"]],
    ids=["2d", "3d"],
)
def test_vit_trains_and_tests(tmp_path, data):
    run_train(tmp_path, *TINY_VIT, *data)
    values = metrics_of(tmp_path)
    assert {"train/loss", "val/auroc", "test/auroc"} <= set(values)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_vit_trains_with_bf16_autocast(tmp_path):
    run_train(tmp_path, *TINY_VIT, "trainer.precision=bf16-mixed")
    assert torch.isfinite(torch.tensor(metrics_of(tmp_path)["train/loss"]))


@pytest.mark.parametrize(
    "model",
    [
        [*TINY_UNETR],
        [*TINY_UNETR, "data.spatial_dims=3"],
        [*TINY_SWIN],
        [*TINY_SWIN, "data.spatial_dims=3", "model.net.use_checkpoint=true", "data.batch_size=2", "test=false"],
    ],
    ids=["unetr-2d", "unetr-3d", "swin_unetr-2d", "swin_unetr-3d-checkpointing"],
)
def test_segmentation_transformers_train_on_32px(tmp_path, model):
    small = ["data.num_samples={train: 2, val: 2, test: 2}"] if "data.spatial_dims=3" in model else []
    run_train(tmp_path, "data=synthetic_seg", "data.image_size=32", *small, *model)
    values = metrics_of(tmp_path)
    assert "val/dice" in values and torch.isfinite(torch.tensor(values["train/loss"]))


def test_unetr_runs_on_sliding_windows_of_its_size(compose_cfg):
    # the ViT is built for model.roi_size; inference on larger images runs windows of it
    cfg = compose_cfg("data=synthetic_seg", "data.image_size=48", *TINY_UNETR, "model.roi_size=[32,32]")
    assert list(cfg.model.net.img_size) == [32, 32]
    task = instantiate(cfg.model, _convert_="all").eval()
    with torch.no_grad():
        assert task.infer(torch.randn(1, 1, 48, 48)).shape == (1, 2, 48, 48)


def test_swin_unetr_gradient_checkpointing_gives_the_same_gradients(compose_cfg):
    grads = []
    for flag in ("false", "true"):
        cfg = compose_cfg("data=synthetic_seg", "data.spatial_dims=3", *TINY_SWIN, f"model.net.use_checkpoint={flag}")
        torch.manual_seed(0)
        task = instantiate(cfg.model, _convert_="all").train()
        torch.manual_seed(1)
        task.net(torch.randn(2, 1, 32, 32, 32)).square().mean().backward()
        grads.append(task.net.swinViT.patch_embed.proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


# --- sizes checked before anything is built ------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "patch"),
    [
        (["data.image_size=28"], 4),
        (["data.image_size=64"], 4),
        (["data.image_size=100"], 4),  # 8 does not divide 100
        (["data.image_size=128"], 8),
        (["data.image_size=224"], 16),
        (["data=synthetic_3d", "data.image_size=96"], 8),
        (["data.image_size=224", "model.net.patch_size=32"], 32),  # set by the user: kept
    ],
)
def test_the_vit_patch_follows_the_image_size(overrides, patch):
    assert compose_config(["model=vit", *overrides]).model.net.patch_size == patch


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            [*TINY_VIT, "data.image_size=30"],
            r"model.net.img_size \(data.image_size\)=30 is not a multiple of the model.net.patch_size=8 of ViT; "
            r"nearest valid sizes: \[24, 32\] or model.net.patch_size in \[5, 6, 10\]",
        ),
        (
            [*TINY_VIT, "model.net.num_heads=5"],
            r"model.net.hidden_size=48 is not a multiple of model.net.num_heads=5",
        ),
        (
            ["data=synthetic_seg", "data.image_size=40", *TINY_UNETR],
            r"model.net.img_size \(model.roi_size\)=\[40, 40\] is not a multiple of the patch size=16 of UNETR; "
            r"nearest valid sizes: \[32, 48\]",
        ),
        (
            ["data=synthetic_seg", *TINY_UNETR, "model.roi_size=[32,32]", "model.net.img_size=[64,64]"],
            r"model.net.img_size=\[64, 64\] but model.roi_size=\[32, 32\]",
        ),
        (
            ["data=synthetic_seg", "data.image_size=48", *TINY_SWIN],
            r"data.image_size=48 is not a multiple of 32 .* nearest valid sizes: \[32, 64\]",
        ),
        (
            ["data=synthetic_seg", "data.image_size=64", "model=swin_unetr", "model.roi_size=[80,80]"],
            r"model.roi_size=\[80, 80\] is not a multiple of 32 .* nearest valid sizes: \[64, 96\]",
        ),
        (
            ["data=synthetic_seg", "data.image_size=64", "model=swin_unetr", "model.net.feature_size=16"],
            r"model.net.feature_size=16 is not a multiple of 12 \(SwinUNETR\); nearest valid: \[12, 24\]",
        ),
        (
            ["data=synthetic_seg", "data.image_size=32", "model=swin_unetr"],
            r"one voxel at 32 per axis, which model.net.norm_name=instance cannot normalise; use at least 64",
        ),
    ],
    ids=["vit-patch", "vit-heads", "unetr-patch", "unetr-roi", "swin-size", "swin-roi", "swin-feature", "swin-norm"],
)
def test_sizes_are_checked_before_building(tmp_path, overrides, message):
    with pytest.raises(MedexpError, match=message):
        run_train(tmp_path, *overrides)
    assert not (tmp_path / "checkpoints").exists()


# --- published weight layouts through model.init_weights ------------------------------------------


def _swin_task(compose_cfg, path: Path | None = None, *extra: str):
    overrides = ["data=synthetic_seg", "data.spatial_dims=3", *TINY_SWIN, *extra]
    if path is not None:
        overrides.append(f"model.init_weights.path={path}")
    return instantiate(compose_cfg(*overrides).model, _convert_="all")


def test_swin_unetr_loads_the_model_swinvit_layout(compose_cfg, tmp_path):
    """Tang et al.'s self-supervised encoder (model_swinvit.pt): {"state_dict": {module.<swinViT
    name>: ...}}, the names SwinUNETR.load_from reads."""
    torch.manual_seed(3)
    source = _swin_task(compose_cfg).net.swinViT.state_dict()
    path = tmp_path / "model_swinvit.pt"
    torch.save({"epoch": 100, "state_dict": {f"module.{k}": v for k, v in source.items()}}, path)
    task = _swin_task(compose_cfg, path)
    assert task.init_report["layout"] == "MONAI SwinUNETR self-supervised (model_swinvit.pt)"
    assert len(task.init_report["loaded"]) == len(source) and not task.init_report["unexpected"]
    loaded = task.net.swinViT.state_dict()
    for name, value in source.items():
        torch.testing.assert_close(loaded[name], value)
    # the decoder keeps its own initialisation
    assert any(name.startswith("encoder1.") for name in task.init_report["missing"])


def test_swin_unetr_loads_the_ssl_pretrained_weights_layout(compose_cfg, tmp_path):
    """MONAI's ssl_pretrained_weights.pth: {"model": {encoder.<name with the stage's extra index>,
    encoder.mask_token, out.conv.conv.*}}, renamed as monai's filter_swinunetr does."""
    torch.manual_seed(4)
    source = _swin_task(compose_cfg).net.swinViT.state_dict()

    def ssl_name(name: str) -> str:  # layers1.0.blocks... -> encoder.layers1.0.0.blocks...
        return f"encoder.{name[:10]}0.{name[10:]}" if name.startswith("layers") else f"encoder.{name}"

    weights = {ssl_name(k): v for k, v in source.items()}
    weights |= {"encoder.mask_token": torch.zeros(1, 1, 12), "out.conv.conv.weight": torch.zeros(1, 12, 1, 1, 1)}
    path = tmp_path / "ssl_pretrained_weights.pth"
    torch.save({"model": weights}, path)
    task = _swin_task(compose_cfg, path)
    report = task.init_report
    assert report["layout"] == "MONAI SwinUNETR self-supervised (ssl_pretrained_weights.pth)"
    assert len(report["loaded"]) == len(source)
    assert set(report["unexpected"]) == {"encoder.mask_token", "out.conv.conv.weight"}
    for name, value in source.items():
        torch.testing.assert_close(task.net.swinViT.state_dict()[name], value)


def _vit_task(compose_cfg, *extra: str):
    return instantiate(compose_cfg(*TINY_VIT, *extra).model, _convert_="all")


def test_vit_loads_timm_weights_with_position_embeddings_resized(compose_cfg, tmp_path):
    """A timm ViT (pos_embed with a class token's position, blocks.N.mlp.fc1, head) for 64 px
    images (an 8x8 grid) starts a 32 px MONAI ViT (4x4): names mapped, the class token's
    position dropped and the grid resized; the head of another class count excluded."""
    torch.manual_seed(5)
    big = _vit_task(compose_cfg, "data.image_size=64").net.state_dict()
    timm = {}
    for name, value in big.items():
        name = (
            name.replace("patch_embedding.patch_embeddings.", "patch_embed.proj.")
            .replace("attn.out_proj.", "attn.proj.")
            .replace("mlp.linear1.", "mlp.fc1.")
            .replace("mlp.linear2.", "mlp.fc2.")
            .replace("classification_head.", "head.")
        )
        if name == "patch_embedding.position_embeddings":
            name, value = "pos_embed", torch.cat([torch.randn(1, 1, value.shape[2]), value], dim=1)
        timm[name] = value
    timm["head.weight"], timm["head.bias"] = torch.randn(1000, 48), torch.randn(1000)
    path = tmp_path / "vit_timm.pth"
    torch.save(timm, path)
    task = _vit_task(
        compose_cfg, f"model.init_weights.path={path}", "model.init_weights.exclude=[classification_head.*]"
    )
    report = task.init_report
    assert report["layout"] == "timm ViT"
    assert report["adapted"] == [
        "patch_embedding.position_embeddings: class token's position dropped, 8x8 patch grid resized to 4x4"
    ]
    state = task.net.state_dict()
    torch.testing.assert_close(state["blocks.1.mlp.linear1.weight"], big["blocks.1.mlp.linear1.weight"])
    torch.testing.assert_close(state["blocks.0.attn.out_proj.weight"], big["blocks.0.attn.out_proj.weight"])
    # the resized grid keeps the positions' mean (bicubic resampling of a smooth-ish field)
    assert state["patch_embedding.position_embeddings"].shape == (1, 16, 48)
    assert "patch_embedding.position_embeddings" in report["loaded"]


def test_vit_starts_from_a_unetr_encoder(tmp_path):
    """A UNETR's ViT (vit.*, from a medexp checkpoint) starts a ViT classifier of the same width."""
    unetr_run, vit_run = tmp_path / "unetr", tmp_path / "vit"
    width = ["model.net.hidden_size=48", "model.net.mlp_dim=96", "model.net.num_heads=2"]
    run_train(unetr_run, "data=synthetic_seg", "data.image_size=32", "model=unetr", "model.net.feature_size=8", *width)
    run_train(
        vit_run,
        "model=vit",
        "model.net.patch_size=16",
        "model.net.num_layers=12",
        *width,
        f"model.init_weights.path={unetr_run / 'checkpoints' / 'last.ckpt'}",
        "model.init_weights.strip_prefix=vit.",
        "model.init_weights.strict=false",
    )
    report = json.loads((vit_run / "run_info.json").read_text())["init_weights"]
    assert "blocks.11.attn.qkv.weight" in report["loaded"] and "patch_embedding.position_embeddings" in report["loaded"]


# --- attention rollout --------------------------------------------------------------------------


def test_attention_rollout_of_uniform_attention_is_uniform(compose_cfg):
    """With zero query/key weights every head attends uniformly (1/T to each of T tokens); one
    block's rollout is then 0.5/T + 0.5 I, so the class token gives each patch 0.5/T."""
    task = _vit_task(compose_cfg, "model.net.num_layers=1").eval()
    block = task.net.blocks[0].attn
    with torch.no_grad():
        block.qkv.weight[: 2 * 48].zero_()
        block.qkv.bias[: 2 * 48].zero_()
    maps = attention_rollout(task.net, torch.randn(2, 1, 32, 32))
    assert maps.shape == (2, 1, 32, 32)
    torch.testing.assert_close(maps, torch.full_like(maps, 0.5 / 17))
    assert not block.save_attn  # left as it was


def test_attention_rollout_follows_the_attended_patch(compose_cfg):
    """A class token that attends only to one patch (the keys of the others pushed far down)
    puts the rollout's mass on that patch's pixels."""
    task = _vit_task(compose_cfg, "model.net.num_layers=1").eval()
    images = torch.zeros(1, 1, 32, 32)
    images[..., 8:16, 16:24] = 5.0  # patch (1, 2) of the 4x4 grid: token 1 + 4 + 2 = 7
    block = task.net.blocks[0].attn
    with torch.no_grad():
        block.qkv.weight.zero_()
        block.qkv.bias.zero_()
        block.qkv.bias[:48] = 1.0  # queries of all ones
    hook = block.qkv.register_forward_hook(lambda m, i, o: o.index_add(1, torch.tensor([7]), _key_boost(o)))
    try:
        maps = attention_rollout(task.net, images)
    finally:
        hook.remove()
    assert maps[0, 0, 8:16, 16:24].mean() > 3 * maps[0, 0].mean()


def _key_boost(qkv: torch.Tensor) -> torch.Tensor:
    boost = torch.zeros_like(qkv[:, :1])
    boost[..., 48:96] = 50.0  # token 7's key: every query attends to it
    return boost


def test_attention_needs_a_vision_transformer(compose_cfg):
    task = instantiate(compose_cfg("model=cnn").model, _convert_="all")
    with pytest.raises(MedexpError, match="method=attention needs a vision transformer with a class token"):
        SaliencyMaps(task, "attention")


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("vit")
    run_train(run, *TINY_VIT, "data.lesion_contrast=3", "test=false")
    return run


def test_explain_attention_scores_vit_maps_against_lesion_masks(vit_run, tmp_path):
    run = vit_run
    output = tmp_path / "explained"
    summary = explain(
        compose_config(
            [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"output={output}", "method=attention", "steps=4"],
            "explain",
            output_dir=output,
        )
    )
    assert summary["method"] == "attention" and summary["layer"] is None
    assert summary["images"] == 4 and summary["images_scored_with_mask"] >= 1
    assert 0 <= summary["mean"]["pointing_mass"] <= 1 and summary["mean"]["deletion_auc"] is not None
    rows = list(csv.DictReader((output / "saliency.csv").open()))
    assert len(rows) == 4 and all((output / row["overlay"]).is_file() for row in rows)


# --- torch.compile and export ------------------------------------------------------------------


def test_vit_exports_its_logits_and_verifies(vit_run, tmp_path):
    """The selected output goes into the exported graph (the hook is traced with the net)."""
    from medexp.export import export

    output = tmp_path / "exported"
    ckpt = vit_run / "checkpoints" / "last.ckpt"
    export(compose_config([f"ckpt_path={ckpt}", "format=pt2", f"output={output}"], "export", output_dir=output))
    program = torch.export.load(str(output / "model.pt2")).module()
    assert program(torch.randn(2, 1, 32, 32)).shape == (2, 2)


def test_a_vit_bundle_is_refused_in_one_line(vit_run, tmp_path):
    """A bundle's network_def would return (logits, hidden states): refused, naming the formats that work."""
    from medexp.export import export

    ckpt = vit_run / "checkpoints" / "last.ckpt"
    config = compose_config(
        [f"ckpt_path={ckpt}", "format=bundle", f"output={tmp_path / 'b'}"], "export", output_dir=tmp_path
    )
    with pytest.raises(MedexpError, match=r"model.select_output=0.*format=onnx or format=pt2") as error:
        export(config)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "b" / "models").exists()


@pytest.mark.slow
def test_vit_trains_compiled(tmp_path):
    """model.compile=true (torch.compile; tens of seconds of compilation on a CPU)."""
    run_train(tmp_path, *TINY_VIT, "model.compile=true")
    assert torch.isfinite(torch.tensor(metrics_of(tmp_path)["train/loss"]))
