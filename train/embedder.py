"""Encoding raw texts exactly as training rendered them: the inference entry point.

An `Embedder` is an encoder + its tokenizer + its text format (template,
instruction format, placeholder, end-of-text rule) + max lengths. Evaluation and
the export parity check both go through it, so "the training-time embedding" has
one definition.

    embedder = Embedder.from_checkpoint("runs/quickstart/stage2")
    queries = embedder.encode(["what is BM25?"], instruction="Given a web search query, ...")
    documents = embedder.encode(["BM25 is a ranking function."])

    # the training-free path: a base LM with PromptEOL, with and without Token Prepending
    base = Embedder.from_base_model("path/to/lm", template="prompteol", tp_layers="1-7")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tpembed.data import TEMPLATES, TextFormat, ensure_placeholder, tokenize
from tpembed.modeling import Encoder, EncoderSpec, load_backbone, load_tokenizer, parse_tp_layers
from tpembed.modeling.backbone import backbone_config
from tpembed.train.checkpoint import MODEL_DIR, resolve_checkpoint

TEXT_CONFIG_FILE = "tpembed_text.json"


@dataclass
class TextConfig:
    """How texts are rendered and cut for a model (tpembed_text.json next to its weights)."""

    text_format: TextFormat
    query_max_len: int = 256
    passage_max_len: int = 1536

    def save(self, directory: str | Path) -> None:
        values = {
            "text_format": self.text_format.to_dict(),
            "query_max_len": self.query_max_len,
            "passage_max_len": self.passage_max_len,
        }
        (Path(directory) / TEXT_CONFIG_FILE).write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> TextConfig:
        path = Path(directory) / TEXT_CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory} has no {TEXT_CONFIG_FILE}: not a model directory written by tpembed")
        values = json.loads(path.read_text())
        return cls(TextFormat.from_dict(values["text_format"]), values["query_max_len"], values["passage_max_len"])


def model_directory(path: str | Path) -> Path:
    """A run directory, a checkpoint, or a model directory -> the model directory."""
    path = Path(path)
    if (path / TEXT_CONFIG_FILE).is_file():
        return path
    return resolve_checkpoint(path) / MODEL_DIR


class Embedder:
    def __init__(self, encoder: Encoder, tokenizer, text: TextConfig, device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.encoder = encoder.to(self.device).eval()
        self.tokenizer = tokenizer
        self.text = text

    @property
    def embedding_dim(self) -> int:
        return self.encoder.embedding_dim

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        device=None,
        dtype: str = "float32",
        tp_layers=None,
        query_max_len: int | None = None,
        passage_max_len: int | None = None,
    ) -> Embedder:
        """Load a trained model (run directory, checkpoint or model directory).

        `tp_layers` overrides the stored Token Prepending layers (for ablations); the max
        lengths override the training ones (inference may read longer documents)."""
        directory = model_directory(path)
        text = TextConfig.load(directory)
        text.query_max_len = query_max_len or text.query_max_len
        text.passage_max_len = passage_max_len or text.passage_max_len
        tokenizer = load_tokenizer(str(directory), padding_side="left")
        encoder = Encoder.from_pretrained(directory, dtype=dtype, tp_layers=tp_layers)
        if encoder.token_prepending is not None and text.text_format.placeholder is None:
            raise ValueError(f"{directory}: Token Prepending is on but the stored template has no placeholder")
        return cls(encoder, tokenizer, text, device)

    @classmethod
    def from_base_model(
        cls,
        name_or_path: str,
        *,
        template: str = "prompteol",
        tp_layers="none",
        pooling: str = "last_token",
        placeholder: str | None = None,
        use_placeholder: bool = True,
        append_eos: bool = False,
        max_length: int = 512,
        dtype: str = "float32",
        device=None,
        trust_remote_code: bool = False,
    ) -> Embedder:
        """A base LM without head or training: the pooled final hidden state is the embedding.

        With a template that has a placeholder slot and `use_placeholder`, the
        placeholder is `placeholder`, else <|im_start|> when the tokenizer has it,
        else <|tp_placeholder|> added with a fresh embedding row.
        """
        tokenizer = load_tokenizer(name_or_path, padding_side="left", trust_remote_code=trust_remote_code)
        chosen = None
        if TEMPLATES[template].has_placeholder_slot and use_placeholder:
            chosen, _ = ensure_placeholder(tokenizer, placeholder)
        layers = parse_tp_layers(tp_layers, backbone_config(name_or_path, trust_remote_code).num_hidden_layers)
        if layers and chosen is None:
            raise ValueError("Token Prepending needs a template with a placeholder (template='prompteol')")
        backbone = load_backbone(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
        if len(tokenizer) > backbone.get_input_embeddings().num_embeddings:
            backbone.resize_token_embeddings(len(tokenizer))
        spec = EncoderSpec(
            pooling=pooling, output_dim=None, tp_layers=list(layers), placeholder_token=chosen, base_model=name_or_path
        )
        text_format = TextFormat(template=TEMPLATES[template], placeholder=chosen, append_eos=append_eos)
        return cls(Encoder(backbone, spec), tokenizer, TextConfig(text_format, max_length, max_length), device)

    @torch.no_grad()
    def encode(
        self,
        texts: list[str],
        instruction: str | None = None,
        *,
        max_length: int | None = None,
        batch_size: int = 32,
        show_progress: bool = False,
        description: str = "encoding",
    ) -> torch.Tensor:
        """Full-size embeddings (N, D), float32, not normalised, in input order.

        `instruction` None renders texts raw (retrieval documents); with an
        instruction they are rendered as queries (and both sides of symmetric tasks).
        """
        if max_length is None:
            max_length = self.text.query_max_len if instruction else self.text.passage_max_len
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths share a batch
        result = torch.empty(len(texts), self.embedding_dim, dtype=torch.float32)
        for start in tqdm(range(0, len(texts), batch_size), desc=description, disable=not show_progress):
            chunk = order[start : start + batch_size]
            pieces = [self.text.text_format.pieces(texts[i], instruction) for i in chunk]
            batch = tokenize(self.tokenizer, pieces, max_length, self.text.text_format)
            batch = {key: value.to(self.device) for key, value in batch.items()}
            result[chunk] = self.encoder(**batch).float().cpu()
        return result
