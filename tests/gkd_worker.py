"""Helper process for tests/test_gkd.py: distil a fixed tiny child, 1 process or under torchrun.

    python tests/gkd_worker.py OUT                     # one process
    python -m torch.distributed.run --nproc_per_node 2 tests/gkd_worker.py OUT
"""

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402

from puzzlelib.core.blocks import build_child  # noqa: E402
from puzzlelib.core.distributed import Dist
from puzzlelib.gkd.stage import GKDSettings, distill  # noqa: E402
from puzzlelib.core.modeling_decilm import PuzzleForCausalLM

SETTINGS = GKDSettings(tokens=8 * 16 * 4, batch_size=8, grad_accum=2, seq_len=16, lr=3e-3, min_lr_ratio=0.1,
                       warmup_steps=1, weight_decay=0.0, grad_clip=1.0, cos_weight=1.0, kl_weight=1.0,
                       lm_weight=0.0, autocast_bf16=False, eval_every=0, eval_tokens=512, checkpoint_every=0,
                       seed=0)


def make():
    torch.manual_seed(0)
    parent = PuzzleForCausalLM(tiny_config()).eval()
    child = build_child(parent, [("attn:kv1", "ffn:0.50"), ("attn:noop", "ffn:linear")])
    tokens = np.random.default_rng(0).integers(3, 300, 20_000).astype(np.uint16)
    return parent, child, tokens


if __name__ == "__main__":
    torch.set_num_threads(1)
    parent, child, tokens = make()
    dd = Dist("cpu")
    hist = distill(child, parent, tokens, tokens[:4000], SETTINGS, dd=dd)
    if dd.main:
        out = Path(sys.argv[1])
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in child.state_dict().items()}, str(out / "child.safetensors"))
        (out / "loss.txt").write_text(" ".join(str(x) for x in hist["loss"]))
