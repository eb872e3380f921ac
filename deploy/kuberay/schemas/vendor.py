"""Regenerate the JSON schemas in this folder from the upstream CRD files.

    python deploy/kuberay/schemas/vendor.py --kuberay KUBERAY_GIT_DIR \\
        --prometheus-operator PROMETHEUS_OPERATOR_GIT_DIR

Each directory is a clone (or bare mirror) of ray-project/kuberay and
prometheus-operator/prometheus-operator that holds the tags in ``SOURCES``; the
files are read with ``git show TAG:PATH``, so the working tree's checkout does
not matter. Each output is the ``openAPIV3Schema`` of the CRD version named
(or the subschema at ``pointer``) with its ``description`` texts removed
(they do not take part in validation), and a ``$comment`` naming the upstream
file, tag and commit. ``README.md`` lists the same sources; update both, and
``tests/test_kuberay_manifests.py`` checks the manifests against the result.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Source:
    """One vendored schema: where it comes from and where it goes."""

    output: str  # file name in this folder
    repo: str  # "kuberay" or "prometheus-operator" (the command-line option)
    tag: str
    path: str  # the CRD file in the repository
    version: str  # the CRD version whose schema is taken
    pointer: tuple[str, ...] = ()  # keys from openAPIV3Schema down to a subschema
    note: str = ""


_REPOS = {
    "kuberay": "ray-project/kuberay",
    "prometheus-operator": "prometheus-operator/prometheus-operator",
}
KUBERAY_TAG = "v1.7.0"
PROMETHEUS_OPERATOR_TAG = "v0.93.0"

SOURCES = (
    Source(
        "rayjob-ray.io-v1.json",
        "kuberay",
        KUBERAY_TAG,
        "ray-operator/config/crd/bases/ray.io_rayjobs.yaml",
        "v1",
    ),
    Source(
        "podmonitor-monitoring.coreos.com-v1.json",
        "prometheus-operator",
        PROMETHEUS_OPERATOR_TAG,
        "example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml",
        "v1",
    ),
    Source(
        "service-v1.json",
        "kuberay",
        KUBERAY_TAG,
        "ray-operator/config/crd/bases/ray.io_rayservices.yaml",
        "v1",
        ("properties", "spec", "properties", "serveService"),
        "RayService.spec.serveService is a core/v1 Service rendered by controller-gen "
        "from k8s.io/api",
    ),
    Source(
        "persistentvolumeclaim-v1.json",
        "prometheus-operator",
        PROMETHEUS_OPERATOR_TAG,
        "example/prometheus-operator-crd/monitoring.coreos.com_prometheuses.yaml",
        "v1",
        ("properties", "spec", "properties", "storage", "properties", "volumeClaimTemplate"),
        "Prometheus.spec.storage.volumeClaimTemplate is a core/v1 PersistentVolumeClaim "
        "(spec: k8s.io/api PersistentVolumeClaimSpec) rendered by controller-gen",
    ),
)


def _strip_descriptions(schema: Any) -> Any:
    """``schema`` without ``description`` texts (a property *named* description stays)."""
    if isinstance(schema, dict):
        return {
            key: _strip_descriptions(value)
            for key, value in schema.items()
            if not (key == "description" and isinstance(value, str))
        }
    if isinstance(schema, list):
        return [_strip_descriptions(item) for item in schema]
    return schema


def extract(source: Source, git_dir: Path) -> dict[str, Any]:
    """The vendored schema of ``source``, read from the git repository ``git_dir``.

    Raises:
        subprocess.CalledProcessError: the tag or the path is not in ``git_dir``.
        KeyError: the CRD has no such version or pointer.
    """

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(git_dir), *args], check=True, capture_output=True, text=True
        ).stdout

    commit = git("rev-parse", f"{source.tag}^{{commit}}").strip()
    crd = yaml.safe_load(git("show", f"{source.tag}:{source.path}"))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == source.version]
    schema = version["schema"]["openAPIV3Schema"]
    for key in source.pointer:
        schema = schema[key]
    where = source.path + (f" #/{'/'.join(source.pointer)}" if source.pointer else "")
    comment = (
        f"github.com/{_REPOS[source.repo]} {source.tag} (commit {commit}): {where}, "
        f"CRD version {source.version}, openAPIV3Schema; descriptions removed by "
        f"deploy/kuberay/schemas/vendor.py."
    )
    if source.note:
        comment += f" {source.note}."
    return {"$comment": comment, **_strip_descriptions(schema)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kuberay", type=Path, required=True, help="ray-project/kuberay git dir")
    parser.add_argument(
        "--prometheus-operator",
        type=Path,
        required=True,
        help="prometheus-operator/prometheus-operator git dir",
    )
    args = parser.parse_args()
    dirs = {"kuberay": args.kuberay, "prometheus-operator": args.prometheus_operator}
    for source in SOURCES:
        schema = extract(source, dirs[source.repo])
        (HERE / source.output).write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
        print(f"wrote {source.output}")


if __name__ == "__main__":
    main()
