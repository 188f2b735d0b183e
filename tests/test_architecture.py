"""The import contracts in pyproject.toml cover the whole package: the loss core's forbidden list names every other
top-level module, and every modality folder is in the independence contract."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _contracts() -> dict:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {c["name"]: c for c in doc["tool"]["importlinter"]["contracts"]}


def _top_level() -> set[str]:
    pkg = ROOT / "mmalign"
    names = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"}
    names |= {p.name for p in pkg.iterdir() if (p / "__init__.py").is_file()}
    return {f"mmalign.{n}" for n in names}


def test_the_loss_core_contract_names_every_other_module():
    forbidden = set(_contracts()["The loss core imports nothing else of mmalign"]["forbidden_modules"])
    assert forbidden == _top_level() - {"mmalign.losses"}


def test_the_sampler_maths_contract_names_every_other_module():
    forbidden = set(_contracts()["The sampler maths imports nothing else of mmalign"]["forbidden_modules"])
    assert forbidden == _top_level() - {"mmalign.samplers"}


def test_every_modality_with_an_adapter_is_in_the_independence_contract():
    modalities = {f"mmalign.{p.parent.name}" for p in (ROOT / "mmalign").glob("*/adapter.py")}
    assert modalities >= {"mmalign.t2i", "mmalign.vlm"}
    assert set(_contracts()["Modality packages are independent of each other"]["modules"]) == modalities
