"""GPU check of the student trainer and the student evaluation, without vLLM and without the
teacher's weights: everything it needs travels in a small carry folder, ``.gpucarry``.

Two modes.

``--make-carry`` (here, where ``data/`` holds the demo's labels; imports the pipeline, hence vLLM,
only to find the demo's label sets through ``distill.run.labelling.open_split``)::

    .venv/bin/python benchmarks/gpu_trainer_check.py --make-carry [--config configs/demo.yaml] [--carry .gpucarry]

builds ``.gpucarry/``:

- ``teacher/``: a teacher stub, every file of the resolved teacher folder except weights
  (config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
  chat_template.jinja, ...): enough for ``build_student`` (``init: random``: the teacher's
  architecture with ``--layers`` layers), ``AutoTokenizer`` and ``save_pretrained``;
- ``labels/<key[:2]>/<key>.{parquet,json}``: the config's verified train and held-out shards in
  the ``LabelStore`` layout (Parquet file + commit record), so the run reopens them with
  ``LabelStore.open`` and the reader's full checks (record, sha256, schema, provenance, cache key);
- ``carry.json``: the shard keys per split, the metadata the run expects of them
  (``labelling.expected_meta``), the teacher's hashes and how the carry was built. Train shards
  are taken in config order while they fit ``--max-carry-mib``.

Run mode (default; imports neither vLLM nor Dagster: ``distill.train.trainer``, ``distill.train.student``,
``distill.eval.evaluation``, ``storage``; reads only the carry folder)::

    python3 benchmarks/gpu_trainer_check.py [--device cuda|cpu] [--steps 60] [--carry .gpucarry]

a. trains a randomly initialized student (teacher architecture, ``--layers`` 4) for ``--steps`` N
   with ``distill.train.trainer.train``: batch 8, lr 1e-3, kd_weight 0.5, tail bucket (configs/demo.yaml),
   precision bf16 (autocast; fp32 with ``--device cpu``); prints labelled tokens/s, excluding step 1
   (warm-up: CUDA context, kernel selection, first shuffle-buffer fill), and the data loader's own tokens/s;
b. exact resume: the same config stopped at N/2 (checkpoint) and resumed to N by a fresh
   ``train`` call, compared with the uninterrupted run (max |weight diff|, max |loss diff|), next
   to a second uninterrupted run (run-to-run noise of the device's kernels); then again in a
   child process with ``torch.use_deterministic_algorithms(True)`` and
   ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (falls back to ``warn_only=True`` if an op has no
   deterministic kernel); measurements, nothing asserted;
c. evaluates the trained student on the held-out shards with ``distill.eval.evaluation.evaluate_model``
   on the device (bf16 autocast where ``eval_device`` says so, and fp32) and on the CPU in fp32,
   the same saved weights; plus the teacher's metrics from its stored labels (``teacher_metrics``);
d. trains ``--fp32-steps`` steps in fp32 for the bf16/fp32 throughput ratio;
e. prints peak CUDA memory per phase.

The last line is ``name=value`` pairs (``gpu_`` prefix on CUDA, ``cpu_`` with ``--device cpu``).
Models and checkpoints go to a temporary folder (removed at the end unless ``--keep``);
``results.json`` and the runs' loss histories go to ``$OUT`` when set, else to that folder.
``--device cpu`` hides every CUDA device (``CUDA_VISIBLE_DEVICES=""`` before torch is
imported), since ``train`` and ``eval_device`` pick CUDA whenever it is visible.

If matplotlib is missing, ``distill.train.trainer._plot_history`` (the loss plot ``finish`` draws) is
replaced by a no-op in this process, since that plot is the only use of matplotlib on this path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # the repository, not benchmarks/, as in the other benchmarks (nothing is installed remotely)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")
DET_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def say(*parts) -> None:
    print(*parts, flush=True)


# ---------------------------------------------------------------------------------------------
# --make-carry


def make_carry(config: str, carry: Path, max_mib: float) -> None:
    from distill.config import load_config
    from distill.run import labelling, paths

    cfg = load_config(config)
    teacher = paths.teacher_dir(cfg)
    if carry.exists():
        shutil.rmtree(carry)
    (carry / "teacher").mkdir(parents=True)
    copied = []
    for f in sorted(teacher.iterdir()):
        if f.is_file() and not f.name.startswith(".") and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(f, carry / "teacher" / f.name)
            copied.append(f.name)
    stub_bytes = sum((carry / "teacher" / n).stat().st_size for n in copied)
    budget = max_mib * 2**20 - stub_bytes
    splits, skipped = {}, []
    heldout = labelling.open_split(cfg, "heldout")
    budget -= sum(s.record["bytes"] for s in heldout)
    train = []
    for s in labelling.open_split(cfg, "train"):
        if train and s.record["bytes"] > budget:
            skipped.append(s.meta.shard)
            continue
        train.append(s)
        budget -= s.record["bytes"]
    for split, shards in (("train", train), ("heldout", heldout)):
        entries = []
        for s in shards:
            key = s.meta.cache_key
            dest = carry / "labels" / key[:2]
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s.file, dest / f"{key}.parquet")
            shutil.copy2(s.path.with_suffix(".json"), dest / f"{key}.json")
            entries.append(
                {
                    "key": key,
                    "shard": s.meta.shard,
                    "rows": s.rows,
                    "tokens": s.tokens,
                    "bytes": s.record["bytes"],
                    "sha256": s.record["sha256"],
                    "source": str(s.path.relative_to(cfg.root)),
                }
            )
        splits[split] = {"shards": entries, "expect": labelling.expected_meta(cfg, split)}
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    manifest = {
        "config": config,
        "teacher_model": cfg.teacher.model,
        "teacher_dir": str(teacher.relative_to(cfg.root)),
        "teacher_hashes": paths.teacher_hashes(cfg),
        "teacher_files": copied,
        "splits": splits,
        "skipped_train_shards": skipped,
        "git_commit": commit,
        "built_by": f"python benchmarks/gpu_trainer_check.py --make-carry --config {config} --carry {carry.name} "
        f"--max-carry-mib {max_mib:g}",
    }
    (carry / "carry.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
    say(
        f"carry {carry}: {total / 2**20:.2f} MiB; teacher stub {copied}; "
        f"train {[e['shard'] for e in splits['train']['shards']]} "
        f"({sum(e['rows'] for e in splits['train']['shards'])} windows), "
        f"heldout {[e['shard'] for e in splits['heldout']['shards']]} "
        f"({sum(e['rows'] for e in splits['heldout']['shards'])} windows)"
        + (f"; left out (over {max_mib:g} MiB): {skipped}" if skipped else "")
    )


# ---------------------------------------------------------------------------------------------
# run mode


def open_carry(carry: Path):
    """(teacher stub folder, train shards, held-out shards, manifest), every shard verified."""
    from storage.cache import LabelStore

    manifest = json.loads((carry / "carry.json").read_text())
    store = LabelStore(carry / "labels")
    out = []
    for split in ("train", "heldout"):
        entry = manifest["splits"][split]
        out.append([store.open(s["key"], expect=entry["expect"], verify_checksum=True) for s in entry["shards"]])
    return carry / "teacher", out[0], out[1], manifest


class Clock:
    """Per-step timestamps (device-synchronized) and labelled tokens of one ``train`` call, from
    the trainer's own history entries (``on_step``)."""

    def __init__(self, sync):
        self.sync, self.times, self.tokens = sync, [], []

    def on_step(self, entry: dict) -> None:
        self.sync()
        self.times.append(time.perf_counter())
        self.tokens.append(entry["tokens"])

    def tok_s(self) -> float:
        """Labelled tokens per second over steps 2..N (step 1 excluded: warm-up)."""
        if len(self.times) < 2:
            return float("nan")
        return sum(self.tokens[1 : len(self.times)]) / (self.times[-1] - self.times[0])

    def step_ms(self) -> float:
        import statistics

        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return 1000 * statistics.median(gaps) if gaps else float("nan")


