"""Checks of deploy/ that need no Docker, cluster or cloud: the Dockerfile against pyproject.toml, the
KubeRay manifests against the fields and types KubeRay's CRDs and Kubernetes require, the Ray cluster
launcher config against Ray's own schema. Every check returns the problems it finds as sentences (an
empty list: fine), so a test can show that a realistic mistake is caught and what it is told.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# The CUDA version of torch's Linux wheels on PyPI, by torch release (from the wheels' metadata: torch
# 2.13.0 requires cuda-toolkit 13.0.x). A new torch pin needs its entry here and a matching base image.
TORCH_WHEEL_CUDA = {"2.13.0": "13.0"}
# What the images need beyond Python packages: KubeRay's default probes run wget; the cluster launcher
# syncs files into the container with rsync and its autoscaler reaches the workers with ssh.
IMAGE_TOOLS = ("wget", "rsync", "openssh-client")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
ENTRYPOINT = re.compile(r"^python -m cluster train (configs/\S+\.ya?ml) --output-dir (/\S+) --resume auto$")
MIN_STOP_WAIT_S = 30  # `ray job stop` must leave gard time for its graceful stop (update + checkpoint)


# ----------------------------------------------------------------------------- project files

def read(relative: str) -> str:
    return (ROOT / relative).read_text()


def load_yaml(relative: str):
    return yaml.safe_load(read(relative))


def pyproject() -> dict:
    return tomllib.loads(read("pyproject.toml"))


def required(project: dict, extras: list[str]) -> dict[str, Requirement]:
    """pyproject's requirements (dependencies plus the given extras), by canonical name."""
    reqs = list(project["project"]["dependencies"])
    optional = project["project"]["optional-dependencies"]
    for extra in extras:
        reqs += optional[extra]
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


def exact_version(req: Requirement) -> Version | None:
    """The version of a single ``==`` pin, else None."""
    specs = list(req.specifier)
    if len(specs) == 1 and specs[0].operator == "==":
        return Version(specs[0].version)
    return None


def setup_env_default_extras() -> list[str]:
    match = re.search(r"GARD_EXTRAS:-([\w,]+)", read("tools/setup_env.sh"))
    return match.group(1).split(",") if match else []


def makefile_image_tag(target: str) -> str:
    """The image tag the Makefile builds for a target (`docker-gpu` -> gard:0.1.0-cu130)."""
    text = read("Makefile")
    recipe = re.search(rf"^{re.escape(target)}:.*\n\t(.*)$", text, re.M).group(1)
    image = re.search(r"^IMAGE \?= (\S+)$", text, re.M).group(1)
    suffix = re.search(r"-t \$\(IMAGE\):\$\(VERSION\)(\S*)", recipe).group(1)
    return f"{image}:{pyproject()['project']['version']}{suffix}"


def gpu_image() -> str:
    return makefile_image_tag("docker-gpu")


# ----------------------------------------------------------------------------- Dockerfile

@dataclass
class Instruction:
    keyword: str
    args: str
    comment: str  # the comment lines right above it


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs (before the first FROM) and the stages, with continuation lines joined."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    comment: list[str] = []
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            comment = comment + [line.lstrip("# ")] if line else []
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        logical += " " + line[:-1] if line.endswith("\\") else " " + line
        if line.endswith("\\"):
            continue
        keyword, _, args = logical.strip().partition(" ")
        keyword, args, logical = keyword.upper(), args.strip(), ""
        if keyword == "FROM":
            parts = args.split()
            stages.append(Stage(base=parts[0], name=parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None))
        elif not stages and keyword == "ARG":
            name, _, default = args.partition("=")
            global_args[name] = default
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, args, " ".join(comment).strip()))
        comment = []
    return global_args, stages


def stage_chain(global_args: dict[str, str], stages: list[Stage], variant: str) -> list[Stage]:
    """The stages one variant builds, from the one on an external image to the last."""
    by_name = {s.name: s for s in stages if s.name}
    args = {**global_args, "VARIANT": variant}
    stage = stages[-1]
    chain = [stage]
    while True:
        base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), ""), stage.base)
        if base not in by_name:
            stage.base = base
            return chain[::-1]
        stage = by_name[base]
        chain.append(stage)


