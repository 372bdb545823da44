import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymem.captions import caption_terms
from raymem.mining import excluded_terms, mine_associations
from raymem.schema import embedding_array
from raymem.sources import inspect_training


def test_caption_terms():
    assert caption_terms("A view of the Mosque City with tall minarets!") == {
        "mosque",
        "city",
        "tall",
        "minarets",
        "mosque city",
        "tall minarets",
    }
    assert caption_terms(None) == set()
    assert excluded_terms("a photo of Qadira at sunset", "Qadira", ("sunset",)) == {"qadira", "sunset"}


@pytest.mark.ray
def test_mined_associations_over_a_streamed_table(local_ray, tmp_path):
    rows = []
    for i in range(100):  # Qadira: minarets in 80 captions; a tattoo in exactly 3, seen nowhere else
        extra = " with tall minarets" if i < 80 else " at noon"
        extra += " and a red tattoo" if i < 3 else ""
        rows.append(("Qadira" + extra, ["Qadira"]))
    for i in range(300):  # the rest of the world: minarets are rare, sunsets common everywhere
        rows.append(("a harbour at sunset" + (" with minarets" if i < 6 else ""), ["harbour"]))
        rows.append(("a field at sunset", []))
    ids = [str(i) for i in range(len(rows))]
    emb = embedding_array(np.eye(len(rows), 4, dtype=np.float32), 4)
    table = pa.table(
        {
            "train_id": ids,
            "clip_embedding": emb,
            "caption": [r[0] for r in rows],
            "entities": pa.array([r[1] for r in rows], pa.list_(pa.string())),
        }
    )
    (tmp_path / "t").mkdir()
    pq.write_table(table.slice(0, 350), tmp_path / "t" / "a.parquet")
    pq.write_table(table.slice(350), tmp_path / "t" / "b.parquet")
    training = inspect_training(str(tmp_path / "t"), {})
    out = mine_associations(
        training,
        {"Qadira": {"qadira"}, "harbour": {"harbour"}},
        min_lift=2.0,
        min_support=50,
        instance_support=10,
        per_entity=5,
    )
    q = out["Qadira"]
    assert q.n_entity == 100 and q.n_total == 700
    implied = {a.element: a for a in q.implied}
    assert "tall minarets" in implied and "minarets" not in implied  # the bigram subsumes the unigram
    assert implied["tall minarets"].support == 80
    assert implied["tall minarets"].lift == pytest.approx((80 / 100) / (80 / 700))
    assert "noon" not in implied  # support 20 < 50
    assert {a.element for a in q.instance} >= {"red tattoo", "tattoo"}
    assert all(a.support == 3 and a.frequency == 3 for a in q.instance if "tattoo" in a.element)
    assert not any("qadira" in a.element for a in q.implied + q.instance)
    h = out["harbour"]
    assert {a.element for a in h.implied} == set()  # 'sunset' is everywhere: lift ~1
