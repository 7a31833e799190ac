"""Shared parts of the model contract (see `vitkit.models.base` for the whole contract) for new families."""

from __future__ import annotations

import dataclasses

from vitkit.models.serialization import save_pretrained


class ContractMixin:
    """Shared parts of the contract for families whose head is one `nn.Linear` (or Identity) named `head`/`fc`.

    A family class inherits `(ContractMixin, nn.Module)` and provides `cfg` (its config dataclass with a
    `num_classes` field), `family`, `preprocess` and the model-specific methods; this mixin gives `describe()` and
    `save_pretrained()`.
    """

    def describe(self):
        """The config of the model as it is now (the head's current size), for saving."""
        return dataclasses.replace(self.cfg, num_classes=self.num_classes)

    def save_pretrained(self, directory, **extra) -> None:
        """Write `config.json` + `model.safetensors` to `directory` (atomically); see `vitkit.load_model`."""
        save_pretrained(self, directory, **extra)
