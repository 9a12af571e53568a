"""fastsft/cli/doctor.py (`fastsft doctor`): the installed versions against the tested ranges (the ranges
themselves are tests/test_machine.py's)."""

from fastsft import machine
from fastsft.cli import doctor


def test_doctor_holds_unsloth_to_the_gpu_extras_ranges(monkeypatch):
    real = machine.version
    monkeypatch.setattr(
        machine, "version", lambda p: {"unsloth": "2026.10.7", "trl": "1.16.0"}.get(p) or real(p)
    )
    rows = {r["package"]: r for r in doctor.check_versions()}
    assert not rows["trl"]["ok"] and rows["trl"]["note"].startswith("unsloth needs trl")
    monkeypatch.setattr(
        machine, "version", lambda p: None if p == "unsloth" else {"trl": "1.16.0"}.get(p) or real(p)
    )
    assert {r["package"]: r for r in doctor.check_versions()}["trl"]["ok"]
