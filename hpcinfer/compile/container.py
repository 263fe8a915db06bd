"""Container images for jobs (DESIGN §9): which CUDA, what to bind, how to build.

- `choose_cuda(driver, pinned)`: the CUDA of the image. The newest entry of CUDA_IMAGES whose
  minimum driver the GPU nodes' driver meets (cluster profile `slurm.cuda_driver`), unless the
  job pins `container.cuda`. torch wheels carry their own CUDA runtime, which runs only on a
  driver at least as new as the one that CUDA release asks for.
- `model_binds(cfg)`: the host paths a container job needs for its model and the HF cache.
  A hub snapshot is a folder of symlinks into `../../blobs/`, so the whole `models--org--name`
  folder is bound, never the snapshot alone.
- `build_image(...)`: `hpcinfer container build`: the wheel of this exact version (built with
  `pip wheel --no-deps` when absent), container.def that copies it in with `%files`, then
  `apptainer build` (or `singularity build`), or the exact command for a machine that has one.
Login side: stdlib only (subprocess for pip, git and the container runtime).
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CudaImage:
    cuda: str            # "12.4"
    min_driver: str      # Linux driver the CUDA toolkit release notes ask for
    base_image: str      # docker image the definition bootstraps from
    torch_index: str     # PyTorch wheel index with torch built for this CUDA


# Oldest first. Minimum drivers from NVIDIA's CUDA toolkit release notes (table 3).
CUDA_IMAGES = (
    CudaImage("11.8", "520.61.05", "nvidia/cuda:11.8.0-cudnn8-runtime-ubuntu22.04",
              "https://download.pytorch.org/whl/cu118"),
    CudaImage("12.1", "530.30.02", "nvidia/cuda:12.1.1-cudnn8-runtime-ubuntu22.04",
              "https://download.pytorch.org/whl/cu121"),
    CudaImage("12.4", "550.54.14", "nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04",
              "https://download.pytorch.org/whl/cu124"),
    CudaImage("12.6", "560.28.03", "nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04",
              "https://download.pytorch.org/whl/cu126"),
    CudaImage("12.8", "570.26", "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04",
              "https://download.pytorch.org/whl/cu128"),
)
DEFAULT_CUDA = "12.4"
WHEEL_DIR_IN_IMAGE = "/opt/hpcinfer/wheels"


class ContainerError(ValueError):
    """A container setting that cannot work; str() says what to write instead."""


def _version_key(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.strip().split("."))
    except ValueError:
        raise ContainerError(f"{version!r} is not a version number") from None


def choose_cuda(driver: str | None, pinned: str | None = None) -> CudaImage:
    """The image for a pinned CUDA version, else the newest one `driver` can run."""
    by_version = {image.cuda: image for image in CUDA_IMAGES}
    if pinned is not None:
        if str(pinned) not in by_version:
            raise ContainerError(f"no image for CUDA {pinned}; choose one of "
                                 f"{', '.join(by_version)}")
        return by_version[str(pinned)]
    if not driver:
        return by_version[DEFAULT_CUDA]
    have = _version_key(str(driver))
    usable = [image for image in CUDA_IMAGES if _version_key(image.min_driver) <= have]
    if not usable:
        oldest = CUDA_IMAGES[0]
        raise ContainerError(f"driver {driver} is older than CUDA {oldest.cuda} needs "
                             f"({oldest.min_driver}); ask the site which CUDA its GPU nodes run")
    return usable[-1]


def model_binds(model_paths: list[str], hf_home: str | None, hub_cache: str) -> list[str]:
    """Bind sources for the model directories and the HF cache, none inside another.

    `model_paths` are absolute model/tokenizer directories from the resolved config.
    """
    from hpcinfer.hub.offline import ResolvedModel
    wanted = []
    for path in (hf_home, hub_cache):
        if path and os.path.isdir(path):
            wanted.append(os.path.abspath(path))
    for path in model_paths:
        if os.path.isdir(path):
            wanted.append(ResolvedModel(id=path, revision=None, commit=None, path=path).bind_path)
    binds: list[str] = []
    for path in sorted(set(wanted), key=len):
        if not any(path == b or path.startswith(b.rstrip("/") + "/") for b in binds):
            binds.append(path)
    return binds


def source_commit() -> str:
    """The git commit hpcinfer runs from ("+dirty" with local changes), else "unknown"."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return "unknown"
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def default_wheel_path(job_dir: str, version: str) -> Path:
    return Path(job_dir) / f"hpcinfer-{version}-py3-none-any.whl"


