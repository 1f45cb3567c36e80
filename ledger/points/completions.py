"""Completions: the callbacks waiting for points requests to reach a final state, told by the lane
(`ledger.points.lane`) when it settles a batch and by the follower (`ledger.points.follower`) when the
chain's events finish a request first; the API's synchronous answers wait on them."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable

from ledger.points.tables import PointsRequest


class Completions:
    """Callbacks waiting for requests to reach a final state (the API's synchronous answers). Each is
    called once, with the request's final row (detached: read it, do not change it), so that a waiting
    caller needs no database read for its answer.

    The ids that finished lately are remembered: a caller may subscribe only after its request
    finished (an API worker's event loop, busy under load, can resume a request after its batch was
    already mined and settled), and is then told to read the row instead of waiting for news that
    has come and gone."""

    RECENT = 100_000  # finished ids remembered (a few minutes' worth at the loyalty benchmark's rate)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, list[Callable[[PointsRequest], None]]] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()
        self.listeners: list[Callable[[list[str]], None]] = []
        """Told the ids of every notification (the supervisor tells its API workers)."""

    def subscribe(self, request_id: str, callback: Callable[[PointsRequest], None]) -> bool:
        """Call `callback` with the request's final row; True if it finished already (no call will
        come for it: read the row)."""
        with self._lock:
            self._waiters.setdefault(request_id, []).append(callback)
            return request_id in self._recent

    def unsubscribe(self, request_id: str, callback: Callable[[PointsRequest], None]) -> None:
        with self._lock:
            callbacks = self._waiters.get(request_id, [])
            if callback in callbacks:
                callbacks.remove(callback)
            if not callbacks:
                self._waiters.pop(request_id, None)

    def notify(self, requests: Iterable[PointsRequest]) -> None:
        requests = list(requests)
        with self._lock:
            called = [(cb, r) for r in requests for cb in self._waiters.pop(r.id, [])]
            self._remember(r.id for r in requests)
        for callback, request in called:
            callback(request)
        if self.listeners and requests:
            ids = [r.id for r in requests]
            for listener in self.listeners:
                listener(ids)

    def finished(self, request_ids: Iterable[str]) -> list[str]:
        """Note that `request_ids` reached a final state (told by another process); returns those
        someone here waits for (their rows are to be read and given to `notify`)."""
        with self._lock:
            ids = list(request_ids)
            self._remember(ids)
            return [i for i in ids if i in self._waiters]

    def _remember(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._recent[request_id] = None
        while len(self._recent) > self.RECENT:
            self._recent.popitem(last=False)
