"""`make dist`: the source release holds exactly what git tracks, and works once unpacked.

Builds the tarball and the zip into a temporary directory with the Makefile's own target, compares them with
each other and with `git ls-files`, then unpacks the tarball elsewhere and runs its entry points from there
with this virtual environment's Python. Lint and tests run on the repository itself (CI), not on the copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from tools import dist

ROOT = Path(__file__).resolve().parents[1]
# Build outputs and environments that must never be in a release, anywhere in the tree.
FORBIDDEN_PARTS = {"models", "data", "reports", "runs", "dist", "build", ".venv", "venv", "__pycache__", ".git",
                   ".pytest_cache", ".ruff_cache", "samples"}

pytestmark = pytest.mark.skipif(not dist.in_git_checkout(ROOT),
                                reason="not a git checkout: the release is built from the files git tracks")


def make_dist(out: Path) -> list[Path]:
    run = subprocess.run(["make", "-s", "dist", f"DIST_DIR={out}", f"PYTHON={sys.executable}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    return sorted(out.iterdir())


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dist")
    files = make_dist(out)
    top = files[1].name.removesuffix(".tar.gz")
    assert [f.name for f in files] == [f"{top}.sha256", f"{top}.tar.gz", f"{top}.zip"]
    version = top.removeprefix("mnist-serving-")
    return {"version": version, "top": top, "sha256": files[0], "tar": files[1], "zip": files[2]}


@pytest.fixture(scope="module")
def tar_members(release) -> dict[str, bytes | None]:
    """Path -> content (None for a directory) of every member of the tarball."""
    with tarfile.open(release["tar"]) as tar:
        return {m.name: tar.extractfile(m).read() if m.isfile() else None for m in tar.getmembers()}


@pytest.fixture(scope="module")
def zip_members(release) -> dict[str, bytes | None]:
    with zipfile.ZipFile(release["zip"]) as zf:
        return {i.filename.rstrip("/"): None if i.is_dir() else zf.read(i) for i in zf.infolist()}


def test_name_is_pyprojects_version_and_the_commit(release):
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    assert release["version"].startswith(f"{dist.project_version(ROOT)}+g{commit}")
    assert release["version"].removeprefix(f"{dist.project_version(ROOT)}+g{commit}") in ("", ".dirty")


def test_tarball_and_zip_hold_the_same_files_with_the_same_bytes(tar_members, zip_members):
    assert tar_members == zip_members


def test_checksums_file_matches_the_archives(release):
    expected = {f"{hashlib.sha256(release[k].read_bytes()).hexdigest()}  {release[k].name}" for k in ("tar", "zip")}
    assert set(release["sha256"].read_text().splitlines()) == expected


def test_one_top_level_directory_with_build_instructions(release, tar_members):
    top = release["top"]
    assert {PurePosixPath(name).parts[0] for name in tar_members} == {top}
    build_md = tar_members[f"{top}/BUILD.md"].decode()
    assert release["version"] in build_md
    for command in ("make venv", "make all", "make test", "python -m training.train", "python -m serving.server",
                    "docker compose up", "kubectl apply -k k8s/"):
        assert command in build_md


def test_exactly_the_tracked_files_and_no_build_output(release, tar_members):
    top = release["top"]
    files = {name.removeprefix(f"{top}/") for name, data in tar_members.items() if data is not None}
    tracked = {entry.path for entry in dist.tracked_files(ROOT)}
    assert files == tracked | {"BUILD.md"}
    for name in tar_members:
        parts = set(PurePosixPath(name).parts)
        assert not parts & FORBIDDEN_PARTS, name
        assert not name.endswith((".pyc", ".keras", ".pb", ".whl", ".log")), name
    for must in ("README.md", "requirements.txt", "Makefile", "docker-compose.yml", "serving/models.config",
                 "training/train.py", "serving/server.py", "client/predict.py", "tests/test_model.py"):
        assert must in files


def test_executable_bits_survive(release):
    with tarfile.open(release["tar"]) as tar:
        run = tar.getmember(f"{release['top']}/.ci/run")
        readme = tar.getmember(f"{release['top']}/README.md")
        assert (run.mode, readme.mode, run.uid, run.uname) == (0o755, 0o644, 0, "")


def test_a_rebuild_is_byte_identical(release, tmp_path):
    rebuilt = make_dist(tmp_path)
    built = [release["sha256"], release["tar"], release["zip"]]
    assert [f.name for f in rebuilt] == [f.name for f in built]
    for archive, again in zip(built, rebuilt):
        assert again.read_bytes() == archive.read_bytes(), archive.name


@pytest.fixture(scope="module")
def unpacked(release, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(release["tar"]) as tar:
        tar.extractall(target, filter="data")
    return target / release["top"]


def run_in(tree: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A command in the unpacked tree with this virtual environment's Python, nothing of the checkout on its path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONSTARTUP") and not k.startswith(("COV_CORE_", "COVERAGE_"))}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return subprocess.run([sys.executable, *argv], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


# One Python process, so one TensorFlow import (most of the time here): the parts import from the unpacked
# tree, and the training and serving entry points, found there too, answer --help.
ENTRY_POINTS = ("training.train", "serving.server")
CHECK_UNPACKED = """
import importlib, importlib.util, json, runpy, sys
found = {name: importlib.import_module(name).__file__
         for name in ("client.predict", "client.mnist_client", "training.model", "tools.dist")}
found |= {name: importlib.util.find_spec(name).origin for name in sys.argv[1:]}
print("imported", json.dumps(found))
for entry_point in sys.argv[1:]:
    sys.argv = [entry_point, "--help"]
    try:
        runpy.run_module(entry_point, run_name="__main__")
    except SystemExit as exit:
        assert exit.code in (0, None), (entry_point, exit.code)
"""


def test_unpacked_release_imports_from_itself_and_its_entry_points_answer(unpacked):
    run = run_in(unpacked, "-c", CHECK_UNPACKED, *ENTRY_POINTS, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [line] = [line for line in run.stdout.splitlines() if line.startswith("imported ")]
    for name, path in json.loads(line.removeprefix("imported ")).items():
        assert unpacked in Path(path).parents, (name, path)
    assert "--export-dir" in run.stdout  # training.train's usage
    assert "--model_base_path" in run.stdout  # serving.server's, TF Serving's flags


def test_unpacked_client_cli_answers(unpacked):
    run = run_in(unpacked, "client/predict.py", "--help")
    assert run.returncode == 0 and "--protocol" in run.stdout, run.stderr
