"""Token Prepending (Fu et al., ACL 2025, arXiv 2412.11556), attached from outside.

For every decoder layer index l in the TP set: before layer l runs, the hidden
state at the placeholder position of the layer's input is overwritten by the
hidden state at the last real token of that same input. A causal decoder then
lets every later token attend to a summary of the whole sentence.

The model stays an unmodified Hugging Face decoder: forward pre-hooks on its
decoder layers do the copy. The positions travel as keyword arguments of the
backbone call, which Hugging Face decoders hand to every layer; the hooks take
them out again so the layer's own forward never sees them. Because they travel
with the call (not in hook state), gradient checkpointing's recomputation sees
the same positions as the forward it replays.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

PLACEHOLDER_POSITIONS_KWARG = "tp_placeholder_positions"
LAST_TOKEN_POSITIONS_KWARG = "tp_last_token_positions"
ROWS_KWARG = "tp_rows"  # the batch row of each text: all 0 when texts are packed into one row


def parse_tp_layers(spec: str | Iterable[int] | None, num_layers: int | None = None) -> tuple[int, ...]:
    """Parse a TP layer set: "none", "1-7" (inclusive, 0-based), "1,3,5", "0-2,6", or ints.

    Raises ValueError naming the offending index when it lies outside a model of
    `num_layers` decoder layers.
    """
    if spec is None:
        layers: list[int] = []
    elif isinstance(spec, str):
        text = spec.strip().lower()
        layers = []
        if text not in ("", "none", "off"):
            for part in text.split(","):
                part = part.strip()
                try:
                    if "-" in part:
                        first, last = (int(x) for x in part.split("-", 1))
                        if last < first:
                            raise ValueError
                        layers.extend(range(first, last + 1))
                    else:
                        layers.append(int(part))
                except ValueError:
                    raise ValueError(
                        f"tp_layers {spec!r}: cannot read {part!r}; use 'none', a range like '1-7' "
                        "(inclusive, 0-based) or a list like '1,3,5'"
                    ) from None
    else:
        layers = [int(x) for x in spec]
    if any(layer < 0 for layer in layers):
        raise ValueError(f"tp_layers {spec!r}: layer indices are 0-based and non-negative")
    layers = tuple(sorted(set(layers)))
    return layers if num_layers is None else check_layer_range(layers, num_layers)


def check_layer_range(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """`layers`, if every one is a layer of a model with `num_layers` decoder layers."""
    outside = [layer for layer in layers if layer >= num_layers]
    if outside:
        raise ValueError(
            f"tp_layers {format_tp_layers(layers)!r}: layer {outside[0]} is outside the model, which has "
            f"{num_layers} decoder layers (valid indices 0-{num_layers - 1})"
        )
    return tuple(layers)


def format_tp_layers(layers: Sequence[int]) -> str:
    """The inverse of parse_tp_layers, compact: (1, 2, 3, 5) -> "1-3,5"."""
    if not layers:
        return "none"
    parts, start, prev = [], layers[0], layers[0]
    for layer in list(layers[1:]) + [None]:
        if layer is not None and layer == prev + 1:
            prev = layer
            continue
        parts.append(f"{start}-{prev}" if prev > start else str(start))
        if layer is not None:
            start = prev = layer
    return ",".join(parts)


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers of a Hugging Face decoder (peft-wrapped too)."""
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "layer", "blocks")
    ]
    if num_layers is not None:
        candidates = [module for module in candidates if len(module) == num_layers] or candidates
    if not candidates:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    return candidates[0]


def prepend_last_token(
    hidden_states: torch.Tensor,
    placeholder_positions: torch.Tensor,
    last_token_positions: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Out of place: text i's state at (rows[i], placeholder_positions[i]) becomes its state
    at (rows[i], last_token_positions[i]); rows default to one text per batch row. The
    gradient flows through the copy."""
    if rows is None:
        rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
    last_states = hidden_states[rows, last_token_positions]  # (texts, H)
    return hidden_states.index_put((rows, placeholder_positions), last_states)  # (B, T, H)


class TokenPrepending:
    """Forward pre-hooks that apply Token Prepending at `layers` of a decoder.

    Usage:
        tp = TokenPrepending((1, 2, 3)).attach(backbone)
        backbone(input_ids, attention_mask=mask, **tp.call_kwargs(placeholder_positions, last_positions))
        tp.remove()
    """

    def __init__(self, layers: Sequence[int]):
        self.layers = tuple(sorted(set(int(layer) for layer in layers)))
        self._handles: list = []
        self.applied_layers: list[int] = []  # layers that copied during the latest forward

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, model: nn.Module) -> TokenPrepending:
        if self.attached:
            raise RuntimeError("Token Prepending is already attached; remove() it first")
        decoder_layers = find_decoder_layers(model)
        check_layer_range(self.layers, len(decoder_layers))
        for index, layer in enumerate(decoder_layers):
            self._handles.append(layer.register_forward_pre_hook(self._make_hook(index), with_kwargs=True))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def call_kwargs(
        self,
        placeholder_positions: torch.Tensor | None,
        last_token_positions: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> dict:
        """Keyword arguments to add to the backbone call; `rows` for packed texts."""
        self.applied_layers = []
        if not self.layers or placeholder_positions is None:
            return {}
        kwargs = {PLACEHOLDER_POSITIONS_KWARG: placeholder_positions, LAST_TOKEN_POSITIONS_KWARG: last_token_positions}
        if rows is not None:
            kwargs[ROWS_KWARG] = rows
        return kwargs

    def _make_hook(self, layer_index: int):
        active = layer_index in self.layers

        def hook(module, args, kwargs):
            placeholder_positions = kwargs.pop(PLACEHOLDER_POSITIONS_KWARG, None)
            last_token_positions = kwargs.pop(LAST_TOKEN_POSITIONS_KWARG, None)
            rows = kwargs.pop(ROWS_KWARG, None)
            if not active or placeholder_positions is None:
                return args, kwargs
            self.applied_layers.append(layer_index)
            if args:
                hidden = prepend_last_token(args[0], placeholder_positions, last_token_positions, rows)
                args = (hidden,) + tuple(args[1:])
            else:
                kwargs["hidden_states"] = prepend_last_token(
                    kwargs["hidden_states"], placeholder_positions, last_token_positions, rows
                )
            return args, kwargs

        return hook
