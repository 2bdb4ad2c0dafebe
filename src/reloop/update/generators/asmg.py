"""ASMG model generators (Peng et al., RecSys 2021; METHODS.md "Model generators", METHODS-notes §3.4, §3.6).

A meta generator M_ω maps the k most recent base models Θ_{t−k+1..t} to the serving model Θ*_t and is
trained on the *next* period's data with the base models frozen (test-then-train, ASMG Algorithm 1):

    observe(t, Θ_t)  ->  serving_model(Θ_t) = Θ*_t serves D_{t+1}  ->  learn(History(upto=t+1), t+1, ctx)

- :class:`ASMGGRU`: a coordinate-wise GRU (:class:`CoordinateGRU`). Dense (MLP) tensors get one GRU per
  scalar coordinate; an embedding table ``[N, d_e]`` gets one GRU per embedding dimension, shared by
  all N ids. Everything is vectorised: one step of a tensor is a handful of batched matmuls.
- :class:`ASMGLinear`: Θ* = Σ_j softmax(w)_j Θ_{t−k+1+j}, one w per coordinate (per dimension for
  embedding tables), w = 0 at the start (uniform average), trained single-step on D_{t+1}.

Choices that differ from the reference code (``danni9594/ASMG``), each an option:

- ``init='identity'`` **(ours, default)**: residual output θ* = θ_t + w·h' + b with w = 0 and b = 0 at
  the start, so the untrained generator serves exactly the latest base model; the GRU's input and
  recurrent weights start at U(±1/√d) (PyTorch's GRU convention, independent of the tensor size).
  ``init='glorot'`` reproduces the reference: θ* = w·h' + b (no residual) and TF ``glorot_uniform`` on the
  3-D shapes ``[P, a, b]`` (fan_in = a·P, fan_out = b·P), so the untrained output is *not* near θ_t.
- ``gate_bias=True`` **(ours, default)**: r, z and h̃ get biases (zero at the start); the reference has
  none (``gate_bias=False``).
- Warm-up: until the generator was trained ``warmup`` times (default 1) and holds k observed models,
  ``serving_model`` returns the base model unchanged; ``learn`` is a no-op while fewer than k models
  were observed (the reference starts meta-training at the first period with k models, h_0 = 0).
- The padding row (``nn.Embedding.padding_idx``) of generated embedding tables is forced to zero: our
  models pool sequences assuming that row is zero (the TF reference masks instead).
- The meta optimiser (Adam) keeps its state across periods, as IU keeps the base optimiser's.
- The generator trains on plain BCE on logits, whatever loss the base update uses (as the reference).
- Base-model buffers (e.g. batch-norm statistics) are taken from the latest observed model.
- ``sparse_rows=True`` **(ours, speed only)**: during training, embedding tables are generated only on
  the rows the step's batches read (same loss and gradients; checked once against full tables, with a
  fallback). Serving and the hidden-state carry always use full tables.
- ``full`` variant: the window is every model since the first observed one, targets D_{s+1} for each
  Θ_s, linear multi-step weights over the whole window, h_0 = 0.
- Progress: ``ctx.on_batch`` gets the number of rows (over all targets) of each optimisation step.
- ``last_learn_seconds``: wall time of the latest ``learn`` call (≈ 0 when it had nothing to train).

The observed models are snapshotted (detached clones) on ``observe``; the latest observed model object
is kept only as the architecture template for ``functional_forward`` and is not part of the state: a
generator restored with ``load_state_dict`` takes it from the next ``observe`` / ``serving_model`` call.

Modules (this one re-exports their names): ``param_layout`` (parameter specs, snapshots, ``[N, P]``
coordinate rows), ``learned`` (:class:`_LearnedGenerator`: model sequence, meta Adam, warm-up, training
on the next period, state), ``coordinate_gru`` (:class:`CoordinateGRU`), ``asmg_gru`` (:class:`ASMGGRU`,
:func:`loss_weights`), ``asmg_linear`` (:class:`ASMGLinear`).
"""

from __future__ import annotations

from reloop.update.generators.asmg_gru import ASMGGRU, VARIANTS, loss_weights
from reloop.update.generators.asmg_linear import ASMGLinear, LinearMix
from reloop.update.generators.coordinate_gru import CoordinateGRU
from reloop.update.generators.learned import INITS
from reloop.update.generators.param_layout import (
    Params,
    as_rows,
    module_key,
    n_coords,
    param_specs,
    snapshot,
    zero_padding,
)

__all__ = [
    "ASMGGRU",
    "ASMGLinear",
    "CoordinateGRU",
    "INITS",
    "LinearMix",
    "Params",
    "VARIANTS",
    "as_rows",
    "loss_weights",
    "module_key",
    "n_coords",
    "param_specs",
    "snapshot",
    "zero_padding",
]
