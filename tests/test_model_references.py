"""Model references as users type them: ``package:`` files stay inside their package, and
every spelling of one model has one canonical name (what the demo's cache is keyed on)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import fluid_app
from fluid_app.errors import FluidError
from fluid_app.model_refs import DEFAULT_MODEL_DIR, canonical_reference, resolve_model

PACKAGE_DIR = Path(fluid_app.__file__).resolve().parent


def test_package_reference_cannot_leave_its_package(tmp_path):
    outside = tmp_path / "not-in-the-package.gguf"
    outside.write_bytes(b"GGUF")
    escape = "package:fluid_app/" + os.path.relpath(outside, PACKAGE_DIR)  # fluid_app/../../../tmp/...
    assert (PACKAGE_DIR / os.path.relpath(outside, PACKAGE_DIR)).exists()
    for reference in (escape, "package:fluid_app/../../../../../../etc/passwd", "package:fluid_app/.",
                      "package:fluid_app/default_model/../.."):
        for resolve in (resolve_model, canonical_reference):
            with pytest.raises(FluidError, match="outside the package|not a package file") as caught:
                resolve(reference)
            assert caught.value.params == ("model",)
    with pytest.raises(FluidError, match="not a package file"):  # a dotted name would import its parents
        resolve_model("package:email.mime/x.gguf")
    # a file inside the package still resolves
    inside = "package:fluid_app/default_model/fluid_config.json"
    assert canonical_reference(inside) == str(DEFAULT_MODEL_DIR.resolve() / "fluid_config.json")


def test_spellings_of_the_default_model_share_one_canonical_name(monkeypatch):
    monkeypatch.chdir(PACKAGE_DIR.parent)
    names = {canonical_reference(r) for r in ("default", " default ", "fluid_app/default_model",
                                              "./fluid_app/default_model/", str(DEFAULT_MODEL_DIR),
                                              f"{PACKAGE_DIR}/../fluid_app/default_model")}
    assert names == {str(DEFAULT_MODEL_DIR.resolve())}
    with pytest.raises(FluidError, match="not found") as caught:
        canonical_reference("./no/such/model")
    assert caught.value.params == ("model",)
