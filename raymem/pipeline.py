"""A scan, end to end (the pipeline): prompts -> generate + embed -> join -> label -> reduce -> publish.

This is the only module that wires stages together, and it only sequences them: each stage is a
function of its own module, and every table it produces is declared in `raymem.schema`. It runs
unchanged on a laptop (a local Ray it starts itself) and inside a Ray job on a cluster (it attaches to
the job's Ray).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raymem import runtime
from raymem import uri as uris
from raymem.background import background_from, background_sample, background_table, stored_background
from raymem.candidates import Queries
from raymem.captions import caption_terms
from raymem.config import ActorRange, ScanConfig
from raymem.copy_candidates import MODE_CANDIDATES, MODE_OFF, CandidateQueries, copy_detection_mode, rescore
from raymem.duplicates import attach_pair_scores, read_embeddings, rows_to_read
from raymem.entity_stats import EntityStatsPass, entities_table, wants_entity_stats
from raymem.errors import InputError, OutputError, RaymemError, ScanFailed
from raymem.fetch import FetchLimits
from raymem.generate import GenerateEmbed, encode_missing_texts, expand_units, unit_fingerprint, work_chunks
from raymem.identity import embedding_mismatches, scan_id_of, scan_identity
from raymem.join import DEFAULT_FRAGMENT_ROWS, RunningTopK, nearest_neighbours, neighbors_table, warm_join_workers
from raymem.label import label_units, pixel_check_pairs, region_check_pairs, with_work_copies
from raymem.label_inputs import LabelInputs, pixel_evidence
from raymem.mining import EntityAssociations, excluded_terms, mine_associations
from raymem.outputs import ScanOutputs, one_line_os_error
from raymem.passes import TablePass, run_passes
from raymem.pixels import PixelPair, confirm_pairs, pixel_checks_table
from raymem.probes import Probe, control_elements, probes_for
from raymem.prompts import Prompt, prompts_table, read_prompts
from raymem.reduce import describe_controls, entity_tallies, implied_control_rate, mi_unspecific, prompt_tallies
from raymem.regions import (
    check_regions,
    neighbours_to_compare,
    region_checks_table,
    region_evidence,
    training_pairs,
)
from raymem.schema import (
    CANDIDATES,
    ENTITY_TALLIES,
    LABELS,
    LABELS_TABLE,
    PROMPT_TALLIES,
    ROLE_SCAN,
    SPACE_COLUMNS,
    STATUS_FAILED,
    STATUS_OK,
    conformed,
    embedding_array,
    embedding_matrix,
    generations_schema,
    texts_schema,
)
from raymem.sources import TrainingTable, inspect_training
from raymem.sources.base import INDEX_MANIFEST
from raymem.store import TextCache, UnitStore
from raymem.train_ids import TrainIdCheck

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
    """Seconds per stage, and the stage a failure happened in (for the failure record)."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self.failed_stage: str | None = None
        self.last: str | None = None  # the last stage started

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.start = time.perf_counter()
                timer.last = name

            def __exit__(self, exc_type, *exc):
                timer.timings[name] = round(time.perf_counter() - self.start, 3)
                if exc_type is not None and timer.failed_stage is None:  # the innermost span that raised
                    timer.failed_stage = name

        return _Span()


def run_scan(cfg: ScanConfig, *, rerun_failed: bool = False) -> ScanResult:
    timer = _Timer()
    with timer("validate_inputs"):
        # Bad input fails here, before Ray, models or any output exist.
        prompts, training = check_inputs(cfg)
        identity = scan_identity(cfg, prompts, training)
    outputs = ScanOutputs(cfg, scan_id_of(cfg, identity), identity)
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    try:
        outputs.acquire_lease()  # a second run of the same scan exits here instead of recomputing it
        try:
            outputs.write_manifest("running", started_at=started_at)
        except OSError as err:  # read-only, full, missing bucket: before anything else is done
            raise OutputError(f"{cfg.output.uri}: cannot write the scan's outputs: {one_line_os_error(err)}") from None
        return _run_and_commit(cfg, outputs, prompts, training, timer, rerun_failed, started_at)
    except OSError as err:  # the lease itself could not be written
        raise OutputError(f"{cfg.output.uri}: cannot write the scan's outputs: {one_line_os_error(err)}") from None
    finally:
        outputs.release_lease()


