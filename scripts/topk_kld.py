"""How close the top-k KL estimator (evaluate.kl_topk) comes to the full-vocabulary KL divergence, on a finished run.

    python scripts/topk_kld.py RUN_DIR [--variants a b ...] [--k 5 20 100] [--out F.json]

For each variant: the full-vocabulary mean KLD against the run's reference log-probs (what the eval records), and
the estimate a runtime that returns only its top k log-probs would give, for each k, on the same windows. The
estimator coarsens both distributions to the variant's top k tokens plus one bucket for the rest of the mass, so
it never exceeds the full KLD; the table gives the share of the full KLD it recovers. docs/benchmarks.md has the
SmolLM2 demo's figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from quantpipe import evaluate, results, runtimes


def windows_of(run_dir: Path) -> list[list[int]]:
    rec = json.loads((run_dir / ".quantpipe" / "stages" / "eval-tokens.json").read_text())
    return rec["result"]["windows"]


def measure(run_dir: Path, variant: str, ks: list[int]) -> dict:
    rt = runtimes.load(run_dir / "artifacts" / variant, "cpu")
    full: list[torch.Tensor] = []
    est: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    try:
        for i, ids in enumerate(windows_of(run_dir)):
            ref = load_file(str(run_dir / ".quantpipe" / "reference" / f"window-{i:04d}.safetensors"))["logprobs"]
            lp = torch.log_softmax(rt.logits(ids).float(), dim=-1)
            full.append(evaluate.kl_divergence(ref, lp))
            for k in ks:
                top = lp.topk(k, dim=-1)
                est[k].append(evaluate.kl_topk(ref, top.indices, top.values))
    finally:
        rt.close()
    kf = torch.cat(full).double()
    out = {"variant": variant, "runtime": rt.name, "positions": kf.numel(), "kld_full": kf.mean().item(),
           "topk": {}}
    for k in ks:
        ke = torch.cat(est[k]).double()
        out["topk"][str(k)] = {"kld": ke.mean().item(), "share_of_full": (ke.mean() / kf.mean()).item(),
                               "max_positionwise_excess": (ke - kf).max().item()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--variants", nargs="*")
    p.add_argument("--k", type=int, nargs="+", default=[5, 20, 100])
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    res = results.load(a.run_dir, "topk_kld")
    names = a.variants or [v.variant for v in res.variants if v.name != res.reference]
    rows = [measure(a.run_dir, n, a.k) for n in dict.fromkeys(names)]
    print("| variant | runtime | KLD full | " + " | ".join(f"top-{k} estimate (share)" for k in a.k) + " |")
    print("|---|---|---|" + "---|" * len(a.k))
    for r in rows:
        cells = [f"{r['topk'][str(k)]['kld']:.5f} ({100 * r['topk'][str(k)]['share_of_full']:.1f} %)" for k in a.k]
        print(f"| {r['variant']} | {r['runtime']} | {r['kld_full']:.5f} | " + " | ".join(cells) + " |")
    if a.out:
        a.out.write_text(json.dumps({"run_dir": str(a.run_dir), "k": a.k, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
