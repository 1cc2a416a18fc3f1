"""A writer process for the SIGKILL test: commits shards ``key-0 .. key-{n-1}`` into a store,
skipping committed ones, as the labeller does. Usage: python -m tests.storage.writer_worker ROOT N ROWS"""

import sys

from storage.cache import LabelStore
from storage.writer import remove_stale_temporaries
from tests.storage.test_shards import make_meta, make_rows

if __name__ == "__main__":
    root, n, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = LabelStore(root)
    print("start", flush=True)
    remove_stale_temporaries(root)
    for i in range(n):
        key = f"key-{i:03d}"
        if store.lookup(key) is None:
            with store.writer(key, make_meta(cache_key=key, k=32), row_group_rows=16) as w:
                w.write_many(make_rows(rows, 49152, 32, seed=i, length=(40, 200)))
    print("done", flush=True)
