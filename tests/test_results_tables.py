"""scripts/baselines_table.py writes each protocol's tables into its own generated block of
RESULTS.md, so protocols swept at different times keep their tables."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "baselines_table.py"


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("baselines_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_protocol_block_is_replaced_and_the_others_kept(table):
    single, lnln = table.markers("single-model"), table.markers("lnln")
    doc = f"intro\n{single[0]}\nold single\n{single[1]}\n\n{lnln[0]}\nold lnln\n{lnln[1]}\nafter\n"
    out = table.write_blocks(doc, {"lnln": "new lnln"})
    assert "old single" in out and "old lnln" not in out and "new lnln" in out
    assert out.startswith("intro\n") and out.endswith("after\n")


def test_a_new_protocol_gets_its_block_after_the_last_one(table):
    single = table.markers("single-model")
    doc = f"intro\n{single[0]}\nsingle\n{single[1]}\nafter\n"
    out = table.write_blocks(doc, {"per-rate": "per-rate tables"})
    begin, end = table.markers("per-rate")
    assert out.index(single[1]) < out.index(begin) < out.index("per-rate tables") < out.index(end) < out.index("after")
    assert table.write_blocks(out, {"per-rate": "again"}).count(begin) == 1


def test_a_file_without_blocks_is_refused(table):
    with pytest.raises(SystemExit, match="no generated block"):
        table.write_blocks("no markers here\n", {"lnln": "x"}, "RESULTS.md")
