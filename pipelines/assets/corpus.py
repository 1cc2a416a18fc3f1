"""The tokenized, windowed, sharded corpus."""

import dagster as dg

from distill import pipeline
from pipelines.resources import DistillSettings


@dg.asset(group_name="data", deps=["teacher_model"], description="Documents tokenized with the teacher's tokenizer, split train/held-out by document, windowed and sharded.")
def corpus(settings: DistillSettings) -> dg.MaterializeResult:
    manifest = pipeline.prepare_corpus(settings.load())
    shards = manifest["shards"]
    return dg.MaterializeResult(
        metadata={
            "source": manifest["source"],
            "documents": manifest["documents"],
            "heldout_documents": manifest["heldout_documents"],
            "dropped_empty": manifest["dropped_empty"],
            "dropped_short": manifest["dropped_short"],
            "dropped_duplicate_id": manifest["dropped_duplicate_id"],
            "windows": sum(s["windows"] for s in shards.values()),
            "labelled_tokens": sum(s["labelled_tokens"] for s in shards.values()),
            "empty_shards": dg.MetadataValue.json([n for n, s in shards.items() if not s["windows"]]),
        },
        data_version=dg.DataVersion(pipeline.content_key({n: s["fingerprint"] for n, s in shards.items()})),
    )
