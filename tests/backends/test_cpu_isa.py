"""The CPU kernels' instruction sets: the baseline, AVX2 and AVX-512 translation units
(csrc/row_kernel_cpu*.cpp, each under its own ``#pragma GCC target``) must not share an inline function
or template, or the linker may keep the AVX-512 copy for every caller (one-definition rule) and a CPU
without AVX-512 dies with SIGILL.

* The built extension's symbols (``nm -C``): every symbol of row_math.h's functions and of the CPU
  kernels lives in a namespace named after its instruction set (``fused_margin::row_math_AVX2::``,
  ``fused_margin::cpu::AVX512::``...), one copy per instruction set.
* Its machine code (``objdump -d``): no function outside those namespaces (and at::vec's, also named after
  the instruction set) holds an AVX, AVX-512, FMA, F16C or BMI instruction, static initialisers included.
* The baseline path itself: with ``ATEN_CPU_CAPABILITY=default`` (the AVX kernels not selected) a fresh
  process reports ``DEFAULT`` kernels and the losses and gradients match the float64 reference.
"""

import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from fused_margin.backends import extension

if not extension.is_built():
    pytest.skip(f"the fused_margin C++ extension is not built ({extension.BUILD_ERROR})", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
HELPERS = os.path.join(HERE, os.pardir, "helpers")
ROW_MATH = os.path.join(HERE, os.pardir, os.pardir, "fused_margin", "backends", "csrc", "row_math.h")
X86 = platform.machine().lower() in ("x86_64", "amd64") and sys.platform.startswith("linux")
# namespaces named after an instruction set: fused_margin's kernels and row math, ATen's at::vec
_ISA_PREFIX = (
    r"(?:fused_margin::cpu::|fused_margin::row_math_|at::vec::|fused_margin::block::\(anonymous namespace\)::)"
)
ISA_NAMESPACE = re.compile(_ISA_PREFIX + r"(DEFAULT|AVX2|AVX512)::")
WIDE_ISA_NAMESPACE = re.compile(_ISA_PREFIX + r"(AVX2|AVX512)::")
# instructions a baseline x86-64 CPU may lack: VEX/EVEX-encoded (AVX, AVX2, AVX-512, FMA, F16C), mask
# registers, BMI1/BMI2, LZCNT/TZCNT, POPCNT, MOVBE
NOT_BASELINE = re.compile(
    r"^(?:v(?!err|erw)[a-z0-9]+|k[a-z]+[bwdq]|andn|bextr|blsi|blsmsk|blsr|bzhi|mulx|pdep|pext|"
    r"rorx|sarx|shlx|shrx|lzcnt|tzcnt|popcnt|movbe)$"
)


def _library():
    return extension._C.__file__


def _tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} (binutils) is not installed")
    return path


def _symbols():
    """``[(type, demangled name)]`` of the symbols the extension defines."""
    out = subprocess.run(
        [_tool("nm"), "-C", "--defined-only", _library()], capture_output=True, text=True, check=True
    ).stdout
    symbols = []
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3:
            symbols.append((parts[1], parts[2]))
    return symbols


def _built_with_isa_kernels(symbols):
    names = [name for _, name in symbols]
    return any(name.startswith("fused_margin::cpu::AVX512::row_forward(") for name in names)


def _row_math_functions():
    with open(ROW_MATH) as f:
        source = f.read()
    names = set(re.findall(r"FM_HOST_DEVICE\s+[\w:]+\s+(\w+)\(", source))
    assert {"finish_forward_row", "target_logit", "lse_merge", "nan_max"} <= names, names
    return names


def test_row_math_and_kernels_have_one_copy_per_instruction_set():
    """No symbol of row_math.h's functions or of the CPU kernels outside an instruction set's namespace:
    such a symbol would be one entity for the baseline, AVX2 and AVX-512 objects. GCC emits
    finish_forward_row out of line, so each instruction set's copy is listed."""
    symbols = _symbols()
    functions = _row_math_functions()
    shared, per_isa = [], {}
    for kind, name in symbols:
        if not name.startswith(("fused_margin::", "void fused_margin::")) and " fused_margin::" not in name:
            continue
        called = re.findall(r"fused_margin::(?:[\w]+::)*?(\w+)(?:<[^()]*>)?\(", name)
        row_math = called and called[0] in functions
        kernel = "fused_margin::cpu::" in name and "fused_margin::cpu::" in name.split("(")[0]
        if not (row_math or kernel):
            continue
        match = ISA_NAMESPACE.search(name.split("(")[0]) or re.search(
            r"fused_margin::row_math_(cuda)::", name.split("(")[0]
        )
        if match is None:
            shared.append(f"{kind} {name}")
        elif row_math:
            per_isa.setdefault(called[0], set()).add(match.group(1))
    assert not shared, "symbols shared by the instruction sets' objects:\n" + "\n".join(shared)
    if _built_with_isa_kernels(symbols) and "finish_forward_row" in per_isa:
        assert {"DEFAULT", "AVX2", "AVX512"} <= per_isa["finish_forward_row"], per_isa


