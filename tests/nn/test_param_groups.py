"""param_groups: DSL's two learning rates — trunk + attention, and the head with a loss's parameters — with every
trainable parameter in exactly one group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsim.nn import ABEEmbedder, Embedder, param_groups


def _ids(params) -> list[int]:
    return [id(p) for p in params]


def test_dsl_groups_cover_every_parameter_once():
    net = Embedder("resnet10", widen_factor=0.25, embedding_dim=16, n_classes=3)
    betas = nn.Parameter(torch.zeros(4))  # e.g. a margin loss's learnable betas
    groups = param_groups(net, [betas], trunk_lr=1e-5, head_lr=1e-3, weight_decay=1e-4)
    trunk, head = groups
    assert (trunk["name"], trunk["lr"], trunk["weight_decay"]) == ("trunk", 1e-5, 1e-4)
    assert (head["name"], head["lr"], head["weight_decay"]) == ("head", 1e-3, 0.0)
    assert set(_ids(trunk["params"])) == set(_ids(net.backbone.parameters())) | set(_ids(net.attention.parameters()))
    assert set(_ids(head["params"])) == set(_ids(net.embed.parameters())) | \
        set(_ids(net.classifier.parameters())) | {id(betas)}
    every = _ids(trunk["params"]) + _ids(head["params"])
    assert len(every) == len(set(every)) == len(list(net.parameters())) + 1
    opt = torch.optim.Adam(groups)  # torch accepts them, names kept
    assert [g["name"] for g in opt.param_groups] == ["trunk", "head"]


def test_frozen_parameters_are_left_out_and_a_module_counts_as_extra():
    net = Embedder("resnet10", widen_factor=0.25, embedding_dim=16)
    for p in net.backbone[0].parameters():
        p.requires_grad_(False)
    loss = nn.Linear(2, 2)
    trunk, head = param_groups(net, loss, trunk_lr=1e-5, head_lr=1e-3)
    frozen = set(_ids(net.backbone[0].parameters()))
    assert frozen and not frozen & set(_ids(trunk["params"]) + _ids(head["params"]))
    assert set(_ids(loss.parameters())) <= set(_ids(head["params"]))
    assert len(_ids(trunk["params"]) + _ids(head["params"])) == \
        sum(p.requires_grad for p in net.parameters()) + 2


def test_body_names_and_other_models():
    abe = ABEEmbedder("resnet10", widen_factor=0.25, embedding_dim=16, n_learners=2)
    trunk, head = param_groups(abe, trunk_lr=1e-5, head_lr=1e-3, body=("attention_trunk", "attention_heads"))
    assert set(_ids(trunk["params"])) == set(_ids(abe.trunk.parameters())) | \
        set(_ids(abe.attention_trunk.parameters())) | set(_ids(abe.attention_heads.parameters()))
    assert len(_ids(trunk["params"]) + _ids(head["params"])) == len(list(abe.parameters()))
    with pytest.raises(ValueError, match="attention_heads"):
        param_groups(abe, trunk_lr=1e-5, head_lr=1e-3, body=("attention_head",))


def test_shared_extra_and_nothing_trainable_are_errors():
    net = Embedder("resnet10", widen_factor=0.25, embedding_dim=16)
    with pytest.raises(ValueError, match="belong to the network already"):
        param_groups(net, net.embed.parameters(), trunk_lr=1e-5, head_lr=1e-3)
    net.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        param_groups(net, trunk_lr=1e-5, head_lr=1e-3)
