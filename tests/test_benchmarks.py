"""The benchmark's command line: a smoke run never overwrites the committed results."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def polling() -> ModuleType:
    name = "benchmarks_polling"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "polling.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_quick_run_writes_beside_the_full_results_not_over_them() -> None:
    bench = polling()
    full = bench.parse_args([])
    quick = bench.parse_args(["--quick"])
    assert full.json == ROOT / "benchmarks" / "results" / "polling.json"
    assert {full.markdown.name, full.plot.name} == {"polling.md", "polling.png"}
    assert quick.json.parent == full.json.parent / "quick"
    for path in (quick.json, quick.markdown, quick.plot):
        assert path.parent == quick.json.parent


def test_the_tables_and_plot_go_beside_the_json_unless_told(tmp_path: Path) -> None:
    bench = polling()
    args = bench.parse_args(["--json", str(tmp_path / "run.json"), "--plot", "p.png"])
    assert args.markdown == tmp_path / "run.md"
    assert args.plot == Path("p.png")
