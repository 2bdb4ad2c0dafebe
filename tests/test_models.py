"""Contract suite of the model zoo: every registered model passes every test here.

The feature map has three categorical fields (one ``item_id``), a numeric field, a multi-hot ``genres``
sequence with its own table and a ``history`` sequence sharing the item table (so the sequence models
find their target and sequence by themselves).
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from reloop.data.schema import PAD, EncodedField, FeatureMap
from reloop.models import MODELS, build_model, load_model, save_model
from reloop.models.ftrl import FTRL, make_ftrl, optimizer_for
from reloop.models.sequence import masked_softmax, recency_positions, resolve_sequence_fields

SIZES = {"user_id": 40, "item_id": 60, "category": 8, "genres": 12}
MAX_LEN = {"genres": 3, "history": 5}
FMAP = FeatureMap(
    fields=[
        EncodedField(name="user_id", kind="categorical", table="user_id", size=SIZES["user_id"]),
        EncodedField(name="item_id", kind="categorical", table="item_id", size=SIZES["item_id"]),
        EncodedField(name="category", kind="categorical", table="category", size=SIZES["category"]),
        EncodedField(name="price", kind="numeric", table="price", size=0),
        EncodedField(name="genres", kind="sequence", table="genres", size=SIZES["genres"], max_len=MAX_LEN["genres"]),
        EncodedField(
            name="history", kind="sequence", table="item_id", size=SIZES["item_id"], max_len=MAX_LEN["history"]
        ),
    ]
)
NAMES = sorted(MODELS)
SEQUENCE_MODELS = ["bst", "dien", "din"]


def make_batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random rows: ids from 1 (OOV) up, sequences of random length (some empty), right-padded."""
    g = torch.Generator().manual_seed(seed)
    batch = {name: torch.randint(1, SIZES[name], (n,), generator=g) for name in ("user_id", "item_id", "category")}
    batch["price"] = torch.randn(n, generator=g)
    for name, table in (("genres", "genres"), ("history", "item_id")):
        ids = torch.randint(1, SIZES[table], (n, MAX_LEN[name]), generator=g)
        lengths = torch.randint(0, MAX_LEN[name] + 1, (n, 1), generator=g)
        batch[name] = torch.where(torch.arange(MAX_LEN[name]) < lengths, ids, PAD)
    batch["label"] = torch.randint(0, 2, (n,), generator=g).float()
    return batch


BATCH = make_batch(64, seed=1)


