"""Teacher benchmark: tokens/s of (a) our labelling pipeline end to end including Parquet
writes, (b) the bare vLLM call with the same settings writing nothing, (c) a plain
transformers forward + log_softmax + top-k over the same windows in the same batches
(``teacher.engine.batch_windows`` windows per forward, right-padded with an attention mask),
on the first windows of the default corpus with the bundled teacher. One engine serves (a)
and (b); no engine or model start is timed.

Engine slots (``--two-slots``, on by default): labelled tokens/s of two engines of one core
each (``teacher.engine.slots: 2``), each in its own process labelling half of the same windows
at the same time, against the one engine over both cores of (a). On a 2-core machine this
shows the mechanics, not a speed-up; on an N-GPU node each slot is a GPU.

``generate`` mode is measured the same way on the example prompts (``--generate-config``):
answer tokens/s of the labelling pipeline (sampling, per-token top-k, Parquet writes) against
the bare vLLM call with the same sampling parameters and seeds, writing nothing.

Every variant runs ``--repeats`` times, interleaved (``benchmarks.timing.interleave``: the order
reverses every other round, so each pair alternates which goes first); each ratio is taken per
round and printed as its median and min..max. The engines and model of the variants not
running stay loaded and idle meanwhile; the CPU they use then is printed.

The two labellers (``--labellers``, on by default; ``benchmarks/labellers.py``): labelled
positions/s of the device labeller against the logprobs one for top-32 and for sampled labels,
host microseconds per position beyond a bare projection, and the pure labelling function's rate
at V = 128,256 (``benchmarks/labeller_fn.py``).

    .venv/bin/python benchmarks/teacher.py [--config configs/demo.yaml] [--windows 192] [--repeats 3]
        [--generate-config configs/generate.yaml] [--prompts 32] [--two-slots 1] [--labellers 1]
        [--labeller-windows 160] [--main 1]
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--windows", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant, interleaved")
    parser.add_argument(
        "--generate-config", default="configs/generate.yaml", help="'' to skip the generate-mode measurement"
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--two-slots", type=int, default=1, help="0 to skip the engine-slot measurement")
    parser.add_argument("--labellers", type=int, default=1, help="0 to skip the device vs logprobs labellers")
    parser.add_argument("--labeller-windows", type=int, default=160)
    parser.add_argument("--main", type=int, default=1, help="0 to skip the pipeline/bare/transformers measurement")
    parser.add_argument(
        "--slot-worker", nargs=4, metavar=("CONFIG", "WINDOWS", "SLOTS_DIR", "STORE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.slot_worker:
        return slot_worker(*args.slot_worker)

    from benchmarks.common import corpus_windows
    from benchmarks.timing import median, paired_ratios, rates, summary
    from distill.config import load_config

    cfg = load_config(args.config)
    lines = bench_main(cfg, args) if args.main else []
    gen = (
        bench_generate(load_config(args.generate_config), args.prompts, args.repeats) if args.generate_config else None
    )
    if gen:
        g = {name: rates(gen["tokens"], s) for name, s in gen["seconds"].items()}
        print(
            f"generate: prompts={gen['prompts']} answer_tokens={gen['tokens']} tokens_per_s: "
            f"pipeline={summary(g['pipeline'])} bare_vllm={summary(g['bare_vllm'])}"
        )
        ratio = paired_ratios(g["pipeline"], g["bare_vllm"])
        print(f"generate_pipeline_vs_bare_vllm: {summary(ratio, '.3f')}")
        print(f"generate_pipeline_vs_bare_vllm={median(ratio):.3f}")
    for line in lines:
        print(line)
    if args.labellers:
        from benchmarks import labeller_fn, labellers

        fn = labeller_fn.measure(256, args.repeats, vocabs=(128_256,))
        windows, ids, starts = corpus_windows(cfg, args.labeller_windows)
        for line in labellers.report(labellers.bench_labellers(cfg, windows, ids, starts, args.repeats)):
            print(line, flush=True)
        print(f"labeller_fn_tok_s_v128k={median(fn[128_256]['sampled']):.0f}")


def bench_main(cfg, args) -> list[str]:
    """Our pipeline, the bare vLLM call and a batched transformers forward (and two engine slots):
    the printed lines."""
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.common import bench_meta, corpus_windows
    from benchmarks.timing import interleave, median, paired_ratios, rates, summary
    from distill.run import paths
    from distill.teacher.labels import label_shard
    from distill.teacher.reference import reference_labels
    from distill.teacher.vllm_engine import VllmTeacher
    from storage.cache import LabelStore

    windows, ids, starts = corpus_windows(cfg, args.windows)
    tokens = sum(len(w) - 1 - s for w, s in zip(ids, starts))
    k, batch = cfg.teacher.k, cfg.teacher.engine.batch_windows
    # ours first: an engine takes as its own the processes that appear while it starts
    engine = VllmTeacher(paths.teacher_dir(cfg), k, cfg.corpus.window, cfg.teacher.engine)
    slots = None
    try:
        slots = SlotWorkers(args.config, windows) if args.two_slots else None  # they start while ours warms up
        list(engine.score(ids[:8], starts[:8]))  # warm-up
        model = AutoModelForCausalLM.from_pretrained(
            paths.teacher_dir(cfg), dtype=torch.float32, use_safetensors=True
        ).eval()
        check_batched_reference(model, ids, starts, k, batch, reference_labels)  # also its warm-up
        if slots:
            slots.wait_ready()
        meta = bench_meta(cfg, k, engine.engine_version)
        prompts = [{"prompt_token_ids": [int(t) for t in w]} for w in ids]

        def bare():  # the engine's own call with the same settings: prompt logprobs, or the device labeller's pooler
            from vllm import PoolingParams

            for b in range(0, len(prompts), batch):
                chunk = prompts[b : b + batch]
                if engine.labeller == "device":
                    pooled = [PoolingParams(extra_kwargs={"k": k})] * len(chunk)
                    engine.llm.encode(chunk, pooled, pooling_task="token_classify", use_tqdm=False)
                else:
                    engine.llm.generate(chunk, engine.params, use_tqdm=False)

        def ours():
            store = LabelStore(tempfile.mkdtemp(prefix="bench-teacher-"))
            result = label_shard(lambda: engine, store, "bench", meta, windows, progress=False)
            assert not result["cache_hit"] and result["tokens"] == tokens, result

        variants = {
            "bare_vllm": bare,
            "pipeline": ours,
            "transformers_batched": functools.partial(transformers_labels, model, ids, starts, k, batch),
        }
        if slots:
            variants["two_slots"] = lambda: slots.run(tokens)
        idle = IdleCpu({"main engine": engine.processes, **(slots.processes() if slots else {})})
        seconds = interleave(variants, args.repeats, on_run=idle.after_run)
        del model, variants  # the reference model's memory, before the generate benchmark
    finally:
        if slots:
            slots.stop()
        engine.close()
    tok_s = {name: rates(tokens, s) for name, s in seconds.items()}
    lines = [
        f"windows={len(ids)} labelled_tokens={tokens} k={k} batch_windows={batch} labeller={engine.labeller} "
        f"repeats={args.repeats} (interleaved; median (min..max, n) below)",
        idle.report(),
        "tokens_per_s: " + " ".join(f"{name}={summary(r)}" for name, r in tok_s.items()),
    ]
    ratio = paired_ratios(tok_s["pipeline"], tok_s["bare_vllm"])
    lines += [f"pipeline_vs_bare_vllm: {summary(ratio, '.3f')}", f"pipeline_vs_bare_vllm={median(ratio):.3f}"]
    if slots:
        ratio = paired_ratios(tok_s["two_slots"], tok_s["pipeline"])
        lines += [
            f"two slots of one core each against one engine on both cores (pipeline), labelled tokens/s: "
            f"{summary(tok_s['two_slots'])} against {summary(tok_s['pipeline'])}",
            f"two_slots_vs_one: {summary(ratio, '.3f')}",
            f"two_slots_vs_one={median(ratio):.3f}",
        ]
    ratio = paired_ratios(tok_s["pipeline"], tok_s["transformers_batched"])
    lines += [
        f"pipeline_vs_transformers_batched: {summary(ratio, '.3f')}",
        f"pipeline_vs_transformers_batched={median(ratio):.3f}",
    ]
    return lines


def _batched_logprobs(model, chunk):
    """(input ids (B, L), full log-softmax (B, L-1, V)) of right-padded windows."""
    import torch

    length = max(len(w) for w in chunk)
    input_ids = torch.zeros(len(chunk), length, dtype=torch.long)
    mask = torch.zeros(len(chunk), length, dtype=torch.long)
    for i, w in enumerate(chunk):
        input_ids[i, : len(w)] = torch.as_tensor(w, dtype=torch.long)
        mask[i, : len(w)] = 1
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()  # (B, L-1, V): t predicts t+1
    return input_ids, torch.log_softmax(logits, dim=-1)


def transformers_labels(model, ids, starts, k: int, batch: int) -> list[dict]:
    """``reference_labels`` for every window, ``batch`` windows per forward (right padding and an
    attention mask: causal attention keeps the real positions exact)."""
    import torch

    out = []
    with torch.no_grad():
        for b in range(0, len(ids), batch):
            chunk = ids[b : b + batch]
            input_ids, logprobs = _batched_logprobs(model, chunk)
            top_lp, top_ids = logprobs.topk(k, dim=-1)  # (B, L-1, k), sorted
            target = logprobs.gather(-1, input_ids[:, 1:, None])[..., 0]  # (B, L-1)
            tail = (1.0 - top_lp.double().exp().sum(-1)).clamp(0, 1)  # (B, L-1)
            for i, (w, s) in enumerate(zip(chunk, starts[b : b + batch])):
                sl = slice(s, len(w) - 1)
                out.append(
                    {
                        "topk_ids": top_ids[i, sl].numpy(),
                        "topk_logprobs": top_lp[i, sl].numpy(),
                        "target_logprobs": target[i, sl].numpy(),
                        "tail_mass": tail[i, sl].float().numpy(),
                    }
                )
    return out


def check_batched_reference(model, ids, starts, k: int, batch: int, reference_labels) -> None:
    """The batched baseline gives what ``reference_labels`` gives one window at a time (the
    first batch, which holds the shortest window when lengths differ)."""
    import numpy as np

    chunk = list(range(min(batch, len(ids))))
    batched = transformers_labels(model, [ids[i] for i in chunk], [starts[i] for i in chunk], k, batch)
    shortest = min(chunk, key=lambda i: len(ids[i]))
    for i in sorted({0, shortest}):
        one = reference_labels(model, np.asarray(ids[i]), starts[i], k)
        for key in ("topk_logprobs", "target_logprobs", "tail_mass"):
            if not np.allclose(one[key], batched[i][key], atol=2e-3, rtol=1e-3):
                raise AssertionError(
                    f"batched transformers baseline differs from reference_labels on window {i}, {key}: "
                    f"max |diff| {np.abs(one[key] - batched[i][key]).max():.2e}"
                )


class IdleCpu:
    """CPU seconds that loaded but idle engines use while another variant runs: what the
    interleaving costs the variant running (an idle vLLM engine polls)."""

    def __init__(self, groups: dict):
        self.groups = groups
        self.busy: dict[str, float] = {}  # "<group> during <variant>" -> cpu seconds
        self.seconds: dict[str, float] = {}  # variant -> wall seconds
        self.last = self._now()

    def _now(self) -> dict[str, float]:
        import psutil

        out = {}
        for name, procs in self.groups.items():
            total = 0.0
            for p in procs:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.NoSuchProcess:
                    pass
            out[name] = total
        return out

    def after_run(self, round_: int, variant: str, seconds: float) -> None:
        now = self._now()
        for name in self.groups:
            if not _runs_on(variant, name):
                key = f"{name} during {variant}"
                self.busy[key] = self.busy.get(key, 0.0) + now[name] - self.last[name]
        self.last = now
        self.seconds[variant] = self.seconds.get(variant, 0.0) + seconds
        print(f"round {round_} {variant}: {seconds:.1f} s", file=sys.stderr, flush=True)

    def report(self) -> str:
        parts = [
            f"{key}: {cpu:.1f} cpu-s in {self.seconds[key.split(' during ')[1]]:.0f} s"
            for key, cpu in self.busy.items()
        ]
        return "idle engines' CPU while other variants ran: " + "; ".join(parts)


def _runs_on(variant: str, group: str) -> bool:
    """Whether ``group``'s engine does the work of ``variant``."""
    if group == "main engine":
        return variant in ("bare_vllm", "pipeline")
    return variant == "two_slots"


