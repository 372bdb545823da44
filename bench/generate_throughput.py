"""Generation throughput: raymem's generate + embed stage against a bare diffusers loop.

Both sides run the same saved pipeline, the same prompts, seeds, steps, resolution and batch size,
with one `torch.Generator` per image. The bare loop only calls the pipeline; raymem also writes PNGs,
computes CLIP (and SSCD, if configured) embeddings, the noise norm and the unit-store Parquet, through
Ray Data. Printed: images/s of each and their ratio, in one run on one machine.

    python bench/generate_throughput.py --size tiny                          # CPU, seconds
    python bench/generate_throughput.py --size sd15 --resolution 512 --steps 20 --images 64 --batch-size 8

`--size sd15` builds a pipeline with Stable Diffusion 1.5's architecture (860 M-parameter UNet, same
VAE and text encoder shapes) and random weights, so the arithmetic matches SD 1.5 without any
download. raymem's throughput is reported two ways: over the whole stage (actor start and model load
included) and in steady state (from the first finished chunk to the last, the number that matters for
a long nightly scan). `--chunks-at-once 1,2` runs raymem's stage once per value of
`resources.chunks_at_once` against the same bare loop: the overlap of one chunk's CPU work with the
next chunk's sampling, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_sd15_shaped(target: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from raymem.tiny import assemble_pipeline

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    pipe = assemble_pipeline(unet, vae, text)
    pipe.to(torch.float16).save_pretrained(target)
    return target


def bare_loop(model_dir: Path, prompts: list[str], seeds: list[int], args) -> dict:
    import torch
    from diffusers import DiffusionPipeline

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(
        str(model_dir), dtype=dtype, safety_checker=None, local_files_only=True
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - start

    def run(batch_prompts, batch_seeds):
        gens = [torch.Generator("cpu").manual_seed(s) for s in batch_seeds]
        return pipe(
            prompt=batch_prompts,
            generator=gens,
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            height=args.resolution,
            width=args.resolution,
            output_type="np",
        ).images

    run(prompts[: args.batch_size], seeds[: args.batch_size])  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(prompts), args.batch_size):
        run(prompts[i : i + args.batch_size], seeds[i : i + args.batch_size])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"device": str(device), "load_seconds": load, "seconds": seconds, "images_per_s": len(prompts) / seconds}


def scan_inputs(model_dir: Path, work: Path, n_prompts: int, args) -> dict:
    """The scan config every raymem run of this bench shares, its inputs written once: a tiny CLIP, a
    random training table (with SSCD embeddings when a copy detector is on) and the prompt set."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raymem.encoders import l2_normalize
    from raymem.schema import embedding_array
    from raymem.tiny import build_tiny_clip

    clip_dir = work / "clip-tiny"
    if not clip_dir.exists():
        build_tiny_clip(clip_dir)
    train = work / "train"
    train.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    columns = {"train_id": [f"t{i}" for i in range(256)]}
    columns["clip_embedding"] = embedding_array(l2_normalize(rng.standard_normal((256, 64))), 64)
    if args.copy_detection:  # a copy detector needs training embeddings of its own to compare against
        from raymem.config import CopyDetectionConfig
        from raymem.encoders import CopyDetector

        dim = CopyDetector(CopyDetectionConfig(model=args.copy_detection)).dim
        columns["sscd_embedding"] = embedding_array(l2_normalize(rng.standard_normal((256, dim))), dim)
    pq.write_table(pa.table(columns), train / "part-0.parquet")
    prompts_path = work / "prompts.jsonl"
    prompts_path.write_text(
        "".join(
            json.dumps({"prompt_id": f"p{i}", "prompt": f"a photo of object number {i}", "entity": f"object {i}"})
            + "\n"
            for i in range(n_prompts)
        )
    )
    return {
        "name": "bench",
        "model": {"id": str(model_dir), "name": "bench"},
        "prompts": str(prompts_path),
        "generation": {
            "seeds_per_prompt": args.seeds,
            "num_inference_steps": args.steps,
            "guidance_scale": 7.5,
            "height": args.resolution,
            "width": args.resolution,
            "batch_size": args.batch_size,
        },
        "embedding": {
            "clip": {"model": f"local-dir:{clip_dir}", "pretrained": None},
            "copy_detection": {"model": args.copy_detection},
        },
        "training": {"embeddings": str(train)},
        "resources": {"generation_actors": 1, "cpus_per_actor": args.cpus_per_actor},
    }


