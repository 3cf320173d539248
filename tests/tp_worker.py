"""One rank of the tensor-parallel tests (test_tp.py), launched by torchrun:

    torchrun --nproc-per-node 2 tests/tp_worker.py SCENARIO OUT_DIR TARGET DRAFT

check: logits of a prefill, greedy decoding along a static and a dynamic tree, seeded sampling,
       and a compiled decode that must not recompile; each rank writes OUT_DIR/rank<r>.json.
die:   rank 1 exits right after loading; rank 0 must fail with an error, not hang.
"""

import json
import os
import sys
from pathlib import Path

import torch

import minitree
from reference import causal

PROMPT = list(range(3, 40))


def main(scenario: str, out: Path, target_dir: str, draft_dir: str) -> int:
    rank, world = minitree.tp.init()
    target = minitree.load(target_dir, tensor_parallel=True)
    draft = minitree.load(draft_dir)
    if scenario == "die" and rank == 1:
        os._exit(3)
    result = {"world": world, "local_heads": target.model.layers[0].self_attn.n_heads}
    result["logits"] = causal(target)(torch.tensor(PROMPT)).tolist()
    for spec in ("2,2,1", "dynamic:depth=4,width=2,k=2,nodes=7"):
        engine = minitree.Engine(target, draft, spec, compile=False, max_seq_len=256)
        result[spec] = engine.generate(PROMPT, 40).tokens
    engine = minitree.Engine(target, draft, "2,2,1", compile=False, max_seq_len=256)
    result["sampled"] = engine.generate(PROMPT, 40, minitree.Sampling(temperature=1.0), seed=5).tokens
    if scenario == "check":
        engine = minitree.Engine(target, max_seq_len=256, prefill_chunks=(32,), plan="none")
        engine.warm_up()
        torch._dynamo.config.error_on_recompile = True
        result["compiled"] = engine.generate(PROMPT, 24).tokens
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]))
    except (minitree.LoadError, minitree.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except torch.distributed.DistError as e:
        print(f"error: rank {minitree.tp.world()[0]} lost contact with the other ranks "
              f"({str(e).strip().splitlines()[0]})", file=sys.stderr)
        sys.exit(1)
