"""A CPU rehearsal of the GPU machine's image, so that the first real GPU run runs its tests.

The GPU image has torch, triton, numpy, safetensors and pytest (+ pip, and here setuptools to
exercise the pip install), no diffusers, flow_matching, matplotlib or scikit-learn, and no
package registry. This builds such an environment from the packages installed here (a venv
whose site-packages links only those distributions and what they require; nothing is
downloaded, ``PIP_NO_INDEX=1``) and checks in it:

* ``pip install --no-deps --no-build-isolation -e .`` installs ``bespoke_fast.kernels``;
* ``bash bench/gpu_check.sh --dry-run OUT`` goes through every stage, with ``python3`` alone on
  the PATH, and leaves its outputs packed in ``OUT/gpu_check.tgz``;
* ``BESPOKE_FAST_GPU_TESTS=1 python -m pytest -m gpu --collect-only tests`` collects with no
  error and finds every GPU test this environment's full collection finds.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path
from xml.etree import ElementTree

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
# what the GPU image has (see bench/gpu_check.sh); pip and setuptools >= 64 for the pip install
IMAGE_PACKAGES = ("torch", "triton", "numpy", "safetensors", "pytest", "pip", "setuptools")
ABSENT = ("diffusers", "flow_matching", "matplotlib", "sklearn", "torchdiffeq", "transformers")

pytestmark = pytest.mark.slow


def _closure(names) -> list:
    """The installed distributions ``names`` need, requirements included (extras left out)."""
    from packaging.requirements import Requirement
    found, stack = {}, list(names)
    while stack:
        name = stack.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in found:
            continue
        try:
            found[key] = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            pytest.skip(f"the GPU image rehearsal needs {name!r} installed here")
        for text in found[key].requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
    return list(found.values())


def _image_env(venv: Path, **extra) -> dict:
    """The environment a command in the image venv runs with: no index, no PYTHONPATH, no
    interpreter of ours on the PATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TRITON_INTERPRET", "PYTHONHOME")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1",
               PATH=os.pathsep.join([str(venv / "bin"), *_path_without_python()]), **extra)
    return env


def _path_without_python() -> list:
    """PATH without the folders that hold a ``python`` (the image's interpreter is python3)."""
    return [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not os.access(os.path.join(d, "python"), os.X_OK)]


