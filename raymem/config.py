"""Typed scan configuration, loaded from YAML.

Every field is validated on load; unknown keys are errors, so a typo never silently falls back to a
default. Local paths are made absolute against the current directory at load time, because Ray
workers do not share the driver's working directory.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from raymem.errors import ConfigError
from raymem.uri import is_remote


class _Strict(BaseModel):
    # Strict types: `true` is not an integer, "1" is not a number; unknown keys are errors.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


COSINE = {"ge": -1.0, "le": 1.0}  # similarities are cosines
SHARE = {"ge": 0.0, "le": 1.0}  # probabilities and shares of seeds / tiles


class ModelConfig(_Strict):
    id: str = Field(description="diffusers pipeline: hub id, local directory, or s3:// prefix of a saved pipeline")
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
        description="short name used as the `model=` partition; default: derived from `id`",
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    variant: str | None = Field(None, description="weights variant, e.g. 'fp16'")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: float16 on GPU, float32 on CPU"
    )
    scheduler: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9]+Scheduler$",
        description="a diffusers scheduler class to sample with, built from the pipeline's own scheduler config "
        "(e.g. EulerDiscreteScheduler, DPMSolverMultistepScheduler); default: the pipeline's",
    )
    offload: Literal["none", "model", "sequential"] = Field(
        "none",
        description="large models on one GPU: 'model' keeps each component on the GPU only while it runs, "
        "'sequential' each layer (slowest, least memory); ignored on CPU",
    )


class GenerationConfig(_Strict):
    seeds_per_prompt: int = Field(4, ge=1, le=10_000)
    seed_base: int = Field(0, ge=0, description="seeds are seed_base, seed_base+1, ...")
    num_inference_steps: int = Field(25, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0.0, le=100.0)
    height: int = Field(512, ge=8, le=4096)
    width: int = Field(512, ge=8, le=4096)
    negative_prompt: str = ""
    batch_size: int = Field(4, ge=1, le=512, description="prompt x seed units per pipeline call")
    noise_norm_steps: int = Field(
        1, ge=1, description="average Wen et al.'s text-noise norm over this many first steps"
    )

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8, got {v}")
        return v


class ClipConfig(_Strict):
    model: str = Field(
        "ViT-B-32", description="open_clip model name, 'hf-hub:org/repo', 'local-dir:/path' or s3:// prefix"
    )
    pretrained: str | None = Field(
        "laion2b_s34b_b79k", description="open_clip pretrained tag or checkpoint file (local or s3://)"
    )


class CandidatesConfig(_Strict):
    """Two-stage copy detection for training sets with CLIP embeddings only (LAION): the top-`k` CLIP
    neighbours of every generation are fetched by `image_uri`, embedded with the copy detector and
    compared in its space (raymem.copy_candidates)."""

    k: int = Field(50, ge=1, le=1000, description="CLIP neighbours per generation fetched and SSCD-embedded")
    background_sample: int = Field(
        64, ge=0, le=10_000, description="training images whose own candidates give the SSCD train-train background"
    )
    timeout_s: float = Field(10.0, gt=0, le=600, description="per request: connect, each read and the whole body")
    retries: int = Field(2, ge=0, le=10, description="retries after the first attempt (429, 5xx, timeouts, refused)")
    backoff_s: float = Field(0.5, ge=0, le=60, description="first retry's wait, doubling after (with jitter)")
    max_bytes: int = Field(25_000_000, ge=1024, description="larger images are not fetched (status too_large)")
    max_pixels: int = Field(100_000_000, ge=1024, description="larger decoded images are refused (too_large)")
    per_host: int = Field(8, ge=1, le=1024, description="concurrent requests per host in each fetching actor")
    threads: int = Field(32, ge=1, le=1024, description="concurrent fetches per fetching actor")
    actors: int = Field(1, ge=1, description="fetch + embed actors (each holds one copy detector)")
    batch_size: int = Field(256, ge=1, description="URIs per actor call")
    cache: bool = Field(True, description="reuse candidate embeddings across scans of the same output root")


class CopyDetectionConfig(_Strict):
    model: str | None = Field(
        "immaculate:sscd",
        description="'immaculate:sscd', 'immaculate:sscd_distilled', an .onnx file, a TorchScript .pt file "
        "(local or s3://), or null to disable",
    )
    image_size: int = Field(288, ge=32, le=1024, description="shorter side the image is resized to")
    candidates: CandidatesConfig = Field(
        CandidatesConfig(),
        description="two-stage copy detection, used when the training table has no sscd_embedding column",
    )


class EmbeddingConfig(_Strict):
    clip: ClipConfig = ClipConfig()
    copy_detection: CopyDetectionConfig = CopyDetectionConfig()


class TrainingConfig(_Strict):
    embeddings: str = Field(description="Parquet file or directory (local or s3://) of training embeddings")


class JoinConfig(_Strict):
    k: int = Field(
        20, ge=2, le=1000, description="neighbours kept per generated image and space (must exceed eidetic_k)"
    )
    batch_rows: int | None = Field(
        None, ge=1, description="training rows per scoring batch; null: the blocks as read (no re-batching copy)"
    )
    mode: Literal["exact", "faiss"] = Field(
        "exact", description="exact streaming top-k, or the FAISS IVF indexes built by `raymem index --faiss`"
    )
    nprobe: int = Field(16, ge=1, description="IVF lists searched per query in faiss mode")
    first_pass: Literal["auto", "none", "bfloat16"] = Field(
        "auto",
        description="CPU exact mode: bfloat16 scores every row and float32 re-scores those within the "
        "bfloat16 error bound of a top-k (the same exact top-k); auto: bfloat16 for joins of at least 1e12 "
        "multiply-adds on CPUs that multiply bfloat16 in hardware (AVX512_BF16, AMX), none otherwise",
    )
    skip_bad_files: bool = Field(
        False, description="skip unreadable training Parquet files (listed in the manifest) instead of failing"
    )


class ThresholdsConfig(_Strict):
    replication: float = Field(
        0.5, **COSINE, description="SSCD cosine at or above which a neighbour is a copy (Somepalli)"
    )
    verbatim: float = Field(0.75, **COSINE, description="SSCD cosine for a verbatim copy (SSCD README, 90% precision)")
    eidetic_k: int = Field(
        10,
        ge=1,
        description="MU needs at most this many distinct training images (near-duplicate groups) above `replication`",
    )
    near_duplicate: float = Field(
        0.75,
        **COSINE,
        description="SSCD cosine at which two training images are near-duplicates of one image (SSCD's "
        "90 %-precision copy threshold): they count once in the breadth, together in the duplication",
    )
    consistency: float = Field(0.5, **SHARE, description="share of seeds in one near-duplicate cluster")
    cluster_similarity: float = Field(0.5, **COSINE, description="SSCD cosine linking two generations of a prompt")
    element_presence: float = Field(0.5, **SHARE, description="zero-shot probability an element is shown")
    clip_floor: float = Field(
        0.28,
        **COSINE,
        description="CLIP prompt score below which the entity counts as not rendered, when the prompt set "
        "gives no class noun (LAION's ViT-B/32 filter; recalibrate for other CLIP models)",
    )
    null_alpha: float = Field(
        0.05,
        gt=0,
        le=0.5,
        description="one-sided level of the small-sample tests against the prompt's null images (raymem.stats): "
        "an unprompted element goes beyond what the class noun alone gives (and, unless entity_alpha is set, "
        "the entity is rendered) when p <= null_alpha (Benjamini-Hochberg across the elements tested together)",
    )
    entity_alpha: float | None = Field(
        None,
        gt=0,
        le=0.5,
        description="level of the entity-rendered test alone (ME); null: null_alpha. Its own value so that "
        "`raymem calibrate`, fitting it on the pilot's ME images, leaves the implied-element tests (MI) at theirs",
    )
    pixel_l2: float = Field(0.15, gt=0, le=1, description="Carlini's tiled l2 (max over tiles) for a pixel-level copy")
    template_tiles: float = Field(
        0.5, gt=0, le=1, description="share of tiles within pixel_l2 for a template copy (Webster's TV)"
    )
    region_l2: float = Field(
        0.1, gt=0, le=1, description="tile l2 at or below which a textured tile is copied (region-level copies)"
    )
    region_texture: float = Field(
        0.1,
        ge=0,
        le=1,
        description="spatial pixel std (within each channel, pooled over the three) both tiles need for a tile "
        "to count as copied: flat tiles (sky, plain walls, a saturated colour) match without copying; "
        "independent tiles of this std are ~1.41x it apart",
    )
    region_duplicate_l2: float = Field(
        0.025,
        ge=0,
        le=1,
        description="tile l2 at or below which two *training* tiles are one patch duplicated in the training "
        "set (a watermark pasted into many images, a reused backdrop, a re-encoded copy; at the texture floor "
        "a correlation >= 0.97): left out of the region background, which measures what distinct content "
        "shares (with such twins in the sample its p99 is a twin's share and no region copy exceeds it); "
        "below region_l2; 0 leaves nothing out",
    )
    region_tiles: int = Field(2, ge=1, description="copied tiles that make a region copy (MU subtype region)")
    region_breadth: int = Field(
        1,
        ge=1,
        description="distinct regions matching a scan image at most, for a region copy: compared training "
        "images that would each be one (copies of one patch, such as a shared watermark, count once); more "
        "is a look the world has, not one training image's content",
    )
    min_lift: float = Field(2.0, ge=1, description="lift P(a|e)/P(a) in training captions for an implied element")
    min_support: int = Field(50, ge=1, description="training images of e mentioning a, for an implied element")
    instance_support: int = Field(
        10,
        ge=2,
        description="an unprompted element seen with fewer images of e (and never without e) is "
        "instance-specific: shown, it is MU",
    )
    mi_needs_entity: bool = Field(
        False,
        description="count an implied element (MI) only on a prompt whose entity the model renders in at least "
        "half of its images: MI far more specific, at a cost in recall (docs/labeler.md, 'MI needs the entity')",
    )
    clip_replication: float | None = Field(
        None,
        **COSINE,
        description="CLIP image-image cosine for a copy when copy detection is off; there is no published "
        "value: fit it with `raymem calibrate` (null: replication is not tested without a copy detector)",
    )
    noise_norm: float | None = Field(
        None,
        ge=0,
        description="Wen et al.'s text-noise norm above which a prompt is memorized; model-specific, "
        "calibrate it on prompts known not to be memorized (null: not used)",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "null_z" in data:
            raise ValueError(
                "null_z was replaced by null_alpha (a p-value level of small-sample t-tests; 0.05 is the old "
                "one-sided 95 %)"
            )
        return data

    @model_validator(mode="after")
    def _ordered(self) -> ThresholdsConfig:
        if self.verbatim < self.replication:
            raise ValueError(f"verbatim ({self.verbatim}) must be >= replication ({self.replication})")
        if self.region_duplicate_l2 >= self.region_l2:
            raise ValueError(f"region_duplicate_l2 ({self.region_duplicate_l2}) must be < region_l2 ({self.region_l2})")
        return self

    @property
    def entity_level(self) -> float:
        """The entity-rendered test's level: `entity_alpha`, else `null_alpha`."""
        return self.null_alpha if self.entity_alpha is None else self.entity_alpha


