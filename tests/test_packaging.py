"""The package installs one way and shadows nothing.

The repository root is on ``sys.path`` whenever Python or pytest starts there (``python -m
pytest``, ``python -c``, a README example run from a checkout). A top-level folder that is a
regular package then hides an installed package of the same name: the kernels' folder,
``kernels/``, once hid Hugging Face's ``kernels`` (which transformers imports), and every
diffusers model failed to import. ``kernels/`` is now a plain folder holding the package
(``kernels/bespoke_fast_kernels/``, installed as ``bespoke_fast.kernels``).
"""
from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the regular packages at the root, each a name nobody else installs under
ROOT_PACKAGES = {"bespoke_fast", "tests"}


def _run_from_root(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(env, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)


def test_no_root_folder_is_a_package_but_ours():
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    assert packages == ROOT_PACKAGES, packages
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert (REPO / "kernels" / "bespoke_fast_kernels" / "__init__.py").is_file()


def test_an_installed_kernels_package_wins_from_the_repo_root():
    """Run from the root, ``import kernels`` is the installed one (or none), never our folder."""
    proc = _run_from_root("import importlib.util as u; s = u.find_spec('kernels'); "
                          "print(s.origin if s and s.origin else 'namespace' if s else 'none')")
    assert proc.returncode == 0, proc.stderr[-2000:]
    origin = proc.stdout.strip()
    assert not origin.startswith(str(REPO / "kernels")), origin
    if importlib.util.find_spec("kernels") is not None and origin != "namespace":
        imported = _run_from_root("import kernels; print(kernels.__file__)")
        assert imported.returncode == 0, imported.stderr[-2000:]
        assert not imported.stdout.startswith(str(REPO / "kernels")), imported.stdout


def test_diffusers_models_import_from_the_repo_root():
    pytest.importorskip("diffusers", reason="diffusers is not installed")
    proc = _run_from_root("import diffusers.models.autoencoders.autoencoder_kl")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_kernels_install_from_their_folder():
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords
          if k.arg in ("packages", "package_dir")}
    assert kw["package_dir"] == {"bespoke_fast.kernels": "kernels/bespoke_fast_kernels"}
    assert "bespoke_fast.kernels" in kw["packages"]
    for package in kw["packages"]:  # every listed package is a folder with an __init__.py
        folder = kw["package_dir"].get(package, package.replace(".", "/"))
        assert (REPO / folder / "__init__.py").is_file(), package
    spec = importlib.util.find_spec("bespoke_fast.kernels")
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).parent.name in ("bespoke_fast_kernels", "kernels"), spec.origin


def test_pyproject_builds_with_setuptools_pep660_and_setup_py_refuses_develop():
    tomllib = pytest.importorskip("tomllib", reason="Python < 3.11 has no tomllib")
    build = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    assert any(r.replace(" ", "").startswith("setuptools>=") for r in build["requires"])
    proc = subprocess.run([sys.executable, "setup.py", "develop"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "pip >= 21.3" in proc.stderr, proc.stderr[-1000:]
