"""The CPU engine's dtype: labelling speed and label error of ``bfloat16`` against ``float32``.

Two device-labeller engines of the bundled teacher on this CPU, one per dtype, label the same
windows (top-``k`` labels, ``teacher.engine.batch_windows`` per call), interleaved and repeated:
labelled positions/s, median (min..max). Their labels are then compared with a float32
transformers forward of the same windows (float64 log-softmax): the KL divergence from the
reference to each engine's stored distribution (its top-k ids plus the tail as one outcome, the
reference's probabilities on the same ids and the rest), the largest error of the realized
token's logprob, and the share of positions whose top-1 id differs.

    .venv/bin/python -m benchmarks.cpu_dtype [--config configs/demo.yaml] [--windows 32] [--repeats 3]

Last line: ``bf16_vs_fp32_rate=`` (labelled positions/s, bfloat16 over float32, paired per round).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])


def label_error(labels: list[dict], reference: list) -> dict:
    """Mean KL(reference || labels over top-k + tail), largest target logprob error, top-1 disagreement."""
    import numpy as np

    kl, target, top1, n = 0.0, 0.0, 0, 0
    for row, ref in zip(labels, reference):  # ref: (positions, V) float64 log-softmax
        ids = row["topk_ids"]
        ref_top = np.take_along_axis(ref, ids, -1)  # (n, k)
        p_top, p_tail = np.exp(ref_top), np.clip(1 - np.exp(ref_top).sum(-1), 1e-300, 1)
        q_top, q_tail = row["topk_logprobs"].astype(np.float64), np.clip(row["tail_mass"].astype(np.float64), 1e-300, 1)
        kl += float((p_top * (ref_top - q_top)).sum() + (p_tail * (np.log(p_tail) - np.log(q_tail))).sum())
        realized = np.take_along_axis(ref, row["realized"][:, None], -1)[:, 0]
        target = max(target, float(np.abs(realized - row["target_logprobs"]).max()))
        top1 += int((ids[:, 0] != ref.argmax(-1)).sum())
        n += len(ids)
    return {"kl": kl / n, "target_err": target, "top1_differs": top1 / n}


def main() -> None:
    from benchmarks.common import config_windows_repeats

    args = config_windows_repeats(__doc__, 32)

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.common import corpus_windows
    from benchmarks.timing import interleave, median, paired_ratios, rates, summary
    from distill.config import load_config
    from distill.run import paths
    from distill.teacher.vllm_engine import VllmTeacher

    cfg = load_config(args.config)
    _, ids, starts = corpus_windows(cfg, args.windows)
    positions = sum(len(w) - 1 - s for w, s in zip(ids, starts))
    k = cfg.teacher.k
    engines = {
        dtype: VllmTeacher(
            paths.teacher_dir(cfg),
            k,
            cfg.corpus.window,
            dataclasses.replace(cfg.teacher.engine, dtype=dtype, labeller="device"),
        )
        for dtype in ("float32", "bfloat16")
    }
    labels = {}
    try:
        for engine in engines.values():
            list(engine.score(ids[:2], starts[:2]))  # warm-up

        def run(dtype):
            def call():
                labels[dtype] = list(engines[dtype].score(ids, starts))

            return call

        seconds = interleave(
            {dtype: run(dtype) for dtype in engines},
            args.repeats,
            on_run=lambda r, name, sec: print(f"round {r} {name}: {sec:.1f} s", file=sys.stderr, flush=True),
        )
    finally:
        for engine in engines.values():
            engine.close()
    model = AutoModelForCausalLM.from_pretrained(paths.teacher_dir(cfg), dtype=torch.float32, use_safetensors=True)
    reference = []
    with torch.no_grad():
        for w, s in zip(ids, starts):
            logits = model(input_ids=torch.tensor([w])).logits[0, :-1].double()
            reference.append(torch.log_softmax(logits, -1)[s:].numpy())
    for dtype in labels:
        for row, w, s in zip(labels[dtype], ids, starts):
            row["realized"] = np.asarray(w[s + 1 :], np.int64)
    rate = {dtype: rates(positions, s) for dtype, s in seconds.items()}
    errors = {dtype: label_error(labels[dtype], reference) for dtype in labels}
    print(f"{len(ids)} windows, {positions} labelled positions, top-{k}, device labeller; median (min..max, n)")
    for dtype in engines:
        e = errors[dtype]
        print(
            f"{dtype}: {summary(rate[dtype])} positions/s; KL(transformers fp32 || labels) {e['kl']:.2e} nats/pos, "
            f"realized-token logprob error <= {e['target_err']:.2e}, top-1 differs at {e['top1_differs']:.2%}"
        )
    ratio = paired_ratios(rate["bfloat16"], rate["float32"])
    print(f"bf16_vs_fp32_rate: {summary(ratio, '.3f')}")
    print(f"bf16_kl={errors['bfloat16']['kl']:.3e} fp32_kl={errors['float32']['kl']:.3e}")
    print(f"bf16_vs_fp32_rate={median(ratio):.3f}")


if __name__ == "__main__":
    main()
