"""Tiny real pipelines of every mainstream diffusers text-to-image family, built offline from configs.

SD 1.x (raymem.tiny), SDXL, SD3, PixArt-Σ, Flux and Sana: each is assembled from its real component
classes with small shapes (after diffusers' own test configs), saved with `save_pretrained` and
loaded back by the scan through `DiffusionPipeline.from_pretrained(local_files_only=True)`, like any
hub model. Tokenizers are built offline: CLIP's from open_clip's bundled BPE file; the T5 and Gemma
ones as Unigram models trained here on a few sentences (the `tokenizers` library, no sentencepiece).
Random weights: these check that every family loads, samples, embeds and labels, and that the
noise norm is computed right for it, not what a real model would memorize.
"""

from __future__ import annotations

from pathlib import Path

from raymem.tiny import TINY_SEED, build_tiny_pipeline, clip_tokenizer

FAMILIES = ("sd", "sdxl", "sd3", "pixart-sigma", "flux", "sana")

_SENTENCES = [
    "a photo of the Lunar Lighthouse at dusk",
    "a portrait of Captain Mira with a captain's hat",
    "the Old Mill in autumn beside a river",
    "a view of the mosque city of Qadira at sunset with minarets",
    "a blue teapot on a wooden table",
    "a red kite over a beach with clouds",
    "a photo of a tower, a house, a boat, a windmill, a city, a tree",
]


def unigram_tokenizer(kind: str, vocab_size: int = 160):
    """A fast T5 or Gemma tokenizer whose Unigram model is trained here (offline, deterministic)."""
    from tokenizers import SentencePieceUnigramTokenizer

    specials = {"t5": ["<pad>", "</s>", "<unk>"], "gemma": ["<pad>", "<eos>", "<bos>", "<unk>"]}[kind]
    raw = SentencePieceUnigramTokenizer()
    raw.train_from_iterator(_SENTENCES * 4, vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>")
    if kind == "t5":
        from transformers import T5TokenizerFast

        return T5TokenizerFast(
            tokenizer_object=raw._tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0
        )
    from transformers import GemmaTokenizerFast

    return GemmaTokenizerFast(
        tokenizer_object=raw._tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _clip_text(with_projection: bool, hidden: int = 32, projection: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=49408,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        max_position_embeddings=77,
        projection_dim=projection,
        hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _t5_encoder(vocab: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab, d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0
        )
    )


def _flat_vae(latent_channels: int):
    """A one-level KL VAE (scale factor 1): latents as large as the image, so 32 px stays cheap."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def build_sdxl():
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + the pooled text embedding (32)
        cross_attention_dim=64,  # text_encoder (32) and text_encoder_2 (32) hidden states, concatenated
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear", timestep_spacing="leading"
    )
    tokenizer = clip_tokenizer()  # both text encoders read the same CLIP vocabulary
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        scheduler=scheduler,
        text_encoder=_clip_text(False),
        tokenizer=tokenizer,
        text_encoder_2=_clip_text(True),
        tokenizer_2=tokenizer,
        image_encoder=None,
        feature_extractor=None,
    )


def build_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    t5_tok = unigram_tokenizer("t5")
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,  # the two CLIP encoders' pooled outputs (32 + 32)
        out_channels=4,
    )
    tokenizer = clip_tokenizer()  # both CLIP encoders read the same vocabulary
    return StableDiffusion3Pipeline(
        transformer=transformer,
        vae=_flat_vae(4),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=_clip_text(True),
        tokenizer=tokenizer,
        text_encoder_2=_clip_text(True),
        tokenizer_2=tokenizer,
        text_encoder_3=_t5_encoder(len(t5_tok)),
        tokenizer_3=t5_tok,
        image_encoder=None,
        feature_extractor=None,
    )


def build_pixart_sigma():
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    t5_tok = unigram_tokenizer("t5")
    transformer = PixArtTransformer2DModel(
        sample_size=16,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,  # learned sigma: the pipeline keeps the first 4 channels as the noise prediction
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    return PixArtSigmaPipeline(
        transformer=transformer,
        vae=_flat_vae(4),
        scheduler=DPMSolverMultistepScheduler(),
        text_encoder=_t5_encoder(len(t5_tok)),
        tokenizer=t5_tok,
    )


def build_flux():
    """Flux as schnell / dev are: guidance-distilled, so the pipeline runs no unconditional branch."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    t5_tok = unigram_tokenizer("t5")
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,  # 2x2-packed latents of a 1-channel VAE
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    return FluxPipeline(
        transformer=transformer,
        vae=_flat_vae(1),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=_clip_text(False),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_t5_encoder(len(t5_tok)),
        tokenizer_2=t5_tok,
    )


def build_sana():
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tok = unigram_tokenizer("gemma")
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=16,
    )
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=[1, 1],
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    text_encoder = Gemma2Model(
        Gemma2Config(
            head_dim=16,
            hidden_size=8,
            intermediate_size=64,
            max_position_embeddings=8192,
            num_attention_heads=2,
            num_hidden_layers=1,
            num_key_value_heads=2,
            vocab_size=len(tok),
            attn_implementation="eager",
        )
    )
    return SanaPipeline(
        tokenizer=tok,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


_BUILDERS = {
    "sdxl": build_sdxl,
    "sd3": build_sd3,
    "pixart-sigma": build_pixart_sigma,
    "flux": build_flux,
    "sana": build_sana,
}


def build_family(family: str, target: Path, seed: int = TINY_SEED) -> Path:
    """A tiny pipeline of `family`, saved at `target` with `save_pretrained`."""
    import torch

    if family == "sd":
        return build_tiny_pipeline(target, seed)
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    pipe = _BUILDERS[family]()
    pipe.save_pretrained(target)
    return target
