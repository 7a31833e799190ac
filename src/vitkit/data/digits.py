"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 grayscale images, no download needed."""

from __future__ import annotations

import numpy as np
import torch

DIGITS_CLASSES = [str(i) for i in range(10)]


def load_digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as uint8 RGB images (1797, 3, 8, 8), values scaled from 0..16 to 0..255, and their labels."""
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import and only needed here

    digits = load_digits()
    gray = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    images = torch.from_numpy(gray)[:, None].expand(-1, 3, -1, -1).contiguous()  # (N, 3, 8, 8)
    return images, torch.from_numpy(digits.target.astype(np.int64))
