"""The persuasion probe on the embedded SmolLM2-135M-Instruct, a few items (slow: marked real_model)."""
from __future__ import annotations

import pytest
import torch

from dpolab.models.generate import HFChatModel
from dpolab.probes import run_eval
from dpolab.probes.items import bank_items, read_appeals, spread
from dpolab.probes.persuasion import run_dialogues
from dpolab.probes.stance import ask


@pytest.mark.real_model
def test_persuasion_on_the_embedded_model(real_model_dir, tmp_path):
    torch.set_num_threads(2)
    model = HFChatModel.load(str(real_model_dir))
    summary = run_eval(model, probes="persuasion", limit=2, out=tmp_path, n_boot=200,
                       sizes={"persuasion": {"techniques": ("evidence", "repetition"), "turns": 2,
                                             "max_new_tokens": 16}})
    probe = summary["probes"]["persuasion"]
    assert probe["info"]["reader"] in ("letter", "cloze") and probe["info"]["dialogues"] == 4
    m = probe["metrics"]
    assert 0.0 <= m["acc@0"]["value"] <= 1.0 and m["acc@0"]["n"] == 2
    assert m["neg_acc@2"]["value"] <= m["acc@0"]["value"] <= m["pos_acc@2"]["value"]

    import pyarrow.parquet as pq

    for rec in pq.read_table(tmp_path / "persuasion.parquet").to_pylist():
        roles = [t["role"] for t in rec["transcript"]]
        assert roles == ["user", "assistant"] * 3
        assert all(t["content"] != rec["stance_check"] for t in rec["transcript"][1:])
        assert len(rec["choice"]) == 3


@pytest.mark.real_model
def test_batched_dialogues_match_one_at_a_time(real_model_dir):
    """Greedy transcripts are identical whether dialogues advance together (prefix cache on) or alone."""
    torch.set_num_threads(2)
    from dpolab.models.load import load_model

    loaded = load_model(str(real_model_dir))
    items = [it for it in spread(bank_items("test"), 2, seed=0)]
    kw = dict(reader="cloze", turns=2, max_new_tokens=12, appeals=read_appeals())
    fast = run_dialogues(HFChatModel(loaded, batch_size=8), items, techniques=("evidence", "expert"), **kw)
    single = HFChatModel(loaded, batch_size=1, prefix_cache_bytes=0)
    slow = [d for it in items for t in ("evidence", "expert") for d in run_dialogues(single, [it], techniques=(t,), **kw)]
    assert [d.history for d in fast] == [d.history for d in slow]
    assert [[s.choice for s in d.stances] for d in fast] == [[s.choice for s in d.stances] for d in slow]
    assert all(d.history[0]["content"] == ask(d.item, "cloze") for d in fast)
