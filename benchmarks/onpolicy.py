"""On-policy (GKD) rounds against off-policy rounds at equal teacher work.

    .venv/bin/python benchmarks/onpolicy.py [--config configs/onpolicy.yaml]
    .venv/bin/python benchmarks/onpolicy.py --config configs/onpolicy_stdlib.yaml

Run from the repository root. With ``configs/onpolicy_stdlib.yaml`` the prompt set is built from
the corpus first: one question per module of the standard-library docstring corpus
(``data/corpora/stdlib_prompts.jsonl``). Then, all cached by content:

1. the teacher answers the training prompts (``generate`` mode) and the distilled student
   (``offpolicy``) trains on its answers;
2. ``onpolicy``: ``onpolicy.rounds`` rounds in which the student answers ``prompts_per_round``
   training prompts itself, the teacher labels those answers, and the student trains on a
   ``lmbda`` mix of its own answers and the teacher's;
3. ``control``: the same rounds (prompts, sampling, steps, mix) with the teacher answering
   instead (``generator: teacher``): the off-policy alternative for the same teacher work.

All three are evaluated on held-out prompts: KL(teacher || student) on the teacher's answers and
on each student's own sampled answers (``self_kl``, what GKD targets), top-1 agreement, and the
agreement of greedy answers with the teacher's. Beside ``self_kl``, what a low KL on a student's
own answers could hide: their mean length in tokens, the share that ended by EOS (not at
``max_tokens``), distinct-2 and the teacher's log-likelihood per token of them; the teacher's own
answers, sampled alike, give the reference row. Teacher tokens are the answer tokens the teacher
labelled (the off-policy set plus every round's answers). The last line is
``onpolicy_vs_control_self_kl=`` (below 1: on-policy rounds bring the student's own answers
closer to the teacher than off-policy rounds at equal teacher work).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

STDLIB_PROMPTS = Path("data/corpora/stdlib_prompts.jsonl")


def write_stdlib_prompts(path: Path = STDLIB_PROMPTS) -> Path:
    """One question per standard-library module of the docstring corpus, naming the module and
    quoting the first sentence of its documentation (deterministic for a Python version)."""
    from benchmarks.adaptive import write_stdlib_corpus

    if path.exists():
        return path
    prompts = []
    for line in write_stdlib_corpus().read_text().splitlines():
        doc = json.loads(line)
        first = doc["text"].split("\n\n")[0].replace("\n", " ").strip()
        first = first.split(". ")[0].rstrip(".")[:200]
        prompts.append(
            {
                "id": doc["id"],
                "prompt": f'The Python module `{doc["id"]}` is documented as: "{first}." '
                "Explain in a few sentences what it is for and show a short example.",
            }
        )
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    tmp.replace(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/onpolicy.yaml")
    args = parser.parse_args()

    from distill.config import load_config
    from distill.run import engines, labelling, onpolicy, training

    if STDLIB_PROMPTS.name in open(args.config).read():
        write_stdlib_prompts()
    cfg = load_config(args.config)
    labelling.prepare_teacher(cfg)
    labelling.prepare_corpus(cfg)
    labelling.label_shards(cfg, cfg.corpus.shard_names())
    base = training.train_student(cfg)
    offpolicy_tokens = sum(s.tokens for s in labelling.open_split(cfg, "train"))
    control = dataclasses.replace(cfg, onpolicy=dataclasses.replace(cfg.onpolicy, generator="teacher"))
    arms = {"onpolicy": cfg, "control": control}
    rounds = {}
    for name, arm in arms.items():
        rounds[name] = onpolicy.run_rounds(arm)
    students = {
        "offpolicy": Path(base["out_dir"]) / "model",
        **{name: onpolicy.final_model(arm) for name, arm in arms.items()},
    }
    results, heldout, own = onpolicy.compare_students(cfg, students)
    engines.close_engines()
    teacher_tokens = {
        "offpolicy": offpolicy_tokens,
        **{n: offpolicy_tokens + sum(r["answer_tokens"] for r in rounds[n]) for n in arms},
    }
    steps = {
        "offpolicy": cfg.train.steps,
        **{n: cfg.train.steps + cfg.onpolicy.rounds * cfg.onpolicy.steps for n in arms},
    }
    oc = cfg.onpolicy
    print(
        f"\n{args.config}: {len(onpolicy.prompt_table(cfg, 'train'))} training prompts, "
        f"{len(onpolicy.prompt_table(cfg, 'heldout'))} held-out; "
        f"{oc.rounds} rounds x {oc.steps} steps, lambda {oc.lmbda}, "
        f"{oc.prompts_per_round or 'all'} prompts x {oc.sampling.n} answers per round; "
        f"held-out: {sum(s.tokens for s in heldout)} teacher-answer tokens, "
        f"own answers {[s.tokens for s in own]} tokens"
    )
    print(
        "| student | steps | teacher tokens | KL (teacher answers) | KL (own answers) | top-1 (own) | greedy exact | "
        "greedy prefix | own answer tokens | ended by EOS | distinct-2 | teacher log-lik./token (own) |"
    )
    print("|---|" + "---:|" * 11)
    t = results["teacher"]
    print(
        f"| teacher (own answers, sampled alike) | – | – | – | – | – | – | – | "
        f"{t['self_len']:.1f} | {t['self_eos']:.3f} | "
        f"{t['self_distinct2']:.3f} | {t['self_teacher_ll']:.4f} |"
    )
    for name in students:
        m = results[name]
        print(
            f"| {name} | {steps[name]} | {teacher_tokens[name]} | {m['kl']:.4f} | {m['self_kl']:.4f} | "
            f"{m['self_top1']:.4f} | {m['greedy_exact_match']:.3f} | {m['greedy_prefix_agreement']:.3f} | "
            f"{m['self_len']:.1f} | {m['self_eos']:.3f} | "
            f"{m['self_distinct2']:.3f} | {m['self_teacher_ll']:.4f} |"
        )
    for metric in ("kl", "greedy_prefix_agreement"):
        print(
            f"onpolicy_vs_control_{metric}={results['onpolicy'][metric] / max(results['control'][metric], 1e-12):.4f}"
        )
    print(f"onpolicy_vs_control_teacher_tokens={teacher_tokens['onpolicy'] / teacher_tokens['control']:.4f}")
    print(f"onpolicy_vs_control_self_kl={results['onpolicy']['self_kl'] / results['control']['self_kl']:.4f}")


if __name__ == "__main__":
    main()
