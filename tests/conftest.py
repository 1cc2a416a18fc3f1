"""Shared fixtures: the bundled teacher (converted once into the repo's data folder), a tiny run
config, one real vLLM engine for every test that needs it, a real S3-compatible server (moto) on
loopback; and the test tiers.

Tiers follow from what a test uses, so no one sets them by hand (``pytest_collection_modifyitems``):

- ``engine``: it uses a vLLM engine in this process: the ``engine`` fixture (directly or through
  another fixture, such as ``materialized``), or its code names ``VllmTeacher`` or ``get_engine``;
- ``subprocess``: it starts processes (``python -m``, ``torchrun``, ``dagster dev``, a worker):
  its code names ``subprocess``, ``multiprocessing`` or a starter of ``tests.processes`` /
  ``tests.pipelines.dagster_server``;
- ``slow``: either of them. ``make test-fast`` runs ``-m "not slow"``; ``make test`` (CI) runs all.

"Its code" is the test function, the fixtures it uses and the functions of ``tests/`` they name,
transitively. A test left in the fast tier that starts a Python process anyway (a worker,
``torchrun``, ``dagster``, a vLLM engine: anything from this environment's ``bin`` folder, or a
``multiprocessing`` process) fails, saying why, so a rule that misses a new way of starting one
shows at once. Short programs a library runs and waits for (``git`` under mkdocstrings) pass.
"""

from __future__ import annotations

import contextlib
import inspect
import multiprocessing.process
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.processes import SESSION_ENV, describe, vllm_prefix, wait_until_gone  # noqa: E402

# every process the suite starts inherits this mark, so the census at the end finds it even
# after it was re-parented to init
SESSION_MARK = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
os.environ[SESSION_ENV] = SESSION_MARK
os.environ["VLLM_PROCESS_NAME_PREFIX"] = vllm_prefix(SESSION_MARK)  # engines are found by their title


def _exempt() -> set[int]:
    """This process, its own guard (it must outlive the suite's engines) and multiprocessing's
    helper (resource tracker), which ends with this process."""
    import psutil

    from distill import procs

    exempt = {os.getpid()}
    if procs._guard is not None and procs._guard[0] == os.getpid():
        exempt.add(procs._guard[1].pid)
    exempt |= {child.pid for child in psutil.Process().children() if procs.is_resource_tracker(child)}
    return exempt


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"the test session received signal {signal.Signals(signum).name}")


def pytest_configure(config):
    """A suite ended by SIGTERM (``timeout``, a CI runner, a supervisor) unwinds as after Ctrl-C:
    the running test's ``finally`` blocks, the fixtures' finalizers and ``pytest_sessionfinish``
    run, so the processes tests started are ended. Python's default for SIGTERM exits at once,
    and a server in its own process group (``tests.processes.start_group``) would outlive it."""
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)


def pytest_sessionfinish(session, exitstatus):
    """The suite must end with no process of its own alive: anything started by a test (engine,
    server, torchrun) that is still running is ended here and fails the run, named."""
    from distill.run.engines import close_engines

    close_engines()
    left = wait_until_gone(SESSION_ENV, SESSION_MARK, timeout=30, exclude=_exempt())
    if left:
        from distill.procs import end_processes

        names = describe(left)
        end_processes(left)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"FAILED: the test session left {len(left)} process(es) running (now ended): {names}", red=True
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# what puts a test in a tier (see the module docstring)
ENGINE_FIXTURES = {"engine", "answering_engine", "features_engine", "vlm_materialized"}
ENGINE_NAMES = {"VllmTeacher", "get_engine"}
PROCESS_NAMES = {"subprocess", "multiprocessing", "start_group", "run_group", "dagster_dev"}
TIERS = ("engine", "subprocess", "slow")
_NAMES: dict = {}


def _code_names(fn) -> frozenset[str]:
    """Global and attribute names the code of ``fn`` uses (nested functions included), and those
    of the functions of ``tests/`` it names, transitively."""
    fn = inspect.unwrap(fn)
    if fn not in _NAMES:
        _NAMES[fn] = frozenset()  # a helper that names itself (recursion) ends here
        names, stack = set(), [fn.__code__]
        while stack:
            code = stack.pop()
            names.update(code.co_names)
            stack.extend(c for c in code.co_consts if inspect.iscode(c))
        for name in list(names):
            target = fn.__globals__.get(name)
            if inspect.isfunction(target) and target.__module__.split(".")[0] == "tests":
                names |= _code_names(target)
        _NAMES[fn] = frozenset(names)
    return _NAMES[fn]


def pytest_collection_modifyitems(config, items):
    """Each test's tier markers, from the fixtures it uses and the names its code holds."""
    for item in items:
        by_hand = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if by_hand:
            raise pytest.UsageError(
                f"{item.nodeid}: marked {by_hand} by hand; conftest.py sets tiers from what a test uses"
            )
        fixtures = [d.func for name in item.fixturenames for d in item._fixtureinfo.name2fixturedefs.get(name, ())]
        names = set().union(*(_code_names(fn) for fn in [item.function, *fixtures]))
        tiers = []
        if ENGINE_FIXTURES & set(item.fixturenames) or ENGINE_NAMES & names:
            tiers.append("engine")
        if PROCESS_NAMES & names:
            tiers.append("subprocess")
        if tiers:
            for tier in [*tiers, "slow"]:
                item.add_marker(tier)


def _runs_python(args) -> bool:
    """Whether ``Popen(args)`` starts this environment's Python or one of its scripts."""
    program = Path(os.fsdecode(args if isinstance(args, (str, bytes, os.PathLike)) else args[0]).split()[0])
    return program.parent == Path(sys.executable).parent or program.name.startswith("python")