class SlotWorkers:
    """Two slot workers (``--slot-worker``), each with its own one-core engine and half of the
    windows, started once and released together for each timed run."""

    def __init__(self, config: str, windows):
        import os
        import subprocess

        import pyarrow.parquet as pq

        work = Path(tempfile.mkdtemp(prefix="bench-slots-"))
        half = (windows.num_rows + 1) // 2
        self.workers, self.runs = [], 0
        for i, part in enumerate((windows.slice(0, half), windows.slice(half))):
            pq.write_table(part, work / f"half{i}.parquet")
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--slot-worker",
                config,
                str(work / f"half{i}.parquet"),
                str(work / "slots"),
                str(work / f"store{i}"),
            ]
            self.workers.append(
                subprocess.Popen(
                    cmd,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
                )
            )

    def wait_ready(self) -> None:
        for w in self.workers:
            if _line(w, lambda line: line == "ready") != "ready":
                raise RuntimeError(f"slot worker pid {w.pid} failed to start its engine (exit code {w.poll()})")

    def processes(self) -> dict:
        import psutil

        return {
            f"slot worker {i}": [psutil.Process(w.pid), *psutil.Process(w.pid).children(recursive=True)]
            for i, w in enumerate(self.workers)
        }

    def run(self, tokens: int) -> None:
        import json

        for w in self.workers:
            w.stdin.write(f"go {self.runs}\n")
            w.stdin.flush()
        self.runs += 1
        results = [json.loads(_line(w, lambda line: line.startswith("{")) or "{}") for w in self.workers]
        if sum(r.get("tokens", 0) for r in results) != tokens or {r.get("slot") for r in results} != {0, 1}:
            raise RuntimeError(f"slot workers labelled {results}, expected {tokens} tokens over slots 0 and 1")

    def stop(self) -> None:
        import subprocess

        for w in self.workers:  # let each close its engine and exit, reading what it still logs
            try:
                w.communicate("stop\n", timeout=120)
            except (subprocess.TimeoutExpired, OSError, ValueError):
                w.kill()
                w.wait()


