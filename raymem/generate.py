"""Generate + embed: the GPU stage.

The driver expands prompts x seeds (and each prompt's null, see raymem.probes) into `Unit`s with
deterministic ids and groups them into work chunks. `GenerateEmbed` is a Ray Data callable class (one
actor per GPU, or CPU actors on a CPU-only cluster) that, per chunk, samples the images, writes them as
PNG, embeds them with open_clip and SSCD, encodes the chunk's probe texts with the same CLIP model, and
writes one Parquet file per chunk into the unit store. A unit that raises is retried alone and, if it
still fails, recorded with status 'failed' and its error -- never dropped.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import socket
import threading
import time
import traceback
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from raymem import uri as uris
from raymem.config import ScanConfig
from raymem.outputs import parquet_bytes
from raymem.probes import null_prompt
from raymem.prompts import Prompt
from raymem.schema import (
    ROLE_NULL,
    ROLE_SCAN,
    STATUS_FAILED,
    STATUS_OK,
    TEXT_CACHE,
    embedding_array,
    generations_schema,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """One image to generate: a prompt (or its null) and a seed."""

    unit_id: str
    prompt_id: str  # "<parent>::null" for null units
    parent_prompt_id: str
    role: str  # ROLE_SCAN | ROLE_NULL
    prompt: str  # the text the pipeline is prompted with
    entity: str
    seed: int


def unit_fingerprint(cfg: ScanConfig, model_fingerprint: str) -> str:
    """Everything besides the prompt and seed that determines a unit's image and embeddings."""
    payload = {
        "model": model_fingerprint,
        "dtype": cfg.model.dtype,
        # batch_size is left out on purpose: per-unit generators make images independent of batching.
        "generation": cfg.generation.model_dump(mode="json", exclude={"batch_size", "seed_base", "seeds_per_prompt"}),
        # how training candidates are fetched does not change a generated image or its embeddings
        "embedding": cfg.embedding.model_dump(mode="json", exclude={"copy_detection": {"candidates"}}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def make_unit_id(fingerprint: str, role: str, prompt_id: str, prompt: str, seed: int) -> str:
    """Deterministic: the same model, settings, prompt and seed always give the same id (and image)."""
    key = json.dumps([fingerprint, role, prompt_id, prompt, int(seed)])
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def expand_units(prompts: list[Prompt], cfg: ScanConfig, fingerprint: str, null_seeds: int = 0) -> list[Unit]:
    """prompt x seed units, plus `null_seeds` units of each prompt's null (when it has a class noun)."""
    g = cfg.generation
    units = []
    for p in prompts:
        for seed in range(g.seed_base, g.seed_base + g.seeds_per_prompt):
            uid = make_unit_id(fingerprint, ROLE_SCAN, p.prompt_id, p.prompt, seed)
            units.append(Unit(uid, p.prompt_id, p.prompt_id, ROLE_SCAN, p.prompt, p.entity, seed))
        if p.entity_class and null_seeds:
            text = null_prompt(p.prompt, p.entity, p.entity_class)
            pid = f"{p.prompt_id}::null"
            for seed in range(g.seed_base, g.seed_base + null_seeds):
                uid = make_unit_id(fingerprint, ROLE_NULL, pid, text, seed)
                units.append(Unit(uid, pid, p.prompt_id, ROLE_NULL, text, p.entity, seed))
    return units


def work_chunks(units: list[Unit], batch_size: int, texts_by_prompt: dict[str, list[str]]) -> list[dict[str, str]]:
    """Fixed chunks of units (the pipeline batch), so a unit's batch-mates never depend on Ray's blocks.

    Each chunk also carries the probe texts of its prompts that the text cache lacks; the actor, which
    has the CLIP model loaded anyway, encodes them. A text goes with the first chunk that needs it.
    """
    chunks, sent = [], set()
    for start in range(0, len(units), batch_size):
        part = units[start : start + batch_size]
        key = hashlib.sha256("".join(u.unit_id for u in part).encode()).hexdigest()[:16]
        texts = []
        for u in part:
            for text in texts_by_prompt.get(u.parent_prompt_id, []):
                if text not in sent:
                    sent.add(text)
                    texts.append(text)
        chunks.append({"chunk_id": key, "units": json.dumps([asdict(u) for u in part]), "texts": json.dumps(texts)})
    return chunks


def image_uri(output_uri: str, model_name: str, unit_id: str) -> str:
    return uris.join(output_uri, "images", f"model={model_name}", unit_id[:2], f"{unit_id}.png")


def _one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text[:2000]


def pick_device():
    """The GPU Ray assigned to this actor, else the CPU (never a GPU Ray did not assign)."""
    import ray
    import torch

    gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    if gpu_ids and torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray narrows CUDA_VISIBLE_DEVICES to the assigned GPU(s)
    return torch.device("cpu")


class GenerateEmbed:
    """Ray Data callable class: work chunks in, one summary row per unit out.

    An actor runs `resources.chunks_at_once` calls at once, in threads, so that one chunk's CPU work — PNG
    encoding, the CLIP/SSCD preprocessing, the Parquet writes — runs while the next chunk is sampled: on
    a GPU that work otherwise leaves the card idle (docs/gpu.md). The pipeline and the encoders are used
    by one thread at a time (`_models`); the steps between are safe to run beside them."""

    def __init__(self, cfg: ScanConfig, scan_id: str, store_uri: str, text_cache_uri: str):
        import torch

        from raymem.diffusion import NoiseNormRecorder, load_pipeline
        from raymem.encoders import ClipEncoder, CopyDetector

        self.cfg, self.scan_id, self.store_uri, self.text_cache_uri = cfg, scan_id, store_uri, text_cache_uri
        self.device = pick_device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(cfg.resources.cpus_per_actor)))
        self.pipe = load_pipeline(cfg.model, self.device)
        self.recorder = NoiseNormRecorder(self.pipe, cfg.generation.noise_norm_steps)
        self._told_noise_norm = False  # why the noise norm is not measured is logged once per actor
        self.clip = ClipEncoder(cfg.embedding.clip, self.device)
        cd = cfg.embedding.copy_detection
        self.sscd = (
            CopyDetector(cd, self.device, threads=max(1, int(cfg.resources.cpus_per_actor))) if cd.model else None
        )
        self.schema = generations_schema(self.clip.dim, self.sscd.dim if self.sscd else None)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        self._prompt_embeddings: dict[str, np.ndarray] = {}
        # The pipeline (its scheduler and noise-norm hooks hold per-call state) and the encoders: one
        # thread at a time. Everything else a call does runs outside it.
        self._models = threading.Lock()
        self._io = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, int(cfg.resources.cpus_per_actor)))
        log.info("GenerateEmbed on %s (CUDA_VISIBLE_DEVICES=%r)", self.device, self.visible)

    # -- per chunk -----------------------------------------------------------------------------
    def __call__(self, batch: pa.Table) -> pa.Table:
        summaries = []
        for chunk_id, units_json, texts_json in zip(
            batch.column("chunk_id").to_pylist(), batch.column("units").to_pylist(), batch.column("texts").to_pylist()
        ):
            units = [Unit(**u) for u in json.loads(units_json)]
            rows = self._run_chunk(units)
            suffix = f"{chunk_id}-{int(time.time() * 1e3)}-{os.getpid()}"
            self._write_texts(suffix, json.loads(texts_json))
            gen_uri = uris.join(self.store_uri, "generations", f"part-{suffix}.parquet")
            uris.write_bytes_atomic(gen_uri, parquet_bytes(self._table(rows)))
            summaries += [{"unit_id": r["unit_id"], "status": r["status"], "error": r["error"]} for r in rows]
        return pa.Table.from_pylist(
            summaries, schema=pa.schema([("unit_id", pa.string()), ("status", pa.string()), ("error", pa.string())])
        )

    def _sample(self, units: list[Unit]):
        from raymem.diffusion import sample

        out = sample(self.pipe, self.recorder, [u.prompt for u in units], [u.seed for u in units], self.cfg.generation)
        if self.recorder.reason and not self._told_noise_norm:
            log.warning("noise norm not measured: %s", self.recorder.reason)
            self._told_noise_norm = True
        return out

    def _run_chunk(self, units: list[Unit]) -> list[dict]:
        with self._models:
            start = time.perf_counter()
            try:
                samples = [self._sample(units)]
                groups = [units]
            except Exception:  # one bad unit must not sink its batch-mates: retry each alone
                log.warning("chunk failed, retrying %d units one by one:\n%s", len(units), traceback.format_exc())
                samples, groups = [], []
                for u in units:
                    try:
                        samples.append(self._sample([u]))
                        groups.append([u])
                    except Exception as err:  # noqa: BLE001 - recorded as data
                        samples.append(err)
                        groups.append([u])
            gen_seconds = (time.perf_counter() - start) / max(1, len(units))
        rows = []
        for group, result in zip(groups, samples):
            if isinstance(result, BaseException):
                rows.append(self._failed_row(group[0], result, gen_seconds))
                continue
            rows += self._embed_rows(group, result, gen_seconds)
        return rows

    def _prompt_embedding(self, text: str) -> np.ndarray:
        """(Called holding `_models`.)"""
        if text not in self._prompt_embeddings:
            self._prompt_embeddings[text] = self.clip.encode_texts([text])[0]
        return self._prompt_embeddings[text]

    def _save_image(self, unit: Unit, pixels: np.ndarray) -> str:
        uri = image_uri(self.cfg.output.uri, self.cfg.model_name, unit.unit_id)
        uris.write_bytes(uri, _png_bytes(pixels))
        return uri

    def _embed_rows(self, units: list[Unit], samples, gen_seconds: float) -> list[dict]:
        # PNG encoding costs ~50 ms per 512px image: done in threads (zlib releases the GIL) while the
        # embeddings run, so it does not serialise behind the GPU work.
        saves = [self._io.submit(self._save_image, u, samples.images[i]) for i, u in enumerate(units)]
        rows = []
        try:
            start = time.perf_counter()
            images = list(samples.images)
            clip_in = self.clip.prepare_images(images)  # CPU work, beside the next chunk's sampling
            sscd_in = self.sscd.prepare_images(images) if self.sscd else None
            prepare_seconds = time.perf_counter() - start
            with self._models:
                start = time.perf_counter()
                clip_emb = self.clip.encode_prepared(clip_in)
                sscd_emb = self.sscd.encode_prepared(sscd_in) if self.sscd else None
                prompt_emb = {u.prompt: self._prompt_embedding(u.prompt) for u in units}
                embed_seconds = (prepare_seconds + time.perf_counter() - start) / len(units)
        except Exception as err:  # noqa: BLE001
            concurrent.futures.wait(saves)
            return [self._failed_row(u, err, gen_seconds) for u in units]
        for i, u in enumerate(units):
            try:
                prompt_score = float(prompt_emb[u.prompt] @ clip_emb[i])
                uri = saves[i].result()
                rows.append(
                    self._row(
                        u,
                        status=STATUS_OK,
                        image_uri=uri,
                        clip=clip_emb[i],
                        sscd=None if sscd_emb is None else sscd_emb[i],
                        clip_prompt_score=prompt_score,
                        **self._noise_norm(float(samples.noise_norms[i])),
                        generate_seconds=gen_seconds,
                        embed_seconds=embed_seconds,
                    )
                )
            except Exception as err:  # noqa: BLE001
                rows.append(self._failed_row(u, err, gen_seconds))
        return rows

    def _noise_norm(self, norm: float) -> dict:
        """Wen et al.'s norm is against the empty prompt; with a negative prompt the guidance batch pairs
        the prompt with it instead, so that value is kept apart (noise_norm_negative)."""
        if self.cfg.generation.negative_prompt:
            return {"noise_norm": None, "noise_norm_negative": norm}
        return {"noise_norm": norm, "noise_norm_negative": None}

    def _failed_row(self, u: Unit, err: BaseException, gen_seconds: float) -> dict:
        log.warning("unit %s (prompt %s, seed %d) failed: %s", u.unit_id, u.prompt_id, u.seed, _one_line(err))
        return self._row(u, status=STATUS_FAILED, error=_one_line(err), generate_seconds=gen_seconds)

    def _row(self, u: Unit, **fields) -> dict:
        row = {
            "scan_id": self.scan_id,
            "model_id": self.cfg.model.id,
            "unit_id": u.unit_id,
            "prompt_id": u.prompt_id,
            "parent_prompt_id": u.parent_prompt_id,
            "role": u.role,
            "prompt": u.prompt,
            "entity": u.entity,
            "seed": u.seed,
            "status": None,
            "error": None,
            "image_uri": None,
            "clip": None,
            "sscd": None,
            "clip_prompt_score": None,
            "noise_norm": None,
            "noise_norm_negative": None,
            "device": str(self.device),
            "worker": self.worker,
            "cuda_visible_devices": self.visible,
            "generate_seconds": None,
            "embed_seconds": None,
        }
        row.update(fields)
        for key in ("noise_norm", "noise_norm_negative"):
            if row[key] is not None and not np.isfinite(row[key]):
                row[key] = None
        return row

    # -- output --------------------------------------------------------------------------------
    def _table(self, rows: list[dict]) -> pa.Table:
        ok = np.array([r["clip"] is not None for r in rows])
        clip_dim = self.clip.dim
        clip = np.stack([r["clip"] if r["clip"] is not None else np.zeros(clip_dim, np.float32) for r in rows])
        columns = {}
        for field in self.schema:
            name = field.name
            if name == "clip_embedding":
                columns[name] = embedding_array(clip, clip_dim, ok)
            elif name == "sscd_embedding":
                if self.sscd is None:
                    columns[name] = pa.nulls(len(rows))
                else:
                    d = self.sscd.dim
                    m = np.stack([r["sscd"] if r["sscd"] is not None else np.zeros(d, np.float32) for r in rows])
                    columns[name] = embedding_array(m, d, ok)
            elif name == "computed_at":
                columns[name] = pa.array([int(time.time() * 1e6)] * len(rows), type=field.type)
            else:
                columns[name] = pa.array([r[name] for r in rows], type=field.type)
        return pa.table(columns, schema=self.schema)

    def _write_texts(self, suffix: str, texts: list[str]) -> None:
        if not texts:
            return
        with self._models:
            embeddings = self.clip.encode_texts(texts)
        table = text_cache_table(texts, embeddings, self.clip.dim)
        uris.write_bytes_atomic(uris.join(self.text_cache_uri, f"part-{suffix}.parquet"), parquet_bytes(table))


