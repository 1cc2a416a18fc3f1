"""lm-evaluation-harness tasks for teacher, students and baseline (``eval.lm_eval_tasks``).

Students run through the harness's own ``HFLM`` over the model already loaded for the
evaluation. The teacher runs through ``EngineLM``: the harness's requests answered by the vLLM
engine the evaluation already holds (``VllmTeacher``), so no transformers copy of the teacher
is built. Needs the ``lm-eval`` extra (``pip install -e '.[lm-eval]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def _lm_base():
    try:
        from lm_eval.api.model import LM
    except ImportError as e:
        raise ImportError("eval.lm_eval_tasks needs lm-evaluation-harness: pip install -e '.[lm-eval]'") from e
    return LM


def encode_pair(tokenizer, context: str, continuation: str, prefix_id: int) -> tuple[list[int], list[int]]:
    """Context and continuation token ids as the harness's HFLM cuts them: trailing spaces of
    the context move to the continuation, the pair is encoded whole and the context's tokens
    split off; an empty context becomes ``prefix_id``."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    if not context:
        return [prefix_id], list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    whole = list(tokenizer(context + continuation, add_special_tokens=False)["input_ids"])
    ctx = list(tokenizer(context, add_special_tokens=False)["input_ids"])
    return whole[: len(ctx)], whole[len(ctx) :]


def engine_lm(engine, tokenizer, source: str = "eval.lm_eval_tasks"):
    """An lm-eval ``LM`` answering from ``engine`` (a ``VllmTeacher``): ``loglikelihood`` (with
    the harness's is-greedy flag from the engine's token ranks), ``loglikelihood_rolling`` (the
    text in windows of the engine's length) and ``generate_until`` (greedy, cut at the stop strings)."""
    base = _lm_base()
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    class EngineLM(base):
        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            seqs, starts = [], []
            for i, request in enumerate(requests):
                ctx, cont = encode_pair(tokenizer, *request.args, prefix)
                seq = ctx + cont
                if len(seq) > engine.max_len:  # keep the continuation and the end of the context
                    if len(cont) >= engine.max_len:
                        raise ValueError(
                            f"{source}: request {i}: a continuation of {len(cont)} tokens does not fit the teacher "
                            f"engine's max_len {engine.max_len} (corpus.window)"
                        )
                    seq = seq[-engine.max_len :]
                seqs.append(seq)
                starts.append(len(seq) - len(cont))
            scored = engine.sequence_logprobs(seqs, starts, greedy=True) if seqs else []
            return [(float(ll), bool(g)) for ll, _, g in scored]

        def loglikelihood_rolling(self, requests) -> list[float]:
            out = []
            for request in requests:
                ids = [prefix] + list(tokenizer(request.args[0], add_special_tokens=False)["input_ids"])
                seqs, starts, step = [], [], engine.max_len - 1
                for lo in range(1, len(ids), step):  # each window: one token of context, then scored tokens
                    seqs.append(ids[lo - 1 : lo + step])
                    starts.append(1)
                out.append(float(engine.sequence_logprobs(seqs, starts)[:, 0].sum()) if seqs else 0.0)
            return out

        def generate_until(self, requests) -> list[str]:
            out = []
            for request in requests:
                context, kwargs = request.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                ids = list(tokenizer(context, add_special_tokens=False)["input_ids"])[-(engine.max_len - 1) :]
                limit = min(int(kwargs.get("max_gen_toks", 256)), engine.max_len - len(ids))
                answer = tokenizer.decode(
                    engine.greedy([ids], limit, tokenizer.eos_token_id)[0], skip_special_tokens=True
                )
                cut = min([answer.find(u) for u in until if u and u in answer], default=len(answer))
                out.append(answer[:cut])
            return out

    return EngineLM()


def run_tasks(
    lm, tasks: Sequence[str], include: str | Path | None = None, limit: int | None = None
) -> dict[str, dict[str, float]]:
    """Run lm-eval ``tasks`` (names from the harness, or from task YAMLs under ``include``) on
    ``lm``; returns ``{task: {metric: value}}`` (standard errors left out)."""
    _lm_base()
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include)) if include else TaskManager()
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        where = f" or in {include}" if include else " (set eval.lm_eval_include to a folder of task YAMLs)"
        raise ValueError(f"eval.lm_eval_tasks: no task named {missing} in lm-evaluation-harness{where}")
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        log_samples=False,
        bootstrap_iters=0,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    results = {}
    for task in tasks:
        metrics = out["results"][task]
        results[task] = {
            name.split(",")[0]: float(value)
            for name, value in metrics.items()
            if "," in name and "_stderr" not in name and isinstance(value, (int, float))
        }
    return results


def student_lm(model, tokenizer, batch_size: int):
    """lm-eval's ``HFLM`` over a loaded student (its device and precision as loaded)."""
    _lm_base()
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def flatten(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{task: {metric: v}}`` as ``{"lm_eval_<task>_<metric>": v}`` (report columns, Dagster metadata)."""
    return {f"lm_eval_{task}_{metric}": value for task, metrics in results.items() for metric, value in metrics.items()}