# Readable pixel-background pairs below which their 5th percentile is not read (raymem.pixels.background_p5):
# with fewer than 20 values the "5th percentile" is the single closest pair, one outlier away from anything.
MIN_PIXEL_BACKGROUND = 20


class SignalsConfig(_Strict):
    null_seeds: int = Field(
        4,
        ge=0,
        le=1000,
        description="images per prompt of its null (entity replaced by entity_class), the "
        "distribution entity and element presence are calibrated against; 0 disables the calibration",
    )
    mine_elements: bool = Field(True, description="mine implied/instance elements from training captions")
    mined_per_entity: int = Field(5, ge=0, le=50, description="mined elements kept per entity and kind")
    implied_controls: int = Field(
        4,
        ge=0,
        le=50,
        description="per prompt with a class noun, implied elements of other entities of the scan tested "
        "as MI would test them and never labelled: the MI rule's false-positive rate measured on this model "
        "and CLIP (manifest counts.implied_controls); 0 disables",
    )
    placebo_names: bool = Field(
        True,
        description="probe nineteen made-up names beside every entity with a class noun: an entity judged by "
        "its text probe (no tagged training images) must move its images more than each of them "
        "(docs/labeler.md, 'Placebo names'); off: the text probe alone decides",
    )
    pixel_size: int = Field(256, ge=16, le=2048, description="side images are resized to for tiled l2")
    pixel_tiles: int = Field(4, ge=1, le=32, description="tiles per side for tiled l2")
    pixel_background: int = Field(
        200,
        ge=0,
        le=10_000,
        description="sampled training images compared pixel by pixel with their nearest other training "
        "image (copy space), read only when some scan image is pixel-checked: a pixel confirmation must "
        f"come closer than their 5th percentile; 0 disables the background (every confirmation counts), "
        f"else at least {MIN_PIXEL_BACKGROUND}",
    )

    @field_validator("pixel_background")
    @classmethod
    def _readable_percentile(cls, v: int) -> int:
        if 0 < v < MIN_PIXEL_BACKGROUND:
            raise ValueError(
                f"must be 0 (off) or at least {MIN_PIXEL_BACKGROUND}: a 5th percentile of fewer pairs is one "
                f"outlier, got {v}"
            )
        return v

    region_neighbours: int = Field(
        0,
        ge=0,
        le=100,
        description="training images per scan image (top in the copy space and in CLIP space) compared "
        "region by region, whatever their global score (3 is a good start): region copies, duplicated "
        "patches (watermarks, logos) and private marks on requested works; 0, the default, switches them "
        "off -- each compared training image is fetched once per scan, and they are measured on planted "
        "worlds only (docs/planted.md)",
    )
    region_grid: int = Field(8, ge=2, le=64, description="tiles per side for region-level copy detection")
    work_copies: int = Field(
        32,
        ge=0,
        le=1_000,
        description="with region detection on: training images of a requested work (prompts with "
        "requests_work; a deterministic sample of the images tagged with the entity) compared region by "
        "region with every image of the prompt, so that content only some copies of the work carry (a "
        "private mark) is not taken for the work; 0 switches the private-mark check off",
    )
    region_background: int = Field(
        400,
        ge=0,
        le=10_000,
        description="sampled training images compared region by region with their own nearest training "
        "images: what distinct training images share at the same position, which a region copy must exceed",
    )


