"""Every mainstream diffusers family, tiny and built offline (raymem.families): loads through
`from_pretrained`, samples reproducibly, records the noise norm right (or says why it cannot), and
runs a whole scan: generate, embed, join, label."""

import json

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from raymem.config import GenerationConfig, ModelConfig, parse_config
from raymem.diffusion import NoiseNormRecorder, load_pipeline, sample
from raymem.families import FAMILIES, build_family

GEN = GenerationConfig(num_inference_steps=3, guidance_scale=5.0, height=32, width=32)
CLASSES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "pixart-sigma": "PixArtSigmaPipeline",
    "flux": "FluxPipeline",
    "sana": "SanaPipeline",
}
GUIDANCE_DISTILLED = {"flux"}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: build_family(f, root / f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_loads_and_samples(family, family_dirs):
    pipe = load_pipeline(ModelConfig(id=str(family_dirs[family])), torch.device("cpu"))
    assert type(pipe).__name__ == CLASSES[family]
    rec = NoiseNormRecorder(pipe, steps=1)
    a = sample(pipe, rec, ["a red kite over a beach", "a blue teapot"], [0, 1], GEN)
    b = sample(pipe, rec, ["a red kite over a beach", "a blue teapot"], [0, 1], GEN)
    assert a.images.shape == (2, 32, 32, 3) and a.images.dtype == np.uint8
    np.testing.assert_array_equal(a.images, b.images)  # same prompt and seed, same image
    if family in GUIDANCE_DISTILLED:
        assert np.isnan(a.noise_norms).all() and "no classifier-free-guidance batch" in rec.reason
    else:
        assert np.isfinite(a.noise_norms).all() and (a.noise_norms > 0).all() and rec.reason is None
    rec.close()


def _halves(value, n: int, half: int):
    """The unconditional (half 0) or text (half 1) part of a guidance-batch argument."""
    if torch.is_tensor(value) and value.ndim and value.shape[0] == 2 * n:
        return value[half * n : (half + 1) * n]
    if isinstance(value, dict):
        return {k: _halves(v, n, half) for k, v in value.items()}
    return value


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in GUIDANCE_DISTILLED])
def test_noise_norm_equals_a_separate_computation(family, family_dirs):
    """The hook's ||eps(x_t, p) - eps(x_t, 0)|| on the first step equals the same difference computed
    by two separate denoiser calls on the first step's inputs, split into their two halves."""
    pipe = load_pipeline(ModelConfig(id=str(family_dirs[family])), torch.device("cpu"))
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    first = {}

    def keep(module, args, kwargs):
        first.setdefault("call", (args, kwargs))

    handle = denoiser.register_forward_pre_hook(keep, with_kwargs=True)
    rec = NoiseNormRecorder(pipe, steps=1)
    out = sample(pipe, rec, ["a red kite over a beach", "a blue teapot"], [3, 4], GEN)
    handle.remove()
    rec.close()
    args, kwargs = first["call"]
    with torch.inference_mode():
        preds = []
        for half in (0, 1):
            result = denoiser(
                *[_halves(a, 2, half) for a in args], **{k: _halves(v, 2, half) for k, v in kwargs.items()}
            )
            pred = result[0] if isinstance(result, tuple) else result.sample
            if pred.shape[1] == 2 * denoiser.config.in_channels:  # learned variance: eps is the first half
                pred = pred[:, : denoiser.config.in_channels]
            preds.append(pred.float())
    separate = (preds[1] - preds[0]).flatten(1).norm(dim=1).numpy()
    # Equal up to float rounding: a batch of 2n rows and two of n round differently (BLAS blocking).
    np.testing.assert_allclose(out.noise_norms, separate, rtol=5e-3, atol=1e-5)


def test_scheduler_and_offload_settings(family_dirs):
    pipe = load_pipeline(
        ModelConfig(id=str(family_dirs["sd"]), scheduler="EulerDiscreteScheduler", offload="model"),
        torch.device("cpu"),  # offloading is for GPUs: on CPU the setting is ignored
    )
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"  # built from the pipeline's own config
    with pytest.raises(ValueError, match="Scheduler"):
        ModelConfig(id="x", scheduler="not a scheduler")


def test_an_unknown_scheduler_is_one_line_before_ray_starts(demo_raw, tmp_path):
    """A name that looks like a scheduler but is none: `raymem validate` exits 2 with one line."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    path = tmp_path / "scan.yaml"
    path.write_text(yaml.safe_dump({**demo_raw, "model": {**demo_raw["model"], "scheduler": "NoSuchScheduler"}}))
    out = subprocess.run(
        [str(Path(sys.executable).parent / "raymem"), "validate", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert out.stderr.strip() == "raymem: error: model.scheduler: diffusers has no scheduler 'NoSuchScheduler'"


@pytest.mark.ray
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_scans(family, family_dirs, demo_root, tmp_path, local_ray):
    from raymem.pipeline import run_scan
    from tests.conftest import demo_raw_config

    raw = demo_raw_config(demo_root)
    lines = (demo_root / "prompts.jsonl").read_text().splitlines()[:2]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    raw.update(prompts=str(tmp_path / "prompts.jsonl"), model={"id": str(family_dirs[family]), "name": family})
    raw["generation"] = {
        **raw["generation"],
        "seeds_per_prompt": 2,
        "num_inference_steps": 2,
        "height": 32,
        "width": 32,
    }
    raw["signals"] = {**raw["signals"], "null_seeds": 1}
    raw["output"] = {"uri": str(tmp_path / "out"), "scan_date": "2026-11-30"}
    result = run_scan(parse_config(raw))
    manifest = json.loads(next((tmp_path / "out" / "manifests").glob("*.json")).read_text())
    assert manifest["status"] == "complete" and result.counts["units_ok"] == 4
    labels = pads.dataset(str(tmp_path / "out" / "labels"), format="parquet", partitioning="hive").to_table()
    assert labels.num_rows == 4 and set(labels.column("label").to_pylist()) <= {"MU", "MI", "ME", "none"}
    gens = pads.dataset(str(tmp_path / "out" / "generations"), format="parquet", partitioning="hive").to_table()
    norms = gens.column("noise_norm").to_pylist()
    if family in GUIDANCE_DISTILLED:
        assert all(n is None for n in norms) and manifest["counts"]["noise_norm"].startswith("not measured")
    else:
        assert all(n is not None and n > 0 for n in norms) and manifest["counts"]["noise_norm"] == "measured"
