"""`ueo.inference.infer` and `ueo.api.predict` against the model applied image by image."""

import numpy as np
import pytest
import torch
from conftest import CLASSES, add_bad_images, load_calibrated

from ueo.data import load_image_set
from ueo.recipe import Runtime

pytestmark = pytest.mark.usefixtures("single_thread")

QUIET = Runtime(device="cpu", workers=0, progress=False)


def test_inference_matches_direct_forward(image_folder):
    """infer() and predict() against the model applied image by image, in input order."""
    from ueo.api import predict
    from ueo.images import open_rgb
    from ueo.inference import infer

    add_bad_images(image_folder)
    model = load_calibrated("test-tiny-rn")
    images = load_image_set(image_folder, CLASSES)
    runtime = QUIET.replace(eval_batch_size=7)
    out = infer(model, images, runtime)
    transform = model.clip.test_transform()
    readable = [i for i, p in enumerate(images.paths) if not p.endswith(("truncated.png", ".jpg"))]
    assert out.valid.tolist() == [i in readable for i in range(len(images))]
    assert np.isnan(out.cos[~out.valid]).all()
    with torch.no_grad():
        x = torch.stack([transform(open_rgb(images.paths[i])) for i in readable])
        cos = model(x)
    np.testing.assert_allclose(out.cos[readable], cos.numpy(), atol=1e-5)
    assert cos.std(dim=0).min() > 1e-3  # the images really differ

    rows = predict(model, images, threshold=0.26, runtime=runtime)
    assert [r["path"] for r in rows] == [images.paths[i] for i in readable]
    prob = torch.softmax(100 * cos, dim=-1)
    mcm = torch.softmax(cos, dim=-1).max(dim=-1).values
    for row, p, m in zip(rows, prob, mcm, strict=True):
        assert row["pred"] == CLASSES[int(p.argmax())]
        assert row["prob"] == pytest.approx(float(p.max()), abs=1e-4)
        assert row["mcm"] == pytest.approx(float(m), abs=1e-6)
        assert row["is_unknown"] == (row["mcm"] < 0.26)
