"""Training in several processes: ``torchrun`` over a job file, started by the caller (the
Dagster asset through Pipes, or a plain subprocess), one rank per device.

    python -m distill.run.launch <student folder>/launch.json

The same command does two things. Under ``torchrun`` (``LOCAL_RANK`` set) it is a rank: it
reads the job, opens the verified train shards and runs ``distill.train.trainer.train``; rank 0
reports each step to Dagster when started through Pipes. Anywhere else it starts ``torchrun``
for this node with the job's settings, which is how the other nodes of a multi-node run join
(the first node's asset logs this command).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

from dagster_pipes import open_dagster_pipes

from distill.config import from_mapping
from distill.procs import guard_children
from distill.run.labelling import open_split
from distill.run.paths import run_images, teacher_dir
from distill.run.tokenizing import student_tokens
from distill.train.trainer import teardown_distributed, train
from storage.writer import atomic_write_text

JOB_FILE = "launch.json"

Launcher = Callable[[Sequence[str], Mapping[str, str]], None]
"""Runs a command with extra environment variables to the end; raises if it fails."""


def write_job(out_dir: Path, config: dict, baseline: bool, rdzv_id: str) -> Path:
    """The job every rank (and every node) reads: the run config with overrides applied, which
    student, and the rendezvous id (the student's folder name, the same on every node)."""
    path = out_dir / JOB_FILE
    atomic_write_text(
        path,
        json.dumps({"config": config, "baseline": baseline, "out_dir": str(out_dir), "rdzv_id": rdzv_id}, indent=1),
    )
    return path


def torchrun_command(train, job: Path, rdzv_id: str) -> list[str]:
    """``torchrun`` for this node: ``--standalone`` on one node, c10d rendezvous across several."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={train.nproc_per_node}",
        f"--nnodes={train.nnodes}",
    ]
    if train.nnodes > 1:
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={train.rdzv_endpoint}", f"--rdzv_id={rdzv_id}"]
    else:
        cmd += ["--standalone"]
    return [*cmd, "-m", "distill.run.launch", str(job)]


def worker_env(train) -> dict[str, str]:
    """Threads per rank: torchrun's default of 1 starves CPU training, so on CPU each rank gets
    its share of the cores (``train.num_threads`` or an explicit ``OMP_NUM_THREADS`` win)."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    threads = train.num_threads or max(1, (os.cpu_count() or 1) // train.nproc_per_node)
    return {"OMP_NUM_THREADS": str(threads)}


def run_subprocess(cmd: Sequence[str], env: Mapping[str, str]) -> None:
    """The launcher outside Dagster: torchrun as a child whose output goes to ours."""
    guard_children()  # torchrun and its ranks end with this process, even on SIGKILL
    done = subprocess.run(list(cmd), env={**os.environ, **env})
    if done.returncode != 0:
        raise RuntimeError(f"training processes failed (exit code {done.returncode}): {' '.join(cmd)}")


def launch(out_dir: Path, config: dict, train, baseline: bool, launcher: Launcher | None = None, log=print) -> None:
    """Write the job and run this node's ``torchrun`` through ``launcher`` (default: a subprocess)."""
    rdzv_id = out_dir.name
    job = write_job(out_dir, config, baseline, rdzv_id)
    cmd = torchrun_command(train, job, rdzv_id)
    if train.nnodes > 1:
        log(
            f"training on {train.nnodes} nodes: run `{sys.executable} -m distill.run.launch {job}` on each of the "
            f"other {train.nnodes - 1} node(s) (same code and storage); they meet at {train.rdzv_endpoint}"
        )
    (launcher or run_subprocess)(cmd, worker_env(train))


def _pipes_reporter():
    """On rank 0 of a run started through Dagster Pipes: the open Pipes context (else None)."""
    if os.environ.get("RANK", "0") != "0" or "DAGSTER_PIPES_CONTEXT" not in os.environ:
        return None
    return open_dagster_pipes()


def read_job(job_path: Path) -> tuple[dict, object, object]:
    """The job file, its run config and the training settings of the student it names."""
    job = json.loads(job_path.read_text())
    cfg = from_mapping(job["config"], where=str(job_path))
    return job, cfg, cfg.baseline_train if job["baseline"] else cfg.train


def run_rank(job_path: Path) -> dict:
    """One rank of the job: open the train shards (their records and sizes; the launching
    process verified their checksums) and train."""
    job, cfg, train_cfg = read_job(job_path)
    shards = open_split(cfg, "train", verify_checksum=False)
    vocab, cross = student_tokens(cfg)
    pipes = _pipes_reporter()
    every = max(1, train_cfg.steps // 50)

    def on_step(entry: dict) -> None:
        if entry["step"] % every == 0 or entry["step"] == entry["steps"]:
            rate = "tok_s" if "tok_s" in entry else "examples_s"  # candidates data counts examples
            unit = "labelled tok/s" if rate == "tok_s" else "examples/s"
            pipes.log.info(
                f"step {entry['step']}/{entry['steps']}: loss {entry['loss']:.4f} (ce {entry['ce']:.4f}, "
                f"kd {entry['kd']:.4f}), lr {entry['lr']:.3g}, grad norm {entry['grad_norm']:.3g}, "
                f"{entry[rate]:.0f} {unit} (all ranks), "
                f"peak memory {entry['peak_memory_mib']:.0f} MiB (rank 0)"
            )
            pipes.report_custom_message(
                {k: entry[k] for k in ("step", "loss", "ce", "kd", "lr", "grad_norm", "peak_memory_mib", rate)}
            )

    with pipes if pipes is not None else contextlib.nullcontext():
        return train(
            cfg.student,
            train_cfg,
            teacher_dir(cfg),
            shards,
            job["out_dir"],
            vocab,
            on_step=on_step if pipes is not None else None,
            cross=cross,
            images=run_images(cfg),
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: python -m distill.run.launch <student folder>/{JOB_FILE}", file=sys.stderr)
        return 2
    job_path = Path(argv[0])
    if not job_path.is_file():
        print(f"{job_path}: no such job file (the first node writes it when training starts)", file=sys.stderr)
        return 2
    if "LOCAL_RANK" in os.environ:
        run_rank(job_path)
        teardown_distributed()
        return 0
    job, _, train = read_job(job_path)
    run_subprocess(torchrun_command(train, job_path, job["rdzv_id"]), worker_env(train))
    return 0


if __name__ == "__main__":
    sys.exit(main())
