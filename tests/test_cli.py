"""The command line: one-line errors and exit codes, from a real subprocess."""

import json
import subprocess
import sys

from tests.conftest import REPO


def raymem(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "raymem.cli", *args], capture_output=True, text=True, cwd=cwd or REPO, timeout=300
    )


def test_invalid_config_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "scan.yaml"
    bad.write_text(
        "name: x\nmodel: {id: m}\nprompts: p.jsonl\ntraining: {embeddings: t}\noutput: {uri: o}\n"
        "generation: {guidance_scale: -1}\n"
    )
    out = raymem("scan", str(bad))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"raymem: error: {bad}: generation.guidance_scale: Input should be greater than or equal to 0"
    ]
    assert out.stdout == ""


def test_bad_prompt_row_exits_2_and_writes_nothing(demo_raw, tmp_path):
    import yaml

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt_id": "a", "prompt": "x", "entity": "e"})
        + "\n"
        + json.dumps({"prompt_id": "b", "prompt": "", "entity": "e"})
        + "\n"
    )
    cfg = {**demo_raw, "prompts": str(prompts)}
    path = tmp_path / "scan.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = raymem("scan", str(path))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"raymem: error: {prompts}: row 2, field 'prompt': value is empty"]
    assert not (tmp_path / "out").exists()  # nothing written, not even a manifest