def text_cache_table(texts: list[str], embeddings: np.ndarray, dim: int) -> pa.Table:
    return pa.table(
        {
            "text": pa.array(texts, pa.string()),
            "clip_embedding": embedding_array(embeddings, dim),
            "computed_at": pa.array([int(time.time() * 1e6)] * len(texts), pa.timestamp("us", tz="UTC")),
        },
        schema=TEXT_CACHE(dim),
    )


def encode_missing_texts(cfg: ScanConfig, texts: list[str], text_cache_uri: str) -> None:
    """Encode probe texts no generation chunk carried (e.g. every unit was reused but a probe changed)."""
    import ray

    @ray.remote(num_cpus=1)
    def encode(cfg: ScanConfig, texts: list[str], target: str) -> None:
        from raymem.encoders import ClipEncoder

        clip = ClipEncoder(cfg.embedding.clip)
        table = text_cache_table(texts, clip.encode_texts(texts), clip.dim)
        uris.write_bytes_atomic(target, parquet_bytes(table))

    target = uris.join(text_cache_uri, f"part-fill-{int(time.time() * 1e3)}-{os.getpid()}.parquet")
    ray.get(encode.remote(cfg, texts, target))


def _png_bytes(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    # Level 1: about half the encoding time of the default for ~10 % more bytes.
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
