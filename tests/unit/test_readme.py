"""The README documents every setting and every Redis key (it is the operators' reference)."""

from __future__ import annotations

import inspect
from pathlib import Path

from shared.keys import Keys
from shared.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    missing = [f"TANDEM_{name.upper()}" for name in Settings.model_fields if f"TANDEM_{name.upper()}" not in README]
    assert not missing, f"README lacks {missing}"


def test_every_key_is_documented() -> None:
    k = Keys("tandem")
    sid = "<id>"
    names: list[str] = []
    for name, member in inspect.getmembers(Keys):
        if name.startswith("_") or name in ("prefix", "stream_keys", "stream_id_from_key"):
            continue
        if isinstance(member, property):
            names.append(getattr(k, name))
        elif callable(member):
            params = list(inspect.signature(member).parameters)[1:]
            args = [sid if p == "stream_id" else ("a" if p == "source" else f"<{p.split('_')[0]}>") for p in params]
            names.append(member(k, *args))
    undocumented = [n for n in names if n.replace(":a", "").replace(":lease:a", ":lease:") not in README and n not in README]
    assert not undocumented, f"README's Redis layout lacks {undocumented}"
