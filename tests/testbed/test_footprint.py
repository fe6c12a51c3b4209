"""The footprint benchmark's pieces: reading PSS, telling the roles of a federation's processes
apart, summarising steady state and peak, separating qemu-user's own memory."""

from __future__ import annotations

import os

import pytest

from pqfed.testbed.bench import footprint as fp

PY = "/venv/bin/python"
RUN = "/runs/job-1"


def _procs() -> dict[int, fp.Proc]:
    """The process tree of `pqfed run` (pid 10) with one client and the aggregator, as the
    command lines of services/runner.py and services/flower/processes.py build them."""
    rows = [
        (10, 1, [PY, "-m", "pqfed.cli", "run", "job.yaml"]),
        (11, 10, [PY, "-m", "pqfed.cli", "sidecar", "--cert",
                  f"{RUN}/identities/aggregator/tls.crt", "--listen", "127.0.0.1:7443"]),
        (12, 10, [PY, "-m", "pqfed.cli", "fl", "aggregator", "--spec", "job.yaml"]),
        (13, 12, [PY, "-m", "pqfed.services.flower", "exec", "--poll-cap", "0.1", "--http",
                  "httptools", "flower-superlink", "--", "--insecure", "--host", "127.0.0.1",
                  "--port", "9092"]),
        (14, 12, [PY, "/venv/bin/flower-superexec", "--insecure", "--runtime-api-address",
                  "127.0.0.1:9092"]),
        (15, 14, [PY, "-m", "pqfed.services.flower", "exec", "--poll-cap", "0.1",
                  "flwr-serverapp", "--", "--runtime-api-address", "127.0.0.1:9092"]),
        (16, 12, [PY, "/venv/bin/flwr", "run", "app", "pqfed"]),
        (20, 10, [PY, "-m", "pqfed.cli", "sidecar", "--cert",
                  f"{RUN}/identities/client-0/tls.crt", "--route", "127.0.0.1:1=x:2@aggregator"]),
        (21, 10, [PY, "-m", "pqfed.cli", "fl", "client", "--spec", "job.yaml", "--index", "0"]),
        (22, 21, [PY, "-m", "pqfed.services.flower", "zygote", "--socket", "/tmp/s.sock",
                  "--preload", "torch"]),
        (23, 21, [PY, "-m", "pqfed.services.flower", "exec", "--poll-cap", "0.1",
                  "flower-supernode", "--", "--insecure", "--superlink", "127.0.0.1:1",
                  "--port", "9094"]),
        (24, 21, [PY, "/venv/bin/flower-superexec", "--insecure", "--runtime-api-address",
                  "127.0.0.1:9094"]),
        (25, 24, [PY, "-I", "-S", "-c", "# flwr-clientapp shim", "/tmp/s.sock", "--token"]),
        (26, 22, [PY, "-m", "pqfed.services.flower", "zygote", "--socket", "/tmp/s.sock",
                  "--preload", "torch"]),
        (99, 1, [PY, "-m", "pqfed.cli", "sidecar", "--cert", "/elsewhere/tls.crt"]),
    ]
    return {pid: fp.Proc(pid, ppid, tuple(cmd)) for pid, ppid, cmd in rows}


def test_roles_and_owners_of_a_federation() -> None:
    roles = fp.classify(10, _procs())
    assert roles == {
        11: ("aggregator", fp.SIDECAR), 12: ("aggregator", fp.LAUNCHER),
        13: ("aggregator", fp.SUPERLINK), 14: ("aggregator", fp.SERVERAPP_EXEC),
        15: ("aggregator", fp.SERVERAPP), 16: ("aggregator", fp.FLWR_CLI),
        20: ("client-0", fp.SIDECAR), 21: ("client-0", fp.LAUNCHER),
        22: ("client-0", fp.ZYGOTE), 23: ("client-0", fp.SUPERNODE),
        24: ("client-0", fp.CLIENTAPP_EXEC), 25: ("client-0", fp.SHIM),
        26: ("client-0", fp.CLIENTAPP),  # forked by the zygote: same command line
    }  # 99 is not under `pqfed run`: not sampled


def test_an_edge_has_both_superexecs() -> None:
    procs = {
        1: fp.Proc(1, 0, (PY, "-m", "pqfed.cli", "run", "j")),
        2: fp.Proc(2, 1, (PY, "-m", "pqfed.cli", "fl", "edge", "--index", "1")),
        3: fp.Proc(3, 2, (PY, "-m", "pqfed.services.flower", "exec", "flower-superlink", "--",
                          "--port", "7001")),
        4: fp.Proc(4, 2, ("flower-superexec", "--runtime-api-address", "127.0.0.1:7001")),
        5: fp.Proc(5, 2, ("flower-superexec", "--runtime-api-address", "127.0.0.1:7002")),
    }
    roles = fp.classify(1, procs)
    assert roles[4] == ("edge-1", fp.SERVERAPP_EXEC)
    assert roles[5] == ("edge-1", fp.CLIENTAPP_EXEC)
    assert fp.owner_kind("edge-1") == "edge"


def test_pss_of_this_process() -> None:
    mem = fp.read_memory(os.getpid())
    assert mem is not None
    assert 0 < mem.pss <= mem.rss
    assert mem.pss_anon + mem.pss_file <= mem.pss + 4096
    assert fp.read_memory(2**22 + 1) is None  # beyond pid_max: gone


