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
