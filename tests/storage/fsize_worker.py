"""A shard writer under a real file-size limit, for the disk-full tests: ``RLIMIT_FSIZE`` with
``SIGXFSZ`` ignored makes the kernel refuse writes past the limit with ``EFBIG``, as a full disk
refuses them with ``ENOSPC``. Prints one JSON line: where the writer failed and how.
Usage: python -m tests.storage.fsize_worker ROOT ROWS ROW_GROUP_ROWS LIMIT_BYTES"""

import json
import resource
import signal
import sys

from storage.cache import LabelStore
from tests.storage.test_shards import make_meta, make_rows

if __name__ == "__main__":
    root, n, group, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    store = LabelStore(root)
    rows = make_rows(n, 49152, 8, seed=7)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    phase = "open"
    try:
        with store.writer("key", make_meta(k=8, cache_key="key"), row_group_rows=group) as w:
            phase = "write"
            w.write_many(rows)
            phase = "close"
        print(json.dumps({"phase": "committed"}))
    except OSError as e:
        print(
            json.dumps(
                {
                    "phase": phase,
                    "type": type(e).__name__,
                    "message": str(e),
                    "errno": e.errno,
                    "cause": repr(e.__cause__),
                    "operation": getattr(e, "operation", None),
                }
            )
        )
