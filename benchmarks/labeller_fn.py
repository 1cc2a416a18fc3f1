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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = {}
    for vocab, tag in ((49_152, "v49k"), (128_256, "v128k")):
        g = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(args.positions, vocab, generator=g, device=device) * 3
        targets = torch.randint(0, vocab, (args.positions,), generator=g, device=device)

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
            args.repeats,
        )
        for name, secs in seconds.items():
            print(f"V={vocab} {name}: {summary(rates(args.positions, secs))} positions/s", flush=True)
        ratio = paired_ratios(seconds["sampled"], seconds["topk"])
        print(f"V={vocab} sampled/top-32 time: {summary(ratio, '.2f')}", flush=True)
        over_projection = paired_ratios(seconds["topk"], seconds["log_softmax"])
        print(f"V={vocab} top-32/log-softmax time: {summary(over_projection, '.2f')}", flush=True)
        results[tag] = median(rates(args.positions, seconds["sampled"]))
    print(f"labeller_fn_tok_s_v49k={results['v49k']:.0f}")
    print(f"labeller_fn_tok_s_v128k={results['v128k']:.0f}")


if __name__ == "__main__":
    main()