def _run_and_commit(cfg, outputs, prompts, training, timer, rerun_failed: bool, started_at: str) -> ScanResult:
    try:
        with contextlib.ExitStack() as session:
            with timer("connect_ray"):
                session.enter_context(runtime.ray_session(cfg.ray))
            result = _run(cfg, outputs, prompts, training, timer, rerun_failed)
        manifest = outputs.write_manifest(
            "complete", started_at=started_at, counts=result.counts, timings=timer.timings, tables=result.tables
        )
    except BaseException as err:
        inner = runtime.user_error(err)
        message = str(inner) if inner is not None else runtime.summarize_error(err)
        where = outputs.record_failure(
            started_at=started_at,
            error=message,
            timings=timer.timings,
            failed_stage=timer.failed_stage or (f"after {timer.last}" if timer.last else "setup"),
            # Bad input is one line; anything else keeps its whole (uncoloured) traceback for whoever debugs.
            traceback=None if inner is not None else runtime.plain_traceback(err),
        )
        if inner is not None and inner is not err:
            raise inner from None
        if isinstance(err, RaymemError) or not isinstance(err, Exception):
            raise
        raise ScanFailed(f"scan {outputs.scan_id} failed: {message} (traceback in {where})") from err
    outputs.remove_unlisted(manifest)  # committed: what follows never changes what readers see
    result.timings = manifest["timings"]
    return result


def check_inputs(cfg: ScanConfig) -> tuple[list[Prompt], TrainingTable]:
    """Validate what can be validated without Ray or models (also `raymem validate`)."""
    prompts = read_prompts(cfg.prompts)
    training = inspect_training(cfg.training.embeddings, {}, skip_bad_files=cfg.join.skip_bad_files)
    mode = copy_detection_mode(cfg, training)  # a copy detector with nothing to compare against is bad input
    if mode == MODE_CANDIDATES:
        log.info(
            "training table has no sscd_embedding: two-stage copy detection (top-%d CLIP candidates fetched "
            "by image_uri and SSCD-embedded)",
            cfg.embedding.copy_detection.candidates.k,
        )
    elif mode == MODE_OFF and cfg.thresholds.clip_replication is None:
        log.warning(
            "copy detection is off and thresholds.clip_replication is not set: replication (MU by copying) "
            "will not be tested"
        )
    _check_embedded_alike(cfg, training)
    check_model_sources(cfg)
    return prompts, training


def _check_embedded_alike(cfg: ScanConfig, training: TrainingTable) -> None:
    """The scan must embed its images as `raymem index` embedded the training table: same models, same
    copy-detector input size (raymem.identity.embedding_mismatches). Provably different: bad input."""
    embedding = cfg.embedding.model_dump(mode="json")
    differ, unverifiable = embedding_mismatches(training.index, embedding, training.dims)
    source = uris.join(training.uri, INDEX_MANIFEST)
    if differ:
        field, was, now = differ[0]
        raise InputError(
            source,
            f"the training table was embedded with {was!r}, the scan embeds with {now!r}: their scores are not "
            "comparable (set the scan's embedding to the index's, or index again)",
            field=f"config.embedding.{field}",
        )
    for field, was, now in unverifiable:
        log.warning(
            "%s: config.embedding.%s is %r, the scan's is %r; raymem cannot read both to compare them: they "
            "must be the same model, or the join's scores mean nothing",
            source,
            field,
            was,
            now,
        )


def scan_id_for(cfg: ScanConfig) -> str:
    """The id a scan of this config gets today: from the content of its inputs (raymem.identity)."""
    prompts, training = check_inputs(cfg)
    return scan_id_of(cfg, scan_identity(cfg, prompts, training))


