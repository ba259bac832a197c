"""Source consistency of the translator's threaded dispatch (c_ext/exec.c).

exec_block jumps through a table of label addresses; every `op_X:` label needs a
`[X] = &&op_X` entry or its opcode silently falls to op_default (#UD/SSE).
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
