"""``python -m workers.repair``: the repair loop beside plain ``rq worker`` (a stable entry point).

The loop itself is :mod:`tokencache.worker.repairloop`, which the wheel ships.
"""

from tokencache.worker.repairloop import main

if __name__ == "__main__":
    main()