# -- stages, in the order they run ------------------------------------------------------------------------
def _run(cfg: ScanConfig, outputs: ScanOutputs, prompts, training, timer, rerun_failed: bool) -> ScanResult:
    scan_id = outputs.scan_id
    runtime.data_context()
    associations = _mine(cfg, prompts, training, timer)
    probes = _scan_probes(prompts, associations, cfg.signals.implied_controls, cfg.signals.placebo_names)

    text_cache = TextCache(outputs.text_cache)
    wanted_texts = {probe.text for ps in probes.values() for probe in ps}
    with timer("text_cache"):
        have = text_cache.embeddings(wanted_texts)
    texts_by_prompt = {pid: [p.text for p in ps if p.text not in have] for pid, ps in probes.items()}
    units = expand_units(prompts, cfg, unit_fingerprint(cfg, outputs.identity["model"]), cfg.signals.null_seeds)
    warming: list = []  # the join's warming tasks, started once generation is under way
    counts = _generate(
        cfg,
        outputs,
        units,
        texts_by_prompt,
        rerun_failed,
        timer,
        lambda device: warming.extend(_warm_join(cfg, training, units, device)),
    )
    device = counts.get("resources", {}).get("device")
    texts = text_cache.embeddings(wanted_texts)
    if wanted_texts - texts.keys():  # units were reused but probes changed: encode what is missing
        with timer("encode_texts"):
            encode_missing_texts(cfg, sorted(wanted_texts - texts.keys()), outputs.text_cache)
        texts = text_cache.embeddings(wanted_texts)

    with timer("collect"):
        generations = _collect(outputs, units, scan_id)
    scan_rows = generations.filter(pc.equal(generations.column("role"), ROLE_SCAN))
    ok = scan_rows.filter(pc.equal(scan_rows.column("status"), STATUS_OK))
    counts.update(
        units=scan_rows.num_rows,
        units_ok=ok.num_rows,
        units_failed=scan_rows.num_rows - ok.num_rows,
        null_units=generations.num_rows - scan_rows.num_rows,
        noise_norm=_noise_norm_status(ok),
    )
    clip_dim = generations.schema.field("clip_embedding").type.list_size
    sscd_type = generations.schema.field("sscd_embedding").type
    sscd_dim = sscd_type.list_size if pa.types.is_fixed_size_list(sscd_type) else None
    training = training.for_spaces({"clip": clip_dim, **({"sscd": sscd_dim} if sscd_dim else {})})

    copy_mode = copy_detection_mode(cfg, training)
    # Whole-table passes ride along the join's read of the table (one read instead of three): a null or
    # repeated train_id anywhere is bad input; the entity counts and centroids are the labeler's reference.
    id_check = TrainIdCheck(training.num_rows)
    entities = {p.entity for p in prompts}
    # a requested work's own copies, sampled for the private-mark check (region detection only)
    works = {p.entity for p in prompts if p.requests_work} if cfg.signals.region_neighbours else set()
    entity_pass = (
        EntityStatsPass(training, entities, works, cfg.signals.work_copies)
        if wants_entity_stats(training, entities)
        else None
    )
    join_stats: dict = {}
    with timer("join"):
        joined = _join(
            cfg,
            training,
            ok,
            runtime.ClusterResources.current(),
            copy_mode,
            device,
            [id_check, *([entity_pass] if entity_pass else [])],
            join_stats,
            warmed=bool(warming),
        )
    if join_stats:
        counts["join"] = join_stats
    stats = entity_pass.result() if entity_pass else {}
    neighbors = {
        space: (joined.query_ids, [rows[: cfg.join.k] for rows in per_query], "join")
        for space, per_query in joined.units.items()
    }
    measured = {s: {**b, "source": joined.background_source} for s, b in joined.background.items()}
    candidates = CANDIDATES.empty_table()
    if copy_mode == MODE_CANDIDATES:
        with timer("copy_candidates"):
            found = _copy_candidates(cfg, outputs, joined, ok, runtime.ClusterResources.current(), device)
        candidates = found.table
        neighbors["sscd"] = (joined.query_ids, [found.neighbors[u] for u in joined.query_ids], "candidates")
        if found.background is not None and "sscd" not in measured:
            measured["sscd"] = {**found.background, "source": "candidates"}
        counts["copy_candidates"] = found.stats
    with timer("pair_scores"):
        _pair_scores(cfg, training, neighbors, copy_mode)

    tables = {
        "prompts": prompts_table(prompts, scan_id),
        # columns that units computed by an older raymem lack are null
        "generations": conformed(generations, generations_schema(clip_dim, sscd_dim)),
        "texts": _texts_table(scan_id, probes, texts, clip_dim),
        "neighbors": neighbors_table(scan_id, neighbors),
        "candidates": candidates,
        "entities": entities_table(scan_id, sorted({p.entity for p in prompts}), stats, associations, clip_dim),
        "background": background_table(scan_id, measured, joined.background_source),
    }
    # The labeler reads the tables, exactly as `raymem calibrate` will read them back.
    inputs = LabelInputs.from_tables({**tables, "pixel_checks": pixel_checks_table(scan_id, {})})
    with timer("pixel_confirmation"):
        pairs = pixel_check_pairs(inputs, cfg.thresholds)
        limits = FetchLimits.of(cfg.embedding.copy_detection.candidates)
        # the background is read only when some image needs it: what sampled training images reach
        background = _pixel_background_pairs(cfg, joined, inputs.copy_space) if pairs else {}
        pixels, pixel_bg = (
            confirm_pairs(pairs, cfg.signals.pixel_size, cfg.signals.pixel_tiles, limits=limits, background=background)
            if pairs
            else ({}, {})
        )
        tables["pixel_checks"] = pixel_checks_table(scan_id, pixels, pixel_bg)
        inputs = replace(
            inputs,
            pixels=pixel_evidence(tables["pixel_checks"]),
            pixel_background=pixel_evidence(tables["pixel_checks"], "background"),
        )
    with timer("region_checks"):
        # Scan images, and sampled training images against their own nearest training images (what
        # distinct training images share), in one pass: each training image is fetched once.
        # Also the training images compared with one scan image against each other: whether two of its
        # matches are one duplicated patch is measured, not only bounded (regions.same_region).
        # A requested work's sampled copies are compared with its images too (read by the private-mark
        # rule alone), but not with each other: copies of one work are one region by the tags that chose them.
        unit_pairs = region_check_pairs(inputs, cfg.signals.region_neighbours)
        pairs = {
            **{("units", u): p for u, p in with_work_copies(inputs, unit_pairs).items()},
            **{("background", u): p for u, p in _region_background_pairs(cfg, joined).items()},
            **{("training_pairs", a): p for a, p in training_pairs(unit_pairs).items()},
        }
        found = (
            check_regions(
                pairs,
                cfg.signals.pixel_size,
                cfg.signals.region_grid,
                limits=limits,
                training_queries=[k for k in pairs if k[0] != "units"],  # fetched as training images are
            )
            if pairs
            else {}
        )
        tables["region_checks"] = region_checks_table(
            scan_id,
            *({u: evs for (qs, u), evs in found.items() if qs == q} for q in ("units", "background", "training_pairs")),
        )
        inputs = replace(
            inputs,
            regions=region_evidence(tables["region_checks"]),
            region_background=region_evidence(tables["region_checks"], "background"),
            region_pairs=region_evidence(tables["region_checks"], "training_pairs"),
        )
    with timer("label"):
        labels = label_units(inputs, cfg.thresholds)
        freq = {e: st.count for e, st in stats.items()}
        tables["labels"] = pa.Table.from_pylist(labels, schema=LABELS_TABLE)
        tables["prompt_tallies"] = pa.Table.from_pylist(prompt_tallies(labels), schema=PROMPT_TALLIES)
        e_tallies = entity_tallies(labels, freq)
        tables["entity_tallies"] = pa.Table.from_pylist(e_tallies, schema=ENTITY_TALLIES)

    with timer("publish"):
        for name, table in tables.items():
            outputs.stage(name, table)
        published = outputs.tables()
    background = inputs.background
    counts.update(
        training_rows=training.num_rows,
        neighbors=tables["neighbors"].num_rows,
        prompts=len(prompts),
        background_sample=background[next(iter(background))].n if background else 0,
        pixel_checks=len(pixels),
        region_checks=tables["region_checks"].num_rows,
        training_files_skipped=training.skipped,
        background_source=joined.background_source,
        copy_detection=copy_mode,
        **{f"label_{k}": sum(1 for r in labels if r["label"] == k) for k in LABELS},
    )
    counts["background_p95"] = {s: b.p95 for s, b in background.items()}
    controls = implied_control_rate(labels, cfg.thresholds.null_alpha, cfg.thresholds.mi_needs_entity)
    if controls:
        counts["implied_controls"] = controls
        (log.warning if mi_unspecific(controls) else log.info)("MI controls: %s", describe_controls(controls))
    counts["mined_elements"] = {
        e: {"implied": [vars(a) for a in assoc.implied], "instance": [vars(a) for a in assoc.instance]}
        for e, assoc in associations.items()
    }
    return ScanResult(
        scan_id=scan_id, manifest_uri=outputs.manifest_uri, tables=published, counts=counts, entity_tallies=e_tallies
    )


