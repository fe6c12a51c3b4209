"""pqc/native/lib.sh, the helpers the liboqs, X-Wing vector and OpenSSL 3.5 scripts source: a
fetched crate is used only when the registry's checksum matches the pin, and a crate used as a
source archive only when the .crate file itself does.

crates.io is not reachable from the tests, so `cargo` is a stand-in on PATH that writes the
Cargo.lock and metadata a real `cargo fetch` / `cargo metadata` would, with the checksum the
test chooses: what is under test is the script's handling of them.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

LIB = Path(__file__).parents[3] / "pqc" / "native" / "lib.sh"
PIN = "ac6d66ee528a895ce5cc08851698d109c5d7ee5d7a0b3b40d61550eda91e414f"

FAKE_CARGO = """#!/usr/bin/env bash
set -euo pipefail
manifest="${@: -1}"
name="$(sed -n 's/^\\([a-z-]*\\) = { version.*/\\1/p' "$manifest")"
case "$1" in
    fetch) printf '[[package]]\\nname = "%s"\\nversion = "1"\\nchecksum = "%s"\\n' \\
               "$name" "$FAKE_CHECKSUM" >"$(dirname "$manifest")/Cargo.lock" ;;
    metadata) printf '{"packages": [{"name": "%s", "manifest_path": "%s/%s/Cargo.toml"}]}' \\
               "$name" "$FAKE_REGISTRY" "$name" ;;
esac
"""


def _fetch(tmp_path: Path, checksum: str, call: str | None = None,
           pin: str = PIN) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "cargo").write_text(FAKE_CARGO)
    (bin_dir / "cargo").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_CHECKSUM=checksum,
               FAKE_REGISTRY=str(tmp_path / "registry"), PQFED_CACHE=str(tmp_path / "cache"),
               CARGO_HOME=str(tmp_path / "cargo"))
    script = (f'LOG_TAG=test; source "{LIB}"; '
              f'{call or "fetch_crate"} oqs-sys 0.11.0 {pin} "{tmp_path / "work"}"')
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_a_crate_with_the_pinned_checksum_is_used(tmp_path: Path) -> None:
    out = _fetch(tmp_path, PIN)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "registry" / "oqs-sys")
    assert "fetching oqs-sys 0.11.0 from crates.io" in out.stderr


@pytest.mark.parametrize("checksum", ["0" * 64, ""])
def test_a_crate_with_another_checksum_is_refused(tmp_path: Path, checksum: str) -> None:
    out = _fetch(tmp_path, checksum)
    assert out.returncode == 1
    assert out.stdout == ""
    assert f"oqs-sys 0.11.0 checksum is '{checksum}', expected {PIN}" in out.stderr


def test_host_arch_and_the_cache_default() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PQFED_CACHE"}
    out = subprocess.run(["bash", "-c", f'LOG_TAG=t; source "{LIB}"; host_arch; '
                                        'echo "$PQFED_CACHE"'],
                         env=env, capture_output=True, text=True, timeout=60, check=True)
    arch, cache = out.stdout.split()
    assert arch in ("amd64", "arm64")
    assert cache == str(Path.home() / ".cache" / "pqfed")


def _crate(tmp_path: Path, content: bytes) -> Path:
    """A .crate where cargo keeps its downloads ($CARGO_HOME/registry/cache/<index>/)."""
    path = tmp_path / "cargo" / "registry" / "cache" / "index.crates.io-0" / "oqs-sys-0.11.0.crate"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_crate_archive_gives_the_crate_file_with_the_pinned_sha256(tmp_path: Path) -> None:
    crate = _crate(tmp_path, b"the crate as published")
    pin = hashlib.sha256(crate.read_bytes()).hexdigest()
    out = _fetch(tmp_path, pin, "crate_archive", pin)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(crate)


def test_crate_archive_refuses_a_crate_file_changed_after_cargo_checked_it(
        tmp_path: Path) -> None:
    # cargo checks a download once; a .crate replaced in its cache later must not be used.
    pin = hashlib.sha256(b"the crate as published").hexdigest()
    crate = _crate(tmp_path, b"the crate, changed since")
    out = _fetch(tmp_path, pin, "crate_archive", pin)
    assert out.returncode == 1 and out.stdout == ""
    got = hashlib.sha256(crate.read_bytes()).hexdigest()
    assert f"{crate} has sha256 {got}, expected {pin}" in out.stderr


def test_crate_archive_names_a_missing_crate_file(tmp_path: Path) -> None:
    out = _fetch(tmp_path, PIN, "crate_archive")
    assert out.returncode == 1 and out.stdout == ""
    assert "cargo fetched oqs-sys 0.11.0 but its .crate is not in" in out.stderr
