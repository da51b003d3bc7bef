"""``python -m tokencache.worker.repairloop``: the repair loop for fleets that run plain ``rq worker``.

``tokencache worker`` already runs it; this is for deployments that start RQ
themselves. One pass a second runs fleet-wide whatever the number of copies.
"""

from __future__ import annotations

import logging
import signal
import threading

from tokencache.app.tokenstore import TokenStore
from tokencache.constants import REPAIR_INTERVAL
from tokencache.errors import TokenCacheError
from tokencache.worker.repair import repair_if_leader

log = logging.getLogger("tokencache.repair")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    store = TokenStore.from_url(None)
    while not stop.wait(REPAIR_INTERVAL):
        try:
            repair_if_leader(store, REPAIR_INTERVAL)
        except TokenCacheError as e:
            log.warning("repair pass skipped: %s", e)


if __name__ == "__main__":
    main()
