"""Loading a diffusers text-to-image pipeline and running it unit by unit, reproducibly.

Any pipeline `DiffusionPipeline.from_pretrained` can load (hub id, local directory, or an s3:// prefix
that is downloaded once into a local cache) -- never remote code or custom pipelines. While it samples,
a forward hook on the denoiser records Wen et al.'s text-noise norm ||eps(x_t, p) - eps(x_t, 0)|| from
the classifier-free-guidance batch the pipeline computes anyway: no extra UNet call.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from raymem import uri as uris
from raymem.config import GenerationConfig, ModelConfig

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def load_pipeline(cfg: ModelConfig, device: torch.device):
    import diffusers
    import transformers
    from diffusers import DiffusionPipeline

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    source = uris.local_copy(cfg.id) if uris.is_remote(cfg.id) else cfg.id
    kwargs = dict(dtype=resolve_dtype(cfg.dtype, device), revision=cfg.revision, variant=cfg.variant)
    if os.path.isdir(source) or os.environ.get("HF_HUB_OFFLINE") == "1":
        kwargs["local_files_only"] = True
    kwargs["trust_remote_code"] = False
    if _has_safety_checker(source, kwargs):
        # A scan needs the raw samples: a safety checker would black out exactly what we look for.
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    if cfg.scheduler:
        pipe.scheduler = scheduler_class(cfg.scheduler).from_config(pipe.scheduler.config)
    if device.type == "cuda" and cfg.offload != "none":
        # Offloading places each component on the GPU itself; moving the whole pipeline first would
        # defeat it. The GPU is the one Ray assigned (CUDA_VISIBLE_DEVICES narrows it to index 0).
        if cfg.offload == "model":
            pipe.enable_model_cpu_offload(gpu_id=device.index or 0)
        else:
            pipe.enable_sequential_cpu_offload(gpu_id=device.index or 0)
        return pipe
    return pipe.to(device)


def scheduler_class(name: str):
    """The diffusers scheduler class `model.scheduler` names; a one-line ConfigError when there is none
    (checked before Ray starts by `check_model_sources`, and again where the pipeline loads)."""
    import diffusers

    from raymem.errors import ConfigError

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ConfigError(f"model.scheduler: diffusers has no scheduler {name!r}")
    return cls


def _has_safety_checker(source: str, kwargs: dict) -> bool:
    """Whether the pipeline class takes a safety checker (SD 1.x/2.x do; SDXL, SD3, Flux ... do not),
    read from its model_index.json so other families load without 'unexpected argument' warnings."""
    import inspect

    import diffusers
    from diffusers import DiffusionPipeline

    keys = ("revision", "local_files_only")
    config = DiffusionPipeline.load_config(source, **{k: kwargs[k] for k in keys if k in kwargs})
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    return cls is None or "safety_checker" in inspect.signature(cls.__init__).parameters


class NoiseNormRecorder:
    """Forward hook on the denoiser that keeps ||eps_text - eps_uncond|| per image for the first steps.

    Text-to-image pipelines with classifier-free guidance run the denoiser on the batch
    [uncond; text] and split its output in two halves; the hook reads that output, so the norm costs
    one subtraction per step and no extra forward pass.
    """

    def __init__(self, pipe, steps: int):
        self.steps = steps
        self.norms: list[torch.Tensor] = []
        self.calls = 0
        self.batch = 0  # images in the current pipeline call: a guidance batch has twice as many rows
        self.reason: str | None = None  # why the last call's norm is not measured, in words
        self.pipeline = type(pipe).__name__
        self._handle = None
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        config = getattr(denoiser, "config", None)
        # Learned-variance models (PixArt, DeepFloyd) predict [eps, variance] stacked on the channels;
        # the norm is the noise prediction's.
        ins, outs = getattr(config, "in_channels", None), getattr(config, "out_channels", None)
        self.eps_channels = ins if ins and outs == 2 * ins else None
        if denoiser is not None:
            self._handle = denoiser.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.calls += 1
        if len(self.norms) >= self.steps:
            return
        pred = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        # Only a [uncond; text] batch of exactly twice the images is a guidance batch: a guidance-distilled
        # pipeline (Flux) runs the text branch alone, and an even batch of it must not be split.
        if not torch.is_tensor(pred) or pred.shape[0] != 2 * self.batch:
            return
        if self.eps_channels:
            pred = pred[:, : self.eps_channels]
        uncond, text = pred.detach().float().chunk(2)
        self.norms.append((text - uncond).flatten(1).norm(dim=1).cpu())

    def reset(self, batch: int = 0) -> None:
        self.norms, self.calls, self.batch = [], 0, batch

    def per_image(self, n: int) -> np.ndarray:
        """Mean norm over the recorded steps, one value per image (NaN without guidance: `reason` says why)."""
        if not self.norms or self.norms[0].shape[0] != n:
            self.reason = (
                f"{self.pipeline} ran no classifier-free-guidance batch (a guidance-distilled model, or "
                "guidance_scale <= 1): there is no unconditional prediction to measure the text's effect against"
            )
            return np.full(n, np.nan, dtype=np.float32)
        self.reason = None
        return torch.stack(self.norms).mean(dim=0).numpy().astype(np.float32)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


@dataclass
class Samples:
    images: np.ndarray  # (n, H, W, 3) uint8
    noise_norms: np.ndarray  # (n,) float32


def sample(pipe, recorder: NoiseNormRecorder, prompts: list[str], seeds: list[int], cfg: GenerationConfig) -> Samples:
    """Generate one image per (prompt, seed); each image depends only on its own prompt and seed.

    Each unit gets its own CPU `torch.Generator`, so the initial noise of a unit is the same whatever
    batch it lands in and on whichever device it runs.
    """
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    recorder.reset(batch=len(prompts))
    kwargs = dict(
        prompt=list(prompts),
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
        height=cfg.height,
        width=cfg.width,
        generator=generators,
        output_type="np",
    )
    if cfg.negative_prompt:
        kwargs["negative_prompt"] = [cfg.negative_prompt] * len(prompts)
    accepted = _call_parameters(pipe)
    if "use_resolution_binning" in accepted:
        kwargs["use_resolution_binning"] = False  # PixArt, Sana: sample the configured size, not a bucket
    if "clean_caption" in accepted:
        kwargs["clean_caption"] = False  # the prompt as the prompt set wrote it (and no bs4/ftfy needed)
    with torch.inference_mode():
        out = pipe(**kwargs)
    images = np.asarray(out.images)
    if images.dtype != np.uint8:
        images = (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return Samples(images=images, noise_norms=recorder.per_image(len(prompts)))


def _call_parameters(pipe) -> set[str]:
    import inspect

    return set(inspect.signature(pipe.__call__).parameters)
