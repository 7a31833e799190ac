"""Data: every source behind one `load_data(spec)`, batch transforms, and Mixup/CutMix.

from vitkit.data import load_data, TrainTransform, EvalTransform
splits = load_data("digits")
train_tf = TrainTransform(32, splits.mean, splits.std)
"""

from vitkit.data.dataset import IMAGENET_MEAN, IMAGENET_STD, DataSplits, ImageDataset
from vitkit.data.images import BadImageWarning
from vitkit.data.load import SPEC_FORMS, get_data_loaders, load_data
from vitkit.data.mixing import Mixup, smooth_one_hot
from vitkit.data.shapes import SHAPE_CLASSES
from vitkit.data.transforms import EvalTransform, TrainTransform

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SHAPE_CLASSES",
    "SPEC_FORMS",
    "BadImageWarning",
    "DataSplits",
    "EvalTransform",
    "ImageDataset",
    "Mixup",
    "TrainTransform",
    "get_data_loaders",
    "load_data",
    "smooth_one_hot",
]
