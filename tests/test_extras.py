"""Each install extra carries what its entry points import: a trainer node installs
`birdie[trainer,client]`, a person with curl-like needs `birdie[client]`, and neither has the
server's dependencies. Each case imports its modules in a fresh interpreter in which the packages of
every other extra cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

BLOCKER = """
import importlib.abc, sys
BLOCKED = set({blocked!r})
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not in this install (blocked by the test)")
sys.meta_path.insert(0, Block())
"""


def distributions(extras: list[str]) -> set[str]:
    names = set()
    for extra in extras:
        for spec in EXTRAS[extra]:
            names.add(Requirement(spec).name.lower().replace("_", "-"))
    return names


def blocked_modules(installed_extras: list[str]) -> set[str]:
    """Top-level modules of the distributions that only the other extras bring."""
    others = distributions([e for e in EXTRAS if e != "dev"]) - distributions(installed_extras)
    return {module for module, dists in packages_distributions().items()
            if any(d.lower().replace("_", "-") in others for d in dists)}


@pytest.mark.parametrize("extras, code", [
    (["trainer", "client"], "import trainer.train, trainer.evaluate, trainer.main_job, clients.cli; "
                            "trainer.train.parse_args(['--run-name', 'x'])"),
    (["client"], "import clients, clients.cli, clients.client, clients.iterator, clients.losses, clients.plot"),
])
def test_an_install_with_only_these_extras_imports_its_entry_points(extras, code):
    blocked = blocked_modules(extras)
    assert blocked, "nothing to block: the extras would all be the same"
    result = subprocess.run([sys.executable, "-c", BLOCKER.format(blocked=sorted(blocked)) + code],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, f"blocked {sorted(blocked)}:\n{result.stderr[-3000:]}"
