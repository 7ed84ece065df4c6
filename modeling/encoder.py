"""The embedding model: backbone -> pooling -> MRL head, with optional Token Prepending.

Saved in Hugging Face layout: the backbone's `config.json` + `model.safetensors`,
the tokenizer files, `mrl_head.safetensors`, and `tpembed_encoder.json` which
describes pooling, head, Matryoshka dims and Token Prepending.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tpembed.modeling.backbone import load_backbone
from tpembed.modeling.head import DEFAULT_MRL_DIMS, MRLHead
from tpembed.modeling.pooling import Pooling, pool
from tpembed.modeling.pooling import last_token_positions as positions_from_mask
from tpembed.modeling.token_prepending import TokenPrepending, find_decoder_layers, parse_tp_layers

ENCODER_CONFIG_FILE = "tpembed_encoder.json"
HEAD_WEIGHTS_FILE = "mrl_head.safetensors"
ADAPTER_DIR = "adapter"
ENCODER_FORMAT = "tpembed-encoder"


@dataclass
class EncoderSpec:
    """What an encoder directory holds besides the backbone (tpembed_encoder.json)."""

    pooling: str = Pooling.last_token.value
    output_dim: int | None = 1792  # None: no head, the pooled hidden state is the embedding
    head_bias: bool = True
    mrl_dims: list[int] = field(default_factory=lambda: list(DEFAULT_MRL_DIMS))
    tp_layers: list[int] = field(default_factory=list)
    placeholder_token: str | None = None
    base_model: str | None = None
    format: str = ENCODER_FORMAT
    version: int = 1


class Encoder(nn.Module):
    """Maps token batches to full-size embeddings (B, output_dim), not normalised."""

    def __init__(self, backbone: nn.Module, spec: EncoderSpec):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        hidden_size = backbone.config.hidden_size
        if spec.output_dim is None:
            self.head = None
        else:  # spec.mrl_dims were checked where they were chosen: the run's config
            self.head = MRLHead(hidden_size, spec.output_dim, spec.head_bias).to(backbone.dtype)
        self.token_prepending: TokenPrepending | None = None
        self.set_tp_layers(spec.tp_layers)

    def __deepcopy__(self, memo: dict) -> Encoder:
        """A copy with Token Prepending hooks of its own.

        The hooks are closures over this encoder's TokenPrepending: copied as they are, the copy's
        layers would report to the original and the copy would refuse to run TP."""
        layers = list(self.spec.tp_layers)
        self.set_tp_layers(None)
        try:
            copied = type(self).__new__(type(self))
            memo[id(self)] = copied
            copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        finally:
            self.set_tp_layers(layers)
        copied.set_tp_layers(layers)
        return copied

    @property
    def embedding_dim(self) -> int:
        return self.head.output_dim if self.head is not None else self.backbone.config.hidden_size

    def set_tp_layers(self, layers) -> None:
        """Attach Token Prepending at `layers` (any spec parse_tp_layers reads), or detach it."""
        num_layers = len(find_decoder_layers(self.backbone))
        layers = list(parse_tp_layers(layers, num_layers))
        if self.token_prepending is not None:
            self.token_prepending.remove()
            self.token_prepending = None
        if layers:
            self.token_prepending = TokenPrepending(layers).attach(self.backbone)
        self.spec.tp_layers = layers

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        last_token_positions: torch.Tensor | None = None,
        placeholder_positions: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        sequence_rows: torch.Tensor | None = None,
        **packing,
    ) -> torch.Tensor:
        """Embed a padded batch, or texts packed into rows.

        Args:
            input_ids, attention_mask: (B, T); no attention_mask means packed: input_ids
                (rows, width) hold the texts, `position_ids` (rows, width) restart at 0 per text.
            last_token_positions: (texts,) index of each text's last real token in its row;
                derived from the mask when None.
            placeholder_positions: (texts,) index of the Token Prepending placeholder in its
                row; required when Token Prepending is attached.
            sequence_rows: (texts,) packed: the row of each text.
            packing: the rest of a packed batch (sequence_starts, sequence_lengths), unused here.
        Returns:
            (texts, embedding_dim).
        """
        packed = attention_mask is None
        if packed:
            if last_token_positions is None or position_ids is None or sequence_rows is None:
                raise ValueError("packed input needs position_ids, sequence_rows and last_token_positions")
            if Pooling(self.spec.pooling) is not Pooling.last_token:
                raise ValueError("packed batches support last_token pooling only")
            rows = sequence_rows
        else:
            if last_token_positions is None:
                last_token_positions = positions_from_mask(attention_mask)
            rows = None
        extra = {}
        tp = self.token_prepending
        if tp is not None:
            if placeholder_positions is None:
                raise ValueError(
                    f"Token Prepending is on (layers {list(tp.layers)}) but the batch has no placeholder "
                    "positions: render the texts with a template that has a placeholder"
                )
            extra = tp.call_kwargs(placeholder_positions, last_token_positions, rows)
        if position_ids is not None:
            extra["position_ids"] = position_ids
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        if tp is not None and tp.applied_layers[: len(tp.layers)] != list(tp.layers):
            raise RuntimeError(
                f"{type(self.backbone).__name__} did not pass keyword arguments on to its decoder layers, "
                "so Token Prepending could not run; this architecture is not supported with TP"
            )
        if packed:
            pooled = hidden[rows, last_token_positions]  # (texts, H)
        else:
            pooled = pool(hidden, attention_mask, Pooling(self.spec.pooling), last_token_positions)  # (B, H)
        if self.head is None:
            return pooled
        return self.head(pooled.to(self.head.linear.weight.dtype))  # (texts, output_dim)

    # ---- persistence -------------------------------------------------------------

    @property
    def has_adapter(self) -> bool:
        return is_peft_model(self.backbone)

    def add_lora(self, rank: int, alpha: float, dropout: float, target_modules, trainable_tokens=()) -> None:
        """Wrap the backbone with LoRA adapters (peft); only adapters, the head and the listed
        token rows (an added placeholder) are trained."""
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=list(target_modules),
            trainable_token_indices=list(trainable_tokens) or None,
        )
        self.backbone = get_peft_model(self.backbone, lora)

    def merge_adapter(self) -> None:
        """Fold LoRA into the backbone weights; afterwards there is no peft module left."""
        if self.has_adapter:
            self.backbone = self.backbone.merge_and_unload()

    def save_pretrained(self, directory: str | Path, tokenizer=None, state_dict: dict | None = None) -> None:
        """Write backbone, head, spec (and tokenizer) to `directory`.

        `state_dict` is the encoder's full state dict when the caller had to gather
        it (DeepSpeed ZeRO-3); by default this module's own is used. With LoRA the
        base weights go to the directory and the adapter to `adapter/` (peft layout).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            state_dict = self.state_dict()
        backbone_state = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        head_state = {k[len("head.") :]: v.contiguous() for k, v in state_dict.items() if k.startswith("head.")}
        if self.has_adapter:
            self.backbone.save_pretrained(directory / ADAPTER_DIR, state_dict=backbone_state)
            _drop_base_model_path(directory / ADAPTER_DIR)
            backbone_state = base_weights(backbone_state)
            base = self.backbone.get_base_model()
            base.save_pretrained(directory, state_dict=backbone_state, safe_serialization=True)
        else:
            self.backbone.save_pretrained(directory, state_dict=backbone_state, safe_serialization=True)
        if head_state:
            save_file(head_state, str(directory / HEAD_WEIGHTS_FILE))
        (directory / ENCODER_CONFIG_FILE).write_text(json.dumps(asdict(self.spec), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        tp_layers=None,
        merge_adapter: bool = True,
    ) -> Encoder:
        """Load an encoder directory; `tp_layers` (when not None) replaces the stored set.

        A LoRA adapter saved with it is merged into the weights, or with
        `merge_adapter=False` kept as a trainable adapter (resuming a LoRA run)."""
        directory = Path(directory)
        spec = read_encoder_spec(directory)
        backbone = load_backbone(
            str(directory),
            dtype=dtype,
            attn_implementation=attn_implementation,
            gradient_checkpointing=gradient_checkpointing,
        )
        if (directory / ADAPTER_DIR / "adapter_config.json").is_file():
            from peft import PeftModel

            backbone = PeftModel.from_pretrained(backbone, str(directory / ADAPTER_DIR), is_trainable=not merge_adapter)
            if merge_adapter:
                backbone = backbone.merge_and_unload()
        if tp_layers is not None:
            spec.tp_layers = list(parse_tp_layers(tp_layers))
        encoder = cls(backbone, spec)
        if encoder.head is not None:
            head_state = load_file(str(directory / HEAD_WEIGHTS_FILE))
            encoder.head.load_state_dict({k: v.to(encoder.head.linear.weight.dtype) for k, v in head_state.items()})
        return encoder


def is_peft_model(module: nn.Module) -> bool:
    return type(module).__name__.startswith("Peft") and hasattr(module, "get_base_model")


def base_weights(peft_state: dict) -> dict:
    """The base model's own weights out of a peft model's state dict (adapters left out)."""
    base = {}
    for key, value in peft_state.items():
        if ".lora_" in key or "trainable_tokens_delta" in key:
            continue
        key = key.removeprefix("base_model.model.")
        key = key.replace(".token_adapter.base_layer.", ".").replace(".base_layer.", ".")
        base[key] = value
    return base


def _drop_base_model_path(adapter_dir: Path) -> None:
    """peft records where the base model came from; it is the directory above, and an
    absolute path must not travel with the checkpoint."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = None
    path.write_text(json.dumps(config, indent=2) + "\n")


def read_encoder_spec(directory: str | Path) -> EncoderSpec:
    """Read tpembed_encoder.json, failing clearly when `directory` is not an encoder."""
    path = Path(directory) / ENCODER_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a tpembed encoder directory (no {ENCODER_CONFIG_FILE})")
    raw = json.loads(path.read_text())
    if raw.get("format") != ENCODER_FORMAT:
        raise ValueError(f"{path}: format is {raw.get('format')!r}, expected {ENCODER_FORMAT!r}")
    known = set(EncoderSpec.__dataclass_fields__)
    return EncoderSpec(**{k: v for k, v in raw.items() if k in known})
