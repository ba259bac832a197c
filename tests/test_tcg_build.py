"""Source consistency of the translator (c_ext/).

exec_block jumps through a table of label addresses; every `op_X:` label needs a
`[X] = &&op_X` entry or its opcode silently falls to op_default (#UD/SSE).

The headers use nothing that a .c file including them defines (tcg.h's layering):
the inline fast paths that call mem.c live in access.h, which mem.c does not include.
"""

import re
from pathlib import Path

EXEC_C = Path(__file__).resolve().parent.parent / "c_ext" / "exec.c"


def test_dispatch_table_matches_labels():
    src = EXEC_C.read_text()
    labels = set(re.findall(r"\bop_(\w+):", src)) - {"default"}
    entries = set(re.findall(r"\[(\w+)\] = &&op_\1,", src))
    assert labels, "no op_ labels found"
    assert labels == entries, f"labels without table entries: {sorted(labels - entries)}; " \
                              f"entries without labels: {sorted(entries - labels)}"
    values = [int(x, 16) if x.startswith("0x") else x for x in entries]
    numeric = [v for v in values if isinstance(v, int)]
    assert len(numeric) == len(set(numeric)), "an opcode has two handlers"


# ---- headers use nothing defined in the .c files that include them ----

C_EXT = EXEC_C.parent


def _strip(src):
    """Comments, string and character literals and line continuations out."""
    src = re.sub(r"\\\n", " ", src)
    return re.sub(r'/\*.*?\*/|//[^\n]*|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'',
                  lambda m: " " if m.group(0).startswith("/") else '""', src, flags=re.S)


def _drop_attributes(text):
    """__attribute__((...)) out (balanced parentheses)."""
    while (k := text.find("__attribute__")) >= 0:
        j = text.index("(", k)
        depth = 0
        for end in range(j, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        text = text[:k] + " " + text[end + 1:]
    return text


def _top_level(src):
    """The file's top-level items as (head, body): body is the text between the
    braces of a function definition, None for a declaration (its brace
    initialisers and struct bodies dropped). Preprocessor lines are skipped."""
    src = "\n".join("" if line.lstrip().startswith("#") else line for line in src.split("\n"))
    items, head, depth, k = [], "", 0, 0
    while k < len(src):
        ch = src[k]
        if ch == "{":
            depth, j = 1, k + 1
            while depth:
                depth += {"{": 1, "}": -1}.get(src[j], 0)
                j += 1
            h = _drop_attributes(head)
            if "=" not in h and re.search(r"\w\s*\([^;]*\)\s*$", h):
                items.append((h, src[k + 1:j - 1]))   # a function definition
                head = ""
            else:
                head += " "                           # struct body / initialiser
            k = j
            continue
        if ch == ";":
            items.append((_drop_attributes(head), None))
            head = ""
        else:
            head += ch
        k += 1
    return items


def _function_name(head):
    return re.search(r"(\w+)\s*\([^()]*(?:\([^()]*\)[^()]*)*\)\s*$", head).group(1)


def _declared_variables(head):
    """Names declared by a top-level declaration that is not a prototype/typedef."""
    head = head.strip()
    if not head or head.startswith("typedef") or re.search(r"\w\s*\(", re.sub(r"\(\s*\*", "", head)):
        return []
    names = []
    for part in head.split(","):
        part = re.sub(r"\[[^\]]*\]", "", part.split("=")[0])
        m = re.search(r"(\w+)\s*$", part)
        if m and m.group(1) not in {"struct", "union", "enum"}:
            names.append(m.group(1))
    return names


def _identifiers(text):
    """Identifiers in code, not member names (after . or ->)."""
    return set(re.findall(r"(?<!->)(?<![.\w])([A-Za-z_]\w*)", text))


def _c_ext_sources():
    return {p.name: p.read_text() for p in sorted(C_EXT.glob("*.[ch]"))}


def _includes(sources):
    """file -> every c_ext header it includes, directly or through other headers."""
    direct = {name: set(re.findall(r'^\s*#\s*include\s+"([^"]+)"',
                                   re.sub(r"/\*.*?\*/|//[^\n]*", " ", src, flags=re.S), re.M))
              & set(sources)
              for name, src in sources.items()}
    closure = {}
    for name in sources:
        seen, todo = set(), list(direct[name])
        while todo:
            h = todo.pop()
            if h not in seen:
                seen.add(h)
                todo.extend(direct[h])
        closure[name] = seen
    return closure


def _header_uses(src, macros):
    """Identifiers a header's inline function bodies use (through its macros too),
    and the variables it declares extern."""
    used = set()
    for head, body in _top_level(src):
        if body is not None:
            used |= _identifiers(body)
        elif re.match(r"\s*extern\b", head):
            used |= set(_declared_variables(head.replace("extern", " ")))
    todo = list(used)
    while todo:
        for name in _identifiers(macros.get(todo.pop(), "")) - used:
            used.add(name)
            todo.append(name)
    return used


def _definitions(src):
    """Functions and variables a .c file defines at top level."""
    names = set()
    for head, body in _top_level(src):
        if body is not None:
            names.add(_function_name(head))
        elif not re.match(r"\s*extern\b", head):
            names.update(_declared_variables(head))
    return names


def header_violations(sources):
    """(header, .c file, names): a header using what a .c file including it defines.
    sources: file name -> text, for every c_ext file."""
    includes = _includes(sources)
    sources = {name: _strip(src) for name, src in sources.items()}
    macros = {}
    for name, src in sources.items():
        if name.endswith(".h"):
            for m in re.finditer(r"^\s*#\s*define\s+(\w+)(?:\([^)]*\))?([^\n]*)", src, re.M):
                macros[m.group(1)] = m.group(2)
    found = []
    for h, src in sources.items():
        if not h.endswith(".h"):
            continue
        uses = _header_uses(src, macros)
        for c, inc in includes.items():
            if c.endswith(".c") and h in inc and (bad := uses & _definitions(sources[c])):
                found.append((h, c, sorted(bad)))
    return found


def test_header_checker_sees_a_circle():
    """The check below on a made-up pair: the header's inline calls back into the .c."""
    sources = {
        "t.h": ("extern int counter;\n#define BUMP(c) bump_slow(c)\n"
                      "static inline __attribute__((always_inline)) int fast(int *p)\n"
                      "{ return *p ? *p : BUMP(p); }\nint other(int);\n"),
        "u.h": '#include "t.h"\n',
        "t.c": ('#include "u.h"\nint counter;\nstatic int helper(void) { return 0; }\n'
                      "int __attribute__((noinline)) bump_slow(int *p)\n{\n    return ++*p + helper();\n}\n"
                      "int other(int x) { return x; }\n"),
    }
    assert header_violations(sources) == [("t.h", "t.c", ["bump_slow", "counter"])]


def test_headers_use_nothing_of_the_c_files_including_them():
    """No c_ext header calls or references a function or global that a .c file
    including it (directly or through other headers) defines: otherwise the two
    files use each other's names. Prototypes are not uses; inline function bodies,
    the macros they use, and extern variable declarations are."""
    sources = _c_ext_sources()
    assert "tcg.h" in sources and "mem.c" in sources
    defs = _definitions(_strip(sources["mem.c"]))
    assert {"mem_read_slow", "code_epoch", "registry", "ram_ptr"} <= defs, defs
    assert header_violations(sources) == []
