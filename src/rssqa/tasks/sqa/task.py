"""The Lightning task that trains the RS-SQA quality head on cached inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch

from rssqa import metrics
from rssqa.errors import RSSQAError
from rssqa.losses import SQALoss
from rssqa.models.sqa import RSSQA, VARIANTS

if TYPE_CHECKING:
    from rssqa.tasks.sqa.data import SQADataModule


class SQATask(L.LightningModule):
    """Train the RS-SQA quality head on cached inputs; validation SRCC drives model selection.

    Args:
        variant: ``full``, ``no_gating``, ``image_only`` or ``seg_only``.
        width: token width of both branches.
        hidden: hidden units of the MLP.
        dropout: MLP dropout.
        per_method_adapters: add per-method adapters on raw features (needs
            ``data.per_method_features``).
        lr: AdamW learning rate (cosine decay over the run).
        weight_decay: AdamW weight decay.
        w_mse: weight of the regression term.
        w_plcc: weight of the PLCC term.
        w_rank: weight of the pairwise ranking term over every pair in the batch.
        w_rank_image: weight of the pairwise ranking term over the methods of each image.
        rank_min_gap: OA gap below which a pair is not ranked.
        rank_scale: sharpness of the ranking term (and of the listwise term's scores).
        w_list: weight of the listwise term over each image's methods (0: off).
        list_temperature: OA temperature of the listwise term's target.
        ema_decay: decay of an exponential moving average of the weights (Lightning's
            ``EMAWeightAveraging``), which is what validation sees, what is checkpointed and what the
            scorer exports; 0 trains and keeps the raw weights. Averaging steadies a small head trained
            on a few thousand rows, so fewer of its results depend on the seed.
        agreement: the head also reads each method's agreement with the other methods of the image
            (needs RS-SQED built with at least three methods; a variant, not the paper's model).
        agreement_skip: with ``agreement``, a direct linear term from the per-image agreement to the
            output logit (:class:`~rssqa.models.sqa.RSSQA`).
        output_prior: start the output at the training split's mean OA (the last layer's bias at its
            logit; :meth:`~rssqa.models.sqa.RSSQA.set_output_prior`) instead of at 0.5 (false).
        agreement_prior: with ``agreement_skip``, start the output at the training split's OA as the
            per-image agreement alone predicts it (:meth:`~rssqa.models.sqa.RSSQA.set_agreement_prior`;
            in place of ``output_prior``'s start, whose bias it fits again).
        dims: input widths (filled from the data in ``setup``; stored so checkpoints rebuild alone).
        methods: method names with adapters (filled from the data).
        feat_dim: raw feature width of the adapters (filled from the data).
    """

    def __init__(
        self,
        variant: str = "full",
        width: int = 64,
        hidden: int = 64,
        dropout: float = 0.1,
        per_method_adapters: bool = False,
        lr: float = 2e-3,
        weight_decay: float = 1e-2,
        w_mse: float = 1.0,
        w_plcc: float = 0.5,
        w_rank: float = 0.5,
        w_rank_image: float = 0.0,
        rank_min_gap: float = 0.0,
        rank_scale: float = 20.0,
        w_list: float = 0.0,
        list_temperature: float = 0.02,
        ema_decay: float = 0.0,
        agreement: bool = False,
        agreement_skip: bool = False,
        output_prior: bool = True,
        agreement_prior: bool = False,
        dims: dict[str, int] | None = None,
        methods: list[str] | None = None,
        feat_dim: int = 0,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise RSSQAError(f"model.variant: {variant!r} is not one of {', '.join(VARIANTS)}")
        if agreement_skip and not agreement:
            raise RSSQAError("model.agreement_skip: needs the agreement inputs (model.agreement: true)")
        if agreement_prior and not agreement_skip:
            raise RSSQAError("model.agreement_prior: needs the direct agreement term (model.agreement_skip: true)")
        if not 0.0 <= ema_decay < 1.0:
            raise RSSQAError(f"model.ema_decay: must be in [0, 1), got {ema_decay}")
        self.save_hyperparameters()
        self.loss = SQALoss(w_mse, w_plcc, w_rank, w_rank_image, rank_min_gap, rank_scale, w_list, list_temperature)
        self.model: RSSQA | None = self._build() if dims is not None else None
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._train_sums: dict[str, torch.Tensor] = {}  # the epoch's loss terms x rows (reset each epoch)
        self._train_rows = 0
        self.best_val_srcc = float("-inf")

    def model_kwargs(self) -> dict[str, Any]:
        """Arguments of :class:`~rssqa.models.sqa.RSSQA` (also what the scorer stores)."""
        hp = self.hparams
        adapters = hp.per_method_adapters and hp.variant != "image_only"
        return {
            **hp.dims,
            "width": hp.width,
            "hidden": hp.hidden,
            "variant": hp.variant,
            "methods": list(hp.methods or []) if adapters else [],
            "feat_dim": hp.feat_dim if adapters else 0,
            "dropout": hp.dropout,
            **({"agreement": True} if hp.get("agreement") else {}),
            **({"agreement_skip": True} if hp.get("agreement_skip") else {}),
        }

    def _build(self) -> RSSQA:
        return RSSQA(**self.model_kwargs())

    def setup(self, stage: str) -> None:
        if self.model is None:
            self.build_for(self.trainer.datamodule)

    def build_for(self, data: SQADataModule) -> None:
        """Build the model for ``data``'s input widths and load its training-split input statistics.

        :func:`fit_one` calls this before fitting, so callbacks that copy the model when fitting starts
        (weight averaging) see it whole.
        """
        data.setup("fit")
        if self.hparams.per_method_adapters and not data.hparams.per_method_features:
            raise RSSQAError("model.per_method_adapters needs data.per_method_features: true")
        if self.hparams.agreement and data.agree is None:
            raise RSSQAError(
                f"model.agreement: {data.hparams.sqed} has no agreement between methods (the sqed stage "
                "computes it for sources with at least three methods)"
            )
        self.hparams.dims = data.dims
        self.hparams.methods = list(data.methods)
        self.hparams.feat_dim = data.feat_dim
        self.model = self._build()
        set_input_stats(self.model, data.input_stats())
        train = data.rows("train")
        if self.hparams.get("agreement_prior"):  # sets the output bias too: it replaces the output prior's start
            self.model.set_agreement_prior(data.agree["agree_global"][train], data.oa[train])
        elif self.hparams.get("output_prior"):
            self.model.set_output_prior(float(data.oa[train].double().mean()))

    def configure_callbacks(self) -> list[L.Callback]:
        if not self.hparams.ema_decay:
            return []
        from lightning.pytorch.callbacks import EMAWeightAveraging

        return [EMAWeightAveraging(decay=self.hparams.ema_decay)]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch)

    def on_train_epoch_start(self) -> None:
        self._train_sums, self._train_rows = {}, 0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms = self.loss(self(batch), batch["oa"], batch["image_idx"])
        # the loss terms' epoch means (weighted by rows), logged once an epoch: Lightning's per-step
        # `log` bookkeeping cost about a sixth of a step of this small head
        n = len(batch["oa"])
        for k, v in terms.items():
            self._train_sums[k] = self._train_sums.get(k, 0.0) + v.detach() * n
        self._train_rows += n
        return terms["loss"]

    def on_train_epoch_end(self) -> None:
        if self._train_rows:
            self.log_dict({f"train_{k}": v / self._train_rows for k, v in self._train_sums.items()})

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._val.append((self(batch).detach().cpu(), batch["oa"].cpu()))

    def on_validation_epoch_end(self) -> None:
        pred = torch.cat([p for p, _ in self._val])
        oa = torch.cat([t for _, t in self._val])
        self._val.clear()
        srcc = metrics.srcc(pred, oa)
        srcc = -1.0 if np.isnan(srcc) else srcc  # a constant predictor ranks last, not NaN
        self.log_dict(
            {"val_srcc": srcc, "val_plcc": np.nan_to_num(metrics.plcc(pred, oa), nan=-1.0), "val_rmse": metrics.rmse(pred, oa)},
            prog_bar=True,
        )

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def set_input_stats(model: RSSQA, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Load training-split input statistics into the model's standardisation buffers."""
    model.norm_cells.set_stats(*stats["cells"])
    model.norm_global.set_stats(*stats["global"])
    model.norm_embed.set_stats(*stats["embed"])
    model.norm_tokens.set_stats(*stats["tokens"])
    if model.methods and "feats" in stats:
        model.set_feature_stats(*stats["feats"])
    if model.agreement:
        model.norm_agree_maps.set_stats(*stats["agree_maps"])
        model.norm_agree_global.set_stats(*stats["agree_global"])