class OutputConfig(_Strict):
    uri: str = Field(description="output root, local directory or s3:// prefix")
    scan_date: dt.date | None = Field(None, strict=False, description="partition date; default: today (UTC)")


class ActorRange(NamedTuple):
    """How many actors a stage may run: a fixed count (`4`) or an autoscaling pool (`1..8`)."""

    min: int
    max: int

    def __str__(self) -> str:
        return str(self.min) if self.min == self.max else f"{self.min}..{self.max}"


def _actor_range(value: Any) -> Any:
    if value is None or isinstance(value, ActorRange):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+)\s*(?:\.\.\s*(\d+)\s*)?", value)):
        low, high = int(m.group(1)), int(m.group(2) or m.group(1))
    else:
        raise ValueError(f"expected a count (4) or a range min..max (1..8), got {value!r}")
    if low < 1 or high < low:
        raise ValueError(f"actors must be >= 1 and min <= max, got {value!r}")
    return ActorRange(low, high)


# A count or "min..max" in YAML; written back the same way (manifest, `raymem validate`).
ActorCount = Annotated[ActorRange, BeforeValidator(_actor_range), PlainSerializer(str, return_type=str)]


class ResourcesConfig(_Strict):
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto",
        description="auto: GPUs when the cluster has them or its autoscaler adds one within gpu_wait_s, else CPU "
        "(said in the log and the manifest); cuda: GPUs or a one-line error; cpu: never ask for a GPU",
    )
    gpu_wait_s: float = Field(
        600.0,
        ge=0,
        description="on a Ray cluster joined by address with no GPU up yet: how long to wait for the autoscaler "
        "to add one before `auto` falls back to CPU (`cuda` fails)",
    )
    generation_actors: ActorCount | None = Field(
        None,
        description="a count or min..max (an autoscaling pool: GPU actors beyond the GPUs up now make the "
        "autoscaler add nodes); default: one per GPU up now (at least one), or 1 on CPU",
    )
    gpus_per_actor: float = Field(1.0, gt=0, le=8)
    cpus_per_actor: float = Field(1.0, gt=0)
    chunks_at_once: int = Field(
        2,
        ge=1,
        le=4,
        description="work chunks a generation actor handles at once, in threads: one is sampled while the others' "
        "PNGs, CLIP/SSCD preprocessing and writes run (the models are used by one at a time); 1: one after another",
    )
    join_actors: ActorCount = Field(
        ActorRange(1, 1), description="a count or min..max: CPU join tasks at a time, or GPU actors (one GPU each)"
    )