def image_tag_problem(image: str, what: str) -> str | None:
    name = image.rsplit("/", 1)[-1]
    if "@sha256:" in image:
        return None
    if ":" not in name:
        return f"{what} {image!r} has no tag: name a fixed version (a missing tag means `latest`)"
    if name.rsplit(":", 1)[1] == "latest":
        return f"{what} {image!r} uses the moving tag `latest`: name a fixed version"
    return None


def pip_pins(chain: list[Stage]) -> tuple[dict[str, Requirement], list[str]]:
    """The double-quoted requirements of every `pip install` of a chain, and the unparsable ones."""
    pins: dict[str, Requirement] = {}
    bad = []
    for stage in chain:
        for ins in stage.instructions:
            if ins.keyword == "RUN" and "pip install" in ins.args:
                for token in re.findall(r'"([^"]+)"', ins.args):
                    try:
                        req = Requirement(token)
                    except ValueError:
                        bad.append(token)
                        continue
                    pins[canonicalize_name(req.name)] = req
    return pins, bad


def pin_problem(name: str, want: Requirement, have: Requirement | None, variant: str) -> str | None:
    if have is None:
        return f"pyproject.toml requires {want} but the {variant} image does not install {name}"
    if set(have.extras) != set(want.extras):
        return f"the {variant} image installs {have} but pyproject.toml requires {want} (extras differ)"
    version = exact_version(have)
    if version is not None:  # an exact pin, e.g. torch==2.13.0+cpu for pyproject's torch==2.13.0
        if not want.specifier.contains(version, prereleases=True):
            return f"the {variant} image pins {have} but pyproject.toml requires {want}"
        return None
    if have.specifier != want.specifier:
        return f"the {variant} image installs {have} but pyproject.toml requires {want}"
    return None


def env_of(chain: list[Stage]) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in chain:
        for ins in stage.instructions:
            if ins.keyword == "ENV":
                for item in shlex.split(ins.args):
                    key, _, value = item.partition("=")
                    env[key] = value
    return env


def check_dockerfile(text: str, project: dict, *, variants=("gpu", "cpu")) -> list[str]:
    problems: list[str] = []
    global_args, stages = parse_dockerfile(text)
    if not stages:
        return ["the Dockerfile has no FROM"]
    torch_pin = exact_version(required(project, [])["torch"])
    for variant in variants:
        chain = stage_chain(global_args, copy.deepcopy(stages), variant)
        base = chain[0].base
        problems += filter(None, [image_tag_problem(base, f"the {variant} image's base")])
        if variant == "gpu":
            cuda = TORCH_WHEEL_CUDA.get(str(torch_pin))
            match = re.match(r"^(?:[\w.-]+/)*nvidia/cuda:(\d+\.\d+)\.\d+-", base)
            if cuda is None:
                problems.append(f"torch {torch_pin}: add the CUDA version of its PyPI wheels to TORCH_WHEEL_CUDA "
                                "(tests/deploy/deploy_checks.py) and a matching nvidia/cuda base image")
            elif not match or match.group(1) != cuda:
                problems.append(f"the gpu image's base {base!r} is not a CUDA {cuda} image, the CUDA of the "
                                f"pinned torch {torch_pin}'s wheels")
        env = env_of(chain)
        extras = env.get("GARD_EXTRAS", "").split(",") if env.get("GARD_EXTRAS") else []
        if not extras:
            problems.append(f"the {variant} image does not set GARD_EXTRAS (the extras tools/setup_env.sh installs)")
        if variant == "cpu" and extras != setup_env_default_extras():
            problems.append(f"the cpu image installs the extras {extras}, tools/setup_env.sh "
                            f"{setup_env_default_extras()}: the CPU image must mirror the development setup")
        pins, bad = pip_pins(chain)
        problems += [f"the {variant} image's pip install has {b!r}, not a requirement" for b in bad]
        want = required(project, [e for e in extras if e in project["project"]["optional-dependencies"]])
        for name, req in want.items():
            problems += filter(None, [pin_problem(name, req, pins.get(name), variant)])
        for name in pins.keys() - want.keys():
            problems.append(f"the {variant} image installs {pins[name]}, which pyproject.toml does not list "
                            f"(dependencies or the extras {extras})")
        problems += final_stage_problems(chain, variant, env)
    return problems