@contextlib.contextmanager
def _fast_tier_guard(item):
    """A fast-tier test must start no Python process (an engine is such processes): starting one raises."""
    if item.get_closest_marker("slow") is not None:
        yield
        return

    def refuse(what):
        raise RuntimeError(
            f"{item.nodeid} is in the fast tier (no engine, no subprocess) but starts {what}: tests/conftest.py "
            "could not tell from its code; start it with tests.processes.start_group/run_group or the subprocess "
            "module in the test's own code, or use the engine fixture"
        )

    popen = subprocess.Popen.__init__

    def checked_popen(self, args, *rest, **kwargs):
        if _runs_python(args):
            refuse(f"a Python process ({args})")
        popen(self, args, *rest, **kwargs)

    def checked_start(self):
        refuse(f"a multiprocessing process ({self.name})")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", checked_popen)
        patch.setattr(multiprocessing.process.BaseProcess, "start", checked_start)
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _fast_tier_guard(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _fast_tier_guard(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    with _fast_tier_guard(item):
        return (yield)


REPO = Path(__file__).resolve().parents[1]
TINY_K = 8
TINY_WINDOW = 64


@pytest.fixture(scope="session")
def teacher_dir() -> Path:
    from distill.teacher.checkpoint import BUNDLED, resolve_teacher

    return resolve_teacher(BUNDLED, REPO / "data")


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory, teacher_dir) -> Path:
    root = tmp_path_factory.mktemp("run")
    config = {
        "storage_root": str(root / "data"),
        "teacher": {"model": str(teacher_dir), "k": TINY_K},
        "corpus": {
            "max_documents": 10,
            "window": TINY_WINDOW,
            "train_shards": 2,
            "heldout_shards": 1,
            "heldout_fraction": 0.25,
        },
        "train": {"steps": 3, "batch_size": 4, "progress": False},
        "eval": {"max_windows": 12, "mc_file": str(REPO / "examples" / "python_mc.jsonl")},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def tiny_config(tiny_config_path):
    from distill.config import load_config

    return load_config(tiny_config_path)


@pytest.fixture(scope="session")
def hf_teacher(teacher_dir):
    """The bundled teacher under plain transformers (the reference the engine is checked against)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32, use_safetensors=True)


def mode_config(tiny_config, mode: str, **teacher):
    """The tiny config in ``generate`` or ``candidates`` mode on the shipped example data
    (same k, window and engine settings: the session's engine serves it)."""
    import dataclasses

    source = {"generate": "prompts.jsonl", "candidates": "candidates.jsonl"}[mode]
    corpus = dataclasses.replace(
        tiny_config.corpus, source=str(REPO / "examples" / source), id_column="id", max_documents=12
    )
    return dataclasses.replace(
        tiny_config, teacher=dataclasses.replace(tiny_config.teacher, mode=mode, **teacher), corpus=corpus
    )


class SessionEngine:
    """The session's engine, looked up in the product's registry (``engines.get_engine``) at
    every use: when the out-of-memory killer of a loaded machine takes it, the next use starts a
    fresh one instead of failing every later test."""

    def __init__(self, cfg, generates: bool = False):
        self._cfg, self._generates = cfg, generates

    def current(self):
        from distill.run import engines

        return engines.get_engine(self._cfg, generates=self._generates)

    def __getattr__(self, name):
        return getattr(self.current(), name)


@pytest.fixture(scope="session")
def engine(tiny_config):
    """The one vLLM engine of the test session (the graph test reuses it through the same key)."""
    from distill.run import engines

    eng = SessionEngine(tiny_config)
    eng.current()
    yield eng
    engines.close_engines()


@pytest.fixture(scope="session")
def answering_engine(tiny_config, engine):
    """The session's generating engine (``teacher.engine.labeller: logprobs``; the session's
    ``engine`` is a device labeller, which only scores): greedy answers, ``generate`` mode, and the
    labeller the device one is checked against. Started on first use, closed with ``engine``."""
    eng = SessionEngine(tiny_config, generates=True)
    eng.current()
    return eng


@pytest.fixture(scope="session")
def materialized(tiny_config_path, tiny_config, engine):
    """The whole asset graph materialized once, in-process, on the tiny config."""
    import dagster as dg

    from pipelines.definitions import build_definitions
    from pipelines.run import materialize_all

    defs = build_definitions(str(tiny_config_path), keep_engine_alive=True)
    instance = dg.DagsterInstance.ephemeral()
    result = materialize_all(defs, instance, tiny_config.corpus.shard_names())
    return defs, instance, result


class _OneRequestAtATime:
    """moto checks ``If-None-Match`` and then stores the object in two steps on a threaded
    server, so two racing conditional PUTs can both succeed there; S3 does both atomically.
    Handling one request at a time gives the test server S3's atomicity, so the race tests
    measure the writer's protocol and not moto's."""

    def __init__(self, app):
        self.app, self.lock = app, threading.Lock()

    def __call__(self, environ, start_response):
        with self.lock:
            return list(self.app(environ, start_response))


@pytest.fixture(scope="module")
def s3_server():
    """``s3://labels/run?...``: a URI into bucket ``labels`` of a moto server on loopback."""
    import logging

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = make_server(
        "127.0.0.1",
        0,
        _OneRequestAtATime(DomainDispatcherApplication(create_backend_app)),
        threaded=True,
        request_handler=MotoRequestHandler,
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    import boto3

    boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1").create_bucket(Bucket="labels")
    yield f"s3://labels/run?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.shutdown()
    thread.join()
