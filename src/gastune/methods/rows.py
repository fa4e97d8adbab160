"""Extra batches a method draws from a dataset outside the Trainer's dataloader (IST's probe
batch, Fisher's examples, GREATS' validation batch), collated exactly like training batches."""

from __future__ import annotations

from typing import Any

import torch

from gastune.errors import GastuneError


def is_hf_dataset(dataset) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(dataset, datasets.Dataset)


class RowSource:
    """Rows of ``dataset`` collated by the Trainer's collator, unused columns dropped first
    (what the Trainer does for its own dataloader), and moved to the training device."""

    def __init__(self, trainer, dataset, description: str):
        if dataset is None or len(dataset) == 0:
            raise GastuneError(f"the {description} set is empty: there is nothing to draw rows from")
        self.trainer = trainer
        self.collator = trainer.data_collator
        if is_hf_dataset(dataset):
            dataset = trainer._remove_unused_columns(dataset, description=description)
        else:
            self.collator = trainer._get_collator_with_removed_columns(
                trainer.data_collator, description=description
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.trainer._prepare_inputs(self.collator([self.dataset[i] for i in indices]))


# Right-padding values of the usual per-token columns (anything else pads with 0).
PAD_VALUES = {"labels": -100}


def join_rows(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """The rows of ``second`` appended after those of ``first``, both right-padded to the longer
    sequence (padding: attention mask 0, label -100, so no real token sees or predicts it).

    Only keys both batches hold as tensors with a batch dimension are kept.
    """
    n = first["input_ids"].shape[0]
    t_first, t_second = first["input_ids"].shape[1], second["input_ids"].shape[1]
    length = max(t_first, t_second)
    joined: dict[str, Any] = {}
    for key, a in first.items():
        b = second.get(key)
        if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.dim() == 0 or a.shape[0] != n:
            continue
        if a.dim() >= 2 and b.dim() == a.dim() and a.shape[1] == t_first and b.shape[1] == t_second:
            value = PAD_VALUES.get(key, 0)
            a = torch.nn.functional.pad(a, (0, 0) * (a.dim() - 2) + (0, length - a.shape[1]), value=value)
            b = torch.nn.functional.pad(b, (0, 0) * (b.dim() - 2) + (0, length - b.shape[1]), value=value)
        if a.shape[1:] != b.shape[1:]:
            continue
        joined[key] = torch.cat([a, b.to(a.device, a.dtype)])
    return joined


class ShuffledBatches:
    """Index batches of shuffled passes over ``n`` rows, reshuffled when a pass ends — what
    IST's code gets from ``iter(DataLoader(train, batch_size=16, shuffle=True))``, including
    the shorter last batch of each pass."""

    def __init__(self, batch_size: int, generator: torch.Generator):
        self.batch_size, self.generator = batch_size, generator
        self.order: list[int] = []
        self.position = 0

    def next(self, n: int) -> list[int]:
        if self.position >= len(self.order):
            self.order = torch.randperm(n, generator=self.generator).tolist()
            self.position = 0
        picks = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return picks

    def state_dict(self) -> dict[str, Any]:
        return {
            "order": torch.tensor(self.order, dtype=torch.long),
            "position": self.position,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order, self.position = state["order"].tolist(), state["position"]
        self.generator.set_state(state["generator"])
