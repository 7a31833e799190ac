"""Batches whose order is a pure function of (seed, epoch), sharded across processes, resumable mid-epoch.

Exact resume needs three things from the data side: the order of epoch e must not depend on anything but the seed
and e (so it is regenerated, not saved); a resumed epoch must be able to start at batch k; and loading must not
draw from the global RNG that augmentation uses (a DataLoader iterator does, unless given its own generator).

Sharding works per global batch: batch b of the permutation is cut into `world_size` equal contiguous slices and
process r takes slice r. DDP averages the per-process gradients, and with equal slices that average is exactly
the gradient of the global batch, so N processes train the same model as one process with the same batch_size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from vitkit.data.dataset import ImageDataset


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The training order of epoch `epoch`: a permutation of range(n) seeded by `seed * 1000 + epoch`."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g)


class BatchLoader:
    """Iterate `(uint8 images (b, 3, H, W), labels (b,))` batches of a dataset.

    Args:
        dataset: an ImageDataset (in-memory ones are indexed directly; lazy ones are decoded by DataLoader workers).
        batch_size: global batch size (all processes together); must divide by `world_size` when training.
        shuffle: permute each epoch with `epoch_permutation(len, seed, epoch)`; else keep dataset order.
        seed: the run seed.
        drop_last: drop the last incomplete batch (training: keeps every step's batch the same size).
        rank: this process's index among `world_size`.
        world_size: number of processes sharing each global batch.
        workers: DataLoader worker processes for lazy datasets.
        pin_memory: pin host memory for faster copies to a GPU.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if drop_last and batch_size % world_size != 0:
            raise ValueError(
                f"batch_size {batch_size} does not split evenly across {world_size} processes "
                f"(use a multiple of {world_size})"
            )
        if drop_last and len(dataset) < batch_size:
            raise ValueError(f"the training split has {len(dataset)} images, fewer than one batch of {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.workers = workers
        self.pin_memory = pin_memory
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self) -> Tensor:
        n = len(self.dataset)
        return epoch_permutation(n, self.seed, self.epoch) if self.shuffle else torch.arange(n)

    def local_indices(self, start_batch: int = 0) -> list[Tensor]:
        """This process's index slice of each global batch from `start_batch` on (slices may be empty at the end)."""
        order = self.order()
        out = []
        for b in range(start_batch, len(self)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            out.append(batch.tensor_split(self.world_size)[self.rank])  # near-equal contiguous slices
        return out

    def iter_from(self, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches from global batch `start_batch` of the current epoch to the end."""
        indices = [i for i in self.local_indices(start_batch) if len(i)]  # a small last batch may skip a rank
        ds = self.dataset
        if ds.images is not None:
            for idx in indices:
                x, y = ds.images[idx], ds.labels[idx]
                yield (x.pin_memory(), y.pin_memory()) if self.pin_memory else (x, y)
            return
        # Lazy dataset: decode in workers. The loader's own generator keeps it from consuming the global RNG.
        loader = DataLoader(
            ds,
            batch_sampler=[i.tolist() for i in indices],
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed),
        )
        yield from loader

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iter_from(0)
