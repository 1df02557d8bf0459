"""The paper's experiments: every official JSON file, the shipped split lists, the negatives total, the stride.

The official files below are written out with the paper's values (github.com/dvlab-research/
Context-Aware-Consistency, configs/*.json): the nine files differ only in experim_name, datalist, model.layers
and model.step_save (VOC), so each is the VOC or Cityscapes base with those four values.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cacnb.config import ConfigError, load_config
from cacnb.data import official
from cacnb.data.preflight import check_dataset
from cacnb.data.splits import split_lists
from cacnb.loss import directional_contrastive_loss, negatives_note, negatives_per_crop
from cacnb.config.official import RULES, _leaves, import_official

SHIPPED = Path(__file__).resolve().parents[1] / "cacnb" / "data" / "official_splits"


def _official_base(city: bool) -> dict:
    """configs/{voc,city}_cac_deeplabv3+_resnet50_1over8_datalist0.json, value for value."""
    crop, base = (720, 2048) if city else (320, 400)
    supervised = {"batch_size": 8, "crop_size": crop, "shuffle": True, "base_size": base, "scale": True,
                  "augment": True, "flip": True, "rotate": False, "blur": False, "split": "train_supervised",
                  "num_workers": 8}
    if city:
        supervised["jitter"] = True
    return {
        "name": "CAC", "experim_name": f"{'city' if city else 'voc'}_cac_deeplabv3+_resnet50_1over8_datalist0",
        "dataset": "cityscapes" if city else "voc",
        "data_dir": "/home/xinlai/dataset/cityscapes" if city else "/home/xinlai/VOCtrainval_11-May-2012",
        "datalist": 0, "n_gpu": 4 if city else 2, "n_labeled_examples": 372 if city else 1323, "diff_lrs": True,
        "ramp_up": 0.1, "unsupervised_w": 30, "ignore_index": 255, "lr_scheduler": "Poly",
        "use_weak_lables": False, "weakly_loss_w": 0.4, "pretrained": True, "random_seed": 42,
        "model": {"supervised": False, "semi": True, "supervised_w": 1, "sup_loss": "CE", "layers": 50,
                  "downsample": True, "proj_final_dim": 128, "out_dim": 256, "backbone": "deeplab_v3+",
                  "pos_thresh_value": 0.75, "weight_unsup": 0.1, "epoch_start_unsup": 5,
                  "selected_num": 16200 if city else 6400, "temp": 0.1, "step_save": 0 if city else 1,
                  "stride": 8},
        "optimizer": {"type": "SGD", "args": {"lr": 0.1 if city else 0.01, "weight_decay": 1e-4, "momentum": 0.9}},
        "train_supervised": supervised,
        "train_unsupervised": {"batch_size": 8, "crop_size": crop, "shuffle": True, "base_size": base,
                               "scale": True, "augment": True, "flip": True, "rotate": False, "blur": False,
                               "split": "train_unsupervised", "num_workers": 8, "iou_bound": [0.1, 1.0],
                               "stride": 8},
        "val_loader": {"batch_size": 4 if city else 2, "val": True, "split": "val", "shuffle": False,
                       "num_workers": 4},
        "trainer": {"epochs": 80, "save_dir": "saved/", "save_period": 1, "monitor": "max Mean_IoU",
                    "early_stop": 100, "tensorboardX": True, "log_dir": "saved/", "log_per_iter": 20, "val": True,
                    "val_per_epochs": 1},
    }


# file -> (dataset, layers, datalist, step_save, the negatives total 2 x selected_num x n_gpu x (step_save + 1))
PAPER_FILES = {
    **{f"voc_cac_deeplabv3+_resnet{layers}_1over8_datalist{k}.json": ("voc", layers, k, step, total)
       for layers, step, total in ((50, 1, 51_200), (101, 2, 76_800)) for k in (0, 1, 2)},
    **{f"city_cac_deeplabv3+_resnet50_1over8_datalist{k}.json": ("cityscapes", 50, k, 0, 129_600)
       for k in (0, 1, 2)},
}


def official_file(name: str) -> dict:
    dataset, layers, k, step_save, _ = PAPER_FILES[name]
    d = _official_base(dataset == "cityscapes")
    d.update(experim_name=name.removesuffix(".json"), datalist=k)
    d["model"].update(layers=layers, step_save=step_save)
    return d


def _fake_root(tmp_path: Path, dataset: str) -> Path:
    """Just the folders dataset_root() looks for: the official lists are written without opening images."""
    if dataset == "voc":
        (tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages").mkdir(parents=True)
    else:
        (tmp_path / "leftImg8bit").mkdir(parents=True)
        (tmp_path / "gtFine").mkdir()
    return tmp_path


def _shipped(path: str) -> list[str]:
    return (SHIPPED / path).read_text().split()


def _ids(pairs, dataset) -> list[str]:
    if dataset == "voc":
        return [Path(p[0]).stem for p in pairs]
    return [p[0].split("/", 3)[3].removesuffix("_leftImg8bit.png") for p in pairs]


@pytest.mark.parametrize("name", sorted(PAPER_FILES))
def test_every_official_file_is_the_papers_experiment(name, tmp_path, capsys):
    dataset, layers, k, step_save, total = PAPER_FILES[name]
    path = tmp_path / name
    path.write_text(json.dumps(official_file(name)))
    root = _fake_root(tmp_path / "data", dataset)
    cfg = load_config(path, {"data.data_dir": str(root)})
    assert cfg.train.iters_per_epoch == 1157 and cfg.train.eval_mode == "whole" and cfg.train.epochs == 80
    assert cfg.model.backbone == f"resnet{layers}" and cfg.loss.step_save == step_save
    assert cfg.data.datalist == k and cfg.data.split_dir is None
    # the paper's negatives, at one process and at two (and at the paper's GPU count)
    for world in (1, 2, cfg.loss.paper_n_gpu):
        assert 2 * negatives_per_crop(cfg.loss, world) * world * (cfg.loss.step_save + 1) == total
    # the datalist's shipped lists are what the run reads
    n = cfg.data.n_labeled
    labeled, unlabeled, val = split_lists(cfg.data)
    train_list = "voc/train_aug.txt" if dataset == "voc" else "cityscapes/train.txt"
    assert _ids(labeled, dataset) == _shipped(f"{dataset}/datalist{k}/{n}_labeled.txt")
    assert sorted(_ids(labeled, dataset) + _ids(unlabeled, dataset)) == sorted(_shipped(train_list))
    assert not set(_ids(labeled, dataset)) & set(_ids(unlabeled, dataset))
    assert _ids(val, dataset) == _shipped(f"{dataset}/val.txt")
    # notes only name the ignored keys (the data_dir line is gone: data.data_dir was set)
    out = capsys.readouterr().out
    assert "ignored" in out and "does not exist" not in out


@pytest.mark.parametrize("name", ["voc_cac_deeplabv3+_resnet50_1over8_datalist0.json",
                                  "city_cac_deeplabv3+_resnet50_1over8_datalist2.json"])
def test_no_official_key_is_dropped_silently(name):
    """Changing any key either changes the Config, is an error naming it, or is listed in the notes as ignored."""
    d = official_file(name)
    base, notes = import_official(d)
    assert len(notes) == 1
    for key, value in _leaves(d).items():
        assert key in RULES
        if RULES[key] == ("ignored",):
            assert key in notes[0]
        changed = copy.deepcopy(d)
        *parents, leaf = key.split(".")
        owner = changed
        for p in parents:
            owner = owner[p]
        owner[leaf] = _perturb(value)
        try:
            cfg, _ = import_official(changed)
        except ConfigError as e:
            assert leaf in str(e), (key, str(e))
            continue
        if RULES[key] == ("ignored",):
            assert cfg.to_dict() == base.to_dict(), key
        else:
            assert cfg.to_dict() != base.to_dict(), f"{key} was dropped"


def _perturb(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, list):
        return [0.2, 0.9]
    return value + "x"


def test_misspelt_official_key_is_an_error_naming_it():
    d = official_file("voc_cac_deeplabv3+_resnet50_1over8_datalist0.json")
    d["model"]["selcted_num"] = d["model"].pop("selected_num")
    with pytest.raises(ConfigError, match=r"'model\.selcted_num' \(did you mean 'model\.selected_num'\?\)"):
        load_config(d)
    d = official_file("voc_cac_deeplabv3+_resnet50_1over8_datalist0.json")
    d["n_gpus"] = 2
    with pytest.raises(ConfigError, match="n_gpus"):
        load_config(d)


@pytest.mark.parametrize("section,key,value", [(None, "lr_scheduler", "OneCycle"), ("model", "out_dim", 512),
                                               ("train_supervised", "rotate", True), ("model", "sup_loss", "DICE"),
                                               ("trainer", "early_stop", 10)])
def test_non_honourable_official_value_is_an_error_naming_it(section, key, value):
    d = official_file("voc_cac_deeplabv3+_resnet50_1over8_datalist0.json")
    (d[section] if section else d)[key] = value
    with pytest.raises(ConfigError, match=key):
        load_config(d)


def test_data_dir_of_another_machine_is_one_line(capsys):
    load_config(official_file("voc_cac_deeplabv3+_resnet50_1over8_datalist0.json"))
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if "/home/xinlai/VOCtrainval_11-May-2012" in line and "does not exist" in line]
    assert len(lines) == 2  # that line and the one naming the ignored keys


def test_stride_other_than_the_feature_stride_is_rejected():
    with pytest.raises(ConfigError, match=r"data\.stride must be 8, the stride of the features"):
        load_config("voc_r50_1323", {"data.stride": 16})
    d = official_file("voc_cac_deeplabv3+_resnet50_1over8_datalist0.json")
    d["model"]["stride"] = d["train_unsupervised"]["stride"] = 16
    with pytest.raises(ConfigError, match=r"data\.stride must be 8"):
        load_config(d)


def test_presets_select_datalist_0_and_the_papers_gpus():
    for name, n_gpu in (("voc_r50_1323", 2), ("voc_r101_662", 2), ("cityscapes_r50_744", 4)):
        cfg = load_config(name)
        assert cfg.data.datalist == 0 and cfg.loss.paper_n_gpu == n_gpu and cfg.train.eval_mode == "whole"
        assert cfg.train.iters_per_epoch == 1157
    synthetic = load_config("synthetic")
    assert synthetic.data.datalist is None and synthetic.loss.paper_n_gpu is None


def test_a_count_without_official_list_is_an_error_unless_a_random_split_is_asked(tmp_path):
    with pytest.raises(ConfigError, match=r"n_labeled=500 .* datalist 1; the counts there are \[662, 1323, 2645\]"
                                          r".*data\.datalist=null"):
        load_config("voc_r50_1323", {"data.n_labeled": 500, "data.datalist": 1})
    assert load_config("voc_r50_1323", {"data.n_labeled": 500}).data.datalist == 0  # datalist 0 has 500
    cfg = load_config("cityscapes_r50_372", {"data.n_labeled": 100, "data.datalist": None})
    assert cfg.data.datalist is None
    with pytest.raises(ConfigError, match="no official split lists"):
        load_config("synthetic", {"data.datalist": 0})
    # a CAC clone (data.split_dir) keeps working with any count it holds
    assert load_config("voc_r50_1323", {"data.n_labeled": 7, "data.split_dir": str(tmp_path)}).data.n_labeled == 7


def test_shipped_lists_are_the_papers():
    assert official.datalists("voc") == [0, 1, 2] and official.datalists("cityscapes") == [0, 1, 2]
    assert official.labeled_counts("voc", 0) == [60, 100, 200, 300, 500, 662, 800, 1000, 1323, 1464, 2645]
    assert official.labeled_counts("voc", 1) == official.labeled_counts("voc", 2) == [662, 1323, 2645]
    assert official.labeled_counts("cityscapes", 2) == [372, 744]
    assert (len(official.train_ids("voc")), len(official.val_ids("voc"))) == (10_582, 1_449)
    assert (len(official.train_ids("cityscapes")), len(official.val_ids("cityscapes"))) == (2_975, 500)
    for dataset in ("voc", "cityscapes"):
        train = set(official.train_ids(dataset))
        for k in official.datalists(dataset):
            for n in official.labeled_counts(dataset, k):
                ids = official.labeled_ids(dataset, k, n)
                assert len(ids) == len(set(ids)) == n and set(ids) <= train
    assert official.id_pair("cityscapes", "train", "aachen/aachen_000000_000019") == (
        "/leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
        "/gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png")
    assert "MIT License" in (SHIPPED / "README.md").read_text()


def test_negatives_note_when_the_world_size_differs():
    cfg = load_config("voc_r50_1323")
    note = negatives_note(cfg.loss, 1)
    assert "2 GPUs" in note and "12800 per crop" in note and "51200 negatives" in note
    assert negatives_note(cfg.loss, 2) is None  # the paper's world size: nothing to say
    official_rule = load_config("voc_r50_1323", {"loss.paper_n_gpu": None}).loss
    assert negatives_per_crop(official_rule, 1) == 6400 and negatives_note(official_rule, 1) is None
    fixed = load_config("voc_r50_1323", {"loss.neg_total": 25_600}).loss
    assert negatives_per_crop(fixed, 1) == 6400 and negatives_note(fixed, 1) is None  # neg_total wins


def test_preflight_names_every_missing_id_of_the_chosen_lists(tmp_path):
    from PIL import Image

    root = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    present = official.labeled_ids("voc", 0, 60)[:3]
    for i in present:
        Image.new("RGB", (8, 8)).save(root / "JPEGImages" / f"{i}.jpg")
        Image.new("L", (8, 8)).save(root / "SegmentationClassAug" / f"{i}.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(present) + "\n")
    cfg = load_config("voc_r50_1323", {"data.data_dir": str(tmp_path), "data.n_labeled": 60})
    report = check_dataset(cfg, progress=False)
    missing = report.by_kind()["missing_split_id"]
    missing_labeled = {Path(p.path).stem for p in missing if "60 labeled" in p.detail}
    expected = set(official.labeled_ids("voc", 0, 60)) - set(present)
    assert missing_labeled == expected  # each missing labeled id, by name; the present ones are not reported
    assert any("id 2007_000033 of voc datalist 0, val" in p.detail for p in missing)
    assert "ids of the chosen split lists missing on disk" in str(report)


def test_training_start_prints_the_negatives_line_once(capsys):
    from cacnb.train.bootstrap import check_negatives

    check_negatives(load_config("cityscapes_r50_372"), 1)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "4 GPUs x 16200 per crop" in lines[0] and "129600 negatives" in lines[0]
    check_negatives(load_config("cityscapes_r50_372"), 4)
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------------------------
# the loss's log-sum-exp: the official shift and its eps


def _official_direction(q, k, conf_q, conf_k, label_q, neg, neg_label, eps, temperature=0.1, thresh=0.75,
                        chunk=8000):
    """One direction of the loss as the official code evaluates it (models/model.py, restated): the shift ``m_i``
    is the largest of the positive and the *first chunk's* logits (filtered or not, and not detached); every
    chunk is shifted by it; ``eps`` is added to the denominator and again inside the log."""
    pos = (q * k.detach()).sum(1) / temperature                                    # [n]
    logits = q @ neg.T / temperature                                               # [n, N]
    kept = (neg_label[None, :] != label_q[:, None]).to(q.dtype)
    shift = torch.cat([pos[:, None], logits[:, :chunk]], 1).amax(1)                # first chunk only
    top = torch.exp(pos - shift)
    denominator = top + (torch.exp(logits - shift[:, None]) * kept).sum(1)
    per_anchor = -torch.log(top / (denominator + eps) + eps)
    w = ((conf_k > thresh) & (conf_q < conf_k)).to(q.dtype)
    return (per_anchor * w).sum() / (w.sum() + 1e-12)


def _loss_and_projector_grad(kind, proj, views, eps=0.0):
    """(loss_a + loss_b, gradient of the projector's parameters) in fp64, by cacnb or the official rule."""
    x_a, x_b, x_neg, conf_a, conf_b, label_a, label_b, neg_label = views
    proj.zero_grad()
    feat_a, feat_b = F.normalize(proj(x_a), dim=1), F.normalize(proj(x_b), dim=1)
    with torch.no_grad():
        neg = F.normalize(proj(x_neg), dim=1)
    if kind == "cacnb":
        loss_a, loss_b = directional_contrastive_loss(feat_a, feat_b, conf_a, conf_b, label_a, label_b, neg,
                                                      neg_label)
    else:
        loss_a = _official_direction(feat_a, feat_b, conf_a, conf_b, label_a, neg, neg_label, eps)
        loss_b = _official_direction(feat_b, feat_a, conf_b, conf_a, label_b, neg, neg_label, eps)
    loss = loss_a + loss_b
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in proj.parameters()])


