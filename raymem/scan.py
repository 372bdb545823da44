"""A scan, end to end: prompts -> generate + embed -> join -> label -> reduce -> publish.

This is the only module that wires stages together. It runs unchanged on a laptop (a local Ray it
starts itself) and inside a Ray job on a cluster (it attaches to the job's Ray).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raymem import join as joins
from raymem import runtime
from raymem.config import ScanConfig
from raymem.errors import InputError, RaymemError, ScanFailed
from raymem.generate import GenerateEmbed, expand_units, unit_fingerprint, work_chunks
from raymem.label import Background, label_units
from raymem.outputs import ScanOutputs
from raymem.prompts import read_prompts
from raymem.reduce import entity_tallies, prompt_tallies
from raymem.schema import (
    ENTITY_TALLIES,
    LABELS_TABLE,
    NEIGHBORS,
    PROMPT_TALLIES,
    STATUS_FAILED,
    STATUS_OK,
    embedding_matrix,
    generations_schema,
    texts_schema,
)
from raymem.store import UnitStore

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
        joins.inspect_training(cfg.training.embeddings, {})
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
        message = str(err) if isinstance(err, RaymemError) else f"{type(err).__name__}: {err}"
        outputs.write_manifest("failed", started_at=started_at, error=message, timings=timer.timings)
        if isinstance(err, RaymemError) or not isinstance(err, Exception):
            raise
        raise ScanFailed(f"scan {cfg.scan_id} failed: {message}") from err
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _generate(cfg: ScanConfig, outputs: ScanOutputs, units, rerun_failed: bool, timer) -> dict[str, int]:
    import ray

    store = UnitStore(outputs.unit_store)
    with timer("resume_check"):
        known = store.status({u.unit_id for u in units})
    todo = [u for u in units if u.unit_id not in known or (rerun_failed and known[u.unit_id] == STATUS_FAILED)]
    log.info("%d units: %d already computed, %d to generate", len(units), len(units) - len(todo), len(todo))
    if not todo:
        return {"units_generated": 0, "units_reused": len(units)}
    plan = runtime.plan_generation(cfg)
    chunks = work_chunks(todo, cfg.generation.batch_size)
    ds = ray.data.from_items(chunks, override_num_blocks=min(len(chunks), max(1, plan.actors * 4)))
    results = ds.map_batches(
        GenerateEmbed,
        fn_constructor_kwargs={"cfg": cfg, "scan_id": outputs.scan_id, "store_uri": outputs.unit_store},
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


def _run(cfg: ScanConfig, outputs: ScanOutputs, prompts, timer, rerun_failed: bool) -> ScanResult:
    from raymem.diffusion import model_fingerprint

    scan_id = outputs.scan_id
    units = expand_units(prompts, cfg, unit_fingerprint(cfg, model_fingerprint(cfg.model)))
    counts = _generate(cfg, outputs, units, rerun_failed, timer)

    store = UnitStore(outputs.unit_store)
    wanted = {u.unit_id for u in units}
    with timer("collect"):
        table = store.rows(wanted)
    if table is None or table.num_rows != len(wanted):
        have = set() if table is None else set(table.column("unit_id").to_pylist())
        lost = sorted(wanted - have)
        raise ScanFailed(f"{len(lost)} unit(s) have no recorded result (first: {lost[:3]}); see worker logs")
    order = {u.unit_id: i for i, u in enumerate(units)}
    ids = table.column("unit_id").to_pylist()
    table = table.take(pa.array(sorted(range(len(ids)), key=lambda i: order[ids[i]]), pa.int64()))
    table = table.set_column(table.schema.get_field_index("scan_id"), "scan_id", pa.array([scan_id] * table.num_rows))
    generations = table
    ok = generations.filter(pc.equal(generations.column("status"), STATUS_OK))
    counts.update(units=len(units), units_ok=ok.num_rows, units_failed=generations.num_rows - ok.num_rows)

    clip_dim = generations.schema.field("clip_embedding").type.list_size
    sscd_type = generations.schema.field("sscd_embedding").type
    sscd_dim = sscd_type.list_size if pa.types.is_fixed_size_list(sscd_type) else None
    spaces = {"clip": clip_dim, **({"sscd": sscd_dim} if sscd_dim else {})}

    # --- join -------------------------------------------------------------------------------------
    with timer("join"):
        training = joins.inspect_training(cfg.training.embeddings, spaces)
        query_ids = ok.column("unit_id").to_pylist()
        queries = {
            "units": joins.Queries(
                ids=query_ids, matrices={s: embedding_matrix(ok.column(joins.SPACE_COLUMNS[s])) for s in training.dims}
            )
        }
        bg = joins.background_sample(training, BACKGROUND_SAMPLE, list(training.dims))
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
                    }
                )
    background = {}
    for space, running in topk.get("background", {}).items():
        top1 = np.array([rows[0]["score"] for rows in running.rows if rows], dtype=np.float64)
        if len(top1):
            background[space] = Background(space=space, p95=float(np.percentile(top1, 95)), n=len(top1))
    with timer("entity_frequencies"):
        freq = joins.entity_frequencies(training, {p.entity for p in prompts})

    # --- label + reduce -----------------------------------------------------------------------------
    with timer("label"):
        gen_rows = generations.to_pylist()
        labels = label_units(gen_rows, by_unit, background, cfg.thresholds)
        p_tallies = prompt_tallies(labels)
        e_tallies = entity_tallies(labels, freq, cfg.thresholds.element_presence)

    texts = _texts(outputs, wanted, scan_id, clip_dim)
    with timer("publish"):
        outputs.stage("generations", generations.cast(generations_schema(clip_dim, sscd_dim)))
        outputs.stage("texts", texts)
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
        **label_counts,
    )
    counts["background_p95"] = {s: b.p95 for s, b in background.items()}
    return ScanResult(
        scan_id=scan_id, manifest_uri=outputs.manifest_uri, tables=tables, counts=counts, entity_tallies=e_tallies
    )


def _texts(outputs: ScanOutputs, wanted: set[str], scan_id: str, clip_dim: int) -> pa.Table:
    schema = texts_schema(clip_dim)
    table = UnitStore(outputs.unit_store).texts_for(wanted)
    if table is None:
        return schema.empty_table()
    seen, keep = set(), []
    for i, key in enumerate(zip(*(table.column(c).to_pylist() for c in ("prompt_id", "kind", "element")))):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    table = table.take(pa.array(keep, pa.int64()))
    table = table.set_column(table.schema.get_field_index("scan_id"), "scan_id", pa.array([scan_id] * table.num_rows))
    return table.select(schema.names).cast(schema)


def check_inputs(cfg: ScanConfig) -> None:
    """Validate what can be validated without Ray or models (used by `raymem validate`)."""
    read_prompts(cfg.prompts)
    joins.inspect_training(cfg.training.embeddings, {})


__all__ = ["run_scan", "check_inputs", "ScanResult", "InputError"]
