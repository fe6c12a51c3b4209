"""pqc/native/build-liboqs.sh: where it puts the library, its up-to-date check, bad input."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pqfed.pqc.backends.liboqs import BUILT_VERSION, cache_library

SCRIPT = Path(__file__).parents[3] / "pqc" / "native" / "build-liboqs.sh"


def _run(*args: str, cache: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if cache is not None:
        env["PQFED_CACHE"] = str(cache)
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          check=False, timeout=60)


def test_cache_layout_matches_what_the_backend_looks_for(tmp_path: Path) -> None:
    for arch, alias in (("amd64", "x86_64"), ("arm64", "aarch64")):
        out = _run("--arch", alias, "--print-dir", cache=tmp_path)
        assert out.returncode == 0, out.stderr
        assert Path(out.stdout.strip()) == tmp_path / "liboqs" / BUILT_VERSION / arch
    assert cache_library(arch="arm64").parent.name == "arm64"


def test_check_reports_a_missing_or_stale_build(tmp_path: Path) -> None:
    out = _run("--check", cache=tmp_path)
    assert out.returncode == 1 and "is not built" in out.stderr
    built = tmp_path / "liboqs" / BUILT_VERSION / "amd64"
    built.mkdir(parents=True)
    (built / "liboqs.so").write_bytes(b"")
    (built / ".stamp").write_text("built with other options\n")
    assert _run("--check", "--arch", "amd64", cache=tmp_path).returncode == 1  # stale stamp


def test_the_real_build_is_current() -> None:
    assert _run("--check").returncode == 0, "run `make liboqs`"
    assert _run("--check", "--arch", "arm64").returncode == 0, "run `make liboqs-arm64`"


def test_bad_arguments_are_named() -> None:
    out = _run("--arch", "mips")
    assert out.returncode == 1 and "--arch 'mips' is not supported" in out.stderr
    out = _run("--frobnicate")
    assert out.returncode == 1 and "unknown argument: --frobnicate" in out.stderr
