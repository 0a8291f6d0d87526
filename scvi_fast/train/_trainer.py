"""The training loop: Adam(W), KL warm-up, validation ELBO, early stopping, learning-rate
reduction on plateau, resumable checkpoints.

The trainer knows a module (``inference -> generative -> loss``) and two
loaders; it does not know the user-facing model class or where data comes from.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from scvi_fast.module import kl_weight as kl_weight_fn
from scvi_fast.train._checkpoint import atomic_torch_save, load_checkpoint
from scvi_fast.train._setup import (
    _NONFINITE_HINT,
    METRICS,
    NonFiniteError,
    _check_trainable,
    make_adam,
    resolve_device,
)
from scvi_fast.train._step import StaticBatches, StepRunner, max_batch_nnz, resolve_step_mode

CHECKPOINT_NAME = "checkpoint.pt"
class Trainer:
    """Trains a :class:`~scvi_fast.module.VAE` on CSR minibatch loaders.

    Parameters
    ----------
    module
        The VAE.
    train_loader, val_loader
        Iterables of minibatches with ``.to(device)``; optional ``set_epoch(epoch)``
        is called before each epoch so that shuffling depends on the epoch only.
    lr, weight_decay, adam_eps, optimizer
        ``torch.optim.Adam`` (or ``"AdamW"``) settings (scvi-tools: 1e-3, 1e-6, 0.01).
    n_epochs_kl_warmup, max_kl_weight, min_kl_weight, n_steps_kl_warmup
        KL warm-up, see :func:`scvi_fast.module.kl_weight`. A per-step warm-up
        (``n_epochs_kl_warmup=None``, ``n_steps_kl_warmup`` set) refills the step's device
        scalar before each step of the warm-up: one small fill kernel, no host synchronisation,
        outside a captured graph (whose body stays the same), with the Python arithmetic of
        scvi-tools' plan.
    check_val_every_n_epoch
        Validate after every n-th epoch (None: never). scvi-tools' default is None, unless
        early stopping or learning-rate reduction needs the validation metrics (then 1).
    early_stopping, early_stopping_patience, early_stopping_min_delta, early_stopping_monitor, early_stopping_mode, early_stopping_warmup_epochs
        Stop when the monitored metric has not improved by ``min_delta`` for ``patience``
        checks (each validation for a validation metric, each epoch for a training one),
        the first ``warmup_epochs`` checks not counted (scvi-tools' ``LoudEarlyStopping``;
        defaults ``elbo_validation``, 45, 0.0, ``"min"``, 0).
    reduce_lr_on_plateau, lr_factor, lr_patience, lr_threshold, lr_min, lr_scheduler_metric
        scvi-tools' ``ReduceLROnPlateau`` (``threshold_mode="abs"``), stepped with the
        validation metric after each validation; the learning rate is logged as
        ``lr-<optimizer>``.
    checkpoint_dir
        Where ``checkpoint.pt`` is written atomically after every epoch (and every
        ``checkpoint_every_n_steps`` steps if set); ``fit(resume=True)`` continues from it.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``...
    seed
        Seeds torch's RNG (sampling noise, dropout) at the start of a fresh fit.
    progress_bar
        Show a tqdm bar over epochs.
    allow_tf32
        CUDA only: let fp32 GEMMs use TF32 tensor cores (the Census recipe is plain fp32,
        the default).
    precision
        ``"32"`` (default) or ``"bf16-mixed"``: CUDA only, autocast the encoder and decoder
        GEMMs to bfloat16; the NB likelihood, KL and optimiser stay in fp32.
    compile_dense
        ``torch.compile`` the dense encoder/decoder stacks (CUDA; off by default).
    step_mode
        ``"auto"`` (default: the whole step captured as a CUDA graph on CUDA, eager on the
        CPU), ``"graph"``, ``"static"`` (the graph's step body on static buffers, not
        captured: the debugging and CPU-testing path) or ``"eager"``. See
        :mod:`scvi_fast.train._step`.
    distributed
        A :class:`~scvi_fast.train._distributed.DistContext` (from ``_distributed.setup``) to
        train data-parallel: the module is wrapped in DDP, the loaders must be this rank's
        shards, metrics are summed over ranks, BatchNorm running statistics are averaged
        over ranks after each training pass and before each checkpoint, rank 0 alone writes
        checkpoints (with every rank's RNG state), and on resume rank 0 reads the checkpoint
        and broadcasts it.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        train_loader,
        val_loader=None,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        adam_eps: float = 0.01,
        optimizer: str = "Adam",
        n_epochs_kl_warmup: int | None = 400,
        max_kl_weight: float = 1.0,
        min_kl_weight: float = 0.0,
        n_steps_kl_warmup: int | None = None,
        check_val_every_n_epoch: int | None = 1,
        early_stopping: bool = False,
        early_stopping_patience: int = 45,
        early_stopping_min_delta: float = 0.0,
        early_stopping_monitor: str = "elbo_validation",
        early_stopping_mode: str = "min",
        early_stopping_warmup_epochs: int = 0,
        reduce_lr_on_plateau: bool = False,
        lr_factor: float = 0.6,
        lr_patience: int = 30,
        lr_threshold: float = 0.0,
        lr_min: float = 0.0,
        lr_scheduler_metric: str = "elbo_validation",
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every_n_steps: int | None = None,
        device: str | torch.device = "auto",
        seed: int = 0,
        progress_bar: bool = True,
        allow_tf32: bool = False,
        precision: str = "32",
        compile_dense: bool = False,
        step_mode: str = "auto",
        distributed=None,
    ):
        self.dist = distributed if distributed is not None and distributed.world_size > 1 else None
        _check_trainable(train_loader)
        self.device = resolve_device(device)
        if precision not in ("32", "bf16-mixed"):
            raise ValueError(f"precision must be '32' or 'bf16-mixed'; got {precision!r}")
        on_cuda = self.device.type == "cuda"
        # These only change CUDA kernels; on the CPU they are ignored (documented).
        self.allow_tf32 = allow_tf32 and on_cuda
        self.autocast_dtype = torch.bfloat16 if precision == "bf16-mixed" and on_cuda else None
        self.module = module.to(self.device)
        if compile_dense and on_cuda:
            module.encoder.linears = torch.compile(module.encoder.linears)
            module.decoder = torch.compile(module.decoder)
        # DDP wraps the module for training only: state-dict keys stay the module's own.
        self._net = self.dist.wrap(self.module) if self.dist is not None else self.module
        self.train_loader, self.val_loader = train_loader, val_loader
        self.n_epochs_kl_warmup, self.n_steps_kl_warmup = n_epochs_kl_warmup, n_steps_kl_warmup
        self.max_kl_weight, self.min_kl_weight = max_kl_weight, min_kl_weight
        kl_weight_fn(0, n_epochs_kl_warmup, max_kl_weight, min_kl_weight)  # checks min <= max
        self._setup_monitoring(check_val_every_n_epoch, early_stopping, early_stopping_patience,
                               early_stopping_min_delta, early_stopping_monitor,
                               early_stopping_mode, early_stopping_warmup_epochs,
                               reduce_lr_on_plateau, lr_scheduler_metric)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.seed = seed
        self.progress_bar = progress_bar
        self._setup_optimizer(lr, adam_eps, weight_decay, optimizer, on_cuda, reduce_lr_on_plateau,
                              lr_factor, lr_patience, lr_threshold, lr_min, lr_scheduler_metric)
        self._setup_step(step_mode, compiled=compile_dense and on_cuda)
        self.history: dict[str, list[float]] = {}
        self.epoch = 0  # completed epochs
        self.global_step = 0
        self._step_in_epoch = 0
        self._best = math.inf if early_stopping_mode == "min" else -math.inf
        self._wait = 0
        self._es_checks = 0
        self.stopped_early = False
        self.train_time_s = 0.0
        self.cells_trained = 0
        #: wall time of each training pass (excluding validation), seconds
        self.epoch_times: list[float] = []

    def _setup_monitoring(self, check_val_every_n_epoch, early_stopping, patience, min_delta,
                          monitor, mode, warmup_epochs, reduce_lr_on_plateau,
                          lr_scheduler_metric) -> None:
        """Validation frequency and early stopping, checked against the validation set."""
        if check_val_every_n_epoch is not None and int(check_val_every_n_epoch) < 1:
            raise ValueError(f"check_val_every_n_epoch must be a positive integer or None; got "
                             f"{check_val_every_n_epoch}")
        self.check_val_every_n_epoch = check_val_every_n_epoch
        self.early_stopping = early_stopping
        self.patience, self.min_delta = patience, abs(min_delta)
        self.monitor = monitor
        if mode not in ("min", "max"):
            raise ValueError(f"early_stopping_mode must be 'min' or 'max'; got {mode!r}")
        self.mode, self.es_warmup = mode, int(warmup_epochs)
        for on, metric, what in ((early_stopping, self.monitor, "early stopping"),
                                 (reduce_lr_on_plateau, lr_scheduler_metric, "reduce_lr_on_plateau")):
            if on and metric.endswith("_validation") and (self.val_loader is None
                                                               or check_val_every_n_epoch is None):
                raise ValueError(
                    f"{what} monitors {metric!r} but there is no validation set (or "
                    "check_val_every_n_epoch is None); use train_size < 1 or a training metric"
                )

    def _setup_optimizer(self, lr, adam_eps, weight_decay, optimizer, on_cuda,
                         reduce_lr_on_plateau, lr_factor, lr_patience, lr_threshold, lr_min,
                         lr_scheduler_metric) -> None:
        """Adam / AdamW over the trainable parameters (capturable on CUDA, so a captured step
        updates them), and the plateau scheduler when asked for."""
        self.optimizer = make_adam(
            [p for p in self.module.parameters() if p.requires_grad], lr, adam_eps, weight_decay,
            capturable=on_cuda, optimizer=optimizer,
        )
        self.optimizer_name = optimizer
        self.scheduler = None
        self.lr_scheduler_metric = lr_scheduler_metric
        if reduce_lr_on_plateau:
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, patience=lr_patience, factor=lr_factor, threshold=lr_threshold,
                min_lr=lr_min, threshold_mode="abs")

    def _setup_step(self, step_mode: str, compiled: bool) -> None:
        """The step runner, and the static device buffers its non-eager modes read."""
        self.step_mode = resolve_step_mode(
            step_mode, self.device, distributed=self.dist is not None, compiled=compiled
        )
        self.runner = StepRunner(self._net, self.module, self.optimizer, self.device,
                                 mode=self.step_mode, autocast_dtype=self.autocast_dtype)
        self._batches = None
        if self.step_mode != "eager":
            loaders = [ld for ld in (self.train_loader, self.val_loader) if ld is not None]
            self._batches = StaticBatches(
                self.device, max(ld.batch_size for ld in loaders),
                max(max_batch_nnz(ld) for ld in loaders), loaders[0].n_genes,
            )

    # ---- checkpoints -----------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return self.checkpoint_dir / CHECKPOINT_NAME if self.checkpoint_dir else None

    def state_dict(self) -> dict:
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "step_in_epoch": self._step_in_epoch,
            "history": self.history,
            "best": self._best,
            "wait": self._wait,
            "es_checks": self._es_checks,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "stopped_early": self.stopped_early,
            "partial_sums": self._partial[0] if self._partial else torch.zeros(3, dtype=torch.float64),
            "partial_n_obs": self._partial[1] if self._partial else 0,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        } | self._rank_rng_states()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self._step_in_epoch = int(state.get("step_in_epoch", 0))
        self.history = {k: list(v) for k, v in state["history"].items()}
        self._best, self._wait = float(state["best"]), int(state["wait"])
        self._es_checks = int(state.get("es_checks", 0))
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.stopped_early = bool(state.get("stopped_early", False))
        self._partial = (state["partial_sums"], int(state["partial_n_obs"])) if self._step_in_epoch else None
        if self.dist is not None:
            self._load_rank_rng(state)
            return
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def save_checkpoint(self) -> None:
        if self.checkpoint_path is None:
            return
        if self.dist is None:
            atomic_torch_save(self.state_dict(), self.checkpoint_path)
            return
        self.dist.sync_buffers(self.module)
        state = self.state_dict()  # collective: gathers every rank's RNG state
        if self.dist.is_main:
            atomic_torch_save(state, self.checkpoint_path)
        self.dist.barrier()

    # ---- distributed helpers (no-ops on one process) ----------------------------------
    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def _rank_rng_states(self) -> dict:
        if self.dist is None:
            return {}
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {
            "world_size": self.dist.world_size,
            "rank_rng": self.dist.all_gather_object((torch.get_rng_state(), cuda)),
        }

    def _load_rank_rng(self, state: dict) -> None:
        from scvi_fast.train._distributed import RNG_STRIDE

        ws, rank = self.dist.world_size, self.dist.rank
        saved = state.get("world_size", 1)
        if saved != ws and self._step_in_epoch:
            raise ValueError(
                f"the checkpoint was written mid-epoch by {saved} rank(s); resume it with the "
                f"same number of ranks (now {ws}), or from an end-of-epoch checkpoint"
            )
        if saved == ws and "rank_rng" in state:
            cpu, cuda = state["rank_rng"][rank]
            torch.set_rng_state(cpu)
            if cuda is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(cuda, self.device)
        else:  # a different number of ranks at an epoch boundary: fresh per-rank streams
            torch.manual_seed(self.seed + RNG_STRIDE * rank + self.global_step)

    def _reduced(self, sums: torch.Tensor, n_obs: int) -> tuple[torch.Tensor, int]:
        """``(sums, n_obs)`` over all ranks, a CPU copy (``sums`` is the runner's live buffer)."""
        if self.dist is None:
            return sums.detach().to("cpu", copy=True), n_obs
        both = torch.cat([sums, sums.new_tensor([n_obs])])
        self.dist.all_reduce_sum(both)
        return both[:-1].cpu(), int(both[-1].item())

    # ---- one pass ------------------------------------------------------------------
    def _run_epoch(self, loader, train: bool, kl_w: float, skip: int = 0) -> dict[str, float]:
        self.module.train(train)
        runner = self.runner
        runner.new_pass(train)
        sums = runner.sums if train else runner.val_sums
        runner.kl_weight.fill_(kl_w)
        per_step = train and self._kl_per_step()
        n_obs = 0
        if skip and self._partial is not None and self.is_main:
            # the partial sums of a checkpoint are over all ranks: one rank adds them back
            sums += self._partial[0].to(self.device)
            n_obs = int(self._partial[1])
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch)
        it = iter(loader)
        if skip:
            # Resuming mid-epoch: the loader order depends on the epoch only, so
            # skipping the batches already trained continues exactly where it stopped.
            it = itertools.islice(it, skip, None)
        batches = self._batches
        check_each_step = train and self.device.type == "cpu"
        # eager evaluation runs under inference mode; the static step body (captured or not)
        # under no_grad, inside the runner
        ctx = torch.inference_mode() if not train and batches is None else contextlib.nullcontext()
        with ctx:
            for mb in it:
                if per_step and self.global_step <= self.n_steps_kl_warmup:
                    # the warm-up's weight of this step (after it: the constant max weight)
                    runner.kl_weight.fill_(self.kl_weight_at(self.epoch, self.global_step))
                if batches is None:
                    runner.run(mb.to(self.device, non_blocking=True), train)
                else:
                    slot, x = batches.load(mb)
                    runner.run(x, train, slot, batches.generation)
                    batches.release(slot)
                n_obs += mb.n_cells
                if train:
                    self.global_step += 1
                    self._step_in_epoch += 1
                    if check_each_step:  # free on the CPU: stop at the bad step itself
                        self._raise_if_not_finite(skip)
                    if (self.checkpoint_every_n_steps
                            and self.global_step % self.checkpoint_every_n_steps == 0):
                        self._raise_if_not_finite(skip)  # a checkpoint holds good weights only
                        self._partial = self._reduced(sums, n_obs)
                        self.save_checkpoint()
        if train:
            self._raise_if_not_finite(skip)
        if train and self.dist is not None:
            self.dist.sync_buffers(self.module)
        sums, n_obs = self._reduced(sums, n_obs)
        if not bool(torch.isfinite(sums).all()):
            raise NonFiniteError(
                f"the {'training' if train else 'validation'} loss of epoch {self.epoch} is not "
                f"finite ({(sums / max(n_obs, 1)).tolist()}). " + _NONFINITE_HINT
            )
        vals = (sums / max(n_obs, 1)).tolist()
        return {name: v for name, v in zip(METRICS, vals)} | {"_n_obs": n_obs}

    def _raise_if_not_finite(self, skip: int) -> None:
        """Stop training if a step of this pass had a non-finite loss or gradient (reads one
        device scalar; on a GPU only at checkpoints and at the end of the pass)."""
        # under DDP the gradients are all-reduced before the check, so every rank flags the
        # same step and stops together
        bad = int(self.runner.bad_step)
        if bad == 0:
            return
        kept = (f"the last checkpoint in {self.checkpoint_dir} is intact"
                if self.checkpoint_path is not None and self.checkpoint_path.exists()
                else "no checkpoint was written")
        raise NonFiniteError(
            f"training stopped: the loss or a gradient was not finite at epoch {self.epoch}, "
            f"step {skip + bad} of {len(self.train_loader)}. That step's update was skipped "
            f"and the weights are those before it; {kept}. " + _NONFINITE_HINT
        )

    def _kl_per_step(self) -> bool:
        return not self.n_epochs_kl_warmup and bool(self.n_steps_kl_warmup)

    def kl_weight_at(self, epoch: int, step: int) -> float:
        """The KL weight of a step at ``epoch`` and global ``step`` (scvi-tools' schedule)."""
        return kl_weight_fn(epoch, self.n_epochs_kl_warmup, self.max_kl_weight,
                            self.min_kl_weight, step=step, n_steps_kl_warmup=self.n_steps_kl_warmup)

    def _validates(self) -> bool:
        """Whether the epoch that just trained (``self.epoch``, 0-based) is followed by validation."""
        n = self.check_val_every_n_epoch
        return self.val_loader is not None and n is not None and (self.epoch + 1) % int(n) == 0

    def _log(self, name: str, value: float) -> None:
        self.history.setdefault(name, []).append(float(value))

    # ---- fit -------------------------------------------------------------------------
    def fit(self, max_epochs: int, resume: bool = False) -> dict[str, list[float]]:
        """Train until ``max_epochs`` epochs are complete (or early stopping).

        With ``resume=True`` and a checkpoint in ``checkpoint_dir``, continue from
        it: completed epochs are not repeated and a run interrupted mid-epoch
        resumes at the next minibatch of that epoch.
        """
        skip = 0
        state = None
        if resume and self.checkpoint_path is not None and self.is_main and self.checkpoint_path.exists():
            state = load_checkpoint(self.checkpoint_path, map_location="cpu", module=self.module)
        if self.dist is not None and resume and self.checkpoint_path is not None:
            # rank 0's checkpoint reaches every rank, with or without a shared filesystem
            state = self.dist.broadcast_object(state)
        if state is not None:
            self.load_state_dict(state)
            skip = self._step_in_epoch
        else:
            from scvi_fast.train._distributed import RNG_STRIDE

            rank = self.dist.rank if self.dist is not None else 0
            torch.manual_seed(self.seed + RNG_STRIDE * rank)
            np.random.seed((self.seed + RNG_STRIDE * rank) % (2**32))
        tf32_before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.allow_tf32 or tf32_before
        bar = None
        if self.progress_bar and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=max_epochs, initial=self.epoch, desc="Training", unit="epoch")
        try:
            while self.epoch < max_epochs and not self.stopped_early:
                kl_w = self.kl_weight_at(self.epoch, self.global_step)
                t0 = time.perf_counter()
                tr = self._run_epoch(self.train_loader, True, kl_w, skip=skip)
                skip = 0
                dt = time.perf_counter() - t0  # the epoch-end metrics read synchronises CUDA
                self.train_time_s += dt
                self.epoch_times.append(dt)
                self.cells_trained += tr["_n_obs"]
                for name in METRICS:
                    self._log(f"{name}_train", tr[name])
                if self._kl_per_step():  # the weight of the epoch's last step, and validation's
                    kl_w = self.kl_weight_at(self.epoch, self.global_step - 1)
                self._log("kl_weight", kl_w)
                self._log("train_loss_epoch", tr["reconstruction_loss"] + kl_w * tr["kl_local"])
                validated = self._validates()
                if validated:
                    if self._kl_per_step():
                        kl_w = self.kl_weight_at(self.epoch, self.global_step)
                    va = self._run_epoch(self.val_loader, False, kl_w)
                    for name in METRICS:
                        self._log(f"{name}_validation", va[name])
                    self._log(
                        "validation_loss", va["reconstruction_loss"] + kl_w * va["kl_local"]
                    )
                self._step_lr(validated)
                self.epoch += 1
                self._step_in_epoch = 0
                self._partial = None
                self._update_early_stopping(validated)
                self.save_checkpoint()
                if bar is not None:
                    post = {"elbo_train": f"{self.history['elbo_train'][-1]:.1f}"}
                    if "elbo_validation" in self.history:
                        post["elbo_val"] = f"{self.history['elbo_validation'][-1]:.1f}"
                    bar.set_postfix(post)
                    bar.update(1)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32_before
            if bar is not None:
                bar.close()
        self.module.eval()
        return self.history

    #: running (sums, n_obs) of the epoch in progress, saved in mid-epoch checkpoints
    _partial: tuple[torch.Tensor, int] | None = None

    def _step_lr(self, validated: bool) -> None:
        """Log the rate this epoch trained with (as Lightning's LearningRateMonitor), then step
        the plateau scheduler with this epoch's validation metric."""
        if self.scheduler is None:
            return
        self._log(f"lr-{self.optimizer_name}", self.optimizer.param_groups[0]["lr"])
        if validated:
            before = [g["lr"] for g in self.optimizer.param_groups]
            self.scheduler.step(self.history[self.lr_scheduler_metric][-1])
            if [g["lr"] for g in self.optimizer.param_groups] != before:
                self.runner.invalidate()  # captured graphs hold the old rate

    def _update_early_stopping(self, validated: bool = True) -> None:
        if not self.early_stopping:
            return
        if self.monitor.endswith("_validation") and not validated:
            return  # checked when the metric is computed
        values = self.history.get(self.monitor)
        if not values:
            raise ValueError(f"early stopping monitor {self.monitor!r} is not a logged metric")
        self._es_checks += 1
        if self._es_checks <= self.es_warmup:
            return
        current = values[-1]
        better = (current < self._best - self.min_delta if self.mode == "min"
                  else current > self._best + self.min_delta)
        if better:
            self._best, self._wait = current, 0
        else:
            self._wait += 1
            if self._wait >= self.patience:
                self.stopped_early = True
