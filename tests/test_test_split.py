"""The optional test split: read like val, kept out of training, evaluated through the API and the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from cacnb.config import load_config
from cacnb.data import build_eval_dataset
from cacnb.data.errors import DatasetError
from cacnb.data.splits import eval_pairs, split_lists, voc_train_ids
from cacnb.data.palette import VOC_CLASSES
from cacnb.evaluate import evaluate_run, main as evaluate_main, result_to_json
from cacnb.runs import load_run
from cacnb.model import build_model

from conftest import save_model_checkpoint
from held_out import with_test_split


@pytest.fixture(scope="module")
def held_out_dir(synthetic_data_dir, tmp_path_factory):
    return with_test_split(synthetic_data_dir, tmp_path_factory.mktemp("held_out"), n_test=4)


def _ids(pairs):
    return {p[0] for p in pairs}


def test_test_split_is_read_like_val_and_disjoint(held_out_dir):
    cfg = load_config("synthetic", [f"data.data_dir={held_out_dir}", "data.n_labeled=6"])
    test = build_eval_dataset(cfg.data, "test")
    val = build_eval_dataset(cfg.data, "val")
    assert len(test) == 4 and len(val) == 6
    for split in ("test", "val"):                                    # both from the dataset's own lists
        assert eval_pairs(cfg.data, split)[1] == f"{cfg.data.data_dir}: the dataset's {split} list"
    lists = split_lists(cfg.data)
    train = _ids(lists.labeled) | _ids(lists.unlabeled)
    assert not (_ids(test.files.pairs) & train) and not (_ids(test.files.pairs) & _ids(val.files.pairs))
    item = test[0]
    assert item["image"].shape[-2:] == item["label"].shape          # whole images, as val


def test_test_max_images_keeps_the_first_test_images_for_every_reader(held_out_dir):
    """make demo's quick test: the cap is applied where the lists are decided, so evaluation and the consistency
    pairs see the same images; val and the training lists do not change."""
    from cacnb.data import build_eval_pair_dataset

    over = [f"data.data_dir={held_out_dir}", "data.n_labeled=6"]
    full = split_lists(load_config("synthetic", over).data)
    capped_cfg = load_config("synthetic", over + ["data.test_max_images=3"])
    capped = split_lists(capped_cfg.data)
    assert capped.test == full.test[:3] and len(full.test) == 4
    assert capped.sources["test"].endswith("its first 3 of 4 images (data.test_max_images)")
    assert list(capped) == list(full)                                   # labeled, unlabeled, val unchanged
    assert len(build_eval_dataset(capped_cfg.data, "test")) == 3
    assert len(build_eval_pair_dataset(capped_cfg.data, "test")) == 3
    assert split_lists(load_config("synthetic", over + ["data.test_max_images=9"]).data).test == full.test
    with pytest.raises(ValueError, match="data.test_max_images"):
        load_config("synthetic", over + ["data.test_max_images=0"])


def test_train_ids_exclude_test_ids_without_a_train_list(held_out_dir, tmp_path):
    root = held_out_dir / "VOCdevkit" / "VOC2012"
    test_ids = set((root / "ImageSets/Segmentation/test.txt").read_text().split())
    (root / "ImageSets/Segmentation/train_aug.txt").rename(tmp_path / "train_aug.txt")
    try:
        assert not test_ids & set(voc_train_ids(root)) and len(voc_train_ids(root)) == 20
    finally:
        (tmp_path / "train_aug.txt").rename(root / "ImageSets/Segmentation/train_aug.txt")


def test_missing_test_list_is_explained(synthetic_data_dir):
    cfg = load_config("synthetic", [f"data.data_dir={synthetic_data_dir}", "data.n_labeled=6"])
    with pytest.raises(DatasetError, match="test.txt"):
        build_eval_dataset(cfg.data, "test")
    with pytest.raises(DatasetError, match="split must be one of"):
        eval_pairs(cfg.data, "train")


@pytest.mark.filterwarnings("ignore:model.pretrained is None:UserWarning")
def test_evaluate_api_and_cli_on_test(held_out_dir, tmp_path, capsys, one_thread):
    cfg = load_config("synthetic", [f"data.data_dir={held_out_dir}", "data.n_labeled=6"])
    torch.manual_seed(0)
    model = build_model(cfg)
    ckpt = save_model_checkpoint(model, tmp_path / "m.pt", cfg)
    on_test = evaluate_run(load_run(ckpt, config="synthetic", data_dir=str(held_out_dir), device="cpu"),
                           split="test", progress=False)
    on_val = evaluate_run(load_run(ckpt, config="synthetic", data_dir=str(held_out_dir), device="cpu",
                                   overrides=["data.n_labeled=6"]), progress=False)
    assert on_test["num_images"] == 4 and on_val["num_images"] == 6 and on_test["split"] == "test"
    # one name per class of the model (the synthetic set uses the first VOC ids), so result_to_json keeps them
    assert on_test["class_names"] == list(VOC_CLASSES[:on_test["cfg"].data.num_classes])
    assert result_to_json(on_test, on_test["class_names"])["iou_by_class"].keys() == set(on_test["class_names"])
    out = tmp_path / "test.json"
    assert evaluate_main(["--config", "synthetic", "--checkpoint", str(ckpt), "--data-dir", str(held_out_dir),
                          "--split", "test", "--out", str(out), "--no-progress"]) == 0
    saved = json.loads(out.read_text())
    assert saved["split"] == "test" and saved["num_images"] == 4
    assert saved["miou"] == pytest.approx(on_test["miou"])
    assert "4 test images" in capsys.readouterr().out
    assert evaluate_main(["--config", "synthetic", "--checkpoint", str(ckpt), "--split", "test",
                          "--data-dir", str(tmp_path / "nowhere")]) == 2
