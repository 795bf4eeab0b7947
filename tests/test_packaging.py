"""The packages groundwatch installs must not share a top-level name with another distribution's.

transformers 5.25 made Hugging Face's `kernels` distribution a hard dependency and imports it at start-up
(`transformers.integrations.hub_kernels`). groundwatch's deformable-attention package was also called `kernels`,
so inside the repository (and in any environment holding both) `from kernels import CUDAProperties` found ours and
every `BertModel` import failed; a non-editable install would also have written both into one
`site-packages/kernels/`.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _our_top_level_packages() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {name.split(".")[0] for name in config["tool"]["setuptools"]["packages"]}


def test_no_top_level_package_is_shared_with_another_installed_distribution():
    owners = importlib.metadata.packages_distributions()
    clashes = {name: sorted(set(owners[name]) - {"groundwatch"})
               for name in _our_top_level_packages() if set(owners.get(name, ())) - {"groundwatch"}}
    assert not clashes, f"top-level packages also installed by other distributions: {clashes}"


def test_transformers_bert_imports_from_the_repository_root():
    """The way the tests, the benchmarks and `groundwatch` run: the repository root first on sys.path."""
    code = "import gdino.model.text_encoder; from transformers import BertConfig, BertModel; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
