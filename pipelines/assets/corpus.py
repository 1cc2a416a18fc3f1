"""The tokenized, windowed, sharded corpus."""

import dagster as dg

from distill.run import labelling
from pipelines.resources import DistillSettings
from storage.cache import content_key


@dg.asset(
    group_name="data",
    deps=["teacher_model"],
    description="Documents (or prompts, or candidate examples) tokenized with the teacher's tokenizer, split "
    "train/held-out by document, windowed and sharded.",
)
def corpus(settings: DistillSettings) -> dg.MaterializeResult:
    manifest = labelling.prepare_corpus(settings.load())
    shards = manifest["shards"]
    return dg.MaterializeResult(
        metadata={
            "source": manifest["source"],
            "mode": manifest["mode"],
            **{
                k: manifest[k]
                for k in (
                    "documents",
                    "heldout_documents",
                    "dropped_empty",
                    "dropped_short",
                    "dropped_long",
                    "dropped_duplicate_id",
                    "gold_answers",
                )
                if k in manifest
            },
            "windows": sum(s["windows"] for s in shards.values()),
            **(
                {}
                if manifest["mode"] == "generate"
                else {"labelled_tokens": sum(s["labelled_tokens"] for s in shards.values())}
            ),
            "empty_shards": dg.MetadataValue.json([n for n, s in shards.items() if not s["windows"]]),
        },
        data_version=dg.DataVersion(content_key({n: s["fingerprint"] for n, s in shards.items()})),
    )
