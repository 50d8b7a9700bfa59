"""The rows of a measurement: the whole model, then each parameter tensor, then each module.

Every row is a sum of per-parameter statistics, and the estimator is linear in them, so per-layer and per-module
noise scales come from the same additive statistics as the total (McCandlish et al. 2018, App. A, applied to a
subset of the parameters).
"""

from __future__ import annotations

import torch

__all__ = ["RowLayout"]


class RowLayout:
    """Which parameters add up into which row: the total, each parameter (if ``per_layer``), each module.

    Args:
        param_names: the measured parameters, in the order of the statistics (``"encoder.0.weight"``).
        per_layer: also one row per parameter and per module (the module of ``a.b.weight`` is ``a.b``).
    """

    def __init__(self, param_names: list[str], per_layer: bool) -> None:
        self.per_layer = per_layer
        self.layer_names = param_names if per_layer else []
        modules: dict[str, int] = {}
        owner = []
        for n in param_names:
            owner.append(modules.setdefault(n.rpartition(".")[0], len(modules)))
        self.module_names = list(modules) if per_layer else []
        self._owner_list = owner
        self._owner = torch.tensor(owner, dtype=torch.long)
        self.n_rows = 1 + len(self.layer_names) + len(self.module_names)
        self.row_names = ["total", *self.layer_names, *(f"module:{m}" for m in self.module_names)]
        self._matrix: torch.Tensor | None = None

    def host_rows(self, per_param: list[float]) -> list[float]:
        """Per-parameter sums -> rows (total, parameters, modules), on the host."""
        total = sum(per_param)
        if not self.per_layer:
            return [total]
        modules = [0.0] * len(self.module_names)
        for value, owner in zip(per_param, self._owner_list):
            modules[owner] += value
        return [total, *per_param, *modules]

    def rows(self, per_param: torch.Tensor) -> torch.Tensor:
        """``(2, P)`` per-parameter sums -> ``(2, R)`` rows (total, parameters, modules): one matmul."""
        if self._matrix is None or self._matrix.device != per_param.device:
            n_params = self._owner.shape[0]
            # (P, R) 0/1 matrix: column 0 sums everything, then the identity, then module membership.
            matrix = torch.zeros(n_params, self.n_rows, dtype=torch.float64)
            matrix[:, 0] = 1.0
            if self.per_layer:
                idx = torch.arange(n_params)
                matrix[idx, 1 + idx] = 1.0
                matrix[idx, 1 + n_params + self._owner] = 1.0
            self._matrix = matrix.to(per_param.device)
        return per_param @ self._matrix
