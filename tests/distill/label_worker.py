"""Labels every shard of a config in a fresh process (for the kill test).
Usage: python -m tests.distill.label_worker CONFIG"""
import sys

from distill import pipeline
from distill.config import load_config

if __name__ == "__main__":
    cfg = load_config(sys.argv[1])
    pipeline.label_shards(cfg, cfg.corpus.shard_names())
    print("done", flush=True)
