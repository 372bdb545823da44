"""What every published column means, declared once: written into each Parquet file as field metadata
(`description`) and rendered as docs/schema.md (`python -m raymem.column_docs > docs/schema.md`; a test
keeps the two in step)."""

from __future__ import annotations

import pyarrow as pa

SHARED = {
    "scan_id": "the scan: `<name>-<scan_date>-<digest of its inputs>` (raymem/identity.py)",
    "prompt_id": "the prompt's id in the prompt set",
    "unit_id": "one generated image: prompt x seed (x role), deterministic from model, settings, prompt and seed",
    "entity": "the entity the prompt names",
    "seed": "the generator seed of the image",
    "status": "ok, or failed (the unit is recorded with its error, never dropped)",
    "train_id": "the training image's id in the training table",
    "image_uri": "where the image is (local path, s3:// or http(s)://)",
    "clip_embedding": "L2-normalised CLIP image (or text) embedding",
}

COUNTS = {
    "n_units": "units (prompt x seed) in the group",
    "n_scored": "units that were scored (status ok)",
    "n_failed": "units that failed (not in the rates)",
    "n_MU": "scored units labelled MU (unintended memorization)",
    "n_MI": "scored units labelled MI (implicit intended)",
    "n_ME": "scored units labelled ME (explicit intended)",
    "n_none": "scored units labelled none",
    "rate_MU": "n_MU / n_scored",
    "rate_MI": "n_MI / n_scored",
    "rate_ME": "n_ME / n_scored",
    "rate_none": "n_none / n_scored",
    "n_any_MU": "scored units showing MU at all (is_MU), whatever their primary label",
    "n_any_MI": "scored units showing MI at all (is_MI)",
    "n_any_ME": "scored units showing ME at all (is_ME)",
    "rate_any_MU": "n_any_MU / n_scored",
    "rate_any_MI": "n_any_MI / n_scored",
    "rate_any_ME": "n_any_ME / n_scored",
    "n_ME_and_MU": "scored units showing both ME and MU (e.g. the requested entity on a copied background)",
    "n_MI_and_MU": "scored units showing both MI and MU",
    "n_ME_and_MI": "scored units showing both ME and MI",
}

