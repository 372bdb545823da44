"""The README is a newcomer's page that links the reference in docs/: together they must name every
config field and every output column, and the README must start with the two commands."""

import re

from raymem.config import ScanConfig
from raymem.schema import ENTITY_TALLIES, LABELS_TABLE, NEIGHBORS, PROMPT_TALLIES, generations_schema, texts_schema
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
CONFIG_DOC = (REPO / "docs" / "config.md").read_text()
OUTPUTS_DOC = (REPO / "docs" / "outputs.md").read_text()


def config_fields(model, prefix=""):
    for name, field in model.model_fields.items():
        sub = getattr(field.annotation, "model_fields", None)
        if sub is not None:
            yield from config_fields(field.annotation, f"{prefix}{name}.")
        else:
            yield prefix + name


def test_every_config_field_is_documented():
    missing = [
        f
        for f in config_fields(ScanConfig)
        if f"`{f}`" not in CONFIG_DOC
        and not re.search(rf"`{re.escape(f.rsplit('.', 1)[0])}\.\w+`, `{re.escape(f)}`", CONFIG_DOC)
    ]
    assert missing == []


def test_every_output_column_is_documented():
    tables = {
        "generations": generations_schema(4, 4),
        "texts": texts_schema(4),
        "neighbors": NEIGHBORS,
        "labels": LABELS_TABLE,
        "prompt_tallies": PROMPT_TALLIES,
        "entity_tallies": ENTITY_TALLIES,
    }
    for name, schema in tables.items():
        row = next(line for line in OUTPUTS_DOC.splitlines() if line.startswith(f"| `{name}` |"))
        for column in schema.names:
            stem = re.sub(r"_(MU|MI|ME|none)$", "_*", column)
            assert column in row or stem in row, f"{name}.{column} is not in docs/outputs.md's table"


def test_readme_starts_with_the_two_commands():
    head = README.split("## What you will see")[0]
    assert "make demo" in head and "make test" in head
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci


def test_every_linked_doc_exists():
    for target in re.findall(r"\]\(((?:docs|configs)/[^)#]+)\)", README):
        assert (REPO / target).exists(), target
    for mentioned in re.findall(r"`(configs/[\w.-]+\.yaml)`", README):
        assert (REPO / mentioned).exists(), mentioned
