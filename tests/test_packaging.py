"""The package installs one way and shadows nothing.

The repository root is on ``sys.path`` whenever Python or pytest starts there (``python -m
pytest``, ``python -c``, a README example run from a checkout). A top-level folder that is a
regular package then hides an installed package of the same name: the kernels' folder,
``kernels/``, once hid Hugging Face's ``kernels`` (which transformers imports), and every
diffusers model failed to import. ``kernels/`` is now a plain folder holding the package
(``kernels/bespoke_fast_kernels/``, installed as ``bespoke_fast.kernels``). ``bench/`` is a
regular package, never installed: its scripts run as files (``bench/_path.py``) or as modules.
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
# the regular packages at the root, each a name that nothing this project uses imports: from the
# root they hide an installed package of the same name (``bench``: the benchmarks, never
# installed; PyPI's old ``bench`` and frappe's ``bench`` CLI are then hidden from the root only)
ROOT_PACKAGES = {"bespoke_fast", "tests", "bench"}
BENCH = REPO / "bench"


def _run(args, cwd, **env) -> subprocess.CompletedProcess:
    """``python *args`` in ``cwd``, without our PYTHONPATH (plus ``env``)."""
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=dict(base, OMP_NUM_THREADS="1", **env))


def _run_from_root(code: str) -> subprocess.CompletedProcess:
    return _run(["-c", code], cwd=REPO)


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


# ----------------------------------------------------------------------------- bench/
def _bench_scripts() -> list:
    """The bench modules that run as scripts and import their siblings (``from bench ...``) or
    carry the bootstrap (photo32_evidence.py: ``bespoke_fast`` from a bare checkout)."""
    return sorted(p for p in BENCH.glob("*.py")
                  if '__name__ == "__main__"' in (text := p.read_text(encoding="utf-8"))
                  and ("from bench" in text or "import _path" in text))


def test_bench_scripts_import_their_siblings_as_the_package():
    """No bench module puts bench/ on ``sys.path``; each script's bootstrap (bench/_path.py, run
    only as a file) comes before its first ``from bench`` import."""
    scripts = _bench_scripts()
    assert len(scripts) >= 6, scripts
    for path in BENCH.glob("*.py"):
        assert "sys.path.insert" not in path.read_text(encoding="utf-8"), path.name
    for path in scripts:
        body = ast.parse(path.read_text(encoding="utf-8")).body
        boot = [i for i, n in enumerate(body) if isinstance(n, ast.If)
                and ast.unparse(n.test) == "not __package__"
                and [ast.unparse(s) for s in n.body] == ["import _path"]]
        first = min([i for i, n in enumerate(body) if isinstance(n, ast.ImportFrom)
                     and (n.module or "").split(".")[0] == "bench"], default=len(body))
        assert boot and boot[0] < first, path.name


@pytest.mark.slow
def test_bench_scripts_run_as_files_from_any_folder_and_as_modules(tmp_path):
    """``python bench/x.py`` from the root or from elsewhere, and ``python -m bench.x`` from the
    root: every script parses its options (``--help``)."""
    for path in _bench_scripts():
        proc = _run([str(path), "--help"], cwd=tmp_path)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (path.name, proc.stderr[-2000:])
    proc = _run(["bench/quality.py", "--help"], cwd=REPO)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
    proc = _run(["-m", "bench.quality", "--help"], cwd=REPO)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


def test_bench_script_refuses_another_bench_package(tmp_path):
    """An installed ``bench`` ahead of the checkout's: one line naming both, not an ImportError."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "__init__.py").write_text("")
    proc = _run([str(BENCH / "quality.py"), "--help"], cwd=tmp_path, PYTHONPATH=str(tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert str(tmp_path / "bench") in proc.stderr and str(BENCH) in proc.stderr, proc.stderr
