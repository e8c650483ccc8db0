"""The server's step: the sites' weights averaged into the next global model (FedAvg).

FedProx aggregates the same way; it differs only in the sites' local objective (see
:class:`medexp.federated.local.FedProx`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def federated_average(
    global_state: Mapping[str, torch.Tensor],
    site_states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
) -> dict[str, torch.Tensor]:
    """Average the sites' weights, each weighted by its share of the samples (McMahan et al., 2017).

    - Floating-point tensors (parameters, BatchNorm running means and variances): the weighted
      mean ``sum_k w_k x_k / sum_k w_k``. Averaging BatchNorm statistics like weights is FedAvg's
      usual choice; they then describe the pooled data only approximately (a mean of site
      variances ignores the spread between site means), which matters with strong site shifts.
    - Integer tensors (BatchNorm ``num_batches_tracked``): the global value plus every site's
      increment, i.e. all the batches seen by any site, which is what BatchNorm's cumulative
      average (``momentum=None``) divides by. A mean would undercount, a plain sum count the
      starting value once per site.
    - Anything else (boolean buffers): the global value, unchanged.

    Args:
        global_state: the weights the sites started from, ``{name: tensor}``.
        site_states: each site's weights after its local update, with the same names and shapes.
        weights: each site's weight, e.g. its number of training samples.

    Returns:
        The new global weights, on the devices and with the dtypes of ``global_state``.

    Raises:
        ValueError: when the states do not have the same names, or the weights are not positive.
    """
    if len(site_states) != len(weights) or not site_states:
        raise ValueError(
            f"{len(site_states)} site states for {len(weights)} weights; expected one weight per site, at least one site"
        )
    if any(w <= 0 for w in weights):
        raise ValueError(
            f"site weights {list(weights)}; expected positive numbers (sites without samples do not train)"
        )
    for index, state in enumerate(site_states):
        if state.keys() != global_state.keys():
            different = sorted(set(state) ^ set(global_state))
            raise ValueError(f"site {index}'s weights differ from the global model's in {different[:5]}")
    total = float(sum(weights))
    averaged = {}
    for name, start in global_state.items():
        values = [state[name].to(start.device) for state in site_states]
        if start.is_floating_point():
            mean = sum(v.double() * (w / total) for v, w in zip(values, weights))
            averaged[name] = mean.to(start.dtype)
        elif start.dtype != torch.bool:
            averaged[name] = start + sum(v - start for v in values)
        else:
            averaged[name] = start.clone()
    return averaged
