"""The daemon's per-router job queue on its thread pool: jobs of one router run one
after another, so a slow router never holds up the others. A job's result goes to
a queue the daemon's loop drains (`results`); `wake` tells the loop there is one.
"""

import collections
import logging
import queue
import threading

from snat_sync.errors import SnatSyncError

# The daemon's rooms log as the daemon did before it was split into them.
LOG = logging.getLogger("snat_sync.daemon")


class RouterJobs:
    def __init__(self, pool, wake):
        self.pool = pool
        self.wake = wake
        self.jobs = collections.defaultdict(collections.deque)
        self.busy = set()
        self.lock = threading.Lock()
        self.finished = queue.SimpleQueue()

    def submit(self, router_id, outcome, function, *arguments):
        """Queue a job for the router; jobs of one router run one after another.

        Its result arrives as (router_id, outcome, what function returned), or
        (router_id, "failed", None) if it raised.
        """
        with self.lock:
            self.jobs[router_id].append((outcome, function, arguments))
            if router_id in self.busy:
                return
            self.busy.add(router_id)
        self.pool.submit(self._work, router_id)

    def busy_routers(self):
        """The ids (and job keys) with a job queued or running, now."""
        with self.lock:
            return set(self.busy)

    def results(self):
        """The results that arrived since the last call, in order."""
        while True:
            try:
                yield self.finished.get_nowait()
            except queue.Empty:
                return

    def _work(self, router_id):
        while True:
            with self.lock:
                if not self.jobs[router_id]:
                    del self.jobs[router_id]
                    self.busy.discard(router_id)
                    break
                outcome, function, arguments = self.jobs[router_id].popleft()
            try:
                result = function(*arguments)
            except (SnatSyncError, OSError) as error:
                LOG.error("router %s: %s failed: %s", router_id, function.__name__,
                          error)
                outcome, result = "failed", None
            except Exception:
                LOG.exception("router %s: %s failed", router_id, function.__name__)
                outcome, result = "failed", None
            self.finished.put((router_id, outcome, result))
        self.wake()
