"""One name for the embedding size: ``embedding_dim`` in the bundle configs, the models, run.json and the export
manifest; manifests written before the name was unified (``embedding_size``) still read."""

from __future__ import annotations

from medsim.runtime.manifest import manifest_embedding_dim


def test_embedding_dim_is_read_under_its_one_name_and_the_old_one():
    assert manifest_embedding_dim({"embedding_dim": 128}) == 128
    assert manifest_embedding_dim({"embedding_size": 64}) == 64  # exports made before the rename
    assert manifest_embedding_dim({"embedding_dim": 32, "embedding_size": 64}) == 32
    assert manifest_embedding_dim({}) == 0


def test_the_export_manifest_and_engine_use_embedding_dim(exported, loaded):
    from pathlib import Path

    from medsim.deploy import EmbeddingEngine

    m = exported["manifest"]
    assert m["embedding_dim"] == loaded.network.embedding_dim == loaded.record["network"]["embedding_dim"]
    assert "embedding_size" not in m
    with EmbeddingEngine(Path(exported["onnx_path"]).parent, backend="ort-cpu") as engine:
        assert engine.embedding_dim == engine.embedding_size == m["embedding_dim"]
