"""Train like train/stage1.py, with the loss made NaN at the steps listed in argv[1] (1-based).

The injection wraps the loop's loss function from the outside; production code
has no test switch.
"""

import sys

import tpembed.train.loop as loop
from tpembed.train.config import STAGE_DEFAULTS, load_config

poisoned_steps = {int(s) for s in sys.argv[1].split(",")}
compute_loss = loop.micro_step_loss


def poisoned(encoder, objective, batch, device, stats=None):
    loss, per_dim = compute_loss(encoder, objective, batch, device, stats=stats)
    if batch.step + 1 in poisoned_steps:
        loss = loss * float("nan")
    return loss, per_dim


loop.micro_step_loss = poisoned
try:
    loop.train(load_config(sys.argv[2:], base=STAGE_DEFAULTS[1]))
except loop.NonFiniteError as error:
    sys.exit(f"stopped: {error}")
