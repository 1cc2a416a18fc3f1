"""The cluster deployment files (deploy/k8s/) checked with Dagster's own code, no cluster needed:

- dagster.yaml passes Dagster's instance schema; its storage resolves to dagster_postgres and its
  run launcher to dagster_k8s.K8sRunLauncher, each config accepted by that class's own schema;
  the launcher, built for real (a kubeconfig that points nowhere), turns a run into a Kubernetes
  Job that requests the GPU, mounts the shared volume and gets the Postgres password and the run
  config, and a `dagster-k8s/config` run tag raises the GPU count for a tensor-parallel teacher;
- values.yaml (the Dagster Helm chart) runs `pipelines.definitions`, requests the same GPU and
  sets the same `teacher` pool limit, using only keys of the chart's schema;
- run-config.yaml loads with distill.config.load_config and the code location builds from it.

dagster-k8s / dagster-postgres are installed with --no-deps (pyproject.toml, `k8s` extra, says
why); the tests that need them are skipped, saying so, where they are absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from dagster._config import process_config, resolve_to_config_type
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.instance.config import dagster_instance_config
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.dagster_run import DagsterRun
from dagster._serdes import class_from_code_pointer

from distill.config import load_config
from pipelines.definitions import build_definitions

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "k8s"
INSTANCE = DEPLOY / "dagster.yaml"
VALUES = DEPLOY / "values.yaml"
RUN_CONFIG = DEPLOY / "run-config.yaml"
GPU = "nvidia.com/gpu"

# dagster-k8s 0.29.27 beside dagster 1.13.28: Dagster warns about the patch mismatch on import.
pytestmark = pytest.mark.filterwarnings("ignore:Found version mismatch:UserWarning")


def _needs(module: str):
    return pytest.importorskip(
        module,
        reason=f"{module} not installed: pip install --no-deps dagster-k8s==0.29.27 dagster-postgres==0.29.27 (see "
        "pyproject.toml)",
    )


def _instance_dir(tmp_path: Path, text: str | None = None) -> str:
    d = tmp_path / "dagster_home"
    d.mkdir(exist_ok=True)
    if text is None:
        shutil.copy(INSTANCE, d / "dagster.yaml")
    else:
        (d / "dagster.yaml").write_text(text)
    return str(d)


def _process(klass, config: dict):
    return process_config(resolve_to_config_type(klass.config_type()), config)


def _instance() -> dict:
    return yaml.safe_load(INSTANCE.read_text())


def _values() -> dict:
    return yaml.safe_load(VALUES.read_text())


# ---------------------------------------------------------------------------------------------
# dagster.yaml


def test_instance_yaml_passes_dagsters_instance_schema(tmp_path):
    config, custom_class = dagster_instance_config(_instance_dir(tmp_path))
    assert custom_class is None
    assert set(config["storage"]) == {"postgres"}
    assert (config["run_launcher"]["module"], config["run_launcher"]["class"]) == ("dagster_k8s", "K8sRunLauncher")
    pools = config["concurrency"]["pools"]
    assert pools["default_limit"] >= 1 and pools["granularity"] == "run"
    assert config["run_monitoring"]["enabled"] and config["run_monitoring"]["free_slots_after_run_end_seconds"] > 0
    assert config["run_retries"] == {"enabled": True, "max_retries": 2, "retry_on_asset_or_op_failure": False}


def test_instance_schema_rejects_a_misspelled_section(tmp_path):
    """The check above is a real validation: a typo in the same file fails it."""
    bad = _instance()
    bad["concurrency"]["pools"]["default_limt"] = bad["concurrency"]["pools"].pop("default_limit")
    with pytest.raises(DagsterInvalidConfigError, match="default_limt"):
        dagster_instance_config(_instance_dir(tmp_path, yaml.safe_dump(bad)))


def test_storage_is_dagster_postgres_with_its_config_accepted(tmp_path, monkeypatch):
    _needs("dagster_postgres")

    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "secret-from-k8s")
    ref = InstanceRef.from_dir(_instance_dir(tmp_path))
    for data in (ref.storage_data, ref.run_storage_data, ref.event_storage_data, ref.schedule_storage_data):
        assert data.module_name == "dagster_postgres"
        klass = class_from_code_pointer(data.module_name, data.class_name)
        result = _process(klass, data.config_dict)
        assert result.success, result.errors
        db = result.value["postgres_db"]
        assert db["password"] == "secret-from-k8s" and db["hostname"] and db["db_name"]
    assert ref.storage_data.class_name == "DagsterPostgresStorage"

    # the password comes from the pod's environment only (the chart's secret): without it, no storage
    monkeypatch.delenv("DAGSTER_PG_PASSWORD")
    klass = class_from_code_pointer("dagster_postgres", "DagsterPostgresStorage")
    result = _process(klass, ref.storage_data.config_dict)
    assert not result.success and "DAGSTER_PG_PASSWORD" in str([e.message for e in result.errors])


@pytest.fixture
def launcher(tmp_path):
    """The K8sRunLauncher exactly as dagster.yaml configures it, except for where it finds the
    cluster: a kubeconfig that points at nothing (nothing here connects)."""
    dagster_k8s = _needs("dagster_k8s")

    data = InstanceRef.from_dir(_instance_dir(tmp_path)).run_launcher_data
    klass = class_from_code_pointer(data.module_name, data.class_name)
    assert klass is dagster_k8s.K8sRunLauncher
    result = _process(klass, data.config_dict)
    assert result.success, result.errors

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "none",
                "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "none", "user": {"token": "unused"}}],
                "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
            }
        )
    )
    assert result.value["load_incluster_config"] is True  # what the cluster uses
    value = {**result.value, "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)}
    return klass.from_config_value(None, value)


def _run_job(launcher, tags: dict):
    """The Kubernetes Job the launcher would create for a run with these tags (dagster-k8s's own
    code path of K8sRunLauncher._launch_k8s_job_with_args, without the API call)."""
    # local: dagster-k8s is an optional extra, installed by hand (the tests that reach here check it with _needs)
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import construct_dagster_k8s_job

    run = DagsterRun(job_name="__ASSET_JOB", run_id="0f0f0f0f-0000-4000-8000-000000000000", tags=tags)
    context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=True)
    job_config = context.get_k8s_job_config(
        job_image="registry.example.com/offline-distill:0.1.0", run_launcher=launcher
    )
    return construct_dagster_k8s_job(
        job_config=job_config,
        args=["dagster", "api", "execute_run"],
        job_name="dagster-run-0f0f0f0f",
        pod_name="dagster-run-0f0f0f0f",
        component="run_worker",
        user_defined_k8s_config=context.run_k8s_config,
        labels={},
    )


def test_run_launcher_config_is_accepted_by_k8s_run_launcher_and_typos_are_not():
    dagster_k8s = _needs("dagster_k8s")
    config = _instance()["run_launcher"]["config"]
    assert _process(dagster_k8s.K8sRunLauncher, config).success
    bad = {**config, "gpus": 1}
    result = _process(dagster_k8s.K8sRunLauncher, bad)
    assert not result.success and "gpus" in result.errors[0].message


def test_every_run_pod_gets_a_gpu_the_shared_volume_and_the_run_config(launcher):
    job = _run_job(launcher, tags={})
    pod = job.spec.template.spec
    container = pod.containers[0]
    assert container.resources.limits[GPU] == container.resources.requests[GPU] == "1"
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in [
        {k: v for k, v in t.to_dict().items() if v is not None} for t in pod.tolerations
    ]
    mounts = {m.mount_path: m.name for m in container.volume_mounts}
    claims = {v.name: v.persistent_volume_claim.claim_name for v in pod.volumes if v.persistent_volume_claim}
    assert claims[mounts["/data"]] == "distill-data"
    assert "/dev/shm" in mounts
    env = {e.name: e for e in container.env}
    assert env["DAGSTER_PG_PASSWORD"].value_from.secret_key_ref.name == "dagster-postgresql-secret"
    config_path = env["DISTILL_CONFIG"].value
    config_dir = str(Path(config_path).parent)
    assert mounts[config_dir] == "distill-run-config"
    assert "distill-object-store" in [s.secret_ref.name for s in container.env_from if s.secret_ref]
    assert job.spec.backoff_limit == 0
    assert container.image == "registry.example.com/offline-distill:0.1.0"


def test_a_run_tag_gives_a_tensor_parallel_teacher_two_gpus(launcher):
    """What deploy/README.md tells users to put on a backfill of a TP=2 teacher."""
    tag = {"container_config": {"resources": {"requests": {GPU: "2"}, "limits": {GPU: "2"}}}}
    job = _run_job(launcher, tags={"dagster-k8s/config": json.dumps(tag)})
    resources = job.spec.template.spec.containers[0].resources
    assert resources.limits[GPU] == resources.requests[GPU] == "2"
    assert resources.requests["memory"] == _instance()["run_launcher"]["config"]["resources"]["requests"]["memory"]


# ---------------------------------------------------------------------------------------------
# values.yaml (official Dagster Helm chart). Allowed keys: the chart's own schema
# (helm/dagster/schema/schema/charts/... in dagster-io/dagster, 1.13 line).

CHART_TOP = {
    "dagsterWebserver",
    "dagster-user-deployments",
    "postgresql",
    "generatePostgresqlPasswordSecret",
    "generateCeleryConfigSecret",
    "rabbitmq",
    "redis",
    "flower",
    "ingress",
    "imagePullSecrets",
    "computeLogManager",
    "scheduler",
    "runLauncher",
    "pythonLogs",
    "dagsterDaemon",
    "busybox",
    "migrate",
    "telemetry",
    "serviceAccount",
    "global",
    "retention",
    "concurrency",
    "additionalInstanceConfig",
}
CHART_USER_DEPLOYMENT = {
    "name",
    "image",
    "dagsterApiGrpcArgs",
    "codeServerArgs",
    "includeConfigInLaunchedRuns",
    "port",
    "env",
    "envConfigMaps",
    "envSecrets",
    "annotations",
    "nodeSelector",
    "affinity",
    "tolerations",
    "podSecurityContext",
    "securityContext",
    "resources",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "labels",
    "volumeMounts",
    "volumes",
    "schedulerName",
}
CHART_K8S_RUN_LAUNCHER = {
    "image",
    "imagePullPolicy",
    "jobNamespace",
    "loadInclusterConfig",
    "kubeconfigFile",
    "envConfigMaps",
    "envSecrets",
    "envVars",
    "volumeMounts",
    "volumes",
    "labels",
    "failPodOnRunFailure",
    "resources",
    "schedulerName",
    "securityContext",
    "runK8sConfig",
}
CHART_RUN_K8S_CONFIG = {"containerConfig", "podSpecConfig", "podTemplateSpecMetadata", "jobSpecConfig", "jobMetadata"}
CHART_POSTGRESQL = {
    "postgresqlScheme",
    "image",
    "enabled",
    "postgresqlHost",
    "postgresqlUsername",
    "postgresqlPassword",
    "postgresqlDatabase",
    "postgresqlParams",
    "service",
}
CHART_CONCURRENCY = {
    "enabled": None,
    "pools": {"defaultLimit", "granularity", "opGranularityRunBuffer"},
    "runs": {"maxConcurrentRuns", "tagConcurrencyLimits"},
}


def test_helm_values_use_only_keys_of_the_charts_schema():
    values = _values()
    assert set(values) <= CHART_TOP, set(values) - CHART_TOP
    for deployment in values["dagster-user-deployments"]["deployments"]:
        assert set(deployment) <= CHART_USER_DEPLOYMENT, set(deployment) - CHART_USER_DEPLOYMENT
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert set(k8s) <= CHART_K8S_RUN_LAUNCHER, set(k8s) - CHART_K8S_RUN_LAUNCHER
    assert set(k8s["runK8sConfig"]) <= CHART_RUN_K8S_CONFIG
    assert set(values["postgresql"]) <= CHART_POSTGRESQL
    assert set(values["concurrency"]) <= set(CHART_CONCURRENCY)
    for part in ("pools", "runs"):
        assert set(values["concurrency"][part]) <= CHART_CONCURRENCY[part]
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"


def test_helm_values_run_our_definitions_with_the_same_gpu_and_pool_as_the_instance():
    values = _values()
    instance = _instance()
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "pipelines.definitions"]
    assert (REPO / "pipelines" / "definitions.py").is_file()
    assert deployment["image"]["repository"] and deployment["image"]["tag"]
    # the code server's resources would be copied into every run pod and replace the GPU request
    assert "resources" not in deployment and deployment["includeConfigInLaunchedRuns"]["enabled"]

    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    gpus = {k8s["resources"]["requests"][GPU], k8s["resources"]["limits"][GPU]}
    assert gpus == {instance["run_launcher"]["config"]["resources"]["limits"][GPU]} == {"1"}
    assert values["concurrency"]["enabled"]
    assert values["concurrency"]["pools"]["defaultLimit"] == instance["concurrency"]["pools"]["default_limit"]
    assert values["concurrency"]["pools"]["granularity"] == instance["concurrency"]["pools"]["granularity"] == "run"
    assert values["dagsterDaemon"]["runMonitoring"]["enabled"]
    assert values["postgresql"]["postgresqlUsername"] == instance["storage"]["postgres"]["postgres_db"]["username"]
    assert values["postgresql"]["postgresqlDatabase"] == instance["storage"]["postgres"]["postgres_db"]["db_name"]
    assert values["global"]["postgresqlSecretName"] == instance["run_launcher"]["config"]["postgres_password_secret"]

    # run pods read the run config where the code server reads it
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert f"DISTILL_CONFIG={env['DISTILL_CONFIG']}" in instance["run_launcher"]["config"]["env_vars"]
    mounts = {m["mountPath"]: m["name"] for m in deployment["volumeMounts"]}
    assert mounts[str(Path(env["DISTILL_CONFIG"]).parent)] == "distill-run-config"


# ---------------------------------------------------------------------------------------------
# run-config.yaml and the image


def test_run_config_loads_and_the_code_location_builds_from_it():
    cfg = load_config(RUN_CONFIG)  # placeholders (teacher folder, corpus files, bucket) are not opened
    assert cfg.labels_uri.startswith("s3://")
    assert cfg.storage_root.startswith("/data/")  # the shared volume every pod mounts
    assert cfg.eval.mc_file is None
    gpus = int(_instance()["run_launcher"]["config"]["resources"]["limits"][GPU])
    assert cfg.teacher.engine.tensor_parallel_size == gpus  # one engine fills exactly the GPUs of its pod

    defs = build_definitions(str(RUN_CONFIG))
    partitions = defs.resolve_assets_def("teacher_logits").partitions_def.get_partition_keys()
    assert len(partitions) == cfg.corpus.train_shards + cfg.corpus.heldout_shards


def test_dockerfile_builds_our_package_on_cuda_with_the_gpu_extra():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0].startswith("FROM nvidia/cuda:")
    assert "'.[gpu,k8s]'" in text and "dagster-k8s==0.29.27 dagster-postgres==0.29.27" in text
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    assert "pipelines.definitions" in text


def test_the_k8s_extra_holds_what_the_image_needs_and_dev_lets_ci_run_these_tests():
    import tomllib  # local: the standard library has it from Python 3.11 (the project supports 3.10)

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = lambda reqs: {r.split("==")[0].split(">")[0].split("[")[0] for r in reqs}  # noqa: E731
    # what dagster-k8s / dagster-postgres import, and boto3 for commits to s3:// labels_uri
    assert {"kubernetes", "google-auth", "psycopg2-binary", "boto3"} <= names(extras["k8s"])
    assert {"kubernetes", "google-auth", "psycopg2-binary"} <= names(extras["dev"])
    assert all("==" in r for r in extras["k8s"])  # exact pins, like the rest of the project's extras