def _noise_norm_status(ok: pa.Table) -> str:
    """Whether Wen et al.'s noise norm was measured: null norms on every image mean the pipeline ran no
    classifier-free-guidance batch, and the manifest says so instead of leaving bare nulls."""
    measured = pc.sum(
        pc.or_(pc.is_valid(ok.column("noise_norm")), pc.is_valid(ok.column("noise_norm_negative")))
    ).as_py()
    if not ok.num_rows or measured:
        return "measured"
    return (
        "not measured: the pipeline ran no classifier-free-guidance batch (a guidance-distilled model such "
        "as Flux, or guidance_scale <= 1), so there is no unconditional prediction to compare with"
    )


def _mine(cfg: ScanConfig, prompts: list[Prompt], training: TrainingTable, timer) -> dict[str, EntityAssociations]:
    """Implied / instance elements of each entity, mined from the training captions (when switched on)."""
    if not (cfg.signals.mine_elements and cfg.signals.mined_per_entity):
        return {}
    t = cfg.thresholds
    with timer("mine_elements"):
        return mine_associations(
            training,
            {p.entity: caption_terms(p.entity) for p in prompts},
            min_lift=t.min_lift,
            min_support=t.min_support,
            instance_support=t.instance_support,
            per_entity=cfg.signals.mined_per_entity,
        )


