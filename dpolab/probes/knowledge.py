"""Knowledge: MCQ accuracy with no persuasion, and perplexity on a held-out text shipped with the package.

Accuracy is read with the run's stance reader (and, for reference, with both readers). Perplexity is
exp(mean over chunks of the chunk's mean per-token NLL) on word chunks of the held-out text: a capability check
that a preference-trained model did not forget language modelling (the "alignment tax", Ouyang et al. 2022,
arXiv:2203.02155).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpolab.errors import DataError
from dpolab.models.chat import ChatModel
from dpolab import stance as stance_mod
from dpolab.probes.base import EvalContext, Headline, MetricTable, ProbeResult, ProbeSpec
from dpolab.banks import asset, spread


@dataclass(frozen=True, kw_only=True)
class Options:
    """n_items: test items (None: all). both_readers: also report accuracy under letter and cloze.
    chunk_words: words per perplexity chunk. n_chunks: chunks scored (None: all).
    heldout: a plain-text file replacing the shipped held-out sample.
    """

    n_items: int | None = None
    both_readers: bool = True
    chunk_words: int = 120
    n_chunks: int | None = 24
    heldout: str | None = None


def chunks(text: str, *, words: int) -> list[str]:
    """The text cut into consecutive chunks of `words` words (a shorter last chunk is dropped unless it is the
    only one), so chunk NLLs are comparable."""
    toks = text.split()
    out = [" ".join(toks[i:i + words]) for i in range(0, len(toks), words)]
    if len(out) > 1 and len(out[-1].split()) < words:
        out.pop()
    return out


def run(model: ChatModel, ctx: EvalContext, options: Options) -> ProbeResult:
    calibration = stance_mod.context_reader(model, ctx)
    reader = calibration.reader
    items = spread(ctx.items, ctx.size(options.n_items), seed=ctx.seed)
    readers = tuple(stance_mod.READERS.names()) if options.both_readers else (reader,)
    task = ctx.progress.task("knowledge", total=len(readers) + 1)
    stances = {}
    for r in readers:
        task.describe(f"knowledge: {len(items)} items, {r} reader")
        stances[r] = stance_mod.read_neutral(model, items, r)
        task.advance()

    table = MetricTable()
    table.declare("accuracy", higher_is_better=True)
    for d in sorted({it.domain for it in items}):
        table.declare(f"accuracy|domain={d}", higher_is_better=True)
    for c in sorted({it.category for it in items}):
        table.declare(f"accuracy|category={c}", higher_is_better=True)
    if options.both_readers:
        for r in readers:
            table.declare(f"accuracy_{r}", higher_is_better=True)
    table.declare("perplexity", higher_is_better=False, aggregate="exp_mean")  # per-item values are chunk NLLs
    records: list[dict[str, Any]] = []
    for j, it in enumerate(items):
        right = float(stances[reader][j].choice == it.answer)
        for name in ("accuracy", f"accuracy|domain={it.domain}", f"accuracy|category={it.category}"):
            table.add(name, it.id, right)
        if options.both_readers:
            for r in readers:
                table.add(f"accuracy_{r}", it.id, float(stances[r][j].choice == it.answer))
        records.append({
            "item_id": it.id, "kind": "mcq", "domain": it.domain, "category": it.category, "reader": reader,
            "prompt": stance_mod.ask(it, reader), "answer": it.answer,
            "choice": stances[reader][j].choice, "probs": stances[reader][j].probs,
            **{f"choice_{r}": stances[r][j].choice for r in readers},
        })

    path = Path(options.heldout) if options.heldout else asset("heldout_text.txt")
    if not path.exists():
        raise DataError(f"{path} does not exist")
    texts = chunks(path.read_text(encoding="utf-8"), words=options.chunk_words)
    if options.n_chunks is not None:
        texts = texts[: options.n_chunks]
    task.describe(f"knowledge: perplexity on {len(texts)} chunks")
    for j, (text, sc) in enumerate(zip(texts, model.score_texts(texts))):
        table.add("perplexity", f"chunk-{j:03d}", sc.nll)
        records.append({"item_id": f"chunk-{j:03d}", "kind": "perplexity", "prompt": text,
                        "nll": sc.nll, "n_tokens": sc.n_tokens})
    task.advance()
    info = {"reader": reader, "calibration": calibration.to_json(), "items": len(items),
            "items_source": ctx.items_source, "heldout": str(options.heldout or "bank"),
            "chunks": len(texts), "chunk_words": options.chunk_words}
    return table.result("knowledge", records=records, info=info, seed=ctx.seed, n_boot=ctx.n_boot)


PROBE = ProbeSpec(
    name="knowledge", options=Options, run=run, uses_items=True,
    summary="MCQ accuracy (both readers) and perplexity on held-out text",
    headlines=(Headline("knowledge accuracy", "accuracy", True), Headline("perplexity", "perplexity", False)),
    quick={"n_items": 16, "n_chunks": 2},
)