def final_stage_problems(chain: list[Stage], variant: str, env: dict[str, str]) -> list[str]:
    problems = []
    instructions = [ins for stage in chain for ins in stage.instructions]
    users = [ins.args for ins in instructions if ins.keyword == "USER"]
    if not users:
        problems.append(f"the {variant} image runs as root: add a USER with a numeric non-zero uid")
    elif users[-1].split(":")[0] in ("0", "root") or not users[-1].split(":")[0].isdigit():
        problems.append(f"the {variant} image's USER {users[-1]!r} must be a numeric non-zero uid "
                        "(Kubernetes' runAsNonRoot cannot verify a user name)")
    checks = [ins for ins in instructions if ins.keyword == "HEALTHCHECK"]
    if not checks:
        problems.append(f"the {variant} image has no HEALTHCHECK: declare one, or HEALTHCHECK NONE with a "
                        "comment that says why")
    elif checks[-1].args.upper() == "NONE" and not checks[-1].comment:
        problems.append(f"the {variant} image's HEALTHCHECK NONE has no comment saying why")
    if "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in env:
        problems.append(f"the {variant} image sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER: with 0 a worker's "
                        "`ray start --address` refuses to join a cluster")
    wait = env.get("RAY_JOB_STOP_WAIT_TIME_S", "")
    if not wait.isdigit() or int(wait) < MIN_STOP_WAIT_S:
        problems.append(f"the {variant} image sets RAY_JOB_STOP_WAIT_TIME_S={wait!r}: `ray job stop` kills "
                        f"the job after it, give gard's graceful stop at least {MIN_STOP_WAIT_S} s")
    workdirs = [ins.args for ins in instructions if ins.keyword == "WORKDIR"]
    copies = [ins.args.split() for ins in instructions if ins.keyword == "COPY"]
    if not workdirs or [".", workdirs[-1]] not in [c[-2:] for c in copies]:
        problems.append(f"the {variant} image must COPY the repository (.) into its final WORKDIR")
    runs = " ".join(ins.args for ins in instructions if ins.keyword == "RUN")
    problems += [f"the {variant} image does not install {tool}" for tool in IMAGE_TOOLS
                 if not re.search(rf"apt-get install[^&;]*\b{re.escape(tool)}\b", runs)]
    if "/etc/profile.d/" not in runs:
        problems.append(f"the {variant} image does not put its venv on the PATH of login shells "
                        "(/etc/profile.d): KubeRay and the launcher run `bash -l`, whose /etc/profile resets PATH")
    return problems


def image_workdir(text: str) -> str:
    global_args, stages = parse_dockerfile(text)
    chain = stage_chain(global_args, stages, "gpu")
    return [ins.args for stage in chain for ins in stage.instructions if ins.keyword == "WORKDIR"][-1]


def check_dockerignore(text: str) -> list[str]:
    entries = {line.strip().strip("/") for line in text.splitlines() if line.strip() and not line.startswith("#")}
    return [f".dockerignore does not exclude {e} (the build context would carry it into the image)"
            for e in (".venv", ".git", "runs", ".cache") if e not in entries]