def run_train(
    ctx: dict, name: str, train_cfg, stop_after: int | None = None, out_dir: Path | None = None
) -> tuple[dict, Clock, float]:
    """One ``distill.train.trainer.train`` call; returns (summary, clock, seconds of the whole call)."""
    import torch

    from distill.train.trainer import train

    cuda = ctx["device"] == "cuda"
    clock = Clock(torch.cuda.synchronize if cuda else (lambda: None))
    out_dir = out_dir or ctx["work"] / name
    t0 = time.perf_counter()
    summary = train(
        ctx["student"],
        train_cfg,
        ctx["teacher"],
        ctx["train"],
        out_dir,
        ctx["vocab"],
        stop_after=stop_after,
        on_step=clock.on_step,
    )
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return summary, clock, seconds


def history(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "history.jsonl").read_text().splitlines()]


def compare(a: Path, b: Path, half: int | None = None) -> dict:
    """Max |diff| of the final weights (model/model.safetensors) and of the loss histories."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    if set(wa) != set(wb):
        raise ValueError(f"{a} and {b}: different tensors {sorted(set(wa) ^ set(wb))}")
    diffs = {n: float((wa[n].double() - wb[n].double()).abs().max()) for n in wa}
    worst = max(diffs, key=diffs.get)
    ha, hb = history(a), history(b)
    if [h["step"] for h in ha] != [h["step"] for h in hb]:
        raise ValueError(f"{a} and {b}: loss histories cover different steps")
    loss = [abs(x["loss"] - y["loss"]) for x, y in zip(ha, hb)]
    out = {
        "max_weight_diff": diffs[worst],
        "worst_tensor": worst,
        "max_loss_diff": max(loss),
        "weights_identical": all(v == 0 for v in diffs.values()),
        "losses_identical": max(loss) == 0,
        "final_loss": [ha[-1]["loss"], hb[-1]["loss"]],
    }
    if half:
        out["max_loss_diff_first_half"] = max(loss[:half])
        out["max_loss_diff_after_resume"] = max(loss[half:])
    return out


def resume_pair(ctx: dict, tag: str, cfg) -> Path:
    """Train ``cfg`` to N/2 (checkpoint), then resume to N in a fresh ``train`` call."""
    out = ctx["work"] / tag
    half = cfg.steps // 2
    first, _, s1 = run_train(ctx, tag, cfg, stop_after=half, out_dir=out)
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    if first.get("finished") or not ckpts:
        raise RuntimeError(f"{out}: stop_after={half} did not leave a checkpoint ({first}, {ckpts})")
    second, _, s2 = run_train(ctx, tag, cfg, out_dir=out)
    say(
        f"  {tag}: stopped at step {first['steps']} (checkpoint {ckpts[-1]}, {s1:.1f} s), resumed to "
        f"{second['steps']} ({s2:.1f} s)"
    )
    return out


def mem_gib(reset: bool = False) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    out = {
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
    }
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return out


def setup(args) -> dict:
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch: train() and eval_device() take CUDA whenever visible
    import torch
    import transformers
    from transformers import AutoTokenizer

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--device cuda: torch {torch.__version__} (cuda {torch.version.cuda}) sees no CUDA device; use --device "
            "cpu"
        )
    if hasattr(transformers.utils.logging, "disable_progress_bar"):
        transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bars in the log
    try:
        import matplotlib  # noqa: F401  (only finish()'s loss plot needs it)
    except ImportError:
        import distill.train.trainer as trainer

        trainer._plot_history = lambda history, path: None
        say(
            "note: matplotlib is not installed: distill.train.trainer._plot_history (finish()'s loss.png) replaced "
            "by a no-op here"
        )
    from distill.train.config import StudentConfig

    teacher, train_shards, heldout, manifest = open_carry(Path(args.carry))
    vocab = len(AutoTokenizer.from_pretrained(teacher))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_trainer_check_"))
    work.mkdir(parents=True, exist_ok=True)
    results_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else work
    results_dir.mkdir(parents=True, exist_ok=True)
    return {
        "device": args.device,
        "teacher": teacher,
        "train": train_shards,
        "heldout": heldout,
        "manifest": manifest,
        "vocab": vocab,
        "work": work,
        "results": results_dir,
        "torch": torch,
        "transformers": transformers.__version__,
        "student": StudentConfig(init="random", num_layers=args.layers, seed=0),
    }


def train_config(args, **changes):
    import dataclasses

    from distill.train.config import TrainConfig

    base = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=1e-3,
        kd_weight=0.5,
        tail="bucket",
        precision=args.precision,
        progress=False,
        seed=0,
    )
    return dataclasses.replace(base, **changes)


def det_phase(args) -> None:
    """Child process: exact resume with deterministic algorithms; writes ``--det-result``."""
    ctx = setup(args)
    torch = ctx["torch"]
    result = {"cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    for mode in ("strict", "warn_only"):
        torch.use_deterministic_algorithms(True, warn_only=mode == "warn_only")
        work = ctx["work"] / f"det-{mode}"
        ctx_mode = {**ctx, "work": work}
        try:
            cfg = train_config(args)
            _, clock, seconds = run_train(ctx_mode, "det-uninterrupted", cfg)
            pair = resume_pair(ctx_mode, "det-resumed", cfg)
            result.update(mode=mode, tok_s=clock.tok_s(), **compare(work / "det-uninterrupted", pair, cfg.steps // 2))
            break
        except RuntimeError as e:
            if mode == "warn_only" or "determinis" not in str(e):
                result.update(mode="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                break
            result["strict_error"] = str(e).splitlines()[0][:300]
            say(f"  deterministic (strict) failed: {result['strict_error']}; retrying with warn_only=True")
    Path(args.det_result).write_text(json.dumps(result))
    if not args.keep:
        shutil.rmtree(ctx["work"], ignore_errors=True)


def run(args) -> None:
    t_all = time.perf_counter()
    ctx = setup(args)
    torch = ctx["torch"]
    from distill.eval.config import EvalConfig
    from distill.eval.evaluation import evaluate_model
    from distill.eval.models import eval_device
    from distill.eval.stored import teacher_metrics
    from distill.train.trainer import batches
    from storage.reader import ShardStream, StreamPosition

    cuda = ctx["device"] == "cuda"
    dev = "gpu" if cuda else "cpu"
    n = args.steps
    fp32_steps = args.fp32_steps or max(2, min(20, n))
    say(
        f"python {sys.version.split()[0]} torch {torch.__version__} (cuda {torch.version.cuda}) transformers "
        f"{ctx['transformers']}"
    )
    if cuda:
        p = torch.cuda.get_device_properties(0)
        say(
            f"device: {torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}"
        )
    else:
        say(f"device: cpu, {torch.get_num_threads()} torch threads")
    tr, ho = ctx["train"], ctx["heldout"]
    say(
        f"carry {args.carry}: train {len(tr)} shard(s), {sum(s.rows for s in tr)} windows, "
        f"{sum(s.tokens for s in tr)} labelled tokens, "
        f"{tr[0].meta.kind} labels, {tr[0].meta.slots} ids per position; heldout {len(ho)} shard(s), "
        f"{sum(s.rows for s in ho)} windows; "
        f"vocab {ctx['vocab']}; student: random init, {args.layers} layers of the teacher's architecture"
    )
    say(f"work dir {ctx['work']}; results to {ctx['results']}")
    res: dict = {
        "device": dev,
        "steps": n,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "layers": args.layers,
    }

    # the loader alone: how fast batches come off the shards (part of every training step: no prefetch thread)
    stream = ShardStream(tr, seed=0, shuffle=True, shuffle_buffer=train_config(args).shuffle_buffer)
    t0, times, toks = time.perf_counter(), [], []
    for batch, _ in batches(stream, args.batch_size, tr[0].meta.slots, StreamPosition()):
        times.append(time.perf_counter())
        toks.append(int(batch["mask"].sum()))
        if len(times) == max(3, min(n, 30)):
            break
    res["loader_first_batch_s"] = times[0] - t0
    res["loader_tok_s"] = sum(toks[1:]) / (times[-1] - times[0])
    res["loader_ms_per_batch"] = 1000 * (times[-1] - times[0]) / (len(times) - 1)
    say(
        f"[loader] first batch {res['loader_first_batch_s']:.2f} s (shuffle-buffer fill), then "
        f"{res['loader_ms_per_batch']:.2f} ms per batch of "
        f"{args.batch_size}: {res['loader_tok_s']:.0f} labelled tok/s (the trainer reads batches synchronously, in "
        "its step loop)"
    )
    mem_gib(reset=True)

    # a. the distilled student, uninterrupted
    cfg = train_config(args)
    summary, clock, seconds = run_train(ctx, "uninterrupted", cfg)
    res.update(
        train_tok_s=clock.tok_s(),
        train_step_ms=clock.step_ms(),
        train_call_s=seconds,
        final_loss=summary["final_loss"],
        parameters=summary["parameters"],
        **{f"train_{k}": v for k, v in mem_gib(reset=True).items()},
    )
    say(
        f"[a] {n} steps {args.precision}: {res['train_tok_s']:.0f} labelled tok/s over steps 2..{n} (step 1 = "
        "warm-up, excluded), "
        f"median step {res['train_step_ms']:.1f} ms, train() call {seconds:.1f} s (model build + save included), "
        f"final loss {summary['final_loss']:.4f}, {summary['parameters'] / 1e6:.1f} M parameters"
        + (
            f", peak CUDA memory {res['train_peak_alloc_gib']:.2f} GiB allocated / "
            f"{res['train_peak_reserved_gib']:.2f} GiB reserved"
            if cuda
            else ""
        )
    )

    # b. exact resume vs uninterrupted, and run-to-run noise
    pair = resume_pair(ctx, "resumed", cfg)
    res["resume"] = compare(ctx["work"] / "uninterrupted", pair, n // 2)
    run_train(ctx, "rerun", cfg)
    res["rerun"] = compare(ctx["work"] / "uninterrupted", ctx["work"] / "rerun")
    for tag in ("resume", "rerun"):
        r = res[tag]
        say(
            f"[b] {tag} vs uninterrupted: max |weight diff| {r['max_weight_diff']:.3g} ({r['worst_tensor']}), max "
            f"|loss diff| {r['max_loss_diff']:.3g}"
            + (
                f" (first half {r['max_loss_diff_first_half']:.3g}, after resume {r['max_loss_diff_after_resume']:.3g})"
                if tag == "resume"
                else ""
            )
            + f", identical weights {r['weights_identical']}, identical losses {r['losses_identical']}"
        )
    for tag in ("resumed", "rerun"):
        if not args.keep:
            shutil.rmtree(ctx["work"] / tag, ignore_errors=True)
    mem_gib(reset=True)

    # b'. the same with deterministic algorithms, in a child process (CUBLAS_WORKSPACE_CONFIG must precede the
    # first cuBLAS handle)
    if args.skip_det:
        res["det"] = {"mode": "skipped"}
    else:
        det_file = ctx["work"] / "det.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--phase",
            "det",
            "--det-result",
            str(det_file),
            "--carry",
            args.carry,
            "--device",
            args.device,
            "--steps",
            str(n),
            "--batch-size",
            str(args.batch_size),
            "--layers",
            str(args.layers),
            "--precision",
            args.precision,
            "--work",
            str(ctx["work"] / "det"),
        ] + (["--keep"] if args.keep else [])
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, env={**os.environ, **DET_ENV}).returncode
        res["det"] = (
            json.loads(det_file.read_text())
            if det_file.exists()
            else {"mode": "error", "error": f"child exited {rc} without a result"}
        )
        d = res["det"]
        if "max_weight_diff" in d:
            say(
                f"[b'] deterministic ({d['mode']}, CUBLAS_WORKSPACE_CONFIG={d['cublas_workspace_config']}): resume vs "
                "uninterrupted "
                f"max |weight diff| {d['max_weight_diff']:.3g}, max |loss diff| {d['max_loss_diff']:.3g}, identical "
                "weights "
                f"{d['weights_identical']}, {d['tok_s']:.0f} tok/s, child {time.perf_counter() - t0:.1f} s"
            )
        else:
            say(f"[b'] deterministic: {d}")

    # d. fp32 throughput
    summary32, clock32, seconds32 = run_train(ctx, "fp32", train_config(args, steps=fp32_steps, precision="fp32"))
    res.update(
        train_tok_s_fp32=clock32.tok_s(),
        train_step_ms_fp32=clock32.step_ms(),
        **{f"fp32_{k}": v for k, v in mem_gib(reset=True).items()},
    )
    say(
        f"[d] {fp32_steps} steps fp32: {res['train_tok_s_fp32']:.0f} labelled tok/s over steps 2..{fp32_steps}, "
        "median step "
        f"{res['train_step_ms_fp32']:.1f} ms; {args.precision}/fp32 throughput "
        f"{res['train_tok_s'] / res['train_tok_s_fp32']:.2f}x"
        + (f"; peak CUDA memory {res['fp32_peak_alloc_gib']:.2f} GiB allocated" if cuda else "")
    )
    if not args.keep:
        shutil.rmtree(ctx["work"] / "fp32", ignore_errors=True)

    # c. held-out evaluation of the saved student: device (as the pipeline evaluates) vs CPU fp32
    from transformers import AutoModelForCausalLM

    ecfg = EvalConfig(batch_size=args.eval_batch_size)
    model_dir = ctx["work"] / "uninterrupted" / "model"
    device, bf16 = eval_device(args.precision)
    evals = {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    runs = [(f"{device.type}_{'bf16' if bf16 else 'fp32'}", device, bf16)]
    if device.type == "cuda" and bf16:
        runs.append(("cuda_fp32", device, False))
    if device.type != "cpu":
        runs.append(("cpu_fp32", torch.device("cpu"), False))
    for tag, where, use_bf16 in runs:
        model.to(where)
        t0 = time.perf_counter()
        m = evaluate_model(model, ho, ecfg, use_bf16)
        if where.type == "cuda":
            torch.cuda.synchronize()
        m["seconds"] = time.perf_counter() - t0
        evals[tag] = {k: v for k, v in m.items() if k not in ("calibration", "kl_by_position")}
        say(
            f"[c] student on {tag}: ppl {m['ppl']:.4f} kl {m['kl']:.5f} top1 {m['top1']:.4f} ece {m['ece']:.4f} "
            f"over {m['positions']} positions, {m['seconds']:.2f} s"
        )
    del model
    teacher = teacher_metrics(ho, ecfg)
    evals["teacher_stored"] = {k: v for k, v in teacher.items() if k not in ("calibration", "kl_by_position")}
    say(f"[c] teacher (stored labels): ppl {teacher['ppl']:.4f} top1 {teacher['top1']:.4f} ece {teacher['ece']:.4f}")
    first, ref = evals[runs[0][0]], evals["cpu_fp32" if "cpu_fp32" in evals else runs[0][0]]
    res["eval"] = evals
    res["eval_ppl_rel_diff"] = abs(first["ppl"] - ref["ppl"]) / ref["ppl"]
    res["eval_kl_abs_diff"] = abs(first["kl"] - ref["kl"])
    res["eval_top1_abs_diff"] = abs(first["top1"] - ref["top1"])
    say(
        f"[c] {runs[0][0]} vs cpu_fp32: ppl rel diff {res['eval_ppl_rel_diff']:.3g}, kl abs diff "
        f"{res['eval_kl_abs_diff']:.3g}, "
        f"top1 abs diff {res['eval_top1_abs_diff']:.3g}"
    )

    # e. memory, leftovers, the summary line
    if cuda:
        res["peak_cuda_alloc_gib"] = max(
            res.get("train_peak_alloc_gib", 0), res.get("fp32_peak_alloc_gib", 0), mem_gib().get("peak_alloc_gib", 0)
        )
        say(f"[e] peak CUDA memory (max over phases): {res['peak_cuda_alloc_gib']:.2f} GiB allocated")
    for name in ("uninterrupted",):
        h = ctx["results"] / f"history-{name}.jsonl"
        shutil.copy2(ctx["work"] / name / "history.jsonl", h)
    res["total_s"] = time.perf_counter() - t_all
    banned = sorted(m for m in sys.modules if m.split(".")[0] in ("vllm", "dagster", "datasets"))
    res["banned_modules"] = banned
    if banned:
        say(
            f"WARNING: imported {banned[:5]}{'...' if len(banned) > 5 else ''}: the remote machine has no "
            "vllm/dagster/datasets"
        )
    (ctx["results"] / "results.json").write_text(json.dumps(res, indent=1, default=str))
    if not args.keep:
        shutil.rmtree(ctx["work"] / "uninterrupted", ignore_errors=True)
        if not os.environ.get("OUT"):
            say(f"results kept in {ctx['results'] / 'results.json'}")
        else:
            shutil.rmtree(ctx["work"], ignore_errors=True)
    d = res["det"]
    line = {
        f"{dev}_train_tok_s_{args.precision}": f"{res['train_tok_s']:.0f}",
        f"{dev}_train_tok_s_fp32" + ("_short" if args.precision == "fp32" else ""): f"{res['train_tok_s_fp32']:.0f}",
        f"{args.precision}_over_fp32": f"{res['train_tok_s'] / res['train_tok_s_fp32']:.2f}",
        "loader_tok_s": f"{res['loader_tok_s']:.0f}",
        "loader_ms_per_batch": f"{res['loader_ms_per_batch']:.2f}",
        "step_ms": f"{res['train_step_ms']:.1f}",
        "resume_max_weight_diff": f"{res['resume']['max_weight_diff']:.3g}",
        "resume_max_loss_diff": f"{res['resume']['max_loss_diff']:.3g}",
        "rerun_max_weight_diff": f"{res['rerun']['max_weight_diff']:.3g}",
        "rerun_max_loss_diff": f"{res['rerun']['max_loss_diff']:.3g}",
        "det_mode": d.get("mode"),
        "det_resume_max_weight_diff": f"{d['max_weight_diff']:.3g}" if "max_weight_diff" in d else "nan",
        "det_resume_max_loss_diff": f"{d['max_loss_diff']:.3g}" if "max_loss_diff" in d else "nan",
        f"eval_ppl_{runs[0][0]}": f"{first['ppl']:.4f}",
        "eval_ppl_cpu_fp32": f"{ref['ppl']:.4f}",
        "eval_ppl_rel_diff": f"{res['eval_ppl_rel_diff']:.3g}",
        "eval_kl_abs_diff": f"{res['eval_kl_abs_diff']:.3g}",
        **({"peak_cuda_gib": f"{res['peak_cuda_alloc_gib']:.2f}"} if cuda else {}),
        "banned_imports": len(banned),
        "total_s": f"{res['total_s']:.0f}",
    }
    say(" ".join(f"{k}={v}" for k, v in line.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--make-carry", action="store_true", help="build the carry folder from data/ (here, not on the GPU machine)"
    )
    parser.add_argument(
        "--config", default="configs/demo.yaml", help="--make-carry: the run config whose label sets to carry"
    )
    parser.add_argument(
        "--max-carry-mib",
        type=float,
        default=40.0,
        help="--make-carry: train shards are taken while the carry stays under this",
    )
    parser.add_argument("--carry", default=str(REPO / ".gpucarry"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--fp32-steps", type=int, default=None, help="steps of the fp32 throughput run (default: min(20, steps))"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--precision",
        choices=("bf16", "fp32", "auto"),
        default=None,
        help="train.precision of the main runs (default: bf16 on cuda, fp32 on cpu, where bf16 autocast is slower)",
    )
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument(
        "--skip-det", action="store_true", help="skip the deterministic-algorithms resume (child process)"
    )
    parser.add_argument("--keep", action="store_true", help="keep models and checkpoints")
    parser.add_argument(
        "--work", default=None, help="folder for models and checkpoints (default: a new temporary folder)"
    )
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--det-result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if args.steps < 2:
        parser.error("--steps must be >= 2 (resume stops at steps // 2)")
    if args.make_carry:
        make_carry(args.config, Path(args.carry), args.max_carry_mib)
    elif args.phase == "det":
        det_phase(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
