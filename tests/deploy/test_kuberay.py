"""deploy/raycluster.yaml, deploy/rayjob.yaml and deploy/shared-pvc.yaml against what KubeRay's CRDs and
Kubernetes require (required fields and their types), what gard needs (the image's own gard as the
working dir, a resumable entrypoint writing to a shared volume, as many GPUs as the preset asks for)
and how Ray's dashboard must be exposed (0.0.0.0 in the pod network, token authentication). Ray itself
validates the runtime environment. With GARD_KUBERAY_CRDS naming a folder that holds KubeRay's CRD
files (ray.io_rayclusters.yaml, ray.io_rayjobs.yaml), the manifests are also validated against their
OpenAPI schemas; offline that test is skipped.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
from deploy_checks import (
    DEPLOY,
    check_raycluster,
    check_rayjob,
    claim_names,
    gpu_image,
    image_workdir,
    load_yaml,
    pyproject,
    read,
    required,
)


@pytest.fixture(scope="module")
def context() -> dict:
    return {"ray_version": str(required(pyproject(), [])["ray"].specifier).lstrip("="), "image": gpu_image()}


@pytest.fixture(scope="module")
def workdir() -> str:
    return image_workdir(read("deploy/Dockerfile"))


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load_yaml("deploy/rayjob.yaml")


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return load_yaml("deploy/raycluster.yaml")


def test_rayjob_is_complete(rayjob, context, workdir):
    assert check_rayjob(rayjob, workdir=workdir, **context) == []


def test_raycluster_is_complete(raycluster, context):
    assert check_raycluster(raycluster, **context) == []


def test_the_claim_is_shared_by_all_pods(rayjob, raycluster):
    pvc = load_yaml("deploy/shared-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert claim_names(rayjob) == claim_names(raycluster) == {pvc["metadata"]["name"]}
    # the head and every GPU pod mount it at once, from different nodes
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_serve_config_runs_the_same_gard(workdir):
    apps = load_yaml("deploy/serve_rewards.yaml")["applications"]
    assert {app["runtime_env"]["working_dir"] for app in apps} == {f"local://{workdir}"}


def _head(spec: dict) -> dict:
    return spec["rayClusterSpec"]["headGroupSpec"]


def _worker(spec: dict) -> dict:
    return spec["rayClusterSpec"]["workerGroupSpecs"][0]


def _worker_container(spec: dict) -> dict:
    return _worker(spec)["template"]["spec"]["containers"][0]


def _set(path_fn, key, value):
    def mutate(spec):
        target = path_fn(spec)
        if value is KeyError:
            del target[key]
        else:
            target[key] = value
    return mutate


@pytest.mark.parametrize("mutate, expected", [
    (_set(lambda s: _head(s)["rayStartParams"], "num-cpus", 0),
     "spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus: 0 must be a string"),
    (_set(lambda s: _worker(s)["rayStartParams"], "num-gpus", 1), "rayStartParams.num-gpus: 1 must be a string"),
    (_set(_worker, "groupName", KeyError), "workerGroupSpecs[0].groupName is missing"),
    (_set(lambda s: _worker_container(s)["resources"]["limits"], "nvidia.com/gpu", KeyError),
     "resources.requests.nvidia.com/gpu has no limit"),
    (_set(lambda s: _worker_container(s)["resources"]["requests"], "nvidia.com/gpu", "2"),
     "requests.nvidia.com/gpu '2' differs from limits '1'"),
    (_set(lambda s: _head(s)["rayStartParams"], "dashboard-host", "127.0.0.1"),
     "dashboard-host is '127.0.0.1': the job submitter and the operator reach the dashboard"),
    (_set(lambda s: s["rayClusterSpec"], "authOptions", KeyError), "authOptions must be {mode: token"),
    (_set(_worker, "replicas", 9), "replicas 9 must lie within minReplicas 8 and maxReplicas 8"),
    (_set(_worker, "maxReplicas", "8"), "workerGroupSpecs[0].maxReplicas must be an integer"),
    (lambda s: [_set(_worker, k, 1)(s) for k in ("replicas", "minReplicas", "maxReplicas")],
     "the worker groups have 1 GPUs, configs/sd15_aesthetic.yaml asks for 8"),
    (_set(_worker_container, "image", "gard:latest"), "uses the moving tag `latest`"),
    (_set(_worker_container, "image", "your-registry/gard:0.0.9"), "not the image `make docker-gpu` builds"),
    (_set(_worker_container, "name", "Ray_Worker"), "must be a DNS label"),
    (_set(lambda s: _worker(s)["template"]["spec"], "volumes", []), "volumeMounts 'shared' names no volume"),
    (_set(lambda s: s, "entrypoint", "python -m cluster train configs/sd15_aesthetic.yaml "
          "--output-dir /shared/runs/x"), "--resume auto` (a retried job resumes)"),
    (_set(lambda s: s, "entrypoint", "python -m cluster train configs/sd15_aesthetic.yaml "
          "--output-dir /tmp/runs/x --resume auto"), "writes to /tmp/runs/x, which is on no writable volume"),
    (_set(lambda s: s, "entrypoint", "python -m cluster train configs/nope.yaml "
          "--output-dir /shared/runs/x --resume auto"), "runs configs/nope.yaml, which is not in the repository"),
    (_set(lambda s: s, "runtimeEnvYAML", 'working_dir: "https://example.com/gard/archive/main.zip"\n'),
     "working_dir is 'https://example.com/gard/archive/main.zip'"),
    (_set(lambda s: s, "runtimeEnvYAML", 'working_dir: "local:///opt/gard"\nenv_vars: {RAY_JOB_STOP_WAIT_TIME_S: 60}\n'),
     "runtimeEnvYAML is refused: runtime_env['env_vars'] must be of type Dict[str, str]"),
    (_set(lambda s: s, "runtimeEnvYAML", 'working_dir: "local://opt/gard"\n'), "the path must be absolute"),
    (_set(lambda s: s, "shutdownAfterJobFinishes", KeyError), "shutdownAfterJobFinishes must be true"),
    (_set(lambda s: s, "ttlSecondsAfterFinished", "600"), "ttlSecondsAfterFinished must be a non-negative integer"),
    (_set(lambda s: s["submitterPodTemplate"]["spec"], "restartPolicy", "Always"), "restartPolicy must be Never"),
])
def test_a_realistic_mistake_is_named(rayjob, context, workdir, mutate, expected):
    doc = copy.deepcopy(rayjob)
    mutate(doc["spec"])
    problems = check_rayjob(doc, workdir=workdir, **context)
    assert any(expected in p for p in problems), problems


def test_a_gpu_on_the_head_is_named(raycluster, context):
    doc = copy.deepcopy(raycluster)
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "1"
    assert any("asks for GPUs, which this pod does not use" in p for p in check_raycluster(doc, **context))


def _crd_schema(folder: Path, name: str) -> dict:
    import yaml

    crd = yaml.safe_load((folder / name).read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


@pytest.mark.skipif(not os.environ.get("GARD_KUBERAY_CRDS"), reason="GARD_KUBERAY_CRDS names no folder of KubeRay CRDs")
@pytest.mark.parametrize("manifest, crd", [("rayjob.yaml", "ray.io_rayjobs.yaml"),
                                           ("raycluster.yaml", "ray.io_rayclusters.yaml")])
def test_manifests_validate_against_kuberay_crds(manifest, crd):
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    schema = _crd_schema(Path(os.environ["GARD_KUBERAY_CRDS"]), crd)
    errors = [f"{list(e.path)}: {e.message}" for e in
              jsonschema.Draft7Validator(schema).iter_errors(yaml.safe_load((DEPLOY / manifest).read_text()))]
    assert errors == []