def test_validate_checks_inputs_without_running(demo_raw, tmp_path):
    import yaml

    path = tmp_path / "scan.yaml"
    path.write_text(yaml.safe_dump(demo_raw))
    out = raymem("validate", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{path}: ok (scan id tiny-")
    broken = {**demo_raw, "training": {"embeddings": str(tmp_path / "nothing")}}
    path.write_text(yaml.safe_dump(broken))
    out = raymem("validate", str(path))
    assert out.returncode == 2 and "no .parquet files found" in out.stderr


def test_validate_refuses_a_scan_that_embeds_unlike_its_index(demo_raw, tmp_path):
    """`raymem index` recorded how it embedded the training table (_index.json); a scan whose copy detector
    reads another input size would compare incomparable scores: one line naming the file and field, exit 2."""
    import yaml

    path = tmp_path / "scan.yaml"
    other = {
        **demo_raw,
        "embedding": {
            **demo_raw["embedding"],
            "copy_detection": {"model": "immaculate:sscd_distilled", "image_size": 64},
        },
    }
    path.write_text(yaml.safe_dump(other))
    out = raymem("validate", str(path))
    index = f"{demo_raw['training']['embeddings']}/_index.json"
    assert out.returncode == 2 and out.stderr.strip() == (
        f"raymem: error: {index}: field 'config.embedding.copy_detection.image_size': the training table was "
        "embedded with 128, the scan embeds with 64: their scores are not comparable (set the scan's embedding "
        "to the index's, or index again)"
    )


def test_validate_catches_models_that_cannot_load_before_ray_starts(demo_raw, tmp_path):
    import os

    import yaml

    path = tmp_path / "scan.yaml"
    not_a_pipeline = tmp_path / "weights"
    not_a_pipeline.mkdir()
    path.write_text(yaml.safe_dump({**demo_raw, "model": {"id": str(not_a_pipeline)}}))
    out = raymem("validate", str(path))
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"raymem: error: {not_a_pipeline}: not a diffusers pipeline directory: model_index.json is missing "
        "(from model.id)"
    )
    path.write_text(yaml.safe_dump({**demo_raw, "model": {"id": "nobody-here/no-such-model"}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run(
        [sys.executable, "-m", "raymem.cli", "validate", str(path)], capture_output=True, text=True, cwd=REPO, env=env
    )
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "nobody-here/no-such-model: not in the local Hugging Face cache and HF_HUB_OFFLINE=1" in out.stderr


def test_help_lists_the_commands():
    out = raymem("--help")
    assert out.returncode == 0
    for command in ("scan", "demo", "validate"):
        assert command in out.stdout


def test_embedding_storage_choices_are_the_schemas():
    """The CLI lists the storages without importing pyarrow; they must stay the schema's and the config's."""
    import typing

    from raymem.cli import build_parser
    from raymem.config import IndexConfig
    from raymem.schema import EMBEDDING_STORAGES

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    storage = next(a for a in sub.choices["import-embeddings"]._actions if a.dest == "storage")
    assert storage.choices == list(EMBEDDING_STORAGES) and storage.default == "list"
    field = IndexConfig.model_fields["embedding_storage"]
    assert list(typing.get_args(field.annotation)) == list(EMBEDDING_STORAGES) and field.default == "list"


def test_an_unreachable_ray_address_is_one_line_not_a_retry_loop(demo_raw, tmp_path):
    import socket
    import time

    import yaml

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "scan.yaml"
    path.write_text(yaml.safe_dump({**demo_raw, "ray": {"address": f"127.0.0.1:{port}"}}))
    start = time.monotonic()
    out = raymem("scan", str(path))
    assert out.returncode == 1 and time.monotonic() - start < 120
    assert out.stderr.strip().splitlines() == [
        f"raymem: error: cannot reach Ray at 127.0.0.1:{port}: Connection refused (within 10 s)"
    ]
    manifest = json.loads(next((tmp_path / "out" / "manifests").glob("*.json")).read_text())
    assert manifest["status"] == "failed" and "cannot reach Ray" in manifest["error"]
    assert manifest["failed_stage"] == "connect_ray"  # a nightly's alert says where it stopped


def test_verbosity_flags_anywhere_and_the_version():
    from raymem import __version__
    from raymem.cli import build_parser

    parser = build_parser()
    for argv in (["-v", "validate", "c.yaml"], ["validate", "c.yaml", "-v"], ["bench", "planted", "--quick", "-v"]):
        args = parser.parse_args(argv)
        assert args.verbose and not args.quiet, argv
    assert parser.parse_args(["query", "select 1", "-q"]).quiet
    out = raymem("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"raymem {__version__}"
    # every positional argument says what it is
    for name in ("scan", "report", "diff", "calibrate", "index", "validate", "query"):
        text = raymem(name, "--help").stdout
        assert "positional arguments:" in text and "\n  config\n" not in text and "\n  sql\n" not in text, name


def test_a_scan_reports_progress_per_stage_and_closes_with_a_summary(demo_raw, demo_root, tmp_path):
    """Without a terminal (as in a Ray Job's log): one plain progress line per stage on stderr, and a
    closing summary with the labels, the time per stage and the next commands."""
    import yaml

    lines = (demo_root / "prompts.jsonl").read_text().splitlines()[:2]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    cfg = {**demo_raw, "prompts": str(tmp_path / "prompts.jsonl")}
    cfg["generation"] = {**cfg["generation"], "seeds_per_prompt": 2, "num_inference_steps": 2}
    cfg["signals"] = {**cfg["signals"], "null_seeds": 0}
    path = tmp_path / "scan.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = raymem("scan", str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    progress = [line for line in out.stderr.splitlines() if "raymem.progress" in line]
    assert any("generate: 4 units to do" in line for line in progress)
    assert any("generate: 4/4 units (100%)" in line and " in " in line for line in progress)
    assert any("join: " in line and "training rows (100%)" in line for line in progress)
    stdout = out.stdout
    assert "labels: MU " in stdout and "time: " in stdout and "generate " in stdout
    assert f"next: raymem report latest --output {tmp_path / 'out'}" in stdout
    assert "\x1b[" not in stdout  # no colour codes in a log
    assert "streaming_executor" not in out.stderr  # Ray Data's per-dataset INFO lines stay in its log file
    # A normal run on a laptop's local Ray: raymem's own lines and nothing of Ray's (no token-auth
    # notice, no "progress bars disabled", no deprecation warning) but the one known Ray 2.60 line per
    # actor pool (ray-project/ray#57733; README, Commands), kept because actors must stay restartable.
    known = "has constructor arguments in the object store and max_restarts > 0"
    foreign = [line for line in out.stderr.splitlines() if "raymem." not in line and known not in line]
    # ... and, on some runs, Ray Data's file-listing teardown race (README, Commands): one traceback from
    # a ListFiles actor ending in InterruptedError, nothing else
    listing = [line for line in foreign if "(ListFiles pid=" in line]
    assert not listing or (listing[-1].endswith("InterruptedError") and "dynamic_work_queue" in "".join(listing))
    assert [line for line in foreign if "(ListFiles pid=" not in line] == []
    quiet = raymem("scan", str(path), "-q")
    assert quiet.returncode == 0 and "raymem.progress" not in quiet.stderr
