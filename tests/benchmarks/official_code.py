"""What official_cnf_run.py and corl_awac_run.py share: stub modules for the official code's unused imports, and
one evaluation of a policy by our vectorised evaluation, printed as a JSON line."""
import importlib.machinery
import json
import sys
import time
import types

import numpy as np


def stub_modules(*names: str) -> None:
    """Empty modules for imports the official code makes but never uses here (gym, d4rl, wandb, ...)."""
    for name in names:
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)


def print_evaluation(ours, data, act, mean, std, step: int, seed: int, start: float) -> None:
    """10 episodes of `act` by `ours.evaluate` (our algorithm module's), normalised score as one JSON line."""
    returns = ours.evaluate(data.make_eval_env, act, mean, std, 10, seed, "cpu")
    print(json.dumps({"step": step, "normalized_score": float(np.mean(data.normalize_score(returns))),
                      "elapsed_s": round(time.time() - start)}), flush=True)
