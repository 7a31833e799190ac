"""Weights in and out: vitkit's native directories and converters from foreign checkpoint layouts."""

from vitkit.weights.native import load_native, load_state_dict_strict, save_pretrained

__all__ = ["load_native", "load_state_dict_strict", "save_pretrained"]


def load_model(path, map_location="cpu", **kwargs):
    """Load a model from a local path. Native vitkit directories for now; converters extend this."""
    return load_native(path, map_location=map_location)
