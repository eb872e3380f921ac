"""deploy/kuberay/ and deploy/docker/: every manifest validates against the CRD
schemas vendored in deploy/kuberay/schemas/ (a misspelled field or a wrong type
fails, as on a cluster); the RayJob's entrypoint reaches the Ray job as one
command when composed as KubeRay composes its submitter (run by a real bash and
the real ``ray job submit``, against a stand-in dashboard); the manifest matches
deploy/cluster.yaml; ports, the run volume and the stop/TTL timings agree with
td3drive's config; and the Dockerfile builds the image the manifest names
(checked statically: Docker is not available here, the image was never built)."""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any

import dockerfile
import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from td3drive.app.cli import build_parser
from td3drive.app.driver import STOP_GRACE_S
from td3drive.contracts.config import TD3DriveConfig, load_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
SCHEMAS = KUBERAY / "schemas"
RAYJOB = KUBERAY / "rayjob.yaml"
PVC = KUBERAY / "pvc.yaml"
PODMONITOR = KUBERAY / "podmonitor.yaml"
RESULTS_POD = KUBERAY / "results-pod.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))

# (apiVersion, kind) -> vendored schema (deploy/kuberay/schemas/README.md).
SCHEMA_FILES = {
    ("ray.io/v1", "RayJob"): "rayjob-ray.io-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring.coreos.com-v1.json",
    ("v1", "Service"): "service-v1.json",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaim-v1.json",
}

KINDS = {*SCHEMA_FILES, ("v1", "Pod")}  # a Pod's schema comes from the RayJob's

# The old entrypoint, split by the submitter's shell.
SPLIT_ENTRYPOINT = "cd /app && td3drive train --config deploy/cluster.yaml"


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _all_documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in MANIFESTS:
        for doc in _documents(path):
            yield f"{path.name}:{doc.get('kind')}", doc


def _one(path: Path, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _documents(path) if d["kind"] == kind]
    return doc


def _rayjob() -> dict[str, Any]:
    return _one(RAYJOB, "RayJob")


def _cluster_config() -> TD3DriveConfig:
    return load_config(DEPLOY / "cluster.yaml")


# --- schema validation -----------------------------------------------------------


def _strict(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that
    lists ``properties``: the API server drops or (kubectl's default
    ``--validate=strict``) rejects fields a structural schema does not declare,
    unless it says ``x-kubernetes-preserve-unknown-fields``. JSON Schema allows
    them by default."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: _strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = _strict(out[key])
    return out


def _schema(api_version: str, kind: str) -> dict[str, Any]:
    """The vendored schema of a kind. A Pod's is assembled from the RayJob's: its
    pod templates carry the full k8s.io/api PodSpec."""
    if (api_version, kind) == ("v1", "Pod"):
        rayjob = _schema("ray.io/v1", "RayJob")["properties"]["spec"]["properties"]
        head = rayjob["rayClusterSpec"]["properties"]["headGroupSpec"]["properties"]
        pod_spec = head["template"]["properties"]["spec"]
        return {
            "type": "object",
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "spec": pod_spec,
            },
        }
    schema: dict[str, Any] = json.loads((SCHEMAS / SCHEMA_FILES[(api_version, kind)]).read_text())
    return schema


@cache
def _validator(api_version: str, kind: str) -> jsonschema.Draft4Validator:
    # OpenAPI 3.0 schemas (Kubernetes' dialect) are closest to JSON Schema draft 4.
    schema = _schema(api_version, kind)
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(_strict(schema))


DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def _metadata_errors(doc: dict[str, Any]) -> list[str]:
    """Kubernetes' own checks of the metadata the schemas leave open
    (k8s.io/apimachinery validation: names, label keys and values), and KubeRay's
    RayJob name rule (ValidateRayJobMetadata, validation.go, v1.7.0: a DNS-1035
    label of at most 47 characters, since the RayCluster's name adds a suffix)."""
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return ["metadata: missing"]
    errors = []
    name = meta.get("name")
    kind = doc.get("kind")
    if kind in {"Service", "RayJob"}:
        if not (isinstance(name, str) and DNS1035_LABEL.match(name) and len(name) <= 63):
            errors.append(f"metadata.name {name!r}: not a DNS-1035 label")
        if kind == "RayJob" and isinstance(name, str) and len(name) > 47:
            errors.append(f"metadata.name {name!r}: KubeRay allows 47 characters")
    elif not (
        isinstance(name, str)
        and len(name) <= 253
        and all(DNS1123_LABEL.match(part) for part in name.split("."))
    ):
        errors.append(f"metadata.name {name!r}: not a DNS-1123 subdomain")
    errors += _label_errors(meta.get("labels", {}), "metadata.labels")
    unknown = set(meta) - {"name", "namespace", "labels", "annotations"}
    if unknown:
        errors.append(f"metadata: unexpected {sorted(unknown)}")
    return errors