def test_rollup_and_breakdown_parse_the_kernel_format() -> None:
    rollup = "55b1-7ffc ---p 00000000 00:00 0  [rollup]\nRss:   1604 kB\nPss:   200 kB\n" \
             "Pss_Anon:  116 kB\nPss_File:   84 kB\nSwapPss:  9 kB\n"
    assert fp.parse_rollup(rollup) == fp.Memory(200 * 1024, 116 * 1024, 84 * 1024,
                                                1604 * 1024)
    smaps = "\n".join([
        "7f00-7f10 r-xp 00000000 fd:01 1 /v/site-packages/torch/lib/libtorch_cpu.so",
        "Size: 100 kB", "Pss: 50 kB", "SwapPss: 7 kB",
        "7f10-7f20 r--p 00000000 fd:01 2 /v/site-packages/nvidia/cu13/lib/libcublasLt.so.13",
        "Pss: 30 kB",
        "7f20-7f30 r-xp 00000000 fd:01 3 /v/site-packages/torch/lib/libtorch_cuda.so",
        "Pss: 5 kB",
        "7f30-7f40 r-xp 00000000 fd:01 4 /v/site-packages/numpy/_core/_multiarray_umath.so",
        "Pss: 4 kB",
        "7f40-7f50 rw-p 00000000 00:00 0 [heap]", "Pss: 20 kB",
        "7f50-7f60 rw-p 00000000 00:00 0 ", "Pss: 3 kB", "VmFlags: rd wr mr mw me ac",
        "7f60-7f70 r--p 00000000 fd:01 5 /usr/lib/locale/C.utf8/LC_CTYPE", "Pss: 1 kB",
    ])
    assert fp.breakdown(smaps) == {"torch": 50 * 1024, "cuda": 35 * 1024,
                                   "python-ext": 4 * 1024, "anon": 23 * 1024, "file": 1024,
                                   "torch_mapped": 1, "cuda_mapped": 2}


def test_qemu_share_counts_the_emulator_heap_and_code_buffer_only() -> None:
    smaps = "\n".join([
        "5500-5600 r-xp 00000000 fd:01 1 /usr/libexec/qemu-binfmt/aarch64-binfmt-P",
        "Pss: 4000 kB",
        "5600-5700 rw-p 00000000 00:00 0 [heap]", "Pss: 1000 kB",
        "7000-7100 rwxp 00000000 00:00 0 ", "Pss: 300 kB",
        "4000-4100 r-xp 00000000 fd:01 2 /rootfs/usr/lib/libtorch_cpu.so", "Pss: 9000 kB",
        "4100-4200 rw-p 00000000 00:00 0 ", "Pss: 700 kB",
    ])
    assert fp.qemu_share(smaps) == (4000 + 1000 + 300) * 1024


def _sample(t: float, rows: list[tuple[str, str, int]]) -> fp.Sample:
    return fp.Sample(t, [[i, owner, role, pss, 0, 0, pss] for i, (owner, role, pss)
                         in enumerate(rows)])


def test_steady_is_the_median_after_the_first_round_and_peak_the_maximum() -> None:
    mib = fp.MIB
    rec = fp.Recording(samples=[
        _sample(0, [("client-0", fp.ZYGOTE, 900 * mib)]),  # start-up: in the peak only
        _sample(1, [("client-0", fp.ZYGOTE, 500 * mib), ("client-1", fp.ZYGOTE, 300 * mib),
                    ("client-0", fp.SIDECAR, 30 * mib)]),
        _sample(2, [("client-0", fp.ZYGOTE, 510 * mib), ("client-1", fp.ZYGOTE, 320 * mib),
                    ("client-0", fp.CLIENTAPP, 60 * mib), ("client-0", fp.SIDECAR, 30 * mib)]),
        _sample(3, [("client-0", fp.ZYGOTE, 520 * mib), ("client-1", fp.ZYGOTE, 310 * mib),
                    ("client-0", fp.SIDECAR, 30 * mib)]),
    ])
    s = fp.summarize_run(rec, steady_from=1)
    zygote = s[f"client/{fp.ZYGOTE}"]
    assert zygote["owners"] == 2
    assert zygote["peak"] == 900 * mib
    assert zygote["steady"] == pytest.approx((510 + 310) / 2 * mib)  # median of two owners
    assert s[f"client/{fp.CLIENTAPP}"]["peak"] == 60 * mib
    pod = s["client/pod"]  # client-0: zygote + sidecar (+ the forked task while it runs)
    assert pod["peak"] == 900 * mib
    assert s["client/container"]["peak"] == 900 * mib
    assert s["federation/total"]["peak"] == (510 + 320 + 60 + 30) * mib
    assert s["federation/total"]["steady"] == pytest.approx((520 + 310 + 30) * mib)


def test_spread_over_runs() -> None:
    assert fp.spread([3.0, None, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert fp.spread([None]) is None


def test_bootstrap_difference_brackets_a_clear_change_and_straddles_none() -> None:
    d, lo, hi = fp.bootstrap_difference([48.0, 49.0, 47.5], [28.0, 27.5, 28.5])
    assert d == pytest.approx(-20.17, abs=0.01) and lo < d < hi < 0
    d, lo, hi = fp.bootstrap_difference([30.0, 31.0, 29.0], [29.5, 30.5, 31.5])
    assert lo < 0 < hi


def test_the_images_entry_point_under_qemu_is_recognised() -> None:
    qemu = ("/usr/libexec/qemu-binfmt/aarch64-binfmt-P", "/opt/pqfed/bin/python3",
            "/opt/pqfed/bin/python3", "/opt/pqfed/bin/pqfed")
    procs = {1: fp.Proc(1, 0, ("unshare", "--net")),
             2: fp.Proc(2, 1, (*qemu, "fl", "client", "--spec", "j", "--index", "0")),
             3: fp.Proc(3, 2, (*qemu, "sidecar", "--cert", "/opt/x/identity/tls.crt"))}
    assert fp.classify(1, procs) == {2: ("client-0", fp.LAUNCHER), 3: ("client-0", fp.SIDECAR)}
