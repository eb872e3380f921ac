"""The layering rule (docs/architecture.md), as import-linter contracts in
``.importlinter``: application (``td3drive.app``, ``td3drive.bench``) over
services (``learner``, ``buffer_service``, ``rollout_workers``, independent of
each other) over contracts (``td3drive.contracts``); contracts import neither
Ray nor a service; in the services Ray appears only in the actor modules.

The second test plants a wrong-way import in a copy of the tree and checks
that the same contracts fail on it, so the first one can fail.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("td3drive", "learner", "buffer_service", "rollout_workers")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # lint-imports, as its console script runs it (the module has no __main__)
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command as c; c()",
            "--no-cache",
        ],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_import_contracts_are_kept() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # a service importing the application
        ("learner/td3.py", "import td3drive.app.driver", "Application over services"),
        # a service importing another service
        ("learner/augmentation.py", "import rollout_workers.worker", "Application over services"),
        # a contract importing Ray
        ("td3drive/contracts/spec.py", "import ray", "Contracts import neither"),
        # Ray outside a service's actor module
        ("buffer_service/storage.py", "import ray", "Ray appears only"),
    ],
)
def test_a_wrong_way_import_breaks_a_contract(
    tmp_path: Path, module: str, line: str, broken: str
) -> None:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # planted by the test\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout, result.stdout
