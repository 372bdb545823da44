"""Every published column is described once, in the Parquet files and in docs/schema.md."""

import pyarrow as pa

from raymem import schema
from raymem.column_docs import TABLES, description, render, with_descriptions
from tests.conftest import REPO


def test_every_column_of_every_published_table_is_described():
    schemas = {
        "prompts": schema.PROMPTS,
        "generations": schema.generations_schema(8, 8),
        "texts": schema.texts_schema(8),
        "neighbors": schema.NEIGHBORS,
        "candidates": schema.CANDIDATES,
        "entities": schema.entities_schema(8),
        "background": schema.BACKGROUND,
        "pixel_checks": schema.PIXEL_CHECKS,
        "region_checks": schema.REGION_CHECKS,
        "labels": schema.LABELS_TABLE,
        "prompt_tallies": schema.PROMPT_TALLIES,
        "entity_tallies": schema.ENTITY_TALLIES,
    }
    assert set(schemas) == set(schema.PUBLISHED_TABLES) == set(TABLES)
    missing = [f"{t}.{f.name}" for t, s in schemas.items() for f in s if not description(t, f.name)]
    assert missing == []


def test_docs_schema_md_is_the_rendered_text():
    assert (REPO / "docs" / "schema.md").read_text() == render(), "run: python -m raymem.column_docs > docs/schema.md"


def test_descriptions_travel_as_parquet_field_metadata():
    table = with_descriptions("background", schema.BACKGROUND.empty_table())
    meta = table.schema.field("p95").metadata
    assert meta[b"description"].decode().startswith("95th percentile")
    assert table.schema.field("p95").type == pa.float64()