class RayConfig(_Strict):
    address: str | None = Field(
        None, description="Ray address; default: RAY_ADDRESS if set, else a local Ray started by the scan"
    )
    runtime_env: dict[str, Any] = Field(default_factory=dict)


class ScanConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    model: ModelConfig
    prompts: str = Field(description="prompt set: .parquet, .jsonl or .csv (local or s3://)")
    generation: GenerationConfig = GenerationConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    training: TrainingConfig
    join: JoinConfig = JoinConfig()
    thresholds: ThresholdsConfig = ThresholdsConfig()
    signals: SignalsConfig = SignalsConfig()
    output: OutputConfig
    resources: ResourcesConfig = ResourcesConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _breadth_observable(self) -> ScanConfig:
        # MU needs at most eidetic_k training images above the threshold; with only that many neighbours
        # kept, a k above it could never be seen and every common look would pass as one copied image.
        if self.join.k <= self.thresholds.eidetic_k:
            raise ValueError(
                f"join.k ({self.join.k}) must be greater than thresholds.eidetic_k ({self.thresholds.eidetic_k}): "
                "otherwise more training images above the replication threshold than eidetic_k cannot be observed"
            )
        return self

    def config_hash(self) -> str:
        """Stable hash of everything that defines the scan's results."""
        payload = self.model_dump(mode="json", exclude={"ray": True, "resources": True, "output": {"scan_date"}})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    @property
    def model_name(self) -> str:
        if self.model.name:
            return self.model.name
        tail = self.model.id.rstrip("/")
        if uris_is_local_path(tail):
            tail = Path(tail).name
        elif tail.startswith("s3://"):
            tail = tail.rsplit("/", 1)[-1]
        return re.sub(r"[^A-Za-z0-9_.-]+", "--", tail).strip("-.") or "model"

    @property
    def scan_date(self) -> dt.date:
        if self.output.scan_date is None:
            raise ConfigError("output.scan_date is not resolved: load configs with parse_config / load_config")
        return self.output.scan_date


