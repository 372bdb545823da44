"""Arrow schemas of every table that crosses a stage boundary or is published.

Embeddings are plain `fixed_size_list<float32>[d]` columns (not Ray's tensor extension type) so DuckDB,
pyarrow, pandas and Spark read them without Ray installed. Training tables may instead hold them
*packed* (`raymem index` with `embedding_storage: packed | packed-float16`): each row's floats as one
fixed-size binary value, which Parquet stores without the per-float repetition and definition levels a
list needs, so the join hands the pages to the matrix product without a decode pass (docs/join.md).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

# Unit status values: every prompt x seed unit ends in exactly one of these.
STATUS_OK = "ok"
STATUS_FAILED = "failed"

# Unit roles: a scan image of a prompt, or an image of its null prompt (entity -> class noun).
ROLE_SCAN = "scan"
ROLE_NULL = "null"

# Labels, in precedence order (MU > MI > ME > none).
LABELS = ("MU", "MI", "ME", "none")

# Embedding spaces and the column that holds each, in generations and training tables alike.
SPACE_COLUMNS = {"clip": "clip_embedding", "sscd": "sscd_embedding"}
# Training-table metadata carried along with every neighbour.
META_COLUMNS = ("caption", "image_uri", "entities", "image_hash")

# Every table a scan publishes, in the order they are produced. Everything the labeler decided on is
# among them (prompts, texts, neighbors, entities, background, pixel_checks), so any later process can
# rebuild its inputs exactly (raymem.label_inputs) -- `raymem calibrate` does.
PUBLISHED_TABLES = (
    "prompts",
    "generations",
    "texts",
    "neighbors",
    "candidates",
    "entities",
    "background",
    "pixel_checks",
    "region_checks",
    "labels",
    "prompt_tallies",
    "entity_tallies",
)


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


# How `raymem index` may store a training table's embeddings: the dtype of each packed layout.
EMBEDDING_STORAGES = {"list": None, "packed": "float32", "packed-float16": "float16"}


class PackedEmbeddingType(pa.ExtensionType):
    """`dim` little-endian floats (float32 or float16) per row in one fixed-size binary value.

    An Arrow extension type, so the dtype and dimension travel in the Parquet file's Arrow schema; a
    reader without raymem sees the storage type (a fixed-size binary: `np.frombuffer(value, "<f4")`)."""

    def __init__(self, dim: int, dtype: str = "float32"):
        if dtype not in EMBEDDING_STORAGES.values() or dtype is None:
            raise ValueError(f"packed embeddings are float32 or float16, not {dtype}")
        self.dim, self.dtype = int(dim), dtype
        super().__init__(pa.binary(self.dim * np.dtype(dtype).itemsize), "raymem.embedding")

    def __arrow_ext_serialize__(self) -> bytes:
        return json.dumps({"dim": self.dim, "dtype": self.dtype}).encode()

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type, serialized):
        meta = json.loads(serialized.decode())
        return cls(meta["dim"], meta["dtype"])


try:  # once per process; readers of Parquet files then get the type back instead of the raw binary
    pa.register_extension_type(PackedEmbeddingType(1))
except pa.ArrowKeyError:
    pass


def is_embedding_type(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(t) or isinstance(t, PackedEmbeddingType)


def embedding_dim(t: pa.DataType) -> int:
    return t.dim if isinstance(t, PackedEmbeddingType) else t.list_size


def stored_embedding_array(matrix: np.ndarray, dim: int, storage: str = "list") -> pa.Array:
    """(n, dim) matrix -> a training table's embedding column in `storage` (EMBEDDING_STORAGES)."""
    dtype = EMBEDDING_STORAGES[storage]
    if dtype is None:
        return embedding_array(matrix, dim)
    packed = np.ascontiguousarray(np.asarray(matrix).reshape(-1, dim), dtype=np.dtype(dtype).newbyteorder("<"))
    kind = PackedEmbeddingType(dim, dtype)
    values = pa.FixedSizeBinaryArray.from_buffers(kind.storage_type, len(packed), [None, pa.py_buffer(packed)])
    return pa.ExtensionArray.from_storage(kind, values)


