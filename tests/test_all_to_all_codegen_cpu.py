"""What the all-to-all kernel compiles to for an H200 (sm_90), checked on any machine: Triton
compiles for a target without a GPU, with its own ``ptxas``, and ``cuobjdump`` reads the
per-thread resources of the cubin.

The kernel moves block ``j`` of every destination in one step, so what one step holds for all
``WORLD`` destinations stays live across the unrolled destinations. With a 64-bit offset per
element (``j * BLOCK + arange``, 2 registers each, 32 elements a thread at 16 warps) that did not
fit the 128 registers a thread has at 512 threads: ``ptxas`` spilled to local memory, up to 136
bytes a thread for 8-byte elements on 16-byte aligned buffers and 1 – 3 KB when the buffers or
the chunk length are not multiples of 16 bytes (no vector loads), where the kernel that moved one
destination after another spilled at most 152. The block's start is now a 64-bit scalar and the
offsets inside a block 32-bit. Runs in a subprocess: conftest's ``TRITON_INTERPRET=1`` makes
``triton.jit`` return interpreted functions, which do not compile.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_STACK = 32  # bytes of local memory a thread may use: a spilled address or two, no more

_PROBE = r"""
import json, os, re, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowlevel.kernels import all_to_all as A

assert not A.INTERPRET
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
fn = A._all_to_all_kernel
names = fn.arg_names
PTR = {1: "*u8", 2: "*i16", 4: "*i32", 8: "*i64"}
out = {}
for world, size, aligned in json.loads(sys.argv[1]):
    sig = {}
    for nm in names:
        if nm == "x_ptr" or (nm[0] == "o" and nm[1:].isdigit()):
            sig[nm] = PTR[size]
        elif nm[0] == "s" and nm[1:].isdigit():
            sig[nm] = "*i32"
        elif nm in ("n_chunk", "num_progs", "max_spins"):
            sig[nm] = "i32"
        else:
            sig[nm] = "constexpr"
    # what a launch specialises on: the signal words are always 16-byte aligned; the data
    # pointers and the chunk length when they are multiples of 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, nm in enumerate(names)
             if (nm[0] == "s" and nm[1:].isdigit()) or (aligned and (sig[nm].startswith("*") or nm == "n_chunk"))}
    consts = {"RANK": world - 1, "WORLD": world, "BLOCK": A._BLOCK, "SYNC": True}
    k = triton.compile(ASTSource(fn=fn, signature=sig, attrs=attrs,
                                 constexprs={(names.index(c),): v for c, v in consts.items()}),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": A._WARPS})
    path = os.path.join(sys.argv[2], f"k_{world}_{size}_{int(aligned)}.cubin")
    with open(path, "wb") as f:
        f.write(k.asm["cubin"])
    res = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True, check=True)
    out[f"{world},{size},{int(aligned)}"] = int(re.search(r"STACK:(\d+)", res.stdout).group(1))
print("STACKS " + json.dumps(out))
"""

CONFIGS = [(world, size, aligned) for world in (2, 8) for size in (2, 8) for aligned in (True, False)]


def _tools_present():
    try:
        import triton
    except ImportError:
        return False
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return all(os.path.exists(os.path.join(bin_dir, t)) for t in ("ptxas", "cuobjdump"))


@pytest.mark.skipif(not _tools_present(), reason="needs Triton's NVIDIA backend tools (ptxas, cuobjdump)")
def test_kernel_does_not_spill_registers(tmp_path):
    """WORLD 2 and 8, 2- and 8-byte elements (bf16; fp64 / int64 / complex128's words), with
    and without 16-byte alignment: at most MAX_STACK bytes of local memory a thread."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    res = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(CONFIGS), str(tmp_path)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("STACKS ")]
    stacks = json.loads(line[-1][len("STACKS "):])
    assert len(stacks) == len(CONFIGS)
    spilled = {k: v for k, v in stacks.items() if v > MAX_STACK}
    assert not spilled, f"(world, element bytes, aligned): stack bytes a thread: {spilled}"