def uris_is_local_path(value: str) -> bool:
    return value.startswith("/")


class IndexInputConfig(_Strict):
    kind: Literal["folder", "table", "webdataset"] = Field(
        description="folder: images (+ same-name .txt captions) below `path`; table: Parquet/JSONL/CSV of image "
        "paths or URIs with captions; webdataset: .tar shards below `path`"
    )
    path: str = Field(description="the folder, table file or shard directory (local or s3://)")
    image_column: str = Field("image", description="table: column with the image path (relative to the table) or URI")
    caption_column: str = Field("caption", description="table: caption column")
    id_column: str | None = Field(None, description="table: id column (default: the image path)")


class FaissConfig(_Strict):
    enabled: bool = Field(False, description="build one IVF index per shard and space (`raymem index --faiss`)")
    nlist: int | None = Field(None, ge=1, description="IVF lists per shard; default about 4*sqrt(rows)")
    recall_queries: int = Field(200, ge=1, description="training rows used to measure recall@k against exact")
    recall_k: int = Field(10, ge=1)
    nprobe: int = Field(16, ge=1, description="nprobe used for the recall measurement")


class IndexResourcesConfig(_Strict):
    actors: int | None = Field(None, ge=1, description="default: one per GPU, or 1 on a CPU-only cluster")
    gpus_per_actor: float = Field(1.0, gt=0, le=8)
    cpus_per_actor: float = Field(1.0, gt=0)