# ----------------------------------------------------------------------------- KubeRay

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_pod_template(template, where: str, *, gpus_allowed: bool) -> list[str]:
    if not isinstance(template, dict) or not isinstance(template.get("spec"), dict):
        return [f"{where}.template.spec is missing"]
    spec = template["spec"]
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        return [f"{where}.template.spec.containers must be a non-empty list"]
    problems = []
    volumes = {v.get("name") for v in spec.get("volumes") or []}
    for i, c in enumerate(containers):
        at = f"{where}.template.spec.containers[{i}]"
        if not isinstance(c.get("name"), str) or not DNS_LABEL.match(c["name"]):
            problems.append(f"{at}.name {c.get('name')!r} must be a DNS label (lower case, digits, '-')")
        if not isinstance(c.get("image"), str) or not c["image"]:
            problems.append(f"{at}.image is missing")
        else:
            problems += filter(None, [image_tag_problem(c["image"], f"{at}.image")])
        resources = c.get("resources")
        if not isinstance(resources, dict):
            problems.append(f"{at}.resources is missing (Ray sizes the node from its limits)")
            continue
        requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
        for key in ("cpu", "memory"):
            if key not in limits:
                problems.append(f"{at}.resources.limits.{key} is missing (KubeRay derives Ray's {key} from it)")
        for key in set(requests) | set(limits):
            if "/" not in key:  # extended resources (nvidia.com/gpu): Kubernetes needs limits == requests
                continue
            if key not in limits:
                problems.append(f"{at}.resources.requests.{key} has no limit: Kubernetes rejects an "
                                "extended resource without one (set limits, requests may be left out)")
            elif key in requests and str(requests[key]) != str(limits[key]):
                problems.append(f"{at}.resources: requests.{key} {requests[key]!r} differs from limits "
                                f"{limits[key]!r}; Kubernetes requires them equal")
            if not gpus_allowed and key == "nvidia.com/gpu":
                problems.append(f"{at} asks for GPUs, which this pod does not use")
        for mount in c.get("volumeMounts") or []:
            if mount.get("name") not in volumes:
                problems.append(f"{at}.volumeMounts {mount.get('name')!r} names no volume of the pod")
    return problems


def check_start_params(params, where: str) -> list[str]:
    if not isinstance(params, dict):
        return [f"{where}.rayStartParams must be a mapping of strings (it is {type(params).__name__})"]
    return [f"{where}.rayStartParams.{key}: {value!r} must be a string (quote it: \"{value}\")"
            for key, value in params.items() if not isinstance(key, str) or not isinstance(value, str)]


