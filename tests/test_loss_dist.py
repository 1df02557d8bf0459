"""Two gloo ranks on CPU: the gathered negatives are both ranks' samples, concatenated in rank order."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

WORKER = textwrap.dedent('''
    import os, sys
    import torch
    import torch.nn.functional as F
    from cacnb import dist
    from cacnb.config import LossConfig
    from cacnb.loss import FeatureBank, cac_unsup_loss, sample_negatives

    def crops(rank):
        g = torch.Generator().manual_seed(100 + rank)
        out = []
        for _ in range(2):
            proj = F.normalize(torch.randn(2, 8, 6, 6, generator=g), dim=1)
            out.append({"proj": proj, "logits": torch.randn(2, 4, 6, 6, generator=g) * 3})
        return out

    def local_negatives(rank, num):
        """What rank ``rank`` samples: crop a then crop b, from its own generator."""
        gen = torch.Generator().manual_seed(rank)
        pieces = [sample_negatives(c["proj"], torch.softmax(c["logits"], 1).argmax(1), num, gen) for c in crops(rank)]
        return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])

    dist.init_from_env(backend="gloo", timeout_s=60)
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = LossConfig(selected_num=10, step_save=1, chunk_size=7)
    overlap = torch.tensor([[[0, 0, 32, 48], [16, 0, 48, 48]]] * 2)
    flip = torch.tensor([[False, True], [True, True]])
    bank = FeatureBank(cfg.step_save)
    crop_a, crop_b = crops(rank)
    gen = torch.Generator().manual_seed(rank)
    loss, stats = cac_unsup_loss(crop_a, crop_b, overlap, flip, bank, cfg, generator=gen)
    # ranks holding different row counts: rank 1 asks for more positions than exist (clamped to 72)
    gen = torch.Generator().manual_seed(7 + rank)
    mine = sample_negatives(crop_a["proj"], crop_a["logits"].argmax(1), 5 if rank == 0 else 500, gen)[0]
    gathered = dist.all_gather_nograd(mine)
    torch.save({"bank_feat": bank.feat, "bank_label": bank.label, "n_neg": stats["n_neg"],
                "local": local_negatives(rank, 10), "mine": mine, "gathered": gathered, "world": world},
               os.path.join(sys.argv[1], f"rank{rank}.pt"))
    dist.cleanup()
''')


def test_two_rank_gather_is_the_concatenation(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    want_feat = torch.cat([r["local"][0] for r in ranks])
    want_label = torch.cat([r["local"][1] for r in ranks])
    assert len(want_feat) == 2 * 2 * 10
    for r in ranks:
        assert r["world"] == 2 and r["n_neg"] == 40
        assert torch.equal(r["bank_feat"], want_feat)
        assert torch.equal(r["bank_label"], want_label)
        assert len(r["gathered"]) == 5 + 72
        assert torch.equal(r["gathered"], torch.cat([ranks[0]["mine"], ranks[1]["mine"]]))
    assert not torch.equal(ranks[0]["local"][0], ranks[1]["local"][0])  # the ranks really sampled differently