def _unpacked(chunk: pa.ExtensionArray) -> np.ndarray:
    kind, storage = chunk.type, chunk.storage
    width = kind.storage_type.byte_width
    # zero copy: the binary values buffer, from the chunk's offset (a slice shares its parent's buffer)
    raw = np.frombuffer(storage.buffers()[1], dtype=np.uint8, count=len(storage) * width, offset=storage.offset * width)
    return raw.view(np.dtype(kind.dtype).newbyteorder("<")).reshape(-1, kind.dim)


def embedding_array(matrix: np.ndarray | None, dim: int, valid: np.ndarray | None = None) -> pa.Array:
    """(n, dim) float32 matrix -> fixed_size_list array; rows where `valid` is False become null."""
    if matrix is None:
        raise ValueError("embedding matrix is required")
    matrix = np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1, dim)
    values = pa.array(matrix.reshape(-1), type=pa.float32())
    mask = None if valid is None else pa.array(~np.asarray(valid, dtype=bool))
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=mask)


def embedding_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """fixed_size_list, list<float> or packed column -> (n, d) float32 matrix without per-row Python work."""
    if isinstance(column, pa.ChunkedArray):
        if isinstance(column.type, PackedEmbeddingType) and column.num_chunks > 1:
            # one chunk per row group: join the matrices, not the binary chunks (one copy instead of two)
            return np.concatenate([embedding_matrix(c) for c in column.chunks])
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if column.null_count:
        raise ValueError(f"{column.null_count} embedding(s) are null")
    if isinstance(column.type, PackedEmbeddingType):
        return _unpacked(column).astype(np.float32, copy=False)
    if pa.types.is_fixed_size_binary(column.type):
        raise TypeError(
            f"a {column.type} column without raymem's packed-embedding type: its dtype is unknown "
            "(write it with raymem index's embedding_storage, or as fixed_size_list<float32>)"
        )
    if pa.types.is_fixed_size_list(column.type):
        dim = column.type.list_size
        # flatten() honours the array's offset *and* length (a slice keeps its parent's full .values)
        return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = column.value_lengths().to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths.min() != lengths.max()):
            raise ValueError("embeddings have different lengths")
        dim = int(lengths[0]) if len(lengths) else 0
        return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    raise TypeError(f"not an embedding column: {column.type}")


