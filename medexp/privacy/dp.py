"""Differential privacy: DP-SGD with Opacus, as a Lightning callback (``privacy=dp``).

DP-SGD clips each sample's gradient to ``max_grad_norm``, adds Gaussian noise of standard
deviation ``noise_multiplier * max_grad_norm`` to their sum, and draws batches by Poisson
sampling (each training sample independently, with probability ``batch_size / N``); a privacy
accountant turns the steps taken into the (epsilon, delta) the model guarantees for every sample
of the training split. ``train/epsilon`` is logged after every training epoch.

How it fits Lightning (after Opacus's own Lightning example): the net is made Opacus-compatible
when the model is built (:func:`compatible_net`: BatchNorm -> GroupNorm, via
``ModuleValidator.fix``), so the optimiser, checkpoints and every later rebuild
(:meth:`medexp.checkpoints.checkpoint.Checkpoint.build`) see the same layers. When fit starts,
:class:`DifferentialPrivacy` hands the net, the task's optimiser and the training loader to
``PrivacyEngine.make_private``: per-sample gradient hooks on the net itself (its parameter names
and checkpoints stay those of the plain net), a ``DPOptimizer`` in place of the optimiser, and a
Poisson-sampling loader served as the data module's training loader for this fit.

Refused before anything is built, with what to change instead: several devices (DDP), gradient
accumulation, the trainer's gradient clipping (per-sample clipping replaces it), precisions other
than 32-bit, and (when the model is built) a model with two optimisers (GANs) or trainable
parameters outside its net.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from torch import nn

from medexp.utils.errors import MedexpError

log = logging.getLogger("medexp")

ACCOUNTANTS = ("prv", "rdp", "gdp")
TARGET = "medexp.privacy.dp.DifferentialPrivacy"
# trainer.precision values DP-SGD runs with: per-sample gradients and noise in full precision
FULL_PRECISION = (32, "32", "32-true")


def _budget_problem(target_epsilon: Any, noise_multiplier: Any) -> str | None:
    if (target_epsilon is None) == (noise_multiplier is None):
        return (
            f"privacy.target_epsilon={target_epsilon} and privacy.noise_multiplier={noise_multiplier}: set exactly one "
            "(the budget to reach after trainer.max_epochs, or the noise itself) and the other to null"
        )
    return None


def check_config(config: dict[str, Any]) -> list[str]:
    """What a resolved train config with ``privacy=dp`` asks of Opacus that it cannot do.

    Types and ranges of the ``privacy.*`` keys are rules of :mod:`medexp.utils.validation`.
    """
    privacy = config.get("privacy") or {}
    if privacy.get("_target_") != TARGET:
        return []
    trainer = config.get("trainer") or {}
    problems = []
    if (problem := _budget_problem(privacy.get("target_epsilon"), privacy.get("noise_multiplier"))) is not None:
        problems.append(problem)
    devices, nodes, strategy = (
        trainer.get("devices", 1),
        trainer.get("num_nodes", 1),
        str(trainer.get("strategy", "auto")),
    )
    if devices not in (1, "1", [0]) or nodes != 1 or "ddp" in strategy or "fsdp" in strategy or "deepspeed" in strategy:
        problems.append(
            f"privacy=dp with trainer.devices={devices}, trainer.num_nodes={nodes}, trainer.strategy={strategy}: "
            "medexp runs DP-SGD on one device (Opacus's distributed DP-SGD is not wired into Lightning's DDP); "
            "use trainer=default, cpu or gpu with trainer.devices=1"
        )
    if trainer.get("accumulate_grad_batches", 1) != 1:
        problems.append(
            f"privacy=dp with trainer.accumulate_grad_batches={trainer['accumulate_grad_batches']}: with Poisson "
            "sampling every optimiser step must see one batch; raise data.batch_size instead"
        )
    if trainer.get("gradient_clip_val") not in (None, 0, 0.0):
        problems.append(
            f"privacy=dp with trainer.gradient_clip_val={trainer['gradient_clip_val']}: DP-SGD clips each sample's "
            "gradient itself (privacy.max_grad_norm); set trainer.gradient_clip_val=null"
        )
    if trainer.get("precision", 32) not in FULL_PRECISION:
        problems.append(
            f"privacy=dp with trainer.precision={trainer['precision']}: Opacus's per-sample gradients and noise "
            "need 32-bit training; set trainer.precision=32"
        )
    if ((config.get("model") or {}).get("sam_rho")) is not None:
        problems.append(
            f"privacy=dp with model.sam_rho={config['model']['sam_rho']}: SAM's second pass reads each batch again, "
            "which Opacus's accountant does not count; set model.sam_rho=null"
        )
    return problems


def compatible_net(net: nn.Module) -> nn.Module:
    """``net`` with the layers Opacus cannot train replaced by ones it can (a copy; BatchNorm ->
    GroupNorm with gcd(32, channels) groups, LSTM -> DPLSTM, ...): ``ModuleValidator.fix``.

    Deterministic, so a checkpoint of a DP-trained net loads into ``compatible_net`` of the net its
    config builds (see :meth:`medexp.checkpoints.checkpoint.Checkpoint.build`)."""
    from opacus.validators import ModuleValidator

    return ModuleValidator.fix(net)


class DifferentialPrivacy(L.Callback):
    """Train the task's net with DP-SGD (Opacus) and log ``train/epsilon`` every epoch.

    Call :meth:`prepare` on the model before the trainer fits it (``medexp train`` does).

    Args:
        max_grad_norm: the L2 norm each sample's gradient is clipped to.
        target_epsilon: the epsilon to reach after ``trainer.max_epochs`` epochs; the noise
            multiplier is derived from it. Exclusive with ``noise_multiplier``.
        noise_multiplier: the noise's standard deviation over ``max_grad_norm``.
        delta: the delta of the (epsilon, delta) guarantee; keep it well below 1/N for N
            training samples.
        accountant: Opacus's privacy accountant: ``prv`` (tightest), ``rdp`` or ``gdp``.
        noise_seed: the seed of the noise and of Poisson sampling. None draws one from the OS
            and records it nowhere: the run's own ``seed`` (written to ``run_info.json`` and the
            loggers) must not reveal the noise. An integer makes DP runs reproducible, for tests;
            never for a model you release.
    """

    logged_metrics = ("train/epsilon",)  # monitorable (see medexp.utils.validation.check_monitors)

    def __init__(
        self,
        max_grad_norm: float = 1.0,
        target_epsilon: float | None = None,
        noise_multiplier: float | None = None,
        delta: float = 1e-5,
        accountant: str = "prv",
        noise_seed: int | None = None,
    ) -> None:
        if (problem := _budget_problem(target_epsilon, noise_multiplier)) is not None:
            raise MedexpError(problem)
        if accountant not in ACCOUNTANTS:
            raise MedexpError(f"privacy.accountant={accountant!r}; expected one of {list(ACCOUNTANTS)}")
        self.max_grad_norm = float(max_grad_norm)
        self.target_epsilon = target_epsilon
        self.noise_multiplier = noise_multiplier
        self.delta = float(delta)
        self.accountant = accountant
        self.noise_seed = noise_seed
        self._engine: Any = None  # opacus.PrivacyEngine of the current fit
        self._hooks: Any = None  # the per-sample gradient hooks on the net
        self._loader: torch.utils.data.DataLoader | None = None
        self._datamodule: L.LightningDataModule | None = None
        self._restored: dict[str, Any] | None = None  # the accountant's history, from a resumed checkpoint
        self._empty_batch = False

    # ------------------------------------------------------------------ the model

    def prepare(self, model: L.LightningModule) -> L.LightningModule:
        """Make ``model``'s net Opacus-compatible (in place), or say why it cannot be.

        Raises:
            MedexpError: for a model with manual optimisation (several optimisers, e.g. a GAN),
                trainable parameters outside ``model.net``, or layers Opacus cannot train after
                :func:`compatible_net`.
        """
        name = type(model).__name__
        if not model.automatic_optimization or not isinstance(getattr(model, "net", None), nn.Module):
            raise MedexpError(
                f"privacy=dp trains one net with one optimiser; {name} optimises its own way (e.g. a GAN's "
                "generator and discriminator in turn), for which medexp has no DP-SGD; use a classification, "
                "segmentation or reconstruction model"
            )
        outside = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("net.")]
        if outside:
            raise MedexpError(
                f"privacy=dp: {name} trains parameters outside its net ({', '.join(outside)}), whose per-sample "
                "gradients Opacus cannot compute; choose settings without them (e.g. model.residual=false for a "
                "reconstruction model)"
            )
        from opacus.validators import ModuleValidator

        before = {type(m).__name__ for m in model.net.modules()}
        model.net = compatible_net(model.net)
        errors = ModuleValidator.validate(model.net, strict=False)
        if errors:
            details = "; ".join(dict.fromkeys(str(e).split(". ")[0] for e in errors))
            raise MedexpError(
                f"privacy=dp: the net ({type(model.net).__name__}) cannot be trained with DP-SGD even after "
                f"Opacus replaced what it could: {details}. Choose another model"
            )
        replaced = sorted(before - {type(m).__name__ for m in model.net.modules()})
        if replaced:
            log.info(
                "privacy=dp: replaced %s in the net by Opacus-compatible layers (e.g. GroupNorm)", ", ".join(replaced)
            )
        return model

    # ------------------------------------------------------------------ fit

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        if datamodule is None:
            raise MedexpError(
                "privacy=dp needs a data module (trainer.fit(model, datamodule=...)) to sample batches from"
            )
        # Lightning asks for the training loader after on_fit_start, where the Poisson-sampling
        # loader is built; the data module serves it for this fit (restored in teardown)
        self._datamodule = datamodule
        datamodule.train_dataloader = self._train_dataloader

    def _train_dataloader(self) -> torch.utils.data.DataLoader:
        if self._loader is None:
            raise RuntimeError("the DP training loader is built in on_fit_start, before Lightning asks for it")
        return self._loader

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from opacus import PrivacyEngine

        if len(trainer.optimizers) != 1:
            raise MedexpError(
                f"privacy=dp needs exactly one optimiser; {type(pl_module).__name__} has {len(trainer.optimizers)}"
            )
        # the data module's own loader (its batch size gives the sampling rate), built once
        loader = type(self._datamodule).train_dataloader(self._datamodule)
        seed = self.noise_seed if self.noise_seed is not None else secrets.randbits(63)
        # independent streams for sampling (on the CPU) and noise (where the gradients are)
        sampling_seed, noise_seed = np.random.SeedSequence(seed).generate_state(2).tolist()
        loader.generator = torch.Generator().manual_seed(sampling_seed)  # read by DPDataLoader.from_data_loader
        noise = torch.Generator(device=pl_module.device).manual_seed(noise_seed)
        # the hooks on the first layer fire although its input (the images) needs no gradient:
        # they read the output gradients, which is all per-sample gradients of its weights take
        warnings.filterwarnings(
            "ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs"
        )
        with warnings.catch_warnings():
            # secure_mode needs torchcsprng; the noise seed above is drawn from the OS instead
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            self._engine = PrivacyEngine(accountant=self.accountant)
        if self._restored:
            self._engine.accountant.load_state_dict(self._restored)
        common = dict(
            module=pl_module.net,
            optimizer=trainer.optimizers[0],
            data_loader=loader,
            max_grad_norm=self.max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise,
            # hooks on the net itself: no wrapper, so parameter names and checkpoints are the plain net's
            wrap_model=False,
        )
        if self.target_epsilon is not None:
            if trainer.max_epochs is None or trainer.max_epochs < 1:
                raise MedexpError(
                    f"privacy.target_epsilon needs trainer.max_epochs (got {trainer.max_epochs}) to spread the budget over"
                )
            self._hooks, optimizer, self._loader = self._engine.make_private_with_epsilon(
                **common, target_epsilon=self.target_epsilon, target_delta=self.delta, epochs=trainer.max_epochs
            )
        else:
            self._hooks, optimizer, self._loader = self._engine.make_private(
                **common, noise_multiplier=self.noise_multiplier
            )
        # per-sample gradients in training steps only: a backward pass elsewhere (e.g. Grad-CAM in
        # a validation callback) has no activations captured for them
        self._hooks.disable_hooks()
        # the LR schedulers keep the original optimiser, whose parameter groups the DPOptimizer shares
        trainer.strategy.optimizers = [optimizer]
        sample_rate = 1 / len(self._loader)
        log.info(
            "privacy=dp: DP-SGD with noise multiplier %.4g, per-sample clipping at %g, Poisson sampling rate %.4g "
            "(%d steps per epoch), delta %g%s",
            optimizer.noise_multiplier,
            self.max_grad_norm,
            sample_rate,
            len(self._loader),
            self.delta,
            f"; target epsilon {self.target_epsilon} after {trainer.max_epochs} epochs" if self.target_epsilon else "",
        )
        n = len(loader.dataset)
        if self.delta >= 1 / n:
            log.warning(
                "privacy.delta=%g is not below 1/N = %.3g for N=%d training samples: the guarantee is weak",
                self.delta,
                1 / n,
                n,
            )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        image = batch.get(getattr(pl_module, "input_key", "image")) if isinstance(batch, dict) else None
        self._empty_batch = isinstance(image, torch.Tensor) and image.shape[0] == 0
        if self._hooks is not None:
            self._hooks.enable_hooks()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._hooks is not None:
            self._hooks.disable_hooks()

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        # Poisson sampling may draw no sample at all: the step must still happen (its noise is part
        # of the guarantee), but the mean loss over nothing is NaN. Its gradients are empty either
        # way; the value is set to 0 so the fault check (which runs after this callback) passes.
        if self._empty_batch:
            loss.detach().zero_()

    def epsilon(self) -> float:
        """The epsilon spent so far at ``delta`` (0 before the first step)."""
        if self._engine is None or not self._engine.accountant.history:
            return 0.0
        return float(self._engine.get_epsilon(self.delta))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epsilon = self.epsilon()
        if not math.isfinite(epsilon):
            log.warning("privacy=dp: epsilon is infinite (no noise?); the model has no privacy guarantee")
        pl_module.log("train/epsilon", epsilon, prog_bar=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._datamodule is not None and "train_dataloader" in vars(self._datamodule):
            del self._datamodule.train_dataloader  # the class's own method again
        if self._hooks is not None:
            self._hooks.cleanup()
            self._hooks = None

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        # the accountant's history (noise, sampling rate, steps): a resumed run keeps counting
        if self._engine is not None:
            return {"accountant": dict(self._engine.accountant.state_dict())}
        return {"accountant": self._restored} if self._restored else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("accountant")