def _line(proc, wanted) -> str:
    """The first line of ``proc``'s stdout that is ``wanted`` (vLLM logs to stdout too); '' at EOF."""
    for line in proc.stdout:
        if wanted(line.strip()):
            return line.strip()
    return ""


def slot_worker(config: str, windows_file: str, slots_dir: str, store_dir: str) -> None:
    """One engine slot: claim a slot, start and warm up its engine, print ``ready``; then label
    its windows into a fresh store at each ``go N`` line, printing the result, until ``stop``."""
    import dataclasses
    import json

    import pyarrow.parquet as pq

    from benchmarks.common import bench_meta
    from distill.config import load_config
    from distill.run import paths
    from distill.teacher.labels import label_shard
    from distill.teacher.vllm_engine import VllmTeacher
    from storage.cache import LabelStore

    cfg = load_config(config)
    windows = pq.read_table(windows_file)
    engine_cfg = dataclasses.replace(cfg.teacher.engine, slots=2)
    engine = VllmTeacher(paths.teacher_dir(cfg), cfg.teacher.k, cfg.corpus.window, engine_cfg, slot_folder=slots_dir)
    ids, starts = windows.column("input_ids").to_pylist(), windows.column("label_start").to_pylist()
    list(engine.score(ids[:4], starts[:4]))  # warm-up
    meta = bench_meta(cfg, cfg.teacher.k, engine.engine_version)
    print("ready", flush=True)
    try:
        for line in sys.stdin:
            if not line.startswith("go "):
                break
            store = LabelStore(Path(store_dir) / line.split()[1])
            result = label_shard(lambda: engine, store, "bench", meta, windows, progress=False)
            print(json.dumps({"tokens": result["tokens"], "slot": engine.slot.index}), flush=True)
    finally:
        engine.close()


