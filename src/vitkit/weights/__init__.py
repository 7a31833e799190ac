"""Weights in and out: vitkit's native directories and importers for foreign checkpoint layouts.

    model = vitkit.weights.load_model("vit_small.pth", model_name="vit_small_patch16_224")
    vitkit.weights.convert_checkpoint("google-vit-base/", "runs/vit_base")   # then vitkit.load_model(...)

See docs/weights.md for what each importer infers and how files are opened safely.
"""

from vitkit.weights.convert import convert_checkpoint, load_model
from vitkit.weights.hf import hf_to_timm_state_dict, load_hf_vit
from vitkit.weights.jax import jax_to_timm_state_dict, load_jax_npz
from vitkit.weights.native import load_native, load_state_dict_strict, save_pretrained
from vitkit.weights.safe_load import read_npz, read_state_dict, unwrap_state_dict
from vitkit.weights.timm import from_timm_state_dict, infer_vit_config

__all__ = [
    "convert_checkpoint",
    "from_timm_state_dict",
    "hf_to_timm_state_dict",
    "infer_vit_config",
    "jax_to_timm_state_dict",
    "load_hf_vit",
    "load_jax_npz",
    "load_model",
    "load_native",
    "load_state_dict_strict",
    "read_npz",
    "read_state_dict",
    "save_pretrained",
    "unwrap_state_dict",
]
