"""The README's demo output is the demo's: the block between the markers is exactly what
tools/update_readme_demo.py makes from the saved demo log docs/demo_output.txt (the demo is deterministic;
re-run `python tools/update_readme_demo.py` after a change that moves its numbers)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import update_readme_demo as upd  # noqa: E402


def eval_rows(text: str) -> dict[str, list[str]]:
    """mode -> its numbers (ppl, change %, top-1, KL, max |dz|, B/token) from an eval table."""
    rows = {}
    for line in text.splitlines():
        m = re.match(
            r"^(fp16|int8\S*|fp8\S*)\s+.*?\s(\d+\.\d{4})\s+([+-]\d+\.\d{3})\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)$", line
        )
        if m:
            rows[m.group(1)] = list(m.groups()[1:])
    return rows


def test_readme_block_is_generated_from_the_saved_demo_log():
    readme, log = upd.README.read_text(), upd.LOG.read_text()
    block = upd.current_block(readme)
    assert block == upd.readme_block(log), "README demo block is stale: run python tools/update_readme_demo.py"
    rows = eval_rows(block)
    assert {"fp16", "int8", "int8:head", "fp8_e4m3", "fp8_e4m3:unit", "fp8_e4m3:dynamic"} <= rows.keys()
    assert rows == eval_rows(log)  # the numbers the demo printed, one for one
    assert rows["fp16"][1] == "+0.000"


def test_clean_log_and_abridged_block():
    root = Path("/some/checkout")
    raw = (
        "=== 2/7 deploy -> demo_out/workspace\n"
        "deploy:  50%|#####     | 1/2 [00:00<00:00]\rdeploy: 100%|##########| 2/2 [00:00<00:00]\n"
        "calibrate:  38%|###8      | 12/32 [01:37<02:36,  7.81s/win, tok_s=63]note: shared a line with a bar\n"
        "Loading weights: 100%|##########| 272/272 [00:00<00:00, 797.97it/s]\n"
        "/some/checkout/demo_out/workspace\n"
        "=== 5/7 accuracy\n"
        "fp16             -                        21.7667    +0.000    1.0000   0.00e+00    0.0000    23040\n"
        "eval: 100%|###| 12/12 [00:10<00:00]\n"
        "=== 6/7 memory per KV mode\n"
        "mode         B/token  MiB/session  batch  total GiB  measured GiB  vs fp16 MiB fit budget\n"
        "fp16           23040        45.18      8      0.656        0.656*          0.0         83\n"
        "fp16           23040        45.18     16      1.000        1.000           0.0           \n"
        "int8           11520        22.59      8      0.480         0.480       -180.7        167\n"
        "int8           11520        22.59     16      0.600         0.600       -361.4\n"
        "=== 7/7 chat\n"
        "answer\n"
        "EXIT 0\n"
    )
    log = upd.clean_log(raw, root)
    assert "%|" not in log and "EXIT" not in log and "./demo_out/workspace\n" in log
    assert "\nnote: shared a line with a bar\n" in log and "Loading" not in log
    assert all(ln == ln.rstrip() for ln in log.splitlines())
    block = upd.readme_block(log)
    assert block.startswith("=== 5/7") and "=== 2/7" not in block
    assert " 16 " not in block and block.count("...") == 1  # the later batch sizes, cut where the table ends
    assert block.endswith("answer\n")
    readme = f"intro\n{upd.BEGIN}\n```\nold\n```\n{upd.END}\nrest\n"
    new = upd.rewrite_readme(readme, block)
    assert upd.current_block(new) == block and new.startswith("intro\n") and new.endswith(f"{upd.END}\nrest\n")
