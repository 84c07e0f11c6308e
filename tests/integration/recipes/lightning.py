# recipe: lightning
# Lightning with AdamP or SGDP: return it from configure_optimizers, with a per-step scheduler.
# Trainer checkpoints hold its state dict; trainer.fit(model, ckpt_path=...) resumes from them.
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from adamp_torch import SGDP, AdamP


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 32, bias=False),
            torch.nn.LayerNorm(32),  # makes the Linear's weight scale-invariant: AdamP projects its update
            torch.nn.ReLU(),
            torch.nn.Linear(32, 4),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        optimizer = AdamP(self.parameters(), lr=1e-2, weight_decay=1e-2)
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=10)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SGDPClassifier(Classifier):
    def configure_optimizers(self):
        optimizer = SGDP(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=10)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def train_loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16)  # unshuffled: an exact resume at epoch ends


def fit(model, max_epochs, root_dir, ckpt_path=None):
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        default_root_dir=root_dir,  # checkpoints: root_dir/checkpoints/epoch=E-step=S.ckpt
        callbacks=[ModelCheckpoint(save_top_k=-1)],  # keep the checkpoint of every epoch
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_loader(), ckpt_path=ckpt_path)
    return trainer
