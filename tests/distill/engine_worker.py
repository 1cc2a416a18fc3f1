"""A labelling process for the signal tests: starts the config's engine, says "ready", then
labels the same windows until it is ended.  Usage: python -m tests.distill.engine_worker CONFIG"""

import sys

from distill.config import load_config
from distill.run import engines

if __name__ == "__main__":
    cfg = load_config(sys.argv[1])
    engine = engines.get_engine(cfg)
    windows = [[1 + (i * 7 + j) % 1000 for j in range(cfg.corpus.window)] for i in range(8)]
    print("ready", flush=True)
    while True:
        for _ in engine.score(windows, [0] * len(windows)):
            pass