def _views(mix, n=512, big_n=12_800, c=128, seed=0):
    """Projector inputs of ``n`` overlap positions in two crops (crop b's input correlates with crop a's by
    ``mix``) and of ``big_n`` negatives (the paper's 2 x 6400 of one step on one GPU), isotropic; confidences
    U(0, 1), pseudo-labels uniform over 21 classes."""
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    x_a = torch.randn(n, c, generator=g, dtype=d)
    x_b = mix * x_a + (1 - mix ** 2) ** 0.5 * torch.randn(n, c, generator=g, dtype=d)
    x_neg = torch.randn(big_n, c, generator=g, dtype=d)
    conf = [torch.rand(n, generator=g, dtype=d) for _ in range(2)]
    labels = [torch.randint(21, (rows,), generator=g) for rows in (n, n, big_n)]
    return x_a, x_b, x_neg, conf[0], conf[1], labels[0], labels[1], labels[2]


@pytest.mark.parametrize("mix,loss_band,grad_band", [
    (0.0, (3e-5, 1.2e-4), (6e-4, 2.5e-3)),   # positives no closer than negatives: loss ~10 per direction
    (0.5, (2e-7, 2e-6), (2e-6, 2e-5)),       # positives at cosine ~0.5: loss ~5
])
def test_official_shift_is_exact_and_its_eps_is_the_difference(mix, loss_band, grad_band):
    """At 12,800 negatives (fp64, so fp32 rounding hides nothing): the official first-chunk shift with eps = 0
    equals cacnb's loss and projector gradients to ~1e-12, although for many anchors the largest logit lies
    beyond the first chunk (unit features at T = 0.1 bound every shifted term by e^20: nothing overflows). The
    official eps = 1e-8 is the one difference; its measured size is what FIDELITY.md states."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(128, 128).double()
    views = _views(mix)
    loss, grad = _loss_and_projector_grad("cacnb", proj, views)
    loss0, grad0 = _loss_and_projector_grad("official", proj, views, eps=0.0)
    loss_eps, grad_eps = _loss_and_projector_grad("official", proj, views, eps=1e-8)
    with torch.no_grad():
        feat_a, neg = F.normalize(proj(views[0]), dim=1), F.normalize(proj(views[2]), dim=1)
        logits = feat_a @ neg.T / 0.1
    assert (logits[:, 8000:].amax(1) > logits[:, :8000].amax(1)).float().mean() > 0.2  # max beyond chunk 1
    torch.testing.assert_close(loss0, loss, rtol=1e-12, atol=0)
    assert float((grad0 - grad).norm() / grad.norm()) < 1e-12
    loss_change = float((loss - loss_eps) / loss)
    grad_change = float((grad_eps - grad).norm() / grad.norm())
    assert loss_band[0] < loss_change < loss_band[1], loss_change
    assert grad_band[0] < grad_change < grad_band[1], grad_change
