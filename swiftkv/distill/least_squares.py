"""Closed-form start for distillation: fit the SingleInputKV projections to the teacher's keys and values.

The paper starts `k/v_proj_swiftkv` of layer `j` as that layer's own `k/v_proj`, applied to the output of
layer `l-1` instead of layer `j`'s input: a fresh SwiftKV-50% SmolLM2 then agrees with its base on about half
the tokens. The best linear map from the single input `x = norm_swiftkv(h_{l-1})` to the keys/values the
teacher computes at layer `j` is a ridge regression with a closed form, `W = (X^T X + λI)^{-1} X^T Y_j`;
one teacher pass over some training blocks gives `X^T X` (hidden x hidden) and `X^T Y_j` for every layer,
so the fit costs about one forward per block. Keys are fitted before RoPE, which is a rotation per position
and leaves squared errors unchanged. For an AcrossKV group the leader's keys/values are the target, as in
the paper's initialization. The KL distillation then starts from this fit instead of from the copies.

With `weighting="attention"` each token's squared error counts in proportion to the attention the teacher's
queries pay it (summed over the queries and the query heads of its K/V head): an error in a key or value
moves the attention output by at most that much (Jensen), so tokens nobody attends to stop costing the fit
and attention sinks get their due. Each K/V head then has its own weighted Gram matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from swiftkv.models.swiftkv import swiftkv_mode

WEIGHTINGS = ("uniform", "attention")


@dataclass
class LeastSquaresFit:
    """What the fit did, for the run's logs: tokens used and the relative squared error before/after
    (attention-weighted when the fit was)."""

    tokens: int
    relative_error_before: float
    relative_error_after: float


class _Moments:
    """Running `X^T X`, `X^T Y` and `sum Y^2` (float64 totals of float32 per-batch products), kept on the
    model's device so a GPU does the products.

    `Y` is every fitted projection's output side by side, so one Gram matrix and one product serve them all;
    X gets a column of ones when the projections have a bias.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, device: torch.device | str = "cpu"):
        self.bias = bias
        size = in_features + int(bias)
        self.xtx = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.xty = torch.zeros(size, out_features, dtype=torch.float64, device=device)
        self.yty = torch.zeros(out_features, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> None:
        """Rows of `x` `[..., in]` and `y` `[..., out]`; `weight` `[...]` scales each row's squared error.

        The products run in float32 even under a bf16 autocast (the trainer's): bf16 Gram matrices would
        lose the small directions of `X` that the solve depends on."""
        device = self.xtx.device
        with torch.autocast(device.type, enabled=False):
            x = x.reshape(-1, x.shape[-1]).to(device, torch.float32)
            y = y.reshape(-1, y.shape[-1]).to(device, torch.float32)
            if self.bias:
                x = torch.cat([x, torch.ones(len(x), 1, device=device)], dim=1)
            row_weight = (torch.ones(len(x), 1, device=device) if weight is None
                          else weight.reshape(-1, 1).to(device, torch.float32))
            weighted_x = x * row_weight
            self.xtx += (weighted_x.T @ x).double()
            self.xty += (weighted_x.T @ y).double()
            self.yty += (row_weight * y * y).sum(0).double()

    def squared_error(self, weight: torch.Tensor) -> float:
        """sum ||X W - Y||^2 for `weight` `[in (+1), out]`, from the moments alone."""
        return (self.yty.sum() - 2 * (weight * self.xty).sum() + (weight * (self.xtx @ weight)).sum()).item()

    def sum_across(self, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Totals over every process's share of the blocks: the moments are sums, so they add."""
        self.xtx, self.xty, self.yty = (all_reduce(total) for total in (self.xtx, self.xty, self.yty))

    def solve(self, ridge: float) -> torch.Tensor:
        scale = self.xtx.diagonal().mean().clamp_min(1e-12)
        regularized = self.xtx + ridge * scale * torch.eye(len(self.xtx), dtype=torch.float64, device=self.xtx.device)
        return torch.linalg.solve(regularized, self.xty)


def _weight_matrix(linear: nn.Linear) -> torch.Tensor:
    """`[in (+1), out]` form of a linear layer, matching `_Moments`."""
    weight = linear.weight.detach().double().T
    if linear.bias is None:
        return weight
    return torch.cat([weight, linear.bias.detach().double()[None]], dim=0)


class _AttentionReceived:
    """Forward hooks summing, per K/V cache entry, the teacher attention each key position receives.

    Needs eager attention (the only kind that returns its probabilities). The total for one entry is
    `[batch, kv_heads, seq]`: the sum over every query position, over the query heads that share a K/V head,
    and over the layers of an AcrossKV group.
    """

    def __init__(self, model: nn.Module):
        config = model.config
        self.totals: dict[int, torch.Tensor] = {}
        layers = model.model.layers
        self.hooks = [layers[index].self_attn.register_forward_hook(self._hook(config.kv_cache_index(index)))
                      for index in range(config.num_key_value_layers, config.num_hidden_layers)]
        self.kv_heads = config.num_key_value_heads

    def _hook(self, cache_index: int):
        def add(module, args, output):
            probabilities = output[1].float()  # [batch, heads, query, key]
            batch, heads, _, keys = probabilities.shape
            received = probabilities.sum(2).reshape(batch, self.kv_heads, heads // self.kv_heads, keys).sum(2)
            self.totals[cache_index] = self.totals.get(cache_index, 0) + received
        return add

    def pop(self) -> dict[int, torch.Tensor]:
        totals, self.totals = self.totals, {}
        return totals

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


@torch.no_grad()
def fit_single_input_key_values(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4,
                                ridge: float = 1e-4, show_progress: bool = True,
                                all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                                weighting: str = "attention") -> LeastSquaresFit:
    """Set every group leader's `k/v_proj_swiftkv` to the ridge fit of its teacher keys/values.

    `blocks` `[n, seq]` are token ids (training data, never the held-out blocks). The teacher is `model`
    with swiftkv off, so this needs no second model. `ridge` is relative to the mean diagonal of `X^T X`.
    `weighting` is "uniform" (every token counts the same) or "attention" (see the module docstring).
    With several processes, each passes its own share of the blocks and `all_reduce` (a sum over processes);
    every process then solves the same system and sets the same weights.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    config, decoder = model.config, model.model
    leaders = list(config.group_leaders())
    if not leaders:
        raise ValueError("the model has no SwiftKV layers to fit")
    teacher_projections = [getattr(decoder.layers[leader].self_attn, name)
                           for leader in leaders for name in ("k_proj", "v_proj")]
    swiftkv_projections = [getattr(decoder.layers[leader].self_attn, f"{name}_swiftkv")
                           for leader in leaders for name in ("k_proj", "v_proj")]
    widths = [projection.out_features for projection in teacher_projections]
    has_bias = teacher_projections[0].bias is not None
    # One system per set of target columns that share a token weighting: all of them, or one K/V head's
    # keys and values (all projections are kv_heads x head_dim wide, side by side: leader, k/v, head, dim).
    if weighting == "uniform":
        systems = [(None, torch.arange(sum(widths)))]
    else:
        heads = config.num_key_value_heads
        columns = torch.arange(sum(widths)).view(len(leaders), 2, heads, widths[0] // heads)
        systems = [((config.kv_cache_index(leader), head), columns[position, :, head].flatten())
                   for position, leader in enumerate(leaders) for head in range(heads)]
    device = next(model.parameters()).device
    moments = [_Moments(config.hidden_size, len(columns), has_bias, device) for _, columns in systems]

    captured: dict = {}
    hooks = [decoder.layers[config.num_key_value_layers].register_forward_pre_hook(
        lambda module, args, kwargs: captured.__setitem__("single_input", args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True)]
    for index, projection in enumerate(teacher_projections):
        hooks.append(projection.register_forward_hook(
            lambda module, args, output, index=index: captured.__setitem__(index, output)))
    attention = _AttentionReceived(model) if weighting == "attention" else None
    attention_implementation = config._attn_implementation
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        if attention is not None:
            model.set_attn_implementation("eager")
        with swiftkv_mode(model, enabled=False):
            for start in tqdm(range(0, len(blocks), batch_size), desc="least-squares K/V fit", unit="batch",
                              disable=not show_progress):
                batch = blocks[start:start + batch_size].to(device)
                model(batch, use_cache=False, logits_to_keep=1)
                # float32 once here, not once per system in `_Moments.add`
                single_input = decoder.norm_swiftkv(captured["single_input"]).float()
                targets = torch.cat([captured[index] for index in range(len(teacher_projections))], dim=-1).float()
                received = attention.pop() if attention is not None else {}
                for (key, columns), system in zip(systems, moments):
                    weight = None if key is None else received[key[0]][:, key[1]]
                    system.add(single_input, targets[..., columns], weight)
                tokens += batch.numel()
    finally:
        for hook in hooks:
            hook.remove()
        if attention is not None:
            attention.remove()
            model.set_attn_implementation(attention_implementation)
        model.train(was_training)

    if all_reduce is not None:
        for system in moments:
            system.sum_across(all_reduce)
        tokens = int(all_reduce(torch.tensor([tokens], dtype=torch.float64, device=device)).item())
    current = torch.cat([_weight_matrix(projection) for projection in swiftkv_projections], dim=1)
    solution = torch.empty_like(current)
    error_before = error_after = total = 0.0
    for (_, columns), system in zip(systems, moments):
        solution[:, columns] = system.solve(ridge)
        error_before += system.squared_error(current[:, columns])
        error_after += system.squared_error(solution[:, columns])
        total += system.yty.sum().item()
    fit = LeastSquaresFit(tokens, error_before / total, error_after / total)
    for projection, weight in zip(swiftkv_projections, solution.split(widths, dim=1)):
        dtype = projection.weight.dtype
        projection.weight.copy_(weight[: config.hidden_size].T.to(dtype))
        if projection.bias is not None:
            projection.bias.copy_(weight[config.hidden_size].to(dtype))
    return fit
