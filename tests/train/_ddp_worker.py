"""One rank of the DDP tests, started by torchrun: trains on a shared store and records.

Usage: ``torchrun --standalone --nproc-per-node 2 tests/train/_ddp_worker.py CONFIG_JSON``.

Writes into ``cfg["out"]``, tagged by rank and elastic attempt (``TORCHELASTIC_RESTART_COUNT``):

* ``losses.rank{r}.attempt{a}.txt``: the training loss of every step, appended and flushed as
  it goes (so it survives a kill);
* ``result.rank{r}.attempt{a}.pt``: the cells seen per epoch, the parameters after each
  training pass, the final state, history and step count, and (``cfg["embed"]``) the
  embedding gathered on every rank.

``cfg["die"] = {"rank": r, "after_steps": k, "attempt": a}`` makes rank ``r`` of attempt ``a``
(any attempt when ``a`` is None) leave with ``os._exit`` right after its ``k``-th optimiser step,
as a crashed or preempted process would: no cleanup, no checkpoint for that step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch


def main(cfg: dict) -> None:
    import scvi_fast
    from scvi_fast.data import CSRLoader
    from scvi_fast.module import VAE
    from scvi_fast.train import _trainer

    rank = int(os.environ["RANK"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    out = Path(cfg["out"])
    tag = f"rank{rank}.attempt{attempt}"

    seen: dict[int, list[np.ndarray]] = {}
    real_iter = CSRLoader.__iter__

    def iter_recording(self):
        for mb in real_iter(self):
            if self.sampler.shuffle:  # the training loader
                seen.setdefault(self.sampler.epoch, []).append(np.array(mb.obs_idx))
            yield mb

    CSRLoader.__iter__ = iter_recording

    loss_log = open(out / f"losses.{tag}.txt", "w")  # noqa: SIM115 - must outlive os._exit
    real_forward = VAE.forward

    def forward(self, x, *args, **kwargs):
        res = real_forward(self, x, *args, **kwargs)
        if self.training and torch.is_grad_enabled():
            loss_log.write(f"{res[2].loss.item()!r}\n")
            loss_log.flush()
        return res

    VAE.forward = forward

    die = cfg.get("die")
    if die and die["rank"] == rank and die.get("attempt") in (None, attempt):
        real_step = torch.optim.Adam.step
        calls = {"n": 0}

        def dying_step(self, *args, **kwargs):
            res = real_step(self, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] == die["after_steps"]:
                loss_log.flush()
                os._exit(17)
            return res

        torch.optim.Adam.step = dying_step

    snapshots = []
    real_run = _trainer.Trainer._run_epoch

    def run_epoch(self, loader, train, kl_w, skip=0):
        res = real_run(self, loader, train, kl_w, skip)
        if train:
            snapshots.append({k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()})
        return res

    _trainer.Trainer._run_epoch = run_epoch

    model = scvi_fast.SCVI(cfg["store"], n_hidden=32, n_latent=5, impl="torch")
    model.train(
        strategy="ddp", device="cpu", max_epochs=cfg["max_epochs"], batch_size=cfg["batch_size"],
        seed=cfg.get("seed", 0), progress_bar=False, checkpoint_dir=cfg.get("checkpoint_dir"),
        checkpoint_every_n_steps=cfg.get("every"), resume=cfg.get("resume", False),
    )
    result = {
        "seen": {e: np.concatenate(v) for e, v in seen.items()},
        "snapshots": snapshots,
        "state": {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()},
        "history": model.history_,
        "global_step": model.trainer.global_step,
        "train_indices": model.train_indices,
        "validation_indices": model.validation_indices,
        "world_size": int(os.environ["WORLD_SIZE"]),
    }
    if cfg.get("embed"):
        # every rank writes its rows of the file, then every rank gets the gathered array
        model.get_latent_representation(out=out / "latent.npy")
        result["latent_gathered"] = np.asarray(model.get_latent_representation(batch_size=50))
    torch.save(result, out / f"result.{tag}.pt")
    loss_log.close()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
