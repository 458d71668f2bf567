"""Rewrites CUDA sources into host C++ for the CPU emulation (include/emu_device.h).

    python translate.py SRC_DIR OUT_DIR

Copies SRC_DIR (the repository's csrc) to OUT_DIR, rewriting in every .cu and .h file:
  - kernel<<<grid, block[, smem[, stream]]>>>(args)  ->  ::emu::launch_kernel(kernel, grid, block, smem, stream, args)
  - __shared__ T name[dims];         ->  auto& name = ::emu::shared_var<T[dims], N, ALIGN>();
  - extern __shared__ T name[];      ->  T* name = ::emu::dynamic_shared<T>();
  - x.sync()                         ->  x.sync_at("file:line")   (cluster barriers, by place)
  - __launch_bounds__(N[, M]) k(...) { ->  k(...) { ::emu::launch_bounds(N);   (checked at run time)
  - asm statements                   ->  the emulator's function for the PTX they hold, or a call
                                         that faults at run time for PTX it does not know
Everything else is left as written, so the emulated kernels are the repository's kernels.
"""

from __future__ import annotations

import re
import shutil
import sys
import zlib
from pathlib import Path


def strip_comments(text: str) -> str:
    """text with its comments blanked (newlines kept, so line numbers stay): the rewrites below
    must not match inside a comment, nor a comment swallow code after them."""
    out, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "\"'":  # a string or character literal, escapes included
            j = i + 1
            while j < n and text[j] != ch:
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("".join(c if c == "\n" else " " for c in text[i:j]))
            i = j
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _matching(text: str, open_at: int, pair: str = "()") -> int:
    """Index of the bracket closing the one at open_at (skipping string literals)."""
    depth, i = 0, open_at
    while i < len(text):
        ch = text[i]
        if ch == '"':
            i = text.index('"', i + 1)
            while text[i - 1] == "\\":
                i = text.index('"', i + 1)
        elif ch == pair[0]:
            depth += 1
        elif ch == pair[1]:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unbalanced {pair} from offset {open_at}")


