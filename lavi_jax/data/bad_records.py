"""Skipping bad records with a budget: count them, report them by id, stop past the budget."""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """A record that could not be turned into an example."""

    index: int  # position in the source file
    id: str
    reason: str


class BadRecordBudgetExceeded(RuntimeError):
    """More distinct bad records than ``max_bad_records``."""


class BadRecordTracker:
    """Counts distinct bad records (by source index) and logs each once.

    A record seen again in a later epoch is not counted twice. Exceeding
    ``max_bad_records`` raises ``BadRecordBudgetExceeded`` naming the record
    that crossed the budget. Thread-safe. ``get_state``/``set_state`` give a
    JSON-serialisable state so the count survives checkpoint restores.
    """

    def __init__(self, max_bad_records: int, keep_reports: int = 1000):
        self.max_bad_records = int(max_bad_records)
        self._keep = keep_reports
        self._seen: set[int] = set()
        self.reports: list[BadRecord] = []  # the first ``keep_reports`` bad records
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return len(self._seen)

    def report(self, bad: BadRecord) -> None:
        """Records ``bad``; raises once the budget is exceeded."""
        with self._lock:
            if bad.index in self._seen:
                return
            self._seen.add(bad.index)
            if len(self.reports) < self._keep:
                self.reports.append(bad)
            count = len(self._seen)
        logger.warning("skipping bad record %d/%d id=%s: %s", count, self.max_bad_records, bad.id, bad.reason)
        if count > self.max_bad_records:
            raise BadRecordBudgetExceeded(
                f"{count} bad records exceed max_bad_records={self.max_bad_records}; "
                f"last: id={bad.id!r} (record #{bad.index}): {bad.reason}"
            )

    def accept(self, element: Any) -> bool:
        """Filter predicate: False (after reporting) for a ``BadRecord``."""
        if isinstance(element, BadRecord):
            self.report(element)
            return False
        return True

    def get_state(self) -> dict[str, Any]:
        with self._lock:
            return {"bad_indices": sorted(self._seen)}

    def set_state(self, state: dict[str, Any]) -> None:
        with self._lock:
            self._seen = set(int(i) for i in state.get("bad_indices", ()))
