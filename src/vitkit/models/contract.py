"""Shared parts of the model contract (see `vitkit.models.base` for the whole contract) for new families."""

from __future__ import annotations

import dataclasses

from vitkit.models.base import head_outputs
from vitkit.models.serialization import save_pretrained


class ContractMixin:
    """Shared parts of the contract for families whose head is one `nn.Linear` (or Identity) named `head`/`fc`.

    A family class inherits `(ContractMixin, nn.Module)` and provides `cfg` (its config dataclass with a
    `num_classes` field), `family`, `preprocess`, `get_classifier()` and the model-specific methods; this mixin
    gives `num_classes`, `describe()` and `save_pretrained()`.
    """

    @property
    def num_classes(self) -> int:
        """Outputs of the classifier as it is now (0 without one), whatever was assigned to it."""
        n = head_outputs(self.get_classifier())
        return self.cfg.num_classes if n is None else n

    def describe(self):
        """The config of the model as it is now (the head's current size), for saving."""
        return dataclasses.replace(self.cfg, num_classes=self.num_classes)

    def save_pretrained(self, directory, **extra) -> None:
        """Write `config.json` + `model.safetensors` to `directory` (atomically); see `vitkit.load_model`."""
        save_pretrained(self, directory, **extra)
