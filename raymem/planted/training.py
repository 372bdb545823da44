"""Training the planted world's models on CPU: a tiny Stable-Diffusion-style pipeline and a tiny CLIP.

- VAE: AutoencoderKL, 3 levels (32 px images <-> 8x8x4 latents), trained on reconstruction.
- Text encoder + UNet: a small CLIPTextModel and UNet2DConditionModel trained jointly with the
  standard noise-prediction loss (DDPM, SD's scaled-linear betas), captions dropped 10 % of the time
  so classifier-free guidance works; saved as a normal diffusers pipeline (safetensors) with a DDIM
  scheduler, loaded by scans through `DiffusionPipeline.from_pretrained` like any SD model.
- CLIP: a tiny open_clip ViT trained contrastively on the same images and captions, saved as a
  `local-dir:` checkpoint, so element presence ("with minarets") means something.
- Presence CLIP (`train_presence_clip`): the same architecture trained on a separate corpus
  (`world.build_presence_corpus`: other images, paraphrased captions); what the benchmark scans with,
  so the instrument does not share the generator's captions.
Everything is seeded; torch runs single-process on the CPU. Sizes are chosen so the full training
fits in about 20 minutes on 2 cores and the weights in about 20 MB (float16 on disk).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)


# 32 px images <-> 8x8x4 latents (VAE factor 4): the UNet works on 8x8, which is what makes CPU
# training fit in minutes.
LATENT_CHANNELS = 4


@dataclass
class TrainConfig:
    seed: int = 0
    vae_steps: int = 1200
    unet_steps: int = 2800
    clip_steps: int = 1100
    batch_size: int = 32
    clip_batch_size: int = 64
    lr: float = 4e-4
    caption_dropout: float = 0.1
    threads: int = 0  # 0: all cores


def _progress(name: str, step: int, total: int, loss: float, start: float) -> None:
    if step % max(1, total // 10) == 0 or step == total:
        log.info("%s %d/%d loss %.4f (%.0fs)", name, step, total, loss, time.perf_counter() - start)


def one_cycle(opt, lr: float, steps: int):
    """5 % warm-up then cosine decay; at least two warm-up steps, since OneCycleLR divides by the
    warm-up length and a short run (tests, --quick) would otherwise give it zero."""
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.05, 2.0 / steps))


def load_world(root: Path, table: str = "world.jsonl") -> tuple[torch.Tensor, list[str]]:
    rows = [json.loads(line) for line in (root / table).read_text().splitlines()]
    images = np.stack([np.asarray(Image.open(r["image"]).convert("RGB")) for r in rows])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, [r["caption"] for r in rows]


# -- models -------------------------------------------------------------------------------------------


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "patch_size": 4},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 3},
}
# The same text tower and embedding size with open_clip's ModifiedResNet (a tuple of layers selects it) as
# the image tower, one bottleneck block a stage: convolutions keep a few-pixel element that a 4-px patch
# embedding averages away (docs/planted.md, "Is it the CLIP's training, or its architecture?").
RESNET_CLIP_CONFIG = {**CLIP_CONFIG, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16}}
# The presence CLIP's image towers (`PresenceConfig.image_tower`).
PRESENCE_TOWERS = {"vit": CLIP_CONFIG, "resnet": RESNET_CLIP_CONFIG}


# -- training ---------------------------------------------------------------------------------------------


def train_vae(pixels: torch.Tensor, cfg: TrainConfig):
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2 * cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    for step in range(1, cfg.vae_steps + 1):
        idx = torch.randint(0, len(pixels), (cfg.batch_size,), generator=g)
        x = pixels[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        _progress("vae", step, cfg.vae_steps, loss.item(), start)
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
    # SD scales latents to unit variance; the pipeline reads the factor from the VAE config.
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return vae, means * vae.config.scaling_factor


def train_unet(latents: torch.Tensor, captions: list[str], cfg: TrainConfig):
    from diffusers import DDPMScheduler

    from raymem.tiny import clip_tokenizer

    tokenizer = clip_tokenizer()
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    unet, text = make_unet(), make_text_encoder()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    sched = one_cycle(opt, cfg.lr, cfg.unet_steps)
    noise_sched = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    g = torch.Generator().manual_seed(cfg.seed + 1)
    start = time.perf_counter()
    for step in range(1, cfg.unet_steps + 1):
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=g)
        x0 = latents[idx]
        tok = ids[idx].clone()
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout
        tok[drop] = empty
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (cfg.batch_size,), generator=g)
        noisy = noise_sched.add_noise(x0, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=text(tok)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        _progress("unet", step, cfg.unet_steps, loss.item(), start)
    return unet.eval(), text.eval()


def train_clip(
    pixels: torch.Tensor,
    captions: list[str],
    cfg: TrainConfig,
    partners: list[list[int]] | None = None,
    model_cfg: dict = CLIP_CONFIG,
):
    """A tiny open_clip CLIP (`model_cfg`) trained contrastively on (pixels, captions). With `partners` (per
    image, the images that show the same subject), half of every batch is random and the other half one
    partner of each: hard negatives that differ only in scene, colours or element. Both options are for
    bench/presence_training.py; the benchmark trains with neither."""
    import open_clip

    torch.manual_seed(cfg.seed + 2)
    model = open_clip.CLIP(**model_cfg)
    tokenizer = open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
    tokens = tokenizer(captions)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    images = ((pixels + 1) / 2 - mean) / std  # open_clip's default normalisation
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1)
    sched = one_cycle(opt, cfg.lr, cfg.clip_steps)
    g = torch.Generator().manual_seed(cfg.seed + 3)
    start = time.perf_counter()
    for step in range(1, cfg.clip_steps + 1):
        if partners is None:
            idx = torch.randint(0, len(images), (cfg.clip_batch_size,), generator=g)
        else:
            idx = _with_partners(torch.randint(0, len(images), (cfg.clip_batch_size // 2,), generator=g), partners, g)
        img_f = F.normalize(model.encode_image(images[idx]), dim=-1)
        txt_f = F.normalize(model.encode_text(tokens[idx]), dim=-1)
        logits = model.logit_scale.exp() * img_f @ txt_f.T
        # Identical captions in a batch are positives too (the world repeats captions on purpose).
        same = (tokens[idx][:, None, :] == tokens[idx][None, :, :]).all(-1).float()
        target = same / same.sum(1, keepdim=True)
        loss = (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.log_softmax(0)).sum(0).mean()) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        _progress("clip", step, cfg.clip_steps, loss.item(), start)
    return model.eval()


def _with_partners(anchors: torch.Tensor, partners: list[list[int]], g: torch.Generator) -> torch.Tensor:
    picks = [partners[i][int(torch.randint(0, len(partners[i]), (1,), generator=g))] for i in anchors.tolist()]
    return torch.cat([anchors, torch.tensor(picks, dtype=anchors.dtype)])


def save_clip(model, target: Path, model_cfg: dict = CLIP_CONFIG) -> None:
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    (target / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}, indent=2))
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(target / "open_clip_model.safetensors"))


def train_world_models(world_root: Path, out: Path, cfg: TrainConfig = TrainConfig()) -> dict:
    """Train and save `out/pipeline` (diffusers) and `out/clip` (open_clip local-dir)."""
    from raymem.tiny import assemble_pipeline

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    timings = {}
    pixels, captions = load_world(world_root)
    t0 = time.perf_counter()
    vae, latents = train_vae(pixels, cfg)
    timings["vae_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    unet, text = train_unet(latents, captions, cfg)
    timings["unet_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    clip = train_clip(pixels, captions, cfg)
    timings["clip_seconds"] = time.perf_counter() - t0
    pipe = assemble_pipeline(unet, vae, text)
    pipe.to(torch.float16).save_pretrained(out / "pipeline")  # float16 on disk; scans load float32 on CPU
    save_clip(clip, out / "clip")
    meta = {"config": asdict(cfg), "images": len(captions), **{k: round(v, 1) for k, v in timings.items()}}
    (out / "training.json").write_text(json.dumps(meta, indent=2))
    return meta


def train_presence_clip(
    corpus_root: Path, out: Path, cfg: TrainConfig = TrainConfig(), image_tower: str = "vit"
) -> dict:
    """Train and save `out/clip` on a presence corpus (`presence.jsonl`): the scan's CLIP, independent
    of the generator's captions and images, with the image tower `image_tower` (PRESENCE_TOWERS)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_cfg = PRESENCE_TOWERS[image_tower]
    pixels, captions = load_world(corpus_root, "presence.jsonl")
    t0 = time.perf_counter()
    clip = train_clip(pixels, captions, cfg, model_cfg=model_cfg)
    save_clip(clip, out / "clip", model_cfg)
    meta = {
        "config": asdict(cfg),
        "image_tower": image_tower,
        "images": len(captions),
        "clip_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "training.json").write_text(json.dumps(meta, indent=2))
    return meta
