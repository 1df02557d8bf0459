"""cacnb.pretrain and its classification set: the weights load through model.pretrained, bad files are refused,
stale ones noticed, and the set shares no image with the segmentation benchmark."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cacnb import pretrain
from cacnb.checkpoint_io import CheckpointError, CorruptCheckpointError
from cacnb.config import load_config
from cacnb.data.synthetic import SPLIT_STREAMS, classification, make_synthetic_voc, render_context_scene
from cacnb.data.synthetic.context import CONTEXT_CLASSES
from cacnb.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = pretrain.Recipe(train_images=48, heldout_images=16, epochs=1, batch=16, warmup_iters=1, size=32)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny pretrained file (3 iterations), written the way ``python -m cacnb.pretrain`` writes one."""
    model, stats = pretrain.train_classifier(TINY, progress=False)
    out = tmp_path_factory.mktemp("pretrained") / "synthetic_resnet18.pth"
    return pretrain.write_pretrained(model, out, TINY, stats, command="test")


def _config(path):
    return load_config("synthetic_context", {"model.pretrained": str(path)})


def test_the_file_loads_through_model_pretrained_into_the_backbone(weights):
    saved = torch.load(weights, weights_only=True)
    assert "fc.weight" in saved and saved["fc.weight"].shape[0] == len(classification.CLASS_NAMES)
    model = build_model(_config(weights))
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, saved[name]), name                 # every backbone tensor, strictly
    meta = json.loads(pretrain.metadata_path(weights).read_text())
    assert meta["recipe"] == TINY.describe() and 0.0 <= meta["heldout_top1"] <= 1.0
    assert meta["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_a_corrupt_or_mismatched_file_is_refused_naming_it(weights, tmp_path):
    broken = tmp_path / "synthetic_broken.pth"
    broken.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CorruptCheckpointError, match="synthetic_broken.pth"):
        build_model(_config(broken))
    partial = tmp_path / "synthetic_partial.pth"
    state = torch.load(weights, weights_only=True)
    del state["layer4.1.conv2.weight"]
    torch.save(state, partial)
    with pytest.raises(CheckpointError, match="synthetic_partial.pth(.|\n)*layer4.1.conv2.weight"):
        build_model(_config(partial))
    with pytest.raises(CheckpointError, match="resnet34"):             # another depth: named, and refused
        build_model(load_config("synthetic_context", {"model.pretrained": str(weights),
                                                      "model.backbone": "resnet34"}))


def test_a_missing_synthetic_backbone_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="make pretrain"):
        build_model(_config(tmp_path / "synthetic_resnet18.pth"))


def test_status_notices_missing_stale_and_changed_files(weights, tmp_path):
    assert pretrain.status(weights, TINY) is None
    assert "stale" in pretrain.status(weights, dataclasses.replace(TINY, epochs=2))
    assert "does not exist" in pretrain.status(tmp_path / "none.pth", TINY)
    copy = tmp_path / "synthetic_copy.pth"
    copy.write_bytes(weights.read_bytes() + b"x")
    pretrain.metadata_path(copy).write_text(pretrain.metadata_path(weights).read_text())
    assert "digest" in pretrain.status(copy, TINY)


def test_ensure_pretrained_leaves_other_files_alone(tmp_path):
    assert pretrain.ensure_pretrained(None) is None
    assert pretrain.ensure_pretrained(tmp_path / "resnet50-19c8e357.pth") is None   # a real ImageNet file
    assert pretrain.recipe_for("pretrained/synthetic_resnet18.pth") == "full"


def test_bad_cli_arguments_exit_2(capsys):
    assert pretrain.main(["--threads", "0"]) == 2 and "--threads" in capsys.readouterr().err


def _hashes(images) -> set[str]:
    return {hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images}


def test_the_set_shares_no_image_with_the_segmentation_splits(tmp_path):
    assert not set(classification.PRETRAIN_STREAMS.values()) & set(SPLIT_STREAMS.values())
    pretraining = set()
    for split in classification.PRETRAIN_STREAMS:
        images, _ = classification.make_classification_set(40, split, size=64)
        pretraining |= _hashes(images.permute(0, 2, 3, 1).numpy())
    assert len(pretraining) == 80                                      # no image repeats within the set either
    # the benchmark's images, as rendered and as written to disk, by content
    benchmark = _hashes(render_context_scene(np.random.default_rng([0, stream, i]))[0]
                        for stream in SPLIT_STREAMS.values() for i in range(40))
    voc = make_synthetic_voc(tmp_path, 6, 3, num_test=3, style="context", progress=False)
    benchmark |= _hashes(np.asarray(Image.open(p)) for p in (voc / "JPEGImages").glob("*.jpg"))
    assert not pretraining & benchmark
    # the same renderer on a segmentation stream would collide: the streams are what keeps them apart
    same_stream = classification.render_classification_image(np.random.default_rng([0, 7, 0]))[0]
    assert _hashes([same_stream]) <= pretraining


def test_classes_are_appearances_so_look_alikes_share_one():
    names = classification.CLASS_NAMES
    assert "boat/car" in names and "bird/bus" in names and len(set(names)) == len(names)
    looks = {(c.shape, c.colour, c.texture) for c in CONTEXT_CLASSES}
    assert len(looks) == len(CONTEXT_CLASSES) - 2                       # two look-alike pairs
    drawn = {(c.shape, c.colour, c.texture) for _, c in classification.APPEARANCES}
    assert looks <= drawn and len(drawn) == len(names)


def test_images_depend_only_on_their_index():
    a, la = classification.make_classification_set(5, "train", size=32)
    b, lb = classification.make_classification_set(8, "train", size=32)
    assert torch.equal(a, b[:5]) and torch.equal(la, lb[:5])
    c, _ = classification.make_classification_set(5, "heldout", size=32)
    assert not torch.equal(a, c)
    assert set(lb.tolist()) <= set(range(len(classification.CLASS_NAMES)))
