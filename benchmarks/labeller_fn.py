"""The device labeller's pure function alone (``distill.teacher.device_labels.label_logits``) on
random logits at two vocabulary sizes (SmolLM2's 49,152 and Llama 3's 128,256): labelled positions
per second for top-32 labels and for top-32 plus 80 systematic draws from the whole vocabulary,
against a plain float32 log-softmax of the same logits (what vLLM computes for prompt logprobs,
the least any labeller pays), interleaved and repeated; median (min..max).

    python -m benchmarks.labeller_fn [--positions 256] [--repeats 5] [--device cpu]

Last line: ``labeller_fn_tok_s_v128k=`` (top-32 plus draws, positions/s, median)."""

from __future__ import annotations

import argparse

import torch

from benchmarks.timing import interleave, median, paired_ratios, rates, summary
from distill.teacher.device_labels import label_logits


def measure(positions: int = 256, repeats: int = 5, device: str = "cpu", vocabs=(49_152, 128_256)) -> dict:
    """Positions/s of each variant per vocabulary, printed as it goes: ``{vocab: {variant: [rates]}}``."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = {}
    for vocab in vocabs:
        g = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(positions, vocab, generator=g, device=device) * 3
        targets = torch.randint(0, vocab, (positions,), generator=g, device=device)

        def run(fn):
            def call():
                fn()
                sync()

            return call

        seconds = interleave(
            {
                "log_softmax": run(lambda: torch.log_softmax(logits, -1)),
                "topk": run(lambda: label_logits(logits, 32, targets=targets)),
                "sampled": run(lambda: label_logits(logits, 32, targets=targets, draws=80, generator=g)),
            },
            repeats,
        )
        for name, secs in seconds.items():
            print(f"V={vocab} {name}: {summary(rates(positions, secs))} positions/s", flush=True)
        ratio = paired_ratios(seconds["sampled"], seconds["topk"])
        print(f"V={vocab} sampled/top-32 time: {summary(ratio, '.2f')}", flush=True)
        over_projection = paired_ratios(seconds["topk"], seconds["log_softmax"])
        print(f"V={vocab} top-32/log-softmax time: {summary(over_projection, '.2f')}", flush=True)
        results[vocab] = {name: rates(positions, secs) for name, secs in seconds.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    results = measure(args.positions, args.repeats, args.device)
    print(f"labeller_fn_tok_s_v49k={median(results[49_152]['sampled']):.0f}")
    print(f"labeller_fn_tok_s_v128k={median(results[128_256]['sampled']):.0f}")


if __name__ == "__main__":
    main()