def bench_generate(cfg, count: int, repeats: int) -> dict:
    """Answer tokens and seconds of interleaved runs of the bare vLLM call and the pipeline."""
    import dataclasses

    import vllm

    from benchmarks.common import bench_meta, corpus_windows
    from benchmarks.timing import interleave
    from distill.run import paths
    from distill.teacher.labels import label_shard, prompt_seed
    from distill.teacher.vllm_engine import VllmTeacher
    from storage.cache import LabelStore

    windows, ids, _ = corpus_windows(cfg, count)
    doc_ids = windows.column("doc_id").to_pylist()
    s, k = cfg.teacher.sampling, cfg.teacher.k
    engine_cfg = dataclasses.replace(cfg.teacher.engine, labeller=cfg.teacher.labeller)  # generate mode: logprobs
    engine = VllmTeacher(paths.teacher_dir(cfg), k, cfg.corpus.window, engine_cfg)
    list(engine.generate(ids[:4], [0] * 4, s))  # warm-up
    params = [
        vllm.SamplingParams(
            n=s.n,
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=min(s.max_tokens, cfg.corpus.window - len(p)),
            logprobs=k,
            flat_logprobs=True,
            seed=prompt_seed(s.seed, d),
        )
        for p, d in zip(ids, doc_ids)
    ]
    step = cfg.teacher.engine.batch_windows
    meta = bench_meta(cfg, k, engine.engine_version)
    answer_tokens = {"bare_vllm": [], "pipeline": []}

    def bare():
        n = 0
        for b in range(0, len(ids), step):
            outs = engine.llm.generate(
                [{"prompt_token_ids": p} for p in ids[b : b + step]], params[b : b + step], use_tqdm=False
            )
            n += sum(len(c.token_ids) for o in outs for c in o.outputs)
        answer_tokens["bare_vllm"].append(n)

    def ours():
        store = LabelStore(tempfile.mkdtemp(prefix="bench-generate-"))
        result = label_shard(lambda: engine, store, "bench", meta, windows, cfg.teacher, progress=False)
        answer_tokens["pipeline"].append(result["tokens"])

    try:
        seconds = interleave(
            {"bare_vllm": bare, "pipeline": ours},
            repeats,
            on_run=lambda r, name, sec: print(f"generate round {r} {name}: {sec:.1f} s", file=sys.stderr, flush=True),
        )
    finally:
        engine.close()
    # seeded per prompt: every run, bare or pipeline, produces (and the pipeline labels) the same answers
    counts = set(answer_tokens["bare_vllm"]) | set(answer_tokens["pipeline"])
    assert len(counts) == 1, answer_tokens
    return {"prompts": len(ids), "tokens": counts.pop(), "seconds": seconds}


if __name__ == "__main__":
    main()
