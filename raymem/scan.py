"""A scan, end to end: prompts -> generate + embed -> join -> label -> reduce -> publish.

This is the only module that wires stages together. It runs unchanged on a laptop (a local Ray it
starts itself) and inside a Ray job on a cluster (it attaches to the job's Ray).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raymem import join as joins
from raymem import runtime
from raymem.config import ScanConfig
from raymem.errors import InputError, RaymemError, ScanFailed
from raymem.generate import ROLE_SCAN, GenerateEmbed, encode_missing_texts, expand_units, unit_fingerprint, work_chunks
from raymem.label import Background, PromptContext, label_units
from raymem.mining import caption_terms, excluded_terms, mine_associations
from raymem.outputs import ScanOutputs
from raymem.pixels import confirm_pairs
from raymem.probes import probes_for
from raymem.prompts import Prompt, read_prompts
from raymem.reduce import entity_tallies, prompt_tallies
from raymem.schema import (
    ENTITY_TALLIES,
    LABELS_TABLE,
    NEIGHBORS,
    PROMPT_TALLIES,
    STATUS_FAILED,
    STATUS_OK,
    embedding_array,
    embedding_matrix,
    generations_schema,
    texts_schema,
)
from raymem.store import TextCache, UnitStore

log = logging.getLogger(__name__)

BACKGROUND_SAMPLE = 512


@dataclass
class ScanResult:
    scan_id: str
    manifest_uri: str
    tables: dict[str, str]
    counts: dict[str, int]
    timings: dict[str, float] = field(default_factory=dict)
    entity_tallies: list[dict] = field(default_factory=list)


class _Timer:
    def __init__(self):
        self.timings: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.timings[name] = round(time.perf_counter() - self.start, 3)

        return _Span()


def run_scan(cfg: ScanConfig, *, rerun_failed: bool = False) -> ScanResult:
    # Fix the date once, so a scan that crosses midnight stays one scan.
    if cfg.output.scan_date is None:
        today = dt.datetime.now(dt.UTC).date()
        cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"scan_date": today})})
    timer = _Timer()
    outputs = ScanOutputs(cfg)
    with timer("validate_inputs"):
        # Bad input fails here, before Ray, models or any output exist.
        prompts = read_prompts(cfg.prompts)
        joins.inspect_training(cfg.training.embeddings, {}, skip_bad_files=cfg.join.skip_bad_files)
        check_model_sources(cfg)
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    outputs.write_manifest("running", started_at=started_at)
    started_ray = False
    try:
        started_ray = runtime.connect(cfg)
        result = _run(cfg, outputs, prompts, timer, rerun_failed)
        manifest = outputs.write_manifest(
            "complete", started_at=started_at, counts=result.counts, timings=timer.timings, tables=result.tables
        )
        result.timings = manifest["timings"]
        return result
    except BaseException as err:
        outputs.discard()
        inner = runtime.user_error(err)
        message = str(inner) if inner is not None else runtime.summarize_error(err)
        outputs.write_manifest("failed", started_at=started_at, error=message, timings=timer.timings)
        if inner is not None and inner is not err:
            raise inner from None
        if isinstance(err, RaymemError) or not isinstance(err, Exception):
            raise
        raise ScanFailed(f"scan {cfg.scan_id} failed: {message} (details in the Ray worker logs)") from err
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _generate(cfg: ScanConfig, outputs: ScanOutputs, units, texts_by_prompt, rerun_failed: bool, timer) -> dict:
    import ray

    store = UnitStore(outputs.unit_store)
    with timer("resume_check"):
        known = store.status({u.unit_id for u in units})
    todo = [u for u in units if u.unit_id not in known or (rerun_failed and known[u.unit_id] == STATUS_FAILED)]
    log.info("%d units: %d already computed, %d to generate", len(units), len(units) - len(todo), len(todo))
    if not todo:
        return {"units_generated": 0, "units_reused": len(units)}
    plan = runtime.plan_generation(cfg)
    chunks = work_chunks(todo, cfg.generation.batch_size, texts_by_prompt)
    ds = ray.data.from_items(chunks, override_num_blocks=min(len(chunks), max(1, plan.actors * 4)))
    results = ds.map_batches(
        GenerateEmbed,
        fn_constructor_kwargs={
            "cfg": cfg,
            "scan_id": outputs.scan_id,
            "store_uri": outputs.unit_store,
            "text_cache_uri": outputs.text_cache,
        },
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        **plan.remote_args(),
    )
    failed = 0
    with timer("generate"):
        for batch in results.iter_batches(batch_format="pyarrow", batch_size=None):
            failed += int(pc.sum(pc.equal(batch.column("status"), STATUS_FAILED)).as_py() or 0)
    return {"units_generated": len(todo), "units_reused": len(units) - len(todo), "units_failed_now": failed}


def _contexts(cfg: ScanConfig, prompts: list[Prompt], training, timer) -> dict[str, PromptContext]:
    """Per prompt: its probes, with implied / instance elements mined from the training captions."""
    associations: dict = {}
    if cfg.signals.mine_elements and cfg.signals.mined_per_entity:
        t = cfg.thresholds
        with timer("mine_elements"):
            associations = mine_associations(
                training,
                {p.entity: caption_terms(p.entity) for p in prompts},
                min_lift=t.min_lift,
                min_support=t.min_support,
                instance_support=t.instance_support,
                per_entity=cfg.signals.mined_per_entity,
            )
    contexts = {}
    for p in prompts:
        assoc = associations.get(p.entity)
        excluded = excluded_terms(p.prompt, p.entity, p.explicit_elements)

        def allowed(elements, excluded=excluded):
            return tuple(a.element for a in elements if not set(a.element.split()) & excluded)

        # Mined implied elements stand in only when the prompt set lists none (the user's list wins).
        mined = allowed(assoc.implied) if assoc and not p.implicit_elements else ()
        instance = allowed(assoc.instance) if assoc else ()
        probes = probes_for(
            p.prompt, p.entity, p.entity_class, p.explicit_elements, p.implicit_elements, mined, instance
        )
        contexts[p.prompt_id] = PromptContext(p.prompt_id, p.prompt, p.entity, p.entity_class, tuple(probes), assoc)
    return contexts


def _run(cfg: ScanConfig, outputs: ScanOutputs, prompts, timer, rerun_failed: bool) -> ScanResult:
    from raymem.diffusion import model_fingerprint

    scan_id = outputs.scan_id
    runtime.data_context()
    training = joins.inspect_training(cfg.training.embeddings, {}, skip_bad_files=cfg.join.skip_bad_files)
    contexts = _contexts(cfg, prompts, training, timer)
    text_cache = TextCache(outputs.text_cache)
    wanted_texts = {p.text for ctx in contexts.values() for p in ctx.probes}
    with timer("text_cache"):
        have = text_cache.embeddings(wanted_texts)
    texts_by_prompt = {pid: [p.text for p in ctx.probes if p.text not in have] for pid, ctx in contexts.items()}
    units = expand_units(prompts, cfg, unit_fingerprint(cfg, model_fingerprint(cfg.model)), cfg.signals.null_seeds)
    counts = _generate(cfg, outputs, units, texts_by_prompt, rerun_failed, timer)
    texts = text_cache.embeddings(wanted_texts)
    if wanted_texts - texts.keys():  # units were reused but probes changed: encode what is missing
        with timer("encode_texts"):
            encode_missing_texts(cfg, sorted(wanted_texts - texts.keys()), outputs.text_cache)
        texts = text_cache.embeddings(wanted_texts)

    with timer("collect"):
        generations = _collect(outputs, units, scan_id)
    is_scan = pc.equal(generations.column("role"), ROLE_SCAN)
    scan_rows = generations.filter(is_scan)
    ok = scan_rows.filter(pc.equal(scan_rows.column("status"), STATUS_OK))
    counts.update(
        units=scan_rows.num_rows,
        units_ok=ok.num_rows,
        units_failed=scan_rows.num_rows - ok.num_rows,
        null_units=generations.num_rows - scan_rows.num_rows,
    )
    clip_dim = generations.schema.field("clip_embedding").type.list_size
    sscd_type = generations.schema.field("sscd_embedding").type
    sscd_dim = sscd_type.list_size if pa.types.is_fixed_size_list(sscd_type) else None
    spaces = {"clip": clip_dim, **({"sscd": sscd_dim} if sscd_dim else {})}

    # --- join -------------------------------------------------------------------------------------
    with timer("join"):
        training = joins.inspect_training(cfg.training.embeddings, spaces, skip_bad_files=cfg.join.skip_bad_files)
        query_ids = ok.column("unit_id").to_pylist()
        queries = {
            "units": joins.Queries(
                ids=query_ids, matrices={s: embedding_matrix(ok.column(joins.SPACE_COLUMNS[s])) for s in training.dims}
            )
        }
        # The index's precomputed background when `raymem index` wrote one, else a sample in this pass.
        stored = (training.index or {}).get("background") or {}
        bg = None if stored else joins.background_sample(training, BACKGROUND_SAMPLE, list(training.dims))
        if bg is not None:
            queries["background"] = bg
        plan = runtime.plan_join(cfg)
        topk = (
            joins.nearest_neighbours(
                training,
                queries,
                cfg.join.k,
                batch_rows=cfg.join.batch_rows,
                actors=plan.actors,
                remote_args=plan.remote_args(),
                threads=plan.threads,
                mode=cfg.join.mode,
                nprobe=cfg.join.nprobe,
            )
            if query_ids
            else {"units": {}}
        )
    neighbor_rows, by_unit = [], {}
    for space, running in topk.get("units", {}).items():
        for qi, rows in enumerate(running.rows):
            uid = query_ids[qi]
            by_unit.setdefault(uid, {})[space] = rows
            for rank, r in enumerate(rows, start=1):
                neighbor_rows.append(
                    {
                        "scan_id": scan_id,
                        "unit_id": uid,
                        "space": space,
                        "rank": rank,
                        "train_id": r["train_id"],
                        "score": r["score"],
                        "caption": r.get("caption"),
                        "image_uri": r.get("image_uri"),
                        "entities": r.get("entities"),
                        "image_hash": r.get("image_hash"),
                    }
                )
    measured = stored or joins.background_from(topk.get("background", {}))
    background = {space: Background(space=space, p95=b["p95"], n=b["n"]) for space, b in measured.items()}
    with timer("entity_stats"):
        stats = joins.entity_stats(training, {p.entity for p in prompts})
    freq = {e: st.count for e, st in stats.items()}
    contexts = {pid: replace(ctx, reference=stats.get(ctx.entity)) for pid, ctx in contexts.items()}

    # --- pixel confirmation of copy candidates, label, reduce -----------------------------------------
    gen_rows = generations.to_pylist()
    with timer("pixel_confirmation"):
        pixels = _confirm_copies(cfg, gen_rows, by_unit)
    with timer("label"):
        labels = label_units(gen_rows, contexts, texts, by_unit, background, cfg.thresholds, pixels)
        p_tallies = prompt_tallies(labels)
        e_tallies = entity_tallies(labels, freq, cfg.thresholds.element_presence)

    with timer("publish"):
        outputs.stage("generations", generations.cast(generations_schema(clip_dim, sscd_dim)))
        outputs.stage("texts", _texts_table(scan_id, contexts, texts, clip_dim))
        outputs.stage("neighbors", pa.Table.from_pylist(neighbor_rows, schema=NEIGHBORS))
        outputs.stage("labels", pa.Table.from_pylist(labels, schema=LABELS_TABLE))
        outputs.stage("prompt_tallies", pa.Table.from_pylist(p_tallies, schema=PROMPT_TALLIES))
        outputs.stage("entity_tallies", pa.Table.from_pylist(e_tallies, schema=ENTITY_TALLIES))
        tables = outputs.publish()
    label_counts = {f"label_{k}": sum(1 for r in labels if r["label"] == k) for k in ("MU", "MI", "ME", "none")}
    counts.update(
        training_rows=training.num_rows,
        neighbors=len(neighbor_rows),
        prompts=len(prompts),
        background_sample=background[next(iter(background))].n if background else 0,
        pixel_checks=len(pixels),
        training_files_skipped=training.skipped,
        background_source="index" if stored else "scan",
        **label_counts,
    )
    counts["background_p95"] = {s: b.p95 for s, b in background.items()}
    counts["mined_elements"] = {
        ctx.entity: {
            "implied": [vars(a) for a in ctx.associations.implied],
            "instance": [vars(a) for a in ctx.associations.instance],
        }
        for ctx in contexts.values()
        if ctx.associations
    }
    return ScanResult(
        scan_id=scan_id, manifest_uri=outputs.manifest_uri, tables=tables, counts=counts, entity_tallies=e_tallies
    )


def _collect(outputs: ScanOutputs, units, scan_id: str) -> pa.Table:
    """The scan's rows from the unit store, in unit order, with metadata refreshed from this scan's units."""
    wanted = {u.unit_id for u in units}
    table = UnitStore(outputs.unit_store).rows(wanted)
    have = set() if table is None else set(table.column("unit_id").to_pylist())
    lost = sorted(wanted - have)
    if lost:
        raise ScanFailed(f"{len(lost)} unit(s) have no recorded result (first: {lost[:3]}); see worker logs")
    by_id = {u.unit_id: u for u in units}
    order = {u.unit_id: i for i, u in enumerate(units)}
    ids = table.column("unit_id").to_pylist()
    table = table.take(pa.array(sorted(range(len(ids)), key=lambda i: order[ids[i]]), pa.int64()))
    ids = table.column("unit_id").to_pylist()
    for name, values in (
        ("scan_id", [scan_id] * len(ids)),
        ("prompt_id", [by_id[i].prompt_id for i in ids]),
        ("parent_prompt_id", [by_id[i].parent_prompt_id for i in ids]),
        ("role", [by_id[i].role for i in ids]),
        ("entity", [by_id[i].entity for i in ids]),
    ):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
    return table


def _confirm_copies(cfg: ScanConfig, gen_rows: list[dict], by_unit: dict) -> dict:
    """Tiled pixel l2 for each scan image whose nearest copy-detection neighbour passes `replication`."""
    pairs = {}
    for g in gen_rows:
        spaces = by_unit.get(g["unit_id"], {})
        nbrs = spaces.get("sscd") or spaces.get("clip") or []
        if nbrs and nbrs[0]["score"] >= cfg.thresholds.replication and g["image_uri"]:
            pairs[g["unit_id"]] = (g["image_uri"], nbrs[0]["train_id"], nbrs[0].get("image_uri"))
    return confirm_pairs(pairs, cfg.signals.pixel_size, cfg.signals.pixel_tiles) if pairs else {}


def _texts_table(scan_id: str, contexts: dict[str, PromptContext], texts: dict, clip_dim: int) -> pa.Table:
    rows = [
        {
            "scan_id": scan_id,
            "prompt_id": pid,
            "kind": p.kind,
            "element": p.element,
            "text": p.text,
            "clip_embedding": texts[p.text],
        }
        for pid, ctx in contexts.items()
        for p in ctx.probes
        if p.text in texts
    ]
    if not rows:
        return texts_schema(clip_dim).empty_table()
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "clip_embedding"} for r in rows])
    table = table.append_column(
        "clip_embedding", embedding_array(np.stack([r["clip_embedding"] for r in rows]), clip_dim)
    )
    return table.select(texts_schema(clip_dim).names).cast(texts_schema(clip_dim))


def check_model_sources(cfg: ScanConfig) -> None:
    """Local directories and s3:// prefixes named as models must exist (hub ids are checked when loaded)."""
    import os

    from raymem import uri as uris

    sources = [("model.id", cfg.model.id)]
    clip = cfg.embedding.clip
    sources.append(("embedding.clip.model", clip.model.removeprefix("local-dir:")))
    if clip.pretrained and (clip.pretrained.startswith(("/", "s3://"))):
        sources.append(("embedding.clip.pretrained", clip.pretrained))
    cd = cfg.embedding.copy_detection.model
    if cd and not cd.startswith("immaculate:"):
        sources.append(("embedding.copy_detection.model", cd))
    for name, value in sources:
        local = value.startswith("/")
        if (local and not os.path.exists(value)) or (uris.is_remote(value) and not uris.exists(value)):
            raise InputError(value, f"not found (from {name})")


def check_inputs(cfg: ScanConfig) -> None:
    """Validate what can be validated without Ray or models (used by `raymem validate`)."""
    read_prompts(cfg.prompts)
    joins.inspect_training(cfg.training.embeddings, {}, skip_bad_files=cfg.join.skip_bad_files)
    check_model_sources(cfg)


__all__ = ["run_scan", "check_inputs", "ScanResult", "InputError"]