def _make_image(venv: Path) -> Path:
    """A venv at ``venv`` holding only the image's packages; returns its python3."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   capture_output=True, timeout=300)
    site = Path(subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    for dist in _closure(IMAGE_PACKAGES):
        base = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src, dst = base / top, site / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
    # the image has python3 only (gpu_check.sh must cope); python3 -> python in a venv
    python3 = venv / "bin" / "python3"
    base = python3.resolve()
    for name in ("python", "python3"):
        (venv / "bin" / name).unlink()
    python3.symlink_to(base)
    probe = subprocess.run([str(python3), "-c", "import importlib.util as u, sys; "
                            f"print([m for m in {ABSENT!r} if u.find_spec(m)])"],
                           cwd="/", capture_output=True, text=True, env=_image_env(venv))
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", probe.stdout + probe.stderr
    return python3


@pytest.fixture(scope="module")
def bare_image(tmp_path_factory):
    """``(venv folder, its python3)``: the image as it comes, bespoke_fast not installed."""
    venv = tmp_path_factory.mktemp("gpu_image_bare") / "venv"
    return venv, _make_image(venv)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """``(venv folder, its python3, pip's result)``: the image after the GPU check's first
    step, ``pip install --no-deps --no-build-isolation -e .`` with no package index."""
    venv = tmp_path_factory.mktemp("gpu_image") / "venv"
    python3 = _make_image(venv)
    proc = subprocess.run([str(python3), "-m", "pip", "install", "--no-deps",
                           "--no-build-isolation", "-e", str(REPO)], cwd=venv.parent,
                          env=_image_env(venv), capture_output=True, text=True, timeout=300)
    return venv, python3, proc


def test_pip_installs_the_kernels_without_index_or_isolation(image):
    venv, python3, pip = image
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    where = subprocess.run([str(python3), "-c", "import bespoke_fast.kernels as k, "
                            "bespoke_fast.engine; print(k.__file__); print(k.rk2_stage2)"],
                           cwd=venv.parent, env=_image_env(venv), capture_output=True, text=True,
                           timeout=300)
    assert where.returncode == 0, where.stderr[-2000:]
    assert str(REPO / "kernels" / "bespoke_fast_kernels") in where.stdout


def test_dry_run_goes_through_every_stage_and_packs_every_file(bare_image, tmp_path):
    """The dry run takes the no-pip path (a shadow package), as a real run does when pip fails."""
    venv, _ = bare_image
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=REPO,
                          env=_image_env(venv), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # three files come back from a GPU machine (it returns at most 8): everything is packed
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tgz", "status.txt", "summary.md"], \
        proc.stdout[-3000:]
    with tarfile.open(out / "gpu_check.tgz") as tar:
        tar.extractall(tmp_path / "all", filter="data")
    files = tmp_path / "all"
    status = (files / "status.txt").read_text()
    for stage in ("install", "gpu-tests", "kernels", "throughput", "render"):
        assert re.search(rf"^{stage}\s", status, re.M), status
    assert "FAILED" not in status and "TIMED OUT" not in status, status
    for name in ("env.txt", "plan.txt", "pytest_gpu.txt", "pytest_gpu.xml", "kernels.json",
                 "kernels.md", "throughput.json", "throughput.md", "summary.md"):
        assert (files / name).stat().st_size > 0, name
    env_txt = (files / "env.txt").read_text()
    # no `python` on the PATH: the script must have found the image's python3
    assert f"interpreter: python3 ({venv / 'bin' / 'python3'})\n" in env_txt, env_txt
    assert "diffusers: NOT AVAILABLE" in env_txt          # the image's environment, truly
    plan = (files / "plan.txt").read_text()  # (the real run's caps: test_gpu_check.py)
    assert "time plan:" in plan and re.search(r"worst case: .*= \d+s", plan), plan
    pytest_log = (files / "pytest_gpu.txt").read_text()
    assert not _errors(pytest_log), pytest_log[-2000:]
    suite = ElementTree.parse(files / "pytest_gpu.xml").getroot().find("testsuite")
    # every GPU test was collected from the shadow package (they skip: no CUDA here)
    assert int(suite.get("errors")) == 0 and int(suite.get("tests")) >= 30, suite.attrib
    kernels = json.loads((files / "kernels.json").read_text())
    assert len(kernels) == 14 and all(r["median_ms"] is not None for r in kernels)  # kernel path
    rows = json.loads((files / "throughput.json").read_text())
    assert any(r.get("row") == "fast: reference" and r.get("median_ms") for r in rows)
    notes = " ".join(r["text"] for r in rows if r.get("kind") == "note")
    assert "'launch' skipped" in notes and "'compute' skipped" in notes
    summary = (out / "summary.md").read_text()
    assert "kernels" in summary.lower() and "throughput" in summary.lower()
    # the one-screen summary is the last thing printed
    tail = proc.stdout.rstrip().splitlines()
    assert len(tail) > 3 and tail[-1].startswith("all outputs:"), tail[-5:]
    assert any("gpu_check summary" in line for line in tail[-60:])


def _errors(pytest_output: str) -> list:
    """pytest's error lines: ``ERROR collecting ...`` / ``ERROR tests/...`` and "N error(s)"."""
    return re.findall(r"^ERROR .*$|\b\d+ errors?\b", pytest_output, re.M)


def _gpu_tests(cmd, cwd, env) -> set:
    proc = subprocess.run(cmd + ["-m", "pytest", "-m", "gpu", "--collect-only",
                                 "-p", "no:cacheprovider", "tests"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not _errors(proc.stdout), proc.stdout[-3000:]
    return {line for line in proc.stdout.splitlines() if line.startswith("tests/")}


def test_gpu_tests_collect_in_the_image_and_none_is_missing(image):
    venv, python3, pip = image
    assert pip.returncode == 0, pip.stderr[-2000:]
    in_image = _gpu_tests([str(python3)], REPO, _image_env(venv, BESPOKE_FAST_GPU_TESTS="1"))
    here = _gpu_tests([sys.executable], REPO,
                      dict(os.environ, BESPOKE_FAST_GPU_TESTS="1", OMP_NUM_THREADS="1"))
    assert in_image and in_image == here, sorted(here ^ in_image)[:20]
    files = {t.split("::")[0] for t in in_image}
    assert {"tests/test_kernels.py", "tests/test_engine.py", "tests/test_capture.py",
            "tests/test_zoo_trained.py"} <= files, files


def test_every_cuda_only_test_is_marked_gpu(request):
    """A test that skips without CUDA (or without compiled kernels) and has no ``gpu`` marker
    runs nowhere: CI has no CUDA, and the GPU check runs only ``-m gpu``."""
    items = request.session.items
    if len({item.path for item in items}) < 10:
        pytest.skip("checks the whole suite's collection: run `python -m pytest tests`")
    unmarked = []
    for item in items:
        for mark in item.iter_markers("skipif"):
            reason = str(mark.kwargs.get("reason", ""))
            if re.search(r"CUDA|compiled kernels", reason) and not item.get_closest_marker("gpu"):
                unmarked.append(item.nodeid)
    assert not unmarked, f"CUDA-only tests without the gpu marker: {sorted(set(unmarked))}"