TABLES: dict[str, tuple[str, dict[str, str]]] = {
    "prompts": (
        "one row per prompt of the prompt set",
        {
            "prompt": "the prompt text",
            "entity_class": "the entity's class noun (the null prompt replaces the entity by it)",
            "explicit_elements": "elements the prompt asks for",
            "implicit_elements": "elements the entity implies without the prompt naming them",
            "requests_work": "the prompt asks for this specific work (poster, painting, logo): a copy of it is a "
            "requested copy (ME), not MU",
        },
    ),
    "generations": (
        "one row per generated image: scan units and null units (the prompt with the entity replaced by its "
        "class noun, the labeler's null distribution)",
        {
            "model_id": "the diffusion model (hub id, directory or s3:// prefix)",
            "parent_prompt_id": "the scan prompt a null unit belongs to (its own id for scan units)",
            "role": "scan, or null",
            "prompt": "the text the image was generated from",
            "error": "why the unit failed (one line), else null",
            "sscd_embedding": "L2-normalised SSCD copy-detection embedding (null type when copy detection is off)",
            "clip_prompt_score": "CLIP cosine between the image and its prompt",
            "noise_norm": "Wen et al.'s text-conditional noise norm ||eps(x_t, p) - eps(x_t, empty)|| on the first "
            "step(s); null when not measured (no guidance, or a negative prompt: see noise_norm_negative)",
            "noise_norm_negative": "with generation.negative_prompt set: ||eps(x_t, p) - eps(x_t, negative prompt)||, "
            "which the guidance batch computes instead of Wen et al.'s norm; never thresholded",
            "device": "where it was generated (cuda:0, cpu)",
            "worker": "host:pid of the actor",
            "cuda_visible_devices": "the GPUs Ray gave the actor",
            "generate_seconds": "sampling time of the image's batch, per image",
            "embed_seconds": "embedding time of the image's batch, per image",
            "computed_at": "when the unit was computed (a resumed scan reuses older units)",
        },
    ),
    "texts": (
        "one row per probe text of a prompt, with its CLIP text embedding",
        {
            "kind": "prompt, entity, entity_null, placebo_name (made-up names an entity judged by its text probe "
            "must beat), explicit, implicit, mined, instance, placebo (made-up words an instance element must "
            "beat) or control (another entity's implied element, never labelled)",
            "element": "the entity or element probed",
            "text": "the probe text",
        },
    ),
    "neighbors": (
        "one row per (scan image, embedding space, rank): the exact top-k training neighbours",
        {
            "space": "clip or sscd",
            "rank": "1 = nearest",
            "score": "cosine similarity",
            "caption": "the training image's caption",
            "entities": "entities tagged in the training caption",
            "image_hash": "hash of the training image's decoded pixels (exact duplicates share it)",
            "via": "join (exact or FAISS join in this space) or candidates (SSCD cosine to CLIP candidates "
            "fetched by image_uri: two-stage copy detection, see the candidates table)",
            "pair_scores": "for neighbours scoring >= the scan's replication threshold: cosine to each of the unit's "
            "neighbours in this space, by rank (null where not computed); the near-duplicate groups of "
            "raymem/duplicates.py",
        },
    ),
    "candidates": (
        "two-stage copy detection (training tables without sscd_embedding): one row per CLIP candidate of "
        "every scan image and background sample image, with what fetching it gave; empty otherwise",
        {
            "query_set": "units (a scan image) or background (a training image sampled for the SSCD background)",
            "query_id": "the unit_id, or the sampled training image's train_id",
            "clip_rank": "rank among the query's CLIP neighbours (1 = nearest)",
            "clip_score": "CLIP cosine to the query",
            "image_uri": "the training image's URI without query string or user info",
            "status": "ok, no_uri, not_found, http_error, timeout, unreachable, too_large, not_image, "
            "undecodable or unsupported (raymem/fetch.py)",
            "error": "why the image could not be used (one line, URI without secrets), else null",
            "http_status": "the HTTP status of the last attempt, for http(s) URIs",
            "content_sha256": "sha256 of the fetched bytes",
            "cached": "the embedding came from an earlier scan's fetch (the output root's candidate cache)",
            "sscd_score": "SSCD cosine to the query; null when the image was not fetched or is the query itself",
        },
    ),
    "entities": (
        "one row per scanned entity: what the training set says about it (the labeler's reference)",
        {
            "train_frequency": "training images tagged with the entity; null when the table has no entity tags",
            "clip_centroid": "normalised mean CLIP embedding of those images (null when there are none)",
            "mined": "whether implied / instance elements were mined from its training captions",
            "n_tagged": "mining: captions tagged with the entity",
            "n_captions": "mining: captions in the training table",
            "implied": "mined implied elements (element, support, frequency, lift)",
            "instance": "mined instance-specific elements (element, support, frequency, lift)",
            "work_copies": "prompts that request this work (requests_work), with region detection on: the "
            "sample of its tagged training images (by train_id hash, at most signals.work_copies) that every "
            "image of the prompt is compared with region by region, so that a private mark is not taken for "
            "the work; empty otherwise",
        },
    ),
    "background": (
        "one row per embedding space: the train-train nearest-neighbour similarity (DCR's background), to "
        "each sampled image's nearest distinct training image (raymem.background)",
        {
            "space": "clip or sscd",
            "source": "index (precomputed by raymem index), scan (sampled by the scan) or candidates (sampled "
            "training images against their own fetched CLIP candidates, in SSCD)",
            "n": "training rows sampled",
            "p50": "median similarity to the nearest distinct training image",
            "p75": "75th percentile",
            "p90": "90th percentile",
            "p95": "95th percentile: a copy must score above it",
            "p99": "99th percentile",
            "near_duplicated": "share of the sampled images whose near-duplicates (SSCD >= near_duplicate, at "
            "most eidetic_k of them) were passed over for their nearest distinct image (null in scans before it)",
        },
    ),
    "pixel_checks": (
        "one row per copy candidate compared pixel by pixel (Carlini's tiled l2), and per sampled training "
        "image compared with its nearest other training image (the pixel background)",
        {
            "query_set": "units: a scan image; background: a sampled training image against its nearest other "
            "training image in the copy space",
            "unit_id": "the scan image, or for the background the sampled training image's train_id",
            "score": "the pair's copy-space cosine (background pairs at or above the near-duplicate link are one "
            "image and left out of the pixel background)",
            "tile_l2": "l2 distance of every tile (null when the training image could not be read)",
            "error": "why the training image could not be read, else null",
        },
    ),
    "region_checks": (
        "one row per (scan image, neighbouring training image) compared region by region: tiles at the "
        "same position, whatever the global similarity (raymem.regions)",
        {
            "query_set": "units: a scan image; background: a sampled training image against its nearest other "
            "training images (what distinct training images share at the same position); training_pairs: two "
            "training images compared with one scan image, against each other (one duplicated patch or not)",
            "unit_id": "the scan image, or for the background and training_pairs a training image's train_id",
            "grid": "tiles per side of the region grid",
            "tile_l2": "l2 distance of every tile, row-major (null when an image could not be read)",
            "tile_texture": "per tile, the smaller spatial pixel standard deviation of the two tiles (within each "
            "channel, pooled; flat tiles never count)",
            "error": "why an image could not be read, else null",
        },
    ),
    "labels": (
        "one row per scan unit: its category and every number and reason behind it",
        {
            "label": "MU, MI, ME or none (precedence in that order); null when the unit failed",
            "subtype": "MU: verbatim, template, partial, region, duplicated_patch, private_mark or "
            "instance_element; ME: requested_copy",
            "is_MU": "the image shows MU (a copy, a copied region or patch, a private mark or an instance-specific "
            "element), whatever the primary label",
            "mu_subtypes": "every MU kind it shows: verbatim, template, partial, region, duplicated_patch, "
            "private_mark, instance_element",
            "is_MI": "an implied element is shown consistently (MI), whatever the primary label",
            "is_ME": "the entity is rendered with every explicit element (ME), whatever the primary label",
            "webster": "Webster's MV (caption matches the prompt), RV or TV, for verbatim and template copies",
            "flags": "every signal that fired (copy_neighbor, replication, entity_rendered, explicit:<e>, "
            "implied_without_entity, ...)",
            "reasons": "the decision in words, with its numbers and thresholds",
            "replication_score": "top-1 copy-detection cosine",
            "replication_train_id": "the top-1 training image",
            "eidetic_k": "breadth: distinct training images above the replication threshold, near-duplicates of "
            "one image (SSCD >= near_duplicate, or the same image_hash) counted once",
            "duplication": "for a copy: how many times the copied image is among the neighbours (its near-duplicate "
            "group; Carlini's k, capped by join.k); reported, never gating",
            "copy_evidence": "where the copy scores came from: sscd (joined against training SSCD embeddings), "
            "sscd_candidates (two-stage), clip (no copy detector, calibrated clip_replication) or none (not tested)",
            "candidates_missing": "two-stage: the image's CLIP candidates that could not be fetched (evidence "
            "missing); null otherwise",
            "background_p95": "the train-train background p95 it was compared with",
            "pixel_l2": "largest tile l2 to the top-1 training image, when checked",
            "pixel_tile_share": "share of tiles within the pixel_l2 threshold",
            "pixel_tile_l2": "every tile's l2, so thresholds can be refit",
            "region_train_id": "the training image a region was copied from (most copied tiles), the first of the two "
            "training images sharing a duplicated patch, or the copy of the requested work a private mark was "
            "copied from, when one was",
            "region_tiles": "the copied tiles (of the region, the duplicated patch or the private mark), row-major "
            "on the region grid (region_checks has every tile)",
            "region_l2": "the largest l2 among the copied tiles",
            "pixel_background_p5": "5th percentile of the tiled pixel l2 between sampled training images and their "
            "nearest other training image (near-duplicate pairs left out); a pixel confirmation must come "
            "closer (null: no pixel check, or fewer than 20 readable background pairs)",
            "region_background_p99": "99th percentile of the copied tiles a sampled training image shares with its "
            "nearest other training images, tiles duplicated between them (l2 <= region_duplicate_l2) left out; "
            "a region copy must exceed it",
            "region_breadth": "distinct regions of the compared training images that would each be a region "
            "copy (copies of one patch, e.g. a shared watermark, count once); a region copy needs <= "
            "region_breadth (1), more is a look; null when no tile matched or the whole image is a copy",
            "consistency": "share of the prompt's seeds in the largest near-duplicate cluster",
            "cluster_member": "whether this image is in that cluster",
            "clip_prompt_score": "CLIP cosine between the image and its prompt",
            "entity_presence": "how much the image shows the entity (cosine to its centroid, or zero-shot P)",
            "entity_z": "t of that score against the prompt's null images (prediction interval, n - 1 df)",
            "entity_p": "p of 'rendered beyond the null': the larger of that image test and the prompt's paired "
            "test over seeds (raymem/stats.py); rendered when <= null_alpha",
            "null_images": "null images the prompt was calibrated against",
            "elements": "per probed element: kind, zero-shot presence, t and BH-adjusted p of this image against "
            "the null (instance), BH-adjusted paired p and mean logit difference over seeds (unprompted), shown, "
            "share of seeds, lift and support; kind control: another entity's implied element, its paired p "
            "unadjusted, never shown (the MI rule's false-positive check, manifest counts.implied_controls)",
            "noise_norm": "Wen et al.'s text-conditional noise norm",
            "memorized_prompt": "the prompt's seeds converge (consistency) or its noise norm passes the threshold",
        },
    ),
    "prompt_tallies": (
        "one row per prompt: counts and rates of each label over its seeds",
        {
            **COUNTS,
            "consistency": "share of seeds in the largest near-duplicate cluster",
            "mean_noise_norm": "mean noise norm over the seeds",
            "max_replication_score": "largest top-1 copy-detection cosine over the seeds",
            "memorized_prompt": "see labels.memorized_prompt",
        },
    ),
    "entity_tallies": (
        "one row per entity: counts and rates over all its prompts",
        {
            **COUNTS,
            "n_prompts": "prompts naming the entity",
            "n_memorized_prompts": "of those, memorized prompts",
            "train_frequency": "training images tagged with the entity",
            "mean_entity_presence": "mean entity presence over its scored images",
            "render_rate": "share of its scored images that render it (null-calibrated; labels.flags entity_rendered)",
            "entity_not_rendered": "render_rate < 0.5: the model does not draw it (measured, whatever its frequency)",
            "under_represented": "fewer than 200 tagged training images (MIMETIC2); null without entity tags",
        },
    ),
}


