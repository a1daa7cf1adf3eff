"""The exported modelling file is smoe's own torch-only modules, importable without smoe."""

from __future__ import annotations

import ast

import pytest

from smoe.launcher.export import bundle


def test_the_bundle_imports_only_the_standard_library_torch_and_transformers():
    tree = ast.parse(bundle.bundle())
    imported = {(node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
                for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assert "smoe" not in imported and "deepspeed" not in imported
    assert {"torch", "transformers"} <= imported
    defined = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    defined |= {target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
                if isinstance(target, ast.Name)}
    assert {"RandomFrozenRouter", "LearnedRouter", "HashRouter", "RoutedExperts", "TransformerXL",
            "SMoETransformerXLForCausalLM", "SMoEBertForMaskedLM", "SMoERobertaConfig"} <= defined


def test_a_module_that_needs_deepspeed_or_a_later_module_is_refused(monkeypatch):
    monkeypatch.setattr(bundle, "PORTABLE", ("smoe.routing.routers", "smoe.model.mlp", "smoe.model.moe"))
    with pytest.raises(ValueError, match="moe.py imports deepspeed: an exported model may need only torch"):
        bundle.bundle()
    monkeypatch.setattr(bundle, "PORTABLE", ("smoe.model.mixture",))
    with pytest.raises(ValueError, match=r"mixture.py imports \['COMBINES', 'default_path', 'scaled'\] from smoe"):
        bundle.bundle()