def _label_errors(labels: Any, where: str) -> list[str]:
    if not isinstance(labels, dict):
        return [f"{where}: not a mapping"]
    errors = []
    for key, value in labels.items():
        name = str(key).rsplit("/", 1)[-1]
        if not (isinstance(key, str) and LABEL_NAME.match(name) and len(name) <= 63):
            errors.append(f"{where}: bad label key {key!r}")
        if not (isinstance(value, str) and LABEL_VALUE.match(value) and len(value) <= 63):
            errors.append(f"{where}.{key}: bad label value {value!r}")
    return errors


def _kuberay_errors(job: dict[str, Any]) -> list[str]:
    """The operator's own checks of a RayJob that these manifests touch
    (ray-project/kuberay v1.7.0, ray-operator/controllers/ray/utils/validation.go:
    ValidateRayJobSpec, ValidateRayClusterSpec, validateRayGroupResources,
    validateRayGroupLabels)."""
    spec = job["spec"]
    errors = []
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        errors.append("ttlSecondsAfterFinished must be >= 0")
    if "rayClusterSpec" not in spec and not spec.get("clusterSelector"):
        errors.append("one of rayClusterSpec or clusterSelector must be set")
    cluster = spec.get("rayClusterSpec", {})
    autoscaling = cluster.get("enableInTreeAutoscaling", False)
    groups = [("head", cluster["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])
    ]
    for name, group in groups:
        params = group.get("rayStartParams", {})
        if not group["template"]["spec"].get("containers"):
            errors.append(f"{name}: needs at least one container")
        if "labels" in params:
            errors.append(f"{name}: rayStartParams['labels'] is not supported")
        resource_params = {"num-cpus", "num-gpus", "memory", "resources"} & set(params)
        if resource_params and group.get("resources"):
            errors.append(f"{name}: resources in both rayStartParams and resources")
        if name != "head" and not autoscaling:
            low, high = group.get("minReplicas"), group.get("maxReplicas")
            if low is None or high is None:
                errors.append(f"{name}: minReplicas and maxReplicas must be set")
            elif not low <= group.get("replicas", low) <= high:
                errors.append(f"{name}: replicas outside [minReplicas, maxReplicas]")
    return errors


def manifest_errors(doc: dict[str, Any]) -> list[str]:
    """Every problem found in one manifest document ([] = valid)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in KINDS:
        return [f"no vendored schema for apiVersion/kind {key}"]
    validator = _validator(*key)
    errors = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
        for e in validator.iter_errors(doc)
    ]
    errors += _metadata_errors(doc)
    if doc["kind"] == "RayJob" and not errors:
        errors += _kuberay_errors(doc)
    return errors


def test_schemas_are_vendored_with_their_source() -> None:
    readme = (SCHEMAS / "README.md").read_text()
    for file in SCHEMA_FILES.values():
        schema = json.loads((SCHEMAS / file).read_text())
        comment = schema["$comment"]
        source = re.match(r"github\.com/(\S+) (v[\d.]+) \(commit [0-9a-f]{40}\)", comment)
        assert source, f"{file}: $comment names no source"
        repo, tag = source.groups()
        assert f"`{file}`" in readme and repo in readme and f"`{tag}`" in readme, file
        assert schema["properties"]["apiVersion"]["type"] == "string", file
    # The manifests are checked against the operator they are written for.
    assert "KubeRay v1.7.0" in RAYJOB.read_text()


@pytest.mark.parametrize(
    "doc", [doc for _, doc in _all_documents()], ids=[n for n, _ in _all_documents()]
)
def test_every_manifest_validates_against_its_schema(doc: dict[str, Any]) -> None:
    assert manifest_errors(doc) == []


def test_every_manifest_has_a_schema() -> None:
    kinds = {(doc["apiVersion"], doc["kind"]) for _, doc in _all_documents()}
    assert kinds == KINDS


def _head_container(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _rename(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


# A broken copy of a manifest, and what is wrong with it. Each must be rejected.
MUTATIONS: list[tuple[str, Path, str, Callable[[dict[str, Any]], None]]] = [
    (
        "misspelled spec field",
        RAYJOB,
        "RayJob",
        lambda d: _rename(d["spec"], "ttlSecondsAfterFinished", "ttlSecondAfterFinished"),
    ),
    (
        "misspelled container field",
        RAYJOB,
        "RayJob",
        lambda d: _rename(_head_container(d), "volumeMounts", "volumeMount"),
    ),
    (
        "rayStartParams value not a string",
        RAYJOB,
        "RayJob",
        lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update(
            {"num-cpus": 0}
        ),
    ),
    (
        "containerPort as a string",
        RAYJOB,
        "RayJob",
        lambda d: _head_container(d)["ports"][0].update({"containerPort": "6379"}),
    ),
    (
        "replicas as a string",
        RAYJOB,
        "RayJob",
        lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update({"replicas": "2"}),
    ),
    (
        "RayJob name with an underscore",
        RAYJOB,
        "RayJob",
        lambda d: d["metadata"].update({"name": "td3drive_cluster"}),
    ),
    (
        "rayStartParams labels (KubeRay refuses)",
        RAYJOB,
        "RayJob",
        lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update(
            {"labels": "a=b"}
        ),
    ),
    (
        "misspelled PodMonitor field",
        PODMONITOR,
        "PodMonitor",
        lambda d: _rename(d["spec"], "podMetricsEndpoints", "podMetricsEndpoint"),
    ),
    (
        "scrape interval as a number",
        PODMONITOR,
        "PodMonitor",
        lambda d: d["spec"]["podMetricsEndpoints"][0].update({"interval": 10}),
    ),
    (
        "Service port as a string",
        RAYJOB,
        "Service",
        lambda d: d["spec"]["ports"][0].update({"port": "9810"}),
    ),
    (
        "misspelled Service field",
        RAYJOB,
        "Service",
        lambda d: _rename(d["spec"], "selector", "selectors"),
    ),
    (
        "Pod command as a string",
        RESULTS_POD,
        "Pod",
        lambda d: d["spec"]["containers"][0].update({"command": "sleep infinity"}),
    ),
    (
        "accessModes as a string",
        PVC,
        "PersistentVolumeClaim",
        lambda d: d["spec"].update({"accessModes": "ReadWriteMany"}),
    ),
]


@pytest.mark.parametrize(
    ("path", "kind", "mutate"), [m[1:] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS]
)
def test_a_broken_manifest_is_rejected(
    path: Path, kind: str, mutate: Callable[[dict[str, Any]], None]
) -> None:
    doc = copy.deepcopy(_one(path, kind))
    assert manifest_errors(doc) == []
    mutate(doc)
    assert manifest_errors(doc), "the broken manifest passed validation"


# --- the entrypoint, as KubeRay's submitter runs it ---------------------------------


def _go_quote(text: str) -> str:
    """Go's ``strconv.Quote`` for printable ASCII (what KubeRay quotes: JSON)."""
    if not all(" " <= ch <= "~" for ch in text):
        raise ValueError(f"only printable ASCII is modelled: {text!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _go_json(value: Any) -> str:
    """``json.Marshal`` output: compact, map keys sorted."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def kuberay_submitter_command(job: dict[str, Any], dashboard: str, job_id: str) -> list[str]:
    """The submitter container's command and argument for a K8sJobMode RayJob,
    as KubeRay v1.7.0 (commit 59d663ae) builds them: ``BuildJobSubmitCommand`` in
    ray-operator/controllers/ray/common/job.go (health wait loop, ``ray job
    status`` guard, ``ray job submit --no-wait``, ``ray job logs --follow``; the
    entrypoint appended as ONE unquoted word), joined with spaces and run by
    ``configureSubmitterContainer`` (controllers/ray/rayjob_controller.go) as
    ``utils.GetContainerCommand(["e"])`` = ``/bin/bash -ce --`` (utils/util.go).

    Args:
        job: the RayJob manifest.
        dashboard: ``status.dashboardURL`` (``host:port``, or with ``http://``).
        job_id: ``status.jobId``, the submission id.
    """
    spec = job["spec"]
    address = dashboard if dashboard.startswith("http://") else f"http://{dashboard}"
    # utils.BasePythonHealthCommand with RayDashboardGCSHealthPath, timeout 10 s.
    health = (
        'python -c "import urllib.request; r=urllib.request.urlopen('
        f"'{address}/api/gcs_healthz', timeout=10); "
        "exit(0 if b'success' in r.read() else 1)\""
    )
    waiting = _go_quote(f"Waiting for Ray Dashboard GCS to become healthy at {address} ...")
    cmd = ["until", health, ">/dev/null", "2>&1", ";"]
    cmd += ["do", "echo", waiting, ";", "sleep", "2", ";", "done", ";"]
    cmd += ["if", "!", "ray", "job", "status", "--address", address, job_id]
    cmd += [">/dev/null", "2>&1", ";", "then"]
    cmd += ["ray", "job", "submit", "--address", address, "--no-wait"]
    if spec.get("runtimeEnvYAML"):
        runtime_env = _go_json(yaml.safe_load(spec["runtimeEnvYAML"]))
        cmd += ["--runtime-env-json", _go_quote(runtime_env)]
    if spec.get("metadata"):
        cmd += ["--metadata-json", _go_quote(_go_json(spec["metadata"]))]
    cmd += ["--submission-id", job_id]
    if spec.get("entrypointNumCpus", 0) > 0:
        cmd += ["--entrypoint-num-cpus", f"{float(spec['entrypointNumCpus']):f}"]
    if spec.get("entrypointNumGpus", 0) > 0:
        cmd += ["--entrypoint-num-gpus", f"{float(spec['entrypointNumGpus']):f}"]
    if spec.get("entrypointResources"):
        cmd += ["--entrypoint-resources", _go_quote(spec["entrypointResources"])]
    cmd += ["--", spec["entrypoint"].strip(), ";", "fi", ";"]
    cmd += ["ray", "job", "logs", "--address", address, "--follow", job_id]
    return ["/bin/bash", "-ce", "--", " ".join(cmd)]


def test_the_composition_matches_kuberays_own_test() -> None:
    """The model above against KubeRay's own expectation: the job and the
    expected command of TestBuildJobSubmitCommandWithK8sJobMode in
    ray-operator/controllers/ray/common/job_test.go (v1.7.0)."""
    job = {
        "spec": {
            "runtimeEnvYAML": "test: test",
            "metadata": {"testKey": "testValue"},
            "rayClusterSpec": {"rayVersion": "2.6.0"},
            "entrypoint": "echo no quote 'single quote' \"double quote\"",
            "entrypointNumCpus": 1,
            "entrypointNumGpus": 0.5,
            "entrypointResources": '{"Custom_1": 1, "Custom_2": 5.5}',
        }
    }
    address = "http://127.0.0.1:8265"
    health = (
        'python -c "import urllib.request; r=urllib.request.urlopen('
        f"'{address}/api/gcs_healthz', timeout=10); exit(0 if b'success' in r.read() else 1)\""
    )
    expected = [
        *("until", health, ">/dev/null", "2>&1", ";", "do", "echo"),
        f'"Waiting for Ray Dashboard GCS to become healthy at {address} ..."',
        *(";", "sleep", "2", ";", "done", ";"),
        *("if", "!", "ray", "job", "status", "--address", address, "testJobId"),
        *(">/dev/null", "2>&1", ";", "then"),
        *("ray", "job", "submit", "--address", address, "--no-wait"),
        *("--runtime-env-json", '"{\\"test\\":\\"test\\"}"'),
        *("--metadata-json", '"{\\"testKey\\":\\"testValue\\"}"'),
        *("--submission-id", "testJobId"),
        *("--entrypoint-num-cpus", "1.000000", "--entrypoint-num-gpus", "0.500000"),
        *("--entrypoint-resources", '"{\\"Custom_1\\": 1, \\"Custom_2\\": 5.5}"'),
        *("--", "echo no quote 'single quote' \"double quote\"", ";", "fi", ";"),
        *("ray", "job", "logs", "--address", address, "--follow", "testJobId"),
    ]
    command = kuberay_submitter_command(job, address, "testJobId")
    assert command == ["/bin/bash", "-ce", "--", " ".join(expected)]


class _Dashboard(ThreadingHTTPServer):
    """A stand-in for the Ray dashboard's job API: GCS health, version, job
    status (unknown until submitted) and submission, which it records."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _DashboardHandler)
        self.submissions: list[dict[str, Any]] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _DashboardHandler(BaseHTTPRequestHandler):
    server: _Dashboard

    def _reply(self, status: int, body: Any) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/api/gcs_healthz":
            self._reply(200, b"success")
        elif self.path == "/api/version":
            self._reply(200, {"version": "4", "ray_version": ray.__version__, "ray_commit": "x"})
        else:  # /api/jobs/<id> and anything else: not known
            self._reply(404, b"not found")

    def do_POST(self) -> None:
        if self.path != "/api/jobs/":
            self._reply(404, b"not found")
            return
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.submissions.append(request)
        sid = request["submission_id"]
        self._reply(200, {"job_id": sid, "submission_id": sid})

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


def _stubs(directory: Path) -> dict[str, str]:
    """PATH entries for the submitter pod: ``ray`` is the real Ray CLI except
    ``ray job logs`` (a websocket stream the stand-in does not serve), and
    ``td3drive`` records its arguments instead of training."""
    directory.mkdir()
    ray_stub = directory / "ray"
    ray_stub.write_text(
        "#!/bin/sh\n"
        'if [ "$1 $2" = "job logs" ]; then echo "$@" >> "$TD3DRIVE_TEST_LOGS"; exit 0; fi\n'
        f"exec {shlex.quote(sys.executable)} -c "
        "'import sys; from ray.scripts.scripts import main; sys.argv[0] = \"ray\"; main()' "
        '"$@"\n'
    )
    td3drive_stub = directory / "td3drive"
    td3drive_stub.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "with open(os.environ['TD3DRIVE_TEST_ARGV'], 'a') as log:\n"
        "    log.write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    for stub in (ray_stub, td3drive_stub):
        stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{directory}{os.pathsep}{env['PATH']}"
    env["TD3DRIVE_TEST_ARGV"] = str(directory / "td3drive-argv.jsonl")
    env["TD3DRIVE_TEST_LOGS"] = str(directory / "ray-job-logs.txt")
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def _read_lines(path: str) -> list[str]:
    return Path(path).read_text().splitlines() if Path(path).exists() else []


def _submit_as_kuberay(
    job: dict[str, Any], tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]], dict[str, str]]:
    """Run the submitter command of ``job`` in a real bash against the stand-in
    dashboard; returns the process, the recorded submissions, and the env."""
    env = _stubs(tmp_path / "bin")
    job_id = "td3drive-cluster-abcde"
    dashboard = _Dashboard()
    thread = threading.Thread(target=dashboard.serve_forever, daemon=True)
    thread.start()
    try:
        # KubeRay's env for the submitter container (rayjob_controller.go).
        env.update(
            PYTHONUNBUFFERED="1",
            RAY_DASHBOARD_ADDRESS=dashboard.address,
            RAY_JOB_SUBMISSION_ID=job_id,
        )
        command = kuberay_submitter_command(job, dashboard.address, job_id)
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
    finally:
        dashboard.shutdown()
        dashboard.server_close()
        thread.join(timeout=30)
    return done, dashboard.submissions, env


def _entrypoint_argv(entrypoint: str, env: dict[str, str], cwd: Path) -> list[list[str]]:
    """What the job's entrypoint runs on the head: Ray's JobSupervisor starts it
    with ``subprocess.Popen(entrypoint, shell=True)`` (ray/dashboard/modules/job/
    job_supervisor.py, Ray 2.60), i.e. ``/bin/sh -c``."""
    subprocess.run(["/bin/sh", "-c", entrypoint], env=env, check=True, timeout=60, cwd=cwd)
    return [json.loads(line) for line in _read_lines(env["TD3DRIVE_TEST_ARGV"])]


def test_entrypoint_reaches_the_job_as_one_command(tmp_path: Path) -> None:
    job = _rayjob()
    assert job["spec"]["submissionMode"] == "K8sJobMode"  # the composition modelled
    done, submissions, env = _submit_as_kuberay(job, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    # Nothing ran in the submitter pod but the Ray CLI.
    assert _read_lines(env["TD3DRIVE_TEST_ARGV"]) == [], "td3drive ran in the submitter pod"
    assert _read_lines(env["TD3DRIVE_TEST_LOGS"]) == [
        f"job logs --address http://{env['RAY_DASHBOARD_ADDRESS']} --follow td3drive-cluster-abcde"
    ]
    (submission,) = submissions
    assert submission["submission_id"] == "td3drive-cluster-abcde"
    # The job is the whole td3drive command, with the stop wait in its runtime env.
    assert shlex.split(submission["entrypoint"]) == shlex.split(job["spec"]["entrypoint"])
    assert submission["runtime_env"]["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "120"

    (argv,) = _entrypoint_argv(submission["entrypoint"], env, tmp_path)
    args = build_parser().parse_args(argv)
    assert args.command == "train" and args.resume is None
    # An absolute path into the image's copy of the repository (Dockerfile: COPY . /app).
    assert args.config.is_absolute() and args.config.is_relative_to(_image_repo_root())
    assert (REPO / args.config.relative_to(_image_repo_root())).is_file()


def test_the_split_entrypoint_is_caught(tmp_path: Path) -> None:
    """The harness above sees the old entrypoint's bug: its ``&&``
    ends the submit command, and ``td3drive train`` runs in the submitter."""
    job = copy.deepcopy(_rayjob())
    job["spec"]["entrypoint"] = SPLIT_ENTRYPOINT
    done, submissions, env = _submit_as_kuberay(job, tmp_path)
    (submission,) = submissions
    assert submission["entrypoint"] == "cd /app"
    assert [json.loads(x) for x in _read_lines(env["TD3DRIVE_TEST_ARGV"])] == [
        ["train", "--config", "deploy/cluster.yaml"]
    ]
    assert done.returncode == 0  # and nothing says so but the submitter pod's log


def _entrypoint_args() -> Any:
    program, *argv = shlex.split(_rayjob()["spec"]["entrypoint"])
    assert program == "td3drive"
    return build_parser().parse_args(argv)


def _entrypoint_config() -> TD3DriveConfig:
    """The config the RayJob's driver runs with: its --config (in the image) and --set."""
    args = _entrypoint_args()
    path = REPO / args.config.relative_to(_image_repo_root())
    return load_config(path, args.overrides)


# --- the manifest against deploy/cluster.yaml --------------------------------------


def _cpus(value: str | int) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _groups(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every Ray node group by name ("head" for the head group)."""
    cluster = job["spec"]["rayClusterSpec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    return {"head": cluster["headGroupSpec"], **groups}


def _pod_labels(group_name: str, group: dict[str, Any]) -> dict[str, str]:
    """The labels KubeRay gives a group's pods: the template's, over its own, with
    ray.io/node-type and ray.io/group not overridable (labelPod in
    ray-operator/controllers/ray/common/pod.go, v1.7.0)."""
    node_type = "head" if group_name == "head" else "worker"
    labels = {"app.kubernetes.io/name": "kuberay", "ray.io/is-ray-node": "yes"}
    labels.update(group["template"].get("metadata", {}).get("labels", {}))
    labels.update({"ray.io/node-type": node_type, "ray.io/group": group_name})
    return labels


def test_rayjob_manifest_matches_the_cluster_config() -> None:
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    args = _entrypoint_args()
    assert args.config == _image_repo_root() / "deploy" / "cluster.yaml"
    config = _cluster_config()

    groups = _groups(job)
    rollout, learner = groups["rollout"], groups["learner"]

    def ray_cpus(group: dict[str, Any]) -> float:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpus = group["rayStartParams"].get("num-cpus", limits["cpu"])
        return float(group["replicas"]) * _cpus(cpus)

    run = config.run
    needed = (
        config.rollout.num_workers * run.worker_num_cpus
        + config.replay.num_shards * run.shard_num_cpus
    )
    assert ray_cpus(rollout) >= needed
    assert ray_cpus(learner) >= run.learner_num_cpus
    gpu_limits = learner["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) >= run.learner_num_gpus
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"


def test_metrics_ports_do_not_collide_and_prometheus_finds_the_driver() -> None:
    job, config = _rayjob(), _cluster_config()
    port = config.run.metrics_port
    for name, group in _groups(job).items():
        container = group["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        assert len(set(ports.values())) == len(ports), f"{name}: a port twice"
        # Ray's own metrics export: explicit, declared, and not td3drive's.
        ray_metrics = int(group["rayStartParams"]["metrics-export-port"])
        assert ports["metrics"] == ray_metrics != port, name
    head_ports = {p["name"]: p["containerPort"] for p in _head_container(job)["ports"]}
    assert head_ports["td3drive-metrics"] == port

    labels = {name: _pod_labels(name, group) for name, group in _groups(job).items()}

    def selects(selector: dict[str, str]) -> set[str]:
        return {name for name, pod in labels.items() if selector.items() <= pod.items()}

    service = _one(RAYJOB, "Service")
    assert selects(service["spec"]["selector"]) == {"head"}
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == port and service_port["targetPort"] == "td3drive-metrics"

    monitor = _one(PODMONITOR, "PodMonitor")["spec"]
    assert selects(monitor["selector"]["matchLabels"]) == {"head"}
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] == "td3drive-metrics" and endpoint["path"] == "/metrics"
    # The job label the alerts and the dashboard select (deploy/prometheus/prometheus.yml).
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (scrape_job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "td3drive"]
    assert labels["head"][monitor["jobLabel"]] == scrape_job["job_name"]
    # The same cadence as the static config, which run.metrics_linger_s is sized for:
    # two scrapes plus a timeout fit into the linger.
    interval = _seconds(endpoint["interval"])
    assert interval == _seconds(prometheus["global"]["scrape_interval"])
    assert 2 * interval + _seconds(endpoint["scrapeTimeout"]) <= config.run.metrics_linger_s


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)", duration)
    assert match, duration
    return int(match[1]) * {"ms": 0.001, "s": 1, "m": 60}[match[2]]


def test_the_run_directory_is_on_the_volume_every_pod_mounts() -> None:
    job, claim = _rayjob(), _one(PVC, "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    storage = _entrypoint_config().run.storage_path
    assert storage is not None and PurePosixPath(storage).is_absolute()
    pods = {name: group["template"]["spec"] for name, group in _groups(job).items()}
    # The results pod mounts it at the same path: the run's absolute paths hold there.
    pods["results"] = _one(RESULTS_POD, "Pod")["spec"]
    for name, pod in pods.items():
        volumes = {
            v["name"]
            for v in pod["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]
        }
        (container,) = pod["containers"]
        mounts = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in volumes}
        assert mounts == {storage}, f"{name}: run.storage_path {storage} not mounted"
        assert pod["securityContext"]["fsGroup"] == IMAGE_GID, name


IMAGE_GID = 100
"""The group of rayproject/ray's user ``ray`` (uid 1000, gid 100: docker/base-deps
in ray-project/ray), which the pods' fsGroup gives the volume."""


def test_stop_and_ttl_leave_time_for_the_save_and_the_last_scrapes() -> None:
    job, config = _rayjob(), _cluster_config()
    env_vars = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    stop_wait = float(env_vars["RAY_JOB_STOP_WAIT_TIME_S"])
    linger = config.run.metrics_linger_s
    # SIGTERM -> up to STOP_GRACE_S for calls in flight, the save, the linger; then SIGKILL.
    assert stop_wait > STOP_GRACE_S + linger
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] >= linger


# --- the image ---------------------------------------------------------------------


def _dockerfile() -> tuple[dict[str, str], dict[str, list[Any]]]:
    """(global ARG defaults, instructions of each stage by its ``AS`` name)."""
    commands = dockerfile.parse_file(str(DOCKERFILE))
    args: dict[str, str] = {}
    stages: dict[str, list[Any]] = {}
    current: list[Any] | None = None
    for command in commands:
        if command.cmd == "FROM":
            assert len(command.value) == 3 and command.value[1].upper() == "AS", command
            current = stages.setdefault(command.value[2], [command])
        elif current is None:
            assert command.cmd == "ARG", command
            name, _, default = command.value[0].partition("=")
            args[name] = default
        else:
            current.append(command)
    return args, stages


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], text)


def _image_repo_root() -> PurePosixPath:
    """Where the Dockerfile copies the build context (the repository root)."""
    _, stages = _dockerfile()
    (copy_,) = [c for c in stages["td3drive"] if c.cmd == "COPY"]
    source, target = copy_.value
    assert source == "."
    return PurePosixPath(target)


def _stage_args(stage: list[Any]) -> dict[str, str]:
    """ARG defaults declared inside a stage."""
    pairs = [c.value[0].partition("=") for c in stage if c.cmd == "ARG"]
    return {name: default for name, _, default in pairs}


def test_dockerfile_bases_match_the_manifest_and_the_project() -> None:
    args, stages = _dockerfile()
    pins = {"ray": args["RAY_VERSION"], "torch": _stage_args(stages["td3drive"])["TORCH_VERSION"]}
    ray_version = pins["ray"]
    assert _rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == ray_version
    # The versions the image pins satisfy the project's own requirements.
    pyproject = (REPO / "pyproject.toml").read_text()
    found = re.findall(r'^\s*"((?:ray|torch)\b[^"]*)"', pyproject, re.MULTILINE)
    requirements = {r.name: r for r in map(Requirement, found)}
    assert set(requirements) == set(pins)
    for name, requirement in requirements.items():
        assert Version(pins[name]) in requirement.specifier, (requirement, pins[name])

    indexes = {}
    for variant in ("cpu", "gpu"):
        base = stages[f"base-{variant}"]
        assert _expand(base[0].value[0], args) == f"rayproject/ray:{ray_version}-py311-{variant}"
        (env,) = [c for c in base if c.cmd == "ENV"]
        assert env.value[0] == "TD3DRIVE_TORCH_INDEX_URL"
        indexes[variant] = env.value[1]
    assert indexes["cpu"] == "https://download.pytorch.org/whl/cpu"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", indexes["gpu"])
    # The image stage picks a base by VARIANT; the manifest's pods need the GPU one.
    assert stages["td3drive"][0].value[0] == "base-${VARIANT}"
    assert args["VARIANT"] == "gpu"
    images = {
        c["image"]
        for group in _groups(_rayjob()).values()
        for c in group["template"]["spec"]["containers"]
    }
    images |= {c["image"] for c in _one(RESULTS_POD, "Pod")["spec"]["containers"]}
    (image,) = images  # one image for every pod (and the submitter, which uses the head's)
    assert image.endswith("-gpu") and _cluster_config().learner.device == "cuda"


def test_dockerfile_installs_torch_first_then_the_project() -> None:
    _, stages = _dockerfile()
    steps = stages["td3drive"]
    runs = [(i, c.value[0]) for i, c in enumerate(steps) if c.cmd == "RUN"]
    (torch_step,) = [i for i, text in runs if "torch==" in text and "--index-url" in text]
    (project_step,) = [i for i, text in runs if re.search(r"pip install .*\s/app(\s|$)", text)]
    (copy_step,) = [i for i, c in enumerate(steps) if c.cmd == "COPY"]
    assert torch_step < copy_step < project_step
    project = dict(runs)[project_step]
    assert "--constraint" in project and "-e " not in project  # keeps torch; not editable
    assert "TD3DRIVE_TORCH_INDEX_URL" in dict(runs)[torch_step]
    # No Debian prometheus (only the test suite's integration test wants a server).
    assert not any("apt-get" in text or "prometheus" in text for _, text in runs)


def test_the_build_context_keeps_what_the_image_needs() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns)  # no re-includes to model

    def ignored(path: str) -> bool:
        """Docker's rule for these patterns: a pattern matches a path from the
        context root (or, after ``**/``, at any depth); a matched folder is
        left out with everything under it."""
        parts = PurePosixPath(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        for pattern in patterns:
            if pattern.startswith("**/"):
                if any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts):
                    return True
            elif any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
                return True
        return False

    needed = ["pyproject.toml", "README.md", "deploy/cluster.yaml", "deploy/local.yaml"]
    needed += [
        f"{package}/__init__.py"
        for package in ("td3drive", "learner", "rollout_workers", "buffer_service")
    ]
    for path in needed:
        assert (REPO / path).exists(), path
        assert not ignored(path), f".dockerignore leaves {path} out of the image"
    for path in ("runs/x/config.yaml", ".git/HEAD", "td3drive/__pycache__/cli.cpython-311.pyc"):
        assert ignored(path), f".dockerignore sends {path} to the build"
