"""Every image's commands work with only that image's dependencies: the CLI imports what a
subcommand needs when it runs, never Flower, torch or the Kubernetes client just to build the
parser (the sidecar and operator images ship no torch and no Flower; the sidecar image no
Kubernetes client either)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BLOCKER = Path(__file__).parent / "import_blocker"
# What each image leaves out (images/imagebuild/project.py EXTRAS): sidecar = core only; operator = core +
# k8s; fl = core + fl.
SIDECAR_LACKS = "flwr,torch,kubernetes,kopf,helm_python,sklearn,pandas,neurokit2"
OPERATOR_LACKS = "flwr,torch,helm_python,sklearn,pandas,neurokit2"


def pqfed(args: list[str], blocked: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PQFED_BLOCK_IMPORTS=blocked,
               PYTHONPATH=os.pathsep.join([str(BLOCKER), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "pqfed.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)


def test_the_blocker_really_blocks(tmp_path: Path) -> None:
    env = dict(os.environ, PQFED_BLOCK_IMPORTS="flwr", PYTHONPATH=str(BLOCKER))
    proc = subprocess.run([sys.executable, "-c", "import flwr"], env=env, capture_output=True,
                          text=True, check=False)
    assert proc.returncode != 0
    assert "blocked by the test" in proc.stderr


HELP_ARGS = [["--help"], ["sidecar", "--help"], ["ca", "init", "--help"],
             ["operator", "run", "--help"], ["status", "--help"], ["audit", "verify", "--help"],
             ["selftest", "--help"], ["fl", "--help"]]
# One interpreter for all of them (each start imports the whole parser): exit status per argv.
HELP_SCRIPT = """
import contextlib, io, json, sys
from pqfed.cli import main
out = {}
for argv in json.loads(sys.argv[1]):
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out[" ".join(argv)] = [code, "usage: pqfed" in buf.getvalue()]
print(json.dumps(out))
"""


@pytest.mark.parametrize("blocked", [SIDECAR_LACKS, OPERATOR_LACKS], ids=["sidecar", "operator"])
def test_help_without_optional_dependencies(blocked: str, tmp_path: Path) -> None:
    env = dict(os.environ, PQFED_BLOCK_IMPORTS=blocked, PYTHONPATH=str(BLOCKER))
    proc = subprocess.run([sys.executable, "-c", HELP_SCRIPT, json.dumps(HELP_ARGS)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results == {" ".join(a): [0, True] for a in HELP_ARGS}


def test_ca_and_selftest_run_in_the_sidecar_image_dependency_set(tmp_path: Path) -> None:
    init = pqfed(["ca", "init", "--federation", "fed-img", "--out", str(tmp_path / "ca")],
                 SIDECAR_LACKS, tmp_path)
    assert init.returncode == 0, init.stderr
    issued = pqfed(["ca", "issue", "--ca", str(tmp_path / "ca"), "--node-id", "client-0",
                    "--role", "client", "--out", str(tmp_path / "client-0")],
                   SIDECAR_LACKS, tmp_path)
    assert issued.returncode == 0, issued.stderr
    assert any((tmp_path / "client-0").iterdir())
    st = pqfed(["selftest", "--json"], SIDECAR_LACKS, tmp_path)
    assert st.returncode == 0, st.stderr
    report = json.loads(st.stdout)
    assert report["ok"] is True
    torch_step = next(c for c in report["checks"] if c["name"] == "torch training step")
    assert torch_step["status"] == "not run"
    assert "not installed" in torch_step["detail"]


def test_operator_runtime_imports_without_flower_or_torch(tmp_path: Path) -> None:
    env = dict(os.environ, PQFED_BLOCK_IMPORTS=OPERATOR_LACKS, PYTHONPATH=str(BLOCKER))
    proc = subprocess.run([sys.executable, "-c", "import pqfed.operator.handlers"], env=env,
                          capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_sidecar_runtime_imports_without_kubernetes_flower_or_torch(tmp_path: Path) -> None:
    env = dict(os.environ, PQFED_BLOCK_IMPORTS=SIDECAR_LACKS, PYTHONPATH=str(BLOCKER))
    proc = subprocess.run([sys.executable, "-c",
                           "import pqfed.pqc.sidecar.proxy, pqfed.pqc.sidecar.admin"], env=env,
                          capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


# What each long-lived process of a pod may not import (memory: docs/BENCHMARKS.md "Memory
# footprint"). The sidecar runs beside every container: pyca, asyncio, uvicorn and the
# Prometheus client, nothing of the job spec model, web frameworks or ML. Flower's own
# processes and the fl container's launcher train nothing: no torch.
HEAVY_FOR_SIDECAR = ("numpy", "pydantic", "fastapi", "starlette", "yaml", "flwr", "torch",
                     "kubernetes", "kopf", "matplotlib", "rich")
MODULES_SCRIPT = """
import json, sys
heavy = json.loads(sys.argv[1])
exec(sys.argv[2])
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def imported(code: str, heavy: tuple[str, ...], cwd: Path) -> list[str]:
    """Which of `heavy` are in sys.modules after `code` ran in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-c", MODULES_SCRIPT, json.dumps(heavy), code],
                          cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_sidecar_process_imports_no_spec_model_web_framework_or_ml(tmp_path: Path) -> None:
    """What `pqfed sidecar ...` imports before it serves: its parser (only the pqc commands)
    and the data plane + admin listener."""
    code = ("from pqfed.cli import build_parser, command_modules\n"
            "argv = ['sidecar', '--cert', 'c', '--key', 'k', '--ca', 'a', '--route',"
            " '127.0.0.1:1=127.0.0.1:2']\n"
            "build_parser(command_modules(argv)).parse_args(argv)\n"
            "import pqfed.pqc.sidecar.admin, pqfed.pqc.sidecar.proxy, pqfed.pqc.cli\n")
    assert imported(code, HEAVY_FOR_SIDECAR, tmp_path) == []


def test_fl_launcher_imports_no_torch(tmp_path: Path) -> None:
    """`pqfed fl client|aggregator|edge` (the fl container's entry point) supervises Flower's
    processes; it must not hold torch for the whole job."""
    code = ("from pqfed.cli import build_parser, command_modules\n"
            "argv = ['fl', 'client', '--spec', 'job.yaml', '--index', '0']\n"
            "build_parser(command_modules(argv)).parse_args(argv)\n"
            "import pqfed.services.fl_node, pqfed.services.flower\n")
    assert imported(code, ("torch", "sklearn", "pandas", "kubernetes", "kopf"), tmp_path) == []


@pytest.mark.parametrize("script", ["flower-supernode", "flower-superexec", "flower-superlink"])
def test_flower_processes_import_no_torch(script: str, tmp_path: Path) -> None:
    """SuperNode, both SuperExecs and the SuperLink run through pqfed's launcher with its
    patches installed; none of them trains, so none imports torch (or the task's data)."""
    code = ("import sys\n"
            "from pqfed.services.flower.launch import main\n"
            "try:\n"
            f"    main(['exec', '--poll-cap', '0.1', '--http', 'httptools', '{script}', '--',"
            " '--help'])\n"
            "except SystemExit:\n"
            "    pass\n")
    assert imported(code, ("torch", "sklearn", "pandas", "pqfed.services.models"), tmp_path) == []


def test_edge_upstream_clientapp_imports_no_torch(tmp_path: Path) -> None:
    """An edge's upstream zygote preloads only the ClientApp module (services/fl_node.py): the
    edge relays its clients' updates and trains nothing."""
    assert imported("import pqfed.services.clientapp", ("torch", "pqfed.services.models"),
                    tmp_path) == []
