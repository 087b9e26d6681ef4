"""The TensorBoard tracker: event files under OUT/tensorboard, one folder per run (`tensorboard --logdir
OUT/tensorboard` shows the cells side by side): a standalone training writes into that folder itself, an experiment's
own scalars into `experiment/`, each cell into `<cell name>/`."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

from dpolab.tracking.keys import name_part


class TensorBoardRun:
    """One event-file folder; the writer opens at the first write."""

    def __init__(self, logdir: Path, *, reopened: bool = False):
        self.logdir = Path(logdir)
        self.id = str(self.logdir)
        self._writer = None
        self._purge = reopened  # the next training step written hides what an interrupted run left from there on

    def ref(self) -> dict[str, Any]:
        return {"logdir": self.id}

    def _write(self, step: int | None = None):
        """The writer; for the first training step of a reopened run (a resumed training, which redoes the steps
        after its last checkpoint) a new one that purges the events from that step on."""
        from torch.utils.tensorboard import SummaryWriter

        purge = self._purge and step is not None and step > 0
        if purge and self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._writer is None:
            self._writer = SummaryWriter(log_dir=str(self.logdir), purge_step=step if purge else None)
        self._purge = self._purge and not purge
        return self._writer

    def log_params(self, params: dict[str, str]) -> None:
        rows = "\n".join(f"| {k} | {v.replace('|', chr(92) + '|')} |" for k, v in params.items())
        self._write().add_text("params", "| param | value |\n|---|---|\n" + rows, 0)

    def log_metrics(self, metrics: dict[str, float], step: int, *, once: bool = False) -> None:
        """once: a training's steps, which a resumed run redoes from its last checkpoint (see _write)."""
        writer = self._write(step if once else None)
        for k, v in metrics.items():
            writer.add_scalar(k, v, step)
        writer.flush()

    def log_text(self, name: str, text: str) -> None:
        self._write().add_text(name, text, 0)

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        """Files are MLflow's; TensorBoard lists their paths in its text tab."""
        listed = [str(p) for p in paths if Path(p).exists()]
        if listed:
            self._write().add_text("artifacts", "\n".join(f"- {p}" for p in listed), 0)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._write().add_text("tags", "\n".join(f"- {k}: {v}" for k, v in tags.items()), 0)

    def end(self, status: str) -> None:
        if self._writer is not None:
            self._writer.add_text("status", status, 0)
            self._writer.close()
            self._writer = None


class TensorBoardTracker:
    name = "tensorboard"
    package = "tensorboard"
    install = "tensorboard"

    def __init__(self, out_dir: Path, *, tracking_uri: str | None = None, experiment: str | None = None,
                 state: dict[str, Any] | None = None):
        self.root = Path(state["logdir"]) if state else Path(out_dir).resolve() / "tensorboard"

    def state(self) -> dict[str, Any]:
        return {"logdir": str(self.root)}

    def _dir(self, name: str, role: str) -> Path:
        return {"training": self.root, "experiment": self.root / "experiment"}.get(role, self.root / name_part(name))

    def start(self, name: str, *, role: str, parent: TensorBoardRun | None = None,
              tags: dict[str, str] | None = None) -> TensorBoardRun:
        """A new run's folder; a cell that starts over first loses the events its interrupted attempt left."""
        logdir = self._dir(name, role)
        if role == "cell":
            shutil.rmtree(logdir, ignore_errors=True)
        run = TensorBoardRun(logdir)
        if tags:
            run.set_tags(tags)
        return run

    def reopen(self, ref: dict[str, Any]) -> TensorBoardRun:
        return TensorBoardRun(Path(ref["logdir"]), reopened=True)

    def attach(self, ref: dict[str, Any]) -> TensorBoardRun:
        return TensorBoardRun(Path(ref["logdir"]))
