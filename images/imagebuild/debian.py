"""The ``base`` layer: Debian packages extracted by ``mmdebstrap --variant=extract`` (no
maintainer script runs, so a foreign architecture needs no emulator), the non-root user,
a writable /tmp and the /opt/pqfed virtualenv around Debian's python3."""

from __future__ import annotations

import email.parser
import shutil
import tempfile
from pathlib import Path

from imagebuild.layers import Stage, compile_pyc, open_stage, save_stage, write_layer
from imagebuild.project import (
    DEBIAN_MIRROR,
    DEBIAN_PACKAGES,
    DEBIAN_SECURITY,
    DEBIAN_SUITE,
    DPKG_EXCLUDES,
    DPKG_INCLUDES,
    FORMAT,
    PYVER,
    SITE,
    UID,
    BuildError,
    digest_of,
    log,
    run,
)


def build_base(cache: Path, arch: str, epoch: int) -> Stage:
    key = digest_of(FORMAT, "base", arch, DEBIAN_PACKAGES, DEBIAN_SUITE, DEBIAN_MIRROR,
                    DEBIAN_SECURITY, DPKG_EXCLUDES, DPKG_INCLUDES, UID)[:20]
    where = cache / f"base-{arch}-{key}"
    if (hit := open_stage(where, f"base {arch}")) is not None:
        return hit
    log(f"base {arch}: mmdebstrap --variant=extract {','.join(DEBIAN_PACKAGES)}")
    with tempfile.TemporaryDirectory(dir=cache, prefix="tmp-rootfs-") as tmp:
        root = Path(tmp) / "root"
        opts = [f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES]
        opts += [f"--dpkgopt=path-include={p}" for p in DPKG_INCLUDES]
        run(["mmdebstrap", "--quiet", "--variant=extract", f"--arch={arch}",
             f"--include={','.join(DEBIAN_PACKAGES)}", "--skip=cleanup/apt/cache", *opts,
             DEBIAN_SUITE, str(root),
             f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE} main",
             f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE}-updates main",
             f"deb {DEBIAN_SECURITY} {DEBIAN_SUITE}-security main"],
            capture_output=True)
        packages = _debian_packages(root)
        _finish_base(root, packages)
        compile_pyc(root, f"usr/lib/python{PYVER}")
        layer = write_layer(root, where / "blob", epoch, f"Debian {DEBIAN_SUITE}: "
                            + ", ".join(DEBIAN_PACKAGES) + " (mmdebstrap --variant=extract)")
    return save_stage(where, Stage([layer], packages))


def _debian_packages(root: Path) -> list[dict[str, str]]:
    """Control fields of every .deb that was extracted (what dpkg's status would hold)."""
    debs = sorted((root / "var/cache/apt/archives").glob("*.deb"))
    if not debs:
        raise BuildError("mmdebstrap left no .deb files: is the Debian mirror reachable?")
    out = []
    for deb in debs:
        fields = run(["dpkg-deb", "-f", str(deb)], capture_output=True).stdout
        msg = email.parser.Parser().parsestr(fields)
        out.append({k: v for k, v in msg.items()})
    for deb in debs:
        deb.unlink()
    return out


def _finish_base(root: Path, packages: list[dict[str, str]]) -> None:
    # dpkg status: the packages are unpacked, their maintainer scripts never ran (extract).
    status = []
    keep = ("Package", "Version", "Architecture", "Multi-Arch", "Source", "Maintainer",
            "Installed-Size", "Depends", "Pre-Depends", "Provides", "Homepage", "Description")
    for pkg in packages:
        lines = [f"Package: {pkg['Package']}", "Status: install ok unpacked"]
        lines += [f"{k}: {pkg[k]}" for k in keep[1:] if k in pkg]
        status.append("\n".join(lines))
    (root / "var/lib/dpkg").mkdir(parents=True, exist_ok=True)
    (root / "var/lib/dpkg/status").write_text("\n\n".join(status) + "\n")
    for junk in ("var/cache/apt", "var/lib/apt", "var/log", "dev", "etc/apt"):
        shutil.rmtree(root / junk, ignore_errors=True)
    # base-passwd's postinst would write these; extract mode runs none.
    etc = root / "etc"
    (etc / "passwd").write_text("root:x:0:0:root:/root:/usr/sbin/nologin\n"
                                f"pqfed:x:{UID}:{UID}:pqfed:/home/pqfed:/usr/sbin/nologin\n"
                                "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    (etc / "group").write_text(f"root:x:0:\npqfed:x:{UID}:\nnogroup:x:65534:\n")
    (etc / "hostname").write_text("pqfed\n")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n")
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files dns\n")
    for d, mode in (("tmp", 0o1777), ("home/pqfed", 0o755), ("root", 0o700), ("proc", 0o755),
                    ("sys", 0o755), ("dev", 0o755), ("run", 0o755), ("opt/pqfed/bin", 0o755),
                    (SITE, 0o755)):
        (root / d).mkdir(parents=True, exist_ok=True)
        (root / d).chmod(mode)
    # /opt/pqfed is a virtualenv (what `python3 -m venv --without-pip` writes): console scripts
    # live beside its python, where the Flower launcher looks for them (sys.executable's dir).
    (root / "opt/pqfed/pyvenv.cfg").write_text(
        f"home = /usr/bin\ninclude-system-site-packages = false\nversion = {PYVER}\n"
        "executable = /usr/bin/python3.11\n")
    for name in ("python3", "python", f"python{PYVER}"):
        (root / "opt/pqfed/bin" / name).symlink_to(f"/usr/bin/python{PYVER}")
    (root / "opt/pqfed/lib64").symlink_to("lib")
