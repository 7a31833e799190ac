"""The explorer page without a browser: self-contained, escaped, and embedding the right numbers."""

import base64
import hashlib
import html
import io
import json
import re

import numpy as np
import pytest
import torch

from tests.viz.conftest import XSS, make_model
from vitkit.explain import attention_rollout, relevance_map
from vitkit.viz import explorer_data, render_explorer, write_explorer
from vitkit.viz.explorer import json_for_script


def embedded_json(page: str):
    m = re.search(r'<script type="application/json" id="vitkit-data">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


@pytest.fixture
def page(tmp_path, model, image):
    path = write_explorer(tmp_path / "e.html", model, [image], names=["x</script><!--y.png"], title=XSS)
    return path.read_text(encoding="utf-8")


def test_self_contained(page):
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(?!data:)[a-z]+:""", page)  # no external resources
    assert "default-src 'none'" in page  # the CSP forbids any fetch as well


def test_user_strings_are_escaped(page):
    assert XSS not in page  # neither the title nor the class name appears raw
    assert html.escape(XSS) in page  # the title, as text
    assert page.count("</script>") == 2 and "<!--" not in page  # the file name cannot close or comment the data
    data = embedded_json(page)
    assert data["images"][0]["name"] == "x</script><!--y.png"
    assert XSS in [t["name"] for t in data["images"][0]["targets"]]


def test_script_hash_matches_csp(page):
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in page


def test_placeholders_are_filled_once(model, image):
    data = explorer_data(model, [image], names=["{{DATA}} {{SCRIPT}}"])
    page = render_explorer(data, title="{{SCRIPT_HASH}}")
    assert "{{" not in page.replace("{{DATA}} {{SCRIPT}}", "").replace("{{SCRIPT_HASH}}", "")
    assert embedded_json(page)["images"][0]["name"] == "{{DATA}} {{SCRIPT}}"


def test_json_for_script_round_trip():
    value = {"a": "</script><!-- & \u2028 >"}
    text = json_for_script(value)
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == value


def test_embedded_attention_matches_the_model(model, image):
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(model.preprocess.mean).view(1, 3, 1, 1)) / torch.tensor(model.preprocess.std).view(1, 3, 1, 1)
    data = explorer_data(model, [x], layers=[-1, 0])
    entry = data["images"][0]
    L, heads, n, P = 2, 2, 24, model.num_prefix_tokens
    assert data["model"]["layers"] == [0, 1] and data["model"]["grid"] == [4, 6]
    q = np.frombuffer(base64.b64decode(entry["attention"]), dtype=np.uint8).reshape(L, heads + 1, n + 1, n)
    with torch.no_grad():
        _, attns = model(x, return_attention=True)
    for li in range(L):
        a = attns[li][0]
        for h in range(heads + 1):
            full = a.mean(0) if h == heads else a[h]
            rows = torch.cat([full[:1, P:], full[P:, P:]])  # class query, then each patch query
            expect = (rows / rows.amax(1, keepdim=True) * 255).round()
            np.testing.assert_allclose(q[li, h], expect.numpy(), atol=1)
    assert (q[1, 0, 3] != q[1, 0, 17]).any()  # two patches attend differently
    # Class maps: the library's, scaled to a maximum of 1.
    roll = attention_rollout(model, x)[0].flatten()
    np.testing.assert_allclose(entry["rollout"], (roll / roll.max()).numpy(), atol=1e-4)
    top = entry["targets"][0]
    rel = relevance_map(model, x, target=top["index"])[0].flatten()
    np.testing.assert_allclose(top["relevance"], (rel / rel.max()).numpy(), atol=1e-4)
    probs = model(x).softmax(-1)[0]
    assert [t["index"] for t in entry["targets"]] == probs.argsort(descending=True).tolist()


def test_size_limit_names_the_way_out(model, image):
    with pytest.raises(ValueError, match=r"choose fewer layers \(e.g. layers=\[-1\]\)"):
        explorer_data(model, [image], max_bytes=1000)


def test_pooled_model(image):
    data = explorer_data(make_model(class_token=False, pool="avg"), [image])
    assert data["model"]["query_name"] == "mean of the patch queries"


# --- segmentation models and detectors ------------------------------------------------------------------------------
def _unit(m):
    m = m.flatten().clamp(min=0)
    return (m / m.max()).numpy()


def test_segmentation_page_lists_classes_by_share_with_their_class_region_maps():
    from tests.explain.conftest import seg_model
    from vitkit.explain.dense import backbone_attention, segmentation_cam

    model = seg_model()
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(5))  # non-square: a 4 x 6 grid
    data = explorer_data(model, [x])
    assert data["model"]["kind"] == "segmentation" and data["model"]["grid"] == [4, 6]
    assert data["model"]["query_name"] == "mean of the patch queries"
    assert data["settings"]["modes"] == ["attention", "rollout", "flow", "gradcam"]
    assert data["settings"]["class_mode"] == "gradcam"
    entry = data["images"][0]
    with torch.no_grad():
        mask = model(x).argmax(1)[0]
    shares = torch.bincount(mask.flatten(), minlength=3).float() / mask.numel()
    assert [t["index"] for t in entry["targets"]] == [c for c in shares.argsort(descending=True).tolist() if shares[c]]
    for t in entry["targets"]:
        assert t["prob"] == pytest.approx(float(shares[t["index"]]), abs=1e-5)
        np.testing.assert_allclose(t["gradcam"], _unit(segmentation_cam(model, x, target=t["index"]).maps), atol=1e-3)
    np.testing.assert_allclose(entry["rollout"], _unit(backbone_attention(model, x, "rollout")), atol=1e-4)
    from PIL import Image

    pred = np.asarray(Image.open(io.BytesIO(base64.b64decode(entry["prediction"]))))
    assert pred.shape == (32, 48, 3)


def test_detection_page_lists_queries_by_score_with_their_cross_attention(tmp_path):
    from tests.explain.conftest import detr_model
    from vitkit.explain.cross_attention import detr_cross_attention

    model = detr_model()
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(5))
    path = write_explorer(tmp_path / "det.html", model, [x], top_k=3)
    data = embedded_json(path.read_text())
    assert data["model"]["kind"] == "detection" and data["settings"]["class_mode"] == "cross_attention"
    entry = data["images"][0]
    cross = detr_cross_attention(model, x)
    scores = cross.logits.softmax(-1)[0, :, :-1].amax(-1)
    best = scores.argsort(descending=True)[:3].tolist()
    assert [t["name"].rsplit("query ", 1)[1].rstrip(")") for t in entry["targets"]] == [str(q) for q in best]
    for t, q in zip(entry["targets"], best):
        np.testing.assert_allclose(t["cross_attention"], _unit(cross.maps[0, q]), atol=1e-4)
        assert t["prob"] == pytest.approx(float(scores[q]), abs=1e-4)


def test_dense_model_on_a_windowed_backbone_is_refused_by_name():
    from vitkit.models.segmentation import ViTSegmentation

    model = ViTSegmentation("swin_tiny_patch4_window7_224", 3, backbone_args=dict(
        img_size=32, depths=(1, 1), num_heads=(1, 2), embed_dim=16, window_size=4))  # fmt: skip
    with pytest.raises(ValueError, match=r"explorer's attention maps of a segmentation model need global self-att"):
        explorer_data(model, [torch.randn(1, 3, 32, 32)])
