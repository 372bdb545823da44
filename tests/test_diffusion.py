import numpy as np
import pytest
import torch

from raymem.config import GenerationConfig, ModelConfig
from raymem.diffusion import NoiseNormRecorder, load_pipeline, sample
from raymem.identity import model_fingerprint

GEN = GenerationConfig(num_inference_steps=4, guidance_scale=7.5, height=64, width=64)


@pytest.fixture(scope="module")
def pipe(demo_root):
    return load_pipeline(ModelConfig(id=str(demo_root / "sd-tiny")), torch.device("cpu"))


def test_loads_through_from_pretrained_offline(pipe):
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_each_unit_is_reproducible_whatever_its_batch(pipe):
    rec = NoiseNormRecorder(pipe, steps=1)
    together = sample(pipe, rec, ["a cat", "a dog", "a cat"], [1, 2, 3], GEN)
    alone = sample(pipe, rec, ["a dog"], [2], GEN)
    again = sample(pipe, rec, ["a cat", "a dog", "a cat"], [1, 2, 3], GEN)
    assert together.images.shape == (3, 64, 64, 3) and together.images.dtype == np.uint8
    np.testing.assert_array_equal(together.images, again.images)
    # Batch-mates change float rounding (BLAS blocking), not the unit's noise: a few levels at most.
    # (Scans batch in fixed chunks, so there a unit's image is bit-identical run to run.)
    diff = np.abs(together.images[1].astype(int) - alone.images[0].astype(int))
    assert diff.max() <= 8 and diff.mean() < 0.5
    assert not np.array_equal(together.images[0], together.images[2])  # same prompt, other seed


def test_noise_norm_is_recorded_without_extra_unet_calls(pipe):
    calls = []
    handle = pipe.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        plain = pipe(
            prompt=["a cat", "a dog"],
            num_inference_steps=4,
            guidance_scale=7.5,
            height=64,
            width=64,
            generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
            output_type="np",
        )
        n_plain = len(calls)
        rec = NoiseNormRecorder(pipe, steps=2)
        calls.clear()
        out = sample(
            pipe, rec, ["a cat", "a dog"], [1, 2], GenerationConfig(**{**GEN.model_dump(), "noise_norm_steps": 2})
        )
        assert len(calls) == n_plain == 4  # one (batched uncond + text) UNet call per step, with or without the hook
        assert calls == [4, 4, 4, 4]
        assert rec.calls == 4 and len(rec.norms) == 2
        assert out.noise_norms.shape == (2,) and np.all(np.isfinite(out.noise_norms)) and np.all(out.noise_norms > 0)
        np.testing.assert_array_equal(out.images, (np.clip(plain.images, 0, 1) * 255).round().astype(np.uint8))
        rec.close()
    finally:
        handle.remove()


def test_no_guidance_means_no_noise_norm(pipe):
    rec = NoiseNormRecorder(pipe, steps=1)
    out = sample(
        pipe, rec, ["a cat"], [0], GenerationConfig(num_inference_steps=2, guidance_scale=1.0, height=64, width=64)
    )
    assert np.isnan(out.noise_norms).all()
    rec.close()


def test_model_fingerprint_follows_the_weights(demo_root, tmp_path):
    import shutil

    copy = tmp_path / "sd"
    shutil.copytree(demo_root / "sd-tiny", copy)
    a = model_fingerprint(ModelConfig(id=str(copy)))
    assert a == model_fingerprint(ModelConfig(id=str(demo_root / "sd-tiny")))  # content, not path
    cfg = copy / "scheduler" / "scheduler_config.json"
    cfg.write_text(cfg.read_text().replace('"steps_offset": 1', '"steps_offset": 0'))
    assert model_fingerprint(ModelConfig(id=str(copy))) != a
    assert model_fingerprint(ModelConfig(id="org/model", revision="abc")) != model_fingerprint(
        ModelConfig(id="org/model")
    )


def test_with_a_negative_prompt_the_norm_is_kept_apart_from_wens(demo_root):
    """The guidance batch then pairs the prompt with the negative prompt, not the empty one: that value is
    noise_norm_negative, and noise_norm (the thresholded one) stays null."""
    from raymem.config import parse_config
    from raymem.generate import GenerateEmbed, expand_units
    from raymem.prompts import Prompt
    from tests.conftest import demo_raw_config

    raw = demo_raw_config(demo_root)
    raw["generation"].update(num_inference_steps=2, negative_prompt="blurry")
    cfg = parse_config(raw)
    prompt = Prompt("p", "a photo of the Lunar Lighthouse", "Lunar Lighthouse", "a lighthouse", (), ())
    units = expand_units([prompt], cfg, "fingerprint")[:1]
    actor = GenerateEmbed(cfg, "scan", str(demo_root / "neg-store"), str(demo_root / "neg-texts"))
    row = actor._run_chunk(units)[0]
    assert row["status"] == "ok" and row["noise_norm"] is None and row["noise_norm_negative"] > 0
    plain = GenerateEmbed(parse_config(demo_raw_config(demo_root)), "scan", str(demo_root / "s"), str(demo_root / "t"))
    row = plain._run_chunk(units)[0]
    assert row["noise_norm"] > 0 and row["noise_norm_negative"] is None
