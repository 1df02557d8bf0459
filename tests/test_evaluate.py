"""cacnb.evaluate: inference modes on toy models, rank sharding under gloo, and the command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from cacnb.evaluate import (evaluate, predict, predict_slide, predict_whole, shard_indices, _window_starts)

K = 5


class ToyNet(nn.Module):
    """Logits at input resolution from a 3x3 conv (local receptive field, like a real segmenter's border)."""

    def __init__(self, kernel: int = 3, symmetric: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, K, kernel, padding=kernel // 2)
        if symmetric:  # mirror-symmetric kernels make the net equivariant to horizontal flips
            with torch.no_grad():
                self.conv.weight.copy_((self.conv.weight + self.conv.weight.flip(-1)) / 2)

    def forward(self, x):
        return self.conv(x)


def toy_dataset(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i, (h, w) in enumerate(sizes):
        label = torch.randint(0, K, (h, w), generator=g)
        label[torch.rand(h, w, generator=g) < 0.1] = 255
        items.append({"image": torch.randn(3, h, w, generator=g), "label": label, "id": str(i)})
    return items


def test_window_starts_cover_the_axis():
    assert _window_starts(10, 4, 3) == [0, 3, 6]
    assert _window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert _window_starts(4, 4, 3) == [0]


def test_whole_pads_to_multiple_of_8_and_crops_back():
    seen = []

    class Spy(ToyNet):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return super().forward(x)

    out = predict_whole(Spy(), torch.randn(1, 3, 37, 45))
    assert seen == [(40, 48)] and out.shape == (1, K, 37, 45)


def test_slide_equals_whole_when_one_window_covers_the_image():
    net = ToyNet().eval()
    image = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        whole = predict_whole(net, image)
        torch.testing.assert_close(predict_slide(net, image, crop_size=48, slide_stride=32), whole)
        square = torch.randn(1, 3, 40, 40)
        torch.testing.assert_close(predict_slide(net, square, crop_size=40), predict_whole(net, square))


def test_slide_with_many_windows_stitches_a_pointwise_model_exactly():
    net = ToyNet(kernel=1).eval()
    image = torch.randn(1, 3, 53, 70)
    with torch.no_grad():
        torch.testing.assert_close(predict_slide(net, image, crop_size=24, slide_stride=16), net(image))


def test_flip_tta_of_a_flip_equivariant_model_changes_nothing():
    net = ToyNet(symmetric=True).eval()
    data = toy_dataset([(32, 48), (24, 40), (16, 16)])
    with torch.no_grad():
        image = data[0]["image"][None]
        plain = predict(net, image).softmax(1)
        tta = predict(net, image, flip=True)
    torch.testing.assert_close(tta, plain)
    a = evaluate(net, data, K, progress=False)
    b = evaluate(net, data, K, flip=True, progress=False)
    assert torch.equal(a["confusion"], b["confusion"])


def test_flip_tta_does_change_an_asymmetric_model():
    net = ToyNet(seed=1).eval()
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(predict(net, image, flip=True), predict(net, image).softmax(1), atol=1e-4)


def test_multiscale_averages_probabilities():
    net = ToyNet().eval()
    with torch.no_grad():
        probs = predict(net, torch.randn(1, 3, 37, 45), scales=(0.5, 1.0, 1.5), flip=True, mode="slide",
                        crop_size=32)
    assert probs.shape == (1, K, 37, 45)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 37, 45))


def test_evaluate_restores_mode_respects_max_images_and_matches_metrics():
    from cacnb.metrics import confusion_matrix

    net = ToyNet(kernel=1).train()  # pointwise: padding cannot change the logits inside the image
    data = toy_dataset([(16, 24), (20, 20), (9, 13)])
    result = evaluate(net, data, K, max_images=2, progress=False)
    assert net.training and result["num_images"] == 2
    with torch.no_grad():
        expected = sum(confusion_matrix(net(d["image"][None]).argmax(1)[0], d["label"], K) for d in data[:2])
    assert torch.equal(result["confusion"], expected)
    assert len(result["iou"]) == K and 0 <= result["miou"] <= 1 and 0 <= result["pixel_acc"] <= 1


def test_shards_cover_every_image_once():
    shards = [shard_indices(7, r, 2) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(7)) and shards == [[0, 2, 4, 6], [1, 3, 5]]


WORKER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {test_dir!r})
    from cacnb import dist
    from cacnb.evaluate import evaluate
    from test_evaluate import ToyNet, toy_dataset, K, SIZES

    dist.init_from_env(timeout_s=60)
    result = evaluate(ToyNet(), toy_dataset(SIZES), K, progress=False)
    if dist.get_rank() == 0:
        torch.save(result["confusion"], {out!r})
    dist.cleanup()