def _scan_probes(
    prompts: list[Prompt], associations: dict, controls: int, placebo_names: bool = True
) -> dict[str, list[Probe]]:
    """Every prompt's probe texts: its own (`_probes`), then up to `controls` implied elements of the
    scan's other entities as controls (`probes.control_elements`)."""
    own = {p.prompt_id: _probes(p, associations.get(p.entity), placebo_names=placebo_names) for p in prompts}
    implied_by_entity: dict[str, set[str]] = {}
    for p in prompts:
        implied = {q.element for q in own[p.prompt_id] if q.kind in ("implicit", "mined")}
        implied_by_entity.setdefault(p.entity, set()).update(implied)
    vocabulary = set().union(*implied_by_entity.values()) if implied_by_entity else set()
    if not controls or not vocabulary:
        return own
    out = {}
    for p in prompts:
        asked = implied_by_entity[p.entity] | {q.element for q in own[p.prompt_id] if q.element}
        picked = control_elements(p.prompt_id, asked, vocabulary, controls)
        out[p.prompt_id] = _probes(p, associations.get(p.entity), picked, placebo_names)
    return out


def _probes(
    p: Prompt, assoc: EntityAssociations | None, controls: tuple[str, ...] = (), placebo_names: bool = True
) -> list[Probe]:
    """A prompt's probe texts, with its entity's mined elements that the prompt does not already name."""
    excluded = excluded_terms(p.prompt, p.entity, p.explicit_elements)

    def allowed(elements):
        return tuple(a.element for a in elements if not set(a.element.split()) & excluded)

    # Mined implied elements stand in only when the prompt set lists none (the user's list wins).
    mined = allowed(assoc.implied) if assoc and not p.implicit_elements else ()
    instance = allowed(assoc.instance) if assoc else ()
    return probes_for(
        p.prompt,
        p.entity,
        p.entity_class,
        p.explicit_elements,
        p.implicit_elements,
        mined,
        instance,
        controls,
        placebo_names=placebo_names,
    )


def _warm_join(cfg: ScanConfig, training: TrainingTable, units, device: str) -> list:
    """Warm the workers of the join this scan will run (`join.warm_join_workers`), its size estimated
    before the images exist: every unit and the background sample the join will take.

    Only ever a speed-up: if starting the warming fails (Ray refusing the tasks, the cluster's resources
    unreadable), the scan logs why and goes on; its join then imports torch itself, as a cold one does."""
    if cfg.join.mode == "faiss":
        return []
    try:
        queries = len(units) + _background_sample_size(cfg, training, copy_detection_mode(cfg, training))
        macs = training.num_rows * queries * sum(training.dims.values())
        plan = runtime.plan_join(cfg.resources.join_actors, runtime.ClusterResources.current(), device)
        return warm_join_workers(plan, cfg.join.first_pass, macs)
    except Exception as err:  # noqa: BLE001 -- an optimisation must never fail the scan
        log.warning("join warming not started (%s: %s); the join starts cold", type(err).__name__, err)
        return []