def description(table: str, column: str) -> str | None:
    return TABLES[table][1].get(column) or SHARED.get(column)


def with_descriptions(table_name: str, table: pa.Table) -> pa.Table:
    """The table with each column's description as Parquet field metadata."""
    fields = []
    for field in table.schema:
        text = description(table_name, field.name)
        fields.append(field.with_metadata({"description": text}) if text else field)
    return table.cast(pa.schema(fields, metadata=table.schema.metadata))


def render() -> str:
    """docs/schema.md."""
    from raymem import schema

    schemas = {
        "prompts": schema.PROMPTS,
        "generations": schema.generations_schema(512, 512),
        "texts": schema.texts_schema(512),
        "neighbors": schema.NEIGHBORS,
        "candidates": schema.CANDIDATES,
        "entities": schema.entities_schema(512),
        "background": schema.BACKGROUND,
        "pixel_checks": schema.PIXEL_CHECKS,
        "region_checks": schema.REGION_CHECKS,
        "labels": schema.LABELS_TABLE,
        "prompt_tallies": schema.PROMPT_TALLIES,
        "entity_tallies": schema.ENTITY_TALLIES,
    }
    lines = [
        "# Output tables, column by column",
        "",
        "Generated from `raymem/column_docs.py` (`python -m raymem.column_docs > docs/schema.md`); the same",
        "text is in every Parquet file as each field's `description` metadata. Embedding dimensions are",
        "shown for 512-d models. Read the tables as docs/outputs.md says (committed files only).",
    ]
    for name in schema.PUBLISHED_TABLES:
        lines += ["", f"## `{name}`", "", TABLES[name][0] + ".", "", "| column | type | meaning |", "|---|---|---|"]
        for field in schemas[name]:
            lines.append(f"| `{field.name}` | `{field.type}` | {description(name, field.name) or ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
