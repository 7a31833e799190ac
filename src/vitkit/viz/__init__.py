"""Figures (matplotlib, Agg) and the interactive HTML attention explorer.

Every plotting function returns a `matplotlib.figure.Figure` and takes `save_path=None`; nothing goes through
pyplot's global state, so figures can be made in loops and on machines without a display.
"""

from vitkit.viz.attention import (
    AttentionVisualizer,
    plot_attention_distance,
    plot_attention_grid,
    plot_attention_overlay,
    uniform_attention_distance,
)
from vitkit.viz.explorer import explorer_data, render_explorer, write_explorer
from vitkit.viz.patches import (
    plot_patch_embedding_filters,
    plot_patch_grid,
    plot_position_embedding_similarity,
    visualize_patch_embedding,
)
from vitkit.viz.predictions import plot_augmentations, plot_topk
from vitkit.viz.receptive_field import compare_receptive_fields

__all__ = [
    "AttentionVisualizer",
    "compare_receptive_fields",
    "explorer_data",
    "plot_attention_distance",
    "plot_attention_grid",
    "plot_attention_overlay",
    "plot_augmentations",
    "plot_patch_embedding_filters",
    "plot_patch_grid",
    "plot_position_embedding_similarity",
    "plot_topk",
    "render_explorer",
    "uniform_attention_distance",
    "visualize_patch_embedding",
    "write_explorer",
]
