"""The data layer sits below the stages: genpi.data imports nothing of synth, train, eval, serve or run, and the
catalog does not import the checks that import it (the arrows flow one way)."""

from __future__ import annotations

import ast

from conftest import REPO

GENPI = REPO / "genpi"
DATA_MAY_IMPORT = ("genpi.catalog", "genpi.data", "genpi.engines", "genpi.models")


def genpi_imports(path) -> set[str]:
    """Every genpi module a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "genpi":
            found |= {node.module} if node.module != "genpi" else {f"genpi.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "genpi"}
    return found


def test_the_data_layer_imports_nothing_above_it():
    files = sorted((GENPI / "data").glob("*.py"))
    assert {f.stem for f in files} >= {"store", "manifest", "dialogues", "adapters", "runfolder"}
    above = {
        f"{f.relative_to(REPO)} -> {module}"
        for f in files
        for module in genpi_imports(f)
        if module not in ("genpi.InputError", "genpi.__version__") and not module.startswith(DATA_MAY_IMPORT)
    }
    assert not above


def test_the_catalog_does_not_import_the_checks():
    assert "genpi.checks" not in genpi_imports(GENPI / "catalog.py")
    assert "genpi.catalog" in genpi_imports(GENPI / "checks.py")


def test_a_stage_import_is_seen(tmp_path):  # the checker itself: an import inside a function counts
    (tmp_path / "x.py").write_text("def f():\n    from genpi.synth.run import main\n    import genpi.eval.serve\n")
    assert genpi_imports(tmp_path / "x.py") == {"genpi.synth.run", "genpi.eval.serve"}
