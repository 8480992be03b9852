"""Which checkpoints are the best by a validation metric, and when to stop for lack of improvement.

``eval.select`` names the metric (``bleu``: the forward network's validation BLEU, higher is better; ``ppl``:
its perplexity, lower is better; ``mi_logq_fixed``: log q(S|T̂) under the fixed critic, higher is better).
``train.keep_best`` keeps that many best checkpoints besides the newest ``train.keep_checkpoints``;
``train.early_stopping`` ends the run after that many validations in a row without a new best.

The state is the same on every rank (the value is broadcast from rank 0) and travels in each checkpoint,
so a resumed run ranks and counts exactly as an uninterrupted one. Rank 0 writes it, after each checkpoint
commits, to ``checkpoints/best.json`` (what ``ami-export --average best:N`` reads) and to MLflow tags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# eval.select -> (the metric's name in the validation metrics, whether higher is better)
SELECTABLE: dict[str, tuple[str, bool]] = {
    "bleu": ("valid/fw_bleu", True),
    "ppl": ("valid/fw_ppl", False),
    "mi_logq_fixed": ("valid/mi_logq_fixed", True),
}
BEST_FILE = "best.json"


@dataclass
class Selection:
    """The validation history of one metric, the checkpoints worth keeping for it and the early-stopping count."""

    select: str  # a key of SELECTABLE
    keep: int  # train.keep_best
    patience: int  # train.early_stopping (0 = never stop)
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, value) of each scored validation
    best: list[tuple[int, float]] = field(default_factory=list)  # the kept checkpoints' (step, value), best first

    @property
    def metric(self) -> str:
        return SELECTABLE[self.select][0]

    @property
    def higher_is_better(self) -> bool:
        return SELECTABLE[self.select][1]

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b

    def _rank_key(self, entry: tuple[int, float]) -> tuple[float, int]:
        step, value = entry
        return (-value if self.higher_is_better else value, step)  # ties: the earlier checkpoint first

    def record(self, step: int, value: float | None) -> bool:
        """Note validation ``value`` at ``step`` (None: the metric was not there, e.g. no critic yet, which counts
        for nothing). Returns whether this step's checkpoint joins the best kept ones (it must then be saved)."""
        if value is None or value != value:  # a NaN ranks nowhere
            return False
        self.history = [(s, v) for s, v in self.history if s != step] + [(step, value)]
        if self.keep == 0:
            return False
        ranked = sorted([(s, v) for s, v in self.best if s != step] + [(step, value)], key=self._rank_key)
        self.best = ranked[: self.keep]
        return any(s == step for s, _ in self.best)

    @property
    def best_so_far(self) -> tuple[int, float] | None:
        """The first validation with the best value seen."""
        top: tuple[int, float] | None = None
        for step, value in self.history:
            if top is None or self._better(value, top[1]):
                top = (step, value)
        return top

    @property
    def since_best(self) -> int:
        """Scored validations after the best one."""
        top = self.best_so_far
        return 0 if top is None else sum(1 for step, _ in self.history if step > top[0])

    @property
    def exhausted(self) -> bool:
        return self.patience > 0 and self.since_best >= self.patience

    def stop_reason(self) -> str:
        step, value = self.best_so_far or (0, float("nan"))
        return (f"{self.metric} has not improved on {value:.4f} (step {step}) for {self.since_best} validations "
                f"(train.early_stopping={self.patience})")

    def kept_tags(self) -> list[str]:
        return [f"step{s}" for s, _ in self.best]

    def state_dict(self) -> dict[str, Any]:
        return {"select": self.select, "history": [list(e) for e in self.history], "best": [list(e) for e in self.best]}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """A checkpoint's state; one that ranked by another metric (``eval.select`` changed) starts afresh."""
        if not state or state.get("select") != self.select:
            self.history, self.best = [], []
            return
        self.history = [(int(s), float(v)) for s, v in state["history"]]
        best = [(int(s), float(v)) for s, v in state["best"]]
        self.best = sorted(best, key=self._rank_key)[: self.keep]

    def summary(self) -> dict[str, Any]:
        """What ``checkpoints/best.json`` holds."""
        top = self.best_so_far
        return {"metric": self.metric, "higher_is_better": self.higher_is_better,
                "best": [{"tag": f"step{s}", "step": s, "value": v} for s, v in self.best],
                "best_step": top[0] if top else None, "best_value": top[1] if top else None,
                "validations_since_best": self.since_best,
                "history": [{"step": s, "value": v} for s, v in self.history]}

    def tags(self) -> dict[str, str]:
        """MLflow tags: the best checkpoints, best first, with their values."""
        top = self.best_so_far
        tags = {"select_metric": self.metric}
        if self.best:
            tags["best_checkpoints"] = ", ".join(f"step{s} ({v:.4f})" for s, v in self.best)
            tags["best_checkpoint"] = f"step{self.best[0][0]}"
        if top is not None:
            tags["best_value"] = f"{top[1]:.6g}"
            tags["best_step"] = str(top[0])
        return tags


def read_best(checkpoints: Path) -> dict[str, Any] | None:
    """``checkpoints/best.json`` of a run, or None where the run kept no best checkpoints."""
    path = checkpoints / BEST_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
