"""Deep ensembles in one run (`model.ensemble=K`): members with redrawn weights, each trained on
its own loss, evaluated, checkpointed and exported as the mean of their probabilities."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medexp.checkpoints.checkpoint import Checkpoint
from medexp.nets.ensemble import Ensemble, redraw
from medexp.nets.simple_cnn import SimpleCNN
from medexp.tasks.classification import ClassificationTask
from tests.conftest import QUIET, medexp_main, run_cli

RUN = [*QUIET, "report=false", "extras.print_config=false", "trainer.max_epochs=2"]


def small_net() -> nn.Module:
    return SimpleCNN(spatial_dims=2, in_channels=1, out_channels=3, channels=[4, 8], dropout=0.0)


def test_redraw_shuffles_each_trainable_tensor_and_keeps_the_rest():
    torch.manual_seed(0)
    net = small_net()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    names = list(before)
    keep = {names[0]}
    torch.manual_seed(1)
    redraw(net, keep)
    after = dict(net.named_parameters())
    assert torch.equal(after[names[0]], before[names[0]])  # kept
    for name in names[1:]:
        # the same values (the same draw of the same distribution), in another order
        assert torch.equal(after[name].flatten().sort().values, before[name].flatten().sort().values), name
        if before[name].unique().numel() > 16:  # (a short tensor may be drawn in its own order)
            assert not torch.equal(after[name], before[name]), name
    # seeded: the same shuffles again
    again = small_net()
    again.load_state_dict({name: before[name] for name in names}, strict=False)
    torch.manual_seed(1)
    redraw(again, keep)
    assert all(torch.equal(p, after[n]) for n, p in again.named_parameters())


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "mean"])
def test_combined_outputs_are_the_members_mean_probability(kind):
    torch.manual_seed(0)
    ensemble = Ensemble(small_net(), 3, kind).eval()
    x = torch.randn(5, 1, 16, 16)
    members = torch.stack([member(x) for member in ensemble.members])
    combined = ensemble(x)
    assert combined.shape == (5, 3)
    if kind == "softmax":
        expected, got = members.softmax(dim=2).mean(dim=0), combined.softmax(dim=1)
    elif kind == "sigmoid":
        expected, got = members.sigmoid().mean(dim=0), combined.sigmoid()
    else:
        expected, got = members.mean(dim=0), combined
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # large logits stay finite: the combination is computed in log space
    huge = torch.tensor([[[80.0, -80.0, 0.0]], [[-90.0, 90.0, 0.0]]])
    assert torch.isfinite(ensemble.combine(huge)).all()
    # in training mode the members' outputs come stacked, for one loss each
    assert ensemble.train()(x).shape == (3, 5, 3)


def test_each_member_trains_on_its_own_loss():
    """The training loss is the mean of the members' losses, so each member's gradient is that of
    its own loss (an ensemble, not one wide network trained on the averaged output)."""
    torch.manual_seed(0)
    task = ClassificationTask(
        small_net(), task="multiclass", num_classes=3, optimizer=torch.optim.SGD, monitor="val/auroc", ensemble=2
    )
    batch = {"image": torch.randn(6, 1, 16, 16), "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    task.train()
    loss = task._shared_step(batch, "train")
    members = task.net.members
    own = [F.cross_entropy(member(batch["image"]), batch["label"]) for member in members]
    assert loss.detach().item() == pytest.approx(float(sum(own) / 2), rel=1e-6)
    loss.backward()
    for member, member_loss in zip(members, own, strict=True):
        expected = torch.autograd.grad(member_loss / 2, list(member.parameters()))
        for parameter, grad in zip(member.parameters(), expected, strict=True):
            torch.testing.assert_close(parameter.grad, grad, rtol=1e-5, atol=1e-7)


def test_an_ensemble_trains_evaluates_exports_and_is_explained_through_the_cli(tmp_path):
    run = tmp_path / "run"
    run_cli("train", *RUN, "model.ensemble=3", f"hydra.run.dir={run}", cwd=tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    ckpt = run / "checkpoints" / "best.ckpt"
    state = Checkpoint(ckpt).contents["state_dict"]
    first = sorted(name for name in state if name.startswith("net.members.0."))
    assert first and all(name.replace(".0.", ".2.", 1) in state for name in first)
    weights = [name for name in first if name.endswith("weight") and state[name].ndim > 1]
    # the members were drawn and trained apart
    assert all(not torch.equal(state[n], state[n.replace(".0.", ".1.", 1)]) for n in weights)

    # the rebuilt model is the ensemble: its probabilities are the members' mean
    model = Checkpoint(ckpt).build_model().eval()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        members = torch.stack([member(x).softmax(dim=1) for member in model.net.members])
        torch.testing.assert_close(model.postprocess(model(x)), members.mean(dim=0), rtol=1e-5, atol=1e-6)

    # medexp eval reproduces the test metrics of the run
    medexp_main("eval", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["test"]
    assert evaluated["test/auroc"] == pytest.approx(metrics["test"]["test/auroc"], abs=1e-6)

    # the export is the whole ensemble, verified against the model by medexp export itself
    out = medexp_main(
        "export", f"ckpt_path={ckpt}", "format=onnx", f"output={tmp_path / 'onnx'}", "hydra.run.dir=ex", cwd=tmp_path
    )
    assert "passed" in out.stdout + out.stderr
    # a bundle's network_def builds one network: refused in one line, naming what exports
    refused = medexp_main(
        "export",
        f"ckpt_path={ckpt}",
        "format=bundle",
        f"output={tmp_path / 'bundle'}",
        "hydra.run.dir=eb",
        cwd=tmp_path,
        check=False,
    )
    assert refused.returncode != 0 and "ensemble of 3 networks (model.ensemble)" in refused.stderr
    assert "format=onnx" in refused.stderr and "Traceback" not in refused.stderr

    # Grad-CAM reads one network's layers: refused; occlusion explains the ensemble as a whole
    refused = medexp_main(
        "explain",
        f"ckpt_path={ckpt}",
        "split=test",
        "limit=2",
        "method=gradcam",
        "output=maps",
        "hydra.run.dir=x1",
        cwd=tmp_path,
        check=False,
    )
    assert refused.returncode != 0 and "method=occlusion explains the ensemble" in refused.stderr
    medexp_main(
        "explain",
        f"ckpt_path={ckpt}",
        "split=test",
        "limit=2",
        "method=occlusion",
        "output=maps",
        "hydra.run.dir=x2",
        cwd=tmp_path,
    )
    assert list((tmp_path / "maps").rglob("*.png"))


def test_loaded_weights_start_every_member(tmp_path):
    torch.manual_seed(0)
    source = small_net()
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    task = ClassificationTask(
        small_net(),
        task="multiclass",
        num_classes=3,
        optimizer=torch.optim.SGD,
        init_weights={"path": str(tmp_path / "weights.pt"), "exclude": ["head.*"]},
        ensemble=3,
    )
    loaded = set(task.init_report["loaded"])
    assert loaded and not any(name.startswith("head.") for name in loaded)
    members = [dict(member.named_parameters()) for member in task.net.members]
    loaded = {name for name in loaded if name in members[0]}  # the parameters (not the buffers)
    for name in loaded:
        for member in members:
            assert torch.equal(member[name], source.state_dict()[name]), name
    heads = [name for name in members[0] if name.startswith("head.") and members[0][name].numel() > 16]
    assert heads and all(not torch.equal(members[0][n], members[1][n]) for n in heads)
    # the loaded weights of every member count as loaded (model.freeze=[loaded], lr factors)
    assert len(task.finetuning.loaded) == 3 * len(loaded)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.ensemble=0"], "model.ensemble=0; expected a number of networks >= 1"),
        (["model.ensemble=two"], "model.ensemble='two'; expected a number of networks >= 1"),
        # a task that takes none has no such key; forced in, the task refuses it
        (["model=autoencoder", "++model.ensemble=2"], "model.ensemble=2: a ReconstructionTask does not average"),
    ],
)
def test_bad_ensembles_fail_in_one_line(tmp_path, overrides, message):
    proc = medexp_main("train", *RUN, *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