def _functions_with_wide_instructions():
    """``{function: [first instructions a baseline CPU may lack]}`` over the extension's machine code."""
    if not X86:
        pytest.skip("the instruction-set variants are built on x86-64 Linux only")
    out = subprocess.run(
        [_tool("objdump"), "-d", "-C", "--no-show-raw-insn", _library()], capture_output=True, text=True, check=True
    ).stdout
    found, current = {}, None
    for line in out.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            current = header.group(1)
            continue
        fields = line.split("\t")
        if current is None or len(fields) < 2 or not fields[1].strip():
            continue
        mnemonic = fields[1].split()[0]
        if NOT_BASELINE.match(mnemonic) or "%ymm" in line or "%zmm" in line:
            found.setdefault(current, []).append(fields[1].strip())
    return found


def test_no_wide_instruction_outside_the_instruction_set_namespaces():
    """What a baseline caller can reach (fused_margin.cpp, the DEFAULT kernels, static initialisers,
    every inline function of the headers that the objects share) is baseline x86-64 code."""
    symbols = _symbols()
    if not _built_with_isa_kernels(symbols):
        pytest.skip("the extension was built without its AVX2/AVX-512 kernels")
    found = _functions_with_wide_instructions()
    wide = {name for name in found if WIDE_ISA_NAMESPACE.search(name)}
    assert any("fused_margin::cpu::AVX512::" in name and any("%zmm" in i for i in found[name]) for name in wide), (
        "no AVX-512 instruction found in the AVX-512 kernels: the disassembly was not read as expected"
    )
    outside = {name: found[name][:3] for name in found if name not in wide}
    assert not outside, "functions outside the AVX namespaces with AVX/BMI instructions:\n" + "\n".join(
        f"{name[:200]}: {instructions}" for name, instructions in outside.items()
    )


_BASELINE_SCRIPT = textwrap.dedent("""
    import torch
    from fused_margin.backends import extension
    import kernel_cases as k
    print("isa", extension.cpu_kernel_isa(), extension.class_block_isa(), flush=True)
    assert extension.cpu_kernel_isa() == "DEFAULT", extension.cpu_kernel_isa()
    assert extension.class_block_isa() == "DEFAULT", extension.class_block_isa()
    # the memory-lean path's class-block loops (DEFAULT too) against the reference, chunks of 7
    from fused_margin.paths.lean import lean_margin_cross_entropy
    from fused_margin.core.reference import margin_cross_entropy_reference
    from fused_margin.core.spec import LossTables, MarginLossSpec
    g = torch.Generator().manual_seed(0)
    spec = MarginLossSpec(head="cosine", scale=30.0, margin_type="additive_angular", lambda_inst=1.0,
                          lambda_elm=0.5, label_smoothing=0.1)
    x64 = torch.randn(12, 8, generator=g, dtype=torch.float64)
    w64 = torch.randn(50, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 50, (12,), generator=g)
    m64 = 0.3 * torch.rand(50, generator=g, dtype=torch.float64)
    truth, _ = margin_cross_entropy_reference(x64, y, w64, None, spec, LossTables(class_margins=m64))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        loss = lean_margin_cross_entropy(x64.to(dtype), y, w64.to(dtype), None, spec,
                                         LossTables(class_margins=m64 if dtype == torch.float64 else m64.float()),
                                         chunk=7, kernel="cpu")[0]
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
        assert abs(loss.item() - truth.item()) <= tol * abs(truth.item()), (dtype, loss.item(), truth.item())
    for name in ("dbm_hard", "dbm_fold_threshold", "dbm_fold_easy", "smoothing_weighted_ignored", "linear_marc",
                 "logits_cosine_dbm", "longer_than_a_chunk"):
        options = dict(k.CASES[name])
        head = options.pop("head", "cosine")
        k.compare(k.make_case(head, seed=k._seed(name, 10000), **options), "cpu")
    for dtype in (torch.bfloat16, torch.float16):
        for name in ("dbm_bs_drw", "logits_plain"):
            options = dict(k.CASES[name], reduction="none")
            head = options.pop("head", "cosine")
            k.compare(k.make_case(head, B=24, seed=k._seed(name, 10000) + 1, **options), "cpu", dtype=dtype)
    print("ok")
""")


@pytest.mark.slow
def test_baseline_kernels_with_the_avx_variants_disabled():
    """ATEN_CPU_CAPABILITY=default in a fresh process: the DEFAULT kernels are picked (on any CPU) and
    the public API's losses and gradients through them match the float64 reference (fp32, bf16, fp16)."""
    env = dict(
        os.environ,
        ATEN_CPU_CAPABILITY="default",
        PYTHONPATH=os.pathsep.join([HELPERS, os.environ.get("PYTHONPATH", "")]),
    )
    result = subprocess.run(
        [sys.executable, "-c", _BASELINE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        result.stdout[-2000:] + result.stderr[-3000:]
    )
    assert "isa DEFAULT" in result.stdout


def test_class_block_loops_follow_the_row_kernels_instruction_set():
    """The memory-lean path's CPU loops (csrc/class_block_cpu.cpp) pick their instruction set as the row
    kernels do (torch's CPU capability, ATEN_CPU_CAPABILITY honoured)."""
    assert extension.class_block_isa() == extension.cpu_kernel_isa()