def raymem_stage(inputs: dict, work: Path, chunks_at_once: int, args) -> dict:
    import pyarrow.parquet as pq
    import ray

    from raymem.config import parse_config
    from raymem.pipeline import run_scan

    out = work / f"out-{int(time.time())}-{chunks_at_once}"
    resources = {**inputs["resources"], "chunks_at_once": chunks_at_once}
    cfg = parse_config({**inputs, "output": {"uri": str(out)}, "resources": resources})
    result = run_scan(cfg)
    gens = pq.read_table(result.tables["generations"]).to_pylist()
    devices = sorted({g["device"] for g in gens})
    stamps = sorted({g["computed_at"].timestamp() for g in gens})  # one stamp per finished chunk
    n = len(gens)
    steady = (n - args.batch_size) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    stage = result.timings["generate"]
    if ray.is_initialized():
        ray.shutdown()
    return {
        "devices": devices,
        "stage_seconds": stage,
        "images_per_s_stage": n / stage,
        "images_per_s_steady": steady,
        "units": n,
        "failed": result.counts["units_failed"],
        "chunks_at_once": chunks_at_once,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--copy-detection", default=None, help="e.g. immaculate:sscd_distilled (default: off)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs reserved per generation actor")
    parser.add_argument(
        "--chunks-at-once",
        default="2",
        help="resources.chunks_at_once values to run raymem's stage with, comma-separated (e.g. 1,2: without and "
        "with one chunk's CPU work beside the next one's sampling, both against the same bare loop)",
    )
    parser.add_argument("--work", default="build/bench-generate")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / f"model-{args.size}"
    if not (model_dir / "model_index.json").exists():
        from raymem.tiny import build_tiny_pipeline

        build_sd15_shaped(model_dir) if args.size == "sd15" else build_tiny_pipeline(model_dir)
    n_prompts = max(1, args.images // args.seeds)
    prompts = [f"a photo of object number {i}" for i in range(n_prompts) for _ in range(args.seeds)]
    seeds = [s for _ in range(n_prompts) for s in range(args.seeds)]
    bare = bare_loop(model_dir, prompts, seeds, args)
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the bare loop's pipeline is gone; give its memory back before raymem runs
    inputs = scan_inputs(model_dir, work, n_prompts, args)
    runs = [raymem_stage(inputs, work, int(c), args) for c in args.chunks_at_once.split(",")]
    for run in runs:
        run["ratio_steady"] = run["images_per_s_steady"] / bare["images_per_s"]
        run["ratio_stage"] = run["images_per_s_stage"] / bare["images_per_s"]
    ours = runs[-1]
    result = {
        "size": args.size,
        "images": len(prompts),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "resolution": args.resolution,
        "copy_detection": args.copy_detection,
        "cpus_per_actor": args.cpus_per_actor,
        "bare": bare,
        "raymem": ours,
        "raymem_runs": runs,  # one per --chunks-at-once value, in order; `raymem` is the last
        "ratio_steady": ours["ratio_steady"],
        "ratio_stage": ours["ratio_stage"],
    }
    print(json.dumps(result, indent=2))
    print(f"bare diffusers loop: {bare['images_per_s']:.2f} images/s on {bare['device']}")
    for run in runs:
        print(
            f"raymem generate+embed, chunks_at_once {run['chunks_at_once']}: {run['images_per_s_steady']:.2f} "
            f"images/s steady, {run['images_per_s_stage']:.2f} over the whole stage (load included) on "
            f"{run['devices']}; ratio raymem/bare: steady {run['ratio_steady']:.2f}x, whole stage "
            f"{run['ratio_stage']:.2f}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
