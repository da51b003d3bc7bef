"""The pytest plugin as users get it: examples/pytest_plugin run by pytest in a process of its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tokencache.testing.workers import INHERITED

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pytest_plugin"
ISOLATED = ("GOOGLE_", "TOKENCACHE_", "GCE_", "PYTEST_")


def test_the_example_suite_passes_with_only_the_plugins_fixtures(tmp_path: Path) -> None:
    # No -p: the pytest11 entry point must load the plugin by itself.
    env = {k: v for k, v in os.environ.items() if k in INHERITED or not k.startswith(ISOLATED)}
    env["CLOUDSDK_CONFIG"] = str(tmp_path / "no-gcloud")  # TOKENCACHE_REDIS_SERVER kept: this run's server
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--timeout", "50", str(EXAMPLE)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=55,
    )
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert re.fullmatch(r"2 passed in [\d.]+s", summary), out.stdout + out.stderr
    assert out.returncode == 0


def test_the_plugin_imports_its_tools_only_when_a_fixture_asks() -> None:
    """pytest imports the plugin in every run wherever tokencache is installed: it must load no client."""
    heavy = ("tokencache.testing.", "tokencache.app", "tokencache.adapters", "redis", "rq", "google")
    heavy += ("requests", "cryptography")
    code = (
        "import sys, tokencache.testing.pytest_plugin;"
        f"print(sorted(m for m in sys.modules if m.startswith({heavy!r}) or m == 'http.server'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == "['tokencache.testing.pytest_plugin']"


def test_the_docs_list_every_fixture_and_show_the_example_as_it_is() -> None:
    from tokencache.testing import pytest_plugin

    docs = (EXAMPLE.parent.parent / "docs" / "testing.md").read_text()
    listed = set(re.findall(r"^\| `(tokencache_\w+)` \|", docs, re.M))
    assert listed == {name for name in pytest_plugin.__all__ if name.startswith("tokencache_")}
    shown = re.search(r"An example suite.*?```python\n(.*?)```", docs, re.S)
    assert shown is not None and shown.group(1) in (EXAMPLE / "test_tokens.py").read_text()
