import datetime as dt

import pytest

from raymem.config import load_config, parse_config
from raymem.errors import ConfigError


def minimal(**over):
    raw = {
        "name": "t",
        "model": {"id": "org/model"},
        "prompts": "p.jsonl",
        "training": {"embeddings": "s3://bucket/train"},
        "output": {"uri": "s3://bucket/out"},
    }
    raw.update(over)
    return raw


def test_defaults_and_path_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(minimal())
    assert cfg.generation.seeds_per_prompt == 4
    assert cfg.thresholds.replication == 0.5 and cfg.thresholds.verbatim == 0.75
    assert cfg.model.id == "org/model"  # a hub id is not a path
    assert cfg.prompts == str(tmp_path / "p.jsonl")  # local paths become absolute
    assert cfg.training.embeddings == "s3://bucket/train"  # URIs pass through
    assert cfg.model_name == "org--model"  # hub ids keep their org


def test_local_model_dir_and_clip_local_dir_are_absolutized(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sd").mkdir()
    cfg = parse_config(
        minimal(model={"id": "sd"}, embedding={"clip": {"model": "local-dir:./clip", "pretrained": None}})
    )
    assert cfg.model.id == str(tmp_path / "sd")
    assert cfg.embedding.clip.model == f"local-dir:{tmp_path / 'clip'}"


def test_the_partition_date_is_resolved_once_at_load():
    a = parse_config(minimal(output={"uri": "s3://b/o", "scan_date": "2026-01-02"}))
    c = parse_config(minimal(output={"uri": "s3://b/o", "scan_date": "2026-01-03"}))
    assert a.scan_date == dt.date(2026, 1, 2) and a.config_hash() == c.config_hash()  # the date is not in the hash
    assert parse_config(minimal(), today=dt.date(2027, 5, 1)).scan_date == dt.date(2027, 5, 1)


@pytest.mark.parametrize(
    "over, expected",
    [
        (
            {"generation": {"seeds_per_prompt": 0}},
            "generation.seeds_per_prompt: Input should be greater than or equal to 1",
        ),
        ({"generation": {"height": 100}}, "generation.height: Value error, must be a multiple of 8, got 100"),
        ({"generation": {"seeds": 3}}, "generation.seeds: unknown field"),
        (
            {"thresholds": {"replication": 0.8, "verbatim": 0.7}},
            "thresholds: Value error, verbatim (0.7) must be >= replication (0.8)",
        ),
        ({"model": {}}, "model.id: required field is missing"),
        ({"name": "has space"}, "name: String should match pattern"),
        ({"model": {"id": "x", "dtype": "int8"}}, "model.dtype: Input should be"),
    ],
)
def test_invalid_config_is_one_line_naming_the_field(over, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(minimal(**over), "scan.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("scan.yaml: " + expected.split(":")[0])
    assert expected in message
    assert info.value.exit_code == 2


def test_missing_required_sections_counted():
    with pytest.raises(ConfigError, match=r"^c.yaml: model: required field is missing \(\+3 more\)$"):
        parse_config({"name": "x"}, "c.yaml")


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML \(line 2\)"):
        load_config(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping, got list"):
        load_config(notmap)


def test_demo_config_loads():
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    assert cfg.model_name == "sd-tiny"
    assert cfg.embedding.copy_detection.model == "immaculate:sscd_distilled"


def test_the_hub_model_example_config_loads():
    """configs/sd15.yaml, the README's "scan your own model" config: valid as shipped."""
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "sd15.yaml")
    assert cfg.model.id == "stable-diffusion-v1-5/stable-diffusion-v1-5" and cfg.output.uri.startswith("s3://")
    assert str(cfg.resources.generation_actors) == "1..8" and cfg.resources.device == "auto"


def test_index_config_example_and_errors(tmp_path, monkeypatch):
    from raymem.config import load_index_config
    from tests.conftest import REPO

    cfg = load_index_config(REPO / "configs" / "index-example.yaml")
    assert cfg.input.kind == "table" and cfg.output.startswith("s3://") and cfg.embedding.copy_detection.model
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "index.yaml"
    bad.write_text("input: {kind: folder, path: imgs}\noutput: out\nshard_size: 0\n")
    with pytest.raises(ConfigError, match=r"index.yaml: shard_size: Input should be greater than or equal to 1"):
        load_index_config(bad)
    bad.write_text("input: {kind: zip, path: imgs}\noutput: out\n")
    with pytest.raises(ConfigError, match=r"index.yaml: input.kind: Input should be 'folder', 'table' or 'webdataset'"):
        load_index_config(bad)
    good = tmp_path / "ok.yaml"
    good.write_text("input: {kind: folder, path: imgs}\noutput: out\n")
    assert load_index_config(good).input.path == str(tmp_path / "imgs")


@pytest.mark.parametrize(
    "section, values, field",
    [
        ("thresholds", {"replication": 1.5}, "thresholds.replication"),
        ("thresholds", {"replication": -3}, "thresholds.replication"),
        ("thresholds", {"cluster_similarity": 2.0}, "thresholds.cluster_similarity"),
        ("thresholds", {"element_presence": 1.2}, "thresholds.element_presence"),
        ("thresholds", {"consistency": -0.1}, "thresholds.consistency"),
        ("thresholds", {"null_alpha": 0}, "thresholds.null_alpha"),
        ("thresholds", {"entity_alpha": 0.9}, "thresholds.entity_alpha"),  # a level, at most 0.5
        ("generation", {"num_inference_steps": True}, "generation.num_inference_steps"),
        ("generation", {"seeds_per_prompt": "4"}, "generation.seeds_per_prompt"),
        ("join", {"k": 2.0}, "join.k"),
        ("signals", {"mine_elements": "yes"}, "signals.mine_elements"),
        ("signals", {"pixel_background": 10}, "signals.pixel_background"),  # too few for a 5th percentile
    ],
)
def test_out_of_range_and_wrongly_typed_values_are_one_line_errors(section, values, field):
    with pytest.raises(ConfigError) as err:
        parse_config(minimal(**{section: values}), "scan.yaml")
    message = str(err.value)
    assert message.startswith(f"scan.yaml: {field}:") and "\n" not in message


def test_the_pixel_background_is_off_or_large_enough_for_its_percentile():
    assert parse_config(minimal(signals={"pixel_background": 0})).signals.pixel_background == 0
    assert parse_config(minimal(signals={"pixel_background": 20})).signals.pixel_background == 20
    with pytest.raises(ConfigError, match=r"signals.pixel_background: .*must be 0 \(off\) or at least 20"):
        parse_config(minimal(signals={"pixel_background": 19}), "scan.yaml")


def test_whole_numbers_are_accepted_where_a_float_is_expected_and_the_date_may_be_a_string():
    cfg = parse_config(
        minimal(thresholds={"replication": 1, "verbatim": 1}, output={"uri": "s3://b", "scan_date": "2026-01-02"})
    )
    assert cfg.thresholds.replication == 1.0 and cfg.scan_date == dt.date(2026, 1, 2)


def test_a_clip_retrieval_training_path_keeps_its_prefix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    absolute = parse_config(minimal(training={"embeddings": "clip-retrieval:/data/laion"}))
    assert absolute.training.embeddings == "clip-retrieval:/data/laion"
    relative = parse_config(minimal(training={"embeddings": "clip-retrieval:laion"}))
    assert relative.training.embeddings == f"clip-retrieval:{tmp_path / 'laion'}"
    remote = parse_config(minimal(training={"embeddings": "clip-retrieval:s3://b/laion"}))
    assert remote.training.embeddings == "clip-retrieval:s3://b/laion"


def test_the_retired_null_z_says_what_replaced_it():
    with pytest.raises(ConfigError) as err:
        parse_config(minimal(thresholds={"null_z": 1.645}), "scan.yaml")
    assert "null_z was replaced by null_alpha" in str(err.value) and "\n" not in str(err.value)


def test_join_k_must_exceed_eidetic_k_so_a_common_look_can_be_seen():
    with pytest.raises(ConfigError, match=r"join.k \(10\) must be greater than thresholds.eidetic_k \(10\)"):
        parse_config(minimal(join={"k": 10}), "scan.yaml")
    assert parse_config(minimal()).join.k == 20