def _generate(
    cfg: ScanConfig, outputs: ScanOutputs, units, texts_by_prompt, rerun_failed: bool, timer, while_generating=None
):
    """Generate and embed the units not yet computed; `while_generating(device)` is called once the
    first images are back (the stage's actors hold their workers by then)."""
    store = UnitStore(outputs.unit_store)
    with timer("resume_check"):
        known = store.status({u.unit_id for u in units})
    todo = [u for u in units if u.unit_id not in known or (rerun_failed and known[u.unit_id] == STATUS_FAILED)]
    log.info("%d units: %d already computed, %d to generate", len(units), len(units) - len(todo), len(todo))
    if not todo:
        return {"units_generated": 0, "units_reused": len(units)}
    with timer("choose_device"):
        choice = runtime.choose_device(cfg.resources, runtime.ClusterResources.current())
    # Read again: a GPU node the autoscaler added while choose_device waited is part of the plan.
    plan = runtime.plan_generation(cfg.resources, runtime.ClusterResources.current(), choice.device)
    log.info("generating on %s (%s): %s", choice.device, choice.reason, plan.describe())
    chunks = work_chunks(todo, cfg.generation.batch_size, texts_by_prompt)
    results = runtime.map_stage(
        "generate",
        chunks,
        GenerateEmbed,
        plan,
        constructor_kwargs={
            "cfg": cfg,
            "scan_id": outputs.scan_id,
            "store_uri": outputs.unit_store,
            "text_cache_uri": outputs.text_cache,
        },
        blocks=min(len(chunks), max(1, plan.actors * 4)),
        calls_per_actor=cfg.resources.chunks_at_once,
    )
    failed = 0
    progress = runtime.Progress("generate", len(todo), "units")
    started = False
    with timer("generate"):
        for batch in results:
            if not started and while_generating is not None:
                started = True
                while_generating(choice.device)
            failed += int(pc.sum(pc.equal(batch.column("status"), STATUS_FAILED)).as_py() or 0)
            progress.advance(batch.num_rows, f"{failed} failed" if failed else "")
    progress.finish()
    return {
        "units_generated": len(todo),
        "units_reused": len(units) - len(todo),
        "units_failed_now": failed,
        "resources": {
            "device": choice.device,
            "device_reason": choice.reason,
            "generate": {**plan.describe(), "chunks_at_once": cfg.resources.chunks_at_once},
        },
    }


@dataclass
class _Joined:
    query_ids: list[str]  # the scored scan units, in query order
    units: dict[str, list[list[dict]]]  # space -> each unit's neighbour rows by rank (built once)
    background_queries: Queries | None  # the sampled training rows, when the scan sampled a background
    background_topk: dict[str, RunningTopK]  # space -> their top-k
    background: dict[str, dict]  # space -> percentiles (from the index, or measured now)
    background_source: str  # index | scan


def _background_sample_size(cfg: ScanConfig, training: TrainingTable, copy_mode: str) -> int:
    """How many training rows the join samples as background queries (0: the index's background serves)."""
    stored = stored_background(training.index, cfg.thresholds)
    sample = 0 if stored else BACKGROUND_SAMPLE
    if cfg.signals.region_neighbours:  # region copies are measured against sampled training images too
        sample = max(sample, cfg.signals.region_background)
    sample = max(sample, cfg.signals.pixel_background)  # and pixel confirmations (read only when needed)
    if copy_mode == MODE_CANDIDATES and "sscd" not in stored:  # the SSCD background: the sample's candidates
        sample = max(sample, cfg.embedding.copy_detection.candidates.background_sample)
    return sample


