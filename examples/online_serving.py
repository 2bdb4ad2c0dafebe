"""(c) ReLoop2's error memory inside your own serving code: predict → feedback → compensated predict.

A model is trained once and then serves a drifting stream without retraining (the case ReLoop2, Zhu
et al., KDD 2023, built its fast loop for). Requests come in small batches; each request's label (click
or not) arrives a little later. ``reloop.CompensatedModel`` looks up the errors the model recently made
on similar requests and corrects the prediction; no gradient step, no retraining.

Run: ``python examples/online_serving.py`` (a few seconds on a CPU; no data files needed).
"""

from __future__ import annotations

from collections import deque

import torch
from torch import nn

import reloop

torch.set_num_threads(1)
USERS, ITEMS, CATEGORIES = 200, 100, 10


class Ranker(nn.Module):
    """Your model; ``score_with_key`` also returns the representation the error memory is keyed on."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.user = nn.Embedding(USERS, dim)
        self.item = nn.Embedding(ITEMS, dim)
        self.category = nn.Embedding(CATEGORIES, dim)
        self.hour = nn.Embedding(24, dim)
        self.hidden = nn.Sequential(nn.Linear(4 * dim, 32), nn.ReLU())
        self.out = nn.Linear(32, 1)
        for table in (self.user, self.item, self.category, self.hour):
            nn.init.normal_(table.weight, std=0.01)

    def forward(
        self, user: torch.Tensor, item: torch.Tensor, category: torch.Tensor, hour: torch.Tensor
    ) -> torch.Tensor:
        return self.score_with_key(user, item, category, hour)[0]

    def score_with_key(
        self, user: torch.Tensor, item: torch.Tensor, category: torch.Tensor, hour: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, key): the key is the field embeddings (reloop's default ``key: embeddings``); the
        input of ``out`` works too: ``CompensatedModel(model, memory, key_layer="out")``."""
        x = torch.cat([self.user(user), self.item(item), self.category(category), self.hour(hour)], dim=1)
        return self.out(self.hidden(x)).squeeze(-1), x


def train(model: nn.Module, periods: list[reloop.Period], epochs: int = 4) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for p in periods:
            order = torch.randperm(len(p), generator=g)
            for s in range(0, len(p), 256):
                idx = order[s : s + 256]
                loss = nn.functional.binary_cross_entropy_with_logits(
                    model(**{k: v[idx] for k, v in p.inputs.items()}), p.labels[idx]
                )
                opt.zero_grad()
                loss.backward()
                opt.step()


class Service:
    """A user's serving code: ``handle`` answers a request batch, ``on_labels`` receives clicks later."""

    def __init__(self, model: Ranker) -> None:
        model.eval()
        memory = reloop.error_memory(32, "sketch", lam=0.5, arrays=64, bits=8)  # keys of width 4 × 8
        self.served = reloop.CompensatedModel(model.score_with_key, memory)  # returns (logits, key)
        self.waiting: dict[int, reloop.Prediction] = {}

    def handle(self, request_id: int, features: dict[str, torch.Tensor]) -> torch.Tensor:
        prediction = self.served.predict(**features)
        self.waiting[request_id] = prediction  # kept until the labels come back
        return prediction.prob

    def on_labels(self, request_id: int, clicks: torch.Tensor) -> None:
        self.served.feedback(self.waiting.pop(request_id), clicks)


def main() -> None:
    periods = reloop.synthetic_periods(
        periods=8, rows_per_period=3000, users=USERS, items=ITEMS, categories=CATEGORIES, seed=3, drift_sigma=0.4
    )
    torch.manual_seed(0)
    model = Ranker()
    train(model, periods[:3])  # trained once, on the first three periods
    service = Service(model)

    delay = 2  # labels arrive two request batches after the prediction
    base, served, labels = [], [], []
    in_flight: deque[tuple[int, torch.Tensor]] = deque()
    request_id = 0
    for period in periods[3:]:
        for s in range(0, len(period), 100):  # request batches of 100 impressions
            features = {k: v[s : s + 100] for k, v in period.inputs.items()}
            clicks = period.labels[s : s + 100]
            served.append(service.handle(request_id, features))
            base.append(service.waiting[request_id].base)
            labels.append(clicks)
            in_flight.append((request_id, clicks))
            while len(in_flight) > delay:
                service.on_labels(*in_flight.popleft())
            request_id += 1
    y, p_base, p_served = torch.cat(labels).numpy(), torch.cat(base).numpy(), torch.cat(served).numpy()
    ll_base, ll_served = reloop.logloss(y, p_base), reloop.logloss(y, p_served)
    auc_base, auc_served = reloop.auc(y, p_base), reloop.auc(y, p_served)
    print(
        f"{request_id} request batches, {len(y):,} impressions, memory holds "
        f"{service.served.memory.n_written:,} labelled rows"
    )
    print(f"base model       : AUC {auc_base:.4f}  LogLoss {ll_base:.4f}")
    print(f"with error memory: AUC {auc_served:.4f}  LogLoss {ll_served:.4f}")
    assert ll_served < ll_base and auc_served > auc_base, "compensation did not help"
    assert len(service.waiting) == delay  # the last batches' labels are still in flight
    print("ok")


if __name__ == "__main__":
    main()
