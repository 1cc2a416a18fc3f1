"""The two labellers side by side (``teacher.engine.labeller``: ``device`` and ``logprobs``), same
windows, one engine of each, interleaved and repeated; median (min..max).

Variants, each labelling the same windows into the label columns a shard would store
(``engine.score`` and the label kind's ``from_teacher``; no Parquet writing, which is the same
for both labellers):

- ``floor``: the device engine's pooler with k = 1 and nothing unpacked: a forward that projects
  every position onto the vocabulary, the least any labeller pays;
- ``device_topk`` / ``logprobs_topk``: top-``k`` labels (k = 32 by default);
- ``device_sampled``: ``draws`` systematic draws from the whole vocabulary, on the device;
- ``logprobs_sampled``: the host sampler over vLLM's top-``proposal_k`` prompt logprobs.

Host time per position: CPU seconds of the host processes (this one and the engine's
``EngineCore``; the ``Worker`` that runs the model is the device) beyond the floor's, over the
labelled positions (the clock ticks in 10 ms: use enough windows). On this CPU the device
labeller's math runs in the ``Worker``, so it counts as device time, as it would on a GPU. Also
printed: the wall time our own code spends outside engine calls per position (unpacking the
packed tensors, the label kind's ``from_teacher``); the logprobs path's Python objects are built
inside vLLM's engine call, so only the CPU measure compares the two.

    .venv/bin/python -m benchmarks.labellers [--config configs/demo.yaml] [--windows 160] [--repeats 3]

Also run by ``benchmarks/teacher.py`` (its ``--labellers`` section). Last line:
``sampled_vs_topk_rate=`` (the default labeller's sampled labels against its top-32).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])


class HostCpu:
    """CPU seconds of an engine's host processes (the caller and its ``EngineCore``) and of its
    device (``Worker``) processes."""

    def __init__(self, engine):
        import psutil

        self.host = [psutil.Process()] + [p for p in engine.processes if "Worker" not in engine.titles[p.pid]]
        self.device = [p for p in engine.processes if "Worker" in engine.titles[p.pid]]

    @staticmethod
    def _cpu(procs) -> float:
        total = 0.0
        for p in procs:
            t = p.cpu_times()
            total += t.user + t.system
        return total

    def now(self) -> tuple[float, float, float]:
        """CPU seconds so far of the host processes, of this process alone, and of the device."""
        return self._cpu(self.host), self._cpu(self.host[:1]), self._cpu(self.device)


def bench_labellers(cfg, windows, ids: list, starts: list, repeats: int) -> dict:
    """Seconds and host CPU seconds of each variant per round, and the labelled positions."""
    from vllm import PoolingParams

    from benchmarks.timing import interleave
    from distill.run import paths
    from distill.teacher.vllm_engine import VllmTeacher
    from storage.kinds import KINDS

    teacher = cfg.teacher
    k, draws, proposal = teacher.k, teacher.sampled_labels.draws, teacher.sampled_labels.proposal_k
    positions = sum(len(w) - 1 - s for w, s in zip(ids, starts))
    doc_ids, window_idx = windows.column("doc_id").to_pylist(), windows.column("window_index").to_pylist()
    engines = {
        name: VllmTeacher(
            paths.teacher_dir(cfg),
            k,
            cfg.corpus.window,
            dataclasses.replace(teacher.engine, labeller=name),
            max_logprobs=proposal if name == "logprobs" else k,
        )
        for name in ("device", "logprobs")
    }
    try:
        cpu = {name: HostCpu(engine) for name, engine in engines.items()}
        topk = {"k": k}
        sampled = {"draws": draws, "sampler": "systematic", "seed": 0}
        params = {
            "device": {**sampled, "proposal_k": 0},
            "logprobs": {**sampled, "proposal_k": proposal},
        }
        seeds = [KINDS["sampled"].row_seed(params["device"], d, w) for d, w in zip(doc_ids, window_idx)]

        def labels(name: str, kind: str, kind_params: dict, **request):
            def run():
                scored = engines[name].score(ids, starts, **request)
                for row, doc, win in zip(scored, doc_ids, window_idx):
                    KINDS[kind].from_teacher(row, kind_params, doc, win)

            return name, run

        def floor():
            engine, batch = engines["device"], teacher.engine.batch_windows
            for b in range(0, len(ids), batch):
                chunk = [{"prompt_token_ids": [int(t) for t in w]} for w in ids[b : b + batch]]
                engine.llm.encode(
                    chunk,
                    [PoolingParams(extra_kwargs={"k": 1})] * len(chunk),
                    pooling_task="token_classify",
                    use_tqdm=False,
                )

        variants = {
            "floor": ("device", floor),
            "device_topk": labels("device", "topk", topk, k=k),
            "logprobs_topk": labels("logprobs", "topk", topk, k=k),
            "device_sampled": labels("device", "sampled", params["device"], k=1, draws=draws, seeds=seeds),
            "logprobs_sampled": labels("logprobs", "sampled", params["logprobs"], k=proposal),
        }
        for name, run in variants.values():  # warm-up, untimed
            list(engines[name].score(ids[:2], starts[:2]))
        host = {name: [] for name in variants}
        caller = {name: [] for name in variants}  # this process's share of the host CPU
        ours = {name: [] for name in variants}  # wall seconds outside engine calls: our unpacking and label making

        def timed(name: str):
            engine, run = variants[name]

            def call():
                before, inside, t0 = cpu[engine].now(), engines[engine].engine_seconds, time.perf_counter()
                run()
                after = cpu[engine].now()
                host[name].append(after[0] - before[0])
                caller[name].append(after[1] - before[1])
                ours[name].append(time.perf_counter() - t0 - (engines[engine].engine_seconds - inside))

            return call

        seconds = interleave(
            {name: timed(name) for name in variants},
            repeats,
            on_run=lambda r, name, sec: print(f"labellers round {r} {name}: {sec:.1f} s", file=sys.stderr, flush=True),
        )
    finally:
        for engine in engines.values():
            engine.close()
    return {
        "seconds": seconds,
        "host": host,
        "ours": ours,
        "caller": caller,
        "positions": positions,
        "k": k,
        "draws": draws,
        "proposal_k": proposal,
    }


def report(result: dict) -> list[str]:
    """The printed lines, ``name=value`` ones last."""
    from benchmarks.timing import median, paired_ratios, rates, summary

    n, sec, host = result["positions"], result["seconds"], result["host"]
    rate = {name: rates(n, s) for name, s in sec.items()}
    host_us = {name: [(h - f) / n * 1e6 for h, f in zip(host[name], host["floor"])] for name in host if name != "floor"}
    caller = result["caller"]
    caller_us = {name: [(c - f) / n * 1e6 for c, f in zip(caller[name], caller["floor"])] for name in host_us}
    lines = [
        f"labellers: {n} labelled positions, top-{result['k']}, sampled {result['draws']} draws "
        f"(logprobs: from a top-{result['proposal_k']} proposal); median (min..max, n)",
        "positions_per_s: " + " ".join(f"{name}={summary(r)}" for name, r in rate.items()),
        "host CPU us/position beyond the floor (this process and EngineCore; 10 ms clock ticks): "
        + " ".join(f"{name}={summary(h, '.1f')}" for name, h in host_us.items()),
        "of which this process (the rest is EngineCore): "
        + " ".join(f"{name}={summary(c, '.1f')}" for name, c in caller_us.items()),
        "our code's wall us/position outside engine calls (unpacking, label making): "
        + " ".join(f"{name}={summary([o / n * 1e6 for o in result['ours'][name]], '.1f')}" for name in host_us),
    ]
    ratios = {
        "device_vs_logprobs_topk": paired_ratios(rate["device_topk"], rate["logprobs_topk"]),
        "device_vs_logprobs_sampled": paired_ratios(rate["device_sampled"], rate["logprobs_sampled"]),
        "sampled_vs_topk_rate": paired_ratios(rate["device_sampled"], rate["device_topk"]),
        "logprobs_sampled_vs_topk_rate": paired_ratios(rate["logprobs_sampled"], rate["logprobs_topk"]),
    }
    lines += [f"{name}: {summary(r, '.3f')}" for name, r in ratios.items()]
    lines += [f"host_us_per_token_{name}={median(h):.1f}" for name, h in host_us.items()]
    lines.append(f"host_us_per_token={max(median(host_us['device_topk']), median(host_us['device_sampled'])):.1f}")
    lines += [f"{name}={median(r):.3f}" for name, r in ratios.items() if name != "sampled_vs_topk_rate"]
    lines.append(f"sampled_vs_topk_rate={median(ratios['sampled_vs_topk_rate']):.3f}")
    return lines


def main() -> None:
    from benchmarks.common import config_windows_repeats

    args = config_windows_repeats(__doc__, 160)

    from benchmarks.common import corpus_windows
    from distill.config import load_config

    cfg = load_config(args.config)
    windows, ids, starts = corpus_windows(cfg, args.windows)
    for line in report(bench_labellers(cfg, windows, ids, starts, args.repeats)):
        print(line, flush=True)


if __name__ == "__main__":
    main()
