"""A callback the DDP test adds to the pretrain stage: it saves each rank's batches and the initial weights."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback


class RecordBatches(Callback):
    """Save ``rank{r}-step{s}.pt`` (image, text, keys) for every training batch, and ``init.pt`` on rank 0.

    Args:
        out_dir: where to write.
    """

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_start(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            torch.save(
                {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()},
                self.out_dir / "init.pt",
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        record = {"image": batch["image"].cpu(), "text": batch["text"].cpu(), "keys": list(batch["__key__"])}
        torch.save(record, self.out_dir / f"rank{trainer.global_rank}-step{trainer.global_step}.pt")
