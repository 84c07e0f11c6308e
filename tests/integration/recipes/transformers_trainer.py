# recipe: transformers_trainer
# Hugging Face Trainer with AdamP: pass it, with its scheduler, as `optimizers=`. Checkpoints
# (optimizer.pt, scheduler.pt) save and resume exactly, as with torch.optim.AdamW.
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
    get_linear_schedule_with_warmup,
)

from adamp_torch import AdamP


class RandomTokens(torch.utils.data.Dataset):
    """64 random sequences of 16 tokens; the label says whether the first token is below 50."""

    def __init__(self, n=64, length=16, vocab_size=100):
        self.ids = torch.randint(0, vocab_size, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": int(self.ids[i, 0] < 50)}


def make_model():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return BertForSequenceClassification(config)


def make_optimizer(model):
    return AdamP(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2)


def train(output_dir, resume_from_checkpoint=None, max_steps=8):
    model = make_model()
    optimizer = make_optimizer(model)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=max_steps)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=8,
        save_steps=max_steps // 2,  # a checkpoint mid-run: output_dir/checkpoint-4
        seed=0,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(), optimizers=(optimizer, scheduler))
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer
