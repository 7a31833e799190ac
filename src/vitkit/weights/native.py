"""vitkit's own format (config.json + model.safetensors); implemented in `vitkit.models.serialization`."""

from vitkit.models.serialization import (
    CONFIG_NAME,
    FORMAT,
    WEIGHTS_NAME,
    is_native_dir,
    load_native,
    load_state_dict_strict,
    model_config_dict,
    model_from_config,
    save_pretrained,
)

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "WEIGHTS_NAME",
    "is_native_dir",
    "load_native",
    "load_state_dict_strict",
    "model_config_dict",
    "model_from_config",
    "save_pretrained",
]
