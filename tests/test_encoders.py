import numpy as np
import pytest
import torch

from raymem.config import ClipConfig, CopyDetectionConfig
from raymem.encoders import ClipEncoder, CopyDetector


def images(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_clip_local_dir_loads_and_normalizes(demo_root):
    enc = ClipEncoder(ClipConfig(model=f"local-dir:{demo_root / 'clip-tiny'}", pretrained=None))
    assert enc.dim == 64
    img = enc.encode_images(images(3))
    txt = enc.encode_texts(["a cat", "a dog"])
    assert img.shape == (3, 64) and txt.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, rtol=1e-5)
    again = ClipEncoder(ClipConfig(model=f"local-dir:{demo_root / 'clip-tiny'}", pretrained=None))
    np.testing.assert_array_equal(again.encode_texts(["a cat", "a dog"]), txt)


def test_clip_checkpoint_file_path(demo_root):
    """A registered architecture plus a local checkpoint file, the other offline loading path."""
    import json

    import open_clip

    cfg_path = demo_root / "clip-tiny" / "open_clip_config.json"
    arch = demo_root / "tiny-arch.json"
    arch.write_text(json.dumps(json.loads(cfg_path.read_text())["model_cfg"]))
    open_clip.add_model_config(str(arch))
    enc = ClipEncoder(
        ClipConfig(model="tiny-arch", pretrained=str(demo_root / "clip-tiny" / "open_clip_model.safetensors"))
    )
    ref = ClipEncoder(ClipConfig(model=f"local-dir:{demo_root / 'clip-tiny'}", pretrained=None))
    np.testing.assert_allclose(enc.encode_texts(["x"]), ref.encode_texts(["x"]), atol=1e-6)


def test_sscd_onnx_from_the_immaculate_wheel():
    det = CopyDetector(CopyDetectionConfig(model="immaculate:sscd_distilled", image_size=128))
    ims = images(2, size=96)
    emb = det.encode_images(ims)
    assert emb.shape == (2, 512) and det.dim == 512
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)
    # Mixed sizes are grouped, not rejected.
    mixed = det.encode_images([ims[0], images(1, size=150, seed=3)[0]])
    np.testing.assert_allclose(mixed[0], emb[0], atol=1e-5)


def test_unknown_immaculate_model():
    with pytest.raises(ValueError, match="unknown immaculate model 'nope'"):
        CopyDetector(CopyDetectionConfig(model="immaculate:nope"))


def test_sscd_torchscript_path(tmp_path):
    """Meta releases SSCD as TorchScript taking normalised float images; load that form too."""

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, 3, stride=2)

        def forward(self, x):
            return self.conv(x).mean(dim=(2, 3))

    torch.manual_seed(0)
    path = tmp_path / "sscd_tiny.torchscript.pt"
    torch.jit.script(Tiny()).save(str(path))
    det = CopyDetector(CopyDetectionConfig(model=str(path), image_size=64))
    emb = det.encode_images(images(2))
    assert emb.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)


@pytest.mark.parametrize("model", ["immaculate:sscd", "immaculate:sscd_distilled"])
def test_sscd_scores_copies_of_a_real_photo_high_and_other_photos_low(model):
    """Real SSCD weights on real photographs (scikit-image ships them): copies survive edits."""
    import io

    from PIL import Image
    from skimage import data

    def jpeg(im, quality):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    photo = Image.fromarray(data.astronaut())
    copies = [
        photo.transpose(Image.FLIP_LEFT_RIGHT),
        photo.resize((256, 256)),
        jpeg(photo, 30),
        jpeg(photo.transpose(Image.FLIP_LEFT_RIGHT).resize((300, 300)), 40),
    ]
    others = [
        Image.fromarray(data.coffee()),
        Image.fromarray(data.chelsea()),
        Image.fromarray(data.rocket()),
        Image.fromarray(data.immunohistochemistry()),
    ]
    det = CopyDetector(CopyDetectionConfig(model=model, image_size=288))
    ref = det.encode_images([photo])[0]
    copy_scores = det.encode_images(copies) @ ref
    other_scores = det.encode_images(others) @ ref
    assert copy_scores.min() > 0.85  # well above the 0.75 verbatim threshold
    assert other_scores.max() < 0.2  # well below the 0.5 replication threshold