""")
SIZES = [(16, 24), (20, 20), (9, 13), (24, 16), (12, 12), (17, 31), (8, 40)]  # odd: a padded sampler duplicates


@pytest.mark.slow
def test_two_process_gloo_evaluation_equals_one_process(tmp_path):
    out = tmp_path / "cm.pt"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(test_dir=str(Path(__file__).parent), out=str(out)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = evaluate(ToyNet(), toy_dataset(SIZES), K, progress=False)
    assert torch.equal(torch.load(out), single["confusion"])
    n_counted = int(single["confusion"].sum())
    assert n_counted == sum(int((d["label"] != 255).sum()) for d in toy_dataset(SIZES))


@pytest.fixture(scope="module")
def tiny_checkpoint(trained_run):
    """(config JSON, checkpoint) of the session's trained run on the synthetic fixture data: ResNet-18, 16-d
    projector (conftest.py)."""
    return trained_run / "config.json", trained_run / "best.pt"


def test_cli_prints_a_table_and_writes_json(tiny_checkpoint, tmp_path, capsys):
    from cacnb.evaluate import main

    config, ckpt = tiny_checkpoint
    out = tmp_path / "res" / "results.json"
    assert main(["--config", str(config), "--checkpoint", str(ckpt), "--max-images", "1", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "aeroplane" in printed and "mIoU" in printed and "on 1 val images" in printed
    data = json.loads(out.read_text())
    assert data["num_images"] == 1 and len(data["iou"]) == 21 and data["class_names"][0] == "background"
    assert sum(map(sum, data["confusion"])) > 0 and data["mode"] == "whole"


def test_cli_explains_a_checkpoint_that_does_not_fit_the_config(tiny_checkpoint, capsys):
    from cacnb.evaluate import main

    config, ckpt = tiny_checkpoint
    assert main(["--config", str(config), "--checkpoint", str(ckpt), "--set", "data.num_classes=19"]) == 2
    err = capsys.readouterr().err
    assert "data.num_classes is 21 in the checkpoint but 19 in the config" in err


def test_cli_explains_a_missing_split_dir(tiny_checkpoint, tmp_path, capsys):
    from cacnb.evaluate import main

    config, ckpt = tiny_checkpoint
    rc = main(["--config", str(config), "--checkpoint", str(ckpt), "--set", f"data.split_dir={tmp_path / 'none'}"])
    assert rc == 2 and "split_dir" in capsys.readouterr().err


def test_cli_explains_a_missing_val_list_file(tiny_checkpoint, tmp_path, capsys):
    from cacnb.data.synthetic import make_synthetic_voc
    from cacnb.evaluate import main

    config, ckpt = tiny_checkpoint
    voc = make_synthetic_voc(tmp_path / "syn", num_train=10, num_val=2, seed=1)
    (voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
    rc = main(["--config", str(config), "--checkpoint", str(ckpt), "--data-dir", str(voc.parent.parent),
               "--set", "data.n_labeled=4"])
    assert rc == 2 and "val.txt is missing" in capsys.readouterr().err
