"""The sentence-transformers v6 side of bench/vs_sentence_transformers.py (run by it).

    python bench/st_baseline.py SETTINGS.json

SentenceTransformerTrainer with MultipleNegativesRankingLoss inside MatryoshkaLoss on the
same backbone (last-token pooling, Dense hidden -> 1792, identity), the same datasets (one
dataset per batch: the proportional multi-dataset sampler), instructions as prompts, batch
size, max length, learning rate and steps. Prints JSON with the median step time.
"""

import json
import statistics
import sys
import time

import torch
from datasets import Dataset, DatasetDict
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.base.modules import Dense, Transformer
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MatryoshkaLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.modules import Pooling
from sentence_transformers.sentence_transformer.training_args import MultiDatasetBatchSamplers
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Seconds between consecutive step ends: the batch's collation (tokenisation) included,
    as in tpembed's step_seconds, which starts before it fetches the batch."""

    def __init__(self):
        self.times = []
        self.last = None

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def load(path: str) -> Dataset:
    """anchor / positive (/ negative when every record has one), from tpembed retrieval records."""
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    first = lambda value: value[0] if isinstance(value, list) else value  # noqa: E731
    columns = {"anchor": [r["query"] for r in rows], "positive": [first(r["pos"]) for r in rows]}
    if all(r.get("negs") for r in rows):
        columns["negative"] = [r["negs"][0] for r in rows]
    return Dataset.from_dict(columns)


def main(settings: dict) -> None:
    torch.manual_seed(0)
    datasets = DatasetDict({d["name"]: load(d["path"]) for d in settings["datasets"]})
    prompts = {d["name"]: {"anchor": f"Instruct: {d['instruction']}\nQuery: "} for d in settings["datasets"]}
    transformer = Transformer(
        settings["model_dir"], max_seq_length=settings["max_length"], processor_kwargs={"padding_side": "left"}
    )
    hidden = transformer.get_embedding_dimension()
    modules = [transformer, Pooling(hidden, "lasttoken"), Dense(hidden, 1792, activation_function=torch.nn.Identity())]
    model = SentenceTransformer(modules=modules, device=settings["device"])
    scale = 1 / settings["temperature"]
    if settings["grad_cache"]:  # GradCache: the cached loss, in mini-batches of N texts
        base = CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=settings["grad_cache"])
    else:
        base = MultipleNegativesRankingLoss(model, scale=scale)
    loss = MatryoshkaLoss(model, base, [1792, 1536, 1280, 1024, 768, 512, 256, 128])
    args = SentenceTransformerTrainingArguments(
        output_dir=settings["output_dir"],
        per_device_train_batch_size=settings["batch_size"],
        max_steps=settings["steps"],
        learning_rate=settings["learning_rate"],
        warmup_steps=0,
        weight_decay=0.01,
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        dataloader_drop_last=True,
        use_cpu=settings["device"] == "cpu",
        bf16=settings["bf16"],
        prompts=prompts,
        multi_dataset_batch_sampler=MultiDatasetBatchSamplers.PROPORTIONAL,
        disable_tqdm=True,
    )
    timer = StepTimer()
    SentenceTransformerTrainer(model=model, args=args, train_dataset=datasets, loss=loss, callbacks=[timer]).train()
    print(json.dumps({"median_step_seconds": statistics.median(timer.times[1:]), "steps": len(timer.times) + 1}))


if __name__ == "__main__":
    main(json.loads(open(sys.argv[1]).read()))