def _join(
    cfg: ScanConfig,
    training: TrainingTable,
    ok: pa.Table,
    cluster,
    copy_mode: str,
    device,
    passes: list[TablePass],
    stats: dict | None = None,
    warmed: bool = False,
) -> _Joined:
    """Top-k neighbours of every scored scan image in every space, and the train-train background
    (the index's precomputed one when `raymem index` wrote it, else sampled in the same pass), with the
    whole-table `passes` run on the same read. With two-stage copy detection the CLIP top-k is deep
    enough to hold the copy candidates."""
    query_ids = ok.column("unit_id").to_pylist()
    queries = {
        "units": Queries(
            ids=query_ids, matrices={s: embedding_matrix(ok.column(SPACE_COLUMNS[s])) for s in training.dims}
        )
    }
    two_stage = copy_mode == MODE_CANDIDATES
    stored = stored_background(training.index, cfg.thresholds)
    sample = _background_sample_size(cfg, training, copy_mode)
    bg = background_sample(training, sample, list(training.dims)) if sample else None
    if bg is not None:
        queries["background"] = bg
    k = max(cfg.join.k, cfg.embedding.copy_detection.candidates.k) if two_stage else cfg.join.k
    if query_ids or bg is not None:
        topk = nearest_neighbours(
            training,
            queries,
            k,
            batch_rows=cfg.join.batch_rows,
            plan=runtime.plan_join(cfg.resources.join_actors, cluster, device),
            mode=cfg.join.mode,
            nprobe=cfg.join.nprobe,
            first_pass=cfg.join.first_pass,
            passes=passes,
            stats=stats,
            warmed=warmed,
        )
    else:  # nothing to join: the passes read the table on their own
        topk = {}
        run_passes(training, passes, fragment_rows=DEFAULT_FRAGMENT_ROWS, name="table_passes")
    units = {space: running.rows for space, running in topk.get("units", {}).items()} if query_ids else {}
    background_topk = topk.get("background", {})
    return _Joined(
        query_ids,
        units,
        bg,
        background_topk,
        stored or background_from(background_topk, cfg.thresholds),
        "index" if stored else "scan",
    )


def _region_background_pairs(cfg: ScanConfig, joined: _Joined) -> dict[str, tuple[str, list]]:
    """The first `signals.region_background` sampled training images and their own top
    `region_neighbours` other training images per space (the copy space first, as for scan images)."""
    bg, n, per = joined.background_queries, cfg.signals.region_background, cfg.signals.region_neighbours
    if bg is None or not n or not per or not bg.image_uris:
        return {}
    spaces = [s for s in ("sscd", "clip") if s in joined.background_topk]
    rows = {s: joined.background_topk[s].rows for s in spaces}
    pairs = {}
    for i, (train_id, uri) in enumerate(zip(bg.ids[:n], bg.image_uris[:n])):
        compare = neighbours_to_compare({s: rows[s][i] for s in spaces}, spaces, per) if uri else []
        if compare:
            pairs[train_id] = (uri, compare)
    return pairs


def _pixel_background_pairs(cfg: ScanConfig, joined: _Joined, copy_space: str) -> dict[str, PixelPair]:
    """The first `signals.pixel_background` sampled training images and their nearest other training
    image in the copy space, as scan images are paired with theirs: {train_id: (its image uri, nearest
    train_id, nearest image uri, copy-space score)}. With two-stage copy detection the table has no
    SSCD embeddings: the nearest in CLIP space, with no score (a CLIP cosine is not comparable with
    the SSCD near-duplicate link, so only exact duplicates are left out of that background)."""
    bg, n = joined.background_queries, cfg.signals.pixel_background
    space = copy_space if copy_space in joined.background_topk else "clip"
    if bg is None or not n or not bg.image_uris or space not in joined.background_topk:
        return {}
    rows = joined.background_topk[space].rows
    pairs = {}
    for i, (train_id, uri) in enumerate(zip(bg.ids[:n], bg.image_uris[:n])):
        if uri and rows[i]:
            top = rows[i][0]
            score = float(top["score"]) if space == copy_space else None
            pairs[train_id] = PixelPair(uri, top["train_id"], top.get("image_uri"), score)
    return pairs


def _pair_scores(cfg: ScanConfig, training: TrainingTable, neighbors: dict, copy_mode: str) -> None:
    """Neighbours above the replication threshold get their similarity to each other (raymem.duplicates),
    read back from the training table (two-stage copy detection sets them from the fetched candidates)."""
    space = "clip" if copy_mode == MODE_OFF else "sscd"
    floor = cfg.thresholds.clip_replication if space == "clip" else cfg.thresholds.replication
    if floor is None or space not in neighbors or neighbors[space][2] != "join" or training.layout != "parquet":
        return
    rows = neighbors[space][1]
    found = read_embeddings(SPACE_COLUMNS[space], rows_to_read(rows, floor))
    attach_pair_scores(rows, floor, lambda r: found.get((r.get("path"), str(r["train_id"]))))