PROMPTS = pa.schema(
    [
        ("scan_id", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("entity", pa.string()),
        ("entity_class", pa.string()),
        ("explicit_elements", pa.list_(pa.string())),
        ("implicit_elements", pa.list_(pa.string())),
        ("requests_work", pa.bool_()),  # the prompt asks for this specific work: a copy of it was expected
    ]
)


def generations_schema(clip_dim: int, sscd_dim: int | None) -> pa.Schema:
    fields = [
        ("scan_id", pa.string()),
        ("model_id", pa.string()),
        ("unit_id", pa.string()),
        ("prompt_id", pa.string()),
        ("parent_prompt_id", pa.string()),
        ("role", pa.string()),  # scan | null
        ("prompt", pa.string()),
        ("entity", pa.string()),
        ("seed", pa.int64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("image_uri", pa.string()),
        ("clip_embedding", embedding_type(clip_dim)),
        ("sscd_embedding", embedding_type(sscd_dim) if sscd_dim else pa.null()),
        ("clip_prompt_score", pa.float32()),
        ("noise_norm", pa.float32()),
        ("noise_norm_negative", pa.float32()),  # with a negative prompt: ||eps(p) - eps(negative)||
        ("device", pa.string()),
        ("worker", pa.string()),
        ("cuda_visible_devices", pa.string()),
        ("generate_seconds", pa.float32()),
        ("embed_seconds", pa.float32()),
        ("computed_at", pa.timestamp("us", tz="UTC")),
    ]
    return pa.schema(fields)


def texts_schema(clip_dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("scan_id", pa.string()),
            ("prompt_id", pa.string()),
            ("kind", pa.string()),
            ("element", pa.string()),
            ("text", pa.string()),
            ("clip_embedding", embedding_type(clip_dim)),
        ]
    )


def TEXT_CACHE(dim: int) -> pa.Schema:  # noqa: N802 - reads like the other schema constants
    """Probe-text embeddings cached per CLIP model, shared by every scan under one output root."""
    return pa.schema(
        [("text", pa.string()), ("clip_embedding", embedding_type(dim)), ("computed_at", pa.timestamp("us", tz="UTC"))]
    )


def CANDIDATE_CACHE(dim: int) -> pa.Schema:  # noqa: N802 - reads like the other schema constants
    """SSCD embeddings of fetched training images, per copy detector, shared by every scan under one
    output root (raymem.copy_candidates): keyed by the sha256 of the URI."""
    return pa.schema(
        [
            ("uri_key", pa.string()),
            ("content_sha256", pa.string()),
            ("sscd_embedding", embedding_type(dim)),
            ("computed_at", pa.timestamp("us", tz="UTC")),
        ]
    )


def FETCH_OUTCOMES(dim: int) -> pa.Schema:  # noqa: N802 - reads like the other schema constants
    """What the fetch + embed stage returns per URI (raymem.copy_candidates.FetchEmbed)."""
    return pa.schema(
        [
            ("uri_key", pa.string()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("http_status", pa.int32()),
            ("content_sha256", pa.string()),
            ("attempts", pa.int32()),
            ("seconds", pa.float32()),
            ("sscd_embedding", embedding_type(dim)),
        ]
    )


ASSOCIATION = pa.struct(
    [
        ("element", pa.string()),
        ("support", pa.int64()),  # training images tagged with the entity whose caption has the element
        ("frequency", pa.int64()),  # training captions with the element at all
        ("lift", pa.float64()),
    ]
)


def entities_schema(clip_dim: int) -> pa.Schema:
    """What the training set says about each scanned entity: the labeler's reference for it."""
    return pa.schema(
        [
            ("scan_id", pa.string()),
            ("entity", pa.string()),
            ("train_frequency", pa.int64()),  # null: the training table has no entity tags
            ("clip_centroid", embedding_type(clip_dim)),  # normalised mean of its training images' CLIP
            ("mined", pa.bool_()),  # elements were mined from its training captions
            ("n_tagged", pa.int64()),  # mining: captions tagged with the entity
            ("n_captions", pa.int64()),  # mining: captions in the training table
            ("implied", pa.list_(ASSOCIATION)),
            ("instance", pa.list_(ASSOCIATION)),
            # requested works: the sample of its training images a private mark is measured against
            ("work_copies", pa.list_(pa.struct([("train_id", pa.string()), ("image_uri", pa.string())]))),
        ]
    )


BACKGROUND = pa.schema(
    [
        ("scan_id", pa.string()),
        ("space", pa.string()),
        # index (precomputed by `raymem index`) | scan (sampled by the scan) | candidates (SSCD over
        # fetched CLIP candidates, raymem.copy_candidates)
        ("source", pa.string()),
        ("n", pa.int64()),
        ("p50", pa.float64()),
        ("p75", pa.float64()),
        ("p90", pa.float64()),
        ("p95", pa.float64()),
        ("p99", pa.float64()),
        # share of sampled images whose near-duplicates were passed over for their nearest distinct image
        ("near_duplicated", pa.float64()),
    ]
)

PIXEL_CHECKS = pa.schema(
    [
        ("scan_id", pa.string()),
        ("query_set", pa.string()),  # units: a scan image | background: a sampled training image
        ("unit_id", pa.string()),  # the scan image, or the sampled training image's train_id
        ("train_id", pa.string()),
        ("score", pa.float32()),  # the pair's copy-space cosine
        ("tile_l2", pa.list_(pa.float32())),  # null when the training image could not be read
        ("error", pa.string()),
    ]
)

# Region-level copy detection (raymem.regions): one row per (scan image, neighbouring training image).
REGION_CHECKS = pa.schema(
    [
        ("scan_id", pa.string()),
        ("query_set", pa.string()),  # units: a scan image | background | training_pairs: training images
        ("unit_id", pa.string()),  # the scan image, or a training image's train_id
        ("train_id", pa.string()),
        ("grid", pa.int16()),  # tiles per side
        ("tile_l2", pa.list_(pa.float32())),  # row-major; null when an image could not be read
        ("tile_texture", pa.list_(pa.float32())),  # per tile, the smaller spatial pixel std of the two
        ("error", pa.string()),
    ]
)

NEIGHBORS = pa.schema(
    [
        ("scan_id", pa.string()),
        ("unit_id", pa.string()),
        ("space", pa.string()),
        ("rank", pa.int16()),
        ("train_id", pa.string()),
        ("score", pa.float32()),
        ("caption", pa.string()),
        ("image_uri", pa.string()),
        ("entities", pa.list_(pa.string())),
        ("image_hash", pa.string()),
        ("via", pa.string()),  # join (exact/FAISS join in this space) | candidates (SSCD over fetched CLIP candidates)
        ("pair_scores", pa.list_(pa.float32())),  # cosine to each neighbour of the unit by rank (raymem.duplicates)
    ]
)

# Two-stage copy detection (raymem.copy_candidates): every CLIP candidate of every query and its fate.
CANDIDATES = pa.schema(
    [
        ("scan_id", pa.string()),
        ("query_set", pa.string()),  # units (a scan image) | background (a sampled training image)
        ("query_id", pa.string()),  # unit_id, or the sampled image's train_id
        ("clip_rank", pa.int16()),
        ("clip_score", pa.float32()),
        ("train_id", pa.string()),
        ("image_uri", pa.string()),  # without query string or user info
        ("status", pa.string()),  # raymem.fetch.STATUSES
        ("error", pa.string()),
        ("http_status", pa.int32()),
        ("content_sha256", pa.string()),
        ("cached", pa.bool_()),  # embedding from an earlier scan's fetch
        ("sscd_score", pa.float32()),  # SSCD cosine to the query; null when not fetched (or the query itself)
    ]
)

ELEMENT = pa.struct(
    [
        ("element", pa.string()),
        ("kind", pa.string()),  # explicit | implicit | mined | instance
        ("presence", pa.float32()),  # zero-shot probability
        ("z", pa.float32()),  # instance elements: t of this image's logit against the null images
        ("image_p", pa.float32()),  # instance elements: that test's p, BH-adjusted across the image's
        ("prompt_p", pa.float32()),  # unprompted elements: paired test over seeds, BH-adjusted
        ("effect", pa.float32()),  # mean logit difference scan - null over the paired seeds
        ("present", pa.bool_()),
        ("share", pa.float32()),  # share of the prompt's seeds in which it is present
        ("lift", pa.float32()),  # association in the training captions, when mined
        ("support", pa.int64()),
    ]
)

LABELS_TABLE = pa.schema(
    [
        ("scan_id", pa.string()),
        ("unit_id", pa.string()),
        ("prompt_id", pa.string()),
        ("entity", pa.string()),
        ("seed", pa.int64()),
        ("status", pa.string()),
        ("label", pa.string()),  # MU | MI | ME | none; null when the unit failed
        ("subtype", pa.string()),  # MU: verbatim | template | partial | instance_element
        ("is_MU", pa.bool_()),  # every category the image shows, beside the primary label
        ("mu_subtypes", pa.list_(pa.string())),
        ("is_MI", pa.bool_()),
        ("is_ME", pa.bool_()),
        ("webster", pa.string()),  # MV | RV | TV (Webster 2023) for verbatim and template copies
        ("flags", pa.list_(pa.string())),
        ("reasons", pa.string()),
        ("replication_score", pa.float32()),
        ("replication_train_id", pa.string()),
        ("eidetic_k", pa.int32()),  # breadth: distinct near-duplicate groups above the threshold
        ("duplication", pa.int32()),  # the copied image's near-duplicate group among the neighbours
        ("copy_evidence", pa.string()),  # sscd | sscd_candidates | clip | none: where the copy scores came from
        ("candidates_missing", pa.int32()),  # two-stage: CLIP candidates that could not be fetched
        ("background_p95", pa.float32()),
        ("pixel_l2", pa.float32()),
        ("pixel_tile_share", pa.float32()),
        ("pixel_tile_l2", pa.list_(pa.float32())),  # every tile's distance, so thresholds can be refit
        ("region_train_id", pa.string()),  # the training image a region was copied from (raymem.regions)
        ("region_tiles", pa.list_(pa.int16())),  # the copied tiles, row-major on the region grid
        ("region_l2", pa.float32()),  # the largest l2 among the copied tiles
        ("region_background_p99", pa.float32()),  # copied tiles distinct training images reach (p99)
        ("pixel_background_p5", pa.float32()),  # tiled pixel l2 distinct training images reach (p5)
        ("region_breadth", pa.int16()),  # distinct training regions matching as much as the best (1: one image's)
        ("consistency", pa.float32()),
        ("cluster_member", pa.bool_()),
        ("clip_prompt_score", pa.float32()),
        ("entity_presence", pa.float32()),
        ("entity_z", pa.float32()),
        ("entity_p", pa.float32()),
        ("null_images", pa.int32()),
        ("elements", pa.list_(ELEMENT)),
        ("noise_norm", pa.float32()),
        ("memorized_prompt", pa.bool_()),
    ]
)

_TALLY_COUNTS = [
    ("n_units", pa.int64()),
    ("n_scored", pa.int64()),
    ("n_failed", pa.int64()),
    ("n_MU", pa.int64()),
    ("n_MI", pa.int64()),
    ("n_ME", pa.int64()),
    ("n_none", pa.int64()),
    ("rate_MU", pa.float64()),
    ("rate_MI", pa.float64()),
    ("rate_ME", pa.float64()),
    ("rate_none", pa.float64()),
    ("n_any_MU", pa.int64()),
    ("n_any_MI", pa.int64()),
    ("n_any_ME", pa.int64()),
    ("rate_any_MU", pa.float64()),
    ("rate_any_MI", pa.float64()),
    ("rate_any_ME", pa.float64()),
    ("n_ME_and_MU", pa.int64()),
    ("n_MI_and_MU", pa.int64()),
    ("n_ME_and_MI", pa.int64()),
]

PROMPT_TALLIES = pa.schema(
    [("scan_id", pa.string()), ("prompt_id", pa.string()), ("entity", pa.string())]
    + _TALLY_COUNTS
    + [
        ("consistency", pa.float64()),
        ("mean_noise_norm", pa.float64()),
        ("max_replication_score", pa.float64()),
        ("memorized_prompt", pa.bool_()),
    ]
)

ENTITY_TALLIES = pa.schema(
    [("scan_id", pa.string()), ("entity", pa.string()), ("n_prompts", pa.int64())]
    + _TALLY_COUNTS
    + [
        ("n_memorized_prompts", pa.int64()),
        ("train_frequency", pa.int64()),
        ("mean_entity_presence", pa.float64()),
        ("render_rate", pa.float64()),
        ("entity_not_rendered", pa.bool_()),
        ("under_represented", pa.bool_()),
    ]
)

# Columns a training-embeddings table must / may have.
TRAIN_REQUIRED = {"train_id": "string or integer", "clip_embedding": "fixed_size_list<float32> or packed"}
TRAIN_OPTIONAL = ("caption", "image_uri", "entities", "sscd_embedding", "image_hash")


def conformed(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` in `schema`: the schema's columns in its order and types, those the table lacks as nulls."""
    for f in schema:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
    return table.select(schema.names).cast(schema)
