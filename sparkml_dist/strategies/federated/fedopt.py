"""Server optimizers applied to the averaged client update (the "pseudo-gradient").

Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar, McMahan. "Adaptive Federated
Optimization", ICLR 2021 (Algorithm 2: FedAdagrad, FedYogi, FedAdam). With ``fedavg`` the server
step is ``x += server_lr * delta`` (server_lr = 1 is McMahan et al.'s FedAvg).

Torch only; the moments are the whole state and go into every round checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ServerOptSettings:
    """The slice of the federated config the server optimizer needs."""

    kind: str = "fedavg"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3


class ServerOptimizer:
    """``step(x, delta)`` returns the next global model from the averaged update ``delta``
    (client weights minus the global weights, averaged)."""

    def __init__(self, settings: ServerOptSettings, size: int) -> None:
        if settings.kind not in ("fedavg", "fedadam", "fedyogi"):
            raise ValueError(f"unknown server optimizer {settings.kind!r}; expected fedavg, "
                             "fedadam or fedyogi")
        self.s = settings
        self.m = torch.zeros(size, dtype=torch.float32)
        # The paper initialises v_{-1} >= tau^2.
        self.v = torch.full((size,), settings.tau ** 2, dtype=torch.float32)

    def step(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        s = self.s
        if s.kind == "fedavg":
            return x + s.lr * delta
        self.m = s.beta1 * self.m + (1 - s.beta1) * delta
        d2 = delta * delta
        if s.kind == "fedadam":
            self.v = s.beta2 * self.v + (1 - s.beta2) * d2
        else:  # fedyogi
            self.v = self.v - (1 - s.beta2) * d2 * torch.sign(self.v - d2)
        return x + s.lr * self.m / (self.v.sqrt() + s.tau)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.s.kind, "m": self.m.clone(), "v": self.v.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["kind"] != self.s.kind:
            raise ValueError(f"checkpoint holds {state['kind']} server state; this job uses "
                             f"{self.s.kind}. Resume with strategy.server_optimizer="
                             f"{state['kind']}.")
        self.m, self.v = state["m"].clone(), state["v"].clone()
