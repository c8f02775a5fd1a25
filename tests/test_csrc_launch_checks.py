"""Every CUDA kernel launch in csrc/ is followed by C10_CUDA_KERNEL_LAUNCH_CHECK().

A launch error (bad grid, too much shared memory, an arch the binary lacks) is
otherwise silent until some later, unrelated CUDA call fails. The scanner reads
C++ the way the compiler would for this purpose: comments and string literals
do not count, line continuations of macros are whitespace, and the statement
that follows the launch's ``;`` must be the check.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Tuple

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCE_SUFFIXES = (".cu", ".cuh", ".cpp", ".h", ".hpp")
CHECK = re.compile(r"C10_CUDA_KERNEL_LAUNCH_CHECK\s*\(\s*\)\s*;")


def blank_comments_and_strings(src: str) -> str:
    """`src` with comments, string and char literals replaced by spaces (newlines kept)."""
    out = list(src)
    i, n = 0, len(src)

    def blank(a: int, b: int) -> None:
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        if src.startswith("//", i):
            end = src.find("\n", i)
            end = n if end < 0 else end
            blank(i, end)
            i = end
        elif src.startswith("/*", i):
            end = src.find("*/", i + 2)
            end = n if end < 0 else end + 2
            blank(i, end)
            i = end
        elif src[i] in "\"'":
            quote, k = src[i], i + 1
            while k < n and src[k] != quote and src[k] != "\n":
                k += 2 if src[k] == "\\" else 1
            blank(i, min(k + 1, n))
            i = k + 1
        elif src[i] == "\\" and src.startswith("\n", i + 1):  # macro line continuation
            out[i] = " "
            i += 1
        else:
            i += 1
    return "".join(out)


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def scan_launches(src: str) -> Tuple[int, List[Tuple[int, str]]]:
    """(number of launches, [(line, problem)] for launches without the check right after)."""
    text = blank_comments_and_strings(src)
    line_of = lambda pos: text.count("\n", 0, pos) + 1  # noqa: E731
    problems, count = [], 0
    for start in (m.start() for m in re.finditer(r"<<<", text)):
        count += 1
        close = text.find(">>>", start + 3)
        i = _skip_space(text, close + 3) if close >= 0 else len(text)
        if i >= len(text) or text[i] != "(":
            problems.append((line_of(start), "launch syntax not understood (<<<...>>> without an argument list)"))
            continue
        depth = 0
        while i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
            if depth == 0:
                break
        i = _skip_space(text, i)
        if i >= len(text) or text[i] != ";":
            problems.append((line_of(start), "launch is not a statement of its own (no ';' after its arguments)"))
            continue
        if not CHECK.match(text, _skip_space(text, i + 1)):
            problems.append((line_of(start), "not followed by C10_CUDA_KERNEL_LAUNCH_CHECK();"))
    return count, problems


def csrc_sources() -> List[Path]:
    return sorted(p for p in CSRC.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file())


def test_every_launch_in_csrc_is_checked():
    total, problems = 0, []
    for path in csrc_sources():
        count, found = scan_launches(path.read_text())
        total += count
        problems += [f"{path.relative_to(CSRC.parent)}:{line}: {what}" for line, what in found]
    assert not problems, "CUDA launches without a launch check:\n" + "\n".join(problems)
    cu_files = sorted(CSRC.rglob("*.cu"))  # in any folder: csrc/cuda/, csrc/cache_store/, ...
    if cu_files:  # the scan must not pass by finding nothing
        assert total >= 1, f"no <<<...>>> launch found in {len(cu_files)} .cu files: the scanner is broken"


GOOD = r"""
template <typename T> void run(const T* x, cudaStream_t stream) {
  // a comment with a launch in it: k<<<1, 1>>>(x);  and no check
  const char* s = "k<<<1,1>>>(x);";
  score_kernel<T, 128><<<dim3(B, Hkv), 128, smem_bytes(D, (W + 1)), stream>>>(
      x, /* strides */ stride(0), f(g(1), 2));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (big) {
    other_kernel<<<grid, block, 0, stream>>>(x);
    // why: the check reads cudaGetLastError right after the launch
    C10_CUDA_KERNEL_LAUNCH_CHECK  ( ) ;
  }
}
#define LAUNCH(K) \
  K<<<grid, block, 0, stream>>>(ptr); \
  C10_CUDA_KERNEL_LAUNCH_CHECK();
"""

BAD = {
    "missing": "void f() { k<<<1, 1>>>(x);\n  return; }",
    "check-before": "void f() { C10_CUDA_KERNEL_LAUNCH_CHECK();\n k<<<1, 1>>>(x); }",
    "check-later": "void f() { k<<<1, 1>>>(x);\n y = 2;\n C10_CUDA_KERNEL_LAUNCH_CHECK(); }",
    "check-commented-out": "void f() { k<<<1, 1>>>(x);\n // C10_CUDA_KERNEL_LAUNCH_CHECK();\n}",
    "check-in-string": 'void f() { k<<<1, 1>>>(x);\n puts("C10_CUDA_KERNEL_LAUNCH_CHECK();"); }',
    "other-check": "void f() { k<<<1, 1>>>(x);\n AT_CUDA_CHECK(cudaGetLastError()); }",
    "macro-without-check": "#define L(K) \\\n  K<<<g, b>>>(p); \\\n  foo();\n",
    "end-of-file": "void f() { k<<<1, 1>>>(x);",
}


def test_scanner_accepts_checked_launches():
    count, problems = scan_launches(GOOD)
    assert count == 3 and problems == [], problems


def test_scanner_flags_unchecked_launches():
    for name, src in BAD.items():
        count, problems = scan_launches(src)
        assert count == 1 and len(problems) == 1, f"{name}: {count} launches, problems {problems}"
    _, problems = scan_launches("\n\nvoid f() {\n  k<<<1, 1>>>(\n    x);\n  g();\n}\n")
    assert problems == [(4, "not followed by C10_CUDA_KERNEL_LAUNCH_CHECK();")]