def _copy_candidates(cfg: ScanConfig, outputs: ScanOutputs, joined: _Joined, ok: pa.Table, cluster, device):
    """Two-stage copy detection: fetch and SSCD-embed the CLIP candidates (raymem.copy_candidates)."""
    c = cfg.embedding.copy_detection.candidates
    units = CandidateQueries(
        joined.query_ids,
        [rows[: c.k] for rows in joined.units["clip"]] if joined.query_ids else [],
        embedding_matrix(ok.column(SPACE_COLUMNS["sscd"])) if joined.query_ids else None,
    )
    background = None
    bg = joined.background_queries
    # (the sample may exist only for region copies when the index already stored an SSCD background)
    stored_sscd = joined.background_source == "index" and "sscd" in joined.background
    if bg is not None and c.background_sample and "clip" in joined.background_topk and not stored_sscd:
        n = min(c.background_sample, len(bg.ids))
        background = CandidateQueries(
            bg.ids[:n],
            [rows[: c.k] for rows in joined.background_topk["clip"].rows[:n]],
            own_uris=(bg.image_uris or [None] * n)[:n],
            own_hashes=(bg.hashes or [None] * n)[:n],
        )
    plan = runtime.plan_actors(
        ActorRange(c.actors, c.actors), cfg.resources.gpus_per_actor, cfg.resources.cpus_per_actor, cluster, device
    )
    return rescore(cfg, outputs.scan_id, units, background, plan, outputs.candidate_cache)


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


def _texts_table(scan_id: str, probes: dict[str, list[Probe]], texts: dict, clip_dim: int) -> pa.Table:
    schema = texts_schema(clip_dim)
    rows = [
        {"scan_id": scan_id, "prompt_id": pid, "kind": p.kind, "element": p.element, "text": p.text}
        for pid, ps in probes.items()
        for p in ps
        if p.text in texts
    ]
    if not rows:
        return schema.empty_table()
    table = pa.Table.from_pylist(rows, schema=schema.remove(schema.get_field_index("clip_embedding")))
    matrix = np.stack([texts[r["text"]] for r in rows])
    return table.append_column("clip_embedding", embedding_array(matrix, clip_dim)).cast(schema)


def check_model_sources(cfg: ScanConfig) -> None:
    """Every model the scan will load must be loadable from here, checked before Ray starts: local
    directories and s3:// prefixes exist (a diffusers pipeline directory has its model_index.json), and
    a hub id is in the local Hugging Face cache when the hub is offline (HF_HUB_OFFLINE=1)."""
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
    model = cfg.model.id
    if model.startswith("/") and os.path.isdir(model) and not os.path.exists(os.path.join(model, "model_index.json")):
        raise InputError(model, "not a diffusers pipeline directory: model_index.json is missing (from model.id)")
    if uris.is_remote(model) and not uris.exists(uris.join(model, "model_index.json")):
        raise InputError(model, "not a diffusers pipeline prefix: model_index.json is missing (from model.id)")
    if not model.startswith("/") and not uris.is_remote(model) and os.environ.get("HF_HUB_OFFLINE") == "1":
        _check_hub_cache(model, cfg.model.revision)
    if cfg.model.scheduler:
        from raymem.diffusion import scheduler_class

        scheduler_class(cfg.model.scheduler)


def _check_hub_cache(repo_id: str, revision: str | None) -> None:
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "model_index.json", revision=revision)
    except Exception as err:  # noqa: BLE001 - an invalid repo id is bad input like any other
        raise InputError(repo_id, f"not a usable hub id: {err} (from model.id)") from None
    if not isinstance(cached, str):
        raise InputError(
            repo_id,
            "not in the local Hugging Face cache and HF_HUB_OFFLINE=1 (from model.id): download it first, "
            "or point model.id at a local directory",
        )


__all__ = ["run_scan", "check_inputs", "scan_id_for", "ScanResult", "InputError"]