def check_wheel(wheel: Path, version: str) -> Path:
    """An existing hpcinfer wheel of exactly `version` (absolute), or ContainerError."""
    wheel = Path(os.path.abspath(wheel))
    parts = wheel.name.split("-")
    if wheel.suffix != ".whl" or len(parts) < 3 or parts[0] != "hpcinfer":
        raise ContainerError(f"{wheel} is not an hpcinfer wheel (hpcinfer-VERSION-...whl)")
    if parts[1] != version:
        raise ContainerError(f"{wheel.name} is hpcinfer {parts[1]}, but the job was rendered by "
                             f"{version}: pass the wheel of {version}, or leave --wheel out to "
                             "build it")
    if not wheel.is_file():
        raise ContainerError(f"wheel {wheel} does not exist: leave --wheel out to build it")
    if any(c.isspace() for c in str(wheel)):
        # %files splits its lines on whitespace: such a path cannot be written there.
        raise ContainerError(f"wheel path {str(wheel)!r} has whitespace, which a definition's "
                             "%files cannot hold: copy the wheel to a plain path, pass --wheel")
    return wheel


def wheel_build_command(out_dir: Path, version: str) -> list[str]:
    """`pip wheel --no-deps` of this source tree, or of `hpcinfer==version` from the index."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    source = str(root) if pyproject.is_file() and 'name = "hpcinfer"' in pyproject.read_text() \
        else f"hpcinfer=={version}"
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir",
            str(out_dir), source]


def build_wheel(out_dir: Path, version: str) -> Path:
    command = wheel_build_command(out_dir, version)
    log.info("building the hpcinfer wheel: %s", shlex.join(command))
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])
        raise ContainerError(f"`{shlex.join(command)}` failed ({tail}): build the wheel yourself "
                             "and pass it with --wheel")
    found = sorted(out_dir.glob(f"hpcinfer-{version}-*.whl"))
    if not found:
        raise ContainerError(f"pip built no hpcinfer-{version} wheel in {out_dir}: the source "
                             "tree is another version; pass the right wheel with --wheel")
    return found[-1]


def find_runtime(preferred: str | None = None) -> str | None:
    """apptainer or singularity on PATH (the job's runtime first)."""
    names = [preferred] if preferred else []
    names += [n for n in ("apptainer", "singularity") if n != preferred]
    return next((n for n in names if shutil.which(n)), None)


def build_command(runtime: str, image: Path, definition: Path) -> list[str]:
    # Unprivileged builds need --fakeroot (Apptainer >= 1.1 falls back to it by itself,
    # SingularityCE does not); root needs nothing.
    fakeroot = ["--fakeroot"] if os.geteuid() != 0 else []
    return [runtime, "build", *fakeroot, str(image), str(definition)]


def build_image(job_dir: Path, *, wheel: Path | None = None, image: Path | None = None,
                run: bool = True) -> tuple[list[str], bool]:
    """Write container.def into `job_dir` and build the image when a runtime is here.

    Returns (the build command, whether it ran). Raises ContainerError on a bad wheel or a
    failed build.
    """
    from hpcinfer.compile.jobdir import atomic_write, load_plan
    from hpcinfer.compile.render import render_container_def
    plan = load_plan(job_dir)
    if wheel is None:
        wheel = default_wheel_path(plan.job_dir, plan.version)
        if not wheel.is_file():
            wheel = build_wheel(Path(plan.job_dir), plan.version)
    wheel = check_wheel(wheel, plan.version)
    definition = Path(plan.job_dir) / "container.def"
    atomic_write(definition, render_container_def(plan, wheel=str(wheel), commit=source_commit()))
    image = Path(os.path.abspath(image or Path(plan.job_dir) / f"hpcinfer-{plan.version}.sif"))
    runtime = find_runtime(plan.container.runtime if plan.container else None)
    command = build_command(runtime or (plan.container.runtime if plan.container else "apptainer"),
                            image, definition)
    if runtime is None or not run:
        return command, False
    log.info("building %s: %s", image, shlex.join(command))
    proc = subprocess.run(command, cwd=plan.job_dir)
    if proc.returncode != 0:
        raise ContainerError(f"`{shlex.join(command)}` failed (exit {proc.returncode}); its "
                             "output is above")
    return command, True
