"""The sentence-transformers input module of a model exported by tpembed.

`tpembed-export` copies this file next to the exported weights, together
with `tpembed_templates.py` (tpembed's data/templates.py) and
`tpembed_token_prepending.py` (tpembed's modeling/token_prepending.py), so the
model loads with stock sentence-transformers and no tpembed installed:

    SentenceTransformer(path, trust_remote_code=True)

It renders every text exactly as training did: the sentence-transformers prompt
(e.g. "Instruct: ...\\nQuery: ") goes inside the template's head, only the user's
text is truncated, and Token Prepending runs at the stored decoder layers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from sentence_transformers.base.modules import InputModule
from transformers import AutoModel, AutoTokenizer

from .tpembed_templates import TextFormat, tokenize
from .tpembed_token_prepending import TokenPrepending

CODE_FILES = ("tpembed_st.py", "tpembed_templates.py", "tpembed_token_prepending.py")


class TPEmbedTransformer(InputModule):
    """Decoder backbone with tpembed's template and Token Prepending; outputs token embeddings."""

    config_file_name = "tpembed_st_config.json"
    config_keys = ["text_format", "query_max_len", "passage_max_len", "tp_layers", "mrl_dims"]
    save_in_root = True

    def __init__(
        self,
        model_name_or_path: str,
        text_format: dict,
        query_max_len: int,
        passage_max_len: int,
        tp_layers: list[int],
        mrl_dims: list[int] | None = None,
        model_kwargs: dict | None = None,
    ):
        super().__init__()
        self.text_format = text_format
        self.query_max_len = query_max_len
        self.passage_max_len = passage_max_len
        self.tp_layers = list(tp_layers)
        self.mrl_dims = list(mrl_dims) if mrl_dims else None  # recorded for evaluation; encoding ignores it
        self.format = TextFormat.from_dict(text_format)
        # float32 unless the caller asks otherwise: the exported embeddings equal training's in fp32
        model_kwargs = {"dtype": torch.float32, **(model_kwargs or {})}
        self.auto_model = AutoModel.from_pretrained(model_name_or_path, **model_kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, padding_side="left")
        self.token_prepending = TokenPrepending(self.tp_layers).attach(self.auto_model) if self.tp_layers else None

    @property
    def max_seq_length(self) -> int:
        return self.passage_max_len

    def get_embedding_dimension(self) -> int:
        return self.auto_model.config.hidden_size

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        """Tokenise with the template; texts with a prompt (queries) use the query max length."""
        pieces = [self.format.pieces_with_prompt(text, prompt or "") for text in inputs]
        max_length = self.query_max_len if prompt else self.passage_max_len
        return tokenize(self.tokenizer, pieces, max_length, self.format)

    def forward(self, features: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        extra = {}
        if self.token_prepending is not None:
            extra = self.token_prepending.call_kwargs(
                features["placeholder_positions"], features["last_token_positions"]
            )
        output = self.auto_model(input_ids=features["input_ids"], attention_mask=features["attention_mask"], **extra)
        features["token_embeddings"] = output.last_hidden_state
        return features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.auto_model.save_pretrained(output_path, safe_serialization=safe_serialization)
        self.save_tokenizer(output_path)
        self.save_config(output_path)
        here = Path(__file__).resolve().parent
        for name in CODE_FILES:
            source, target = here / name, Path(output_path) / name
            if source.resolve() != target.resolve():
                shutil.copyfile(source, target)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token=None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        model_kwargs: dict | None = None,
        **kwargs,
    ) -> TPEmbedTransformer:
        hub = dict(token=token, cache_folder=cache_folder, revision=revision, local_files_only=local_files_only)
        config = cls.load_config(model_name_or_path, subfolder=subfolder, **hub)
        directory = cls.load_dir_path(model_name_or_path, subfolder=subfolder, **hub)
        return cls(directory, model_kwargs=model_kwargs, **config)