def _split_top(text: str, sep: str) -> list[str]:
    """text split at `sep` outside brackets and string literals."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            i = text.index('"', i + 1)
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def _operands(part: str) -> list[str]:
    """The C++ expressions of an asm operand list ("r"(x), "=f"(y), ...)."""
    out = []
    for op in _split_top(part, ","):
        op = op.strip()
        if op:
            out.append(op[op.index("(") + 1 : op.rindex(")")])
    return out


def _asm(body: str, where: str) -> str:
    parts = _split_top(body, ":")
    template = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', parts[0])).replace("\\n", "").strip()
    outs = _operands(parts[1]) if len(parts) > 1 else []
    ins = _operands(parts[2]) if len(parts) > 2 else []
    name = template.split(" ")[0]
    if template == "" or name.startswith("prefetch"):
        return "(void)0;"  # a compiler barrier or a cache hint: nothing to emulate
    operands = re.sub(r"\s+", " ", template[len(name) :]).strip()
    if name == "ex2.approx.ftz.f32" and operands == "%0, %1;":
        return f"{outs[0]} = ::emu::ex2_approx_ftz({ins[0]});"
    if name in ("cp.async.cg.shared.global", "cp.async.ca.shared.global") and re.fullmatch(
        r"\[%0\], \[%1\], \d+, %2;", operands):
        size = re.search(r"\],\s*(\d+),", template).group(1)
        return f"::emu::cp_async({ins[0]}, {ins[1]}, {size}, {ins[2]});"
    if name == "cp.async.commit_group;":
        return "::emu::cp_async_commit();"
    if name == "cp.async.wait_group" and operands == "%0;":
        return f"::emu::cp_async_wait({ins[0]});"
    ld = re.fullmatch(r"ldmatrix\.sync\.aligned\.m8n8\.x4(\.trans)?\.shared\.b16", name)
    if ld and operands == "{%0, %1, %2, %3}, [%4];":
        trans = "true" if ld.group(1) else "false"
        return f'::emu::ldmatrix_x4({", ".join(outs)}, {ins[0]}, {trans}, "{where}");'
    mma = re.fullmatch(r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.(bf16|f16)\.\1\.f32", name)
    if mma and operands == "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};":
        tag = "Bf16Tag" if mma.group(1) == "bf16" else "F16Tag"
        return f"::emu::mma_m16n8k16<::emu::{tag}>({', '.join(outs + ins)});"
    # Anything else, or a known instruction with its operands in another order: a fault when run.
    return f'::emu::unsupported_asm("{where}: {name}");'


_ASM = re.compile(r"\basm\s*(?:volatile\s*)?\(")
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_ALIGN = r"(?:alignas\(\d+\)\s*|__align__\(\d+\)\s*)"  # an alignment attribute of a __shared__ array
_EXTERN_SHARED = re.compile(
    rf"extern\s+(?:volatile\s+)?__shared__\s+{_ALIGN}*([\w:<>, ]+?)\s+(\w+)\s*\[\s*\]\s*;")
_SHARED = re.compile(
    rf"(?:\bstatic\s+)?(?:\bvolatile\s+)?__shared__\s+({_ALIGN}*)([\w:<>, ]+?)\s+(\w+)"
    r"\s*((?:\[[^\]]*\])*)\s*;")
_SYNC = re.compile(r"\b(\w+)\.sync\(\)")
_BOUNDS = re.compile(r"\b__launch_bounds__\s*\(")


def _launch_bounds(text: str) -> str:
    """Each __launch_bounds__ dropped; in a definition, its maximum block size checked on entry."""
    out, pos = [], 0
    for m in _BOUNDS.finditer(text):
        close = _matching(text, m.end() - 1)
        limit = _split_top(text[m.end() : close], ",")[0].strip()
        params = _matching(text, text.index("(", close + 1))  # the kernel's parameter list
        body = re.match(r"\s*\{", text[params + 1 :])
        out.append(text[pos : m.start()])
        if body is None:  # a declaration
            out.append(text[close + 1 : params + 1])
            pos = params + 1
        else:
            brace = params + 1 + body.end()
            out.append(text[close + 1 : brace] + f" ::emu::launch_bounds({limit});")
            pos = brace
    out.append(text[pos:])
    return "".join(out)


def translate(text: str, name: str) -> str:
    # Keys of the __shared__ declarations: unique across files (a kernel also declares the ones
    # of the headers it includes), as the declarations are.
    base = (zlib.crc32(name.encode()) & 0xFFFFF) * 1000
    counter = iter(range(base + 1, base + 1000))
    text = strip_comments(text)

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    # asm first: its operands may hold anything.
    out, pos = [], 0
    for m in _ASM.finditer(text):
        if m.start() < pos:
            continue
        close = _matching(text, m.end() - 1)
        semi = text.index(";", close)
        out.append(text[pos : m.start()])
        out.append(_asm(text[m.end() : close], f"{name}:{line_of(m.start())}"))
        pos = semi + 1
    out.append(text[pos:])
    text = "".join(out)

    def launch(m: re.Match) -> str:
        cfg = [c.strip() for c in _split_top(m.group(2), ",")]
        cfg += ["0", "nullptr"][len(cfg) - 2 :]
        no_args = m.string[m.end() :].lstrip().startswith(")")
        head = f"::emu::launch_kernel({m.group(1)}, dim3({cfg[0]}), dim3({cfg[1]}), {cfg[2]}, {cfg[3]}"
        return head if no_args else head + ", "

    text = _LAUNCH.sub(launch, text)
    text = _EXTERN_SHARED.sub(lambda m: f"{m.group(1)}* {m.group(2)} = ::emu::dynamic_shared<{m.group(1)}>();", text)
    def shared(m: re.Match) -> str:
        align = max([int(a) for a in re.findall(r"\d+", m.group(1))] or [0])  # declared, else the type's
        return f"auto& {m.group(3)} = ::emu::shared_var<{m.group(2)}{m.group(4)}, {next(counter)}, {align}>();"

    text = _SHARED.sub(shared, text)
    text = _SYNC.sub(lambda m: f'{m.group(1)}.sync_at("{name}:" EMU_STR(__LINE__))', text)
    return _launch_bounds(text)


def main(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    for path in src.rglob("*"):
        if path.is_dir():
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".cu", ".h", ".cuh"):
            target.write_text(translate(path.read_text(), str(path.relative_to(src))))
        else:
            shutil.copy2(path, target)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
