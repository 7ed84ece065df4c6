"""The sentence-transformers v6 side of bench/vs_sentence_transformers.py (run by it).

SentenceTransformerTrainer with MultipleNegativesRankingLoss inside MatryoshkaLoss on the
same tiny Qwen3 (last-token pooling, Dense hidden -> 1792, identity), same data, batch
size, max length, learning rate and steps. Prints JSON with the median step time.
"""

import json
import statistics
import sys
import time

import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.base.modules import Dense, Transformer
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss
from sentence_transformers.sentence_transformer.modules import Pooling
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


def main(model_dir, data_path, output_dir, batch_size, steps, max_length, instruction):
    torch.manual_seed(0)
    rows = [json.loads(line) for line in open(data_path, encoding="utf-8")]
    dataset = Dataset.from_dict(
        {
            "anchor": [r["query"] for r in rows],
            "positive": [r["pos"][0] for r in rows],
            "negative": [r["negs"][0] for r in rows],
        }
    )
    transformer = Transformer(model_dir, max_seq_length=max_length, processor_kwargs={"padding_side": "left"})
    hidden = transformer.get_embedding_dimension()
    modules = [transformer, Pooling(hidden, "lasttoken"), Dense(hidden, 1792, activation_function=torch.nn.Identity())]
    model = SentenceTransformer(modules=modules, device="cpu")
    loss = MatryoshkaLoss(
        model, MultipleNegativesRankingLoss(model, scale=20.0), [1792, 1536, 1280, 1024, 768, 512, 256, 128]
    )
    args = SentenceTransformerTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        learning_rate=1e-4,
        warmup_steps=0,
        weight_decay=0.01,
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        dataloader_drop_last=True,
        use_cpu=True,
        prompts={"anchor": f"Instruct: {instruction}\nQuery: "},
        disable_tqdm=True,
    )
    timer = StepTimer()
    SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss, callbacks=[timer]).train()
    print(json.dumps({"median_step_seconds": statistics.median(timer.times[1:]), "steps": len(timer.times) + 1}))


if __name__ == "__main__":
    model_dir, data_path, output_dir, batch_size, steps, max_length, instruction = sys.argv[1:]
    main(model_dir, data_path, output_dir, int(batch_size), int(steps), int(max_length), instruction)