def gpu_limit(template: dict) -> int:
    containers = (template.get("spec") or {}).get("containers") or []
    return sum(int((c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in containers)


def check_cluster_spec(spec, where: str, *, ray_version: str) -> list[str]:
    if not isinstance(spec, dict):
        return [f"{where} is missing"]
    problems = []
    if spec.get("rayVersion") != ray_version:
        problems.append(f"{where}.rayVersion {spec.get('rayVersion')!r} is not the image's Ray {ray_version!r}")
    auth = spec.get("authOptions") or {}
    if auth.get("mode") != "token" or not auth.get("secretName"):
        problems.append(f"{where}.authOptions must be {{mode: token, secretName: ...}}: the dashboard listens on "
                        "the pod network, and KubeRay must know the token to poll it and to give it to the submitter")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return problems + [f"{where}.headGroupSpec is missing"]
    params = head.get("rayStartParams", {})
    problems += check_start_params(params, f"{where}.headGroupSpec")
    host = params.get("dashboard-host") if isinstance(params, dict) else None
    if host != "0.0.0.0":
        problems.append(f"{where}.headGroupSpec.rayStartParams.dashboard-host is {host!r}: the job submitter and "
                        "the operator reach the dashboard through the head service, bind it to \"0.0.0.0\"")
    problems += check_pod_template(head.get("template"), f"{where}.headGroupSpec", gpus_allowed=False)
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        return problems + [f"{where}.workerGroupSpecs must list the GPU worker group"]
    names = []
    for i, group in enumerate(groups):
        at = f"{where}.workerGroupSpecs[{i}]"
        name = group.get("groupName")
        if not isinstance(name, str) or not name:
            problems.append(f"{at}.groupName is missing (KubeRay requires it)")
        names.append(name)
        counts = {k: group.get(k) for k in ("replicas", "minReplicas", "maxReplicas")}
        wrong = [k for k, v in counts.items() if not _is_int(v)]
        problems += [f"{at}.{k} must be an integer (is {counts[k]!r})" for k in wrong]
        if not wrong and not counts["minReplicas"] <= counts["replicas"] <= counts["maxReplicas"]:
            problems.append(f"{at}: replicas {counts['replicas']} must lie within minReplicas "
                            f"{counts['minReplicas']} and maxReplicas {counts['maxReplicas']}")
        problems += check_start_params(group.get("rayStartParams", {}), at)
        problems += check_pod_template(group.get("template"), at, gpus_allowed=True)
    if len(set(names)) != len(names):
        problems.append(f"{where}.workerGroupSpecs: groupName values repeat: {names}")
    return problems


def cluster_gpus(spec: dict) -> int:
    return sum(g.get("replicas", 0) * gpu_limit(g.get("template") or {}) for g in spec.get("workerGroupSpecs") or [])


@functools.cache
def preset_gpus(config_path: str) -> int:
    """GPUs a preset's actors ask for: the samplers, the learner and the reward stage."""
    import math

    from cluster.config_loader import load

    c = load(ROOT / config_path).cluster
    return math.ceil(c.num_samplers * c.sampler_num_gpus + c.learner_num_gpus + c.reward_num_gpus)


def pod_templates(doc: dict) -> dict[str, dict]:
    spec = doc.get("spec") or {}
    cluster = spec.get("rayClusterSpec", spec) if doc.get("kind") == "RayJob" else spec
    templates = {"head": (cluster.get("headGroupSpec") or {}).get("template") or {}}
    for group in cluster.get("workerGroupSpecs") or []:
        templates[f"worker group {group.get('groupName')}"] = group.get("template") or {}
    if doc.get("kind") == "RayJob" and spec.get("submitterPodTemplate"):
        templates["submitter"] = spec["submitterPodTemplate"]
    return templates


def check_images(doc: dict, expected: str) -> list[str]:
    problems = []
    for role, template in pod_templates(doc).items():
        for c in (template.get("spec") or {}).get("containers") or []:
            image = c.get("image", "")
            if image.rsplit("/", 1)[-1] != expected:
                problems.append(f"the {role} runs {image!r}, not the image `make docker-gpu` builds ({expected}, "
                                "optionally behind a registry)")
    return problems


def check_raycluster(doc, *, ray_version: str, image: str) -> list[str]:
    problems = []
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayCluster":
        problems.append(f"apiVersion/kind are {doc.get('apiVersion')}/{doc.get('kind')}, not ray.io/v1 RayCluster")
    problems += check_cluster_spec(doc.get("spec"), "spec", ray_version=ray_version)
    return problems + check_images(doc, image)


def check_rayjob(doc, *, ray_version: str, image: str, workdir: str) -> list[str]:
    problems = []
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayJob":
        problems.append(f"apiVersion/kind are {doc.get('apiVersion')}/{doc.get('kind')}, not ray.io/v1 RayJob")
    spec = doc.get("spec") or {}
    cluster = spec.get("rayClusterSpec")
    problems += check_cluster_spec(cluster, "spec.rayClusterSpec", ray_version=ray_version)
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("spec.shutdownAfterJobFinishes must be true: the GPU pods outlive the job otherwise")
    if not _is_int(spec.get("ttlSecondsAfterFinished")) or spec["ttlSecondsAfterFinished"] < 0:
        problems.append(f"spec.ttlSecondsAfterFinished must be a non-negative integer "
                        f"(is {spec.get('ttlSecondsAfterFinished')!r})")
    entry = " ".join(str(spec.get("entrypoint", "")).split())
    match = ENTRYPOINT.match(entry)
    if not match:
        problems.append(f"spec.entrypoint {entry!r} must be `python -m cluster train configs/<preset>.yaml "
                        "--output-dir <shared volume path> --resume auto` (a retried job resumes)")
    else:
        config, output = match.groups()
        if not (ROOT / config).is_file():
            problems.append(f"spec.entrypoint runs {config}, which is not in the repository")
        head = (pod_templates(doc)["head"].get("spec") or {}).get("containers") or [{}]
        mounts = [m for m in head[0].get("volumeMounts") or [] if not m.get("readOnly")]
        if not any(output == m["mountPath"] or output.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts):
            problems.append(f"spec.entrypoint writes to {output}, which is on no writable volume of the head: "
                            "the checkpoints would die with the pod")
        elif isinstance(cluster, dict) and (ROOT / config).is_file() and cluster_gpus(cluster) != preset_gpus(config):
            problems.append(f"the worker groups have {cluster_gpus(cluster)} GPUs, {config} asks for "
                            f"{preset_gpus(config)} (samplers, learner, reward stage)")
    problems += check_runtime_env_yaml(spec.get("runtimeEnvYAML"), workdir=workdir)
    submitter = spec.get("submitterPodTemplate")
    if submitter is not None:
        if (submitter.get("spec") or {}).get("restartPolicy") not in ("Never", "OnFailure"):
            problems.append("spec.submitterPodTemplate.spec.restartPolicy must be Never or OnFailure (a Job's pod)")
        problems += check_pod_template(submitter, "spec.submitterPodTemplate", gpus_allowed=False)
    return problems + check_images(doc, image)


def check_runtime_env_yaml(text, *, workdir: str) -> list[str]:
    from ray.runtime_env import RuntimeEnv

    if not isinstance(text, str):
        return ["spec.runtimeEnvYAML must be a string holding YAML"]
    try:
        env = yaml.safe_load(text) or {}
        RuntimeEnv(**env)  # Ray's own validation of the fields and their types
    except Exception as err:  # any refusal is the finding
        return [f"spec.runtimeEnvYAML is refused: {err}"]
    problems = []
    if env.get("working_dir") != f"local://{workdir}":
        problems.append(f"spec.runtimeEnvYAML working_dir is {env.get('working_dir')!r}: the job must run the "
                        f"image's own gard, local://{workdir}")
    wait = (env.get("env_vars") or {}).get("RAY_JOB_STOP_WAIT_TIME_S", "")
    if not wait.isdigit() or int(wait) < MIN_STOP_WAIT_S:
        problems.append(f"spec.runtimeEnvYAML env_vars.RAY_JOB_STOP_WAIT_TIME_S is {wait!r}: give gard's graceful "
                        f"stop at least {MIN_STOP_WAIT_S} s before `ray job stop` kills it")
    return problems


def claim_names(doc: dict) -> set[str]:
    return {v["persistentVolumeClaim"]["claimName"] for t in pod_templates(doc).values()
            for v in (t.get("spec") or {}).get("volumes") or [] if "persistentVolumeClaim" in v}


# ----------------------------------------------------------------------------- cluster launcher

def check_launcher(config, *, image: str, gpus_needed: int) -> list[str]:
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    if not isinstance(config, dict):
        return ["the launcher config is not a mapping"]
    problems = [f"the launcher config lacks `{key}`" for key in
                ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers")
                if key not in config]
    if problems:
        return problems
    types = config["available_node_types"]
    if config["head_node_type"] not in types:
        problems.append(f"head_node_type {config['head_node_type']!r} is none of available_node_types {sorted(types)}")
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    for name, node in types.items():
        problems += [f"available_node_types.{name} lacks `{key}`" for key in ("node_config", "resources")
                     if key not in node]
    if sum(t.get("min_workers", 0) for t in workers.values()) > config["max_workers"]:
        problems.append("the worker types' min_workers add up to more than max_workers")
    gpus = sum(t.get("max_workers", config["max_workers"]) * (t.get("resources") or {}).get("GPU", 0)
               for t in workers.values() if _is_int((t.get("resources") or {}).get("GPU", 0)))
    if gpus < gpus_needed:
        problems.append(f"the worker types offer {gpus} GPUs, the preset asks for {gpus_needed}")
    docker = config.get("docker") or {}
    if docker.get("image", "").rsplit("/", 1)[-1] != image:
        problems.append(f"docker.image {docker.get('image')!r} is not the image `make docker-gpu` builds ({image})")
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        if config.get(key) != []:
            problems.append(f"`{key}` must be [] (the image has everything; left out, the launcher runs its "
                            "provider's default commands, which pip-install packages)")
    head_start = " ".join(config.get("head_start_ray_commands") or [])
    if "--dashboard-host=127.0.0.1" not in head_start:
        problems.append("head_start_ray_commands must bind the dashboard to 127.0.0.1 (reach it through "
                        "`ray dashboard`'s SSH tunnel)")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        if "RAY_AUTH_MODE=token" not in " ".join(config.get(key) or []):
            problems.append(f"{key} must start Ray with RAY_AUTH_MODE=token")
    if "~/.ray/auth_token" not in (config.get("file_mounts") or {}):
        problems.append("file_mounts must copy ~/.ray/auth_token (the token) to the nodes")
    try:
        validate_config(fillout_defaults(copy.deepcopy(config)))
    except Exception as err:  # Ray's refusal is the finding
        problems.append(f"Ray's launcher refuses the config: {str(err).splitlines()[0]}")
    return problems
