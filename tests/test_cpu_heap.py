"""``qwt_core.cpu_heap``: a retained heap serves a freed activation's memory again without page
faults; the command-line option switches it on for CPU runs only. The heap setting is process-wide,
so every case that changes it runs in a child process."""
import json
import os
import subprocess
import sys

import pytest

from qwt_core.cpu_heap import cpu_heap_mode, retain_cpu_heap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_FAULTS = r"""
import json, resource, sys
import torch
from qwt_core.cpu_heap import cpu_heap_mode, retain_cpu_heap
if sys.argv[1] == "retain":
    retain_cpu_heap()
n = 64 * 2 ** 20 // 4  # a 64 MiB activation: above glibc's largest dynamic mmap threshold (32 MiB)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):     # allocate, touch and free it, as one forward does
    x = torch.ones(n)
    del x
f0 = faults()          # no Python allocation between here and the loop (a single allocation right
for _ in range(8):     # after one such allocation could land past the freed block, once in two runs)
    x = torch.ones(n)  # the next forwards' activations
    del x
print(json.dumps({"faults": faults() - f0, "mode": cpu_heap_mode()}))
"""


def _child(code: str, *argv: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retained_heap_reuses_freed_memory_without_page_faults():
    system = _child(_FAULTS, "system")
    retain = _child(_FAULTS, "retain")
    assert (system["mode"], retain["mode"]) == ("system", "retain")
    # 64 MiB is 16384 pages of 4 KiB: the system allocator maps it afresh and faults it in again on
    # each of the 8 allocations, the retained heap hands back memory that is already mapped
    assert retain["faults"] < 1000, retain
    assert system["faults"] > retain["faults"], (system, retain)


_CLI = r"""
import argparse, json, sys
from qwt_core.cli_options import add_speed_arguments, apply_speed_arguments
from qwt_core.cpu_heap import cpu_heap_mode
p = argparse.ArgumentParser()
add_speed_arguments(p)
args = p.parse_args(sys.argv[2:])
apply_speed_arguments(args, sys.argv[1])
print(json.dumps({"mode": cpu_heap_mode(), "flag": args.cpu_heap}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
@pytest.mark.parametrize("device, argv, expected", [
    ("cpu", [], "retain"),                        # the default on CPU
    ("cpu", ["--cpu_heap", "system"], "system"),
    ("cpu", ["--cpu-heap", "retain"], "retain"),
    ("cuda:0", [], "system"),                     # GPU runs leave malloc alone
])
def test_command_line_keeps_the_heap_on_cpu_runs(device, argv, expected):
    assert _child(_CLI, device, *argv)["mode"] == expected


@pytest.mark.parametrize("kwargs", [{"mmap_threshold": 0}, {"trim_threshold": -1},
                                    {"mmap_threshold": True}, {"trim_threshold": 2 ** 31},
                                    {"mmap_threshold": 1.5}])
def test_bad_thresholds_are_refused_before_anything_changes(kwargs):
    before = cpu_heap_mode()
    with pytest.raises(ValueError, match="use an int in"):
        retain_cpu_heap(**kwargs)
    assert cpu_heap_mode() == before
