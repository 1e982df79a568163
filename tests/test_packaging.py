"""`pip install .` (not editable) gives a working genpi: a wheel built from the source, installed into a fresh
virtualenv, run from a folder outside the repository. Offline: the wheel is built without build isolation, and
the venv sees the third-party packages of the interpreter running the tests through a path in a .pth file, which
does not run that folder's own .pth files, so the editable genpi's finder stays out and the wheel's genpi is the
only one. Also: the version, the optional parts' error, the requirements."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

import genpi
from genpi.cli import main

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
WHEEL_VERSION = f"{VERSION}.post7"  # the wheel's: an installed genpi reports its metadata's version, not a constant


def test_version_is_the_projects(capsys):
    assert genpi.__version__ == VERSION  # a source checkout: its pyproject.toml's
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f"genpi {VERSION}"


def test_requirements_state_ranges_and_extras():
    requires = {r.split(";")[0].replace(" ", "") for r in PYPROJECT["project"]["dependencies"]}
    torch = next(r for r in requires if r.startswith("torch"))
    assert "==" not in torch and ">=2.13" in torch  # a range; scripts/install.sh pins the CPU build
    assert "torch==2.13.0" in (REPO / "scripts" / "install.sh").read_text()
    assert any(r.startswith("duckdb>=2.0") for r in requires)
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"serve", "report", "gguf", "vllm", "all"} <= set(extras)
    optional = {"starlette", "uvicorn", "matplotlib", "gguf"}
    assert not {r.split(">")[0].split("=")[0] for r in requires} & optional  # optional parts are not required
    assert ".[all,test]" in (REPO / "scripts" / "install.sh").read_text()  # the README's install: everything


def test_a_missing_optional_part_names_its_extra(monkeypatch, capsys, tmp_path):
    # `import starlette` (and its submodules, which an earlier test may have imported) now fail as if not installed
    for name in ["starlette", *[m for m in sys.modules if m.startswith("starlette.")]]:
        monkeypatch.setitem(sys.modules, name, None)
    for name in [m for m in sys.modules if m.startswith("genpi.serve")]:
        monkeypatch.delitem(sys.modules, name)
    assert main(["serve", str(tmp_path), "--catalog", str(tmp_path / "c.yaml")]) == 2
    assert "pip install 'genpi[serve]'" in capsys.readouterr().err

    import genpi.models

    find_spec = genpi.models.importlib.util.find_spec
    monkeypatch.setattr(genpi.models.importlib.util, "find_spec", lambda n: None if n == "gguf" else find_spec(n))
    with pytest.raises(ModuleNotFoundError, match=r"genpi\[gguf\]") as missing:
        genpi.models.bundled_gguf()
    assert missing.value.name == "gguf"


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{argv}: {result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with genpi installed from a wheel built here (its bin folder)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"  # a copy: building writes build/ and genpi.egg-info/ beside the sources
    shutil.copytree(REPO / "genpi", src / "genpi", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "README.md", src / "README.md")
    pyproject = (REPO / "pyproject.toml").read_text()
    (src / "pyproject.toml").write_text(pyproject.replace(f'version = "{VERSION}"', f'version = "{WHEEL_VERSION}"', 1))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(src)], tmp)
    (wheel,) = (tmp / "dist").glob("genpi-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp)
    (site,) = (venv / "lib").glob("python*/site-packages")
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "third_party.pth").write_text("".join(f"{p}\n" for p in sorted(paths)))
    run([str(venv / "bin" / "python"), *pip[1:], "install", "--no-deps", "--no-index", str(wheel)], tmp)
    return wheel, venv / "bin"


@pytest.mark.slow
def test_the_wheel_ships_the_package_data(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    data = {p.relative_to(REPO).as_posix() for p in (REPO / "genpi").rglob("*") if p.is_file()}
    data = {p for p in data if not p.endswith((".py", ".pyc")) and "__pycache__" not in p}
    assert {"genpi/presets/demo.yaml", "genpi/presets/paper.yaml", "genpi/eval/model_configs/llama-3-8b.json"} <= data
    assert data <= names  # every data file of the package
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert f"Version: {WHEEL_VERSION}" in text and "Provides-Extra: serve" in text and "Provides-Extra: gguf" in text


@pytest.mark.slow
def test_the_installed_genpi_works_outside_the_repository(installed, tiny_model, tmp_path):
    _, bin = installed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert run([str(bin / "genpi"), "--version"], elsewhere).stdout.strip() == f"genpi {WHEEL_VERSION}"
    # the installed package, not the repository's, with its presets read from the package data
    script = (
        "import dataclasses, json, genpi, genpi.runconfig as r; "
        "presets = {k: dataclasses.asdict(v) for k, v in r.PRESETS.items()}; "
        "print(json.dumps([genpi.__file__, str(r.PRESET_DIR), presets]))"
    )
    where, presets_dir, presets = json.loads(run([str(bin / "python"), "-c", script], elsewhere).stdout)
    venv = bin.parent.resolve()
    assert Path(where).resolve().is_relative_to(venv) and Path(presets_dir).resolve().is_relative_to(venv)
    from genpi.runconfig import PRESETS

    assert presets == json.loads(json.dumps({k: dataclasses.asdict(v) for k, v in PRESETS.items()}))
    # the model config shipped as package data: the analytic efficiency of llama-3-8b (tokens by the tiny tokenizer)
    catalog = str(REPO / "examples" / "agents.yaml")
    efficiency = [str(bin / "genpi"), "eval", "efficiency", "--catalog", catalog, "--prompt", "bakery-fr"]
    efficiency += [
        "--turns",
        "2",
        "--model-config",
        "llama-3-8b",
        "--base",
        tiny_model,
        "--out",
        str(tmp_path / "eval"),
    ]
    efficiency += ["--json"]
    result = json.loads(run(efficiency, elsewhere).stdout)
    assert result["model_config"].endswith("llama-3-8b.json") and Path(result["model_config"]).resolve().is_relative_to(
        venv
    )
    # the demo's preset through the installed genpi run: its cost, with nothing run
    dry = [str(bin / "genpi"), "run", catalog, "--out", str(tmp_path / "run"), "--base", tiny_model]
    printed = run([*dry, "--generator", tiny_model, "--dry-run"], elsewhere).stdout
    assert "1 prompt, 48 dialogues each" in printed and not (tmp_path / "run").exists()