def build(name: str, seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    return build_model({"name": name, **options}, FMAP)


@functools.cache
def built(name: str) -> nn.Module:
    """One eval-mode instance per model, shared by read-only tests."""
    return build(name).eval()


def outputs(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(batch, with_hidden=True)


# --------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", NAMES)
def test_metadata(name):
    cls = MODELS[name]
    assert cls.name == name and cls.paper and cls.__doc__


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_hidden(name):
    model = built(name)
    logits, h = outputs(model, BATCH)
    assert logits.shape == (64,)
    assert h.shape == (64, model.head.in_features)
    assert torch.isfinite(logits).all() and torch.isfinite(h).all()
    with torch.no_grad():
        torch.testing.assert_close(model(BATCH), logits, rtol=0, atol=0)
        torch.testing.assert_close(model.hidden(BATCH), h, rtol=0, atol=0)
        torch.testing.assert_close(model.head(h).squeeze(-1), logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_memory_keys(name):
    """Every model gives both error-memory keys; the embeddings key is caught from the forward pass."""
    model = built(name)
    with torch.no_grad():
        plain = model(BATCH)
        for key in ("hidden", "embeddings"):
            logits, k = model.forward_key(BATCH, key)
            assert k.shape == (64, model.key_dim(key)) and torch.isfinite(k).all(), key
            torch.testing.assert_close(logits, plain, rtol=0, atol=0)
        _, k = model.forward_key(BATCH, "embeddings")
        torch.testing.assert_close(k, model.key_embedding()(BATCH).flatten(1), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    model = build(name).train()
    loss = F.binary_cross_entropy_with_logits(model(BATCH), BATCH["label"])
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding) and mod.padding_idx is not None:
            assert (mod.weight.grad[mod.padding_idx] == 0).all(), f"{name}: padding row of {mod_name} moved"


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name, tmp_path):
    model = build(name)
    # a few training steps so the checkpoint is not the initialisation (and BN statistics move)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(BATCH), BATCH["label"]).backward()
        opt.step()
    model.eval()
    path = tmp_path / "model.pt"
    save_model(model, path)
    loaded = load_model(path, FMAP).eval()
    assert type(loaded) is type(model)
    for a, b in zip(outputs(model, BATCH), outputs(loaded, BATCH)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = FeatureMap(fields=[f if f.name != "item_id" else f.model_copy(update={"size": 61}) for f in FMAP.fields])
    with pytest.raises(ValueError, match="feature map"):
        load_model(path, other)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_model(name):
    a, b = build(name, seed=3).eval(), build(name, seed=3).eval()
    for x, y in zip(outputs(a, BATCH), outputs(b, BATCH)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    c = build(name, seed=4).eval()
    assert not torch.equal(outputs(a, BATCH)[0], outputs(c, BATCH)[0])


@pytest.mark.parametrize("name", NAMES)
def test_param_groups(name):
    model = built(name)
    groups = model.param_groups()
    assert set(groups) == {n for n, _ in model.named_parameters()}
    assert set(groups.values()) <= {"embedding", "dense"}
    assert "embedding" in groups.values() and "dense" in groups.values()
    modules = dict(model.named_modules())
    for pname, group in groups.items():
        owner = modules[pname.rpartition(".")[0]]
        assert (group == "embedding") == isinstance(owner, nn.Embedding)


@pytest.mark.parametrize("name", NAMES)
def test_functional_call(name):
    model = built(name)
    own = dict(model.named_parameters())
    logits, h = torch.func.functional_call(model, own, (BATCH,), {"with_hidden": True})
    ref_logits, ref_h = outputs(model, BATCH)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    torch.testing.assert_close(h, ref_h, rtol=0, atol=0)
    # generated weights (ASMG): every parameter is read from the dict, and gradients reach the dict
    gen = {k: (v.detach() * 1.1).requires_grad_() for k, v in own.items()}
    logits, h = torch.func.functional_call(model, gen, (BATCH,), {"with_hidden": True})
    twin = copy.deepcopy(model)
    twin.load_state_dict({k: v.detach() for k, v in gen.items()}, strict=False)
    torch.testing.assert_close(logits, outputs(twin, BATCH)[0], rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(logits.sum() + h.sum(), list(gen.values()))  # raises if one is unused
    assert all(g is not None for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_raises(name):
    with pytest.raises(ValueError, match="bogus"):
        build_model({"name": name, "bogus": 1}, FMAP)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast(name):
    model = built(name)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, h = model(BATCH, with_hidden=True)
    assert logits.shape == (64,) and torch.isfinite(logits.float()).all()
    # The one-unit output layer runs in float32 under autocast (no bf16 cast of h and its gradient).
    assert logits.dtype == torch.float32
    expected = torch.nn.functional.linear(h.float(), model.head.weight, model.head.bias).squeeze(-1)
    assert torch.equal(logits, expected)


# ------------------------------------------------------------------------------------------- learning
def planted_rows(n: int, seed: int = 0) -> tuple[dict, dict]:
    """Labels from a logistic model with random per-id weights (user, item, category) and a price slope."""
    g = torch.Generator().manual_seed(seed)
    batch = make_batch(n, seed=seed + 100)
    logit = 0.5 * batch["price"] - 0.5
    for field in ("user_id", "item_id", "category"):
        w = torch.randn(SIZES[field], generator=g) * 1.2
        logit = logit + w[batch[field]]
    batch["label"] = torch.bernoulli(torch.sigmoid(logit), generator=g)
    split = int(0.8 * n)
    train = {k: v[:split] for k, v in batch.items()}
    test = {k: v[split:] for k, v in batch.items()}
    return train, test


TRAIN, TEST = planted_rows(5000)
SMALL_NET = {"embedding_dim": 8, "hidden_units": [64, 32]}  # the defaults learn too; this keeps the suite fast


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 150, batch_size: int = 256) -> float:
    """Train on TRAIN, return the held-out log loss and check it beats the constant predictor."""
    g = torch.Generator().manual_seed(0)
    n = TRAIN["label"].shape[0]
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=g)
        batch = {k: v[idx] for k, v in TRAIN.items()}
        optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(model(batch), batch["label"]).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        loss = F.binary_cross_entropy_with_logits(model(TEST), TEST["label"]).item()
    p = TRAIN["label"].mean().item()
    y = TEST["label"]
    constant = -(y * math.log(p) + (1 - y) * math.log(1 - p)).mean().item()
    assert loss < constant - 0.02, f"held-out log loss {loss:.4f} does not beat the constant {constant:.4f}"
    return loss


@pytest.mark.parametrize("name", NAMES)
def test_learns_planted_signal(name):
    model = build(name, **SMALL_NET)
    fit(model, torch.optim.Adam(model.parameters(), lr=5e-3))


# ------------------------------------------------------------------------------------------- padding
def spread_padding(batch: dict, extra: int, seed: int) -> dict:
    """Same real items in the same order, moved to random positions of a row ``extra`` columns wider."""
    g = torch.Generator().manual_seed(seed)
    out = dict(batch)
    for name in MAX_LEN:
        ids = batch[name]
        n, width = ids.shape[0], ids.shape[1] + extra
        new = torch.zeros(n, width, dtype=ids.dtype)
        for r in range(n):
            real = ids[r][ids[r] != PAD]
            slots = torch.randperm(width, generator=g)[: len(real)].sort().values
            new[r, slots] = real
        out[name] = new
    return out


SMALL = make_batch(8, seed=5)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=12, deadline=None, derandomize=True)
@given(extra=st.integers(0, 4), seed=st.integers(0, 2**31 - 1))
def test_padding_invariance(name, extra, seed):
    model = built(name)
    for a, b in zip(outputs(model, SMALL), outputs(model, spread_padding(SMALL, extra, seed))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # summation order may differ by an ulp


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_sequence_models_ignore_padding_content(name):
    """The attended sequence is masked explicitly: what sits in the padding row does not matter."""
    model = copy.deepcopy(built(name))
    before = outputs(model, BATCH)
    with torch.no_grad():
        model.embedding.tables["item_id"].weight[PAD].normal_()
    assert (BATCH["item_id"] != PAD).all()
    for a, b in zip(before, outputs(model, BATCH)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_sequence_models_find_or_reject_fields(name):
    model = built(name)
    assert (model.target, model.sequence) == ("item_id", "history")
    explicit = build(name, target="item_id", sequence="history")
    assert explicit.sequence == "history"
    no_history = FeatureMap(fields=[f for f in FMAP.fields if f.name != "history"])
    with pytest.raises(ValueError, match="sequence"):
        build_model({"name": name}, no_history)
    with pytest.raises(ValueError, match="model.target"):
        build(name, target="price")
    with pytest.raises(ValueError, match="model.sequence"):
        build(name, sequence="user_id")


def test_resolve_sequence_fields():
    assert resolve_sequence_fields(FMAP, None, None, "din") == ("item_id", "history")
    assert resolve_sequence_fields(FMAP, "item_id", None, "din") == ("item_id", "history")
    assert resolve_sequence_fields(FMAP, None, "history", "din") == ("item_id", "history")
    with pytest.raises(ValueError, match="shares its embedding table"):
        resolve_sequence_fields(FMAP, "user_id", None, "din")


def test_masked_softmax_and_positions():
    mask = torch.tensor([[True, False, True], [False, False, False]])
    p = masked_softmax(torch.tensor([[1.0, 50.0, 1.0], [1.0, 2.0, 3.0]]), mask)
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 0.0]]))
    pos = recency_positions(torch.tensor([[True, False, True, True, False]]))
    assert pos[0, [0, 2, 3]].tolist() == [2, 1, 0]


# ------------------------------------------------------------------------------------------- variants
VARIANTS = [
    {"name": "dcnv2", "low_rank": 8},
    {"name": "dcnv2", "low_rank": 8, "num_experts": 3},
    {"name": "dcnv2", "structure": "stacked"},
    {"name": "xdeepfm", "cin_layer_units": [8]},
    {"name": "afn", "ensemble_dnn": False, "batch_norm": False, "log_neurons": 8},
    {"name": "autoint", "dnn": False, "use_scale": True, "use_residual": False},
    {"name": "din", "attention_softmax": True},
    {"name": "dien", "gru_dim": 7},
    {"name": "bst", "transformer_layers": 2, "num_heads": 4},
    {"name": "lr", "optimizer": "ftrl", "ftrl_l1": 0.1},
]


@pytest.mark.parametrize("config", VARIANTS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_variants(config):
    torch.manual_seed(0)
    model = build_model(config, FMAP)
    logits, h = model(BATCH, with_hidden=True)
    assert logits.shape == (64,) and h.shape == (64, model.head.in_features)
    F.binary_cross_entropy_with_logits(logits, BATCH["label"]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    gen = {k: v.detach() for k, v in model.named_parameters()}
    out = torch.func.functional_call(model, gen, (BATCH,))
    torch.testing.assert_close(out, logits.detach())


def test_dcnv2_mixture_needs_low_rank():
    with pytest.raises(ValueError, match="low_rank"):
        build_model({"name": "dcnv2", "num_experts": 2}, FMAP)


def test_fm_is_textbook_fm():
    model = build("fm").eval()
    with torch.no_grad():
        emb, w = model.embedding(BATCH), model.linear(BATCH).squeeze(-1)
        pairwise = sum((emb[:, i] * emb[:, j]).sum(-1) for i in range(6) for j in range(i + 1, 6))
        torch.testing.assert_close(model(BATCH), model.head.bias + w.sum(-1) + pairwise)
    # FmFM starts as FM (identity field matrices, same seed -> same embeddings)
    fmfm = build("fmfm").eval()
    fmfm.embedding.load_state_dict(model.embedding.state_dict())
    fmfm.linear.load_state_dict(model.linear.state_dict())
    torch.testing.assert_close(outputs(fmfm, BATCH)[0], outputs(model, BATCH)[0])


def test_lr_head_sums_first_order_weights():
    model = build("lr").eval()
    logits, h = outputs(model, BATCH)
    assert h.shape == (64, FMAP.num_fields)
    torch.testing.assert_close(logits, h.sum(-1))


# ------------------------------------------------------------------------------------------------ FTRL
def test_ftrl_matches_hand_computed_steps():
    """Algorithm 1 of McMahan et al. (2013) from w = 0, alpha = 0.1, beta = 1, by hand."""
    w = nn.Parameter(torch.zeros(1))
    opt = make_ftrl([w], alpha=0.1, beta=1.0, l1=0.0, l2=0.0)
    # step 1: g = 2. n: 0 -> 4, σ = (2 - 0) / 0.1 = 20, z = 0 + 2 - 20·0 = 2, w = -2 / ((1 + 2) / 0.1) = -1/15
    (2.0 * w).sum().backward()
    opt.step()
    assert w.item() == pytest.approx(-1 / 15, rel=1e-6)
    # step 2: g = -1. n: 4 -> 5, σ = (√5 - 2) / 0.1, z = 2 - 1 - σ·(-1/15), w = -z / ((1 + √5) / 0.1)
    opt.zero_grad()
    (-1.0 * w).sum().backward()
    opt.step()
    z = 1 + (math.sqrt(5) - 2) / 0.1 / 15
    assert w.item() == pytest.approx(-z / ((1 + math.sqrt(5)) / 0.1), rel=1e-6)
    # L1 and L2: z = 2 as in step 1, w = -(z - λ1) / ((β + √n)/α + λ2) = -(2 - 1) / (30 + 2)
    w = nn.Parameter(torch.zeros(1))
    opt = FTRL([w], alpha=0.1, beta=1.0, l1=1.0, l2=2.0)
    (2.0 * w).sum().backward()
    opt.step()
    assert w.item() == pytest.approx(-1 / 32, rel=1e-6)


def test_ftrl_from_nonzero_init_is_a_step_from_it():
    """z starts where the closed form gives w0: the first step is w0 - α g / (β + |g|), for any λ1, λ2."""
    for l1, l2 in ((0.0, 0.0), (0.5, 1.0)):
        w = nn.Parameter(torch.tensor([0.5, -0.5]))
        opt = FTRL([w], alpha=0.1, beta=1.0, l1=l1, l2=l2)
        (torch.tensor([0.0, 0.0]) * w).sum().backward()
        opt.step()
        assert w.tolist() == pytest.approx([0.5, -0.5])  # no gradient: untouched
        opt.zero_grad()
        (torch.tensor([2.0, 0.0]) * w).sum().backward()
        opt.step()
        # z = -(10 + λ2)·0.5 - λ1 + 2 - 20·0.5 ; w = -(z + λ1) / (30 + λ2)
        z = -(10 + l2) * 0.5 - l1 + 2 - 10
        expected = -(z + l1) / (30 + l2) if abs(z) > l1 else 0.0
        assert w[0].item() == pytest.approx(expected, rel=1e-6)
        assert w[1].item() == pytest.approx(-0.5)
        if l1 == l2 == 0.0:
            assert w[0].item() == pytest.approx(0.5 - 0.1 * 2 / 3, rel=1e-6)


def test_ftrl_l1_gives_exact_zeros():
    w = nn.Parameter(torch.zeros(3))
    opt = FTRL([w], alpha=0.1, beta=1.0, l1=3.0)
    g = torch.tensor([2.0, 5.0, -4.0])
    (g * w).sum().backward()
    opt.step()
    # |z| = |g| (from w = 0): 2 <= 3 -> exactly 0; 5 -> -(5 - 3)/((1 + 5)/0.1); -4 -> -(-4 + 3)/((1 + 4)/0.1)
    assert w[0].item() == 0.0
    assert w[1].item() == pytest.approx(-2 / 60, rel=1e-6)
    assert w[2].item() == pytest.approx(1 / 50, rel=1e-6)


def test_ftrl_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="alpha"):
        make_ftrl([nn.Parameter(torch.zeros(1))], alpha=0.0)


def test_lr_with_ftrl_learns_and_is_sparse_with_l1():
    model = build("lr", optimizer="ftrl", ftrl_alpha=0.1)
    opt = optimizer_for(model)
    assert isinstance(opt, FTRL)
    assert optimizer_for(build("lr")) is None
    fit(model, opt, steps=300)
    sparse = build("lr", optimizer="ftrl", ftrl_alpha=0.1, ftrl_l1=5.0)
    fit_steps = optimizer_for(sparse)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = torch.randint(0, TRAIN["label"].shape[0], (256,), generator=g)
        batch = {k: v[idx] for k, v in TRAIN.items()}
        fit_steps.zero_grad()
        F.binary_cross_entropy_with_logits(sparse(batch), batch["label"]).backward()
        fit_steps.step()
    table = sparse.linear.tables["user_id"].weight
    seen = torch.unique(TRAIN["user_id"])
    assert (table[seen] == 0).sum() > 0