class IndexConfig(_Strict):
    """`raymem index`: embed a training set into raymem's training-embeddings Parquet."""

    input: IndexInputConfig
    output: str = Field(description="directory (local or s3://) for part-NNNNN.parquet shards and _index.json")
    embedding: EmbeddingConfig = EmbeddingConfig()
    entities: list[str] | str | None = Field(
        None, description="entity names to tag in captions: a list, or a file with one name per line"
    )
    shard_size: int = Field(10_000, ge=1, description="images per output shard (folder and table inputs)")
    batch_size: int = Field(64, ge=1, description="images per embedding batch")
    background_sample: int = Field(1000, ge=0, description="training rows for the train-train background")
    embedding_storage: Literal["list", "packed", "packed-float16"] = Field(
        "list",
        description="list: fixed_size_list<float32> (every Parquet reader decodes it); packed: float32 bytes "
        "per row, read without a decode pass (docs/join.md); packed-float16: half the bytes, scores from "
        "float16-rounded embeddings",
    )
    faiss: FaissConfig = FaissConfig()
    resources: IndexResourcesConfig = IndexResourcesConfig()
    ray: RayConfig = RayConfig()


def load_index_config(path: str | os.PathLike[str]) -> IndexConfig:
    raw = _load_yaml(Path(path))
    source = str(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a YAML mapping, got {type(raw).__name__}")
    raw = json.loads(json.dumps(raw, default=str))
    for keys in (("input", "path"), ("output",)):
        node = raw
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            node[keys[-1]] = _absolutize(node[keys[-1]])
    if isinstance(raw.get("entities"), str):
        raw["entities"] = _absolutize(raw["entities"])
    raw = _resolve_embedding_paths(raw)
    try:
        return IndexConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None


def _absolutize(value: str) -> str:
    """Local paths become absolute; URIs, hub ids and schema-prefixed names pass through."""
    if is_remote(value):
        return value
    for prefix in ("local-dir:", "clip-retrieval:"):  # a layout prefix wraps a path: resolve the path
        if value.startswith(prefix):
            return prefix + _absolutize(value[len(prefix) :])
    return str(Path(value).expanduser().absolute())


def _looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or os.path.exists(value)


def _resolve_paths(raw: dict[str, Any]) -> dict[str, Any]:
    """Make local paths absolute in the fields that hold paths."""
    raw = json.loads(json.dumps(raw, default=str))  # deep copy, plain types
    for keys in (("prompts",), ("training", "embeddings"), ("output", "uri")):
        node = raw
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            node[keys[-1]] = _absolutize(node[keys[-1]])
    # Model ids may be hub ids ("org/name"): only rewrite what exists or is written as a path.
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("id"), str) and _looks_local(model["id"]):
        model["id"] = _absolutize(model["id"])
    return _resolve_embedding_paths(raw)


def _resolve_embedding_paths(raw: dict[str, Any]) -> dict[str, Any]:
    emb = raw.get("embedding") if isinstance(raw.get("embedding"), dict) else {}
    clip = emb.get("clip") if isinstance(emb.get("clip"), dict) else {}
    for key in ("model", "pretrained"):
        val = clip.get(key)
        if isinstance(val, str) and (val.startswith("local-dir:") or _looks_local(val)):
            clip[key] = _absolutize(val)
    cd = emb.get("copy_detection") if isinstance(emb.get("copy_detection"), dict) else {}
    val = cd.get("model")
    if isinstance(val, str) and not val.startswith("immaculate:") and _looks_local(val):
        cd["model"] = _absolutize(val)
    return raw


def format_validation_error(source: str, err: ValidationError) -> str:
    """One line: the first problem with its dotted field path, and how many more there are."""
    errors = err.errors()
    first = errors[0]
    field = ".".join(str(p) for p in first["loc"]) or "(root)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    elif first["type"] == "missing":
        msg = "required field is missing"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source}: {field}: {msg}{more}"


def parse_config(raw: Any, source: str = "<config>", today: dt.date | None = None) -> ScanConfig:
    """A validated scan config. The partition date is resolved here, once: `output.scan_date` if set,
    else `today` (default: the UTC date now), so a scan that crosses midnight stays one scan."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a YAML mapping, got {type(raw).__name__}")
    try:
        cfg = ScanConfig.model_validate(_resolve_paths(raw))
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None
    if cfg.output.scan_date is None:
        day = today or dt.datetime.now(dt.UTC).date()
        cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"scan_date": day})})
    return cfg


def load_config(path: str | os.PathLike[str]) -> ScanConfig:
    path = Path(path)
    return parse_config(_load_yaml(path), str(path))


def _load_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    return raw
