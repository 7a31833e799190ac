"""Frozen features: embeddings of any family, cosine retrieval, weighted k-NN and linear probes.

from vitkit.features import extract_features, save_features, search, knn_evaluate, probe
feats = extract_features(model, "photos/", batch_size=64)        # (N, D) unit-norm rows + paths/labels
save_features(feats, "index")                                    # index.safetensors + index.json
hits = search("query.jpg", "index", k=8, sheet="sheet.png")       # nearest images with cosine scores
knn_evaluate("runs/digits")                                      # DINO's weighted k-NN (k=20, T=0.07)
probe("runs/digits", out="runs/digits-probe")                    # logistic regression on frozen features

See docs/features.md.
"""

from vitkit.features.extract import FeatureSet, extract_features, list_images, model_and_splits, pooled_features
from vitkit.features.knn import knn_evaluate, knn_predict, knn_scores
from vitkit.features.probe import LinearProbe, fit_linear_probe, fold_into_model, probe
from vitkit.features.retrieval import contact_sheet, faiss_topk, nearest, search, topk_cosine
from vitkit.features.store import embed, feature_paths, load_features, save_features

__all__ = [
    "FeatureSet",
    "LinearProbe",
    "contact_sheet",
    "embed",
    "extract_features",
    "faiss_topk",
    "feature_paths",
    "fit_linear_probe",
    "fold_into_model",
    "knn_evaluate",
    "knn_predict",
    "knn_scores",
    "list_images",
    "load_features",
    "model_and_splits",
    "nearest",
    "pooled_features",
    "probe",
    "save_features",
    "search",
    "topk_cosine",
]
